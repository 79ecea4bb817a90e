"""``ray job submit`` to a local Ray head, as the README's "A local Ray cluster" section does it (the
session's submission: tests/orchestration/conftest.py): the smoke job, submitted with the repository as
its working directory, exits 0, prints its result line, writes its results to the absolute
``output.dir`` it was given and finds its demo task under ``DFKD_RAY_HOME``; a config problem makes the
submission exit non-zero with the field named. What the job itself makes is tested on the same run in
tests/orchestration/test_amalgamate.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_misspelt_key_is_refused_before_ray(submitted_smoke):
    log = submitted_smoke.refused_console
    assert submitted_smoke.refused_status != 0 and "transfer.smaples_per_class: unknown key" in log, log[-6000:]
    assert not submitted_smoke.refused_left_output  # refused before anything was written


def test_smoke_job_submitted_to_a_local_head_writes_where_it_was_told(submitted_smoke):
    home, out, log = submitted_smoke.home, submitted_smoke.out, submitted_smoke.console
    assert submitted_smoke.status == 0, log[-6000:]
    assert f"relative paths in the config are under {home}" in log
    assert "student accuracy" in log and f"student -> {out / 'student'}" in log, log[-6000:]
    outputs = submitted_smoke.summary["outputs"]
    assert all(Path(path).is_relative_to(out) for path in outputs.values() if path), outputs
    for made in ("transfer_set/manifest.json", "confidence/index.json", "student/config.json", "eval/eval.json"):
        assert (out / made).is_file(), made
    assert not (home / "runs").exists()  # an absolute output.dir is used as given
