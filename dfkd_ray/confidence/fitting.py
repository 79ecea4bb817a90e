"""Fitting each teacher's confidence statistics on its held-out pseudo-data ``D_k'`` (StrataNet section 5.1).

- Held-out rows: the transfer-set rows with ``heldout`` set and ``teacher == k`` (:func:`heldout_rows`);
  the class of a row's Gaussian is the class the row was generated for (``teacher_class``).
- Cross-fitting (``amalgamation.calibration_folds`` F >= 2): the rows are split into F seeded folds,
  each fold is scored by Gaussians fitted on the other folds, and all M out-of-fit scores calibrate
  the score -> confidence transform; the Gaussians that score new inputs are fitted on all M rows.
  ``calibration_repeats`` R repeats this with R fold splits (the first is the one R = 1 uses) and
  calibrates on all R M scores. With F = 0 one seeded ``calibration_fraction`` of the rows calibrates
  and the rest fits.
- Background Gaussian of RMD (``amalgamation.rmd_background``): ``all_teachers`` fits teacher k's
  ``N(mu_0, Sigma_0)`` on its features of every teacher's held-out rows (per fold: the fold's fitting
  rows plus the other teachers' rows), because the student sees every teacher's pseudo-data; ``MD_0``
  then measures how unusual a text is for the amalgamation as a whole and ``RMD`` keeps what is
  specific to k's classes. ``own`` is Ren et al.'s definition (k's rows only).
- ``confidence_transform: contrast`` also needs the other teachers' held-out rows: they are split
  into F folds of their own, fold f scored by the statistics fitted without it (and without the
  teacher's own fold f), and the transform places a score between the medians of the teacher's own
  out-of-fit scores and the others' (:func:`~dfkd_ray.math.confidence.contrast_calibration`).
- MSP has nothing to fit: all M rows calibrate it, whatever the seed.

Settings come from :class:`~dfkd_ray.config.AmalgamationConfig`, validated when the config loads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional, Sequence

import torch

from dfkd_ray.config import AmalgamationConfig, JobConfig
from dfkd_ray.confidence.estimator import ConfidenceEstimator
from dfkd_ray.math.confidence import (calibration_center, contrast_calibration, fit_block_gaussians, fold_indices,
                                      msp_scores, robust_scale)
from dfkd_ray.models.teacher import collect_outputs


def _calibrated(est: ConfidenceEstimator, calib: torch.Tensor, cfg: AmalgamationConfig,
                other: Optional[torch.Tensor] = None) -> ConfidenceEstimator:
    """``est`` with the calibration of held-out scores ``calib`` (M_cal, N) and, for ``contrast``, the
    other teachers' held-out scores ``other`` (M_o, N)."""
    calib = calib.T.to(torch.float64).sort(dim=1).values  # (N, M_cal)
    extra = {}
    if est.transform == "contrast":
        other = other.T.to(calib.device, torch.float64).sort(dim=1).values  # (N, M_o)
        center, scale = contrast_calibration(calib, other)  # (N,) t_b, tau_b
        extra["other_scores"] = other
    else:
        center = calibration_center(calib, cfg.confidence_center, quantile=cfg.confidence_quantile,
                                    sd=cfg.confidence_center_sd)  # (N,) t_b
        scale = robust_scale(calib, center)  # (N,) tau_b
    est = replace(est, tensors={**est.tensors, "calib_scores": calib, "calib_center": center, "calib_scale": scale,
                                **extra})
    return replace(est, meta={**est.meta, "separation": est.separation()})


def fit_estimator(block_states: torch.Tensor, logits: torch.Tensor, labels: Optional[torch.Tensor],
                  cfg: AmalgamationConfig, *, seed: int,
                  background_states: Optional[torch.Tensor] = None,
                  background_logits: Optional[torch.Tensor] = None) -> ConfidenceEstimator:
    """One teacher's statistics from its held-out rows (see the module docstring).

    Args:
        block_states: ``(M, N, H)`` block features ``h_k^b``.
        logits: ``(M, C)`` the teacher's logits (for MSP, and for labels when none are given).
        labels: ``(M,)`` the class of each row (the class it was generated for); ``None`` uses
            ``logits.argmax(-1)``.
        cfg: ``confidence``, ``confidence_transform``, ``shrinkage``, ``confidence_center``,
            ``confidence_quantile``, ``confidence_center_sd``, ``calibration_folds``,
            ``calibration_repeats`` and ``calibration_fraction`` are read from it.
        seed: seeds the fold splits.
        background_states: ``(M_o, N, H)`` this teacher's features of the other teachers' held-out
            rows: rmd fits its background Gaussian on them too (``rmd_background: all_teachers``), and
            the ``contrast`` transform is calibrated on their out-of-fit scores (each fold's rows
            scored by statistics fitted on the other folds, their background included).
        background_logits: ``(M_o, C)`` this teacher's logits of those rows (``msp`` with ``contrast``).
    """
    method, transform = cfg.confidence, cfg.confidence_transform
    if block_states.ndim != 3:
        raise ValueError(f"block_states must be (M, N, H), got shape {tuple(block_states.shape)}")
    if logits.ndim != 2 or logits.shape[0] != block_states.shape[0]:
        raise ValueError(f"logits must be (M, C) with M = {block_states.shape[0]}, got {tuple(logits.shape)}")
    m, n, h = block_states.shape
    c = logits.shape[1]
    device = block_states.device
    if labels is None:
        labels = logits.argmax(-1)
    labels = torch.as_tensor(labels, device=device).long()
    if labels.shape != (m,):
        raise ValueError(f"labels must be (M,) = ({m},), got {tuple(labels.shape)}")
    if m and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be class ids in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    if not (torch.isfinite(block_states).all() and torch.isfinite(logits).all()):
        raise ValueError("block_states and logits must be finite")
    contrast = transform == "contrast"
    others = background_states  # (M_o, N, H): the other teachers' rows
    if others is not None:
        if others.ndim != 3 or tuple(others.shape[1:]) != (n, h):
            raise ValueError(f"background_states must be (M_o, N, H) = (M_o, {n}, {h}) like block_states, "
                             f"got {tuple(others.shape)}")
        if not torch.isfinite(others).all():
            raise ValueError("background_states must be finite")
        others = others.to(device)
    if contrast and (others is None or others.shape[0] < max(2, cfg.calibration_folds)):
        raise ValueError("confidence_transform contrast compares a teacher's own held-out rows with the other "
                         f"teachers' (background_states, at least {max(2, cfg.calibration_folds)} rows: one per "
                         "calibration fold); with one teacher use logistic")
    if contrast and method == "msp" and (background_logits is None or background_logits.shape[0] != others.shape[0]):
        raise ValueError("msp with confidence_transform contrast needs background_logits, one row per background state")
    # rows of the MD_0 fit besides the teacher's own
    background_states = others if method == "rmd" and cfg.rmd_background == "all_teachers" else None
    folds, repeats = cfg.calibration_folds, cfg.calibration_repeats
    meta = {"shrinkage": float(cfg.shrinkage), "quantile": float(cfg.confidence_quantile),
            "center": cfg.confidence_center, "center_sd": float(cfg.confidence_center_sd),
            "calibration_repeats": int(repeats), "calibration_fraction": float(cfg.calibration_fraction),
            "calibration_folds": int(folds), "seed": int(seed), "num_samples": m, "num_classes": int(c),
            "num_background": 0 if background_states is None else int(background_states.shape[0])}
    if contrast:
        meta.update(contrast_sharpness=float(cfg.contrast_sharpness), num_other=int(others.shape[0]))

    if method == "msp":
        if m < 2:
            raise ValueError(f"need at least 2 held-out samples to calibrate MSP, got {m}")
        est = ConfidenceEstimator(method, transform, 1, c, 0, {}, {**meta, "num_fit": 0, "num_calib": m})
        other = msp_scores(background_logits.to(device)) if contrast else None  # (M_o, 1)
        return _calibrated(est, est.raw_scores(block_states, logits), cfg, other)  # (M, 1) calibration scores

    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m, generator=generator).to(device)

    def fitted(idx: torch.Tensor, other_idx: Optional[torch.Tensor] = None) -> ConfidenceEstimator:
        """Gaussians of the rows ``idx`` (the background adds the other teachers' rows ``other_idx``,
        all of them when ``None``)."""
        background = None
        if background_states is not None:
            extra = background_states if other_idx is None else background_states[other_idx]
            background = torch.cat([block_states[idx], extra])
        stats = fit_block_gaussians(block_states[idx], labels[idx], c, cfg.shrinkage, background)
        return ConfidenceEstimator(method, transform, n, c, h, stats, meta)

    other = None  # (M_o, N) out-of-fit scores of the other teachers' rows (contrast)
    if folds:
        if m < folds + 2:  # every fold non-empty, every fit on >= 2 samples
            raise ValueError(f"need at least {folds + 2} held-out samples for {folds}-fold calibration, got {m}; "
                             "lower amalgamation.calibration_folds or hold out more rows")
        parts = []
        if contrast:  # the other teachers' rows get folds of their own, held out with the first split's
            other_folds = fold_indices(torch.randperm(others.shape[0], generator=generator).to(device), folds)
            other = torch.empty(others.shape[0], n, dtype=torch.float64, device=device)  # (M_o, N)
        for r in range(repeats):  # R fold splits; the first is perm (R = 1: one split)
            split = perm if r == 0 else torch.randperm(m, generator=generator).to(device)
            calib = torch.empty(m, n, dtype=torch.float64, device=device)  # (M, N) out-of-fit scores
            for f, (held, rest) in enumerate(fold_indices(split, folds)):
                if contrast and r == 0:
                    o_held, o_rest = other_folds[f]
                    est_f = fitted(rest, o_rest)
                    other[o_held] = est_f.raw_scores(others[o_held], logits[:0]).to(other.device)
                else:
                    est_f = fitted(rest)
                calib[held] = est_f.raw_scores(block_states[held], logits[held]).to(calib.device)
            parts.append(calib)
        calib = torch.cat(parts)  # (R M, N)
        fit_idx, n_cal = perm, m * repeats
    else:
        n_cal = max(2, int(round(cfg.calibration_fraction * m)))
        if m - n_cal < 2:
            raise ValueError(f"need at least {n_cal + 2} held-out samples ({n_cal} to calibrate and 2 to fit), got {m}")
        fit_idx = perm[n_cal:]
        calib = None
    meta.update(num_fit=int(fit_idx.numel()), num_calib=n_cal,
                class_counts=torch.bincount(labels[fit_idx], minlength=c).tolist())
    est = fitted(fit_idx)
    if calib is None:
        calib = est.raw_scores(block_states[perm[:n_cal]], logits[perm[:n_cal]])  # (M_cal, N)
    return _calibrated(est, calib, cfg, other)


def fit_estimators(teachers: Mapping[str, object], texts: Mapping[str, Sequence[str]],
                   classes: Optional[Mapping[str, Sequence[int]]], cfg: AmalgamationConfig, *, seed: int,
                   batch_size: int = 64) -> dict[str, ConfidenceEstimator]:
    """Every teacher's statistics from its held-out texts.

    Args:
        teachers: loaded teachers by name (anything returning ``TeacherOutput`` for texts).
        texts: each teacher's held-out texts.
        classes: each teacher's class of those texts; ``None``, or a teacher missing from it, uses
            the teacher's own argmax.
        cfg: the amalgamation section (``rmd_background`` and ``confidence_transform`` decide whether
            each teacher also runs on the other teachers' texts). With one teacher, ``contrast`` has
            nothing to contrast with and the logistic transform is fitted.
        seed: the fold-split seed (a job uses its ``seed``).
        batch_size: teacher batch size.
    """
    missing = [n for n in teachers if n not in texts]
    if missing:
        raise ValueError(f"no held-out texts for teachers {missing}")
    if len(teachers) == 1 and cfg.confidence_transform == "contrast":
        cfg = cfg.model_copy(update={"confidence_transform": "logistic"})  # no other teacher to contrast with
    use_others = len(teachers) > 1 and (cfg.confidence_transform == "contrast" or (
        cfg.confidence == "rmd" and cfg.rmd_background == "all_teachers"))
    estimators = {}
    for name, teacher in teachers.items():
        others = [t for n in teachers if n != name for t in texts[n]] if use_others else []
        states, logits = collect_outputs(teacher, list(texts[name]) + others, batch_size)  # (M + M_o, N, H)
        m = len(texts[name])
        background, background_logits = (states[m:], logits[m:]) if others else (None, None)
        states, logits = states[:m], logits[:m]
        labels = None
        if classes is not None and name in classes:
            labels = torch.as_tensor(list(classes[name]), dtype=torch.long)
            if labels.shape[0] != states.shape[0]:
                raise ValueError(f"teacher {name!r}: {labels.shape[0]} classes for {states.shape[0]} texts")
        estimators[name] = fit_estimator(states, logits, labels, cfg, seed=seed, background_states=background,
                                         background_logits=background_logits)
    return estimators


def heldout_rows(table, teacher_names: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """Each teacher's held-out texts and their target classes (``D_k'``) from a transfer-set table."""
    texts = {n: [] for n in teacher_names}
    classes = {n: [] for n in teacher_names}
    for text, teacher, cls_, held in zip(*(table.column(c).to_pylist()
                                           for c in ("text", "teacher", "teacher_class", "heldout"))):
        if held and teacher in texts:
            texts[teacher].append(text)
            classes[teacher].append(cls_)
    return texts, classes


def fit_confidence(cfg: JobConfig, table, teachers: dict) -> dict[str, ConfidenceEstimator]:
    """A job's confidence stage: every teacher's statistics from its held-out rows of the transfer set."""
    texts, classes = heldout_rows(table, list(teachers))
    folds = cfg.amalgamation.calibration_folds
    need = max(8, folds + 2)  # a cross-fitted fold split needs F + 2 rows
    few = {n: len(v) for n, v in texts.items() if len(v) < need}
    if few:
        raise ValueError(f"too few held-out rows to fit confidence statistics: {few} (need >= {need} per teacher "
                         f"with amalgamation.calibration_folds {folds}). "
                         "Raise transfer.heldout_fraction or transfer.samples_per_class, or lower calibration_folds")
    return fit_estimators(teachers, texts, classes, cfg.amalgamation, seed=cfg.seed)


def separation_report(metas: Mapping[str, dict], threshold: float, *, one_class: str = "own") -> list[str]:
    """The console lines of the confidence stage's label-free separation estimate: one line with each
    teacher's last-block separation (``ConfidenceEstimator.separation``, kept in its fit ``meta``),
    then a warning for every teacher below ``threshold`` (``amalgamation.separation_warning``). With
    ``one_class`` ``elimination`` (``amalgamation.one_class_confidence``) the line marks a teacher of one
    class beside teachers of several: its confidence is also scaled by what they leave unclaimed
    (:func:`~dfkd_ray.math.confidence.eliminate_one_class`). No lines when no teacher has an estimate
    (transforms other than ``contrast``, or one teacher)."""
    last = {name: meta["separation"][-1] for name, meta in metas.items() if meta.get("separation")}
    if not last:
        return []
    classes = {name: meta.get("num_classes") for name, meta in metas.items()}
    eliminated = set()
    if one_class == "elimination" and any(c is not None and c >= 2 for c in classes.values()):
        eliminated = {name for name, c in classes.items() if c == 1}
    lines = ["confidence separation (AUROC of each teacher's held-out pseudo-text against the other teachers', "
             "out of fit, last block; 0.5 = chance): " + ", ".join(
                 f"{n} {v:.2f}" + (" (one class: times what the others leave unclaimed)" if n in eliminated else "")
                 for n, v in last.items())]
    for name, value in last.items():
        if value < threshold:
            lines.append(
                f"warning: teacher {name!r}'s confidence statistics tell its pseudo-text from the other teachers' "
                f"only at AUROC {value:.2f} (amalgamation.separation_warning {threshold:.2f}). On real text the KD "
                "target may then follow the wrong teacher, and the student can end below the teachers' ensemble: "
                "compare the two in the eval report before using the student. amalgamation.method=vanilla distils "
                "without confidence weights; more transfer.samples_per_class or a transfer.steered.prompt that names "
                "the class can raise the separation")
    return lines
