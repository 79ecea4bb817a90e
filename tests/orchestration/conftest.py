"""The orchestration tests' shared job: the smoke preset submitted with ``ray job submit`` to a local
Ray head, as the README's "A local Ray cluster" section does it (the repository as working directory,
``DFKD_RAY_HOME`` set per job with ``--runtime-env-json``). Submitting is the costliest way to run the
smoke job, so it is made once for the session and its results serve every test of the smoke job
(tests/orchestration/test_job_submit.py, tests/orchestration/test_amalgamate.py).

The head is the session's own: ports nobody holds, its own temp dir (so ``ray.init()`` elsewhere on the
machine never joins it) and token authentication with a token of its own. It runs with ``--block``, only
while the fixture submits, and is stopped by signalling that process, which shuts down the processes it
started; ``ray stop`` would end every Ray on the machine, including the one this test session may hold.
Every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent  # the environment's `ray` and `python`

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
HEAD_STOP_TIMEOUT_S = 60


# What Ray and transformers print of their own on a job's console unless the job keeps it in their logs.
RAY_INTERNALS = [
    r"Started a local Ray instance", r"Connected to Ray cluster", r"Token authentication is",
    r"Progress bars disabled", r"SplitCoordinator", r"exclude_resources",
    # Ray's actor-restart note: the driver's own (Ray's C++ core writes it to stderr, for the generation
    # actor pool) and Ray Train's actors', forwarded from their processes
    r"constructor arguments in the object store", r"core_worker\.cc", r"Failed to kill actor",
    r"PlacementGroupCleaner",
    r"Reporting training result", r"TrainingReport\(", r"Checkpoint successfully created",
    r"worker processes have been started", r"Writing model shards", r"Loading weights", r"loss_type",
    r"\bINFO\b.*\.py:\d+",  # a Ray logger's INFO line (Ray Data's execution and progress lines)
]


@pytest.fixture(scope="session")
def ray_internal_lines():
    """``(console) -> [lines]``: the lines of a job's console that are Ray's or transformers' own
    (:data:`RAY_INTERNALS`), which a job keeps in their logs."""
    return lambda console: [x for x in console.splitlines() if any(re.search(p, x) for p in RAY_INTERNALS)]


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


@contextlib.contextmanager
def ray_head(tmp_path: Path):
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


@dataclass(frozen=True)
class SubmittedSmoke:
    home: Path  # DFKD_RAY_HOME of the submissions: its .cache/demo is the session's synthetic task
    out: Path  # the absolute output.dir the smoke job was given
    status: int  # exit status of `ray job submit` for the smoke job
    console: str  # everything it printed
    refused_status: int  # the same submission with a misspelt key
    refused_console: str
    refused_left_output: bool  # whether output.dir existed after the refused submission

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


@pytest.fixture(scope="session")
def submitted_smoke(synthetic_task, once_per_run, ray_local) -> SubmittedSmoke:
    """The smoke preset, every stage as the README's command runs it, submitted to a local head whose
    ``DFKD_RAY_HOME`` holds the demo an earlier submission built; first the same submission with a
    misspelt key, which must be refused before Ray. The head is stopped before the fixture returns.
    The session's own Ray (``ray_local``) runs beside the head all along: a job must talk to the
    cluster it was submitted to, never to whichever Ray it finds on the machine. Submitted once per run,
    whichever test processes ask for it."""

    def submit(root: Path) -> dict:
        home = root / "home"
        (home / ".cache").mkdir(parents=True)
        (home / ".cache" / "demo").symlink_to(synthetic_task.root)
        out = root / "runs" / "smoke"
        with ray_head(root) as (address, env):
            refused_status, refused = _submit(address, env, home, f"output.dir={out}", "transfer.smaples_per_class=3")
            refused_left_output = out.exists()
            status, console = _submit(address, env, home, f"output.dir={out}")
        return {"home": str(home), "out": str(out), "status": status, "console": console,
                "refused_status": refused_status, "refused_console": refused,
                "refused_left_output": refused_left_output}

    made = once_per_run("submitted_smoke", submit)
    return SubmittedSmoke(**{**made, "home": Path(made["home"]), "out": Path(made["out"])})
