"""The tune section's checks and a sweep's trials as job configs (no Ray, no files)."""

from __future__ import annotations

import pytest

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.tuning.space import (concurrency_problems, generation_fingerprint, most_epochs, search_space_problems,
                                   searches_generation, trial_config, trial_resources)


def problems_of(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    return dict(err.value.problems)


@pytest.mark.parametrize("tune,field,words", [
    ({"search_space": {"train.lr": {"values": [1e-5]}}}, "tune.search_space.train.lr", "is not a config field"),
    ({"search_space": {"amalgamation.confidence": {"low": 0, "high": 1}}},
     "tune.search_space.amalgamation.confidence", "a range (low/high) needs a numeric field"),
    ({"search_space": {"transfer.steered.prompt": {"low": 0, "high": 1}}},
     "tune.search_space.transfer.steered.prompt", "is str; list the choices"),
    ({"search_space": {"output.dir": {"values": ["/a", "/b"]}}}, "tune.search_space.output.dir",
     "the 'output' section is where the sweep writes"),
    ({"search_space": {"transfer.steered": {"values": [1]}}}, "tune.search_space.transfer.steered", "is a section"),
    ({"metric": "accuracy"}, "tune.metric", "no trial reports metric 'accuracy'"),
    ({"metric": "eval_accuracy"}, "tune.metric", "does not choose it"),
    ({"metric": "dev_accuracy"}, "tune.metric", "set tune.dev.path"),
    ({"dev": {"path": "/data/eval.csv"}}, "tune.dev.path", "must not choose it"),
])
def test_bad_tune_section_names_the_field(sweep_dict, tune, field, words):
    sweep_dict["tune"] = {**sweep_dict["tune"], **tune} if "search_space" not in tune else tune
    problems = problems_of(sweep_dict)
    assert field in problems, problems
    assert words in problems[field], problems[field]


def test_without_labels_trials_are_ranked_by_the_soft_proxy(sweep_dict):
    assert validate_config(sweep_dict).tune.ranked_by() == "proxy_soft"
    sweep_dict["tune"]["metric"] = "proxy"  # the argmax form stays available
    assert validate_config(sweep_dict).tune.ranked_by() == "proxy"


@pytest.mark.parametrize("metric", [None, "proxy"])
def test_proxy_needs_a_language_model(sweep_dict, metric):
    sweep_dict["transfer"] = {"source": "random_words"}
    sweep_dict["tune"]["metric"] = metric
    assert "transfer.steered.lm_path" in problems_of(sweep_dict)["tune.metric"]
    sweep_dict["tune"]["metric"] = None
    sweep_dict["tune"]["dev"] = {"path": "/data/dev.csv"}  # ranked by dev_accuracy: no probe set needed
    assert validate_config(sweep_dict).tune.ranked_by() == "dev_accuracy"


def test_values_are_checked_against_their_field(sweep_dict):
    sweep_dict["tune"]["search_space"] = {"transfer.steered.control_strength": {"values": [8.0, "strong"]},
                                          "train.epochs": {"low": 1, "high": 20},  # warmup_epochs is 2
                                          "train.learning_rate": {"low": 1e-5, "high": 5, "log": True},
                                          "transfer.steered.top_k": {"values": [10, 80]},  # top_m is 50
                                          "student.num_layers": {"low": 1.5, "high": 3}}
    problems = dict(search_space_problems(validate_config(sweep_dict)))
    assert "value 'strong'" in problems["tune.search_space.transfer.steered.control_strength"]
    assert "value 1.0: warmup_epochs (2.0) must be <= epochs" in problems["tune.search_space.train.epochs"]
    assert "value 5.0" in problems["tune.search_space.train.learning_rate"]
    assert "top_k (80) must be <= top_m" in problems["tune.search_space.transfer.steered.top_k"]
    assert "give whole numbers" in problems["tune.search_space.student.num_layers"]


def test_more_concurrent_trials_than_the_machine_holds(sweep_config):
    assert trial_resources(sweep_config) == {"CPU": pytest.approx(1.01), "GPU": 0.0}
    assert concurrency_problems(sweep_config, {"CPU": 4.0}, "this machine") == []
    cfg = sweep_config.model_copy(update={"tune": sweep_config.tune.model_copy(update={"max_concurrent_trials": 8})})
    [(field, message)] = concurrency_problems(cfg, {"CPU": 4.0}, "this machine")
    assert field == "tune.max_concurrent_trials"
    assert "8 trials at once need 8.08 CPU" in message and "<= 3" in message


def test_trial_config_and_shared_transfer_sets(sweep_config, tmp_path):
    a = trial_config(sweep_config, {"transfer.steered.control_strength": 8.0, "amalgamation.kd_confidence_power": 3.0},
                     tmp_path / "a")
    b = trial_config(sweep_config, {"transfer.steered.control_strength": 8.0, "amalgamation.kd_confidence_power": 50.0},
                     tmp_path / "b")
    c = trial_config(sweep_config, {"transfer.steered.control_strength": 0.0, "amalgamation.kd_confidence_power": 3.0},
                     tmp_path / "c")
    assert a.amalgamation.kd_confidence_power == 3.0 and a.output.dir == tmp_path / "a" and not a.tune.search_space
    assert generation_fingerprint(a) == generation_fingerprint(b) != generation_fingerprint(c)
    assert searches_generation(sweep_config)
    assert most_epochs(sweep_config) == sweep_config.train.epochs
    with pytest.raises(ConfigError) as err:
        trial_config(sweep_config, {"transfer.steered.top_k": 99}, tmp_path / "d")
    assert "tune.search_space.transfer.steered.top_k" in dict(err.value.problems)


def test_preflight_reports_the_sweeps_problems_together(sweep_dict, monkeypatch):
    """What the preflight adds for a sweep: a value the field refuses, a missing development file and
    more concurrent trials than this machine holds, each at its field."""
    from dfkd_ray import preflight

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(preflight.os, "cpu_count", lambda: 2)
    sweep_dict["tune"]["search_space"]["train.batch_size"] = {"values": [8, 0]}
    sweep_dict["tune"].update(dev={"path": "/nonexistent/dev.csv"}, max_concurrent_trials=16)
    problems = dict(preflight.tune_problems(validate_config(sweep_dict), None))
    assert "value 0" in problems["tune.search_space.train.batch_size"]
    assert "development file" in problems["tune.dev.path"] and "does not exist" in problems["tune.dev.path"]
    assert "this machine (2 cores" in problems["tune.max_concurrent_trials"]
    sweep_dict["tune"]["search_space"] = {}
    assert preflight.tune_problems(validate_config(sweep_dict), None) == []  # not a sweep: nothing to check
