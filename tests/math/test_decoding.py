"""The pure decoding math of StrataNet Eq. 1 (dfkd_ray.math.decoding), on hand-made tensors."""

from __future__ import annotations


import pytest
import torch

from dfkd_ray.math.decoding import (control_weights, lm_nucleus, reweight, row_uniforms, sample_candidates,
                                    sample_top_k, select_top_m)


def _logits(B: int, V: int, seed: int, *, quantize: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    if quantize:  # bf16-like values: many exact ties
        x = (x * 4).round() / 4
    return x


def _reference_top_m(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow: sort every row by (value desc, id asc) with Python's sort."""
    vals, ids = [], []
    for row in x.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:m]
        vals.append([row[i] for i in order])
        ids.append(order)
    return torch.tensor(vals, dtype=x.dtype), torch.tensor(ids)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("m", [1, 7, 50, 200])
def test_select_top_m_orders_by_value_then_id(quantize, m):
    x = _logits(6, 200, seed=m, quantize=quantize)
    vals, ids = select_top_m(x, m)
    ref_vals, ref_ids = _reference_top_m(x, m)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(vals, ref_vals)


def test_select_top_m_breaks_ties_at_the_cut_by_lowest_id():
    x = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    vals, ids = select_top_m(x, 3)
    assert ids.tolist() == [[4, 1, 2]]
    assert vals.tolist() == [[2.0, 1.0, 1.0]]


@pytest.mark.parametrize("mass", [0.05, 0.5, 0.9, 0.999])
def test_lm_nucleus_is_the_smallest_prefix_reaching_the_mass(mass):
    """The kept candidates are a prefix of each row, start with the best one, and are the fewest
    whose LM probability reaches ``mass`` (all ``m`` when the top-m hold less); a larger mass keeps more."""
    lp = torch.log_softmax(_logits(32, 300, seed=7), -1)
    values, _ = select_top_m(lp, 40)  # (32, 40)
    keep = lm_nucleus(values, mass)  # (32, 40)
    probs = values.exp()
    n = keep.sum(-1)
    assert keep[:, 0].all() and torch.equal(keep, torch.arange(40) < n.view(-1, 1))  # a prefix
    reached = torch.stack([probs[b, :n[b]].sum() for b in range(32)])
    assert bool(((reached >= mass - 1e-6) | (n == 40)).all())  # enough mass, or the whole top-m
    short = torch.stack([probs[b, :n[b] - 1].sum() for b in range(32)])
    assert bool((short < mass).all())  # one fewer would not be
    assert bool((lm_nucleus(values, min(1.0, mass + 0.05)).sum(-1) >= n).all())
    assert lm_nucleus(values, 1.0).all()
    with pytest.raises(ValueError, match="mass"):
        lm_nucleus(values, 0.0)


def test_reweight_is_eq1_and_drops_the_teacher_at_lambda_zero():
    lm = torch.log_softmax(_logits(3, 5, seed=1), -1)
    teacher = torch.log_softmax(_logits(3, 5, seed=2), -1)
    teacher[1, 2] = float("-inf")  # a teacher value that would make 0 * -inf = NaN
    lam = torch.tensor([2.0, 0.0, 0.5])
    out = reweight(lm, teacher, lam)
    assert torch.equal(out[1], lm[1])  # exactly the LM's log-probabilities
    assert torch.allclose(out[0], lm[0] + 2.0 * teacher[0])
    assert torch.allclose(out[2], lm[2] + 0.5 * teacher[2])
    assert torch.equal(reweight(lm, teacher, 0.0), lm)
    with pytest.raises(ValueError, match="lambda"):
        reweight(lm, teacher, torch.tensor([1.0, -0.1, 1.0]))


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("top_k,m,top_p,temperature", [(1, 5, 1.0, 1.0), (10, 10, 0.9, 1.0), (20, 50, 0.9, 0.7),
                                                        (50, 200, 1.0, 1.3), (5, 300, 0.5, 1.0)])
def test_lambda_zero_equals_plain_top_k_sampling(quantize, top_k, m, top_p, temperature):
    """Eq. 1 with lambda = 0 over the top-m samples exactly what top-k sampling of the full logits samples
    (the step that composes these functions, ``steer_step``, is checked the same way in
    tests/generation/test_steering.py)."""
    B, V = 64, 300
    logits = _logits(B, V, seed=top_k + m, quantize=quantize)
    teacher = torch.log_softmax(_logits(B, min(m, V), seed=99), -1)
    for step in range(4):
        u = row_uniforms(list(range(100 + step * B, 100 + (step + 1) * B)), 1)[:, 0]
        plain = sample_top_k(logits, u, top_k=top_k, top_p=top_p, temperature=temperature)
        values, ids = select_top_m(torch.log_softmax(logits, -1), m)  # (B, m)
        scores = reweight(values, teacher, torch.zeros(B))  # (B, m) Eq. 1 with lambda_t = 0
        guided = sample_candidates(scores, ids, u, top_k=top_k, top_p=top_p, temperature=temperature)
        assert torch.equal(plain, guided)


def test_sampling_follows_the_truncated_distribution():
    """Frequencies over many draws match softmax(scores / T) renormalized over the top-k nucleus."""
    scores = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    ids = torch.tensor([[40, 7, 12, 3, 99, 5]])
    n = 40_000
    u = row_uniforms([7], n)[0]  # one row's stream, used as n independent single-row draws
    chosen = sample_candidates(scores.expand(n, -1), ids.expand(n, -1), u, top_k=4, top_p=0.8, temperature=0.8)
    probs = torch.softmax(scores[0, :4] / 0.8, -1)
    keep = (probs.cumsum(0) - probs) < 0.8
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    observed = torch.tensor([(chosen == t).float().mean().item() for t in ids[0, :4].tolist()])
    assert set(chosen.unique().tolist()) == {t for t, k in zip(ids[0, :4].tolist(), keep.tolist()) if k}
    assert torch.allclose(observed, expected, atol=0.01)


def test_sampling_ignores_candidate_order_and_handles_u_near_one():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(32, 20, generator=g)
    ids = torch.stack([torch.randperm(1000, generator=g)[:20] for _ in range(32)])
    u = row_uniforms(range(32), 1)[:, 0]
    a = sample_candidates(scores, ids, u, top_k=8, top_p=0.9)
    perm = torch.randperm(20, generator=g)
    b = sample_candidates(scores[:, perm], ids[:, perm], u, top_k=8, top_p=0.9)
    assert torch.equal(a, b)
    top1 = ids.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    assert torch.equal(sample_candidates(scores, ids, u, top_k=1), top1)  # k = 1 is greedy
    assert torch.equal(sample_candidates(scores, ids, u, top_k=20, top_p=1e-6), top1)  # tiny nucleus is greedy
    near_one = torch.full((32,), 1.0 - 2.0 ** -53, dtype=torch.float64)
    picked = sample_candidates(scores, ids, near_one, top_k=5, top_p=0.3)
    kept = ids.gather(1, scores.argsort(1, descending=True)[:, :5])
    assert all(p in row for p, row in zip(picked.tolist(), kept.tolist()))


def test_bad_sampling_arguments_raise():
    s, i, u = torch.zeros(2, 3), torch.arange(6).view(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="top_k"):
        sample_candidates(s, i, u, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_candidates(s, i, u, top_k=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_candidates(s, i, u, top_k=2, top_p=1.5)


def test_row_uniforms_do_not_depend_on_the_batch():
    seeds = [11, 2**62 + 5, 0, 11]
    both = row_uniforms(seeds, 16)
    assert both.dtype == torch.float64 and both.shape == (4, 16)
    for b, s in enumerate(seeds):
        assert torch.equal(both[b], row_uniforms([s], 16)[0])
    assert torch.equal(both[0], both[3]) and not torch.equal(both[0], both[2])
    assert ((both >= 0) & (both < 1)).all()


def test_control_weights_schedules():
    steps = torch.tensor([0, 1, 10, 100])
    strength = torch.tensor([8.0, 8.0, 2.0, 4.0])
    assert torch.equal(control_weights(steps, strength, "constant"), strength)
    decay = control_weights(steps, strength, "decay", decay_rate=0.9, floor=0.25)
    expected = strength * torch.tensor([1.0, 0.9, 0.9 ** 10, 0.25])
    assert torch.allclose(decay, expected)
    assert (decay[:-1] > 0).all() and decay[0] == 8.0
    with pytest.raises(ValueError, match="schedule"):
        control_weights(steps, strength, "linear")

