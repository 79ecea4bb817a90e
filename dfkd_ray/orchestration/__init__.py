"""Ray orchestration: the only layer that imports ``ray``. Each ``run_*`` function is what a job calls."""


def worker_device(want_gpu: bool) -> str:
    """Where a Ray task or actor that asked for a GPU (``want_gpu``) runs its models: ``cuda`` when
    one is visible, else ``cpu``."""
    import torch

    return "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
