"""One job at a time per output.dir: a lock file names the holder's host and pid; a lock whose
process has died on this host is taken over; the lock goes when the job's process ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.preflight import LOCK_FILE, claim_output_dir

_CLAIM = """
import json, sys
from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.preflight import claim_output_dir
try:
    claim_output_dir(validate_config(json.loads(sys.argv[1])))
except ConfigError as e:
    print(e)
    sys.exit(2)
print("claimed")
"""


def _claim_elsewhere(job_dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLAIM, json.dumps(job_dict)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)


def test_second_job_on_the_same_output_dir_is_refused(job_dict):
    cfg = validate_config(job_dict)
    claim_output_dir(cfg)
    claim_output_dir(cfg)  # the same process claims again (one stage after another): fine
    lock = json.loads((cfg.output.dir / LOCK_FILE).read_text())
    assert (lock["host"], lock["pid"]) == (socket.gethostname(), os.getpid())
    other = _claim_elsewhere(job_dict)
    assert other.returncode == 2, other.stdout + other.stderr
    assert f"{socket.gethostname()} pid {os.getpid()}" in other.stdout and "output.dir" in other.stdout


def test_lock_of_a_dead_process_is_taken_over_and_released_at_exit(job_dict, capsys):
    cfg = validate_config(job_dict)
    out = cfg.output.dir
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": 0}))
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        claim_output_dir(cfg)
    holder.stdin.close()
    holder.wait()
    done = _claim_elsewhere(job_dict)  # takes the stale lock over, and releases it when it exits
    assert done.returncode == 0 and "claimed" in done.stdout, done.stdout + done.stderr
    assert f"pid {holder.pid}" in done.stdout and "taken over" in done.stdout
    assert not (out / LOCK_FILE).exists()


def test_lock_held_on_another_host_is_refused(job_dict):
    cfg = validate_config(job_dict)
    cfg.output.dir.mkdir(parents=True)
    (cfg.output.dir / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "started": 0}))
    with pytest.raises(ConfigError, match=r"node-7 pid 4242.*delete .*" + LOCK_FILE):
        claim_output_dir(cfg)
