"""Union label space, block partition and the teacher contract on heterogeneous fixture teachers."""

from __future__ import annotations

import pytest
import torch

from dfkd_ray.labels import LabelSpaceError, UnionLabelSpace, normalize_label, ordered_labels
from dfkd_ray.math.blocks import masked_mean, partition_layers, pool_blocks


def test_normalize_label():
    assert normalize_label(" Sci_Tech ") == normalize_label("sci-tech") == normalize_label("SCI  tech")
    assert normalize_label("Sci/Tech") != normalize_label("Sci Tech")


def test_union_merges_identical_names_and_keeps_order():
    space = UnionLabelSpace.from_teachers({"a": ["World", "Sports"], "b": ["sports", "Business"], "c": ["Sci/Tech"]})
    assert space.names == ("World", "Sports", "Business", "Sci/Tech")
    assert space.teacher_to_global == {"a": (0, 1), "b": (1, 2), "c": (3,)}
    assert space.global_id("SPORTS") == 1
    assert UnionLabelSpace.from_dict(space.to_dict()) == space
    with pytest.raises(KeyError, match="not in the union"):
        space.global_id("Weather")


def test_union_rejects_clash_within_teacher():
    with pytest.raises(LabelSpaceError, match="same label after normalisation"):
        UnionLabelSpace.from_teachers({"a": ["Sci-Tech", "sci tech"]})


def test_ordered_labels():
    assert ordered_labels({"1": "b", "0": "a"}) == ["a", "b"]
    with pytest.raises(LabelSpaceError, match="0..1"):
        ordered_labels({"0": "a", "2": "b"})


@pytest.mark.parametrize("layers,blocks", [(12, 6), (12, 4), (6, 3), (5, 3), (7, 2), (3, 3), (2, 3), (1, 4), (6, 6)])
def test_partition_layers_properties(layers, blocks):
    parts = partition_layers(layers, blocks)
    assert len(parts) == blocks
    assert all(0 <= s < e <= layers for s, e in parts)
    assert parts[0][0] == 0 and parts[-1][1] == layers
    assert all(a[0] <= b[0] for a, b in zip(parts, parts[1:]))  # ordered by depth
    if blocks <= layers:  # exact cover, near-equal sizes
        assert [e for _, e in parts[:-1]] == [s for s, _ in parts[1:]]
        sizes = [e - s for s, e in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        partition_layers(0, blocks)


def test_masked_mean_ignores_padding():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = masked_mean(h, mask)
    torch.testing.assert_close(out[0], h[0, :2].mean(0))
    torch.testing.assert_close(out[1], h[1, 0])
    assert torch.isfinite(masked_mean(h, torch.zeros(2, 3))).all()


def test_pool_blocks_matches_manual():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 3, generator=g) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = pool_blocks(states, mask, [(0, 2), (2, 4)])
    assert out.shape == (2, 2, 3)
    expected = (masked_mean(states[2], mask) + masked_mean(states[3], mask)) / 2
    torch.testing.assert_close(out[:, 1], expected)


def test_fixture_teachers_share_block_count(teachers, synthetic_task):
    alpha, beta = teachers["alpha"], teachers["beta"]
    assert alpha.num_layers != beta.num_layers and alpha.hidden_size != beta.hidden_size
    assert type(alpha.tokenizer.backend_tokenizer.model).__name__ != type(beta.tokenizer.backend_tokenizer.model).__name__
    texts = ["the striker scored a late goal", "bake the bread in a hot oven", "x"]
    oa, ob = alpha(texts), beta(texts)
    assert oa.block_states.shape == (3, 3, alpha.hidden_size)
    assert ob.block_states.shape == (3, 3, beta.hidden_size)
    assert oa.num_blocks == ob.num_blocks == 3
    assert oa.logits.shape == (3, 2) and ob.logits.shape == (3, 2)
    assert oa.mask.shape[0] == 3 and oa.mask.shape[1] != ob.mask.shape[1]  # own tokenizations
    space = UnionLabelSpace.from_teachers({"alpha": alpha.labels, "beta": beta.labels})
    assert space.num_labels == 4


def test_teacher_block_states_are_padding_invariant(teachers):
    """A text's block features do not depend on what else is in its batch (mask-aware pooling)."""
    t = teachers["beta"]
    alone = t(["rocket launch to the moon"]).block_states
    batched = t(["rocket launch to the moon", "a much longer text about the stock market and bank shares today"]).block_states
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-4)


def test_fixture_teachers_classify_their_topics(teachers):
    from dfkd_ray.synthetic import TEACHER_TOPICS, labelled_sentences

    for name, topics in TEACHER_TOPICS.items():
        rows = labelled_sentences(20, seed=123, topics=topics)
        _, pred = teachers[name].predict([t for t, _ in rows])
        acc = (pred == torch.tensor([topics.index(lbl) for _, lbl in rows])).float().mean().item()
        assert acc >= 0.9, (name, acc)
