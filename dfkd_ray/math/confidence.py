"""Teacher-specific OOD scores per block and their calibration to confidences (StrataNet section 4.4, Eq. 2-4).

For one block ``b`` of teacher ``k`` (feature ``z = h_k^b``, :mod:`dfkd_ray.math.blocks`), fitted on
the teacher's held-out pseudo-data ``D_k'``:

- Eq. 2, Mahalanobis distance to class ``c`` with a covariance shared by the classes:
  ``MD_c(z) = (z - mu_c)^T Sigma^-1 (z - mu_c)``.
- Eq. 3, Relative Mahalanobis distance (Ren et al. 2021): ``RMD_c(z) = MD_c(z) - MD_0(z)``, where
  ``MD_0`` is the distance to one background Gaussian ``N(mu_0, Sigma_0)``.
- Eq. 4, OOD score ``s(z) = min_c RMD_c(z)``; higher = more OOD. Ablations (section 7.1.1):
  ``min_c MD_c(z)`` and ``-max softmax(logits)`` (MSP).

Choices the paper leaves open:

- Fitting is in float64; both covariances are shrunk toward a scaled identity,
  ``(1 - lam) Sigma + lam (tr(Sigma)/H) I``, and eigenvalues are floored at ``1e-6 tr(Sigma_0)/H``,
  so fewer samples than dimensions still give a finite, positive-definite precision.
- Classes with no fitting sample are left out of the ``min_c``.
- Score -> confidence ``c in [0, 1]`` (the paper says only that a higher OOD score gives a lower
  confidence): each block is calibrated on held-out in-distribution scores that its Gaussians were
  not fitted on (cross-fitting, :func:`fold_indices`). ``logistic``: ``c = sigmoid((t_b - s) /
  tau_b)``, ``t_b`` the edge of the held-out score range (:func:`calibration_center`), ``tau_b`` the
  scores' robust spread (:func:`robust_scale`); ``ecdf``: the conformal p-value
  ``(1 + #{held-out >= s}) / (M + 1)``; ``contrast``: the score placed between the teacher's own
  held-out pseudo-data and the OTHER teachers' held-out pseudo-data (:func:`contrast_calibration`),
  ``c = sigmoid(-kappa (g(s) - t_b) / tau_b)`` with ``g`` the signed log, ``t_b`` the midpoint of
  the two medians of ``g`` and ``tau_b`` their distance. All three decrease monotonically in ``s``,
  so the score's ranking (and AUROC) is kept; they differ in how two teachers' confidences compare.
  ``logistic`` and ``ecdf`` calibrate each teacher on its own pseudo-data alone, so on text that lies
  beyond every teacher's pseudo-data (real text the base LM cannot write) both saturate and the
  comparison is decided by the tails. ``contrast`` measures each teacher in units of how far its
  own pseudo-data lies from the others', which stays comparable between teachers out there.

The estimator that holds these statistics per teacher, fits them from a job's held-out rows and
saves them is :mod:`dfkd_ray.confidence`. Pure torch.
"""

from __future__ import annotations

from typing import Optional

import torch

EIG_FLOOR = 1e-6  # relative to the mean background variance tr(Sigma_0)/H


# --------------------------------------------------------------------------------------------
# Gaussian statistics (float64)


def shrink_covariance(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - lam) Sigma + lam (tr(Sigma)/H) I``. ``cov`` (H, H) -> (H, H)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    h = cov.shape[-1]
    target = torch.diagonal(cov).mean() * torch.eye(h, dtype=cov.dtype, device=cov.device)
    return (1.0 - shrinkage) * cov + shrinkage * target


def precision_from_covariance(cov: torch.Tensor, floor: float) -> torch.Tensor:
    """Inverse of a symmetric PSD matrix with eigenvalues clamped to ``>= floor``. (H, H) -> (H, H)."""
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(floor)
    return (evecs / evals) @ evecs.T


def fit_gaussians(z: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float,
                  background: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Class-conditional Gaussians with a shared covariance, plus one background Gaussian (Eq. 2-3).

    Args:
        z: ``(M, H)`` features of one block (any float dtype; fitted in float64).
        labels: ``(M,)`` class ids in ``[0, num_classes)``.
        num_classes: ``C``.
        shrinkage: ``lam`` in ``[0, 1]``.
        background: ``(M_0, H)`` features the background Gaussian is fitted on; ``None`` = ``z``
            (Ren et al.: all in-distribution samples regardless of class).

    Returns:
        ``means`` (C, H) (zeros for absent classes), ``present`` (C,) bool, ``precision`` (H, H)
        = ``Sigma^-1``, ``bg_mean`` (H,) = ``mu_0``, ``bg_precision`` (H, H) = ``Sigma_0^-1``.
    """
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"expected z (M, H) and labels (M,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    if z.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to fit Gaussians, got {z.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    z = z.to(torch.float64)
    labels = labels.to(z.device, torch.long)
    m, h = z.shape
    counts = torch.bincount(labels, minlength=num_classes).to(z.dtype)  # (C,)
    sums = torch.zeros(num_classes, h, dtype=z.dtype, device=z.device).index_add_(0, labels, z)
    present = counts > 0  # (C,)
    means = sums / counts.clamp_min(1.0)[:, None]  # (C, H) mu_c
    centred = z - means[labels]  # (M, H)
    cov = centred.T @ centred / m  # (H, H) shared Sigma
    zb = z if background is None else background.to(z.device, torch.float64)  # (M_0, H)
    if zb.ndim != 2 or zb.shape[1] != h or zb.shape[0] < 2:
        raise ValueError(f"background must be (M_0 >= 2, H = {h}), got {tuple(zb.shape)}")
    bg_mean = zb.mean(0)  # (H,) mu_0
    bg_centred = zb - bg_mean
    bg_cov = bg_centred.T @ bg_centred / zb.shape[0]  # (H, H) Sigma_0
    floor = EIG_FLOOR * max(torch.diagonal(bg_cov).mean().item(), 1e-12)
    return {
        "means": means,
        "present": present,
        "precision": precision_from_covariance(shrink_covariance(cov, shrinkage), floor),
        "bg_mean": bg_mean,
        "bg_precision": precision_from_covariance(shrink_covariance(bg_cov, shrinkage), floor),
    }


def fit_block_gaussians(states: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float,
                        background: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """:func:`fit_gaussians` for every block, stacked.

    Args:
        states: ``(M, N, H)`` block features.
        labels: ``(M,)`` class ids.
        background: ``(M_0, N, H)`` or ``None`` (each block's background is that block's ``states``).

    Returns:
        ``means`` (N, C, H), ``present`` (C,), ``precision`` (N, H, H), ``bg_mean`` (N, H),
        ``bg_precision`` (N, H, H).
    """
    stats = [fit_gaussians(states[:, b].contiguous(), labels, num_classes, shrinkage,
                           None if background is None else background[:, b].contiguous())
             for b in range(states.shape[1])]
    return {"means": torch.stack([s["means"] for s in stats]),  # (N, C, H)
            "present": stats[0]["present"],  # (C,)
            "precision": torch.stack([s["precision"] for s in stats]),  # (N, H, H)
            "bg_mean": torch.stack([s["bg_mean"] for s in stats]),  # (N, H)
            "bg_precision": torch.stack([s["bg_precision"] for s in stats])}  # (N, H, H)


# --------------------------------------------------------------------------------------------
# OOD scores (higher = more OOD)


def mahalanobis_sq(z: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance (Eq. 2). ``z`` (B, H), ``means`` (C, H), ``precision`` (H, H) -> (B, C)."""
    d = z[:, None, :] - means[None]  # (B, C, H)
    return torch.einsum("bch,hg,bcg->bc", d, precision, d)


def block_ood_scores(states: torch.Tensor, stats: dict[str, torch.Tensor], *, relative: bool) -> torch.Tensor:
    """``min_c MD_c(z)`` (Eq. 2) or, with ``relative``, ``min_c RMD_c(z) = min_c MD_c(z) - MD_0(z)``
    (Eq. 3-4) for every block.

    Args:
        states: ``(B, N, H)`` block features (float64 for the fitted precision).
        stats: :func:`fit_block_gaussians`'s tensors; absent classes are left out of the ``min_c``.

    Returns:
        ``(B, N)``.
    """
    absent = ~stats["present"]  # (C,)
    out = []
    for b in range(states.shape[1]):
        md = mahalanobis_sq(states[:, b], stats["means"][b], stats["precision"][b])  # (B, C) MD_c, Eq. 2
        md = md.masked_fill(absent[None], float("inf")).amin(-1)  # (B,) min_c MD_c
        if relative:
            md0 = mahalanobis_sq(states[:, b], stats["bg_mean"][b][None], stats["bg_precision"][b])[:, 0]  # (B,) MD_0
            md = md - md0  # min_c RMD_c = min_c MD_c - MD_0, Eq. 3-4
        out.append(md)
    return torch.stack(out, dim=1)  # (B, N)


def msp_scores(logits: torch.Tensor) -> torch.Tensor:
    """``-max softmax(logits)`` in float64 (the MSP ablation). ``(B, C)`` -> ``(B, 1)``."""
    return -logits.double().softmax(-1).amax(-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# calibration: OOD score -> confidence in [0, 1]


def fold_indices(perm: torch.Tensor, folds: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cross-fitting folds of a permutation ``(M,)``: fold ``f`` holds out ``perm[f::F]`` and fits on
    the rest; every index is held out exactly once. Returns ``F`` pairs ``(held, rest)``."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    return [(perm[f::folds], torch.cat([perm[g::folds] for g in range(folds) if g != f])) for f in range(folds)]


def robust_scale(scores: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``tau_b``: IQR / 1.349 (the std of a Gaussian), falling back to the std, floored at
    ``1e-6 max(|t_b|, 1)``. ``scores`` (N, M), ``center`` (N,) -> (N,)."""
    q = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device), dim=1)
    scale = (q[1] - q[0]) / 1.349
    std = scores.std(dim=1, unbiased=False) if scores.shape[1] > 1 else torch.zeros_like(scale)
    scale = torch.where(scale > 0, scale, std)
    return torch.maximum(scale, 1e-6 * center.abs().clamp_min(1.0))


def calibration_center(calib: torch.Tensor, center: str, *, quantile: float, sd: float) -> torch.Tensor:
    """``t_b``, the edge of the in-distribution score range, from held-out scores ``(N, M)`` -> ``(N,)``.

    ``quantile``: the empirical ``quantile``. ``moments``: ``mean + sd * std`` (unbiased std; by
    Cantelli's inequality at most ``1 / (1 + sd^2)`` of the scores' distribution lies beyond it).
    """
    if center == "quantile":
        return torch.quantile(calib, quantile, dim=1)
    if center == "moments":
        spread = calib.std(dim=1) if calib.shape[1] > 1 else torch.zeros_like(calib[:, 0])
        return calib.mean(dim=1) + sd * spread
    raise ValueError(f"unknown calibration center {center!r}; choose quantile or moments")


def signed_log(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) log(1 + |x|)``: a monotone map that keeps RMD's sign and compresses its range (RMD
    scores of one teacher span several orders of magnitude between its own and other text)."""
    return torch.sign(x) * torch.log1p(x.abs())


def contrast_calibration(own: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t_b`` and ``tau_b`` of the ``contrast`` transform from held-out scores of one teacher.

    Args:
        own: ``(N, M)`` out-of-fit scores of the teacher's own held-out pseudo-data.
        others: ``(N, M_o)`` out-of-fit scores of the other teachers' held-out pseudo-data.

    Returns:
        ``center`` ``(N,)`` = the midpoint of the medians of ``g = signed_log(s)`` of the two sets, and
        ``scale`` ``(N,)`` = their distance, floored at the robust spread of the own ``g`` (a block
        that does not tell the teacher's text from the others' gets a flat, uninformative slope
        rather than a division by zero).
    """
    g_in = signed_log(own)  # (N, M)
    g_out = signed_log(others)  # (N, M_o)
    m_in, m_out = g_in.median(dim=1).values, g_out.median(dim=1).values  # (N,)
    spread = robust_scale(g_in, m_in)  # (N,)
    return 0.5 * (m_in + m_out), torch.maximum(m_out - m_in, spread)


def scores_to_confidence(scores: torch.Tensor, calib_scores: torch.Tensor, center: torch.Tensor,
                         scale: torch.Tensor, transform: str, *, sharpness: Optional[float] = None) -> torch.Tensor:
    """Map OOD scores to confidences with the held-out calibration of each block.

    Args:
        scores: ``(B, N)`` OOD scores ``s`` (higher = more OOD).
        calib_scores: ``(N, M)`` sorted held-out in-distribution scores.
        center: ``(N,)`` ``t_b``, scale: ``(N,)`` ``tau_b`` (logistic, contrast).
        transform: ``logistic``, ``ecdf`` or ``contrast``.
        sharpness: ``kappa`` of ``contrast`` (``amalgamation.contrast_sharpness``): the confidence at
            the median of the own pseudo-data is ``sigmoid(kappa / 2)``, at the others' median
            ``sigmoid(-kappa / 2)``.

    Returns:
        ``(B, N)`` float32 confidences in ``[0, 1]``.
    """
    if transform == "logistic":
        conf = torch.sigmoid((center[None] - scores) / scale[None])  # (B, N)
    elif transform == "ecdf":
        m = calib_scores.shape[1]
        # #{held-out >= s} = M - #{held-out < s}; searchsorted wants one row per block.
        below = torch.searchsorted(calib_scores.contiguous(), scores.T.contiguous(), side="left")  # (N, B)
        conf = ((1 + (m - below)).to(scores.dtype) / (m + 1)).T  # (B, N)
    elif transform == "contrast":
        if sharpness is None or not sharpness > 0:
            raise ValueError(f"the contrast transform needs a sharpness kappa > 0, got {sharpness}")
        conf = torch.sigmoid(-sharpness * (signed_log(scores) - center[None]) / scale[None])  # (B, N)
    else:
        raise ValueError(f"unknown confidence transform {transform!r}; choose logistic, ecdf or contrast")
    return conf.float()


# --------------------------------------------------------------------------------------------
# teachers of one class


def eliminate_one_class(confidences: list[torch.Tensor], num_classes: list[int]) -> list[torch.Tensor]:
    """Confidences of one-class teachers by elimination: a text of a one-class teacher's class is one
    its own statistics accept and no teacher of two or more classes claims.

    A teacher fine-tuned on one class has a softmax of 1 on every text (its cross-entropy and its
    gradient are 0), so its weights are its base encoder's and its steered text is the LM's unsteered
    text after the prompt: its own statistics describe generic pseudo-text more than its class. Its
    confidence becomes ``c_k^b <- c_k^b * (1 - max_{j: C_j >= 2} c_j^b)``: its own confidence, times
    one minus the largest confidence of the teachers that can tell classes apart. Unchanged when every
    teacher, or no teacher, has one class.

    Args:
        confidences: K tensors ``(B, N)`` ``c_k^b`` in ``[0, 1]``, teacher order.
        num_classes: K ints ``C_k``.

    Returns:
        K tensors ``(B, N)`` in ``[0, 1]``; the multi-class teachers' are the input tensors.
    """
    if len(confidences) != len(num_classes):
        raise ValueError(f"got confidences of {len(confidences)} teachers but class counts of {len(num_classes)}")
    one = [k for k, c in enumerate(num_classes) if c == 1]
    many = [k for k, c in enumerate(num_classes) if c >= 2]
    if not one or not many:
        return list(confidences)
    unclaimed = 1.0 - torch.stack([confidences[k] for k in many], dim=0).amax(dim=0)  # (B, N) 1 - max_j c_j^b
    out = list(confidences)
    for k in one:
        out[k] = confidences[k] * unclaimed  # (B, N)
    return out
