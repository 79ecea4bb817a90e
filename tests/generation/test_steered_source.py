"""The 'steered' transfer source (StrataNet section 4.2) and its config section, on the fixture LM and teachers."""

from __future__ import annotations

import copy
import json

import pytest


def test_config_rejects_bad_steered_settings(job_dict, synthetic_task):
    """The engines take ``SteeredConfig`` as validated: bad settings are refused where the config loads."""
    from dfkd_ray.config import ConfigError, validate_config

    def with_steered(**steered):
        d = copy.deepcopy(job_dict)
        d["transfer"] = {"source": "steered", "steered": {"lm_path": str(synthetic_task.lm), **steered}}
        return d

    validate_config(with_steered())
    for steered, message in [({"top_k": 60, "top_m": 50}, "top_k"), ({"control_strength": -1}, "control_strength"),
                             ({"token_map": "fast"}, "token_map"), ({"sdpa": "cudnn"}, "sdpa"),
                             ({"decode_parts": 0}, "decode_parts"), ({"teacher_batching": "packed"}, "teacher_batching"),
                             ({"lambda_schedule": "linear"}, "lambda_schedule"), ({"decay_rate": 0.0}, "decay_rate"),
                             ({"dtype": "int8"}, "dtype"), ({"candidate_mass": 0.0}, "candidate_mass"),
                             ({"candidate_mass": 1.5}, "candidate_mass")]:  # engine vllm: tests/generation/test_vllm.py
        with pytest.raises(ConfigError, match=message):
            validate_config(with_steered(**steered))


def test_kernel_and_schedule_settings_leave_the_transfer_set_fingerprint_alone(job_dict, synthetic_task):
    """A kernel choice or a GPU schedule, like the device, does not decide content: a set made before the field
    existed (or with the other value) resumes instead of being refused."""
    from dfkd_ray.config import validate_config
    from dfkd_ray.transfer.writer import plan_transfer_set

    def fingerprint(**steered):
        d = copy.deepcopy(job_dict)
        d["transfer"] = {"source": "steered", "steered": {"lm_path": str(synthetic_task.lm), **steered}}
        return plan_transfer_set(validate_config(d))[2]

    base = fingerprint()
    assert "sdpa" not in base["transfer"]["steered"] and "decode_parts" not in base["transfer"]["steered"]
    assert fingerprint(sdpa="any") == base
    assert fingerprint(decode_parts=4) == base
    assert fingerprint(top_m=60) != base  # content settings still count
    # candidate_mass: its default is how every set was steered before the field existed; another value counts
    assert "candidate_mass" not in base["transfer"]["steered"] and fingerprint(candidate_mass=1.0) == base
    assert fingerprint(candidate_mass=0.95)["transfer"]["steered"]["candidate_mass"] == 0.95


def test_steered_source_writes_a_transfer_set(job_dict, synthetic_task, tmp_path):
    from dfkd_ray.config import validate_config
    from dfkd_ray.transfer.store import read_transfer_table
    from dfkd_ray.transfer.writer import write_transfer_set

    d = copy.deepcopy(job_dict)
    d["transfer"] = {"source": "steered", "samples_per_class": 2, "shard_size": 4,
                     "steered": {"lm_path": str(synthetic_task.lm), "top_m": 12, "top_k": 6, "max_new_tokens": 10,
                                 "min_new_tokens": 3, "prompt": "Category: {label}", "batch_size": 4}}
    cfg = validate_config(d)
    out = write_transfer_set(cfg, tmp_path / "set", progress=False)
    table = read_transfer_table(out)
    assert table.num_rows == 8
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {"steered"}
    assert {(r["teacher"], r["teacher_class"]) for r in rows} == {("alpha", 0), ("alpha", 1), ("beta", 0), ("beta", 1)}
    for r in rows:
        params = json.loads(r["source_params"])
        assert params["control_strength"] == 8.0 and params["top_m"] == 12 and 3 <= params["lm_tokens"] <= 10
        assert params["prompt"].startswith("Category: ") and not r["text"].startswith("Category")
        assert 0.0 <= r["confidence"] <= 1.0
