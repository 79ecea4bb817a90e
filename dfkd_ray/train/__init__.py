"""Distilling the student (no Ray): :mod:`~dfkd_ray.train.step` (the per-worker step, checkpoints,
export), :mod:`~dfkd_ray.train.epochs` (step plan and batch iteration), :mod:`~dfkd_ray.train.metrics`."""
