"""The transfer-source interface: given a batch of requests and the loaded teachers, return rows
of the transfer-set schema. A new generation method is a new source, not a new pipeline."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import ClassVar

from dfkd_ray.config import JobConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.models.teacher import Teacher
from dfkd_ray.transfer.requests import Request, is_heldout


class TransferSource(ABC):
    """Makes transfer texts for requests; the base class labels them with the teachers.

    Subclasses set ``name`` and ``targeted`` and implement :meth:`texts`. A *targeted* source
    writes text for the request's class (``teacher_class`` is the request's; ``confidence`` the
    teacher's probability for it). An *untargeted* source's texts are labelled by the request's
    teacher (``teacher_class`` is its prediction).
    """

    name: ClassVar[str]
    targeted: ClassVar[bool]

    @classmethod
    def builds_engine_first(cls, config: JobConfig) -> bool:
        """True when the source must build its engine before any teacher is loaded (vLLM sizes its
        KV cache from the free GPU memory): callers then pass ``teachers=None`` and the source
        loads them after its engine."""
        return False

    def __init__(self, config: JobConfig, teachers: dict[str, Teacher], label_space: UnionLabelSpace):
        self.config = config
        self.teachers = teachers
        self.label_space = label_space

    @abstractmethod
    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        """One ``(text, per-row parameters)`` per request, in order."""

    def generate(self, requests: list[Request]) -> list[dict]:
        """Rows of :data:`~dfkd_ray.transfer.schema.TRANSFER_SCHEMA`, one per request, in order."""
        unknown = sorted({r.teacher for r in requests} - set(self.teachers))
        if unknown:
            raise KeyError(f"requests name teachers that are not loaded: {unknown}; loaded: {sorted(self.teachers)}")
        made = self.texts(requests)
        if len(made) != len(requests):
            raise RuntimeError(f"source {self.name} returned {len(made)} texts for {len(requests)} requests")
        by_teacher: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_teacher[r.teacher].append(i)
        rows: list[dict | None] = [None] * len(requests)
        heldout_fraction = self.config.transfer.heldout_fraction
        for name, idx in by_teacher.items():
            teacher = self.teachers[name]
            texts = [made[i][0] for i in idx]
            probs, pred = teacher.predict(texts)
            counts = teacher.count_tokens(texts)
            for j, i in enumerate(idx):
                r = requests[i]
                c = r.teacher_class if self.targeted else int(pred[j])
                g = self.label_space.teacher_to_global[name][c]
                rows[i] = {
                    "sample_id": r.sample_id, "text": texts[j], "label": g, "label_name": self.label_space.names[g],
                    "teacher": name, "teacher_class": c, "source": self.name,
                    "source_params": json.dumps(made[i][1], sort_keys=True),
                    "confidence": float(probs[j, c]), "num_tokens": counts[j], "seed": r.seed,
                    "heldout": is_heldout(r, heldout_fraction),
                }
        return rows  # type: ignore[return-value]
