"""Fitting confidence statistics from held-out rows: cross-fitted calibration, repeats, centres, the
shared RMD background, degenerate data, errors, and the job-level fitting on a transfer set."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dfkd_ray.config import AmalgamationConfig, validate_config
from dfkd_ray.confidence import fit_confidence, fit_estimator, fit_estimators, heldout_rows, separation_report
from dfkd_ray.math.confidence import contrast_calibration, fit_gaussians, mahalanobis_sq

H, C, N = 16, 3, 2


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def fit(z, logits, y, *, seed: int = 0, background_states=None, **fields):
    """Logistic unless given: most tests here fit one teacher's rows alone."""
    cfg = AmalgamationConfig(**{"confidence_transform": "logistic", **fields})
    return fit_estimator(z, logits, y, cfg, seed=seed, background_states=background_states)


def test_crossfit_calibrates_on_out_of_fold_scores_of_every_sample(gaussian_blocks):
    """Cross-fitting (default): the Gaussians that score new inputs use all M samples, and the
    calibration scores are each sample's score under Gaussians fitted without its fold (slow reference)."""
    m, folds = 61, 4
    z, y = gaussian_blocks(m)
    est = fit(z, torch.zeros(m, C), y, confidence="rmd", shrinkage=0.1, calibration_folds=folds, seed=3,
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


def test_crossfit_calibration_moves_less_between_seeds_than_one_split(gaussian_blocks, ood_shift):
    """The calibration centre t_b (which sets how confident a teacher is relative to the others) moves
    with the seed's random split; cross-fitting every sample moves it much less."""
    z, y = gaussian_blocks(120)
    probe = gaussian_blocks(200, shift=ood_shift, seed=9)[0]
    conf = {folds: torch.stack([fit(z, torch.zeros(120, C), y, calibration_folds=folds, seed=s)
                                .confidence(probe, torch.zeros(200, C)).mean(0) for s in range(8)])
            for folds in (0, 5)}  # (seeds, N) mean confidence on shifted inputs
    spread = {folds: (c.max(0).values - c.min(0).values) for folds, c in conf.items()}  # (N,)
    assert (spread[5] < 0.5 * spread[0]).all(), spread


def test_one_split_calibrates_on_a_held_out_fraction(gaussian_blocks):
    """calibration_folds 0: a seeded calibration_fraction of the rows calibrates, the rest fits."""
    m = 40
    z, y = gaussian_blocks(m)
    est = fit(z, torch.zeros(m, C), y, calibration_folds=0, calibration_fraction=0.25, seed=2)
    assert (est.meta["num_calib"], est.meta["num_fit"]) == (10, 30)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(2))
    for b in range(N):
        ref = fit_gaussians(z[perm[10:], b], y[perm[10:]], C, 0.1)
        torch.testing.assert_close(est.tensors["means"][b], ref["means"])
    torch.testing.assert_close(est.tensors["calib_scores"],
                               est.scores(z[perm[:10]], torch.zeros(10, C)).T.sort(dim=1).values)


def test_repeated_crossfit_pools_every_split_and_keeps_the_final_gaussians(gaussian_blocks):
    """calibration_repeats R: R fold splits, each sample scored once per split (R M calibration scores);
    the first split is the one R = 1 uses, and the Gaussians that score new inputs are the same."""
    m = 50
    z, y = gaussian_blocks(m)
    one = fit(z, torch.zeros(m, C), y, calibration_folds=5, calibration_repeats=1, seed=4)
    three = fit(z, torch.zeros(m, C), y, calibration_folds=5, calibration_repeats=3, seed=4)
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
def test_moments_center_is_mean_plus_z_standard_deviations(gaussian_blocks, sd):
    z, y = gaussian_blocks(80)
    est = fit(z, torch.zeros(80, C), y, confidence_center="moments", confidence_center_sd=sd)
    t = est.tensors
    torch.testing.assert_close(t["calib_center"], t["calib_scores"].mean(1) + sd * t["calib_scores"].std(1))
    assert est.meta["center"] == "moments" and est.meta["center_sd"] == sd
    # Cantelli: at most 1 / (1 + z^2) of the calibration scores lie beyond the centre
    beyond = (t["calib_scores"] > t["calib_center"][:, None]).double().mean(1)
    assert (beyond <= 1 / (1 + sd ** 2)).all(), beyond


def test_moments_center_with_repeats_moves_less_between_seeds_than_the_extreme_quantile(gaussian_blocks):
    """The KD weights hang on the centre t_b. An extreme empirical quantile of the out-of-fold scores
    (one split) moves with the fold seed; mean + z sd over repeated splits moves much less."""
    m = 120
    z, y = gaussian_blocks(m)

    def centers(**kw):  # (seeds, N)
        return torch.stack([fit(z, torch.zeros(m, C), y, seed=s, **kw).tensors["calib_center"] for s in range(8)])

    quantile = centers(confidence_center="quantile", confidence_quantile=0.995, calibration_repeats=1)
    moments = centers(confidence_center="moments", confidence_center_sd=3.0, calibration_repeats=4)
    spread = {name: (c.max(0).values - c.min(0).values) / c.mean(0) for name, c in
              {"quantile": quantile, "moments": moments}.items()}  # (N,) relative spread
    assert (spread["moments"] < 0.5 * spread["quantile"]).all(), spread


def test_shared_background_is_fitted_on_the_fit_rows_plus_the_other_teachers_rows(gaussian_blocks, ood_shift):
    """rmd_background all_teachers: each MD_0 (per fold and final) is fitted on the samples its class
    Gaussians use plus the other teachers' rows; the class Gaussians do not see those rows."""
    m, folds = 41, 3
    z, y = gaussian_blocks(m)
    other = gaussian_blocks(25, shift=ood_shift, seed=5)[0]  # (M_o, N, H) another teacher's pseudo-data
    est = fit(z, torch.zeros(m, C), y, calibration_folds=folds, seed=1, background_states=other, calibration_repeats=1)
    assert est.meta["num_background"] == 25
    own = fit(z, torch.zeros(m, C), y, calibration_folds=folds, seed=1)
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
    md = [fit(z, torch.zeros(m, C), y, confidence="md", background_states=bs) for bs in (None, other)]
    torch.testing.assert_close(md[0].tensors["calib_scores"], md[1].tensors["calib_scores"])
    with pytest.raises(ValueError, match="background_states"):
        fit(z, torch.zeros(m, C), y, background_states=other[:, :1])
    with pytest.raises(ValueError, match="background_states must be finite"):
        fit(z, torch.zeros(m, C), y, background_states=other * float("nan"))


def test_contrast_calibrates_on_out_of_fold_scores_of_the_own_and_the_other_teachers_rows(gaussian_blocks, ood_shift):
    """contrast: the other teachers' rows get folds of their own; each is scored by statistics fitted
    without its fold (own rows and background alike), and t_b, tau_b come from the two sets of
    out-of-fit scores (slow reference)."""
    m, m_o, folds = 40, 23, 4
    z, y = gaussian_blocks(m)
    other = gaussian_blocks(m_o)[0] + ood_shift
    est = fit(z, torch.zeros(m, C), y, calibration_folds=folds, seed=5, background_states=other,
              confidence_transform="contrast", contrast_sharpness=5.0)
    assert est.meta["contrast_sharpness"] == 5.0 and est.meta["num_other"] == m_o
    generator = torch.Generator().manual_seed(5)
    perm = torch.randperm(m, generator=generator)
    o_perm = torch.randperm(m_o, generator=generator)
    own_ref, other_ref = torch.empty(m, N, dtype=torch.float64), torch.empty(m_o, N, dtype=torch.float64)
    for f in range(folds):
        held, rest = perm[f::folds], torch.cat([perm[g::folds] for g in range(folds) if g != f])
        o_held, o_rest = o_perm[f::folds], torch.cat([o_perm[g::folds] for g in range(folds) if g != f])
        for b in range(N):
            st = fit_gaussians(z[rest, b], y[rest], C, 0.1, background=torch.cat([z[rest, b], other[o_rest, b]]))
            for rows, feats, ref in ((held, z, own_ref), (o_held, other, other_ref)):
                md = mahalanobis_sq(feats[rows, b].double(), st["means"], st["precision"]).amin(-1)
                md0 = mahalanobis_sq(feats[rows, b].double(), st["bg_mean"][None], st["bg_precision"])[:, 0]
                ref[rows, b] = md - md0
    torch.testing.assert_close(est.tensors["calib_scores"], own_ref.T.sort(dim=1).values)
    torch.testing.assert_close(est.tensors["other_scores"], other_ref.T.sort(dim=1).values)
    center, scale = contrast_calibration(own_ref.T, other_ref.T)
    torch.testing.assert_close(est.tensors["calib_center"], center)
    torch.testing.assert_close(est.tensors["calib_scale"], scale)
    conf = est.confidence(torch.cat([z, other]), torch.zeros(m + m_o, C))[:, -1]
    assert conf[:m].median() > 0.9 and conf[m:].median() < 0.5  # own rows confident, the others not
    with pytest.raises(ValueError, match="other teachers"):
        fit(z, torch.zeros(m, C), y, confidence_transform="contrast")


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_separation_is_the_auroc_of_the_out_of_fit_scores_and_falls_with_the_shift(gaussian_blocks, ood_shift, scale):
    """The label-free separation estimate: per block, the AUROC of the other teachers' out-of-fit scores
    against the own rows' (the pairwise-count reference), kept in the fit's meta; other rows from the
    same distribution sit near chance, far-shifted ones near 1, and it grows with the shift."""
    z, y = gaussian_blocks(60)
    other = gaussian_blocks(45)[0][torch.randperm(45, generator=torch.Generator().manual_seed(9))] + scale * ood_shift
    est = fit(z, torch.zeros(60, C), y, background_states=other, confidence_transform="contrast")
    own, oth = est.tensors["calib_scores"], est.tensors["other_scores"]  # (N, M), (N, M_o)
    pairs = [(oth[b][:, None] > own[b][None]).double().mean() + 0.5 * (oth[b][:, None] == own[b][None]).double().mean()
             for b in range(N)]  # P(another teacher's row scores above an own row), ties half
    expected = [round(float(x), 4) for x in pairs]
    assert est.separation() == pytest.approx(expected, abs=1e-4) and est.meta["separation"] == est.separation()
    last = est.separation()[-1]
    if scale == 0.0:
        assert 0.3 < last < 0.75  # the others' rows are drawn like the own ones
    else:
        assert last > 0.95
    seps = [fit(z, torch.zeros(60, C), y, background_states=other + s * ood_shift,
                confidence_transform="contrast").separation()[-1] for s in (0.0, 0.5, 2.0)]
    assert seps == sorted(seps)
    assert fit(z, torch.zeros(60, C), y, background_states=other).separation() is None  # logistic: no other scores


def test_separation_report_names_each_teacher_and_warns_below_the_threshold():
    metas = {"world": {"separation": [0.7, 0.93]}, "sports": {"separation": [0.6, 0.77]}, "msp_teacher": {}}
    lines = separation_report(metas, 0.8)
    assert len(lines) == 2 and lines[0].endswith("world 0.93, sports 0.77")
    assert lines[1].startswith("warning: teacher 'sports'") and "amalgamation.separation_warning 0.80" in lines[1]
    assert len(separation_report(metas, 0.75)) == 1  # nobody below: no warning
    assert separation_report({"a": {"separation": None}, "b": {}}, 0.8) == []  # nothing estimated: nothing said
    with pytest.raises(ValidationError, match="separation_warning"):
        AmalgamationConfig(separation_warning=0.4)


@pytest.mark.parametrize("shrinkage", [0.0, 0.1])
def test_fewer_samples_than_dimensions_stays_finite(shrinkage):
    h = 64
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, 1, h, generator=g)  # M = 16 < H = 64
    y = torch.arange(16) % 2
    est = fit(z, torch.randn(16, 2, generator=g), y, confidence="rmd", shrinkage=shrinkage)
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
    est = fit(z, torch.zeros(6, 3), y, confidence="rmd", calibration_folds=2)
    assert est.tensors["present"].tolist() == [True, False, False]
    c = est.confidence(torch.randn(3, 1, 4), torch.zeros(3, 3))
    assert torch.isfinite(c).all() and torch.all((c >= 0) & (c <= 1))


def test_bad_data_raise_clear_errors(gaussian_blocks):
    z, y = gaussian_blocks(60)
    with pytest.raises(ValueError, match="labels must be class ids"):
        fit(z, torch.randn(60, C), y + 5)
    with pytest.raises(ValueError, match="held-out samples"):
        fit(z[:3], torch.randn(3, C), y[:3], calibration_folds=0)
    with pytest.raises(ValueError, match="at least 7 held-out samples for 5-fold.*calibration_folds"):
        fit(z[:6], torch.randn(6, C), y[:6])
    fit(z[:7], torch.randn(7, C), y[:7])  # 5 folds of 7: every fit has >= 5 samples
    with pytest.raises(ValueError, match="finite"):
        fit(z * float("nan"), torch.randn(60, C), y)
    with pytest.raises(ValueError, match=r"\(M, N, H\)"):
        fit(z[:, 0], torch.randn(60, C), y)
    with pytest.raises(ValueError, match="at least 2 held-out samples to calibrate MSP"):
        fit(z[:1], torch.randn(1, C), y[:1], confidence="msp")


@pytest.mark.parametrize("field,value", [("confidence_center", "median"), ("confidence_center_sd", float("nan")),
                                         ("calibration_repeats", 0), ("confidence", "energy"),
                                         ("calibration_folds", 1), ("confidence_quantile", 1.0)])
def test_bad_settings_are_refused_where_the_config_is_built(field, value):
    """Settings are checked once, by the config section the fitting takes."""
    with pytest.raises(ValidationError, match=field):
        AmalgamationConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# every teacher, from texts and from a transfer set


@pytest.fixture(scope="module")
def heldout():
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    rows = {n: labelled_sentences(30, seed=200 + i, topics=topics) for i, (n, topics) in enumerate(TEACHER_TOPICS.items())}
    return {n: [t for t, _ in r] for n, r in rows.items()}, \
           {n: [TEACHER_TOPICS[n].index(c) for _, c in r] for n, r in rows.items()}


def test_fit_estimators_fits_each_rmd_background_on_every_teachers_heldout_texts(teachers, heldout):
    """rmd_background all_teachers (default): teacher k's background Gaussian uses its own features of
    all teachers' held-out texts; own: its texts only; md has none."""
    from dfkd_ray.models.teacher import collect_outputs

    texts, classes = heldout
    shared = fit_estimators(teachers, texts, classes, AmalgamationConfig(), seed=0)
    own = fit_estimators(teachers, texts, classes, AmalgamationConfig(rmd_background="own"), seed=0)
    md = fit_estimators(teachers, texts, classes, AmalgamationConfig(confidence="md"), seed=0)
    for name, teacher in teachers.items():
        others = [t for n in teachers if n != name for t in texts[n]]
        assert shared[name].meta["num_background"] == len(others) > 0
        assert own[name].meta["num_background"] == md[name].meta["num_background"] == 0
        states, _ = collect_outputs(teacher, texts[name] + others)  # (M + M_o, N, H)
        m = len(texts[name])
        b = states.shape[1] - 1
        ref = fit_gaussians(states[:m, b], torch.tensor(classes[name]), len(teacher.labels), 0.1,
                            background=states[:, b])
        torch.testing.assert_close(shared[name].tensors["bg_mean"][b], ref["bg_mean"])
        torch.testing.assert_close(own[name].tensors["precision"][b], shared[name].tensors["precision"][b])
    with pytest.raises(ValueError, match="no held-out texts"):
        fit_estimators(teachers, {"alpha": texts["alpha"]}, None, AmalgamationConfig(), seed=0)
    with pytest.raises(ValueError, match="classes for"):
        fit_estimators(teachers, texts, {"alpha": classes["alpha"][:3]}, AmalgamationConfig(), seed=0)


def test_contrast_with_every_method_and_with_one_teacher(teachers, heldout):
    """contrast calibrates rmd, md and msp against the other teachers' held-out texts (own texts most
    confident); a lone teacher has nothing to contrast with and gets the logistic transform."""
    texts, classes = heldout
    for method in ("rmd", "md", "msp"):
        est = fit_estimators(teachers, texts, classes,
                             AmalgamationConfig(confidence=method, confidence_transform="contrast"), seed=0)
        for name, teacher in teachers.items():
            assert est[name].transform == "contrast"
            assert est[name].meta["num_other"] == sum(len(texts[n]) for n in teachers if n != name)
    lone = fit_estimators({"alpha": teachers["alpha"]}, texts, classes,
                          AmalgamationConfig(confidence_transform="contrast"), seed=0)
    assert lone["alpha"].transform == "logistic" and "other_scores" not in lone["alpha"].tensors


def _rows(teacher_names, per_teacher: int, heldout: bool = True):
    return [{"sample_id": f"{t}/{i}", "text": f"text {t} {i}", "label": 0, "label_name": "x", "teacher": t,
             "teacher_class": i % 2, "source": "corpus", "source_params": "{}", "confidence": 1.0,
             "num_tokens": 2, "seed": i, "heldout": heldout and i % 3 != 0} for t in teacher_names
            for i in range(per_teacher)]


def test_heldout_rows_are_each_teachers_heldout_texts_and_classes():
    from dfkd_ray.transfer.schema import rows_to_table

    texts, classes = heldout_rows(rows_to_table(_rows(("alpha", "beta"), 6)), ["alpha", "beta"])
    assert texts == {t: [f"text {t} {i}" for i in (1, 2, 4, 5)] for t in ("alpha", "beta")}
    assert classes == {"alpha": [1, 0, 0, 1], "beta": [1, 0, 0, 1]}


def test_too_few_heldout_rows_for_the_calibration_folds_fail_before_any_teacher_runs(job_dict):
    from dfkd_ray.transfer.schema import rows_to_table

    class Untouchable:
        def __call__(self, *a, **k):
            raise AssertionError("a teacher ran before the held-out rows were counted")

    rows = [{**r, "heldout": True} for r in _rows(("alpha", "beta"), 10)]
    job_dict["amalgamation"] = {"calibration_folds": 9}
    with pytest.raises(ValueError, match=r"need >= 11 per teacher with amalgamation.calibration_folds 9"):
        fit_confidence(validate_config(job_dict), rows_to_table(rows), {"alpha": Untouchable(), "beta": Untouchable()})


def test_separation_report_marks_a_one_class_teacher_whose_confidence_is_scaled_by_elimination():
    metas = {"wbs": {"separation": [0.9], "num_classes": 3}, "sports": {"separation": [0.77], "num_classes": 1}}
    lines = separation_report(metas, 0.8, one_class="elimination")
    assert "sports 0.77 (one class: times what the others leave unclaimed)" in lines[0] and "wbs 0.90," in lines[0]
    assert len(lines) == 2 and lines[1].startswith("warning: teacher 'sports'")  # its own statistics still count
    assert "unclaimed" not in separation_report(metas, 0.8, one_class="own")[0]
    only_one_class = {n: {**m, "num_classes": 1} for n, m in metas.items()}  # nobody to eliminate with
    assert "unclaimed" not in separation_report(only_one_class, 0.8, one_class="elimination")[0]
