"""Tokenized model inputs: which models share a tokenization of a batch (:func:`dfkd_ray.models.inputs.encoding_key`),
and the fast path through a tokenizer's Rust pipeline."""

from __future__ import annotations

import pytest
import torch

from dfkd_ray.models.inputs import enable_prepared_mask, encode_texts, encoding_key


def test_models_share_an_encoding_exactly_when_the_tokenizer_and_its_settings_agree(synthetic_task):
    from transformers import AutoTokenizer

    alpha = AutoTokenizer.from_pretrained(synthetic_task.teachers["alpha"])
    again = AutoTokenizer.from_pretrained(synthetic_task.teachers["alpha"])
    beta = AutoTokenizer.from_pretrained(synthetic_task.teachers["beta"])
    key = encoding_key(alpha, max_length=128, token_types=True)
    assert encoding_key(again, max_length=128, token_types=True) == key  # another load of the same tokenizer
    assert encoding_key(alpha, max_length=64, token_types=True) != key
    assert encoding_key(alpha, max_length=128, token_types=False) != key
    assert encoding_key(beta, max_length=128, token_types=True) != key
    again.padding_side = "left"
    assert encoding_key(again, max_length=128, token_types=True) != key
    texts = ["the striker scored a late goal in the final", "bake the bread"]
    a, b = (encode_texts(t, texts, max_length=128, token_types=True) for t in (alpha, AutoTokenizer.from_pretrained(
        synthetic_task.teachers["alpha"])))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # equal keys, equal inputs


def test_the_prepared_mask_gives_the_same_outputs_and_skips_transformers_host_read(synthetic_task, monkeypatch):
    """Both fixture teachers (BERT, DistilBERT), with SDPA and with eager attention, answer the same
    with the 4D mask as with the (B, T) one, and with it transformers never asks the device whether
    the batch is padded (the host read of its mask construction)."""
    import transformers.masking_utils as masking

    from dfkd_ray.models.teacher import Teacher

    texts = ["the striker scored a late goal in the final minute", "bake bread"]
    for name in ("alpha", "beta"):
        for kernels in ("sdpa", "eager"):
            teacher = Teacher.from_pretrained(name, synthetic_task.teachers[name], num_blocks=2)
            teacher.model.set_attn_implementation(kernels)
            plain = teacher.forward_ids(**teacher.tokenize(texts))
            assert enable_prepared_mask(teacher), (name, kernels)
            calls = []
            real = masking._ignore_bidirectional_mask_sdpa
            monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
            prepared = teacher.forward_ids(**teacher.tokenize(texts))
            assert calls == []
            assert torch.allclose(plain.logits, prepared.logits, atol=1e-5)
            assert torch.allclose(plain.block_states, prepared.block_states, atol=1e-5)
            teacher.prepared_mask = False  # the (B, T) mask: transformers builds the mask (and reads the device)
            teacher.forward_ids(**teacher.tokenize(texts))
            assert calls or kernels == "eager"
            monkeypatch.undo()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("token_types", [True, False])
def test_encoded_tensors_are_those_of_the_tokenizer_call(synthetic_task, side, multiple, token_types):
    """The fast path through the tokenizer's Rust pipeline gives exactly ``tokenizer(...)``'s tensors:
    truncation (a text longer than ``max_length``), padding side, a multiple, an empty text, token types;
    and changing the tokenizer's sides afterwards is followed."""
    from transformers import AutoTokenizer

    texts = ["the striker scored", "a much longer text about bread " * 30, "",
             "Ünïcödé text, émojis 🙂  and spaces"]
    tok = AutoTokenizer.from_pretrained(synthetic_task.teachers["alpha"])
    for padding_side in ("right", side):  # the second setting after a first call with the default sides
        tok.padding_side = tok.truncation_side = padding_side
        ours = encode_texts(tok, texts, max_length=24, token_types=token_types, pad_to_multiple_of=multiple)
        theirs = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt",
                     pad_to_multiple_of=multiple if multiple > 1 else None)
        wanted = {"input_ids", "attention_mask"} | ({"token_type_ids"} if token_types else set())
        assert set(ours) == wanted & set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), padding_side
        assert ours["input_ids"].shape[1] % multiple == 0 and ours["input_ids"].shape[1] <= 24


def test_a_tokenizer_without_a_pad_token_is_refused_as_the_tokenizer_refuses_it(synthetic_task):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(synthetic_task.teachers["alpha"])
    tok.pad_token = None
    with pytest.raises(ValueError, match="does not have a padding token"):
        encode_texts(tok, ["the striker scored", "bread"], max_length=16, token_types=False)
