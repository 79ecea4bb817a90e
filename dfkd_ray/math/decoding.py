"""Teacher-reweighted top-m decoding (StrataNet Eq. 1) as pure functions on tensors.

At step ``t`` the base LM gives ``log p_LM(x | x_<t)`` over its vocabulary ``V``. StrataNet
(section 4.2) keeps the LM's top-``m`` tokens, scores each candidate ``x`` by

    s_t(x) = log p_LM(x | x_<t) + lambda_t * log P_teacher(c | x_<t, x)          (Eq. 1)

and samples ``x_t`` among the candidates with top-``k`` (``k <= m``), a temperature and an optional
nucleus ``p`` (the paper's appendix: ``p = 0.9``, 128 tokens). ``lambda_t = 0`` reduces exactly to
sampling from the LM's top-``k``: :func:`sample_candidates` on the top-``m`` with a zero teacher
term gives, bit for bit, what :func:`sample_top_k` gives on the full logits with the same draws.

Every function here works on logits/log-probabilities ``(B, V)``, candidate scores ``(B, m)`` and
per-row uniforms ``(B,)``; none sees a model or a tokenizer. Both engines run them through one
step, :func:`dfkd_ray.generation.steering.steer_step`. Imports torch only.

Choices the paper leaves open (documented here, configurable in ``SteeredConfig``):

- Candidate order and ties: candidates are ordered by (score descending, token id ascending), so
  which tokens survive a cut at ``m`` or ``k`` never depends on a kernel's tie-breaking.
- The draw: each row has its own stream of uniforms (:func:`row_uniforms`, seeded from the
  request), and the token is chosen by inverse CDF over the kept candidates *in token-id order*.
  A request's output therefore depends only on its own seed, and a last-bit change in a logit
  (from a different batch composition or padding) can change the outcome only when the draw lands
  within that change of a CDF boundary, not whenever two candidates swap rank.
- Schedule: ``constant`` (``lambda_t = lambda``) or ``decay`` (``lambda_t = lambda *
  max(floor, rate**t)``): control strongest on the first tokens, which fix the topic of the rest,
  in the spirit of position-aware weighted decoding (Gu et al. 2022).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Scalar = Union[float, torch.Tensor]

SCHEDULES = ("constant", "decay")


def _real(x: torch.Tensor) -> torch.Tensor:
    """Float32, or float64 when given float64 (a reference run keeps its precision)."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def row_uniforms(seeds: Sequence[int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, n)`` float64 uniforms in ``[0, 1)``: row ``b`` is the stream of a generator seeded with ``seeds[b]``.

    One CPU ``torch.Generator`` per row, never one shared by the batch: a row's draws (and so its
    sample) do not depend on which other rows share its batch, nor on the device.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF), dtype=torch.float64)
            for s in seeds]
    out = torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.float64)
    return out.to(device)


def control_weights(steps: torch.Tensor, strength: torch.Tensor, schedule: str = "constant", *,
                    decay_rate: float = 0.97, floor: float = 0.25) -> torch.Tensor:
    """``lambda_t`` of Eq. 1 for each row.

    Args:
        steps: ``(B,)`` index ``t`` of the token being chosen (0 = first generated token).
        strength: ``(B,)`` the row's control strength ``lambda >= 0``.
        schedule: ``constant``: ``lambda_t = lambda``; ``decay``: ``lambda_t = lambda * max(floor,
            decay_rate**t)``, strongest early (after Gu et al. 2022, position-aware weighted decoding).

    Returns:
        ``(B,)`` float32.
    """
    strength = strength.to(torch.float32)
    if schedule == "constant":
        return strength.clone()
    if schedule == "decay":
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        factor = torch.pow(float(decay_rate), steps.to(torch.float64))  # a number base: no host-to-device copy
        return strength * factor.clamp_min(floor).to(torch.float32)
    raise ValueError(f"unknown lambda schedule {schedule!r}; choose one of {SCHEDULES}")


def select_top_m(logprobs: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's ``m`` most likely tokens per row, ordered by (log-prob descending, token id ascending).

    Args:
        logprobs: ``(B, V)`` ``log p_LM(x | x_<t)`` (or logits: only the order matters here).
        m: candidates per row, ``1 <= m``; ``m >= V`` returns all ``V`` tokens.

    Returns:
        ``values (B, m)`` and ``ids (B, m)`` (int64). Which tokens survive a tie at the cut is fixed
        (lowest ids), whatever the kernel: ``topk`` is used when the cut is untied and a stable full
        sort for rows where it is tied.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    V = logprobs.shape[-1]
    if m >= V or logprobs.device.type != "cpu":  # on an accelerator a full sort is cheap and needs no sync
        values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
        return values[:, :m], ids[:, :m]
    values, ids = torch.topk(logprobs, m, dim=-1, sorted=False)  # (B, m), unordered
    ids, perm = torch.sort(ids, dim=-1)  # id ascending ...
    values = values.gather(-1, perm)
    values, perm = torch.sort(values, dim=-1, descending=True, stable=True)  # ... then value descending
    ids = ids.gather(-1, perm)
    # A tie at the cut: the m-th value is shared with a token outside the selection.
    tied = (logprobs >= values[:, -1:]).sum(-1) > m  # (B,)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(-1)
        v, i = torch.sort(logprobs[rows], dim=-1, descending=True, stable=True)
        values[rows], ids[rows] = v[:, :m], i[:, :m]
    return values, ids


def lm_nucleus(lm_logprobs: torch.Tensor, mass: float) -> torch.Tensor:
    """Which candidates lie in the LM's nucleus of probability ``mass``: the teacher scores only these.

    Eq. 1 scores a fixed ``m`` candidates at every step. Where the LM is sure of the next token (a
    word's continuation, a name) most of the ``m`` carry almost no LM probability, yet each costs a
    teacher forward. Keeping, per row, the smallest set of best candidates whose LM probability
    reaches ``mass`` (at most ``m``, always the first) spends the teacher's work where the LM hesitates.

    Args:
        lm_logprobs: ``(B, m)`` ``log p_LM`` of the candidates over the whole vocabulary, ordered by
            log-prob descending (as :func:`select_top_m` returns them).
        mass: in ``(0, 1]``; ``1`` keeps every candidate (the paper's fixed ``m``).

    Returns:
        ``(B, m)`` bool; column 0 is always True.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if mass >= 1.0:
        return torch.ones(lm_logprobs.shape, dtype=torch.bool, device=lm_logprobs.device)
    probs = _real(lm_logprobs).exp()  # (B, m)
    before = probs.cumsum(-1) - probs  # LM mass of the better-ranked candidates
    return before < mass


def reweight(lm_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, lam: Scalar) -> torch.Tensor:
    """StrataNet Eq. 1 on the candidates: ``log p_LM(x | x_<t) + lambda_t * log P_teacher(c | x_<=t)``.

    Args:
        lm_logprobs: ``(B, m)`` the LM's log-probabilities of the candidates.
        teacher_logprobs: ``(B, m)`` the teacher's log-probability of the target class ``c`` for the
            text with each candidate appended.
        lam: ``lambda_t``, a float or ``(B,)``; must be ``>= 0``.

    Returns:
        ``(B, m)`` float32 (float64 for float64 inputs) scores. A row with ``lambda_t = 0`` gets exactly its LM log-probabilities
        (the teacher term is dropped, not multiplied, so a ``-inf`` teacher value cannot make NaN).
    """
    lm = _real(lm_logprobs)
    if _on_cpu(lam) and bool((torch.as_tensor(lam) < 0).any()):
        raise ValueError("lambda must be >= 0")
    lam = _on(lam, lm.dtype, lm.device)
    lam = lam.reshape(-1, 1) if lam.dim() else lam  # (B, 1) or scalar
    term = torch.where(lam > 0, lam * teacher_logprobs.to(lm.dtype), torch.zeros_like(lm))  # (B, m)
    return lm + term


def _on_cpu(x: Scalar) -> bool:
    """Values are checked when that costs no device synchronisation (floats, CPU tensors); the engines'
    parameters are validated once, where the job's config loads."""
    return not isinstance(x, torch.Tensor) or x.device.type == "cpu"


def _on(x: Scalar, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x`` as a tensor on ``device``. A number becomes a fill, never a copy from the host: on a GPU
    such a copy waits for everything queued before it (the teacher's forwards, every step)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((), float(x), dtype=dtype, device=device)


def _per_row(x: Scalar, B: int, device: torch.device) -> torch.Tensor:
    t = _on(x, torch.float32, device)
    return t.expand(B).reshape(B, 1) if t.dim() == 0 else t.reshape(B, 1)


def sample_candidates(scores: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, *, top_k: int,
                      top_p: Scalar = 1.0, temperature: Scalar = 1.0) -> torch.Tensor:
    """Sample one token per row among scored candidates: temperature, top-``k``, nucleus ``p``, inverse CDF.

    Args:
        scores: ``(B, m)`` candidate scores (Eq. 1, or plain log-probabilities).
        ids: ``(B, m)`` the candidates' token ids (distinct within a row).
        u: ``(B,)`` uniforms in ``[0, 1)``, one per row (see :func:`row_uniforms`).
        top_k: keep the ``k`` best scores (``1 <= k``; ``k >= m`` keeps all).
        top_p: nucleus threshold in ``(0, 1]``, float or ``(B,)``: keep the smallest set of best
            candidates whose probability reaches ``p`` (always at least one).
        temperature: ``> 0``, float or ``(B,)``; divides the scores before the softmax.

    Returns:
        ``(B,)`` int64 chosen token ids. The kept candidates are laid out in token-id order and the
        token is the first whose cumulative probability exceeds ``u`` times their total.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    B, m = scores.shape
    device = scores.device
    if _on_cpu(temperature) and bool((torch.as_tensor(temperature) <= 0).any()):
        raise ValueError("temperature must be > 0")
    if _on_cpu(top_p) and bool(((torch.as_tensor(top_p) <= 0) | (torch.as_tensor(top_p) > 1)).any()):
        raise ValueError("top_p must be in (0, 1]")
    temp = _per_row(temperature, B, device)
    p = _per_row(top_p, B, device)
    z = _real(scores) / temp.to(_real(scores).dtype)  # (B, m)
    z, order = torch.sort(z, dim=-1, descending=True, stable=True)
    k = min(top_k, m)
    z, cand = z[:, :k], ids.gather(-1, order[:, :k])  # (B, k)
    probs = torch.softmax(z, dim=-1)  # (B, k)
    before = probs.cumsum(-1) - probs  # mass of the better-ranked candidates
    probs = torch.where(before < p, probs, torch.zeros_like(probs))  # nucleus; the first always stays
    cand, perm = torch.sort(cand, dim=-1)  # token-id order
    cdf = probs.gather(-1, perm).to(torch.float64).cumsum(-1)  # (B, k)
    thresh = u.to(device=device, dtype=torch.float64).reshape(B, 1) * cdf[:, -1:]
    idx = (cdf <= thresh).sum(-1, keepdim=True)  # first position whose cdf exceeds u * total
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # last kept candidate (guards rounding at u ~ 1)
    return cand.gather(-1, torch.minimum(idx, last)).squeeze(-1)


def sample_top_k(logits: torch.Tensor, u: torch.Tensor, *, top_k: int, top_p: Scalar = 1.0,
                 temperature: Scalar = 1.0) -> torch.Tensor:
    """Plain (unguided) sampling from the LM's top-``k``: the ``lambda = 0`` case of Eq. 1.

    Args:
        logits: ``(B, V)`` the LM's next-token logits.
        u: ``(B,)`` uniforms; ``top_k``, ``top_p``, ``temperature`` as in :func:`sample_candidates`.

    Returns:
        ``(B,)`` int64 token ids.
    """
    logprobs = torch.log_softmax(_real(logits), dim=-1)  # (B, V)
    values, ids = select_top_m(logprobs, top_k)
    return sample_candidates(values, ids, u, top_k=top_k, top_p=top_p, temperature=temperature)
