"""StrataNet training objectives (section 5): block L2 loss (Eq. 7), union-space KD loss, total (Eq. 8).

- Eq. 7, block loss: ``L_block = mean_batch sum_b || s^b/||s^b|| - a^b/||a^b|| ||_2^2`` between the
  student's projected block representation ``s^b`` and the amalgamated target ``a^b``
  (:mod:`dfkd_ray.math.amalgamation`). Each term lies in ``[0, 4]``; blocks are summed as in the
  paper's sum over blocks, the batch is averaged.
- KD loss: ``L_kd = T^2 KL(p_T || softmax(z_s / T))`` against the confidence-weighted combination
  ``p_T`` of the teachers over the union label space (:func:`union_target`). The ``T^2`` factor
  (Hinton et al. 2015) keeps gradient magnitudes comparable across temperatures; the paper does not
  say whether it uses one.
- Eq. 8: ``L = alpha L_block + beta L_kd``.

How teachers are placed into the union label space (the paper only says "confidence weighted
combination"): teacher ``k``'s tempered softmax over its OWN ``C_k`` labels, ``softmax(z_k / T)``,
is scattered to its global ids (``UnionLabelSpace.teacher_to_global``); a class the teacher does not
know gets probability 0 from it, so it never votes against classes outside its expertise (the
paper's single-teacher baseline also assigns 0 to such classes). The per-teacher distributions are
mixed with weights ``wbar_k`` from each sample's confidences (``c_k^gamma / sum_j c_j^gamma``,
:func:`~dfkd_ray.math.amalgamation.kd_teacher_weights`; uniform if all are 0), so ``p_T`` sums to 1
and a label shared by several teachers collects mass from each of them.
Pure torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dfkd_ray.math.amalgamation import normalized_weights, values_checkable


def block_loss(student: torch.Tensor, target: torch.Tensor, eps: float = 1e-8, *, center: bool = False,
               groups: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 7: squared L2 distance between L2-normalised student projections and amalgamated targets.

    Args:
        student: ``(B, N, D)`` student block projections ``s^b``.
        target: ``(B, N, D)`` amalgamated targets ``a^b``.
        eps: guards the normalisation of zero vectors.
        center: subtract each side's batch mean (per block) before normalising, so only the
            input-dependent part of the targets is matched (needs ``B >= 2``; not in the paper).
        groups: ``(B,)`` integer group of each row; with ``center``, each row has its own group's mean
            subtracted instead of the batch's (a row alone in its group is matched as zero).

    Returns:
        Scalar: sum over the ``N`` blocks, mean over the batch. Gradients reach both inputs.
    """
    if student.ndim != 3 or student.shape != target.shape:
        raise ValueError(f"student projections and targets must both be (B, N, D), got "
                         f"{tuple(student.shape)} and {tuple(target.shape)}")
    if groups is not None and tuple(groups.shape) != (student.shape[0],):
        raise ValueError(f"groups must be (B,) = ({student.shape[0]},), got {tuple(groups.shape)}")
    student, target = student.float(), target.float()
    if center:
        if student.shape[0] < 2:
            raise ValueError("a centred block loss needs a batch of at least 2")
        if groups is None:
            student, target = student - student.mean(0), target - target.mean(0)  # (B, N, D)
        else:
            student, target = _group_centered(student, groups), _group_centered(target, groups)  # (B, N, D)
    s = F.normalize(student, dim=-1, eps=eps)  # (B, N, D)
    a = F.normalize(target, dim=-1, eps=eps)  # (B, N, D)
    return (s - a).pow(2).sum(-1).sum(-1).mean()


def _group_centered(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, N, D)`` minus the mean of the rows of its group (``groups`` ``(B,)``), without asking
    the device how many groups there are (no host synchronisation in the training step)."""
    same = (groups[:, None] == groups[None, :]).to(x.dtype)  # (B, B) 1 where rows i and j share a group
    means = torch.einsum("ij,jnd->ind", same / same.sum(1, keepdim=True), x)  # (B, N, D)
    return x - means


def union_target(teacher_logits: Sequence[torch.Tensor], label_index: Sequence[torch.Tensor],
                 weights: torch.Tensor, num_labels: int, temperature: float = 1.0) -> torch.Tensor:
    """The confidence-weighted teacher distribution over the union label space.

    ``p_T = sum_k wbar_k scatter_k(softmax(z_k / T))``, with ``wbar_k = w_k / sum_j w_j``.

    Args:
        teacher_logits: K tensors ``(B, C_k)``, each teacher's logits over its own labels.
        label_index: K long tensors ``(C_k,)``, teacher ``k``'s class ``c`` -> global id.
        weights: ``(B, K)`` non-negative teacher weights (confidences); normalised per sample.
        num_labels: ``C``, the size of the union label space.
        temperature: ``T > 0``.

    Returns:
        ``(B, C)`` float32 probabilities; each row sums to 1. Classes unknown to a teacher get 0
        from it.
    """
    k = len(teacher_logits)
    if k == 0:
        raise ValueError("K = 0 teachers: no teacher logits to combine")
    if len(label_index) != k:
        raise ValueError(f"got logits of {k} teachers but label indices of {len(label_index)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bsz = teacher_logits[0].shape[0] if teacher_logits[0].ndim == 2 else None
    if weights.shape != (bsz, k):
        raise ValueError(f"weights must be (B, K) = ({bsz}, {k}), got {tuple(weights.shape)}")
    if values_checkable(weights) and (not torch.isfinite(weights).all() or (weights < 0).any()):
        raise ValueError("teacher weights must be finite and non-negative")
    w = normalized_weights(weights.float(), dim=-1)  # (B, K) wbar_k
    target = weights.new_zeros(bsz, num_labels, dtype=torch.float32)  # (B, C)
    for i, (z, idx) in enumerate(zip(teacher_logits, label_index)):
        if z.ndim != 2 or z.shape[0] != bsz:
            raise ValueError(f"teacher {i}: logits must be (B, C_k) with B = {bsz}, got {tuple(z.shape)}")
        idx = idx.to(z.device, torch.long)
        if idx.shape != (z.shape[1],):
            raise ValueError(f"teacher {i}: label index has {tuple(idx.shape)} entries for {z.shape[1]} logits")
        if values_checkable(idx):
            if idx.numel() and (idx.min() < 0 or idx.max() >= num_labels):
                raise ValueError(f"teacher {i}: global label ids must lie in [0, {num_labels}), got {idx.tolist()}")
            if idx.unique().numel() != idx.numel():
                raise ValueError(f"teacher {i}: two classes map to one global label: {idx.tolist()}")
        p = F.softmax(z.float() / temperature, dim=-1)  # (B, C_k)
        target = target.index_add(1, idx, w[:, i:i + 1] * p)  # (B, C); unknown classes get 0 from teacher i
    return target


def concat_target(teacher_logits: Sequence[torch.Tensor], label_index: Sequence[torch.Tensor], num_labels: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """The vanilla amalgamation target: one softmax over the concatenated teacher logits.

    ``p = softmax([z_1; ...; z_K] / T)`` scattered to global ids (a label two teachers share sums
    both entries). This is the "ensemble" of the papers' baselines (StrataNet Table 3, vanilla KD to
    the teachers' combined output): no confidence, no block features.

    Args:
        teacher_logits: K tensors ``(B, C_k)``.
        label_index: K long tensors ``(C_k,)``, class -> global id.
        num_labels: ``C``.
        temperature: ``T > 0``.

    Returns:
        ``(B, C)`` float32 probabilities.
    """
    if len(teacher_logits) == 0 or len(teacher_logits) != len(label_index):
        raise ValueError(f"need logits and label indices of the same K >= 1 teachers, got {len(teacher_logits)} "
                         f"and {len(label_index)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = torch.cat([t.float() for t in teacher_logits], dim=-1)  # (B, sum_k C_k)
    idx = torch.cat([i.to(z.device, torch.long) for i in label_index])  # (sum_k C_k,)
    if idx.shape[0] != z.shape[1] or (values_checkable(idx) and (idx.min() < 0 or idx.max() >= num_labels)):
        raise ValueError(f"label indices {idx.tolist()} do not fit {z.shape[1]} logits over {num_labels} labels")
    p = F.softmax(z / temperature, dim=-1)  # (B, sum_k C_k)
    return z.new_zeros(z.shape[0], num_labels).index_add(1, idx, p)  # (B, C)


def kd_loss(student_logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(target || softmax(z_s / T))``, mean over the batch.

    Args:
        student_logits: ``(B, C)`` ``z_s`` over the union labels.
        target: ``(B, C)`` probabilities (rows sum to 1), e.g. from :func:`union_target`; zeros allowed.
        temperature: ``T > 0``.

    Returns:
        Scalar, ``>= 0``; 0 when ``softmax(z_s / T)`` equals ``target``.
    """
    if student_logits.ndim != 2 or student_logits.shape != target.shape:
        raise ValueError(f"student logits and target must both be (B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(target.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    p = target.float()
    kl = torch.xlogy(p, p) - p * log_q  # (B, C); 0 log 0 = 0
    return kl.sum(-1).mean() * temperature ** 2


def total_loss(l_block: torch.Tensor, l_kd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 8: ``L = alpha L_block + beta L_kd``."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
    return alpha * l_block + beta * l_kd
