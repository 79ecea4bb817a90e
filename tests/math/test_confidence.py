"""RMD / MD / MSP confidence (StrataNet Eq. 2-4): separation, exact formulas, stability, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import roc_auc_score

from dfkd_ray.math.blocks import TeacherOutput
from dfkd_ray.math.confidence import (ConfidenceEstimator, auroc, fit_gaussians, load_estimators, mahalanobis_sq,
                                      save_estimators, scores_to_confidence, shrink_covariance)

H, C, N = 16, 3, 2


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def gaussian_blocks(m: int, shift: torch.Tensor | float = 0.0, seed: int = 0, means_seed: int = 1):
    """``C`` well-separated class Gaussians in ``H`` dims; block 1 is block 0 scaled and rotated."""
    g_means = torch.Generator().manual_seed(means_seed)
    mu = torch.randn(C, H, generator=g_means) * 3.0  # (C, H)
    rot = torch.linalg.qr(torch.randn(H, H, generator=g_means))[0]  # (H, H)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (m,), generator=g)  # (M,)
    z = mu[y] + torch.randn(m, H, generator=g) + shift  # (M, H)
    return torch.stack([z, 2.0 * z @ rot], dim=1), y  # (M, N, H), (M,)


def ood_shift(seed: int = 2) -> torch.Tensor:
    return torch.randn(H, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("method", ["rmd", "md"])
@pytest.mark.parametrize("transform", ["logistic", "ecdf"])
def test_in_distribution_gets_higher_confidence_than_shifted(method, transform):
    z, y = gaussian_blocks(400)
    est = ConfidenceEstimator.fit(z, torch.randn(400, C), y, method=method, transform=transform, center="quantile",
                                  quantile=0.95)
    z_in, _ = gaussian_blocks(200, seed=10)
    z_out, _ = gaussian_blocks(200, shift=ood_shift(), seed=11)
    c_in = est.confidence(z_in, torch.randn(200, C))  # (B, N)
    c_out = est.confidence(z_out, torch.randn(200, C))
    assert c_in.shape == (200, N) and c_in.dtype == torch.float32
    for c in (c_in, c_out):
        assert torch.all((c >= 0) & (c <= 1))
    labels = [1] * 200 + [0] * 200
    for b in range(N):
        assert roc_auc_score(labels, torch.cat([c_in[:, b], c_out[:, b]]).numpy()) > 0.95
    assert c_in.mean() > 0.4 and c_out.mean() < 0.1


def test_rmd_and_md_follow_equations_2_to_4():
    """Golden check against a direct computation with numpy-style formulas (shrinkage 0)."""
    z, y = gaussian_blocks(300)
    z0 = z[:, 0].double()
    stats = fit_gaussians(z0, y, C, shrinkage=0.0)
    mu = torch.stack([z0[y == c].mean(0) for c in range(C)])
    within = torch.cat([z0[y == c] - mu[c] for c in range(C)])
    cov = within.T @ within / len(z0)
    bg_cov = torch.cov(z0.T, correction=0)
    torch.testing.assert_close(stats["means"], mu)
    torch.testing.assert_close(stats["precision"], torch.linalg.inv(cov), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stats["bg_precision"], torch.linalg.inv(bg_cov), rtol=1e-6, atol=1e-8)

    x = torch.randn(5, H, dtype=torch.float64) * 3
    md = torch.stack([((x - mu[c]) @ torch.linalg.inv(cov) * (x - mu[c])).sum(-1) for c in range(C)], 1)  # (5, C)
    md0 = ((x - z0.mean(0)) @ torch.linalg.inv(bg_cov) * (x - z0.mean(0))).sum(-1)  # (5,)
    torch.testing.assert_close(mahalanobis_sq(x, stats["means"], stats["precision"]), md, rtol=1e-6, atol=1e-6)

    # the estimator scores with its own fitted tensors (all samples by default: cross-fitted calibration)
    est_rmd = ConfidenceEstimator.fit(z, torch.zeros(300, C), y, method="rmd", shrinkage=0.0, calibration_fraction=0.25)
    est_md = ConfidenceEstimator.fit(z, torch.zeros(300, C), y, method="md", shrinkage=0.0, calibration_fraction=0.25)
    t = est_rmd.tensors
    xx = torch.stack([x, x], 1)  # (5, N, H)
    md_fit = mahalanobis_sq(x, t["means"][0], t["precision"][0])  # (5, C)
    md0_fit = mahalanobis_sq(x, t["bg_mean"][0][None], t["bg_precision"][0])[:, 0]
    torch.testing.assert_close(est_rmd.scores(xx, torch.zeros(5, C))[:, 0], (md_fit - md0_fit[:, None]).amin(1))
    torch.testing.assert_close(est_md.scores(xx, torch.zeros(5, C))[:, 0], md_fit.amin(1))
    assert not torch.allclose(md.amin(1), (md - md0[:, None]).amin(1))  # RMD is not MD


def test_crossfit_calibrates_on_out_of_fold_scores_of_every_sample():
    """Cross-fitting (default): the Gaussians that score new inputs use all M samples, and the
    calibration scores are each sample's score under Gaussians fitted without its fold (slow reference)."""
    m, folds = 61, 4
    z, y = gaussian_blocks(m)
    est = ConfidenceEstimator.fit(z, torch.zeros(m, C), y, method="rmd", shrinkage=0.1, calibration_folds=folds, seed=3,
                                  calibration_repeats=1)
    assert est.meta["num_fit"] == est.meta["num_calib"] == m
    for b in range(N):
        full = fit_gaussians(z[:, b], y, C, 0.1)
        torch.testing.assert_close(est.tensors["means"][b], full["means"])
        torch.testing.assert_close(est.tensors["precision"][b], full["precision"])
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(3))
    ref = torch.empty(m, N, dtype=torch.float64)
    for f in range(folds):
        held = perm[[i for i in range(m) if i % folds == f]]
        rest = perm[[i for i in range(m) if i % folds != f]]
        for b in range(N):
            st = fit_gaussians(z[rest, b], y[rest], C, 0.1)
            x = z[held, b].double()
            md = mahalanobis_sq(x, st["means"], st["precision"]).amin(1)  # (M_f,) min_c MD_c
            ref[held, b] = md - mahalanobis_sq(x, st["bg_mean"][None], st["bg_precision"])[:, 0]  # RMD, Eq. 3-4
    torch.testing.assert_close(est.tensors["calib_scores"], ref.T.sort(dim=1).values)
    # out-of-fold scores are larger than in-sample ones (what the calibration must not be fitted on)
    assert est.tensors["calib_scores"].median() > est.scores(z, torch.zeros(m, C)).median()


def test_crossfit_calibration_moves_less_between_seeds_than_one_split():
    """The calibration centre t_b (which sets how confident a teacher is relative to the others) moves
    with the seed's random split; cross-fitting every sample moves it much less."""
    z, y = gaussian_blocks(120)
    probe = gaussian_blocks(200, shift=ood_shift(), seed=9)[0]
    conf = {folds: torch.stack([ConfidenceEstimator.fit(z, torch.zeros(120, C), y, calibration_folds=folds, seed=s)
                                .confidence(probe, torch.zeros(200, C)).mean(0) for s in range(8)])
            for folds in (0, 5)}  # (seeds, N) mean confidence on shifted inputs
    spread = {folds: (c.max(0).values - c.min(0).values) for folds, c in conf.items()}  # (N,)
    assert (spread[5] < 0.5 * spread[0]).all(), spread


def test_repeated_crossfit_pools_every_split_and_keeps_the_final_gaussians():
    """calibration_repeats R: R fold splits, each sample scored once per split (R M calibration scores);
    the first split is the one R = 1 uses, and the Gaussians that score new inputs are the same."""
    m = 50
    z, y = gaussian_blocks(m)
    one = ConfidenceEstimator.fit(z, torch.zeros(m, C), y, calibration_folds=5, calibration_repeats=1, seed=4)
    three = ConfidenceEstimator.fit(z, torch.zeros(m, C), y, calibration_folds=5, calibration_repeats=3, seed=4)
    assert three.meta["num_calib"] == 3 * m and three.tensors["calib_scores"].shape == (N, 3 * m)
    for key in ("means", "precision", "bg_mean", "bg_precision"):
        torch.testing.assert_close(three.tensors[key], one.tensors[key])
    for b in range(N):  # R = 1's scores are among R = 3's (multiset inclusion)
        pooled = three.tensors["calib_scores"][b].tolist()
        for score in one.tensors["calib_scores"][b].tolist():
            pooled.remove(score)
        assert len(pooled) == 2 * m
    # other splits give other out-of-fold scores
    assert not torch.equal(three.tensors["calib_scores"], one.tensors["calib_scores"].repeat_interleave(3, dim=1))


@pytest.mark.parametrize("sd", [2.0, 6.0])
def test_moments_center_is_mean_plus_z_standard_deviations(sd):
    z, y = gaussian_blocks(80)
    est = ConfidenceEstimator.fit(z, torch.zeros(80, C), y, center="moments", center_sd=sd)
    t = est.tensors
    torch.testing.assert_close(t["calib_center"], t["calib_scores"].mean(1) + sd * t["calib_scores"].std(1))
    assert est.meta["center"] == "moments" and est.meta["center_sd"] == sd
    # Cantelli: at most 1 / (1 + z^2) of the calibration scores lie beyond the centre
    beyond = (t["calib_scores"] > t["calib_center"][:, None]).double().mean(1)
    assert (beyond <= 1 / (1 + sd ** 2)).all(), beyond


def test_moments_center_with_repeats_moves_less_between_seeds_than_the_extreme_quantile():
    """The KD weights hang on the centre t_b. An extreme empirical quantile of the out-of-fold scores
    (one split) moves with the fold seed; mean + z sd over repeated splits moves much less."""
    m = 120
    z, y = gaussian_blocks(m)

    def centers(**kw):  # (seeds, N)
        return torch.stack([ConfidenceEstimator.fit(z, torch.zeros(m, C), y, seed=s, **kw).tensors["calib_center"]
                            for s in range(8)])

    quantile = centers(center="quantile", quantile=0.995, calibration_repeats=1)
    moments = centers(center="moments", center_sd=3.0, calibration_repeats=4)
    spread = {name: (c.max(0).values - c.min(0).values) / c.mean(0) for name, c in
              {"quantile": quantile, "moments": moments}.items()}  # (N,) relative spread
    assert (spread["moments"] < 0.5 * spread["quantile"]).all(), spread


def test_shared_background_is_fitted_on_the_fit_rows_plus_the_other_teachers_rows():
    """rmd_background all_teachers: each MD_0 (per fold and final) is fitted on the samples its class
    Gaussians use plus the other teachers' rows; the class Gaussians do not see those rows."""
    m, folds = 41, 3
    z, y = gaussian_blocks(m)
    other = gaussian_blocks(25, shift=ood_shift(), seed=5)[0]  # (M_o, N, H) another teacher's pseudo-data
    est = ConfidenceEstimator.fit(z, torch.zeros(m, C), y, calibration_folds=folds, seed=1, background_states=other,
                                  calibration_repeats=1)
    assert est.meta["num_background"] == 25
    own = ConfidenceEstimator.fit(z, torch.zeros(m, C), y, calibration_folds=folds, seed=1)
    assert own.meta["num_background"] == 0
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(1))
    ref = torch.empty(m, N, dtype=torch.float64)
    for b in range(N):
        full = fit_gaussians(z[:, b], y, C, 0.1, background=torch.cat([z[:, b], other[:, b]]))
        for key in ("means", "precision", "bg_mean", "bg_precision"):
            torch.testing.assert_close(est.tensors[key][b], full[key])
        torch.testing.assert_close(est.tensors["precision"][b], own.tensors["precision"][b])  # class part unchanged
        assert not torch.allclose(est.tensors["bg_mean"][b], own.tensors["bg_mean"][b])
        for f in range(folds):
            held = perm[[i for i in range(m) if i % folds == f]]
            rest = perm[[i for i in range(m) if i % folds != f]]
            st = fit_gaussians(z[rest, b], y[rest], C, 0.1, background=torch.cat([z[rest, b], other[:, b]]))
            x = z[held, b].double()
            ref[held, b] = (mahalanobis_sq(x, st["means"], st["precision"]).amin(1)
                            - mahalanobis_sq(x, st["bg_mean"][None], st["bg_precision"])[:, 0])
    torch.testing.assert_close(est.tensors["calib_scores"], ref.T.sort(dim=1).values)
    # md has no background: the other rows change nothing
    md = [ConfidenceEstimator.fit(z, torch.zeros(m, C), y, method="md", background_states=bs) for bs in (None, other)]
    torch.testing.assert_close(md[0].tensors["calib_scores"], md[1].tensors["calib_scores"])
    with pytest.raises(ValueError, match="background_states"):
        ConfidenceEstimator.fit(z, torch.zeros(m, C), y, background_states=other[:, :1])
    with pytest.raises(ValueError, match="background_states must be finite"):
        ConfidenceEstimator.fit(z, torch.zeros(m, C), y, background_states=other * float("nan"))
    with pytest.raises(ValueError, match="background"):
        fit_gaussians(z[:, 0], y, C, 0.1, background=other[:1, 0])


def test_shrinkage_keeps_trace_and_reaches_scaled_identity():
    a = torch.randn(8, 8, dtype=torch.float64)
    cov = a @ a.T
    for lam in (0.0, 0.3, 1.0):
        s = shrink_covariance(cov, lam)
        torch.testing.assert_close(torch.trace(s), torch.trace(cov))
    torch.testing.assert_close(shrink_covariance(cov, 1.0), torch.eye(8, dtype=torch.float64) * torch.trace(cov) / 8)
    with pytest.raises(ValueError, match="shrinkage"):
        shrink_covariance(cov, 1.5)


@pytest.mark.parametrize("shrinkage", [0.0, 0.1])
def test_fewer_samples_than_dimensions_stays_finite(shrinkage):
    h = 64
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, 1, h, generator=g)  # M = 16 < H = 64
    y = torch.arange(16) % 2
    est = ConfidenceEstimator.fit(z, torch.randn(16, 2, generator=g), y, method="rmd", shrinkage=shrinkage)
    assert all(torch.isfinite(v.double()).all() for v in est.tensors.values())
    x_in = torch.randn(50, 1, h, generator=g)
    x_out = torch.randn(50, 1, h, generator=g) * 10 + 5
    for x in (x_in, x_out):
        s = est.scores(x, torch.zeros(50, 2))
        c = est.confidence(x, torch.zeros(50, 2))
        assert torch.isfinite(s).all() and torch.all((c >= 0) & (c <= 1))
    # even this degenerate fit ranks far-away points as less in-distribution
    assert est.confidence(x_in, torch.zeros(50, 2)).mean() > est.confidence(x_out, torch.zeros(50, 2)).mean()


def test_identical_samples_and_absent_classes_stay_finite():
    z = torch.ones(6, 1, 4)
    y = torch.tensor([0, 0, 0, 0, 0, 0])  # classes 1 and 2 absent
    est = ConfidenceEstimator.fit(z, torch.zeros(6, 3), y, method="rmd", calibration_folds=2)
    assert est.tensors["present"].tolist() == [True, False, False]
    c = est.confidence(torch.randn(3, 1, 4), torch.zeros(3, 3))
    assert torch.isfinite(c).all() and torch.all((c >= 0) & (c <= 1))


@pytest.mark.parametrize("method", ["rmd", "md", "msp"])
def test_save_load_round_trip(tmp_path, method):
    z, y = gaussian_blocks(120)
    logits = torch.randn(120, C)
    est = ConfidenceEstimator.fit(z, logits, y, method=method, transform="ecdf", seed=4)
    est.save(tmp_path, "alpha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.json", "alpha.safetensors"]
    header = json.loads((tmp_path / "alpha.json").read_text())
    assert header["method"] == method and header["transform"] == "ecdf" and header["meta"]["seed"] == 4
    back = ConfidenceEstimator.load(tmp_path, "alpha")
    assert (back.method, back.transform, back.num_blocks, back.num_classes, back.hidden_size) == \
           (est.method, est.transform, est.num_blocks, est.num_classes, est.hidden_size)
    assert back.tensors.keys() == est.tensors.keys()
    for k, v in est.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    x, _ = gaussian_blocks(30, seed=9)
    xl = torch.randn(30, C)
    assert torch.equal(back.confidence(x, xl), est.confidence(x, xl))


def test_save_and_load_all_teachers(tmp_path):
    z, y = gaussian_blocks(80)
    ests = {"b": ConfidenceEstimator.fit(z, torch.randn(80, C), y),
            "a": ConfidenceEstimator.fit(z, torch.randn(80, C), y, method="msp")}
    save_estimators(tmp_path, ests)
    back = load_estimators(tmp_path)
    assert list(back) == ["b", "a"] and back["a"].method == "msp"
    with pytest.raises(FileNotFoundError, match="fit"):
        load_estimators(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing"):
        ConfidenceEstimator.load(tmp_path, "c")


def test_msp_broadcasts_final_layer_score_to_all_blocks():
    logits = torch.randn(100, C) * 3
    est = ConfidenceEstimator.fit(torch.zeros(100, 1, 1), logits, method="msp")
    peaked = torch.tensor([[10.0, 0.0, 0.0]] * 2)
    flat = torch.zeros(2, C)
    out = TeacherOutput(logits=torch.cat([peaked, flat]), block_states=torch.zeros(4, 5, 7), mask=torch.ones(4, 3))
    c = est(out)  # (B, N) with N from the output, H ignored
    assert c.shape == (4, 5)
    assert torch.equal(c, c[:, :1].expand(-1, 5))
    assert torch.all(c[:2] > c[2:])


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


def test_logistic_puts_the_quantile_at_one_half():
    z, y = gaussian_blocks(400)
    est = ConfidenceEstimator.fit(z, torch.randn(400, C), y, center="quantile", quantile=0.9)
    t = est.tensors
    torch.testing.assert_close(t["calib_center"], torch.quantile(t["calib_scores"], 0.9, dim=1))
    share_above_half = (scores_to_confidence(t["calib_scores"].T, t["calib_scores"], t["calib_center"],
                                             t["calib_scale"], "logistic") > 0.5).double().mean()
    assert abs(share_above_half.item() - 0.9) < 0.02


def test_auroc_helper_matches_sklearn():
    a, b = torch.randn(50), torch.randn(60) + 0.5
    expected = roc_auc_score([0] * 50 + [1] * 60, torch.cat([a, b]).numpy())
    assert auroc(a, b) == pytest.approx(expected)


def test_bad_inputs_raise_clear_errors():
    z, y = gaussian_blocks(60)
    with pytest.raises(ValueError, match="unknown calibration center"):
        ConfidenceEstimator.fit(z, torch.randn(60, C), y, center="median")
    with pytest.raises(ValueError, match="center_sd must be finite and > 0"):
        ConfidenceEstimator.fit(z, torch.randn(60, C), y, center_sd=float("nan"))
    with pytest.raises(ValueError, match="calibration_repeats must be >= 1"):
        ConfidenceEstimator.fit(z, torch.randn(60, C), y, calibration_repeats=0)
    with pytest.raises(ValueError, match="unknown confidence method"):
        ConfidenceEstimator.fit(z, torch.randn(60, C), y, method="energy")
    with pytest.raises(ValueError, match="labels must be class ids"):
        ConfidenceEstimator.fit(z, torch.randn(60, C), y + 5)
    with pytest.raises(ValueError, match="held-out samples"):
        ConfidenceEstimator.fit(z[:3], torch.randn(3, C), y[:3], calibration_folds=0)
    with pytest.raises(ValueError, match="at least 7 held-out samples for 5-fold.*calibration_folds"):
        ConfidenceEstimator.fit(z[:6], torch.randn(6, C), y[:6])
    ConfidenceEstimator.fit(z[:7], torch.randn(7, C), y[:7])  # 5 folds of 7: every fit has >= 5 samples
    with pytest.raises(ValueError, match="calibration_folds must be 0"):
        ConfidenceEstimator.fit(z, torch.randn(60, C), y, calibration_folds=1)
    with pytest.raises(ValueError, match="finite"):
        ConfidenceEstimator.fit(z * float("nan"), torch.randn(60, C), y)
    est = ConfidenceEstimator.fit(z, torch.randn(60, C), y)
    with pytest.raises(ValueError, match="N = 2 blocks"):
        est.confidence(torch.randn(4, 3, H), torch.randn(4, C))
    with pytest.raises(ValueError, match="hidden size"):
        est.confidence(torch.randn(4, N, H + 1), torch.randn(4, C))
    with pytest.raises(ValueError, match="classes"):
        est.confidence(torch.randn(4, N, H), torch.randn(4, C + 1))


def test_real_teacher_is_more_confident_on_its_own_topics(teachers):
    """Teacher alpha (sports, cooking), fitted on its own topics, trusts them more than beta's topics."""
    from dfkd_ray.models.amalgamator import collect_outputs
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    alpha = teachers["alpha"]
    own = labelled_sentences(40, seed=100, topics=TEACHER_TOPICS["alpha"])
    states, logits = collect_outputs(alpha, [t for t, _ in own])
    classes = torch.tensor([alpha.labels.index(c) for _, c in own])
    est = ConfidenceEstimator.fit(states, logits, classes, method="rmd")
    test_in = [t for t, _ in labelled_sentences(20, seed=101, topics=TEACHER_TOPICS["alpha"])]
    test_out = [t for t, _ in labelled_sentences(20, seed=102, topics=TEACHER_TOPICS["beta"])]
    c_in, c_out = est(alpha(test_in)), est(alpha(test_out))  # (B, 3)
    labels = [1] * len(test_in) + [0] * len(test_out)
    # 0.93-0.99 over fixture builds (teachers are trained at build time; chance is 0.5)
    assert roc_auc_score(labels, torch.cat([c_in, c_out]).mean(1).numpy()) > 0.85
