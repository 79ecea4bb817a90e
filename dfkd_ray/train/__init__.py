"""Distillation engine: the per-worker training step, checkpoints, metrics (no Ray)."""
