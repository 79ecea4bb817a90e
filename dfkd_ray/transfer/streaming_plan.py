"""What streaming a transfer set into training needs to know, as pure functions (no Ray here).

With ``train.stream_from_generation`` the job (:mod:`dfkd_ray.orchestration.streaming`) first makes
the held-out requests of every shard (the held-out pass, ``part="heldout"`` of
:func:`~dfkd_ray.transfer.writer.open_transfer_set`: its rows fit the confidence statistics), then
trains on the rows of the whole set as the generator actors make it. The functions here decide the
order the stream makes shards in, how many training rows the plan counts on, which texts of a
shard training reads, and let the full shards reuse the held-out pass's rows instead of generating
them again.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from dfkd_ray.transfer.requests import Request, is_heldout


def planned_training_rows(shards: Sequence[Sequence[Request]], heldout_fraction: float, include_heldout: bool) -> int:
    """Rows training can get at most: one per request that is trained on (rows are retried until
    each request has one or is given up, so the set never holds more)."""
    return sum(1 for s in shards for r in s if include_heldout or not is_heldout(r, heldout_fraction))


def stream_order(shards: Sequence[Sequence[Request]]) -> list[int]:
    """Shard indices in the order the stream makes them: round-robin over the (teacher, class) of
    each shard's first request, so the first batches already mix classes (shards are cut from a
    teacher-major table: in index order the first minutes of training would see one teacher only)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, shard in enumerate(shards):
        key = (shard[0].teacher, shard[0].teacher_class) if shard else ("", -1)
        groups[key].append(i)
    queues = list(groups.values())
    order: list[int] = []
    for k in range(max((len(q) for q in queues), default=0)):
        order.extend(q[k] for q in queues if k < len(q))
    return order


def training_rows(table: pa.Table, include_heldout: bool) -> pa.Table:
    """The ``text`` and ``teacher`` (the teacher each row was made for) columns of the rows of a shard
    that training reads (held-out rows dropped unless ``include_heldout``)."""
    if not include_heldout:
        table = table.filter(pc.invert(table.column("heldout")))
    return table.select(["text", "teacher"])


class ReplaySource:
    """A transfer source that returns rows made earlier for the same request attempt (same
    ``sample_id`` and seed) and asks ``source`` only for the others.

    Rows depend only on the request (its seed), not on the batch it shares, so a shard made with
    replayed rows equals one made from scratch; the held-out pass's rows are not generated twice.
    """

    def __init__(self, source, rows: Sequence[dict]):
        self.source = source
        self.rows = {(r["sample_id"], int(r["seed"])): r for r in rows}

    def generate(self, requests: list[Request]) -> list[dict]:
        found = [self.rows.get((r.sample_id, r.seed)) for r in requests]
        missing = [r for r, row in zip(requests, found) if row is None]
        made = iter(self.source.generate(missing) if missing else ())
        return [dict(row) if row is not None else next(made) for row in found]
