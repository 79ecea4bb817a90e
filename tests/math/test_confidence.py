"""Gaussian fitting, Mahalanobis / RMD / MSP scores and their calibration (StrataNet Eq. 2-4): golden
values against direct formulas, and properties, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dfkd_ray.math.confidence import (block_ood_scores, calibration_center, contrast_calibration, eliminate_one_class,
                                      fit_block_gaussians,
                                      fit_gaussians, fold_indices, mahalanobis_sq, msp_scores, robust_scale, scores_to_confidence,
                                      shrink_covariance)

H, C, N = 16, 3, 2


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def gaussian_blocks(m: int, shift: float = 0.0, seed: int = 0):
    """``(M, N, H)`` features of ``C`` separated classes (block 1 = block 0 squared elementwise) and ``(M,)`` classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, H, generator=torch.Generator().manual_seed(1)) * 3.0  # (C, H)
    y = torch.randint(C, (m,), generator=g)  # (M,)
    z = centres[y] + torch.randn(m, H, generator=g) + shift  # (M, H)
    return torch.stack([z, z.pow(2)], dim=1), y


def test_fit_gaussians_and_mahalanobis_follow_equations_2_and_3():
    """Golden check against a direct computation (shrinkage 0): class means, shared within-class
    covariance, background covariance, and MD_c(z) = (z - mu_c)^T Sigma^-1 (z - mu_c)."""
    z, y = gaussian_blocks(300)
    z0 = z[:, 0].double()
    stats = fit_gaussians(z0, y, C, shrinkage=0.0)
    mu = torch.stack([z0[y == c].mean(0) for c in range(C)])
    within = torch.cat([z0[y == c] - mu[c] for c in range(C)])
    cov = within.T @ within / len(z0)
    bg_cov = torch.cov(z0.T, correction=0)
    torch.testing.assert_close(stats["means"], mu)
    torch.testing.assert_close(stats["precision"], torch.linalg.inv(cov), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stats["bg_mean"], z0.mean(0))
    torch.testing.assert_close(stats["bg_precision"], torch.linalg.inv(bg_cov), rtol=1e-6, atol=1e-8)
    x = torch.randn(5, H, dtype=torch.float64) * 3
    md = torch.stack([((x - mu[c]) @ torch.linalg.inv(cov) * (x - mu[c])).sum(-1) for c in range(C)], 1)  # (5, C)
    torch.testing.assert_close(mahalanobis_sq(x, stats["means"], stats["precision"]), md, rtol=1e-6, atol=1e-6)


def test_block_ood_scores_are_min_md_and_min_rmd():
    """Eq. 2-4 per block: ``min_c MD_c`` and ``min_c RMD_c = min_c MD_c - MD_0``, absent classes left out."""
    z, y = gaussian_blocks(200)
    y = y.clamp_max(1)  # class 2 absent
    stats = fit_block_gaussians(z, y, C, 0.1)
    assert stats["present"].tolist() == [True, True, False]
    x = torch.randn(6, N, H, dtype=torch.float64) * 3
    md = block_ood_scores(x, stats, relative=False)
    rmd = block_ood_scores(x, stats, relative=True)
    assert md.shape == rmd.shape == (6, N)
    for b in range(N):
        d = mahalanobis_sq(x[:, b], stats["means"][b], stats["precision"][b])[:, :2]  # (6, 2) present classes
        d0 = mahalanobis_sq(x[:, b], stats["bg_mean"][b][None], stats["bg_precision"][b])[:, 0]  # (6,)
        torch.testing.assert_close(md[:, b], d.amin(1))
        torch.testing.assert_close(rmd[:, b], (d - d0[:, None]).amin(1))
    assert not torch.allclose(md, rmd)  # RMD is not MD


def test_block_gaussians_stack_each_blocks_fit_and_background():
    z, y = gaussian_blocks(60)
    other = gaussian_blocks(20, shift=5.0, seed=3)[0]  # (M_o, N, H)
    background = torch.cat([z, other])
    stats = fit_block_gaussians(z, y, C, 0.2, background)
    assert stats["means"].shape == (N, C, H) and stats["precision"].shape == (N, H, H)
    for b in range(N):
        ref = fit_gaussians(z[:, b], y, C, 0.2, background=background[:, b])
        for key in ("means", "precision", "bg_mean", "bg_precision"):
            torch.testing.assert_close(stats[key][b], ref[key])
    own = fit_block_gaussians(z, y, C, 0.2)
    torch.testing.assert_close(own["precision"], stats["precision"])  # the class part ignores the background
    assert not torch.allclose(own["bg_mean"], stats["bg_mean"])
    with pytest.raises(ValueError, match="background"):
        fit_gaussians(z[:, 0], y, C, 0.1, background=other[:1, 0])


def test_fit_gaussians_input_errors():
    z, y = gaussian_blocks(10)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_gaussians(z[:, 0], y + C, C, 0.1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_gaussians(z[:1, 0], y[:1], C, 0.1)
    with pytest.raises(ValueError, match=r"\(M, H\)"):
        fit_gaussians(z, y, C, 0.1)


def test_shrinkage_keeps_trace_and_reaches_scaled_identity():
    a = torch.randn(8, 8, dtype=torch.float64)
    cov = a @ a.T
    for lam in (0.0, 0.3, 1.0):
        s = shrink_covariance(cov, lam)
        torch.testing.assert_close(torch.trace(s), torch.trace(cov))
    torch.testing.assert_close(shrink_covariance(cov, 1.0), torch.eye(8, dtype=torch.float64) * torch.trace(cov) / 8)
    with pytest.raises(ValueError, match="shrinkage"):
        shrink_covariance(cov, 1.5)


def test_msp_score_is_minus_the_largest_probability():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    s = msp_scores(logits)
    assert s.shape == (2, 1) and s.dtype == torch.float64
    torch.testing.assert_close(s[:, 0], -logits.double().softmax(-1).amax(-1))
    assert s[0, 0] < s[1, 0]  # a peaked softmax is less OOD


@pytest.mark.parametrize("m,folds", [(61, 4), (7, 5), (10, 2)])
def test_fold_indices_hold_every_index_out_exactly_once(m, folds):
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(3))
    pairs = fold_indices(perm, folds)
    assert len(pairs) == folds
    held = torch.cat([h for h, _ in pairs])
    assert sorted(held.tolist()) == list(range(m))
    for f, (h, rest) in enumerate(pairs):
        assert torch.equal(h, perm[f::folds])
        assert sorted(torch.cat([h, rest]).tolist()) == list(range(m)) and len(rest) == m - len(h)
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_indices(perm, 1)


def test_score_to_confidence_transforms_on_hand_values():
    calib = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)  # (N=1, M=3), sorted
    s = torch.tensor([[0.0], [2.0], [10.0]], dtype=torch.float64)  # (B=3, N=1)
    ecdf = scores_to_confidence(s, calib, torch.tensor([2.0]), torch.tensor([1.0]), "ecdf")
    torch.testing.assert_close(ecdf[:, 0], torch.tensor([1.0, 0.75, 0.25]))  # (1 + #{calib >= s}) / (M + 1)
    logi = scores_to_confidence(s, calib, torch.tensor([2.0], dtype=torch.float64),
                                torch.tensor([1.0], dtype=torch.float64), "logistic")
    torch.testing.assert_close(logi[:, 0], torch.sigmoid(torch.tensor([2.0, 0.0, -8.0])))
    with pytest.raises(ValueError, match="transform"):
        scores_to_confidence(s, calib, torch.tensor([2.0]), torch.tensor([1.0]), "softmax")


def test_contrast_places_scores_between_the_own_and_the_other_teachers_medians():
    """contrast: sigmoid(kappa/2) at the median of the teacher's own held-out scores, 1/2 half-way (on
    the signed log) to the others' median, sigmoid(-kappa/2) there; the scale is the distance."""
    own = torch.tensor([[-2.0, 0.0, 1.0, 3.0, 9.0]], dtype=torch.float64)  # (N=1, M=5): median 1
    others = torch.tensor([[50.0, 99.0, 400.0]], dtype=torch.float64)  # (N=1, M_o=3): median 99
    center, scale = contrast_calibration(own, others)
    g_in, g_out = math.log(2.0), math.log(100.0)
    torch.testing.assert_close(center, torch.tensor([(g_in + g_out) / 2], dtype=torch.float64))
    torch.testing.assert_close(scale, torch.tensor([g_out - g_in], dtype=torch.float64))
    mid = math.expm1((g_in + g_out) / 2)
    s = torch.tensor([[1.0], [mid], [99.0], [1e6]], dtype=torch.float64)
    conf = scores_to_confidence(s, own, center, scale, "contrast", sharpness=6.0)[:, 0]
    torch.testing.assert_close(conf[:3], torch.sigmoid(torch.tensor([3.0, 0.0, -3.0])))
    assert 0 < conf[3] < conf[2]
    with pytest.raises(ValueError, match="sharpness"):
        scores_to_confidence(s, own, center, scale, "contrast")


def test_contrast_scale_is_floored_where_a_block_does_not_separate():
    """Others' scores no higher than the own: the slope is the own scores' spread, not a division by 0."""
    own = torch.arange(1.0, 11.0, dtype=torch.float64)[None]  # (1, 10)
    center, scale = contrast_calibration(own, own.flip(1))
    assert torch.isfinite(center).all() and (scale > 0).all()


@pytest.mark.parametrize("sd", [2.0, 6.0])
def test_moments_center_is_mean_plus_z_standard_deviations(sd):
    calib = torch.randn(2, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64).exp()  # skewed
    t = calibration_center(calib, "moments", quantile=0.5, sd=sd)
    torch.testing.assert_close(t, calib.mean(1) + sd * calib.std(1))
    beyond = (calib > t[:, None]).double().mean(1)  # Cantelli: at most 1 / (1 + z^2) lie beyond
    assert (beyond <= 1 / (1 + sd ** 2)).all(), beyond
    torch.testing.assert_close(calibration_center(calib, "quantile", quantile=0.9, sd=sd),
                               torch.quantile(calib, 0.9, dim=1))
    with pytest.raises(ValueError, match="unknown calibration center"):
        calibration_center(calib, "median", quantile=0.9, sd=sd)


def test_robust_scale_is_the_iqr_of_a_gaussian_with_fallbacks():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)  # IQR 2
    torch.testing.assert_close(robust_scale(scores, torch.zeros(1, dtype=torch.float64)),
                               torch.tensor([2.0 / 1.349], dtype=torch.float64))
    tied = torch.tensor([[1.0, 1.0, 1.0, 1.0, 9.0]], dtype=torch.float64)  # IQR 0: the std instead
    torch.testing.assert_close(robust_scale(tied, torch.zeros(1, dtype=torch.float64)), tied.std(1, unbiased=False))
    flat = torch.full((1, 4), 5.0, dtype=torch.float64)  # no spread at all: floored, never 0
    assert robust_scale(flat, torch.tensor([5.0], dtype=torch.float64)).item() == pytest.approx(5e-6)


# ---------------------------------------------------------------------- teachers of one class


def test_one_class_teacher_keeps_what_the_multi_class_teachers_do_not_claim():
    g = torch.Generator().manual_seed(0)
    c3, c4, c1 = torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g)
    out = eliminate_one_class([c3, c1, c4], [3, 1, 4])
    assert out[0] is c3 and out[2] is c4  # teachers of several classes keep their confidences
    torch.testing.assert_close(out[1], c1 * (1 - torch.maximum(c3, c4)))
    assert ((out[1] >= 0) & (out[1] <= c1)).all()  # never above its own confidence
    # a text that a multi-class teacher claims fully is never the one-class teacher's, whatever its own statistics
    assert eliminate_one_class([torch.ones(1, 1), torch.ones(1, 1)], [2, 1])[1].item() == 0.0


def test_several_one_class_teachers_each_keep_their_own_share():
    many = torch.tensor([[0.2], [0.9], [0.5]])
    a, b = torch.tensor([[0.6], [0.1], [0.0]]), torch.tensor([[0.3], [0.4], [1.0]])
    out = eliminate_one_class([many, a, b], [2, 1, 1])
    torch.testing.assert_close(out[1], torch.tensor([[0.48], [0.01], [0.0]]))
    torch.testing.assert_close(out[2], torch.tensor([[0.24], [0.04], [0.5]]))
    # the one-class teachers keep their order on every row: their own statistics tell them apart
    assert torch.equal(out[1] > out[2], a > b)


def test_elimination_changes_nothing_without_both_kinds_of_teacher():
    a, b = torch.rand(4, 3), torch.rand(4, 3)
    assert eliminate_one_class([a, b], [2, 5]) == [a, b]
    assert eliminate_one_class([a, b], [1, 1]) == [a, b]
    with pytest.raises(ValueError, match="class counts of 1"):
        eliminate_one_class([a, b], [2])
