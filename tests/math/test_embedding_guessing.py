"""AS-DFD's pseudo-embeddings and losses (Eq. 2, 3, 5): alignment constraints, seeded starts, masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd_ray.math.embedding_guessing import (align, cls_distance_loss, content_positions, gather_positions,
                                              initial_content, input_loss, mask_embeddings, mask_positions,
                                              masked_embedding_loss)


def _specials(l: int, d: int):
    return torch.full((d,), 1.0), torch.arange(l * d, dtype=torch.float).view(l, d) + 2, torch.full((l, d), -1.0)


def test_alignment_puts_cls_and_sep_at_the_ends_and_masks_the_tail():
    content = torch.randn(2, 6, 4, requires_grad=True)
    lengths = torch.tensor([6, 4])
    cls, sep, pad = _specials(6, 4)
    e, mask = align(content, lengths, cls, sep, pad)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert torch.equal(e[:, 0], torch.stack([cls, cls]))
    assert torch.equal(e[0, 5], sep[5]) and torch.equal(e[1, 3], sep[3])  # [SEP] at its own position
    assert torch.equal(e[1, 4:], pad[4:])
    assert torch.equal(e[0, 1:5], content[0, 1:5]) and torch.equal(e[1, 1:3], content[1, 1:3])
    e.sum().backward()  # gradients reach the content positions only: the constraints stay fixed
    assert content.grad[:, 0].abs().sum() == 0 and content.grad[0, 5].abs().sum() == 0
    assert content.grad[1, 3:].abs().sum() == 0
    assert torch.equal(content.grad[0, 1:5], torch.ones(4, 4))
    assert content_positions(lengths, 6).sum(1).tolist() == [4, 2]


def test_initial_content_is_seeded_per_sample_and_scaled_by_sigma():
    def start(seeds, sigma=0.35, mean=0.0):
        return initial_content([torch.Generator().manual_seed(s) for s in seeds], 64, 32, mean=mean, sigma=sigma,
                               min_length=5)

    a, la = start([1, 2])
    b, lb = start([7, 2])  # sample 2 starts the same whatever shares its batch
    assert torch.equal(a[1], b[1]) and la[1] == lb[1] and not torch.equal(a[0], b[0])
    lengths = start(range(200))[1]
    assert lengths.min() >= 5 and lengths.max() <= 64 and len(set(lengths.tolist())) > 20
    big, _ = start(range(8), sigma=1.0, mean=0.5)
    assert abs(big.mean().item() - 0.5) < 0.02 and abs(big.std().item() - 1.0) < 0.02
    assert abs(start(range(8))[0].std().item() - 0.35) < 0.01
    with pytest.raises(ValueError, match="sigma must be > 0"):
        start([1], sigma=0.0)
    with pytest.raises(ValueError, match="min_length"):
        initial_content([torch.Generator()], 4, 8, mean=0.0, sigma=1.0, min_length=5)


def test_masking_replaces_one_content_position_per_sample():
    lengths = torch.tensor([3, 10, 128] * 50)
    positions = mask_positions(lengths, torch.Generator().manual_seed(0))
    assert (positions >= 1).all() and (positions <= lengths - 2).all()
    assert positions[0] == 1 and len(set(positions[2::3].tolist())) > 20
    e = torch.randn(2, 5, 3)
    where = torch.tensor([1, 3])
    table = torch.arange(15, dtype=torch.float).view(5, 3)  # the [MASK] embedding at each position
    masked = mask_embeddings(e, where, table)
    assert torch.equal(masked[0, 1], table[1]) and torch.equal(masked[1, 3], table[3])
    changed = (masked != e).any(-1)
    assert changed.sum() == 2
    assert torch.equal(gather_positions(e, where), torch.stack([e[0, 1], e[1, 3]]))


def test_masked_embedding_and_cls_losses_compare_directions():
    x = torch.randn(4, 8)
    for loss in (masked_embedding_loss, cls_distance_loss):
        assert loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale does not count
        assert loss(x, -x).item() == pytest.approx(4.0)
        orthogonal = torch.eye(8)[:4], torch.eye(8)[4:]
        assert loss(*orthogonal).item() == pytest.approx(2.0)
        with pytest.raises(ValueError, match=r"\(B, "):
            loss(x, x[:, :4])


def test_input_loss_is_the_summed_cross_entropy_toward_the_targets():
    logits, targets = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    assert input_loss(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item() * 5)
