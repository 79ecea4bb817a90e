"""Scoring a trial's student without labelled data: the probe set and the data-free proxy.

The **probe set** is a steered transfer set made once per sweep, apart from every trial's: the
sweep's own generation settings (those outside the search), ``tune.proxy_samples_per_class``
requests per (teacher, class), and another seed (:func:`probe_seed`), so none of its texts is a
text any trial trained on. Each probe text was written for one class of one teacher (StrataNet Eq.
1 steers the LM towards it) and kept only where that teacher agrees (``transfer.min_confidence``).

The **proxy** is the student's class-balanced agreement with those classes: for every union label,
the share of the probe texts steered towards it that the student assigns to it, averaged over the
labels. A student earns it by doing both things the amalgamation must do: separate each teacher's
own classes, and tell which teacher's domain a text is from (a text steered towards ``sports`` must
not come out ``space``), on text it never saw. The teachers cannot say the second thing alone, which
is why a student's accuracy differs from the ensemble's; the probe's provenance says it. ``proxy_soft``
is the same average over the student's probability of the class instead of its argmax.

What it cannot see: text a teacher believes is of its class but is not (a steered text can fool
its teacher), and classes real text has and no teacher knows. ``docs/tuning.md`` has the argument
and the measurement of how well it tracks test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dfkd_ray.config import EvalConfig, JobConfig, validate_config
from dfkd_ray.labels import UnionLabelSpace

PROBE_SEED_OFFSET = 104_729
"""Added to the sweep's seed for the probe set's requests (a prime, far from the small seeds a sweep
searches), so no probe request repeats a trial's request."""


def probe_seed(seed: int) -> int:
    return (seed + PROBE_SEED_OFFSET) % (2**31 - 1)


def probe_config(cfg: JobConfig) -> JobConfig:
    """The job config whose transfer set is the sweep's probe set: ``cfg``'s steered settings,
    ``tune.proxy_samples_per_class`` per class, no held-out rows, the probe seed."""
    data = cfg.model_dump(mode="json", exclude={"tune"})
    data["name"] = f"{cfg.name}-probe"
    data["seed"] = probe_seed(cfg.seed)
    data["transfer"].update(source="steered", samples_per_class=cfg.tune.proxy_samples_per_class,
                            heldout_fraction=0.0, class_weights={})
    data["train"]["stream_from_generation"] = False
    return validate_config(data, source="the probe set's config")


@dataclass(frozen=True)
class Probe:
    """The probe texts and, for each, the union label id of the class it was steered towards."""

    texts: list[str]
    labels: list[int]

    @classmethod
    def read(cls, transfer_dir: str | Path) -> "Probe":
        from dfkd_ray.transfer.store import read_transfer_table

        table = read_transfer_table(transfer_dir)
        return cls(texts=table.column("text").to_pylist(), labels=table.column("label").to_pylist())


def class_balanced(hits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the labels present in ``labels`` (M,) of the mean of ``hits`` (M,) on their rows."""
    present = labels.unique()
    return float(torch.stack([hits[labels == g].float().mean() for g in present]).mean())


def union_probabilities(student, texts: list[str], space: UnionLabelSpace, batch_size: int = 64) -> torch.Tensor:
    """The student's class probabilities on ``texts`` over the union label ids, (M, C_union): a
    :class:`~dfkd_ray.models.student.Student` or an :class:`~dfkd_ray.evaluation.ExportedStudent`
    (anything with ``labels`` and ``predict``)."""
    to_union = torch.tensor([space.global_id(n) for n in student.labels])  # student output -> union id
    probs, _ = student.predict(texts, batch_size=batch_size)  # (M, C) over the student's outputs
    return torch.zeros(probs.shape[0], space.num_labels).index_add_(1, to_union, probs.float())  # (M, C_union)


def proxy_from_probabilities(union: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """``proxy`` (class-balanced agreement with the probe's classes) and ``proxy_soft`` (the same over
    the probability of the class) from a student's probabilities ``union`` (M, C_union) on the probe
    texts, whose classes are ``labels`` (M union ids)."""
    target = torch.tensor(labels)  # (M,)
    return {"proxy": class_balanced(union.argmax(-1) == target, target),
            "proxy_soft": class_balanced(union.gather(1, target[:, None]).squeeze(1), target)}


def proxy_scores(student, probe: Probe, space: UnionLabelSpace, batch_size: int = 64) -> dict[str, float]:
    """``proxy`` and ``proxy_soft`` (:func:`proxy_from_probabilities`) of a student on the probe set."""
    return proxy_from_probabilities(union_probabilities(student, probe.texts, space, batch_size), probe.labels)


def read_labelled(labelled: EvalConfig, space: UnionLabelSpace) -> tuple[list[str], list[int]]:
    """Texts and union label ids of a labelled file (``tune.dev`` or ``eval``)."""
    from dfkd_ray.evaluation import load_labelled

    return load_labelled(labelled.path, text_column=labelled.text_column, label_column=labelled.label_column,
                         label_map=labelled.label_map, label_space=space)


@dataclass
class TrialScorer:
    """What a trial reports at the end of every epoch, called on the student by the main Train worker:
    ``proxy`` and ``proxy_soft`` (with a probe set), ``dev_accuracy`` (with ``tune.dev.path``) and
    ``eval_accuracy`` (with ``eval.path``; shown in the results, never ranked by).

    Args:
        cfg: the sweep's config (its teachers' labels, ``tune.dev``, ``eval``).
        probe_dir: the probe set's transfer-set directory, or None when there is none.
    """

    cfg: JobConfig
    probe_dir: Optional[str]
    _read: dict = field(default_factory=dict, init=False, repr=False)  # what was read, once per process

    def __call__(self, student) -> dict[str, float]:
        from dfkd_ray.evaluation import evaluate_student

        space = UnionLabelSpace.from_teachers(self.cfg.teacher_labels())
        scores: dict[str, float] = {}
        if self.probe_dir is not None:
            if "probe" not in self._read:
                self._read["probe"] = Probe.read(self.probe_dir)
            scores.update(proxy_scores(student, self._read["probe"], space, self.cfg.tune.dev.batch_size))
        for name, labelled in (("dev_accuracy", self.cfg.tune.dev), ("eval_accuracy", self.cfg.eval)):
            if labelled.path is not None:
                if name not in self._read:
                    self._read[name] = read_labelled(labelled, space)
                texts, labels = self._read[name]
                scores[name] = evaluate_student(student, texts, labels, space, labelled.batch_size)["accuracy"]
        return scores

