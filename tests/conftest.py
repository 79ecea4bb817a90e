"""Session fixtures: the synthetic topic task (tiny tokenizers, teachers and LM trained offline),
loaded teachers, and one local Ray instance; a factory of valid transfer-set rows.

Set ``DFKD_TEST_CACHE=/some/dir`` to reuse the built task across pytest sessions.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def make_row():
    """Factory ``(i, **fields) -> row``: a valid transfer-set row (sample ``t/0/<i>``) with ``fields`` changed."""

    def _row(i: int, **kw) -> dict:
        row = {"sample_id": f"t/0/{i}", "text": f"text {i}", "label": 0, "label_name": "a", "teacher": "t",
               "teacher_class": 0, "source": "corpus", "source_params": "{}", "confidence": 0.5, "num_tokens": 2,
               "seed": i, "heldout": False}
        row.update(kw)
        return row

    return _row


@pytest.fixture
def seeded_single_thread():
    """torch seeded and one intra-op thread (restored after): tiny models on a machine with few cores run
    far faster without thread contention. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory, request):
    """``(name, make) -> dict``: ``make(directory)``'s result (JSON), made once for the whole run. Under
    ``pytest -n`` (pytest-xdist) a module or session fixture runs in every test process that gets one of
    its tests; through this the first process to take the lock makes the result under the run's temp
    dir, and the others wait for it and read it. A result whose making failed is made again."""
    import json
    import shutil

    from filelock import FileLock

    def made_once(name: str, make) -> dict:
        if not hasattr(request.config, "workerinput"):  # one process: nothing to share
            return make(tmp_path_factory.mktemp(name))
        root = tmp_path_factory.getbasetemp().parent / name
        with FileLock(f"{root}.lock"):
            record = root / "result.json"
            if record.is_file():
                return json.loads(record.read_text())
            shutil.rmtree(root, ignore_errors=True)  # a process that failed making it
            root.mkdir(parents=True)
            result = make(root)
            record.write_text(json.dumps(result))
            return result

    return made_once


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory, request):
    """Two teachers (alpha: BERT/WordPiece/2 layers on sports+cooking; beta: DistilBERT/byte-BPE/3 layers
    on space+finance), a tiny GPT-2 LM on all four topics, a student encoder, a corpus and an eval CSV.

    Built once per run: the test processes of ``pytest -n`` (pytest-xdist) share one build, the
    first to get the lock makes it, and ``DFKD_TEST_CACHE`` shares it across runs."""
    from filelock import FileLock

    from dfkd_ray.synthetic import build_synthetic_task

    cache = os.environ.get("DFKD_TEST_CACHE")
    if cache:
        root = Path(cache) / "synthetic"
    elif not hasattr(request.config, "workerinput"):  # one process (no pytest-xdist worker): nothing to share
        return build_synthetic_task(tmp_path_factory.mktemp("synthetic"), seed=0)
    else:  # the run's temp dir, above each worker's own
        root = tmp_path_factory.getbasetemp().parent / "synthetic"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        return build_synthetic_task(root, seed=0)


@pytest.fixture(scope="session")
def teachers(synthetic_task):
    """The two fixture teachers, loaded with 3 blocks each."""
    from dfkd_ray.models.teacher import Teacher

    return {name: Teacher.from_pretrained(name, path, num_blocks=3) for name, path in synthetic_task.teachers.items()}


@pytest.fixture
def job_dict(synthetic_task, tmp_path):
    """A valid job config (as a plain dict) over the fixture teachers; tests edit a copy."""
    return {
        "name": "test-job",
        "seed": 0,
        "teachers": [{"name": n, "path": str(p)} for n, p in synthetic_task.teachers.items()],
        "transfer": {"source": "corpus", "samples_per_class": 8, "shard_size": 8,
                     "corpus": {"path": str(synthetic_task.corpus)}},
        # 8 requests a class hold too few held-out rows for stratanet's confidence statistics
        "amalgamation": {"method": "vanilla"},
        "student": {"path": str(synthetic_task.student)},
        "eval": {"path": str(synthetic_task.eval_file)},
        "output": {"dir": str(tmp_path / "out")},
    }


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with more logical CPUs than the tests' workers and actors take
    (Ray Data gets no CPU a train worker holds). Tests that use it carry the ``ray`` marker."""
    ray = pytest.importorskip("ray")
    from dfkd_ray.config import RayConfig
    from dfkd_ray.orchestration.runtime import API_SERVER_ADDRESS, free_port, report_poll_env

    # As a job's own local Ray (dfkd_ray.orchestration.runtime.start_ray): Ray Train collects reports at
    # the config's default interval, and its placement-group cleaner asks a State API that answers at
    # once (no dashboard here: with none named, each of its asks, and so each trainer's shutdown, waits
    # out a 10 s timeout). Every process of this Ray inherits the variables.
    os.environ.update(report_poll_env(RayConfig()))
    os.environ[API_SERVER_ADDRESS] = f"http://127.0.0.1:{free_port()}"
    # address="local": a Ray of the tests' own, never a cluster someone started on this machine
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_local_address(ray_local) -> str:
    """The session Ray's GCS address, for job subprocesses that join it (``ray.address=...``):
    ``auto`` would pick whichever Ray it finds, and another may run on this machine."""
    return ray_local.get_runtime_context().gcs_address


SMOKE = Path(__file__).parents[1] / "jobs" / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_overrides(synthetic_task):
    """Factory ``(out, *more) -> [dotted overrides]`` that put the smoke preset (jobs/configs/smoke.yaml)
    on the session's fixtures (the same builder as its `demo:` directory), writing to ``out``."""
    task = synthetic_task

    def make(out: Path, *more: str) -> list[str]:
        return [f"demo={task.root}", f"teachers.0.path={task.teachers['alpha']}",
                f"teachers.1.path={task.teachers['beta']}", f"transfer.steered.lm_path={task.lm}",
                f"transfer.corpus.path={task.corpus}", f"student.path={task.student}", f"eval.path={task.eval_file}",
                f"output.dir={out}", *more]

    return make


@pytest.fixture(scope="session")
def smoke_config(smoke_overrides):
    """Factory ``(out, *more) -> JobConfig``: the smoke preset on the session's fixtures, writing to ``out``."""
    from dfkd_ray.config import load_config

    return lambda out, *more: load_config(SMOKE, smoke_overrides(out, *more))


class KernelRecorder:
    """Stands in for ``attention_kernels``: records each choice it is entered with and whether code
    runs inside it (``inside``)."""

    def __init__(self):
        self.seen: list[str] = []
        self.inside = False

    @contextlib.contextmanager
    def __call__(self, choice, device):
        self.seen.append(choice)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


@pytest.fixture
def kernel_recorder() -> KernelRecorder:
    return KernelRecorder()
