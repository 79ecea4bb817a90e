"""Stage records: a finished stage with the same description is skipped, a changed one is refused."""

from __future__ import annotations

import pytest

from dfkd_ray.stages import StageMismatch, mark_done, stage_done


def test_stage_records_skip_same_and_refuse_changed(tmp_path):
    desc = {"train": {"epochs": 3}, "seed": 0}
    assert not stage_done(tmp_path, desc, stage="distill")
    mark_done(tmp_path, desc, steps=10)
    assert stage_done(tmp_path, desc, stage="distill")
    with pytest.raises(StageMismatch, match=r"train\.epochs: 3 -> 4"):
        stage_done(tmp_path, {"train": {"epochs": 4}, "seed": 0}, stage="distill")
