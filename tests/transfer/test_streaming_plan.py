"""Streaming-mode pieces of the transfer set: the held-out pass and its replay, the shard order and
the rows the plan counts on."""

from __future__ import annotations

from dfkd_ray.config import validate_config
from dfkd_ray.transfer.requests import heldout_part, is_heldout
from dfkd_ray.transfer.streaming_plan import ReplaySource, planned_training_rows, stream_order, training_rows
from dfkd_ray.transfer.writer import make_shard, plan_transfer_set


class _Counting:
    def __init__(self, source):
        self.source, self.asked = source, []

    def generate(self, requests):
        self.asked += [(r.sample_id, r.attempt) for r in requests]
        return self.source.generate(requests)


def test_shards_made_with_the_heldout_pass_replayed_equal_shards_made_from_scratch(job_dict, teachers,
                                                                                   seeded_single_thread):
    """The held-out pass makes each shard's held-out requests with the shard's filters and retries;
    the full shard then reuses those rows (no second generation) and is the same table.

    One intra-op thread: the two passes score a text in batches of different sizes, and with several
    threads a CPU matmul's float rounding depends on how the batch is split between them."""
    from dfkd_ray.transfer.sources import get_source_class

    job_dict["transfer"].update(source="random_words", samples_per_class=12, shard_size=12, min_confidence=0.95,
                                max_attempts=3, heldout_fraction=0.3, random_words={"min_words": 1, "max_words": 2})
    cfg = validate_config(job_dict)
    space, shards, _ = plan_transfer_set(cfg)
    source = get_source_class("random_words")(cfg, {n: t for n, t in teachers.items()}, space)
    _, held_shards, held_description = plan_transfer_set(cfg, "heldout")  # what the held-out pass makes
    assert held_shards == [heldout_part(s, 0.3) for s in shards] and held_description["part"] == "heldout"
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
        trained = training_rows(plain, include_heldout=False)
        assert trained.column("text").to_pylist() == [r["text"] for r in plain.to_pylist() if not r["heldout"]]
        assert training_rows(plain, include_heldout=True).num_rows == plain.num_rows
        assert trained.column("teacher").to_pylist() == [r["teacher"] for r in plain.to_pylist() if not r["heldout"]]
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
