"""Teacher-specific OOD confidence per block: RMD (default), MD and MSP (StrataNet section 4.4, Eq. 2-4).

For teacher ``k`` and block ``b`` (block feature ``z = h_k^b``, the mean-pooled states of the block's
layers, :mod:`dfkd_ray.math.blocks`), fitted on a held-out slice ``D_k'`` of that teacher's
pseudo-data (section 5.1):

- Eq. 2, Mahalanobis distance to class ``c`` with a covariance shared by the classes:
  ``MD_c(z) = (z - mu_c)^T Sigma^-1 (z - mu_c)``.
- Eq. 3, Relative Mahalanobis distance (Ren et al. 2021): ``RMD_c(z) = MD_c(z) - MD_0(z)``, where
  ``MD_0`` is the distance to one background Gaussian ``N(mu_0, Sigma_0)`` fitted on all classes.
- Eq. 4, OOD score ``s(z) = min_c RMD_c(z)`` (Ren et al.'s confidence is ``-s``); higher = more OOD.

Ablations (StrataNet section 7.1.1): ``md`` scores ``min_c MD_c(z)``; ``msp`` scores
``-max softmax(logits)`` of the final layer, broadcast to every block.

Choices the paper leaves open, made here:

- **Fitting** is in float64. Both covariances are shrunk toward a scaled identity,
  ``(1 - lam) Sigma + lam (tr(Sigma)/H) I`` (``shrinkage`` = lam), and eigenvalues are floored at
  ``1e-6 * tr(Sigma_0)/H`` so that fewer samples than dimensions (or lam = 0) still gives a finite,
  positive-definite precision.
- **Background** ``N(mu_0, Sigma_0)`` (``amalgamation.rmd_background``): Ren et al. fit it on all
  in-distribution samples, i.e. teacher ``k``'s own ``D_k'``. With several teachers the student sees
  every teacher's pseudo-data, so by default (``all_teachers``) teacher ``k``'s background is fitted
  on its features of *all* teachers' held-out pseudo-data (per fold: the fold's fitting rows plus the
  other teachers' rows): ``MD_0`` then measures how unusual an input is for the text the
  amalgamation sees at all, and ``RMD`` keeps what is specific to ``k``'s classes. ``own`` is the
  literal definition. On AG News (features saved on the GPU; settings chosen on the title +
  description *train* rows, ``benchmarks/confidence_variants.py``, RESULTS.md session 8) the KD
  target's accuracy on those rows over six fold seeds was 87.5% (min 86.8) with ``all_teachers``
  against 84.9% (min 81.3) with ``own``, both at quantile 0.995.
- **Class labels** for the class-conditional Gaussians are the classes the pseudo-data were made
  for (the transfer set's ``teacher_class``); callers without them may pass the teacher's argmax.
  Classes with no fitting sample are left out of the ``min_c``.
- **Score -> confidence** ``c in [0, 1]``: the paper says only that higher OOD scores give lower
  confidence. Raw Mahalanobis scores have no fixed scale (they grow with the width ``H``), so each
  block is calibrated on held-out in-distribution scores that the Gaussians were *not* fitted on
  (in-sample scores are optimistically small when samples are few). By default these come from
  ``calibration_folds``-fold cross-fitting: every sample of ``D_k'`` is scored by Gaussians fitted
  on the other folds, and the final Gaussians use all of ``D_k'``. With a single random split
  (``calibration_folds: 0``: ``calibration_fraction`` calibrates, the rest fits) the calibration of
  ~60 samples per teacher moved the cross-teacher KD weights so much that the KD target's AG News
  test accuracy ranged 59-81% over six split seeds (cross-fitted: 71-75%; benchmarks/RESULTS.md,
  session 7). ``calibration_repeats`` R > 1 repeats the cross-fitting with R fold splits and
  calibrates on all R x M out-of-fit scores, so that the calibration no longer depends on one split.
  Two transforms (``AmalgamationConfig.confidence_transform``):

  * ``logistic`` (default): ``c = sigmoid((t_b - s) / tau_b)`` with ``t_b`` the edge of the
    held-out in-distribution range and ``tau_b`` the scores' robust spread (IQR / 1.349): an input
    at that edge gets 0.5, and confidence decays smoothly (never exactly 0) with the distance beyond
    it. Real text is mostly beyond every teacher's pseudo-data range, where
    ``log c ~ (t_b - s) / tau_b``, so ``t_b`` sets the offset between teachers in the KD weights,
    and the KD target's accuracy moves by 2-3 points per ``tau_b`` of offset. The edge
    (``center``, ``AmalgamationConfig.confidence_center``) is either

    - ``quantile`` (default): the empirical ``quantile`` (default 0.995) of the held-out scores, or
    - ``moments``: ``t_b = mean + z sd`` of the held-out scores (``center_sd`` = z; by Cantelli's
      inequality at most ``1 / (1 + z^2)`` of in-distribution scores lie beyond it, whatever their
      distribution), estimated from all scores.

    With ~250 held-out rows per teacher the 0.995 quantile is the second-largest score: which rows
    fall in which fold moved the KD target's AG News test accuracy over 78.5-83.4% between fold
    seeds, and calibrating the same quantile on four pooled fold splits dropped it to 75.2%.
    ``moments`` with ``calibration_repeats: 4`` is far steadier and, scored as a classifier on the
    development rows, better (KD target 85.5% at z = 4, 86.8% at z = 6, against 83.9%; six fold
    seeds, ``benchmarks/confidence_variants.py``). But the students trained on those targets were
    *worse* (StrataNet on the development rows 80.8% at z = 4 and 4.5, 78.0% at z = 6, against 81.2%
    with the quantile; RESULTS.md session 10): a target that is right on real text is not one the
    student learns from the transfer set. The quantile stays the default; ``moments`` is there to
    be measured on other teachers.
  * ``ecdf``: the conformal p-value ``c = (1 + #{held-out scores >= s}) / (M + 1)``: scale free, in
    ``(0, 1]``, uniform for in-distribution inputs, ``1/(M+1)`` beyond every held-out score.

  Both are monotone decreasing in ``s``, so the ordering (and the AUROC) of the raw score is kept.
- **MSP** has nothing to fit; all of ``D_k'`` calibrates it. Its held-out scores pile up near -1 (a
  saturated softmax), so the 0.995 quantile centres the logistic at that pile: on AG News the MSP
  row fell from 72.9% (quantile 0.95, session 7) to 70.8% (session 8). Lower
  ``confidence_quantile`` when MSP is the method of interest rather than an ablation.

Statistics are saved as safetensors plus a JSON sidecar (:meth:`ConfidenceEstimator.save`), never
pickled. Imports torch (and safetensors, a file format) only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from dfkd_ray.math.blocks import TeacherOutput

METHODS = ("rmd", "md", "msp")
TRANSFORMS = ("logistic", "ecdf")
CENTERS = ("moments", "quantile")
FORMAT_VERSION = 1
_EIG_FLOOR = 1e-6  # relative to the mean background variance tr(Sigma_0)/H


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
    floor = _EIG_FLOOR * max(torch.diagonal(bg_cov).mean().item(), 1e-12)
    return {
        "means": means,
        "present": present,
        "precision": precision_from_covariance(shrink_covariance(cov, shrinkage), floor),
        "bg_mean": bg_mean,
        "bg_precision": precision_from_covariance(shrink_covariance(bg_cov, shrinkage), floor),
    }


def mahalanobis_sq(z: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance (Eq. 2). ``z`` (B, H), ``means`` (C, H), ``precision`` (H, H) -> (B, C)."""
    d = z[:, None, :] - means[None]  # (B, C, H)
    return torch.einsum("bch,hg,bcg->bc", d, precision, d)


# --------------------------------------------------------------------------------------------
# calibration: OOD score -> confidence in [0, 1]


def _robust_scale(scores: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """IQR / 1.349 (the std of a Gaussian), falling back to the std, floored. (N, M) -> (N,)."""
    q = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device), dim=1)
    scale = (q[1] - q[0]) / 1.349
    std = scores.std(dim=1, unbiased=False) if scores.shape[1] > 1 else torch.zeros_like(scale)
    scale = torch.where(scale > 0, scale, std)
    return torch.maximum(scale, 1e-6 * center.abs().clamp_min(1.0))


def calibration_center(calib: torch.Tensor, center: str, *, quantile: float = 0.995, sd: float = 4.0) -> torch.Tensor:
    """``t_b``, the edge of the in-distribution score range, from held-out scores ``(N, M)`` -> ``(N,)``.

    ``moments``: ``mean + sd * std`` (unbiased std; Cantelli: at most ``1 / (1 + sd^2)`` of the
    scores' distribution lies beyond it). ``quantile``: the empirical ``quantile``.
    """
    if center == "quantile":
        return torch.quantile(calib, quantile, dim=1)
    if center == "moments":
        spread = calib.std(dim=1) if calib.shape[1] > 1 else torch.zeros_like(calib[:, 0])
        return calib.mean(dim=1) + sd * spread
    raise ValueError(f"unknown calibration center {center!r}; choose one of {CENTERS}")


def scores_to_confidence(scores: torch.Tensor, calib_scores: torch.Tensor, center: torch.Tensor,
                         scale: torch.Tensor, transform: str) -> torch.Tensor:
    """Map OOD scores to confidences with the held-out calibration of each block.

    Args:
        scores: ``(B, N)`` OOD scores ``s`` (higher = more OOD).
        calib_scores: ``(N, M)`` sorted held-out in-distribution scores.
        center: ``(N,)`` ``t_b``, scale: ``(N,)`` ``tau_b`` (logistic).
        transform: ``logistic`` or ``ecdf``.

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
    else:
        raise ValueError(f"unknown confidence transform {transform!r}; choose one of {TRANSFORMS}")
    return conf.float()


# --------------------------------------------------------------------------------------------
# the estimator


def _check_method(method: str, transform: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown confidence method {method!r}; choose one of {METHODS}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown confidence transform {transform!r}; choose one of {TRANSFORMS}")


@dataclass(frozen=True, eq=False)
class ConfidenceEstimator:
    """Fitted per-block OOD statistics of ONE teacher; call it on that teacher's outputs.

    Build with :meth:`fit` (or :meth:`fit_outputs`), use with ``estimator(teacher_output)`` ->
    ``(B, N)`` confidences in ``[0, 1]``, persist with :meth:`save` / :meth:`load`.

    Attributes:
        method: ``rmd`` | ``md`` | ``msp``.
        transform: ``logistic`` | ``ecdf`` (score -> confidence, see the module docstring).
        num_blocks: ``N`` the statistics were fitted for (1 for ``msp``: one score, broadcast).
        num_classes: ``C_k``, the teacher's classes.
        hidden_size: ``H_k`` (0 for ``msp``).
        tensors: ``means`` (N, C, H), ``present`` (C,), ``precision`` (N, H, H),
            ``bg_mean`` (N, H), ``bg_precision`` (N, H, H) [rmd/md only]; ``calib_scores`` (N, M)
            sorted, ``calib_center`` (N,), ``calib_scale`` (N,) [all methods].
        meta: JSON-able facts about the fit (sample counts, shrinkage, quantile, seed).
    """

    method: str
    transform: str
    num_blocks: int
    num_classes: int
    hidden_size: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    meta: dict = field(default_factory=dict)

    # ---- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(cls, block_states: torch.Tensor, logits: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
            method: str = "rmd", shrinkage: float = 0.1, transform: str = "logistic", quantile: float = 0.995,
            center: str = "quantile", center_sd: float = 4.0, calibration_fraction: float = 0.25,
            calibration_folds: int = 5, calibration_repeats: int = 1, seed: int = 0,
            background_states: Optional[torch.Tensor] = None) -> "ConfidenceEstimator":
        """Fit on a teacher's held-out pseudo-data ``D_k'`` (StrataNet section 5.1).

        rmd/md: with ``calibration_folds = F >= 2`` (cross-fitting), the ``M`` samples are split into
        F seeded folds; each fold is scored by Gaussians fitted on the other folds, so all ``M``
        out-of-fit scores calibrate the transform, and the Gaussians that score new inputs are
        fitted on all ``M``; ``calibration_repeats = R`` does that for R seeded fold splits and
        calibrates on all ``R M`` scores (the first split is the one ``R = 1`` uses). With
        ``calibration_folds = 0``, a seeded random ``calibration_fraction`` of the samples calibrates
        and the rest fits. MSP calibrates on all ``M`` (nothing to fit, so its calibration is the same
        for every seed). ``calibration_repeats`` only repeats cross-fitting: with
        ``calibration_folds = 0`` and for MSP it changes nothing.

        Args:
            block_states: ``(M, N, H)`` block features ``h_k^b``.
            logits: ``(M, C)`` the teacher's logits (for MSP, and for labels when none are given).
            labels: ``(M,)`` the teacher's class of each sample (the class it was generated for);
                ``None`` uses ``logits.argmax(-1)``.
            method, shrinkage, transform, quantile, center, center_sd, calibration_fraction,
                calibration_folds, calibration_repeats, seed: see the module docstring and
                :class:`~dfkd_ray.config.AmalgamationConfig`.
            background_states: ``(M_o, N, H)`` this teacher's block features of the *other* teachers'
                held-out pseudo-data (``amalgamation.rmd_background: all_teachers``). rmd only: every
                background Gaussian ``MD_0`` is then fitted on them plus the samples its class
                Gaussians are fitted on (per fold when cross-fitting). ``None``: on those samples
                alone (Ren et al.'s literal definition). md and msp have no background and ignore it.
        """
        _check_method(method, transform)
        if block_states.ndim != 3:
            raise ValueError(f"block_states must be (M, N, H), got shape {tuple(block_states.shape)}")
        if logits.ndim != 2 or logits.shape[0] != block_states.shape[0]:
            raise ValueError(f"logits must be (M, C) with M = {block_states.shape[0]}, got {tuple(logits.shape)}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
        if center not in CENTERS:
            raise ValueError(f"unknown calibration center {center!r}; choose one of {CENTERS}")
        if not 0.0 < center_sd < float("inf"):  # also rejects NaN
            raise ValueError(f"center_sd must be finite and > 0, got {center_sd}")
        if calibration_repeats < 1:
            raise ValueError(f"calibration_repeats must be >= 1, got {calibration_repeats}")
        if calibration_folds == 1 or calibration_folds < 0:
            raise ValueError(f"calibration_folds must be 0 (a held-out split) or >= 2 (cross-fitting), "
                             f"got {calibration_folds}")
        m, n, h = block_states.shape
        c = logits.shape[1]
        if labels is None:
            labels = logits.argmax(-1)
        labels = torch.as_tensor(labels, device=block_states.device).long()
        if labels.shape != (m,):
            raise ValueError(f"labels must be (M,) = ({m},), got {tuple(labels.shape)}")
        if m and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(f"labels must be class ids in [0, {c}), got range [{labels.min()}, {labels.max()}]")
        if not (torch.isfinite(block_states).all() and torch.isfinite(logits).all()):
            raise ValueError("block_states and logits must be finite")
        if method != "rmd":
            background_states = None
        if background_states is not None:
            if background_states.ndim != 3 or tuple(background_states.shape[1:]) != (n, h):
                raise ValueError(f"background_states must be (M_o, N, H) = (M_o, {n}, {h}) like block_states, "
                                 f"got {tuple(background_states.shape)}")
            if not torch.isfinite(background_states).all():
                raise ValueError("background_states must be finite")
            background_states = background_states.to(block_states.device)
        meta = {"shrinkage": float(shrinkage), "quantile": float(quantile), "center": center,
                "center_sd": float(center_sd), "calibration_repeats": int(calibration_repeats),
                "calibration_fraction": float(calibration_fraction), "calibration_folds": int(calibration_folds),
                "seed": int(seed), "num_samples": m,
                "num_background": 0 if background_states is None else int(background_states.shape[0])}

        if method == "msp":
            if m < 2:
                raise ValueError(f"need at least 2 held-out samples to calibrate MSP, got {m}")
            est = cls(method, transform, 1, c, 0, {}, {**meta, "num_fit": 0, "num_calib": m})
            calib = est._scores(block_states, logits)  # (M, 1)
            return est._calibrated(calib, quantile, center, center_sd)

        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(m, generator=generator).to(block_states.device)

        def gaussians(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            stats = [fit_gaussians(block_states[idx, b], labels[idx], c, shrinkage,
                                   None if background_states is None
                                   else torch.cat([block_states[idx, b], background_states[:, b]]))
                     for b in range(n)]
            return {"means": torch.stack([s["means"] for s in stats]),  # (N, C, H)
                    "present": stats[0]["present"],  # (C,)
                    "precision": torch.stack([s["precision"] for s in stats]),  # (N, H, H)
                    "bg_mean": torch.stack([s["bg_mean"] for s in stats]),  # (N, H)
                    "bg_precision": torch.stack([s["bg_precision"] for s in stats])}  # (N, H, H)

        if calibration_folds:
            if m < calibration_folds + 2:  # every fold non-empty, every fit on >= 2 samples
                raise ValueError(f"need at least {calibration_folds + 2} held-out samples for {calibration_folds}-fold "
                                 f"calibration, got {m}; lower amalgamation.calibration_folds or hold out more rows")
            parts = []
            for r in range(calibration_repeats):  # R fold splits; the first is perm (R = 1: one split)
                split = perm if r == 0 else torch.randperm(m, generator=generator).to(block_states.device)
                calib = torch.empty(m, n, dtype=torch.float64, device=block_states.device)  # (M, N) out-of-fit
                for f in range(calibration_folds):
                    held, rest = split[f::calibration_folds], torch.cat([split[g::calibration_folds]
                                                                         for g in range(calibration_folds) if g != f])
                    calib[held] = cls(method, transform, n, c, h, gaussians(rest), meta)._scores(
                        block_states[held], logits[held]).to(calib.device)
                parts.append(calib)
            calib = torch.cat(parts)  # (R M, N)
            fit_idx, n_cal = perm, m * calibration_repeats
        else:
            n_cal = max(2, int(round(calibration_fraction * m)))
            if m - n_cal < 2:
                raise ValueError(f"need at least {n_cal + 2} held-out samples ({n_cal} to calibrate and 2 to fit), got {m}")
            fit_idx = perm[n_cal:]
            calib = None
        meta.update(num_fit=int(fit_idx.numel()), num_calib=n_cal,
                    class_counts=torch.bincount(labels[fit_idx], minlength=c).tolist())
        est = cls(method, transform, n, c, h, gaussians(fit_idx), meta)
        if calib is None:
            calib = est._scores(block_states[perm[:n_cal]], logits[perm[:n_cal]])  # (M_cal, N)
        return est._calibrated(calib, quantile, center, center_sd)

    @classmethod
    def fit_outputs(cls, outputs: Sequence[TeacherOutput], labels: Optional[torch.Tensor] = None,
                    **kwargs) -> "ConfidenceEstimator":
        """:meth:`fit` on a list of batches of :class:`TeacherOutput` (masks are not needed)."""
        if not outputs:
            raise ValueError("no teacher outputs to fit confidence statistics on")
        return cls.fit(torch.cat([o.block_states for o in outputs]), torch.cat([o.logits for o in outputs]),
                       labels, **kwargs)

    def _calibrated(self, calib: torch.Tensor, quantile: float, center_kind: str,
                    center_sd: float) -> "ConfidenceEstimator":
        calib = calib.T.to(torch.float64).sort(dim=1).values  # (N, M_cal)
        center = calibration_center(calib, center_kind, quantile=quantile, sd=center_sd)  # (N,) t_b
        scale = _robust_scale(calib, center)  # (N,) tau_b
        tensors = {**self.tensors, "calib_scores": calib, "calib_center": center, "calib_scale": scale}
        return replace(self, tensors=tensors)

    # ---- scoring -----------------------------------------------------------------------------

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

    def _scores(self, block_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.method == "msp":
            return -logits.double().softmax(-1).amax(-1, keepdim=True)  # (B, 1)
        t = self.tensors
        z = block_states.to(t["means"].device, torch.float64)  # (B, N, H)
        absent = ~t["present"]  # (C,)
        out = []
        for b in range(self.num_blocks):
            md = mahalanobis_sq(z[:, b], t["means"][b], t["precision"][b])  # (B, C) MD_c, Eq. 2
            md = md.masked_fill(absent[None], float("inf")).amin(-1)  # (B,) min_c MD_c
            if self.method == "rmd":
                md0 = mahalanobis_sq(z[:, b], t["bg_mean"][b][None], t["bg_precision"][b])[:, 0]  # (B,) MD_0
                md = md - md0  # min_c RMD_c = min_c MD_c - MD_0, Eq. 3-4
            out.append(md)
        return torch.stack(out, dim=1)  # (B, N)

    def scores(self, block_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Raw OOD scores ``s`` (Eq. 4; higher = more OOD), float64 ``(B, N)`` (``(B, 1)`` for msp)."""
        self._check_inputs(block_states, logits)
        return self._scores(block_states, logits)

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
            s = self._scores(block_states, logits).to(t["calib_scores"].device)  # (B, N) or (B, 1)
            conf = scores_to_confidence(s, t["calib_scores"], t["calib_center"], t["calib_scale"], self.transform)
        if self.method == "msp":
            conf = conf.expand(-1, block_states.shape[1])  # (B, N)
        return conf.to(block_states.device).contiguous()

    def __call__(self, output: TeacherOutput) -> torch.Tensor:
        """``(B, N)`` confidences for one batch of this teacher's :class:`TeacherOutput`."""
        return self.confidence(output.block_states, output.logits)

    def to(self, device: torch.device | str) -> "ConfidenceEstimator":
        return replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})

    # ---- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path, name: str = "confidence") -> Path:
        """Write ``<name>.safetensors`` (the statistics) and ``<name>.json`` (method, sizes, fit facts)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = {"format_version": FORMAT_VERSION, "method": self.method, "transform": self.transform,
                  "num_blocks": self.num_blocks, "num_classes": self.num_classes, "hidden_size": self.hidden_size,
                  "meta": self.meta}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(directory / f"{name}.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
        (directory / f"{name}.json").write_text(json.dumps(header, indent=2))
        return directory / f"{name}.json"

    @classmethod
    def load(cls, directory: str | Path, name: str = "confidence",
             device: torch.device | str = "cpu") -> "ConfidenceEstimator":
        """Read what :meth:`save` wrote."""
        from safetensors.torch import load_file

        directory = Path(directory)
        header_file, tensor_file = directory / f"{name}.json", directory / f"{name}.safetensors"
        for f in (header_file, tensor_file):
            if not f.is_file():
                raise FileNotFoundError(f"confidence statistics {f} are missing; fit them first")
        header = json.loads(header_file.read_text())
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{header_file}: format_version {header.get('format_version')} is not {FORMAT_VERSION}")
        _check_method(header["method"], header["transform"])
        tensors = load_file(str(tensor_file), device=str(device))
        needed = {"calib_scores", "calib_center", "calib_scale"}
        if header["method"] != "msp":
            needed |= {"means", "present", "precision", "bg_mean", "bg_precision"}
        if needed - set(tensors):
            raise ValueError(f"{tensor_file} lacks tensors {sorted(needed - set(tensors))}")
        return cls(header["method"], header["transform"], int(header["num_blocks"]), int(header["num_classes"]),
                   int(header["hidden_size"]), tensors, header.get("meta", {}))


def save_estimators(directory: str | Path, estimators: dict[str, ConfidenceEstimator]) -> Path:
    """All teachers' statistics in one directory: ``<teacher>.safetensors`` + ``<teacher>.json`` + ``index.json``."""
    directory = Path(directory)
    for name, est in estimators.items():
        est.save(directory, name)
    index = directory / "index.json"
    index.write_text(json.dumps({"teachers": list(estimators)}, indent=2))
    return index


def load_estimators(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, ConfidenceEstimator]:
    """Read what :func:`save_estimators` wrote, in the saved teacher order."""
    index = Path(directory) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing; fit the confidence statistics first")
    names = json.loads(index.read_text())["teachers"]
    return {name: ConfidenceEstimator.load(directory, name, device) for name in names}


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Probability that a random OOD score exceeds a random in-distribution score (ties count 1/2).

    A dependency-free diagnostic for logs; tests cross-check it against scikit-learn.
    """
    a, b = in_scores.flatten().double(), out_scores.flatten().double()
    if not a.numel() or not b.numel():
        return math.nan
    greater = (b[:, None] > a[None]).double().mean()
    ties = (b[:, None] == a[None]).double().mean()
    return float(greater + 0.5 * ties)
