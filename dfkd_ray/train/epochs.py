"""How many steps a distillation makes and which batches they read (no Ray here).

:class:`StepPlan` counts the optimiser steps of one worker (every worker makes the same number);
:func:`iterate_epochs` walks a transfer set's epochs to that count (and resumes inside an epoch);
:func:`iterate_stream` walks a streamed first epoch whose length is not known ahead;
:func:`prefetch` reads an iterable in a background thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dfkd_ray.config import JobConfig


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps a run makes (per worker; every worker makes the same number)."""

    rows: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, rows: int, cfg: JobConfig, world_size: int = 1) -> "StepPlan":
        if rows < world_size:
            raise ValueError(f"the transfer set has {rows} training rows for {world_size} train workers; make a "
                             "larger set (transfer.samples_per_class) or use fewer ray.num_train_workers")
        t = cfg.train
        per_epoch = max(1, (rows // world_size) // t.batch_size)  # full batches only: equal on every worker
        total = max(1, math.ceil(t.epochs * per_epoch))
        return cls(rows, world_size, per_epoch, total, min(total - 1, round(t.warmup_epochs * per_epoch)))

    @classmethod
    def after_stream(cls, rows: int, cfg: JobConfig, world_size: int, *, streamed_steps: int,
                     warmup_steps: int) -> "StepPlan":
        """The plan of the epochs after a streamed first one (``train.stream_from_generation``).

        The streamed epoch was planned on the planned request count and made ``streamed_steps``
        steps; the remaining ``epochs - 1`` epochs read the finished set's ``rows``, so they count
        exactly. Warmup keeps the streamed plan's step count; the linear decay ends at the new total.
        """
        base = cls.of(rows, cfg, world_size)
        total = max(streamed_steps, streamed_steps + math.ceil((cfg.train.epochs - 1) * base.steps_per_epoch))
        return cls(rows, world_size, base.steps_per_epoch, total, max(0, min(warmup_steps, total - 1)))


def student_num_blocks(cfg: JobConfig) -> int:
    """``N``: the student's kept depth, read from its config (no weights loaded).

    The number of blocks is the student's kept depth (one block per student layer); every teacher
    is pooled into the same ``N`` blocks (:func:`~dfkd_ray.math.blocks.partition_layers`). The depth
    is the config's ``num_hidden_layers`` as transformers reads it (DistilBERT's ``n_layers`` too).
    """
    from transformers import AutoConfig

    from dfkd_ray.preflight import read_model_config
    from dfkd_ray.models.student import select_layers

    if cfg.student.path is None:
        raise ValueError("student.path is not set: point it at a local HF encoder directory")
    read_model_config(cfg.student.path)  # a clear error for a directory that is no model
    total = int(AutoConfig.from_pretrained(cfg.student.path).num_hidden_layers)
    return len(select_layers(total, cfg.student.layers, cfg.student.num_layers))


def iterate_epochs(batches_of_epoch: Callable[[int], object], plan: StepPlan, *, start_epoch: int = 0,
                   skip_batches: int = 0, start_step: Optional[int] = None):
    """Yield ``(epoch, batch_in_epoch, batch)`` until ``plan.total_steps`` batches have been given.

    ``batches_of_epoch(e)`` returns an iterable of batches for epoch ``e`` (seeded per epoch); on
    resume, the first ``skip_batches`` batches of ``start_epoch`` are read and dropped (cheap: no
    teacher runs), so the run continues where the checkpoint left it. ``start_step``: the steps
    already made (default ``start_epoch * steps_per_epoch + skip_batches``; after a streamed first
    epoch that made fewer steps than a full one, the checkpoint's step count).
    """
    given = start_epoch * plan.steps_per_epoch + skip_batches if start_step is None else start_step
    epoch = start_epoch
    while given < plan.total_steps:
        read = 0
        for i, batch in enumerate(batches_of_epoch(epoch)):
            read = i + 1
            if i >= plan.steps_per_epoch or given >= plan.total_steps:
                break
            if epoch == start_epoch and i < skip_batches:
                continue
            yield epoch, i, batch
            given += 1
        if read == 0:  # no full batch: looping on would never end
            raise ValueError(f"epoch {epoch} gave no full batch of train.batch_size rows (the plan counted "
                             f"{plan.rows} rows over {plan.world_size} worker(s)); lower train.batch_size or "
                             "make a larger transfer set")
        epoch += 1


def iterate_stream(batches, plan: StepPlan, *, start_step: int = 0, skip_batches: int = 0,
                   device: str | torch.device = "cpu"):
    """Yield ``(batch_in_epoch, batch)`` of a streamed epoch (the live generation pipeline), then drain it.

    The stream's length is not known ahead (requests given up make fewer rows than planned, and
    workers' splits may differ), so before each batch every worker is asked whether it has one
    (:func:`all_workers_have`): all stop together at the shortest split, making the same number of
    DDP steps. Batches stop too at ``plan.total_steps`` (counting ``start_step`` made before) and
    after ``plan.steps_per_epoch``. The rest of the stream is then read without being yielded, so
    the generator actors finish every shard. On resume, the first ``skip_batches`` are dropped.
    """
    it = iter(batches)
    for _ in range(skip_batches):
        next(it, None)
    index, given = skip_batches, start_step
    while given < plan.total_steps and index < plan.steps_per_epoch:
        batch = next(it, None)
        if not all_workers_have(batch is not None, device):
            break
        yield index, batch
        index += 1
        given += 1
    for _ in it:
        pass


def prefetch(iterable, size: int = 2):
    """Iterate ``iterable`` in a background thread from now on, up to ``size`` items ahead; returns
    an iterator over the same items (an exception raised there is raised here). The thread stops
    when the returned iterator is closed or dropped before the end.

    A streamed epoch starts its generation pipeline this way before the worker builds its models,
    so the generator actors (an LM, perhaps a vLLM engine) start up meanwhile, not after; training
    without Ray tokenizes the next batch this way while the current step runs.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=size)
    end = object()
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((end, e))

    threading.Thread(target=run, name="prefetch", daemon=True).start()

    def items():
        try:
            while True:
                item, error = q.get()
                if error is not None:
                    raise error
                if item is end:
                    return
                yield item
        finally:
            stop.set()

    return items()


def all_workers_have(has_batch: bool, device: str | torch.device = "cpu") -> bool:
    """True when every DDP worker has a next batch (a MIN all-reduce of ``has_batch``).

    A stream's epoch has no length known in advance, and a worker whose split runs dry must not
    leave the others waiting in DDP's gradient all-reduce: each step asks first, and all stop
    together at the shortest split. Without a process group (one worker) it is ``has_batch``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
