"""The fitted estimator on teacher outputs: in- vs out-of-distribution confidences, the scores it
computes from its own statistics, MSP's broadcast, the logistic centre, shape errors, a real teacher."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.confidence import fit_estimator
from dfkd_ray.math.blocks import TeacherOutput
from dfkd_ray.math.confidence import mahalanobis_sq, scores_to_confidence

H, C, N = 16, 3, 2


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def fit(z, logits, y, *, seed: int = 0, **fields):
    """One teacher's rows alone: logistic unless given (contrast needs other teachers' rows)."""
    cfg = AmalgamationConfig(**{"confidence_transform": "logistic", **fields})
    return fit_estimator(z, logits, y, cfg, seed=seed)


@pytest.mark.parametrize("method", ["rmd", "md"])
@pytest.mark.parametrize("transform", ["logistic", "ecdf"])
def test_in_distribution_gets_higher_confidence_than_shifted(gaussian_blocks, ood_shift, method, transform):
    z, y = gaussian_blocks(400)
    est = fit(z, torch.randn(400, C), y, confidence=method, confidence_transform=transform,
              confidence_center="quantile", confidence_quantile=0.95)
    z_in, _ = gaussian_blocks(200, seed=10)
    z_out, _ = gaussian_blocks(200, shift=ood_shift, seed=11)
    c_in = est.confidence(z_in, torch.randn(200, C))  # (B, N)
    c_out = est.confidence(z_out, torch.randn(200, C))
    assert c_in.shape == (200, N) and c_in.dtype == torch.float32
    for c in (c_in, c_out):
        assert torch.all((c >= 0) & (c <= 1))
    labels = [1] * 200 + [0] * 200
    for b in range(N):
        assert roc_auc_score(labels, torch.cat([c_in[:, b], c_out[:, b]]).numpy()) > 0.95
    assert c_in.mean() > 0.4 and c_out.mean() < 0.1


def test_scores_use_the_estimators_own_statistics(gaussian_blocks):
    """rmd scores min_c MD_c - MD_0 and md scores min_c MD_c with the fitted tensors (Eq. 2-4)."""
    z, y = gaussian_blocks(300)
    x = torch.randn(5, H, dtype=torch.float64) * 3
    xx = torch.stack([x, x], 1)  # (5, N, H)
    est_rmd = fit(z, torch.zeros(300, C), y, confidence="rmd", shrinkage=0.0)
    est_md = fit(z, torch.zeros(300, C), y, confidence="md", shrinkage=0.0)
    t = est_rmd.tensors
    md_fit = mahalanobis_sq(x, t["means"][0], t["precision"][0])  # (5, C)
    md0_fit = mahalanobis_sq(x, t["bg_mean"][0][None], t["bg_precision"][0])[:, 0]
    torch.testing.assert_close(est_rmd.scores(xx, torch.zeros(5, C))[:, 0], (md_fit - md0_fit[:, None]).amin(1))
    torch.testing.assert_close(est_md.scores(xx, torch.zeros(5, C))[:, 0], md_fit.amin(1))
    # the confidence is the calibrated transform of those scores
    s = est_rmd.scores(xx, torch.zeros(5, C))
    torch.testing.assert_close(est_rmd.confidence(xx, torch.zeros(5, C)),
                               scores_to_confidence(s, t["calib_scores"], t["calib_center"], t["calib_scale"],
                                                    "logistic"))


def test_msp_broadcasts_final_layer_score_to_all_blocks():
    logits = torch.randn(100, C) * 3
    est = fit(torch.zeros(100, 1, 1), logits, None, confidence="msp")
    peaked = torch.tensor([[10.0, 0.0, 0.0]] * 2)
    flat = torch.zeros(2, C)
    out = TeacherOutput(logits=torch.cat([peaked, flat]), block_states=torch.zeros(4, 5, 7), mask=torch.ones(4, 3))
    c = est(out)  # (B, N) with N from the output, H ignored
    assert c.shape == (4, 5)
    assert torch.equal(c, c[:, :1].expand(-1, 5))
    assert torch.all(c[:2] > c[2:])


def test_logistic_puts_the_quantile_at_one_half(gaussian_blocks):
    z, y = gaussian_blocks(400)
    est = fit(z, torch.randn(400, C), y, confidence_center="quantile", confidence_quantile=0.9)
    t = est.tensors
    torch.testing.assert_close(t["calib_center"], torch.quantile(t["calib_scores"], 0.9, dim=1))
    share_above_half = (scores_to_confidence(t["calib_scores"].T, t["calib_scores"], t["calib_center"],
                                             t["calib_scale"], "logistic") > 0.5).double().mean()
    assert abs(share_above_half.item() - 0.9) < 0.02


def test_scoring_input_errors(gaussian_blocks):
    z, y = gaussian_blocks(60)
    est = fit(z, torch.randn(60, C), y)
    with pytest.raises(ValueError, match="N = 2 blocks"):
        est.confidence(torch.randn(4, 3, H), torch.randn(4, C))
    with pytest.raises(ValueError, match="hidden size"):
        est.confidence(torch.randn(4, N, H + 1), torch.randn(4, C))
    with pytest.raises(ValueError, match="classes"):
        est.confidence(torch.randn(4, N, H), torch.randn(4, C + 1))
    with pytest.raises(ValueError, match="one B"):
        est.scores(torch.randn(4, N, H), torch.randn(5, C))


def test_real_teacher_is_more_confident_on_its_own_topics(teachers):
    """Teacher alpha (sports, cooking), fitted on its own topics, trusts them more than beta's topics."""
    from dfkd_ray.models.teacher import collect_outputs
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    alpha = teachers["alpha"]
    own = labelled_sentences(40, seed=100, topics=TEACHER_TOPICS["alpha"])
    states, logits = collect_outputs(alpha, [t for t, _ in own])
    classes = torch.tensor([alpha.labels.index(c) for _, c in own])
    est = fit(states, logits, classes, confidence="rmd")
    test_in = [t for t, _ in labelled_sentences(20, seed=101, topics=TEACHER_TOPICS["alpha"])]
    test_out = [t for t, _ in labelled_sentences(20, seed=102, topics=TEACHER_TOPICS["beta"])]
    c_in, c_out = est(alpha(test_in)), est(alpha(test_out))  # (B, 3)
    labels = [1] * len(test_in) + [0] * len(test_out)
    # 0.93-0.99 over fixture builds (teachers are trained at build time; chance is 0.5)
    assert roc_auc_score(labels, torch.cat([c_in, c_out]).mean(1).numpy()) > 0.85
