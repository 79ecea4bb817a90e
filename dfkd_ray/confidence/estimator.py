"""One teacher's fitted confidence statistics, called on that teacher's outputs (StrataNet Eq. 2-4).

``estimator(teacher_output)`` -> ``(B, N)`` confidences ``c_k^b`` in ``[0, 1]``: the OOD score of
every block (:mod:`dfkd_ray.math.confidence`) mapped through the block's held-out calibration.
Built by :func:`~dfkd_ray.confidence.fitting.fit_estimator`, saved and loaded by
:mod:`dfkd_ray.confidence.persistence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from dfkd_ray.math.blocks import TeacherOutput
from dfkd_ray.math.confidence import block_ood_scores, eliminate_one_class, msp_scores, scores_to_confidence


@dataclass(frozen=True, eq=False)
class ConfidenceEstimator:
    """Fitted per-block OOD statistics of ONE teacher.

    Attributes:
        method: ``rmd`` | ``md`` | ``msp`` (``amalgamation.confidence``).
        transform: ``logistic`` | ``ecdf`` | ``contrast`` (``amalgamation.confidence_transform``).
        num_blocks: ``N`` the statistics were fitted for (1 for ``msp``: one score, broadcast).
        num_classes: ``C_k``, the teacher's classes.
        hidden_size: ``H_k`` (0 for ``msp``).
        tensors: ``means`` (N, C, H), ``present`` (C,), ``precision`` (N, H, H),
            ``bg_mean`` (N, H), ``bg_precision`` (N, H, H) [rmd/md only]; ``calib_scores`` (N, M)
            sorted, ``calib_center`` (N,) ``t_b``, ``calib_scale`` (N,) ``tau_b`` [all methods];
            ``other_scores`` (N, M_o) sorted out-of-fit scores of the other teachers' held-out rows
            [contrast].
        meta: JSON-able facts about the fit (settings, sample counts, seed; ``contrast_sharpness``).
    """

    method: str
    transform: str
    num_blocks: int
    num_classes: int
    hidden_size: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    meta: dict = field(default_factory=dict)

    def _check_inputs(self, block_states: torch.Tensor, logits: torch.Tensor) -> None:
        if block_states.ndim != 3 or logits.ndim != 2 or block_states.shape[0] != logits.shape[0]:
            raise ValueError(f"expected block_states (B, N, H) and logits (B, C) with one B, got "
                             f"{tuple(block_states.shape)} and {tuple(logits.shape)}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"estimator was fitted for {self.num_classes} classes, logits have {logits.shape[1]}")
        if self.method != "msp":
            if block_states.shape[1] != self.num_blocks:
                raise ValueError(f"estimator was fitted for N = {self.num_blocks} blocks, got {block_states.shape[1]}")
            if block_states.shape[2] != self.hidden_size:
                raise ValueError(f"estimator was fitted for hidden size {self.hidden_size}, got {block_states.shape[2]}")

    def separation(self) -> list[float] | None:
        """Per block, how well the statistics tell this teacher's held-out pseudo-text from the other
        teachers': the AUROC of the out-of-fit scores (``other_scores`` against ``calib_scores``; 1 =
        always, 0.5 = chance). It needs no labels. ``None`` without ``other_scores`` (transforms other
        than ``contrast``, or one teacher)."""
        if "other_scores" not in self.tensors:
            return None
        from dfkd_ray.evaluation import auroc

        own, other = self.tensors["calib_scores"], self.tensors["other_scores"]  # (N, M), (N, M_o)
        return [round(auroc(own[b], other[b]), 4) for b in range(own.shape[0])]  # higher score = more OOD

    def raw_scores(self, block_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`scores` without the shape checks (fitting calls it on its own slices)."""
        if self.method == "msp":
            return msp_scores(logits)  # (B, 1)
        z = block_states.to(self.tensors["means"].device, torch.float64)  # (B, N, H)
        return block_ood_scores(z, self.tensors, relative=self.method == "rmd")  # (B, N)

    def scores(self, block_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Raw OOD scores ``s`` (Eq. 4; higher = more OOD), float64 ``(B, N)`` (``(B, 1)`` for msp)."""
        self._check_inputs(block_states, logits)
        return self.raw_scores(block_states, logits)

    def confidence(self, block_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """In-distribution confidence ``c_k^b`` in ``[0, 1]``.

        Args:
            block_states: ``(B, N, H_k)``; for ``msp`` only ``N`` is read.
            logits: ``(B, C_k)``.

        Returns:
            ``(B, N)`` float32 on ``block_states``'s device (msp: the final-layer score on every block).
        """
        self._check_inputs(block_states, logits)
        t = self.tensors
        with torch.no_grad():
            s = self.raw_scores(block_states, logits).to(t["calib_scores"].device)  # (B, N) or (B, 1)
            conf = scores_to_confidence(s, t["calib_scores"], t["calib_center"], t["calib_scale"], self.transform,
                                        sharpness=self.meta.get("contrast_sharpness"))
        if self.method == "msp":
            conf = conf.expand(-1, block_states.shape[1])  # (B, N)
        return conf.to(block_states.device).contiguous()

    def __call__(self, output: TeacherOutput) -> torch.Tensor:
        """``(B, N)`` confidences for one batch of this teacher's :class:`TeacherOutput`."""
        return self.confidence(output.block_states, output.logits)

    def to(self, device: torch.device | str) -> "ConfidenceEstimator":
        return replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})


def teacher_confidences(estimators: Mapping[str, ConfidenceEstimator], outputs: Mapping[str, TeacherOutput],
                        names: Sequence[str], *, one_class: str) -> list[torch.Tensor]:
    """Every teacher's ``(B, N)`` confidences on one batch, in ``names`` order, as the distillation uses
    them: each estimator on its teacher's outputs, then ``amalgamation.one_class_confidence``
    (``elimination``: a one-class teacher's confidence times what the teachers of several classes leave
    unclaimed, :func:`~dfkd_ray.math.confidence.eliminate_one_class`; ``own``: its own statistics)."""
    conf = [estimators[n](outputs[n]) for n in names]  # K x (B, N)
    return one_class_rule(conf, [estimators[n].num_classes for n in names], one_class)


def one_class_rule(confidences: list[torch.Tensor], num_classes: Sequence[int], one_class: str) -> list[torch.Tensor]:
    """``amalgamation.one_class_confidence`` applied to K teachers' confidences (any ``(B, ...)`` shape)."""
    if one_class == "elimination":
        return eliminate_one_class(confidences, list(num_classes))
    if one_class != "own":
        raise ValueError(f"unknown one_class_confidence {one_class!r}; choose elimination or own")
    return list(confidences)
