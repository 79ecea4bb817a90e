"""The whole job on Ray: the smoke preset end to end with two train workers (the session's ``ray job
submit`` run, tests/orchestration/conftest.py), its console, the steered transfer set against random
words, and on the random-words job: Ctrl-C, resume after a real kill, stage skipping and refusal of a
changed config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dfkd_ray.stages import StageMismatch

ROOT = Path(__file__).parents[2]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The job's own lines, each seen at least once.
JOB_LINES = [r"^transfer set: \d+ rows from \d+ requests", r"^confidence separation \(AUROC .*\): alpha [01]\.\d\d, beta [01]\.\d\d$",
             r"distill: step \d+", r"^amalgamate smoke: done in"]


# What `ray job submit` itself prints around the job's output (its CLI's and SDK's log lines).
SUBMIT_CLI = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|SUCC|WARNING) "
                        r"(cli|sdk|packaging|dashboard_sdk|job_manager)\.py:\d+ -- ")


@pytest.fixture(scope="module")
def smoke_run(submitted_smoke):
    """The smoke preset as the session submitted it with ``ray job submit`` (tests/orchestration/conftest.py):
    its output directory, its summary and the job's console (what ``ray job submit`` printed, less the
    submission CLI's own log lines)."""
    assert submitted_smoke.status == 0, submitted_smoke.console[-6000:]
    console = "\n".join(x for x in submitted_smoke.console.splitlines() if not SUBMIT_CLI.match(x))
    return submitted_smoke.out, submitted_smoke.summary, console


@pytest.fixture(scope="module")
def random_words_resumed(smoke_config, smoke_overrides, tmp_path_factory, ray_local_address):
    """The smoke preset with random whole words of each teacher's vocabulary as the transfer set, run
    three times as a user would: ``jobs/amalgamate.py`` (joining the test's Ray) stopped with SIGINT
    (Ctrl-C) at its first training step, run again and SIGKILLed once training is past its first
    checkpoint, then run to the end in this process. Returns its config (``cfg``; ``config(*overrides)``
    makes it with more overrides), what the first run did (``interrupted``: exit status, seconds from
    SIGINT to exit, console after SIGINT, whether the transfer set was complete and distillation
    unfinished after it), the metrics log (``rows``) and the summary of the last run."""
    from dfkd_ray.orchestration.amalgamate import run_amalgamate
    from dfkd_ray.transfer.store import read_manifest

    out = tmp_path_factory.mktemp("random_words")
    # a third of the preset's epochs, with checkpoints and reports to match: random words stay at
    # chance however long they train (benchmarks/smoke_sources.py), and stopping and resuming is what
    # is tested
    more = ("transfer.source=random_words", "train.epochs=4", "train.checkpoint_every_steps=8",
            "train.report_every_steps=4")
    command = [sys.executable, str(ROOT / "jobs" / "amalgamate.py"), "--config", str(SMOKE),
               *smoke_overrides(out, *more), f"ray.address={ray_local_address}"]
    cfg = smoke_config(out, *more)
    log = out / "distill" / "metrics.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}

    # 1. Ctrl-C at the first training step
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:  # ends when the job does; a hung job fails at the suite's timeout
            seen.append(line)
            if "distill: step" in line:
                break
        assert seen and "distill: step" in seen[-1], "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        sent = time.time()
        after_sigint, _ = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    interrupted = {"returncode": proc.returncode, "seconds": took, "console": after_sigint,
                   "set_complete": read_manifest(out / "transfer_set")["complete"],
                   "distill_finished": (out / "distill" / "stage.json").exists()}

    # 2. SIGKILL once a step after the first checkpoint is logged: that checkpoint is stored
    def logged_steps() -> list[int]:
        return [json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
    past_checkpoint = cfg.train.checkpoint_every_steps + cfg.train.report_every_steps
    deadline = time.time() + 480  # a hung job fails here rather than at the suite's timeout
    while time.time() < deadline and proc.poll() is None and max(logged_steps(), default=0) < past_checkpoint:
        time.sleep(0.05)
    assert proc.poll() is None, f"the second run ended by itself with status {proc.returncode}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "distill" / "stage.json").exists()

    # 3. to the end
    summary = run_amalgamate(cfg, progress=False)
    return SimpleNamespace(cfg=cfg, config=lambda *extra: smoke_config(out, *more, *extra), interrupted=interrupted,
                           rows=[json.loads(x) for x in log.read_text().splitlines()], summary=summary)


def test_smoke_preset_end_to_end(smoke_run):
    """Steered generation -> RMD -> ST-amalg on 2 workers shows amalgamation: the exported student is
    clearly above the teachers' ensemble (at least +0.15 accuracy) with every class's recall at least
    0.5, and loads in a transformers pipeline with the union labels."""
    from transformers import pipeline

    out, summary, _ = smoke_run
    student, ensemble = summary["eval"]["student"], summary["eval"]["ensemble"]
    assert student["accuracy"] >= ensemble["accuracy"] + 0.15, summary["eval"]
    recalls = {name: c["recall"] for name, c in student["per_class"].items()}
    assert min(recalls.values()) >= 0.5, recalls
    for key in ("transfer_set", "confidence", "metrics", "loss_curves", "student", "eval"):
        assert Path(summary["outputs"][key]).exists(), key
    metrics = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == summary["steps"] and metrics[0]["step"] < metrics[-1]["step"]
    assert (out / "eval" / "confusion_student.png").stat().st_size > 5_000

    clf = pipeline("text-classification", model=str(out / "student"), tokenizer=str(out / "student"))
    names = {"sports", "cooking", "space", "finance"}
    assert {p["label"] for p in clf(["the striker scored a goal", "the rocket reached orbit"])} <= names


def test_smoke_console_is_the_jobs_own(smoke_run, ray_internal_lines):
    """The console of the submitted smoke job holds its own progress and results, not Ray's or
    transformers' internals (Ray's logs keep those). Each worker line is there once (Ray Train 2.60's
    print patch logged and printed it: every line twice), and the placement-group cleaner says nothing.
    (A job on its own local Ray, with no dashboard, is checked the same way on the sweep's console,
    tests/orchestration/test_tune.py.)"""
    console = smoke_run[2]
    assert not ray_internal_lines(console), "\n".join(ray_internal_lines(console))
    for line in JOB_LINES:
        assert re.search(line, console, re.M), (line, console[-3000:])
    steps = re.findall(r"distill: step \d+/\d+ epoch [\d.]+", console)
    assert len(steps) == len(set(steps)) > 3, steps
    assert "Failed to query Ray Train Controller" not in console and "PlacementGroupCleaner" not in console


def test_rerun_skips_stages_and_changed_config_is_refused(random_words_resumed, capsys):
    """Rerunning a finished job redoes no stage; a changed warning threshold only reports; a changed
    training field is refused and leaves the finished student alone."""
    from dfkd_ray.orchestration.amalgamate import run_amalgamate

    run = random_words_resumed
    out = run.cfg.output.dir
    student = out / "student" / "model.safetensors"
    before = student.stat().st_mtime_ns
    again = run_amalgamate(run.cfg, progress=False)
    assert student.stat().st_mtime_ns == before
    assert again["eval"]["student"] == run.summary["eval"]["student"]
    capsys.readouterr()
    strict = run.config("amalgamation.separation_warning=0.999")  # a threshold only reports
    run_amalgamate(strict, progress=False)
    assert student.stat().st_mtime_ns == before
    assert "confidence separation" in (printed := capsys.readouterr().out) and "warning: teacher" in printed, printed
    with pytest.raises(StageMismatch, match=r"train\.epochs: 4(\.0)? -> 3"):
        run_amalgamate(run.config("train.epochs=3"), progress=False)
    assert student.stat().st_mtime_ns == before  # the finished student was not touched


def test_training_resumes_from_checkpoint_after_killing_the_job(random_words_resumed):
    """SIGKILL `jobs/amalgamate.py` once a checkpoint exists; the rerun continues from it, not step 0,
    logs no step twice and finishes the plan."""
    cfg, rows, summary = random_words_resumed.cfg, random_words_resumed.rows, random_words_resumed.summary
    resumed = [r for r in rows if r["resumed_from"] > 0]
    assert resumed, "the rerun started from step 0"
    assert resumed[0]["resumed_from"] >= cfg.train.checkpoint_every_steps
    assert resumed[0]["step"] > resumed[0]["resumed_from"]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no step logged twice
    assert rows[-1]["step"] == summary["steps"]
    assert Path(summary["outputs"]["student"], "config.json").is_file()


def test_steered_student_clearly_beats_random_words(smoke_run, random_words_resumed):
    """StrataNet Table 3: random words are a weak transfer set. The fixture vocabularies are mostly
    general words, as a real teacher's is, so a random-words text is mostly non-topical and the same
    job on it scores chance: in process (benchmarks/smoke_sources.py), with the same steps, 0.250 for
    random_words over seeds 0-2 with stratanet and vanilla. The random-words job is the one killed and
    resumed above, with a third of the epochs."""
    steered = smoke_run[1]["eval"]["student"]["accuracy"]
    random_words = random_words_resumed.summary["eval"]["student"]["accuracy"]
    assert steered - random_words >= 0.15, (steered, random_words)



def test_ctrl_c_stops_the_job_within_seconds_and_keeps_finished_stages(random_words_resumed):
    """SIGINT (Ctrl-C) to ``jobs/amalgamate.py`` during training: the job exits 130 within seconds,
    says that finished stages are kept, and its finished transfer set stays complete for the rerun
    (which the fixture then kills and resumes to the end). (In the main thread Ray Train's own SIGINT
    handler exited with status 1 and said nothing.)"""
    interrupted = random_words_resumed.interrupted
    rest = interrupted["console"]
    assert interrupted["returncode"] == 130, rest[-3000:]
    assert interrupted["seconds"] < 30, interrupted["seconds"]
    assert "interrupted; finished stages are kept" in rest, rest[-3000:]
    assert interrupted["set_complete"] and not interrupted["distill_finished"]
