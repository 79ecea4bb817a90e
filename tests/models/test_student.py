"""Student construction: layer keeping, union-label head, block projections, mask-aware blocks, HF export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_ray.config import StudentConfig
from dfkd_ray.math.blocks import partition_layers, pool_blocks
from dfkd_ray.models.student import Student, find_layer_list, select_layers

LABELS = ["sports", "cooking", "space", "finance"]
TEXTS = ["goal match team coach", "the rocket reached orbit after a long launch window today"]


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def build(path, *, labels=LABELS, amalg_dim: int = 16, num_blocks=None, **section) -> Student:
    """``Student.from_config`` on a ``student`` section with ``path`` and ``section``'s fields."""
    return Student.from_config(StudentConfig(path=path, **section), labels=labels, amalg_dim=amalg_dim,
                               num_blocks=num_blocks)


def test_select_layers():
    assert select_layers(12, num_layers=6) == [0, 2, 4, 7, 9, 11]  # every other layer, first and last kept
    assert select_layers(4, num_layers=2) == [0, 3]
    assert select_layers(4, num_layers=4) == [0, 1, 2, 3]
    assert select_layers(4, num_layers=1) == [0]
    assert select_layers(4, layers=[3, 1]) == [1, 3]
    assert select_layers(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(4, layers=[0, 4])
    with pytest.raises(ValueError, match="distinct"):
        select_layers(4, layers=[1, 1])
    with pytest.raises(ValueError, match="num_layers must lie"):
        select_layers(4, num_layers=5)
    with pytest.raises(ValueError, match="not both"):
        select_layers(4, layers=[0], num_layers=1)


def test_kept_layers_are_the_pretrained_ones(synthetic_task):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(synthetic_task.student)
    student = build(synthetic_task.student, num_layers=2)
    assert student.kept_layers == [0, 3] and student.num_layers == 2 == student.model.config.num_hidden_layers
    kept = find_layer_list(student.model)[2]
    assert len(kept) == 2
    for new, old in zip(kept, (encoder.encoder.layer[0], encoder.encoder.layer[3])):
        for (k, v), (k2, v2) in zip(new.state_dict().items(), old.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    torch.testing.assert_close(student.model.base_model.embeddings.word_embeddings.weight,
                               encoder.embeddings.word_embeddings.weight)


def test_forward_shapes_and_blocks_pool_the_layer_outputs(synthetic_task):
    student = build(synthetic_task.student, layers=[0, 1, 3]).eval()
    assert student.num_blocks == 3 and student.blocks == [(0, 1), (1, 2), (2, 3)]  # one layer per block
    enc = student.tokenize(TEXTS)
    out = student(**enc)
    assert out.logits.shape == (2, 4) and out.block_states.shape == (2, 3, 32) and out.projections.shape == (2, 3, 16)
    hidden = student.model(**enc, output_hidden_states=True).hidden_states
    assert len(hidden) == 4  # embeddings + 3 kept layers
    torch.testing.assert_close(out.block_states, pool_blocks(hidden[1:], enc["attention_mask"], student.blocks))
    torch.testing.assert_close(out.projections[:, 1], student.proj[1](out.block_states[:, 1]))


def test_fewer_blocks_than_layers(synthetic_task):
    student = build(synthetic_task.student, amalg_dim=8, num_blocks=2)
    assert student.num_layers == 4 and student.blocks == partition_layers(4, 2)
    assert student.encode(TEXTS).projections.shape == (2, 2, 8)


def test_padding_does_not_change_a_texts_outputs(synthetic_task):
    student = build(synthetic_task.student, num_layers=3).eval()
    with torch.no_grad():
        alone = student.encode(TEXTS[:1])
        padded = student.encode(TEXTS)  # the second text is longer: the first gets padding
    assert student.tokenize(TEXTS)["attention_mask"][0].eq(0).any()
    torch.testing.assert_close(padded.logits[0], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.block_states[0], alone.block_states[0], atol=1e-5, rtol=1e-5)


def test_head_over_union_labels_with_configured_dropout(synthetic_task):
    student = build(synthetic_task.student, dropout=0.3)
    assert student.model.config.id2label == dict(enumerate(LABELS))
    assert student.model.classifier.out_features == 4
    assert student.model.dropout.p == pytest.approx(0.3)


def test_distilbert_classifier_dir_as_student_gets_a_fresh_head(synthetic_task, teachers):
    """Built from a fine-tuned DistilBERT teacher: its encoder is reused, its head (other labels) is not."""
    beta = teachers["beta"]
    labels = ["x", "y"]  # same size as beta's head, so a careless load would copy it
    student = build(synthetic_task.teachers["beta"], labels=labels, layers=[0, 2], dropout=0.25)
    assert student.num_layers == 2 and student.model.base_model.transformer.n_layers == 2
    assert student.model.dropout.p == pytest.approx(0.25)  # DistilBERT's seq_classif_dropout
    assert not torch.equal(student.model.classifier.weight, beta.model.classifier.weight)
    torch.testing.assert_close(student.model.base_model.transformer.layer[1].ffn.lin1.weight,
                               beta.model.base_model.transformer.layer[2].ffn.lin1.weight)
    out = student.encode(TEXTS)
    assert out.block_states.shape == (2, 2, 48) and torch.isfinite(out.logits).all()


def test_save_pretrained_is_a_standard_hf_classifier(synthetic_task, tmp_path):
    from transformers import AutoModelForSequenceClassification

    student = build(synthetic_task.student, num_layers=2).eval()
    student.save_pretrained(tmp_path / "export")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert back.config.num_hidden_layers == 2 and back.config.id2label == dict(enumerate(LABELS))
    enc = student.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(back(**enc).logits, student(**enc).logits)
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    assert not any("proj" in k for k in back.state_dict())


def test_predict_and_from_config(synthetic_task):
    cfg = StudentConfig(path=synthetic_task.student, num_layers=2, dropout=0.1, max_length=16)
    student = Student.from_config(cfg, labels=LABELS, amalg_dim=16)
    assert student.kept_layers == [0, 3] and student.max_length == 16
    assert student.tokenize(["word " * 50])["input_ids"].shape[1] == 16
    probs, pred = student.predict(TEXTS)
    assert probs.shape == (2, 4) and pred.shape == (2,) and student.training  # mode restored
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_unsupported_or_bad_students_raise_clear_errors(synthetic_task):
    with pytest.raises(ValueError, match="cannot find the transformer layers"):
        find_layer_list(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="out of range"):
        build(synthetic_task.student, layers=[0, 7])
    with pytest.raises(ValueError, match="at least one label"):
        build(synthetic_task.student, labels=[])
    with pytest.raises(ValueError, match="student.path"):
        Student.from_config(StudentConfig(), labels=LABELS, amalg_dim=16)
    with pytest.raises(ValueError, match="empty batch"):
        build(synthetic_task.student).encode([])
