"""The Ray runtime of a job: how an error raised inside Ray reaches the user. (What the console of a job
on its own local Ray shows is tested on the smoke job, tests/orchestration/test_amalgamate.py.)"""

from __future__ import annotations

import pytest


def _config_error():
    from dfkd_ray.config import ConfigError

    return ConfigError([("teachers[0].trust_remote_code", "the model needs its own code")])


def test_a_config_error_survives_the_trip_from_a_ray_worker():
    """Ray pickles a task's exception to the driver; ConfigError's constructor made that fail and the
    driver got an UnserializableException without the field to change."""
    import pickle

    back = pickle.loads(pickle.dumps(_config_error()))
    assert back.problems == [("teachers[0].trust_remote_code", "the model needs its own code")]
    assert str(back) == str(_config_error())


@pytest.mark.parametrize("wrap", ["task", "data"])
def test_an_error_raised_in_a_ray_worker_is_reported_once_as_its_root_cause(wrap, job_dict, monkeypatch, capsys):
    """``run_job`` unwraps Ray's errors (a task's RayTaskError; Ray Data's UserCodeException around the
    callable's error) and prints the root cause once, with the field; a user error exits 2."""
    from ray.exceptions import RayTaskError, UserCodeException

    from dfkd_ray.config import validate_config
    from dfkd_ray.orchestration import runtime

    def run(cfg):
        cause = _config_error()
        if wrap == "data":
            try:
                raise UserCodeException("UDF failed to process a data block.") from cause
            except UserCodeException as e:
                cause = e
        raise RayTaskError("MapWorker.submit", "Traceback (most recent call last): ...", cause)

    monkeypatch.setattr(runtime, "start_ray", lambda cfg: None)
    assert runtime.run_job(validate_config(job_dict), run) == 2
    err = capsys.readouterr().err
    assert err.count("teachers[0].trust_remote_code") == 1, err
    assert err.startswith("error: ") and "Traceback" not in err and "UDF failed" not in err


def test_another_error_in_a_ray_worker_exits_1_with_its_message(job_dict, monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    from dfkd_ray.config import validate_config
    from dfkd_ray.orchestration import runtime

    def run(cfg):
        raise RayTaskError("_evaluate_task", "Traceback ...", OSError("disk full"))

    monkeypatch.setattr(runtime, "start_ray", lambda cfg: None)
    assert runtime.run_job(validate_config(job_dict), run) == 1
    err = capsys.readouterr().err
    assert err.count("disk full") == 1 and "Traceback" not in err, err


def test_a_generation_actor_whose_engine_cannot_be_built_fails_its_first_batch_not_its_constructor(monkeypatch):
    """An exception in an actor's ``__init__`` kills the actor, Ray Data restarts it without end and every
    death prints its traceback; raised from the first batch, the dataset stops once with that error."""
    from dfkd_ray.config import ConfigError
    from dfkd_ray.orchestration import generate

    def fail(cfg, part="all"):
        raise _config_error()

    monkeypatch.setattr(generate, "_build_source", fail)
    actor = generate.GenerationActor(cfg=None, directory="unused")
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.trust_remote_code"):
        actor({"shard": [0]})


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379"])
def test_every_process_of_the_job_gets_the_report_poll_interval(job_dict, monkeypatch, address):
    """Ray Train's controller collects worker reports at its health-check interval, and a worker's report
    waits for the previous one to be collected: the job's runtime environment (a local Ray of its own,
    or a cluster it joins) sets that interval from ``ray.report_poll_interval_s`` for every process.
    A job that joins a cluster by its address also gives that address to every process (Ray Train's
    placement-group cleaner would otherwise look for the State API of any Ray on the machine)."""
    import ray

    from dfkd_ray.config import validate_config
    from dfkd_ray.orchestration import runtime

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(runtime, "_spend_the_drivers_actor_restart_note", lambda: None)
    monkeypatch.setattr(runtime, "quiet_console", lambda: None)  # this process's logging stays as it is
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job_dict["ray"] = {"report_poll_interval_s": 0.5, "address": address}
    runtime.start_ray(validate_config(job_dict))
    (init,) = calls
    assert init["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert init["runtime_env"]["worker_process_setup_hook"].endswith("quiet_console")
    assert init["address"] == (address or "local")
    assert init["runtime_env"]["env_vars"].get("RAY_ADDRESS") == (address if address not in (None, "auto") else None)


def test_the_setup_hook_imports_neither_ray_data_nor_transformers_and_ray_data_stays_quiet():
    """``quiet_console`` runs in every process of a job, most of which never use Ray Data or transformers:
    it imports neither (Ray Data alone took 0.8 s a process), and a process that imports Ray Data later
    still keeps its INFO lines off the console (its console handler at WARNING, its log file at every
    level)."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, logging, sys
from dfkd_ray.orchestration.runtime import quiet_console
quiet_console()
imported = {m: m in sys.modules for m in ("ray.data", "transformers")}
import ray.data
from ray.data._internal.logging import SessionFileHandler
levels = {("file" if isinstance(h, SessionFileHandler) else "console"): h.level for h in logging.getLogger("ray.data").handlers}
print(json.dumps({"imported": imported, "levels": levels}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOGGING_CONFIG"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=env).stdout.splitlines()[-1])
    assert out["imported"] == {"ray.data": False, "transformers": False}, out
    assert out["levels"] == {"console": 30, "file": 0}, out
