"""A streamed first epoch without Ray: the step plan after it, a stream that stops every DDP worker
at the same step and is read to its end, and the prefetching that starts the pipeline early."""

from __future__ import annotations

import pytest
import torch

from dfkd_ray.config import validate_config
from dfkd_ray.train.epochs import StepPlan, iterate_epochs, iterate_stream, prefetch


def test_step_plan_after_a_streamed_epoch(job_dict):
    job_dict["train"] = {"epochs": 3, "warmup_epochs": 1, "batch_size": 4}
    cfg = validate_config(job_dict)
    streamed = StepPlan.of(100, cfg, world_size=2)  # planned: 12 per epoch, 36 in all
    assert (streamed.steps_per_epoch, streamed.total_steps, streamed.warmup_steps) == (12, 36, 12)
    # 90 rows came (requests given up), and the stream's shortest split gave 10 steps
    after = StepPlan.after_stream(90, cfg, 2, streamed_steps=10, warmup_steps=streamed.warmup_steps)
    assert (after.steps_per_epoch, after.total_steps, after.warmup_steps) == (11, 10 + 2 * 11, 12)

    def batches(epoch):
        return iter([(epoch, i) for i in range(11)])

    rest = list(iterate_epochs(batches, after, start_epoch=1, skip_batches=0, start_step=10))
    assert len(rest) == 22 and rest[0] == (1, 0, (1, 0)) and rest[-1] == (2, 10, (2, 10))
    # a run whose epochs end inside the streamed epoch has nothing left
    job_dict["train"] = {"epochs": 0.5, "warmup_epochs": 0, "batch_size": 4}
    short = validate_config(job_dict)
    assert StepPlan.after_stream(90, short, 2, streamed_steps=6, warmup_steps=0).total_steps == 6


def test_streamed_epoch_stops_at_the_plan_and_drains_the_stream(job_dict):
    job_dict["train"] = {"epochs": 0.5, "warmup_epochs": 0, "batch_size": 4}
    plan = StepPlan.of(80, validate_config(job_dict), world_size=1)  # 20 per epoch, 10 in all
    read = []

    def stream(n):
        for i in range(n):
            read.append(i)
            yield i

    assert [i for i, _ in iterate_stream(stream(30), plan)] == list(range(10))
    assert len(read) == 30  # the rest was read (generation finishes), not trained on
    read.clear()
    assert [b for _, b in iterate_stream(stream(7), plan)] == list(range(7))  # fewer rows than planned
    read.clear()
    resumed = list(iterate_stream(stream(30), plan, start_step=4, skip_batches=4))
    assert [i for i, _ in resumed] == [4, 5, 6, 7, 8, 9] and len(read) == 30


def test_prefetch_starts_now_keeps_order_and_raises_here():
    import threading

    started = threading.Event()

    def stream():
        started.set()
        yield from range(5)
        raise RuntimeError("actor died")

    it = prefetch(stream())
    assert started.wait(10)  # pulled before anyone asked (the pipeline's actors start meanwhile)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(RuntimeError, match="actor died"):
        next(it)
    assert list(prefetch(iter(range(3)))) == [0, 1, 2]


def _worker(rank: int, port: int, lengths: list[int], out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(lengths))
    plan = StepPlan(rows=1000, world_size=len(lengths), steps_per_epoch=100, total_steps=100, warmup_steps=0)
    read = []

    def stream():
        for i in range(lengths[rank]):
            read.append(i)
            yield i

    steps = [i for i, _ in iterate_stream(stream(), plan)]
    out.put((rank, steps, len(read)))
    dist.destroy_process_group()


def test_every_worker_stops_at_the_shortest_split():
    """Two gloo workers whose stream splits give 3 and 5 batches both make exactly 3 steps (a DDP
    step on one worker alone would hang), and both read their split to the end."""
    import socket

    mp = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Queue()
    procs = [mp.Process(target=_worker, args=(rank, port, [3, 5], out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, [0, 1, 2], 3), (1, [0, 1, 2], 5)]
