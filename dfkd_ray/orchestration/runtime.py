"""The Ray runtime of a job: starting Ray, where workers run their models, and what the user sees of errors and progress."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # every worker process of a job runs quiet_console: keep its imports few
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
_CLEANER_STOP_LOGGER = "ray.train.v2._internal.callbacks.placement_group_callback"


def _drop_cleaner_stop(record) -> bool:
    """Logging filter: drop the train controller's "Failed to stop PlacementGroupCleaner gracefully"."""
    return not record.getMessage().startswith("Failed to stop PlacementGroupCleaner")

# Lines Ray's processes print that say nothing to the user of a job: the raylet's note that it started more
# worker processes than it expects at once (every Ray Data actor pool and Train worker group on a small
# machine), Ray's note that an actor it restarts on failure took object-store arguments (Ray Train's own
# actors), and the GCS's note that an actor it was asked to kill had already exited (Ray Data's actor
# pools at the end of a dataset). What a worker prints itself, warnings and errors of Ray's loggers
# included, passes.
RAY_CHATTER = ("worker processes have been started on node", "has constructor arguments in the object store",
               "Failed to kill actor")


RAY_DATA_LOGGING_CONFIG = "RAY_DATA_LOGGING_CONFIG"
"""The environment variable Ray Data reads its logging configuration from when it is imported."""

TRANSFORMERS_QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
"""transformers' logging at ERROR and its progress bars off, as environment variables it reads on import."""

REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def report_poll_env(r) -> dict[str, str]:
    """The job's environment variables for Ray Train (``r``: the ``ray`` config section). Ray Train's
    controller collects one report per worker per health check, every 2 s by default, and a worker's
    ``ray.train.report`` blocks until its previous report was collected: a job reporting every few
    steps would wait up to 2 s at each report. ``ray.report_poll_interval_s`` sets that interval."""
    return {REPORT_POLL_ENV: f"{r.report_poll_interval_s:g}"}


def quiet_console() -> None:
    """Keep Ray's and transformers' progress detail off the console of this process, errors and warnings
    kept: Ray Data's console handler at WARNING (its log file keeps everything), ``ray.train`` at WARNING,
    transformers' logging at ERROR and its progress bars off. The ``runtime_env``
    ``worker_process_setup_hook`` of every job's workers (:func:`start_ray`) and part of the driver's start-up.
    It runs in every worker process of the job, Ray Train's and Ray Data's own actors included, so it
    imports neither Ray Data nor transformers (importing Ray Data alone took 0.8 s a process): loggers
    are set by name, and both libraries read their settings from the environment when (and if) the
    process imports them (Ray Data its logging configuration from ``RAY_DATA_LOGGING_CONFIG``, which
    a user who set it keeps).
    """
    import logging
    import os
    import sys
    import warnings

    os.environ.setdefault(RAY_DATA_LOGGING_CONFIG, str(Path(__file__).with_name("ray_data_logging.yaml")))
    if "ray.data" in sys.modules:  # imported already, so configured already (the driver): set it now
        from ray.data._internal.logging import SessionFileHandler

        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, SessionFileHandler):
                handler.setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray Train's report of each result and checkpoint, logged at INFO by a logger named after its file
    # (found without importing Ray Train, which most of the job's processes never use)
    import ray

    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                                   "context.py")).setLevel(logging.WARNING)
    # Ray Train sets a Ray Data option Ray Data itself deprecates; nothing for the job's user to change
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.* is deprecated")
    # the job turns Ray Data's progress bars off on purpose (the step lines say more); no notice of it
    from ray.util import log_once

    log_once("ray_data_progress_manager_disabled")
    # without a dashboard the cleaner cannot work and would warn once a second for a whole training run
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
    # at the end of every training run the controller stops the cleaner with a timeout; on a busy machine
    # (a submitted job, whose cleaner asks the cluster's dashboard) the stop can outlast it, and Ray logs
    # that at ERROR with a traceback although the run is complete and the cleaner ends with the controller.
    # A filter, not a level: Ray Train's logging set-up in the controller (``dictConfig``) resets the
    # levels of the loggers below ``ray.train`` but keeps their filters.
    logging.getLogger(_CLEANER_STOP_LOGGER).addFilter(_drop_cleaner_stop)  # added once however often called
    os.environ.update(TRANSFORMERS_QUIET)  # read by transformers on import
    if "transformers" in sys.modules:  # imported already (the driver): set it now
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _drop_ray_chatter() -> None:
    """Leave :data:`RAY_CHATTER` lines out of what the driver prints of its workers' and raylets' output
    (Ray's log files keep them). Ray 2.60 prints both through ``print_worker_logs``; where that is not
    so, nothing changes."""
    from ray._private import worker

    original = getattr(worker, "print_worker_logs", None)
    if original is None or getattr(original, "drops_ray_chatter", False):
        return

    def print_worker_logs(data, *args, **kwargs):
        lines = [x for x in data.get("lines", []) if not any(c in x for c in RAY_CHATTER)]
        if lines:
            original({**data, "lines": lines}, *args, **kwargs)

    print_worker_logs.drops_ray_chatter = True
    worker.print_worker_logs = print_worker_logs


API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
"""The environment variable through which Ray's State API clients find the dashboard's HTTP server."""


def free_port() -> int:
    """A TCP port free on this machine now (a local Ray's own API server address: :func:`start_ray`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spend_the_drivers_actor_restart_note() -> None:
    """Keep the driver's own copy of Ray's actor-restart note (:data:`RAY_CHATTER`) off its console.

    Ray's C++ core logs that note at ERROR straight to the process's stderr (past Python, so
    :func:`_drop_ray_chatter` never sees it), once per process, when the process creates an actor that
    may restart and takes an object-store argument. Ray Data creates every actor-pool worker so (its
    transform travels by reference, and the dataset holds that reference, so a restart would find it):
    the first generation actor pool of every job printed it. Creating one such actor here, with the
    process's stderr pointed at ``/dev/null`` for that call, uses the note up; the actor is killed at
    once. Worker processes' copies reach the driver through the log monitor and are dropped there."""
    import os
    import sys

    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _RestartNote:
        def __init__(self, argument):
            pass

    argument = ray.put(None)
    sys.stderr.flush()  # what Python holds for stderr goes out now, not into /dev/null below
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        actor = _RestartNote.remote(argument)
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)
    ray.kill(actor)


def start_ray(cfg: JobConfig) -> None:
    """Start or join the Ray a job runs on: the one start-up of every job script.

    With ``ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) the job joins that
    cluster as it was started. Otherwise it starts a local Ray on this machine: no dashboard (a
    job needs none and starts seconds sooner without), and logical CPUs beyond what the train
    workers and generator actors take, so dataset reads always get one (Ray Data gets no CPU a
    train worker holds). A config with a ``tune.search_space`` (a sweep, ``jobs/tune.py``) books
    ``tune.max_concurrent_trials`` trials' CPUs and starts the dashboard: Ray Train frees the
    workers of a trial that Ray Tune stops only through the State API the dashboard serves, and
    without it the next trials wait for them forever. Worker output reaches the driver's console in
    both cases, without Ray's progress detail (:func:`quiet_console` here and in every worker process of the job; Ray's
    start-up notices below WARNING); Ray's own log files keep all of it.
    """
    import logging
    import os

    import ray

    quiet_console()
    ray.data.DataContext.get_current().raise_original_map_exception = True  # the callable's error, not a wrapper
    r = cfg.ray
    hook = {"worker_process_setup_hook": f"{__name__}.quiet_console", "env_vars": report_poll_env(r)}
    if r.address is not None or "RAY_ADDRESS" in os.environ:
        # The cluster's address for every process of the job: Ray Train's placement-group cleaner finds
        # the State API from RAY_ADDRESS, else from whichever Ray it finds on the machine (see below).
        address = os.environ.get("RAY_ADDRESS") or r.address
        if address and address != "auto" and "://" not in address:
            hook["env_vars"]["RAY_ADDRESS"] = address
        ray.init(address=r.address, log_to_driver=True, logging_level=logging.WARNING, runtime_env=hook)
    else:
        need = r.num_train_workers * r.cpus_per_train_worker + r.num_generation_actors * r.cpus_per_generation_actor
        sweep = bool(cfg.tune.search_space)
        if sweep:
            from dfkd_ray.tuning.space import trial_resources

            need = max(need, cfg.tune.max_concurrent_trials * trial_resources(cfg)["CPU"])
        # A local Ray turns token authentication on by itself where a token exists (``RAY_AUTH_MODE``
        # unset) and says so at WARNING; the job's own Ray needs no notice of it.
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = notice.level
        notice.setLevel(logging.ERROR)
        # Ray Train's placement-group cleaner finds the State API as `ray job` commands do: from
        # RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the latest Ray on this machine. Where another Ray
        # runs here, it may ask that one, not find the train controller there, and remove this job's
        # placement group (its workers with it). Every process of a local Ray inherits the driver's
        # environment at start-up, so the job names its own API server: the sweep's dashboard, on a port
        # chosen here, or (no dashboard) a port nobody listens on, where the cleaner's every ask fails and
        # it never concludes the controller is gone.
        api_port = free_port()
        saved = os.environ.get(API_SERVER_ADDRESS)
        os.environ[API_SERVER_ADDRESS] = f"http://127.0.0.1:{api_port}"
        try:
            # address "local": a Ray of the job's own, even where `ray start` runs a cluster on this machine
            # (a bare ray.init would join it, and refuse num_cpus there)
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need) + 2), log_to_driver=True,
                     include_dashboard=sweep, dashboard_port=api_port if sweep else None,
                     logging_level=logging.WARNING, runtime_env=hook)
        finally:
            notice.setLevel(level)
            if saved is None:
                os.environ.pop(API_SERVER_ADDRESS, None)
            else:
                os.environ[API_SERVER_ADDRESS] = saved
    _drop_ray_chatter()
    _spend_the_drivers_actor_restart_note()


def run_job(cfg: JobConfig, run: Callable[[JobConfig], object]) -> int:
    """What a job script does once its config passed the preflight: start Ray (:func:`start_ray`), run
    one ``run_*`` function, and report what stopped it once, as its root cause (:func:`root_cause`),
    without a traceback: a problem the user fixes (:func:`user_errors`) exits 2, any other error
    raised inside Ray exits 1 (Ray's detail stays in its logs). Ctrl-C shuts the job's Ray down at
    once and exits 130; finished stages, shards and checkpoints stay, and rerunning the same command
    resumes. Returns the exit status."""
    import sys

    import ray
    from ray.exceptions import RayError

    start_ray(cfg)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept (rerun the same command to resume)", file=sys.stderr,
              flush=True)
        ray.shutdown()  # a local Ray's processes end with it; on a cluster, the job's actors and workers
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below; anything else keeps its traceback
        cause = root_cause(e)
        if isinstance(cause, user_errors()):
            return report_user_error(cause)
        if not isinstance(e, RayError) and cause is e:
            raise
        print(f"error: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    return 0
