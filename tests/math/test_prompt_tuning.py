"""The pure math of DFKD-T3 prompt tuning (dfkd_ray.math.prompt_tuning), on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dfkd_ray.math.prompt_tuning import (distinct_n, diversity_loss, gumbel_noise, gumbel_softmax, specificity_loss,
                                         stable_sample, straight_through)

LOGITS = torch.tensor([[1.0, 0.0, -1.0, float("-inf"), 0.5]])  # (1, V): token 3 may not be drawn


def _frequencies(draws: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(draws.flatten(), minlength=V).float() / draws.numel()


@pytest.mark.parametrize("stable_level", [1.0, 5.0, 0.5])
def test_gumbel_draws_sample_softmax_of_the_scaled_logits(stable_level):
    """x = argmax(s * z + g) is a draw of softmax(s * z): the stable level scales the logits against the noise."""
    n = 40_000
    logits = LOGITS.expand(n, -1)
    g = gumbel_noise(logits.shape, torch.Generator().manual_seed(0))
    y_soft, x = gumbel_softmax(logits, g, stable_level=stable_level)
    expected = torch.softmax(stable_level * LOGITS[0], -1)
    assert torch.allclose(_frequencies(x, 5), expected, atol=0.01)
    assert int((x == 3).sum()) == 0
    assert torch.allclose(y_soft.sum(-1), torch.ones(n))
    # the relaxation temperature shapes y_soft, never the draw
    y_cold, x_cold = gumbel_softmax(logits, g, stable_level=stable_level, temperature=0.1)
    assert torch.equal(x_cold, x) and not torch.allclose(y_cold, y_soft)


def test_straight_through_is_the_draw_in_value_and_the_relaxation_in_gradient():
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = gumbel_noise((4, 6), torch.Generator().manual_seed(2))
    w = torch.randn(6, generator=torch.Generator().manual_seed(3))
    y_soft, x = gumbel_softmax(z, g, stable_level=2.0, temperature=0.7)
    y = straight_through(y_soft, x)
    assert torch.allclose(y, torch.nn.functional.one_hot(x, 6).float(), atol=1e-6)
    (grad_st,) = torch.autograd.grad((y @ w).sum(), z)
    y_soft, _ = gumbel_softmax(z, g, stable_level=2.0, temperature=0.7)
    (grad_soft,) = torch.autograd.grad((y_soft @ w).sum(), z)
    assert torch.allclose(grad_st, grad_soft)


def test_stable_sample_is_an_inverse_cdf_of_the_scaled_softmax():
    u = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000  # a fine grid of uniforms
    logits = LOGITS.expand(len(u), -1)
    for s in (1.0, 3.0):
        x = stable_sample(logits, u, stable_level=s)
        assert torch.allclose(_frequencies(x, 5), torch.softmax(s * LOGITS[0], -1), atol=1e-3)
        assert torch.equal(x, x.sort().values)  # token-id order: u -> x is monotone
    # u close to 1 stays on the last token with mass, never on a token that may not be drawn
    assert stable_sample(torch.tensor([[0.0, 0.0, float("-inf")]]), torch.tensor([1 - 1e-17]), stable_level=1.0) == 1
    # a very high level is greedy
    assert stable_sample(LOGITS, torch.tensor([0.999]), stable_level=500.0).item() == 0


def test_stable_level_must_be_positive():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="stable_level"):
            gumbel_softmax(LOGITS, torch.zeros_like(LOGITS), stable_level=bad)
        with pytest.raises(ValueError, match="stable_level"):
            stable_sample(LOGITS, torch.tensor([0.5]), stable_level=bad)


def test_specificity_is_the_cross_entropy_toward_the_target():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    targets = torch.tensor([0, 0, 1])
    expected = -torch.log_softmax(logits, -1)[torch.arange(3), targets].mean()
    assert torch.allclose(specificity_loss(logits, targets), expected)


def test_diversity_is_zero_for_balanced_predictions_and_log_c_for_one_class():
    balanced = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    assert diversity_loss(balanced).item() == pytest.approx(0.0, abs=1e-3)
    collapsed = torch.tensor([[30.0, 0.0, 0.0]] * 4)
    assert diversity_loss(collapsed).item() == pytest.approx(math.log(3), abs=1e-4)
    half = torch.tensor([[30.0, 0.0], [30.0, 0.0], [0.0, 30.0], [0.0, 30.0]])
    assert diversity_loss(half).item() == pytest.approx(0.0, abs=1e-6)


def test_distinct_n_counts_distinct_ngrams_over_all_ngrams():
    texts = [["a", "b", "a", "b"], ["a", "b", "c"]]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert distinct_n([["x"]], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)
