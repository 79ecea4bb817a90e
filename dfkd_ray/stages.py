"""Stage records: each stage of a job writes ``stage.json`` next to its output when it finishes.

The record holds the description of everything that decides the stage's output (a config slice
plus the fingerprints of the stages it read) and its hash. A rerun with the same description skips
the stage; a different description is refused with the changed fields listed, so a changed config
never mixes with old results and a finished result is never overwritten. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STAGE_FILE = "stage.json"


class StageMismatch(ValueError):
    """A stage directory holds results made with a different configuration."""


def fingerprint(description: dict) -> str:
    """The 16-hex-digit hash of a stage description (the key of every stage record and transfer set)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_descriptions(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key.path: old -> new`` for every field where two descriptions differ."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_descriptions(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def stage_done(directory: str | Path, description: dict, *, stage: str) -> bool:
    """True when ``directory`` holds this stage's finished output for ``description``.

    Raises :class:`StageMismatch` (naming the changed fields) when it holds another configuration's.
    """
    path = Path(directory) / STAGE_FILE
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if record.get("fingerprint") == fingerprint(description):
        return True
    changes = diff_descriptions(record.get("description", {}), json.loads(json.dumps(description, default=str)))
    raise StageMismatch(f"{stage}: {directory} holds results made with a different configuration (changed: "
                        f"{'; '.join(changes[:8]) or 'unknown'}). They were not touched: choose another output.dir, "
                        f"or delete {directory} to redo this stage and those after it")


def mark_done(directory: str | Path, description: dict, **summary) -> Path:
    """Write the stage record (atomically) once the stage's output is complete."""
    path = Path(directory) / STAGE_FILE
    tmp = path.with_name(f".{STAGE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint(description), "description": description, **summary},
                              indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_record(directory: str | Path) -> dict:
    return json.loads((Path(directory) / STAGE_FILE).read_text())
