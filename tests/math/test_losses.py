"""StrataNet losses: block L2 (Eq. 7), union-space KD target and KL, total (Eq. 8), on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfkd_ray.math.losses import block_loss, concat_target, kd_loss, total_loss, union_target


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def idx(*ids: int) -> torch.Tensor:
    return torch.tensor(ids)


@pytest.mark.parametrize("temperature", [0.75, 1.0, 3.0])
def test_two_identical_teachers_give_that_teachers_distribution(temperature):
    z = torch.randn(5, 3)
    w = torch.rand(5, 2)  # any confidences
    target = union_target([z, z.clone()], [idx(2, 0, 1), idx(2, 0, 1)], w, num_labels=3, temperature=temperature)
    expected = F.softmax(z / temperature, -1)[:, [1, 2, 0]]  # teacher class c sits at global id (2, 0, 1)[c]
    torch.testing.assert_close(target, expected)


def test_kl_is_zero_when_the_student_matches_and_positive_otherwise():
    temperature = 0.75
    z = torch.randn(4, 3)
    target = union_target([z, z], [idx(0, 1, 2), idx(0, 1, 2)], torch.ones(4, 2), 3, temperature)
    matching = temperature * target.log() + 7.0  # softmax(matching / T) == target; a shift changes nothing
    assert kd_loss(matching, target, temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(torch.randn(4, 3), target, temperature).item() > 1e-3


def test_kl_matches_torch_kl_div_times_t_squared():
    t = 2.0
    s, p = torch.randn(6, 5), F.softmax(torch.randn(6, 5), -1)
    expected = F.kl_div(F.log_softmax(s / t, -1), p, reduction="batchmean") * t ** 2
    torch.testing.assert_close(kd_loss(s, p, t), expected)


def test_kl_handles_zero_target_probabilities():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    s = torch.tensor([[1.0, 1.0, -2.0, 0.0]])
    loss = kd_loss(s, p, 1.0)
    q = F.softmax(s, -1)
    expected = 0.5 * math.log(0.5 / q[0, 0].item()) + 0.5 * math.log(0.5 / q[0, 1].item())
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, rel=1e-5)


def test_disjoint_teachers_are_placed_into_the_union_and_weighted():
    # teacher A knows global labels 0, 1; teacher B knows 2, 3
    za, zb = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    pa, pb = F.softmax(za, -1)[0], F.softmax(zb, -1)[0]
    only_a = union_target([za, zb], [idx(0, 1), idx(2, 3)], torch.tensor([[0.9, 0.0]]), 4)
    torch.testing.assert_close(only_a[0], torch.cat([pa, torch.zeros(2)]))  # classes A doesn't know get 0
    mixed = union_target([za, zb], [idx(0, 1), idx(2, 3)], torch.tensor([[0.6, 0.2]]), 4)
    torch.testing.assert_close(mixed[0], torch.cat([0.75 * pa, 0.25 * pb]))  # wbar = c / sum c
    torch.testing.assert_close(mixed.sum(-1), torch.ones(1))


def test_overlapping_labels_collect_mass_from_every_teacher_that_knows_them():
    # both know global label 1 ("sports"); A also 0, B also 2
    za, zb = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])  # A: (.5, .5); B: (.25, .75)
    target = union_target([za, zb], [idx(0, 1), idx(2, 1)], torch.tensor([[1.0, 1.0]]), 3)
    torch.testing.assert_close(target[0], torch.tensor([0.25, 0.5 * 0.5 + 0.5 * 0.75, 0.125]))


def test_all_zero_confidences_fall_back_to_uniform_teacher_weights():
    za, zb = torch.randn(3, 2), torch.randn(3, 2)
    target = union_target([za, zb], [idx(0, 1), idx(2, 3)], torch.zeros(3, 2), 4)
    torch.testing.assert_close(target.sum(-1), torch.ones(3))
    torch.testing.assert_close(target[:, :2], 0.5 * F.softmax(za, -1))


def test_block_loss_on_hand_values_and_scale_invariance():
    a = torch.randn(2, 3, 8)
    assert block_loss(2.5 * a, a).item() == pytest.approx(0.0, abs=1e-6)  # same direction -> 0
    assert block_loss(-a, a).item() == pytest.approx(4.0 * 3)  # opposite -> 4 per block, summed over N = 3
    s = torch.tensor([[[1.0, 0.0]]])
    t = torch.tensor([[[0.0, 3.0]]])
    assert block_loss(s, t).item() == pytest.approx(2.0)  # orthogonal unit vectors


def test_block_loss_gradients_reach_both_sides():
    s = torch.randn(4, 2, 6, requires_grad=True)
    a = torch.randn(4, 2, 6, requires_grad=True)
    block_loss(s, a).backward()
    assert s.grad.abs().sum() > 0 and a.grad.abs().sum() > 0


def test_total_loss_is_the_weighted_sum():
    b, k = torch.tensor(0.7), torch.tensor(1.9)
    assert total_loss(b, k, 2.0, 0.5).item() == pytest.approx(2.0 * 0.7 + 0.5 * 1.9)
    assert total_loss(b, k, 0.0, 1.0).item() == pytest.approx(1.9)
    with pytest.raises(ValueError, match="alpha and beta"):
        total_loss(b, k, -1.0, 1.0)


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(2, 2)
    with pytest.raises(ValueError, match="K = 0"):
        union_target([], [], torch.zeros(2, 0), 2)
    with pytest.raises(ValueError, match="label indices"):
        union_target([z], [], torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match=r"weights must be \(B, K\)"):
        union_target([z], [idx(0, 1)], torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="non-negative"):
        union_target([z], [idx(0, 1)], -torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="global label ids"):
        union_target([z], [idx(0, 5)], torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="two classes map to one"):
        union_target([z], [idx(1, 1)], torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="label index has"):
        union_target([z], [idx(0, 1, 2)], torch.ones(2, 1), 3)
    with pytest.raises(ValueError, match="temperature"):
        union_target([z], [idx(0, 1)], torch.ones(2, 1), 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        kd_loss(torch.randn(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        block_loss(torch.randn(2, 3, 4), torch.randn(2, 2, 4))


def test_concat_target_is_one_softmax_over_all_teachers():
    z1, z2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, -1.0, 3.0]])
    idx = [torch.tensor([0, 1]), torch.tensor([2, 1, 3])]  # label 1 shared by both teachers
    p = concat_target([z1, z2], idx, 4, temperature=0.5)
    q = torch.softmax(torch.tensor([2.0, 0.0, 1.0, -1.0, 3.0]) / 0.5, -1)
    assert torch.allclose(p[0], torch.stack([q[0], q[1] + q[3], q[2], q[4]]))
    assert torch.allclose(p.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="label indices"):
        concat_target([z1], [torch.tensor([0, 9])], 4)


def test_centred_block_loss_ignores_a_shared_component():
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    shift = 50 * torch.randn(1, 2, 8, generator=g)  # one vector added to every target
    assert torch.allclose(block_loss(s, a + shift, center=True), block_loss(s, a, center=True), atol=1e-4)
    assert not torch.allclose(block_loss(s, a + shift), block_loss(s, a), atol=1e-2)
    # matching only the shared part: zero uncentred loss is reachable by a constant, not the centred one
    assert block_loss(shift.expand(6, 2, 8), a + shift) < 0.5 < block_loss(shift.expand(6, 2, 8) + 1e-3 * s, a + shift, center=True)
    with pytest.raises(ValueError, match="at least 2"):
        block_loss(s[:1], a[:1], center=True)


def test_block_loss_centred_within_groups_ignores_each_groups_own_offset():
    """Centred within groups, a component shared by one group's targets (a teacher's domain offset) does
    not enter the loss; centred over the batch it does. Equals a slow reference that centres each group
    apart."""
    g = torch.Generator().manual_seed(1)
    s, a = torch.randn(8, 3, 4, generator=g), torch.randn(8, 3, 4, generator=g)
    groups = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1])
    offset = 30 * torch.randn(3, 1, 3, 4, generator=g)[groups][:, 0]  # (B, N, D): one vector a group
    grouped = block_loss(s, a, center=True, groups=groups)
    assert torch.allclose(block_loss(s, a + offset, center=True, groups=groups), grouped, atol=1e-4)
    assert not torch.allclose(block_loss(s, a + offset, center=True), block_loss(s, a, center=True), atol=1e-2)
    ref_s, ref_a = s.clone(), a.clone()
    for k in groups.unique():
        rows = groups == k
        ref_s[rows] = s[rows] - s[rows].mean(0)
        ref_a[rows] = a[rows] - a[rows].mean(0)
    assert torch.allclose(grouped, block_loss(ref_s, ref_a), atol=1e-5)
    assert torch.allclose(block_loss(s, a, center=True, groups=torch.zeros(8, dtype=torch.long)),
                          block_loss(s, a, center=True), atol=1e-6)  # one group: the batch
    with pytest.raises(ValueError, match=r"groups must be \(B,\)"):
        block_loss(s, a, center=True, groups=groups[:3])
