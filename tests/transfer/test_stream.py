"""Streaming-mode pieces without Ray: the held-out pass and its replay, the shard order, the step
plan after a streamed epoch, and a streamed epoch that stops every DDP worker at the same step."""

from __future__ import annotations

import pytest
import torch

from dfkd_ray.config import validate_config
from dfkd_ray.train.epochs import StepPlan, iterate_epochs, iterate_stream, prefetch
from dfkd_ray.transfer.requests import is_heldout
from dfkd_ray.transfer.stream import (ReplaySource, heldout_part, planned_training_rows, stream_order,
                                      training_texts)
from dfkd_ray.transfer.writer import make_shard, plan_transfer_set


class _Counting:
    def __init__(self, source):
        self.source, self.asked = source, []

    def generate(self, requests):
        self.asked += [(r.sample_id, r.attempt) for r in requests]
        return self.source.generate(requests)


def test_shards_made_with_the_heldout_pass_replayed_equal_shards_made_from_scratch(job_dict, teachers):
    """The held-out pass makes each shard's held-out requests with the shard's filters and retries;
    the full shard then reuses those rows (no second generation) and is the same table."""
    from dfkd_ray.transfer.sources import get_source_class

    job_dict["transfer"].update(source="random_words", samples_per_class=12, shard_size=12, min_confidence=0.95,
                                max_attempts=3, heldout_fraction=0.3, random_words={"min_words": 1, "max_words": 2})
    cfg = validate_config(job_dict)
    space, shards, _ = plan_transfer_set(cfg)
    source = get_source_class("random_words")(cfg, {n: t for n, t in teachers.items()}, space)
    retried = 0
    for shard in shards:
        plain, stats = make_shard(source, shard, cfg)
        held, _ = make_shard(source, heldout_part(shard, 0.3), cfg)
        assert held.num_rows and all(held.column("heldout").to_pylist())
        counting = _Counting(source)
        replayed, _ = make_shard(ReplaySource(counting, held.to_pylist()), shard, cfg)
        assert replayed.equals(plain)
        kept = {(sid, 0) for sid, seed in zip(held.column("sample_id").to_pylist(), held.column("seed").to_pylist())
                if seed == next(r for r in shard if r.sample_id == sid).seed}
        assert kept and not kept & set(counting.asked)  # first tries kept by the pass were not made again
        retried += stats["generated"] - stats["requests"]
        assert training_texts(plain, include_heldout=False) == [
            r["text"] for r in plain.to_pylist() if not r["heldout"]]
        assert len(training_texts(plain, include_heldout=True)) == plain.num_rows
    assert retried > 0  # the filters did reject and retry, in both passes alike


def test_stream_order_mixes_classes_and_planned_rows(job_dict):
    job_dict["transfer"].update(samples_per_class=8, shard_size=4)
    cfg = validate_config(job_dict)
    _, shards, _ = plan_transfer_set(cfg)  # 2 teachers x 2 classes x 8 -> 8 shards, 2 per class
    order = stream_order(shards)
    assert sorted(order) == list(range(len(shards)))
    first = [(shards[i][0].teacher, shards[i][0].teacher_class) for i in order[:4]]
    assert len(set(first)) == 4  # every (teacher, class) before any repeats
    held = sum(is_heldout(r, 0.25) for s in shards for r in s)
    assert 0 < held < 32
    assert planned_training_rows(shards, 0.25, include_heldout=False) == 32 - held
    assert planned_training_rows(shards, 0.25, include_heldout=True) == 32


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


@pytest.mark.parametrize("method,fraction,ok", [("stratanet", 0.0, False), ("vanilla", 0.0, True),
                                                 ("stratanet", 0.1, True)])
def test_config_refuses_streaming_without_heldout_rows(job_dict, method, fraction, ok):
    from dfkd_ray.config import ConfigError

    job_dict["transfer"]["heldout_fraction"] = fraction
    job_dict["amalgamation"] = {"method": method}
    job_dict["train"] = {"stream_from_generation": True}
    if ok:
        assert validate_config(job_dict).train.stream_from_generation
        return
    with pytest.raises(ConfigError) as err:
        validate_config(job_dict)
    msg = str(err.value)
    assert "train.stream_from_generation" in msg and "set transfer.heldout_fraction > 0" in msg
