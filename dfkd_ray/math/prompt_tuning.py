"""DFKD-T3 (arXiv 2311.01689) prompt tuning of the transfer generator, as pure functions on tensors.

The generator is a frozen LM whose hybrid prompt (a commander token and ``P`` trainable soft
vectors) is tuned so that its rewrites of general-domain text become task text for a teacher.
Three pieces of the paper's section 3 are here:

- **Token-level sampling with a stable level** (the paper's token-level diversity regulator). At
  each step ``t`` the LM gives logits ``z_t`` ``(B, V)``; the token is

      x_t = argmax_v ( s * z_t[v] + g_t[v] ),   g_t[v] ~ Gumbel(0, 1)

  where ``s > 0`` is the *stable level*: it scales the LM's logits against the Gumbel noise, so
  ``x_t`` is a draw from ``softmax(s * z_t)`` -- ``s = 1`` is plain sampling from the LM, a larger
  ``s`` is closer to greedy decoding (more stable, fewer distinct n-grams), a smaller one flatter
  (more diverse). The paper compared stable levels 1, 5 and 10 and found the student's accuracy
  falling as the level rose. During tuning the teacher reads the draw's Gumbel-softmax relaxation
  ``softmax((s * z_t + g_t) / tau)`` (:func:`gumbel_softmax`; Jang et al. 2017, ``tau`` the
  relaxation temperature), or the one-hot draw with that relaxation's gradient
  (:func:`straight_through`). At generation time the same distribution is sampled by inverse CDF
  with the request's own uniforms (:func:`stable_sample`), so a request's text depends only on its
  seed.
- **Specificity regulator**: the teacher's cross-entropy toward the target class, per sample
  (:func:`specificity_loss`): each generated text should be confidently of its class.
- **Diversity regulator** (batch level): the entropy of the batch-mean teacher prediction over the
  teacher's classes, maximised (:func:`diversity_loss` is ``log C - H``, 0 for balanced classes),
  so tuning cannot collapse onto the class that is easiest to fool the teacher with.

Plus :func:`distinct_n`, the share of distinct n-grams (Li et al. 2016) used to measure what the
stable level does. Imports torch only.
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F


def gumbel_noise(shape: Sequence[int], generator: torch.Generator, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)``, ``u ~ U(0, 1)`` drawn from ``generator`` (on its device)."""
    u = torch.rand(tuple(shape), generator=generator, device=device or generator.device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def gumbel_softmax(logits: torch.Tensor, gumbel: torch.Tensor, *, stable_level: float,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gumbel draw per row and its softmax relaxation (Jang et al. 2017), the logits scaled by the stable level.

    Args:
        logits: ``(B, V)`` the LM's next-token logits (``-inf`` for tokens that may not be drawn).
        gumbel: ``(B, V)`` standard Gumbel noise (:func:`gumbel_noise`).
        stable_level: ``s > 0``, scales the logits against the noise (higher: closer to argmax).
        temperature: ``tau > 0`` of the relaxation; it never changes the draw.

    Returns:
        ``y_soft (B, V)``: ``softmax((s * logits + g) / tau)``, differentiable in ``logits``; and
        ``x (B,)`` int64: ``argmax(s * logits + g)``, a draw of ``softmax(s * logits)``.
    """
    if not stable_level > 0:
        raise ValueError(f"stable_level must be > 0, got {stable_level}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    perturbed = stable_level * logits.float() + gumbel.float()  # (B, V)
    return torch.softmax(perturbed / temperature, dim=-1), perturbed.argmax(-1)


def straight_through(y_soft: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``one_hot(x) - y_soft.detach() + y_soft`` ``(B, V)``: the one-hot draw in value, the relaxation's
    gradient (the straight-through estimator, Bengio et al. 2013)."""
    y_hard = F.one_hot(index, y_soft.shape[-1]).to(y_soft.dtype)  # (B, V)
    return y_hard - y_soft.detach() + y_soft


def stable_sample(logits: torch.Tensor, u: torch.Tensor, *, stable_level: float) -> torch.Tensor:
    """A draw of ``softmax(s * logits)`` per row by inverse CDF over the vocabulary in token-id order.

    The same distribution as the Gumbel-max draw of :func:`gumbel_softmax`, but
    from one uniform per row, so a request's tokens depend only on its own stream of uniforms
    (:func:`dfkd_ray.math.decoding.row_uniforms`), not on the batch it shares.

    Args:
        logits: ``(B, V)``; ``-inf`` marks tokens that may not be drawn.
        u: ``(B,)`` uniforms in ``[0, 1)``.
        stable_level: ``s > 0``.

    Returns:
        ``(B,)`` int64 token ids.
    """
    if not stable_level > 0:
        raise ValueError(f"stable_level must be > 0, got {stable_level}")
    probs = torch.softmax(stable_level * logits.to(torch.float64), dim=-1)  # (B, V)
    cdf = probs.cumsum(-1)  # (B, V)
    thresh = u.to(device=logits.device, dtype=torch.float64).reshape(-1, 1) * cdf[:, -1:]  # (B, 1)
    index = (cdf <= thresh).sum(-1, keepdim=True)  # first token whose cdf exceeds u * total
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the last token with mass (guards rounding at u ~ 1)
    return torch.minimum(index, last).squeeze(-1)


def specificity_loss(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The specificity regulator: mean teacher cross-entropy toward each sample's target class.

    Args:
        teacher_logits: ``(B, C)`` the teacher's logits on the generated texts.
        targets: ``(B,)`` int64 target classes.
    """
    return F.cross_entropy(teacher_logits.float(), targets)


def diversity_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The batch-level diversity regulator: ``log C - H(p_bar)``, with ``p_bar (C,)`` the batch-mean
    teacher prediction; minimising it maximises the entropy of ``p_bar``, 0 when the batch's
    predictions are spread evenly over the ``C`` classes.

    Args:
        teacher_logits: ``(B, C)``.
    """
    p_bar = torch.softmax(teacher_logits.float(), dim=-1).mean(0)  # (C,)
    entropy = -(p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()
    return math.log(teacher_logits.shape[-1]) - entropy


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams over all n-grams of ``sequences`` (words or token
    ids); 0.0 when there is no n-gram."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
