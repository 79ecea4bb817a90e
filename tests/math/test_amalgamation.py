"""ST-amalg and its ablations (StrataNet Eq. 5-6, section 7.1.2) and the KD teacher weights, on hand-made
tensors with heterogeneous teacher widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd_ray.math.amalgamation import BlockAmalgamation, kd_teacher_weights, normalized_weights

DIMS = (32, 48, 20)
N, D, B = 3, 16, 5


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def module(dims=DIMS, num_blocks: int = N, dim: int = D, **settings) -> BlockAmalgamation:
    """A fusion module with ``settings`` over ST-amalg's (4 heads, no dropout, one layer per block)."""
    return BlockAmalgamation(dims, num_blocks, dim, **{"heads": 4, "fusion": "st", "dropout": 0.0,
                                                       "share_layer": False, **settings})


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(B, N, h, generator=g) for h in DIMS]  # K x (B, N, H_k)
    conf = [torch.rand(B, N, generator=g) for _ in DIMS]  # K x (B, N)
    return states, conf


@pytest.mark.parametrize("fusion", ["st", "mul", "no_st"])
@pytest.mark.parametrize("share", [False, True])
def test_shapes_with_heterogeneous_widths(fusion, share):
    m = module(heads=4, fusion=fusion, share_layer=share)
    states, conf = inputs()
    out = m(states, conf)
    assert out.shape == (B, N, D) and torch.isfinite(out).all()


def test_share_layer_uses_one_transformer_layer():
    per_block = module(fusion="st")
    shared = module(fusion="st", share_layer=True)
    assert len(per_block.layers) == N and len(shared.layers) == 1
    assert shared.amalg_token.shape == (N, D)  # each block keeps its own [AMALG] token


def test_st_enriches_with_confidence_so_a_zero_confidence_teacher_still_speaks():
    m = module(fusion="st").eval()
    states, conf = inputs()
    conf[1] = torch.zeros(B, N)
    changed = list(states)
    changed[1] = states[1] + 3.0 * torch.randn_like(states[1])
    assert not torch.allclose(m(states, conf), m(changed, conf))  # Eq. 5 adds c u, it does not gate
    other = [c.clone() for c in conf]
    other[0] = 1.0 - other[0]
    assert not torch.allclose(m(states, conf), m(states, other))  # confidence is an input


def test_mul_multiplies_so_a_zero_confidence_teacher_is_silenced():
    m = module(fusion="mul").eval()
    assert not hasattr(m, "conf_embed")
    states, conf = inputs()
    conf[1] = torch.zeros(B, N)
    changed = list(states)
    changed[1] = states[1] + 3.0 * torch.randn_like(states[1])
    torch.testing.assert_close(m(states, conf), m(changed, conf))
    # and the token is exactly c * W LN(h): scaling one teacher's confidence changes the output
    half = [c.clone() for c in conf]
    half[0] = 0.5 * conf[0]
    assert not torch.allclose(m(states, conf), m(states, half))


def test_no_st_is_a_linear_layer_over_the_confidence_weighted_mean():
    m = module(fusion="no_st").eval()
    assert not hasattr(m, "layers") and not hasattr(m, "amalg_token")
    states, conf = inputs()
    w = normalized_weights(torch.stack(conf, -1))  # (B, N, K)
    expected = torch.stack([
        m.out[b](sum(w[:, b, k:k + 1] * m.proj[b][k](F.layer_norm(states[k][:, b], (DIMS[k],)))
                     for k in range(len(DIMS))))
        for b in range(N)], dim=1)  # (B, N, D)
    torch.testing.assert_close(m(states, conf), expected)
    # the weights are normalised: scaling every confidence by the same factor changes nothing
    torch.testing.assert_close(m(states, [0.3 * c for c in conf]), expected)


def test_fusions_differ_on_the_same_inputs():
    states, conf = inputs()
    outs = {}
    for fusion in ("st", "mul", "no_st"):
        torch.manual_seed(0)
        outs[fusion] = module(fusion=fusion).eval()(states, conf)
    assert not torch.allclose(outs["st"], outs["mul"]) and not torch.allclose(outs["mul"], outs["no_st"])


@pytest.mark.parametrize("fusion", ["st", "mul", "no_st"])
def test_gradients_reach_every_parameter_and_not_the_inputs(fusion):
    m = module(fusion=fusion)
    states, conf = inputs()
    m(states, conf).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(h.grad is None and not h.requires_grad for h in states)


def test_bad_inputs_raise_clear_errors():
    m = module()
    states, conf = inputs()
    with pytest.raises(ValueError, match="K = 0"):
        m([], [])
    with pytest.raises(ValueError, match="K = 0"):
        module([])
    with pytest.raises(ValueError, match="confidences of 2"):
        m(states, conf[:2])
    with pytest.raises(ValueError, match="built for 3 teachers"):
        m(states[:2], conf[:2])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        m(states, [conf[0] + 1.5] + conf[1:])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        m(states, [conf[0] * float("nan")] + conf[1:])
    with pytest.raises(ValueError, match="hidden size 33"):
        m([torch.randn(B, N, 33)] + states[1:], conf)
    with pytest.raises(ValueError, match="disagree"):
        m([states[0], torch.randn(B, N + 1, DIMS[1]), states[2]], conf)
    with pytest.raises(ValueError, match="N = 4 blocks"):
        m([torch.randn(B, 4, h) for h in DIMS], [torch.rand(B, 4) for _ in DIMS])
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        m(states, [torch.rand(B, N + 1)] + conf[1:])
    with pytest.raises(ValueError, match="unknown fusion"):
        module(fusion="concat")
    with pytest.raises(ValueError, match="divisible"):
        module(dim=18)


def test_kd_teacher_weights_power_properties():
    c = torch.tensor([[0.84, 0.60, 0.10], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [1e-30, 1e-31, 0.0]])
    torch.testing.assert_close(kd_teacher_weights(c, 1.0), normalized_weights(c))  # proportional (the paper)
    torch.testing.assert_close(kd_teacher_weights(c, 0.0), torch.full_like(c, 1 / 3))  # uniform mix
    for power in (0.5, 2.0, 8.0, 1000.0):
        w = kd_teacher_weights(c, power)
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(len(c)))
        ref = c[0].double() ** power / (c[0].double() ** power).sum()  # float64: 0.84^1000 ~ 1e-76
        torch.testing.assert_close(w[0], ref.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w[1:3], torch.full((2, 3), 1 / 3))  # ties and all-zero rows: uniform
        torch.testing.assert_close(w[3], torch.tensor([0.0, 1.0, 0.0]))
    # sharper with the power, and the top teacher alone in the limit (no underflow to an all-zero row)
    tops = [kd_teacher_weights(c, p)[0, 0].item() for p in (1.0, 2.0, 8.0, 1000.0)]
    assert tops == sorted(tops) and tops[-1] == pytest.approx(1.0)
    assert kd_teacher_weights(c, 8.0)[0, 1].item() == pytest.approx(0.0635, abs=1e-3)  # the docstring's example
    assert kd_teacher_weights(c, 1000.0)[4].argmax().item() == 0  # tiny confidences still order the teachers
    with pytest.raises(ValueError, match="power"):
        kd_teacher_weights(c, -1.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        kd_teacher_weights(c[0], 2.0)


def test_with_source_teacher_mixes_the_weights_toward_each_rows_source():
    """``(1 - rho) wbar + rho onehot(k*)``: rows still sum to 1, rho 0 is the paper's weights, rho 1 the
    source teacher alone, a row without a source (-1) keeps wbar; equal to a per-row loop."""
    from dfkd_ray.math.amalgamation import with_source_teacher

    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(6, 3, generator=g), -1)  # (B, K)
    source = torch.tensor([0, 2, 1, -1, 2, 0])
    for rho in (0.0, 0.3, 1.0):
        out = with_source_teacher(w, source, rho)
        torch.testing.assert_close(out.sum(-1), torch.ones(6))
        for b in range(6):
            expected = w[b].clone()
            if source[b] >= 0:
                expected = (1 - rho) * w[b]
                expected[source[b]] += rho
            torch.testing.assert_close(out[b], expected)
    torch.testing.assert_close(with_source_teacher(w, source, 0.0), w)
    assert with_source_teacher(w, source, 1.0)[:3].argmax(-1).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        with_source_teacher(w, source, 1.5)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        with_source_teacher(w, source[:4], 0.5)
    with pytest.raises(ValueError, match="K = 3"):
        with_source_teacher(w, torch.tensor([0, 3, 1, 0, 0, 0]), 0.5)
