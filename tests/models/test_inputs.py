"""Which models share a tokenization of a batch (:func:`dfkd_ray.models.inputs.encoding_key`)."""

from __future__ import annotations

import torch

from dfkd_ray.models.inputs import encode_texts, encoding_key


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
