"""Ray orchestration: the only layer that imports ``ray``. Each ``run_*`` function is what a job calls."""


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


def report_user_error(error: BaseException) -> int:
    """Print one of :func:`user_errors` for the user; returns the exit status (2)."""
    import sys

    cause = getattr(error, "cause", None)  # raised in a Ray task: the original error, not the remote traceback
    print(f"error: {cause if isinstance(cause, BaseException) else error}", file=sys.stderr)
    return 2
