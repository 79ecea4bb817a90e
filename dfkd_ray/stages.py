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

from dfkd_ray.transfer.store import _diff

STAGE_FILE = "stage.json"


class StageMismatch(ValueError):
    """A stage directory holds results made with a different configuration."""


def fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    changes = _diff(record.get("description", {}), json.loads(json.dumps(description, default=str)))
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
