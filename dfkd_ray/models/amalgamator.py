"""One amalgamation step (StrataNet sections 4.3-5), callable by the training step, benchmarks and tests.

Per batch of transfer texts:

1. every teacher runs under ``no_grad`` -> :class:`~dfkd_ray.math.blocks.TeacherOutput` (logits over
   its own labels, ``N`` block features);
2. each teacher's fitted :class:`~dfkd_ray.confidence.ConfidenceEstimator` gives ``c_k^b`` ``(B, N)``
   (Eq. 2-4);
3. :class:`Amalgamator` (the trainable part: student + ST-amalg, so that one DDP wrapper covers
   both) computes the amalgamated targets (Eq. 5-6), the block loss (Eq. 7), the KD loss against the
   confidence-weighted union-space teacher distribution, and the total (Eq. 8).

The KD weights of teacher ``k`` come from its confidence at the LAST block, ``c_k^N``: the block that
holds the layers the classifier reads (the paper weights "teacher models" without saying which
block's score; for MSP every block carries the same final-layer score anyway), raised to
``amalgamation.kd_confidence_power`` and normalised (:func:`~dfkd_ray.math.amalgamation.kd_teacher_weights`).

Example (CPU)::

    student = Student.from_config(cfg.student, labels=space.names, amalg_dim=cfg.amalgamation.amalg_dim)
    teachers = load_teachers(cfg.teachers, num_blocks=student.num_blocks)
    estimators = fit_estimators(teachers, heldout_texts, heldout_classes, cfg.amalgamation, seed=cfg.seed)
    model = Amalgamator.build(student, teachers, space, cfg.amalgamation)
    losses = amalgamation_step(model, texts, teachers=teachers, estimators=estimators)
    losses["loss"].backward()
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.confidence.estimator import teacher_confidences
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.amalgamation import BlockAmalgamation, kd_teacher_weights, with_source_teacher
from dfkd_ray.math.blocks import TeacherOutput
from dfkd_ray.math.losses import block_loss, kd_loss, total_loss, union_target
from dfkd_ray.models.student import Student
from dfkd_ray.models.teacher import run_teachers


class Amalgamator(nn.Module):
    """Student + block fusion module; ``forward`` returns the StrataNet losses and the KD weights.

    Build it with :meth:`build`. The constructor takes an already built ``fusion``
    (:class:`~dfkd_ray.math.amalgamation.BlockAmalgamation` for the teachers' widths in
    ``teacher_names`` order and ``D`` = ``student.amalg_dim``) and reads ``alpha``, ``beta``,
    ``temperature``, ``kd_confidence_power``, ``center_block_loss``, ``center_block_loss_within`` and
    ``train_fusion`` from ``cfg``.
    """

    def __init__(self, student: Student, fusion: BlockAmalgamation, label_space: UnionLabelSpace,
                 teacher_names: Sequence[str], cfg: AmalgamationConfig):
        super().__init__()
        self.teacher_names = list(teacher_names)
        if not self.teacher_names:
            raise ValueError("K = 0 teachers: amalgamation needs at least one teacher")
        missing = [n for n in self.teacher_names if n not in label_space.teacher_to_global]
        if missing:
            raise ValueError(f"teachers {missing} are not in the label space (it has {list(label_space.teachers)})")
        if list(student.labels) != list(label_space.names):
            raise ValueError(f"the student's labels {student.labels} are not the union labels {list(label_space.names)}")
        if len(fusion.teacher_dims) != len(self.teacher_names):
            raise ValueError(f"fusion was built for {len(fusion.teacher_dims)} teachers, got {len(self.teacher_names)}")
        if fusion.num_blocks != student.num_blocks:
            raise ValueError(f"fusion has N = {fusion.num_blocks} blocks, the student {student.num_blocks}")
        if fusion.dim != student.amalg_dim:
            raise ValueError(f"fusion width D = {fusion.dim} differs from the student's projections ({student.amalg_dim})")
        self.student, self.fusion, self.cfg = student, fusion, cfg
        self.num_labels = label_space.num_labels
        if not cfg.train_fusion:
            fusion.requires_grad_(False)  # fixed targets: no collapse (see forward), and nothing for DDP to sync
        for i, name in enumerate(self.teacher_names):
            self.register_buffer(f"label_index_{i}", torch.tensor(label_space.teacher_to_global[name]), persistent=False)

    @classmethod
    def build(cls, student: Student, teachers: Mapping[str, object], label_space: UnionLabelSpace,
              cfg: AmalgamationConfig) -> "Amalgamator":
        """``teachers`` maps names (in order) to :class:`Teacher` objects or hidden sizes."""
        if student.amalg_dim != cfg.amalg_dim:
            raise ValueError(f"student projections have D = {student.amalg_dim}, config amalg_dim = {cfg.amalg_dim}")
        dims = [t if isinstance(t, int) else int(getattr(t, "hidden_size")) for t in teachers.values()]
        fusion = BlockAmalgamation(dims, student.num_blocks, cfg.amalg_dim, heads=cfg.amalg_heads, fusion=cfg.fusion,
                                   dropout=cfg.amalg_dropout, share_layer=cfg.share_st_layer).to(student.device)
        return cls(student, fusion, label_space, list(teachers), cfg)

    def label_index(self, i: int) -> torch.Tensor:
        return getattr(self, f"label_index_{i}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                teacher_states: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                confidences: Sequence[torch.Tensor], token_type_ids: Optional[torch.Tensor] = None,
                source_teachers: Optional[torch.Tensor] = None) -> dict:
        """Losses for one batch.

        Args:
            input_ids, attention_mask, token_type_ids: ``(B, T_s)`` student inputs.
            teacher_states: K tensors ``(B, N, H_k)`` (teacher order of ``teacher_names``).
            teacher_logits: K tensors ``(B, C_k)``.
            confidences: K tensors ``(B, N)`` in ``[0, 1]``.
            source_teachers: ``(B,)`` index of the teacher each row was made for (-1: none); with
                ``kd_source_weight`` > 0 the KD weights give it that share
                (:func:`~dfkd_ray.math.amalgamation.with_source_teacher`).

        Returns:
            ``loss`` (Eq. 8), ``block`` (Eq. 7), ``kd``; ``kd_weights`` ``(B, K)``, the teacher weights
            ``wbar_k`` the KD target used; detached diagnostics ``agreement`` (share of the batch where
            the student's and the target's argmax agree) and ``target_spread`` (see below); all but
            ``kd_weights`` are scalars.

        Both sides of Eq. 7 are trainable (student projections and ST-amalg), so a fusion module that
        maps every input to one constant vector is a trivial minimum of ``L_block``; the paper does not
        discuss it. ``target_spread`` = 1 - ||batch mean of the unit targets||, averaged over blocks,
        watches for it: it falls to 0 when the targets collapse.
        """
        cfg = self.cfg
        k = len(self.teacher_names)
        if not (len(teacher_states) == len(teacher_logits) == len(confidences) == k):
            raise ValueError(f"expected inputs of {k} teachers {self.teacher_names}, got {len(teacher_states)} "
                             f"block states, {len(teacher_logits)} logits, {len(confidences)} confidences")
        for name, h in zip(self.teacher_names, teacher_states):
            if h.ndim == 3 and h.shape[1] != self.student.num_blocks:
                raise ValueError(f"teacher {name!r} gives N = {h.shape[1]} blocks but the student has "
                                 f"{self.student.num_blocks}; load teachers with num_blocks={self.student.num_blocks}")
            if h.shape[0] != input_ids.shape[0]:
                raise ValueError(f"teacher {name!r} has batch size {h.shape[0]}, the student {input_ids.shape[0]}")
        s = self.student(input_ids, attention_mask, token_type_ids)  # logits (B, C), projections (B, N, D)
        a = self.fusion(teacher_states, confidences)  # (B, N, D) amalgamated targets, Eq. 5-6
        if not cfg.train_fusion:
            a = a.detach()
        c_last = torch.stack([c[:, -1] for c in confidences], dim=-1)  # (B, K) c_k^N
        groups = c_last.argmax(-1) if cfg.center_block_loss_within == "confident_teacher" else None  # (B,)
        l_block = block_loss(s.projections, a, center=cfg.center_block_loss, groups=groups)  # Eq. 7
        w = kd_teacher_weights(c_last, cfg.kd_confidence_power)  # (B, K) wbar_k from c_k^N
        if cfg.kd_source_weight > 0:
            if source_teachers is None:
                raise ValueError("amalgamation.kd_source_weight > 0 needs each row's source teacher "
                                 "(source_teachers); set it to 0 for text that was not made for a teacher")
            w = with_source_teacher(w, source_teachers, cfg.kd_source_weight)  # (B, K)
        p_t = union_target(teacher_logits, [self.label_index(i) for i in range(k)], w, self.num_labels,
                           cfg.temperature)  # (B, C)
        l_kd = kd_loss(s.logits, p_t, cfg.temperature)
        loss = total_loss(l_block, l_kd, cfg.alpha, cfg.beta)  # Eq. 8
        with torch.no_grad():
            agreement = (s.logits.argmax(-1) == p_t.argmax(-1)).float().mean()
            # 1 - |batch mean of unit targets|, averaged over blocks: 0 when every input gets the same target
            target_spread = 1.0 - F.normalize(a.float(), dim=-1).mean(0).norm(dim=-1).mean()
        return {"loss": loss, "block": l_block, "kd": l_kd, "kd_weights": w.detach(), "agreement": agreement,
                "target_spread": target_spread}


def _texts(batch) -> list[str]:
    if isinstance(batch, Mapping):
        if "text" not in batch:
            raise ValueError(f"batch has no 'text' column (columns: {sorted(batch)})")
        batch = batch["text"]
    texts = [str(t) for t in batch]
    if not texts:
        raise ValueError("empty batch of texts")
    return texts


def amalgamation_step(model: nn.Module, batch, *, estimators: Mapping[str, object],
                      teachers: Optional[Mapping[str, object]] = None,
                      teacher_outputs: Optional[Mapping[str, TeacherOutput]] = None,
                      student_inputs: Optional[Mapping[str, torch.Tensor]] = None,
                      source_teachers: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Losses of one batch: teachers (no grad) -> confidences -> ST-amalg -> Eq. 7 + KD -> Eq. 8.

    Args:
        model: an :class:`Amalgamator`, or one wrapped by DDP (its ``forward`` is what runs, so
            gradients are synchronised).
        batch: texts, or a mapping with a ``text`` column (a Ray Data batch).
        estimators: every teacher's fitted :class:`~dfkd_ray.confidence.ConfidenceEstimator`.
        teachers: loaded teachers (``Teacher`` or anything returning ``TeacherOutput`` for texts);
            not needed when ``teacher_outputs`` are given.
        teacher_outputs: the teachers' outputs on this batch, already computed.
        student_inputs: the student's inputs for this batch on its device, already tokenized
            (:meth:`~dfkd_ray.models.student.Student.host_inputs`); tokenized here if None.
        source_teachers: ``(B,)`` index of the teacher each row was made for (:meth:`Amalgamator.forward`).

    Returns:
        ``loss``, ``block``, ``kd`` (with gradients), the detached diagnostics ``agreement`` and
        ``target_spread`` (:meth:`Amalgamator.forward`), and per teacher ``confidence/<name>`` (mean
        ``c_k^b`` over batch and blocks) and ``kd_weight/<name>`` (mean KD weight the target used);
        all scalars.
    """
    net = getattr(model, "module", model)
    names = net.teacher_names
    texts = _texts(batch)
    if teacher_outputs is None:
        if teachers is None:
            raise ValueError("give either the loaded teachers or their outputs on this batch")
        teacher_outputs = run_teachers(teachers, texts, names)
    missing = [n for n in names if n not in teacher_outputs or n not in estimators]
    if missing:
        raise ValueError(f"teachers {missing} lack outputs or fitted confidence statistics")
    device = net.student.device
    outs = [teacher_outputs[n] for n in names]
    for n, o in zip(names, outs):
        if o.logits.shape[0] != len(texts):
            raise ValueError(f"teacher {n!r} output has batch size {o.logits.shape[0]} for {len(texts)} texts")
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the statistics keep their precision
        conf = [c.to(device) for c in teacher_confidences(estimators, dict(zip(names, outs)), names,
                                                          one_class=net.cfg.one_class_confidence)]  # K x (B, N)
    if student_inputs is None:
        student_inputs = net.student.tokenize(texts)
    losses = model(**student_inputs,
                   teacher_states=[o.block_states.detach().to(device) for o in outs],
                   teacher_logits=[o.logits.detach().to(device) for o in outs], confidences=conf,
                   source_teachers=None if source_teachers is None else source_teachers.to(device, non_blocking=True))
    w = losses.pop("kd_weights")  # (B, K)
    with torch.no_grad():
        for i, n in enumerate(names):
            losses[f"confidence/{n}"] = conf[i].mean()
            losses[f"kd_weight/{n}"] = w[:, i].mean()
    return losses
