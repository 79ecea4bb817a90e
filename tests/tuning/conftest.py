"""A sweep's config without files: validation of the tune section, trial configs and results need
no model directory."""

from __future__ import annotations

import copy

import pytest

from dfkd_ray.config import validate_config

SWEEP = {
    "name": "sweep",
    "teachers": [{"name": "alpha", "path": "/models/alpha", "labels": ["sports", "cooking"]},
                 {"name": "beta", "path": "/models/beta", "labels": ["space", "finance"]}],
    "transfer": {"source": "steered", "samples_per_class": 8, "steered": {"lm_path": "/models/lm"}},
    "student": {"path": "/models/student"},
    "eval": {"path": "/data/eval.csv"},
    "ray": {"num_train_workers": 1, "num_generation_actors": 1},
    "tune": {"search_space": {"transfer.steered.control_strength": {"values": [0.0, 8.0]},
                              "amalgamation.kd_confidence_power": {"low": 1, "high": 100, "log": True}},
             "max_concurrent_trials": 2},
    "output": {"dir": "/runs/sweep"},
}


@pytest.fixture
def sweep_dict() -> dict:
    """A valid sweep config as a plain dict (no file is read when it validates); tests edit it."""
    return copy.deepcopy(SWEEP)


@pytest.fixture
def sweep_config(sweep_dict):
    return validate_config(sweep_dict)
