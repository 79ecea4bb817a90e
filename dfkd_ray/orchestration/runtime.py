"""The Ray runtime of a job: starting Ray, where workers run their models, and what the user sees of errors and progress."""

from __future__ import annotations

from typing import Callable

from dfkd_ray.config import JobConfig


def worker_device(want_gpu: bool) -> str:
    """Where a Ray task or actor that asked for a GPU (``want_gpu``) runs its models: ``cuda`` when
    one is visible, else ``cpu``."""
    import torch

    return "cuda" if want_gpu and torch.cuda.is_available() else "cpu"


def user_errors() -> tuple[type[Exception], ...]:
    """The project's errors that describe something the user fixes (a directory holding another
    configuration's results, filtering that emptied the set, an unreadable eval file, ...): a job
    script prints them without a traceback and exits 2, like a bad config (``parse_job_args``)."""
    from dfkd_ray.config import ConfigError
    from dfkd_ray.evaluation import EvalDataError
    from dfkd_ray.labels import LabelSpaceError
    from dfkd_ray.stages import StageMismatch
    from dfkd_ray.transfer.store import TransferSetError
    from dfkd_ray.transfer.writer import TransferSetEmpty

    return ConfigError, EvalDataError, LabelSpaceError, StageMismatch, TransferSetEmpty, TransferSetError


def root_cause(error: BaseException) -> BaseException:
    """The exception a Ray task, actor or Train worker raised, out of Ray's wrappers: a task's
    ``RayTaskError`` (``cause``), Ray Data's ``UserCodeException`` (``__cause__``), a Train run's
    worker failures (the first worker's)."""
    from ray.exceptions import RayTaskError, UserCodeException

    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        elif isinstance(error, UserCodeException) and error.__cause__ is not None:
            error = error.__cause__
        elif getattr(error, "worker_failures", None):
            error = next(iter(error.worker_failures.values()))
    return error


def report_user_error(error: BaseException) -> int:
    """Print one of :func:`user_errors` for the user (its root cause, see :func:`root_cause`, without
    a traceback); returns the exit status (2)."""
    import sys

    print(f"error: {root_cause(error)}", file=sys.stderr)
    return 2


def worker_print(message: str) -> None:
    """One line on the driver's console from inside a Ray Train worker.

    Ray Train 2.60 patches ``print`` in its workers to log the line through the root logger *and*, because
    Ray wraps the worker's ``sys.stdout``, to print it as well: every line reached the driver twice. The
    process's own stdout (``sys.__stdout__``) is what Ray streams to the driver, once.
    """
    import sys

    print(message, file=sys.__stdout__, flush=True)


# Ray Train 2.60's placement-group cleaner asks the State API every second whether the train controller
# lives; without a dashboard (a local ``ray.init(include_dashboard=False)``) every ask fails with a warning.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_stateless_ray() -> None:
    """``runtime_env`` ``worker_process_setup_hook`` of a local Ray without a dashboard: the placement-group
    cleaner cannot work there and would warn once a second for a whole training run; errors still show."""
    import logging

    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


def start_ray(cfg: JobConfig) -> None:
    """Start or join the Ray a job runs on: the one start-up of every job script.

    With ``ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) the job joins that
    cluster as it was started. Otherwise it starts a local Ray on this machine: no dashboard (a
    job needs none and starts seconds sooner without), :func:`quiet_stateless_ray` in every worker
    process, and logical CPUs beyond what the train workers and generator actors take, so dataset
    reads always get one (Ray Data gets no CPU a train worker holds). Worker output reaches the
    driver's console in both cases.
    """
    import os

    import ray

    ray.data.DataContext.get_current().raise_original_map_exception = True  # the callable's error, not a wrapper
    r = cfg.ray
    if r.address is not None or "RAY_ADDRESS" in os.environ:
        ray.init(address=r.address, log_to_driver=True)
        return
    need = r.num_train_workers * r.cpus_per_train_worker + r.num_generation_actors * r.cpus_per_generation_actor
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need) + 2), log_to_driver=True, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_stateless_ray"})


def run_job(cfg: JobConfig, run: Callable[[JobConfig], object]) -> int:
    """What a job script does once its config passed the preflight: start Ray (:func:`start_ray`), run
    one ``run_*`` function, and report what stopped it once, as its root cause (:func:`root_cause`),
    without a traceback: a problem the user fixes (:func:`user_errors`) exits 2, any other error
    raised inside Ray exits 1 (Ray's detail stays in its logs). Returns the exit status."""
    import sys

    from ray.exceptions import RayError

    start_ray(cfg)
    try:
        run(cfg)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else keeps its traceback
        cause = root_cause(e)
        if isinstance(cause, user_errors()):
            return report_user_error(cause)
        if not isinstance(e, RayError) and cause is e:
            raise
        print(f"error: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    return 0
