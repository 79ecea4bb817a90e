"""AS-DFD (Ma et al., EMNLP 2020): pseudo-embeddings with alignment constraints and the losses of
Plug & Play Embedding Guessing and of the adversarial self-supervised module.

A pseudo-sample is a sequence ``e`` of ``l`` vectors in the space of the teacher's embedding-layer
outputs (Eq. 1, ``e = EmbeddingLayer(x)``; ``d`` wide), crafted instead of text (section 3.1):

- :func:`initial_content`: the free positions start as draws of ``N(mu, sigma^2)`` and each sample
  gets a visible length ``L_i`` uniform in ``[min_length, l]``;
- :func:`align`: the alignment constraints: ``e_[CLS]`` at position 0, ``e_[SEP]`` at ``L_i - 1``,
  the tail from ``L_i`` on masked out (padding, attention mask 0), so a batch covers many lengths;
  only the positions between them (the *content*) are ever updated;
- :func:`input_loss` (Eq. 2): the teacher's cross-entropy toward a random target class, which
  the construction steps lower;
- :func:`mask_positions`, :func:`mask_embeddings`, :func:`masked_embedding_loss` (Eq. 3):
  one content position per sample is masked and the student predicts its normalised embedding
  through a linear head ``W``; the construction steps raise ``L_MASK``, distillation lowers it;
- :func:`cls_distance_loss` (Eq. 5): ``L_PT``, the distance between the teacher's and the
  student's normalised last-layer [CLS] states; ``L_KD = L_KL + alpha L_PT`` (Eq. 6).

Losses are means over the batch (the paper writes sums over the batch ``E``; the ratio of the
terms is the same), except :func:`input_loss`, which sums, so that each pseudo-sample's gradient
does not depend on how many others share its batch. Pure torch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def initial_content(generators: Sequence[torch.Generator], length: int, dim: int, *, mean: float, sigma: float,
                    min_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian starting points and visible lengths, one generator per pseudo-sample (so a sample
    starts the same whichever batch or worker makes it).

    Args:
        generators: ``B`` CPU generators.
        length: ``l``, positions per sample ([CLS] and [SEP] included).
        dim: ``d``, the input-embedding width.
        mean, sigma: ``mu`` and ``sigma`` of ``N(mu, sigma^2)``; ``sigma > 0``.
        min_length: the shortest visible length, ``3 <= min_length <= l`` ([CLS], one content
            position, [SEP]).

    Returns:
        ``content`` ``(B, l, d)`` float32 on the CPU and ``lengths`` ``(B,)`` long: the visible
        length ``L_i`` of each sample.
    """
    if not 3 <= min_length <= length:
        raise ValueError(f"need 3 <= min_length <= length, got min_length {min_length} and length {length}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not generators:
        raise ValueError("no generators: a batch needs at least one pseudo-sample")
    content = torch.stack([torch.randn(length, dim, generator=g) for g in generators]) * sigma + mean  # (B, l, d)
    lengths = torch.stack([torch.randint(min_length, length + 1, (), generator=g) for g in generators])  # (B,)
    return content, lengths


def content_positions(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, l)`` bool: the positions between [CLS] (0) and [SEP] (``L_i - 1``), the ones crafted."""
    pos = torch.arange(length, device=lengths.device)  # (l,)
    return (pos >= 1) & (pos < (lengths - 1).unsqueeze(1))  # (B, l)


def align(content: torch.Tensor, lengths: torch.Tensor, cls: torch.Tensor, sep: torch.Tensor,
          pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment constraints of section 3.1 applied to ``content``.

    Args:
        content: ``(B, l, d)``; only its content positions are used (gradients reach only them).
        lengths: ``(B,)`` visible lengths ``L_i``, ``3 <= L_i <= l``.
        cls: ``(d,)`` ``e_[CLS]``, placed at position 0.
        sep, pad: ``(l, d)`` ``e_[SEP]`` and the padding embedding at each position (an embedding
            layer adds a position embedding), placed at ``L_i - 1`` and from ``L_i`` on.

    Returns:
        ``e`` ``(B, l, d)``: [CLS] at 0, the content, [SEP] at ``L_i - 1``, padding after it; and
        the attention mask ``(B, l)`` long (1 up to ``L_i - 1``, 0 on the masked tail).
    """
    b, l, d = content.shape
    if lengths.shape != (b,) or (lengths < 3).any() or (lengths > l).any():
        raise ValueError(f"lengths must be (B,) = ({b},) in [3, {l}], got {lengths.tolist()}")
    if cls.shape != (d,) or sep.shape != (l, d) or pad.shape != (l, d):
        raise ValueError(f"cls must be (d,) = ({d},), sep and pad (l, d) = ({l}, {d}); got {tuple(cls.shape)}, "
                         f"{tuple(sep.shape)}, {tuple(pad.shape)}")
    pos = torch.arange(l, device=content.device)  # (l,)
    free = content_positions(lengths, l).unsqueeze(-1)  # (B, l, 1)
    is_cls = (pos == 0).view(1, l, 1)  # (1, l, 1)
    is_sep = (pos.unsqueeze(0) == (lengths - 1).unsqueeze(1)).unsqueeze(-1)  # (B, l, 1)
    dtype = content.dtype
    fixed = torch.where(is_sep, sep.to(dtype), torch.where(is_cls, cls.to(dtype), pad.to(dtype)))  # (B, l, d)
    e = torch.where(free, content, fixed)  # (B, l, d)
    attention_mask = (pos.unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, l)
    return e, attention_mask


def input_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 2, ``L_INPUT = sum_e CE(T'(e), y_hat)``: the teacher's cross-entropy toward each sample's
    target class, summed over the samples. ``logits`` (B, C_k), ``targets`` (B,) -> scalar."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def mask_positions(lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One content position per sample, uniform in ``[1, L_i - 2]``: ``(B,)`` long on ``lengths``' device."""
    span = (lengths - 2).clamp_min(1).cpu()  # (B,) content positions per sample
    u = torch.rand(lengths.shape, generator=generator)  # (B,)
    return (1 + (u * span).long().clamp_max(span - 1)).to(lengths.device)


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states[b, positions[b]]``: ``(B, l, H)``, ``(B,)`` -> ``(B, H)``."""
    index = positions.view(-1, 1, 1).expand(-1, 1, states.shape[-1])  # (B, 1, H)
    return states.gather(1, index).squeeze(1)


def mask_embeddings(e: torch.Tensor, positions: torch.Tensor, mask_table: torch.Tensor) -> torch.Tensor:
    """``e^mask``: ``e`` (B, l, d) with position ``i = positions[b]`` of each sample replaced by
    ``mask_table[i]`` (``mask_table``: (l, d), the [MASK] embedding at each position)."""
    hit = (torch.arange(e.shape[1], device=e.device).unsqueeze(0) == positions.unsqueeze(1)).unsqueeze(-1)  # (B, l, 1)
    return torch.where(hit, mask_table.to(e.dtype).unsqueeze(0), e)  # (B, l, d)


def masked_embedding_loss(masked: torch.Tensor, predicted: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 3, ``L_MASK = || e_i / ||e_i|| - W h_i / ||W h_i|| ||^2``, mean over the batch.

    Args:
        masked: ``(B, d)`` the masked embeddings ``e_i``.
        predicted: ``(B, d)`` the student's prediction ``W h_i``.

    Returns:
        Scalar in ``[0, 4]``.
    """
    if masked.ndim != 2 or masked.shape != predicted.shape:
        raise ValueError(f"masked embeddings and predictions must both be (B, d), got {tuple(masked.shape)} "
                         f"and {tuple(predicted.shape)}")
    return _unit_distance(masked, predicted, eps)


def cls_distance_loss(teacher_cls: torch.Tensor, student_cls: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5, ``L_PT = || h_T / ||h_T|| - h_S / ||h_S|| ||^2`` over the last-layer [CLS] states,
    mean over the batch. ``(B, H)``, ``(B, H)`` -> scalar in ``[0, 4]``; gradients reach the student's side."""
    if teacher_cls.ndim != 2 or teacher_cls.shape != student_cls.shape:
        raise ValueError(f"teacher and student [CLS] states must both be (B, H) of one width, got "
                         f"{tuple(teacher_cls.shape)} and {tuple(student_cls.shape)}")
    return _unit_distance(teacher_cls, student_cls, eps)


def _unit_distance(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over the batch of ``|| a / ||a|| - b / ||b|| ||^2``. ``(B, d)``, ``(B, d)`` -> scalar in ``[0, 4]``."""
    u = F.normalize(a.float(), dim=-1, eps=eps)  # (B, d)
    v = F.normalize(b.float(), dim=-1, eps=eps)  # (B, d)
    return (u - v).pow(2).sum(-1).mean()
