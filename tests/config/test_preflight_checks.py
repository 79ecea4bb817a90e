"""Preflight checks that keep a job from failing later inside Ray: a teacher that needs its own
modelling code, and a resource plan the machine cannot hold."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.preflight import preflight, resource_plan_problems


def test_teacher_needing_remote_code_names_trust_remote_code(job_dict, synthetic_task, tmp_path):
    """A config.json with ``auto_map`` loads only with the directory's own code: transformers refused it
    inside every generator actor, and the user saw Ray's actor deaths instead of the field to change."""
    remote = tmp_path / "remote_teacher"
    shutil.copytree(synthetic_task.teachers["alpha"], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (remote / "config.json").write_text(json.dumps(config))
    d = copy.deepcopy(job_dict)
    d["teachers"][0]["path"] = str(remote)
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    problems = dict(err.value.problems)
    assert list(problems) == ["teachers[0].trust_remote_code"], problems
    assert "auto_map" in problems["teachers[0].trust_remote_code"]
    d["teachers"][0]["trust_remote_code"] = True
    assert preflight(validate_config(d)).teachers[0].labels


def test_a_one_class_teacher_is_named_before_any_work(job_dict, synthetic_task, tmp_path, capsys):
    """A teacher of one class has a constant softmax: the preflight says what it cannot do, once, and
    says nothing for teachers of two or more classes."""
    single = tmp_path / "one_class_teacher"
    shutil.copytree(synthetic_task.teachers["alpha"], single)
    config = json.loads((single / "config.json").read_text())
    config.update(id2label={"0": "sports"}, label2id={"sports": 0}, num_labels=1)
    (single / "config.json").write_text(json.dumps(config))
    preflight(validate_config(job_dict))
    assert "one class" not in capsys.readouterr().out
    d = copy.deepcopy(job_dict)
    d["teachers"][0]["path"] = str(single)
    del d["eval"]  # its cooking rows are no union label now
    assert preflight(validate_config(d)).teachers[0].labels == ["sports"]
    notes = [line for line in capsys.readouterr().out.splitlines() if "one class" in line]
    assert len(notes) == 1 and notes[0].startswith("note: teacher 'alpha' has one class ('sports')")
    assert "train.corpus_share" in notes[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_plan_the_machine_cannot_hold_is_refused_with_numbers(job_dict, stream):
    """64 train workers on 2 cores started 64 processes and made no step."""
    d = copy.deepcopy(job_dict)
    d["ray"] = {"num_train_workers": 64, "num_generation_actors": 2}
    d["train"] = {"stream_from_generation": stream}
    problems = dict(resource_plan_problems(validate_config(d), {"CPU": 2, "GPU": 0}))
    assert list(problems) == ["ray.num_train_workers"], problems
    message = problems["ray.num_train_workers"]
    assert "64 train workers x 1 CPU" in message and "2 CPUs" in message
    assert ("2 generation actors x 1 CPU" in message) == stream  # both at once only when streaming


def test_gpus_the_machine_lacks_are_refused(job_dict):
    d = copy.deepcopy(job_dict)
    d["ray"] = {"num_train_workers": 2, "use_gpu": True, "num_generation_actors": 2, "gpus_per_generation_actor": 1}
    problems = dict(resource_plan_problems(validate_config(d), {"CPU": 16, "GPU": 1}))
    assert set(problems) == {"ray.num_train_workers", "ray.gpus_per_generation_actor"}, problems
    assert "2 train workers x 1 GPU" in problems["ray.num_train_workers"]
    assert "this machine has 1 GPU" in problems["ray.num_train_workers"]
    assert not resource_plan_problems(validate_config(d), {"CPU": 16, "GPU": 2})


def test_the_preflight_checks_the_plan_on_this_machine_unless_joining_a_cluster(job_dict, monkeypatch):
    d = copy.deepcopy(job_dict)
    d["ray"] = {"num_train_workers": 4096}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    assert "ray.num_train_workers" in dict(err.value.problems)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # an autoscaling cluster may grow: checked there
    preflight(validate_config(d))


def test_a_local_plan_may_book_each_core_twice(job_dict, monkeypatch):
    """The smoke preset streams with 2 train workers and 2 generator actors on a 2-core laptop."""
    d = copy.deepcopy(job_dict)
    d["ray"] = {"num_train_workers": 2, "num_generation_actors": 2}
    d["train"] = {"stream_from_generation": True}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert preflight(validate_config(d)).ray.num_train_workers == 2
    d["ray"]["num_train_workers"] = 3
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    message = dict(err.value.problems)["ray.num_train_workers"]
    assert "= 5 CPUs" in message and "2 cores, each booked for at most 2 processes" in message, message


@pytest.mark.parametrize("source", ["steered", "random_words"])
def test_too_few_held_out_requests_are_refused_before_generation(job_dict, synthetic_task, source):
    """16 requests a class leave teacher beta 5 held-out requests: the job generated its transfer set and
    only then failed in the confidence stage. The held-out requests are known beforehand, whatever the
    source; a vanilla job needs none."""
    d = copy.deepcopy(job_dict)
    d["transfer"] = {**d.get("transfer", {}), "source": source, "samples_per_class": 16, "heldout_fraction": 0.2,
                     "steered": {"lm_path": str(synthetic_task.lm)}}
    d["amalgamation"] = {**d.get("amalgamation", {}), "method": "stratanet", "calibration_folds": 5}
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    message = dict(err.value.problems)["transfer.heldout_fraction"]
    assert "'beta': 5" in message and "need >= 8" in message and "transfer.samples_per_class" in message
    d["amalgamation"]["method"] = "vanilla"
    preflight(validate_config(d))
    d["amalgamation"]["method"] = "stratanet"
    d["transfer"]["samples_per_class"] = 32
    preflight(validate_config(d))


def test_compiling_without_a_compiler_is_refused_before_ray_starts(job_dict, monkeypatch):
    """torch.compile builds C code (C++ kernels on a CPU, Triton's launchers on a GPU): without a
    compiler the preflight names ``train.compile`` and the fix; joining a cluster, torch checks there."""
    from dfkd_ray.preflight import compile_problem

    d = copy.deepcopy(job_dict)
    d["train"] = {"compile": "default"}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    message = dict(err.value.problems)["train.compile"]
    assert "needs a C compiler" in message and "set train.compile=none" in message, message
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("gcc", "g++") else None)
    assert compile_problem("default", use_gpu=False) == ""
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert "needs a C++ compiler" in compile_problem("default", use_gpu=False)  # a CPU compiles C++ kernels
    assert compile_problem("default", use_gpu=True) == ""
    monkeypatch.setenv("CC", "/opt/missing-cc")
    assert "$CC (/opt/missing-cc) is not on PATH" in compile_problem("default", use_gpu=True)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    preflight(validate_config(d))
