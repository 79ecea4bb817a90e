"""The repository speaks of the product only.

Every tracked text file (``git ls-files``; binary files skipped) is scanned for words about how the
project was developed -- numbered work periods, issue numbers, the machines and tools it was built
with, paths outside the repository -- and the test fails naming each ``file:line``. Evidence for a
default belongs in ``docs/`` and ``benchmarks/RESULTS.md`` as a dated fact (what was measured, the
command, the device, the date), never as the story of who measured it when.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its patterns would match themselves

# (pattern, why it is not product wording); matched case-insensitively, line by line.
PATTERNS = [
    (r"\bsessions? \d+", "a numbered work period; state the date and the measurement instead"),
    (r"\bsessions \d+\s*(-|to|and)\s*\d+", "numbered work periods"),
    (r"\bissues? #?\d", "an issue number; say what the change does"),
    (r"\b(PR|pull request)s? #?\d", "a pull-request number"),
    (r"\bdevice (calls?|tool|budget|time)\b", "the development machine's tooling"),
    (r"\bcalls? \d+(\s*-\s*\d+)?\b(?!\s*(times|s\b|ms\b|x\b|%))", "a numbered call of a development machine"),
    (r"\b(this|the) dev(elopment)? machine\b", "the machine the project was developed on"),
    (r"\b(no longer|not|never) lent\b|\blent any more\b", "the development machines' availability"),
    (r"\bnvidia-h[12]00(-x\d)?\b", "a development tool's machine kind; name the GPU (NVIDIA H100)"),
    (r"\bthe GPU machine\b", "the machine the project was measured on; name the device"),
    (r"[.]carry/", "a development tool's folder"),
    (r"(?<![\w-])[.]whl/", "a development tool's folder of carried wheels"),
    (r"[.][.]/shared\b", "a path outside the repository"),
    (r"(?<![\w.-])shared/(fixtures|data|notes|papers|hooks)\b", "a path outside the repository"),
    (r"/work/", "a path outside the repository"),
    (r"\bfarm-", "a development machine's name"),
    (r"\$OUT\b", "a development tool's output folder; write a plain path"),
    (r"(?<![\w~])/(home|root|Users)/[\w.-]+/", "a path in someone's home directory"),
]
COMPILED = [(re.compile(p, re.IGNORECASE), why) for p, why in PATTERNS]


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = []
    for name in out.decode("utf-8", "surrogateescape").split("\0"):
        if not name or name == THIS_FILE:
            continue
        path = ROOT / name
        if path.is_file():
            files.append(path)
    return files


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def hits(text: str) -> list[tuple[int, str, str]]:
    """``(line number, matched text, why)`` for every pattern that matches a line of ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for pattern, why in COMPILED:
            match = pattern.search(line)
            if match:
                found.append((number, match.group(0), why))
    return found


@pytest.mark.parametrize("text", [
    "measured in sess" "ion 11 on the GPU",  # split so that a grep of the tree finds no example
    "sessions 9-10 used the same teachers",
    "see issue #22",
    "(iss" "ue 9)",
    "one dev" "ice call can carry",
    "Call 4 ran the ablations",
    "calls 2-5 ran one process per seed",
    "on this dev machine (2 cores)",
    "the H100 was no longer lent",
    "kind `nvidia-h100-x1`",
    "--lm .carry/ag/lm-gpt2-news",
    "See ../shared/notes/vllm.md",
    "python benchmarks/amalgamation.py --lm shared/fixtures/lm-gpt2-news",
    "cd /work/main && make",
    "host farm-gpu-3",
    "--out $OUT/generation.json",
    "The GPU machine has no Ray.",
    "pydantic + datasketch wheels in .whl/",
    "written to /home/alice/runs/",
])
def test_process_words_are_found(text):
    assert hits(text), text


@pytest.mark.parametrize("text", [
    "Ray sessions keep their logs under the Ray temp directory",
    "ray.init() starts a Ray session",
    "a session-scoped pytest fixture; reuse the task across pytest sessions",
    "session_dir = ray_context.session_dir",
    "the processor's call: apply(logits) is called once per step",
    "one call per teacher; calls 3 times per step",
    "a forward call took 5 ms; call 2 s of host time",
    "Measured on an NVIDIA H100 80GB HBM3 on 2026-11-23",
    "output.dir=/mnt/shared/runs/agnews",
    "file_mounts: ~/dfkd-ray",
    "python benchmarks/amalgamation.py --lm LM_DIR --out agnews.json",
    "transfer_set/ (shards, manifest, summary.png)",
    "On a 16-core GPU machine, run one process per seed",
    "dist/dfkd_ray-0.1.0-py3-none-any.whl",
    "see docs/steered-generation.md and the issues tab",
    "hidden states (B, N, H) # (B, m)",
])
def test_product_words_pass(text):
    assert not hits(text), hits(text)


def test_no_development_process_words_in_tracked_files():
    problems = []
    for path in tracked_text_files():
        text = read_text(path)
        if text is None:
            continue
        for number, matched, why in hits(text):
            problems.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {matched!r} ({why})")
    assert not problems, (f"{len(problems)} development-process word(s) in tracked files:\n  "
                          + "\n  ".join(problems))
