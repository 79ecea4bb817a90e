"""The Ray runtime of a job: what the console of a job on a local Ray shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]

_CONSOLE_JOB = """
import sys, time
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from dfkd_ray.config import load_config
from dfkd_ray.orchestration.runtime import start_ray, worker_print

def loop():
    worker_print("distill: one line from the worker")
    time.sleep(4)  # the placement-group cleaner polls every second meanwhile

start_ray(load_config(sys.argv[1]))
TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1)).fit()
time.sleep(1.5)  # the log monitor's last lines
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_job_console_shows_each_worker_line_once_and_no_cleaner_warnings(job_dict, tmp_path):
    """What a laptop user sees from a job's local Ray (:func:`start_ray` without an address): Ray Train
    2.60 printed each worker line twice (its print patch logs and prints), and its placement-group
    cleaner warned once a second that the State API (no dashboard) was unavailable. Its own Ray, in a
    fresh process."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", _CONSOLE_JOB, str(path)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert console.count("distill: one line from the worker") == 1, console[-3000:]
    assert "Failed to query Ray Train Controller" not in console, console[-3000:]
