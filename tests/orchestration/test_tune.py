"""The smoke sweep (jobs/configs/smoke_tune.yaml) as a user runs it: jobs/tune.py on a local Ray of its
own, killed once a trial has finished and run again to the end. The tests share that run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SMOKE_TUNE = ROOT / "jobs" / "configs" / "smoke_tune.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

# Vanilla KD skips the confidence stage: the sweep's machinery is what is tested here.
FAST = ["amalgamation.method=vanilla"]


def finished_trials(out: Path) -> dict[str, float]:
    """Trial id -> modification time of its finished distillation's stage record."""
    return {p.parents[1].name: p.stat().st_mtime for p in (out / "tune" / "trials").glob("*/distill/stage.json")}


@pytest.fixture(scope="module")
def sweep(smoke_overrides, once_per_run):
    """The smoke sweep, SIGKILLed once its two short trials (run first, side by side) have finished,
    then rerun to the end (once per run, whichever test processes ask). Returns the output directory,
    the trials finished before the kill, the summary and both consoles."""

    def run_sweep(root: Path) -> dict:
        out = root / "smoke_tune"
        command = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(SMOKE_TUNE),
                   *smoke_overrides(out), *FAST]
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
               "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        log = root / "first.log"
        with log.open("w") as console:
            first = subprocess.Popen(command, env=env, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
            deadline = time.monotonic() + 500
            while len(finished_trials(out)) < 2 and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
            first.wait()
        before = finished_trials(out)
        assert before, log.read_text()[-3000:]
        rerun = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               timeout=540)
        assert rerun.returncode == 0, rerun.stdout[-3000:]
        return {"out": str(out), "before": before, "summary": json.loads((out / "tune" / "summary.json").read_text()),
                "first": log.read_text(), "rerun": rerun.stdout}

    made = once_per_run("smoke_sweep", run_sweep)
    return Path(made["out"]), made["before"], made["summary"], made["first"], made["rerun"]


def test_sweep_resumes_after_a_kill_and_keeps_finished_trials(sweep, ray_internal_lines):
    """The rerun restores the sweep and trains no finished trial again; its console, a job's on a local
    Ray of its own, holds the sweep's lines, not Ray's internals."""
    out, before, summary, _, console = sweep
    assert not ray_internal_lines(console), "\n".join(ray_internal_lines(console))
    assert "tune: resuming the sweep" in console
    after = finished_trials(out)
    assert all(after[t] == before[t] for t in before)  # not trained again
    assert len(summary["trials"]) == 4 and all(t["status"] in ("finished", "stopped early") for t in summary["trials"])
    assert console.strip().splitlines()[-1].startswith("tune smoke-tune: done in")
    for name in ("results.csv", "results.md", "metric.png", "best.yaml"):
        assert (out / "tune" / name).is_file()


@pytest.mark.parametrize("proxy", ["proxy_soft", "proxy"])
def test_proxy_ranks_the_bad_configuration_below_the_good_one(sweep, proxy):
    _, _, summary, _, _ = sweep
    score = {(t["params"]["transfer.steered.control_strength"], t["params"]["train.epochs"]): t["scores"][proxy]
             for t in summary["trials"]}
    assert score[(0.0, 1)] < score[(8.0, 8)], score  # lambda 0 and one epoch, against lambda 8 and eight


def test_best_yaml_is_a_job_of_the_best_trial(sweep):
    from dfkd_ray.config import load_config

    out, _, summary, _, _ = sweep
    assert summary["metric"] == "proxy_soft"  # no labelled development file
    assert summary["best"]["scores"]["proxy_soft"] == max(t["scores"]["proxy_soft"] for t in summary["trials"])
    best = load_config(summary["best_yaml"])
    assert best.output.dir == out / "best" and not best.tune.search_space
    for key, value in summary["best"]["params"].items():
        section, *rest = key.split(".")
        node = getattr(best, section)
        for part in rest:
            node = getattr(node, part)
        assert node == value


def test_equal_generation_settings_share_one_transfer_set(sweep):
    out, _, _, first, console = sweep
    sets = [p for p in (out / "tune" / "transfer_sets").iterdir() if p.is_dir()]
    assert len(sets) == 2  # lambda 0 and lambda 8, each for two trials
    assert all((p / "transfer_set" / "manifest.json").is_file() for p in sets)
