"""One amalgamation step (StrataNet sections 4.3-5), callable by the Ray Train loop, benchmarks and tests.

Per batch of transfer texts:

1. every teacher runs under ``no_grad`` -> :class:`~dfkd_ray.math.blocks.TeacherOutput` (logits over
   its own labels, ``N`` block features);
2. each teacher's fitted :class:`~dfkd_ray.math.confidence.ConfidenceEstimator` gives ``c_k^b``
   ``(B, N)`` (Eq. 2-4);
3. :class:`Amalgamator` (the trainable part: student + ST-amalg, so that one DDP wrapper covers
   both) computes the amalgamated targets (Eq. 5-6), the block loss (Eq. 7), the KD loss against the
   confidence-weighted union-space teacher distribution, and the total (Eq. 8).

The KD weights of teacher ``k`` come from its confidence at the LAST block, ``c_k^N``: the block that
holds the layers the classifier reads (the paper weights "teacher models" without saying which
block's score; for MSP every block carries the same final-layer score anyway), raised to
``kd_confidence_power`` and normalised (:func:`~dfkd_ray.math.amalgamation.kd_teacher_weights`).

Example (CPU)::

    student = Student.from_pretrained(student_dir, labels=space.names, amalg_dim=cfg.amalg_dim)
    teachers = {n: Teacher.from_pretrained(n, p, num_blocks=student.num_blocks) for n, p in dirs.items()}
    estimators = fit_estimators(teachers, heldout_texts, heldout_classes, cfg=cfg)
    model = Amalgamator.build(student, teachers, space, cfg)
    losses = amalgamation_step(model, texts, teachers=teachers, estimators=estimators)
    losses["loss"].backward()
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.amalgamation import BlockAmalgamation, kd_teacher_weights
from dfkd_ray.math.blocks import TeacherOutput
from dfkd_ray.math.confidence import ConfidenceEstimator
from dfkd_ray.math.losses import block_loss, kd_loss, total_loss, union_target
from dfkd_ray.models.student import Student


class Amalgamator(nn.Module):
    """Student + block fusion module; ``forward`` returns the StrataNet losses.

    Args:
        student: the :class:`Student` (its ``num_blocks`` = teachers' ``N``).
        fusion: :class:`~dfkd_ray.math.amalgamation.BlockAmalgamation` built for the teachers'
            widths in ``teacher_names`` order and ``D`` = ``student.amalg_dim``.
        label_space: the union label space (student's labels must be its names).
        teacher_names: teacher order of every list input.
        alpha, beta, temperature: Eq. 8 weights and the KD temperature.
        kd_power: ``gamma`` of the KD teacher weights ``c_k^gamma / sum_j c_j^gamma``.

    The constructor's defaults are the paper's literal reading (``kd_power`` 1, uncentred block loss);
    :meth:`build` takes the config's, whose defaults were chosen on AG News (``kd_confidence_power`` 64,
    ``center_block_loss`` true; see :class:`~dfkd_ray.config.AmalgamationConfig`).
    """

    def __init__(self, student: Student, fusion: BlockAmalgamation, label_space: UnionLabelSpace,
                 teacher_names: Sequence[str], *, alpha: float = 1.0, beta: float = 1.0, temperature: float = 0.75,
                 train_fusion: bool = True, center_blocks: bool = False, kd_power: float = 1.0):
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
        if temperature <= 0 or alpha < 0 or beta < 0 or kd_power < 0:
            raise ValueError(f"need temperature > 0, alpha >= 0, beta >= 0, kd_power >= 0; got {temperature}, "
                             f"{alpha}, {beta}, {kd_power}")
        self.student, self.fusion = student, fusion
        self.num_labels = label_space.num_labels
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.train_fusion = bool(train_fusion)
        self.center_blocks = bool(center_blocks)
        self.kd_power = float(kd_power)
        if not self.train_fusion:
            fusion.requires_grad_(False)  # fixed targets: no collapse (see forward), and nothing for DDP to sync
        for i, name in enumerate(self.teacher_names):
            self.register_buffer(f"label_index_{i}", torch.tensor(label_space.teacher_to_global[name]), persistent=False)

    @classmethod
    def build(cls, student: Student, teachers: Mapping[str, object], label_space: UnionLabelSpace,
              cfg: Optional[AmalgamationConfig] = None) -> "Amalgamator":
        """From the config: ``teachers`` maps names (in order) to :class:`Teacher` objects or hidden sizes."""
        cfg = cfg or AmalgamationConfig()
        if student.amalg_dim != cfg.amalg_dim:
            raise ValueError(f"student projections have D = {student.amalg_dim}, config amalg_dim = {cfg.amalg_dim}")
        dims = [t if isinstance(t, int) else int(getattr(t, "hidden_size")) for t in teachers.values()]
        fusion = BlockAmalgamation(dims, student.num_blocks, cfg.amalg_dim, cfg.amalg_heads, cfg.fusion,
                                   dropout=cfg.amalg_dropout, share_layer=cfg.share_st_layer).to(student.device)
        return cls(student, fusion, label_space, list(teachers), alpha=cfg.alpha, beta=cfg.beta,
                   temperature=cfg.temperature, train_fusion=cfg.train_fusion,
                   center_blocks=cfg.center_block_loss, kd_power=cfg.kd_confidence_power)

    def label_index(self, i: int) -> torch.Tensor:
        return getattr(self, f"label_index_{i}")

    def kd_weights(self, confidences: Sequence[torch.Tensor]) -> torch.Tensor:
        """K confidences ``(B, N)`` -> ``(B, K)`` KD teacher weights from the last block's ``c_k^N``."""
        return kd_teacher_weights(torch.stack([c[:, -1] for c in confidences], dim=-1), self.kd_power)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                teacher_states: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                confidences: Sequence[torch.Tensor], token_type_ids: Optional[torch.Tensor] = None) -> dict:
        """Losses for one batch.

        Args:
            input_ids, attention_mask, token_type_ids: ``(B, T_s)`` student inputs.
            teacher_states: K tensors ``(B, N, H_k)`` (teacher order of ``teacher_names``).
            teacher_logits: K tensors ``(B, C_k)``.
            confidences: K tensors ``(B, N)`` in ``[0, 1]``.

        Returns:
            ``loss`` (Eq. 8), ``block`` (Eq. 7), ``kd``; detached diagnostics ``agreement`` (share of
            the batch where the student's and the target's argmax agree) and ``target_spread`` (see
            below); all scalars.

        Both sides of Eq. 7 are trainable (student projections and ST-amalg), so a fusion module that
        maps every input to one constant vector is a trivial minimum of ``L_block``; the paper does not
        discuss it. ``target_spread`` = 1 - ||batch mean of the unit targets||, averaged over blocks,
        watches for it: it falls to 0 when the targets collapse.
        """
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
        if not self.train_fusion:
            a = a.detach()
        l_block = block_loss(s.projections, a, center=self.center_blocks)  # Eq. 7
        w = self.kd_weights(confidences)  # (B, K) wbar_k from c_k^N
        p_t = union_target(teacher_logits, [self.label_index(i) for i in range(k)], w, self.num_labels,
                           self.temperature)  # (B, C)
        l_kd = kd_loss(s.logits, p_t, self.temperature)
        loss = total_loss(l_block, l_kd, self.alpha, self.beta)  # Eq. 8
        with torch.no_grad():
            agreement = (s.logits.argmax(-1) == p_t.argmax(-1)).float().mean()
            # 1 - |batch mean of unit targets|, averaged over blocks: 0 when every input gets the same target
            target_spread = 1.0 - F.normalize(a.float(), dim=-1).mean(0).norm(dim=-1).mean()
        return {"loss": loss, "block": l_block, "kd": l_kd, "agreement": agreement, "target_spread": target_spread}


def _texts(batch) -> list[str]:
    if isinstance(batch, Mapping):
        if "text" not in batch:
            raise ValueError(f"batch has no 'text' column (columns: {sorted(batch)})")
        batch = batch["text"]
    texts = [str(t) for t in batch]
    if not texts:
        raise ValueError("empty batch of texts")
    return texts


def run_teachers(teachers: Mapping[str, object], texts: Sequence[str],
                 names: Optional[Sequence[str]] = None) -> dict[str, TeacherOutput]:
    """Every (frozen) teacher on the batch, under ``no_grad``."""
    names = list(names or teachers)
    missing = [n for n in names if n not in teachers]
    if missing:
        raise ValueError(f"no loaded teacher for {missing} (have {list(teachers)})")
    with torch.no_grad():
        return {n: teachers[n](list(texts)) for n in names}


def amalgamation_step(model: nn.Module, batch, *, estimators: Mapping[str, ConfidenceEstimator],
                      teachers: Optional[Mapping[str, object]] = None,
                      teacher_outputs: Optional[Mapping[str, TeacherOutput]] = None) -> dict[str, torch.Tensor]:
    """Losses of one batch: teachers (no grad) -> confidences -> ST-amalg -> Eq. 7 + KD -> Eq. 8.

    Args:
        model: an :class:`Amalgamator`, or one wrapped by DDP (its ``forward`` is what runs, so
            gradients are synchronised).
        batch: texts, or a mapping with a ``text`` column (a Ray Data batch).
        estimators: fitted confidence statistics for every teacher.
        teachers: loaded teachers (``Teacher`` or anything returning ``TeacherOutput`` for texts);
            not needed when ``teacher_outputs`` are given.
        teacher_outputs: the teachers' outputs on this batch, already computed.

    Returns:
        ``loss``, ``block``, ``kd`` (with gradients), the detached diagnostics ``agreement`` and
        ``target_spread`` (:meth:`Amalgamator.forward`), and per teacher ``confidence/<name>`` (mean
        ``c_k^b`` over batch and blocks) and ``kd_weight/<name>`` (mean normalised KD weight).
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
    with torch.no_grad():
        conf = [estimators[n](o).to(device) for n, o in zip(names, outs)]  # K x (B, N)
    losses = model(**net.student.tokenize(texts),
                   teacher_states=[o.block_states.detach().to(device) for o in outs],
                   teacher_logits=[o.logits.detach().to(device) for o in outs], confidences=conf)
    with torch.no_grad():
        w = net.kd_weights(conf)  # (B, K), the weights the KD target used
        for i, n in enumerate(names):
            losses[f"confidence/{n}"] = conf[i].mean()
            losses[f"kd_weight/{n}"] = w[:, i].mean()
    return losses


def collect_outputs(teacher, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's block states ``(M, N, H)`` and logits ``(M, C)`` on ``texts``, in batches, on CPU."""
    if not texts:
        raise ValueError("no texts to run the teacher on")
    states, logits = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out = teacher(list(texts[i:i + batch_size]))
            states.append(out.block_states.float().cpu())
            logits.append(out.logits.float().cpu())
    return torch.cat(states), torch.cat(logits)


def fit_estimators(teachers: Mapping[str, object], texts: Mapping[str, Sequence[str]],
                   classes: Optional[Mapping[str, Sequence[int]]] = None, *, cfg: Optional[AmalgamationConfig] = None,
                   seed: int = 0, batch_size: int = 64) -> dict[str, ConfidenceEstimator]:
    """Fit each teacher's confidence statistics on its held-out pseudo-data ``D_k'`` (section 5.1).

    With ``confidence: rmd`` and ``rmd_background: all_teachers`` (the defaults) each teacher also
    runs on the *other* teachers' held-out texts, and its background Gaussian is fitted on all of
    them (:meth:`ConfidenceEstimator.fit`, ``background_states``).

    Args:
        teachers: loaded teachers by name.
        texts: each teacher's held-out texts (transfer-set rows with ``heldout`` and ``teacher == k``).
        classes: each teacher's class of those texts (``teacher_class``); ``None``, or a teacher
            missing from it, uses the teacher's own argmax.
        cfg: ``confidence``, ``shrinkage``, ``confidence_transform``, ``confidence_center``,
            ``confidence_center_sd``, ``confidence_quantile``, ``calibration_fraction``,
            ``calibration_folds``, ``calibration_repeats``, ``rmd_background`` are read from it
            (defaults when ``None``).
    """
    cfg = cfg or AmalgamationConfig()
    missing = [n for n in teachers if n not in texts]
    if missing:
        raise ValueError(f"no held-out texts for teachers {missing}")
    shared_background = cfg.confidence == "rmd" and cfg.rmd_background == "all_teachers" and len(teachers) > 1
    estimators = {}
    for name, teacher in teachers.items():
        others = [t for n in teachers if n != name for t in texts[n]] if shared_background else []
        states, logits = collect_outputs(teacher, list(texts[name]) + others, batch_size)  # (M + M_o, N, H)
        m = len(texts[name])
        background, states, logits = (states[m:] if others else None), states[:m], logits[:m]
        labels = None
        if classes is not None and name in classes:
            labels = torch.as_tensor(list(classes[name]), dtype=torch.long)
            if labels.shape[0] != states.shape[0]:
                raise ValueError(f"teacher {name!r}: {labels.shape[0]} classes for {states.shape[0]} texts")
        estimators[name] = ConfidenceEstimator.fit(
            states, logits, labels, method=cfg.confidence, shrinkage=cfg.shrinkage,
            transform=cfg.confidence_transform, quantile=cfg.confidence_quantile, center=cfg.confidence_center,
            center_sd=cfg.confidence_center_sd, calibration_fraction=cfg.calibration_fraction,
            calibration_folds=cfg.calibration_folds, calibration_repeats=cfg.calibration_repeats, seed=seed,
            background_states=background)
    return estimators
