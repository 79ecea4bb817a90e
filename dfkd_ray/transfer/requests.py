"""The requests table: what every transfer source is asked to make.

For each teacher and each of its classes, ``samples_per_class`` requests (times the class's
weight from ``transfer.class_weights``), each with a deterministic seed derived from the job
seed and the request's identity, so a request gives the same text whichever worker, batch or
rerun makes it. Pure Python.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Sequence

from dfkd_ray.labels import UnionLabelSpace, normalize_label


@dataclass(frozen=True)
class Request:
    teacher: str
    teacher_class: int
    label: int
    label_name: str
    index: int
    seed: int
    ordinal: int = 0
    """Position in the full requests table (untargeted sources use it to spread over their pool)."""
    attempt: int = 0
    """0 for the first try; retries of a rejected request count up (and carry a new seed)."""

    @property
    def sample_id(self) -> str:
        return f"{self.teacher}/{self.teacher_class}/{self.index}"


def request_seed(job_seed: int, teacher: str, teacher_class: int, index: int) -> int:
    """A 63-bit seed that depends only on the request's identity."""
    digest = hashlib.blake2b(f"{job_seed}|{teacher}|{teacher_class}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_requests(teacher_labels: dict[str, list[str]], label_space: UnionLabelSpace, *, samples_per_class: int,
                   job_seed: int, class_weights: dict[str, float] | None = None) -> list[Request]:
    """All requests, teacher-major then class then index (a fixed order shards are cut from)."""
    weights = {normalize_label(k): v for k, v in (class_weights or {}).items()}
    requests = []
    for teacher, labels in teacher_labels.items():
        for c, name in enumerate(labels):
            n = round(samples_per_class * weights.get(normalize_label(name), 1.0))
            g = label_space.teacher_to_global[teacher][c]
            base = len(requests)
            requests.extend([Request(teacher, c, g, label_space.names[g], i, request_seed(job_seed, teacher, c, i),
                                     ordinal=base + i) for i in range(n)])
    return requests


def is_heldout(request: Request, heldout_fraction: float) -> bool:
    """Deterministic per-request split for fitting confidence statistics (StrataNet 4.4.1).

    Depends on the request's identity only, not on the seed of the attempt that made the row.
    """
    digest = hashlib.blake2b(request.sample_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 10_000 < heldout_fraction * 10_000


def heldout_part(shard: Sequence[Request], heldout_fraction: float) -> list[Request]:
    """The requests of a shard whose rows are held out for fitting confidence statistics."""
    return [r for r in shard if is_heldout(r, heldout_fraction)]


def retry_request(request: Request, attempt: int) -> Request:
    """The same request with the seed of its ``attempt``-th retry (attempt 0 is the request itself)."""
    if attempt == 0:
        return request
    return replace(request, seed=request_seed(request.seed, request.teacher, request.teacher_class, attempt),
                   attempt=attempt)
