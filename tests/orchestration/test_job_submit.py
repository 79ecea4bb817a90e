"""``ray job submit`` to a local Ray head, as the README's "A local Ray cluster" section does it: the
smoke job, submitted with the repository as its working directory, exits 0, prints its result line,
writes its results to the absolute ``output.dir`` it was given and finds its demo task under
``DFKD_RAY_HOME`` (set per job with ``--runtime-env-json``); a config problem makes the submission
exit non-zero with the field named.

The head is this test's own: ports nobody holds, its own temp dir (so ``ray.init()`` elsewhere on the
machine never joins it) and token authentication with a token of its own. It runs with ``--block``
and is stopped by signalling that process, which shuts down the processes it started; ``ray stop``
would end every Ray on the machine, including the one this test session may hold. Every subprocess
has a timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent  # the environment's `ray` and `python`

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
HEAD_STOP_TIMEOUT_S = 60


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every interface now (the head binds them moments later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _set_parent_death_signal() -> None:
    """In the head's process: SIGTERM it when this test process dies (even killed by pytest-timeout),
    so a head never outlives its test. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture
def ray_head(tmp_path):
    """A local Ray head started with ``ray start --head --block``; yields (dashboard address, env)."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail(f"no `ray` command next to {sys.executable}: the install lacks Ray's CLI")
    gcs, dashboard, client, agent = _free_ports(4)
    # A short temp dir: Ray's Unix sockets live below it and their paths have a length limit.
    temp = Path(tempfile.mkdtemp(prefix="dfkd-ray-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this environment's
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once: no drain wait on SIGTERM
    log = tmp_path / "ray_start.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--disable-usage-stats",
             f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_set_parent_death_signal)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not start (exit {head.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops every process this head started
        try:
            head.wait(timeout=HEAD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            head.kill()  # its processes share its fate (Ray sets their parent-death signal)
            head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, home: Path, *overrides: str) -> tuple[int, str]:
    """``ray job submit`` of the smoke job, the repository as working directory and ``DFKD_RAY_HOME=home``
    for this job only; returns the exit status and everything it printed."""
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
              "--runtime-env-json", json.dumps({"env_vars": {"DFKD_RAY_HOME": str(home)}}), "--",
              "python", "jobs/amalgamate.py", "--config", "jobs/configs/smoke.yaml", *overrides]
    try:
        job = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ray job submit ran over {JOB_TIMEOUT_S} s:\n{(e.stdout or b'')[-4000:]!r}")
    return job.returncode, job.stdout + job.stderr


def test_smoke_job_submitted_to_a_local_head_writes_where_it_was_told(ray_head, synthetic_task, tmp_path):
    address, env = ray_head
    home = tmp_path / "home"  # DFKD_RAY_HOME, where an earlier submission built the demo
    (home / ".cache").mkdir(parents=True)
    (home / ".cache" / "demo").symlink_to(synthetic_task.root)
    out = tmp_path / "runs" / "smoke"

    status, log = _submit(address, env, home, f"output.dir={out}", "transfer.smaples_per_class=3")
    assert status != 0 and "transfer.smaples_per_class: unknown key" in log, log[-6000:]  # refused before Ray
    assert not out.exists()

    # every stage as the README's command runs it, on half the requests and with a shorter training
    status, log = _submit(address, env, home, f"output.dir={out}", "transfer.samples_per_class=32", "train.epochs=2")
    assert status == 0, log[-6000:]
    assert f"relative paths in the config are under {home}" in log
    assert "student accuracy" in log and f"student -> {out / 'student'}" in log, log[-6000:]
    outputs = json.loads((out / "summary.json").read_text())["outputs"]
    assert all(Path(path).is_relative_to(out) for path in outputs.values() if path), outputs
    for made in ("transfer_set/manifest.json", "confidence/index.json", "student/config.json", "eval/eval.json"):
        assert (out / made).is_file(), made
    assert not (home / "runs").exists()  # an absolute output.dir is used as given
