"""DFKD-T3 generation on the fixture LM and teachers: the vocabulary bridge, tuning, the stable level."""

from __future__ import annotations

import pytest
import torch

from dfkd_ray.generation.prompt_tuning import HybridPromptLM, PromptRow, SoftTeacher, tune_prompts
from dfkd_ray.generation.token_map import LmVocabulary
from dfkd_ray.math.prompt_tuning import distinct_n

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


@pytest.fixture(scope="module")
def lm(synthetic_task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(synthetic_task.lm), AutoTokenizer.from_pretrained(synthetic_task.lm)


@pytest.fixture(scope="module")
def documents(synthetic_task):
    from dfkd_ray.transfer.sources.corpus import read_documents

    return read_documents(synthetic_task.corpus, min_words=4, max_words=64)


def _generator(lm, synthetic_task, **settings):
    from dfkd_ray.config.schema import PromptTunedConfig

    config = PromptTunedConfig(lm_path=synthetic_task.lm, **{"max_new_tokens": 12, "max_source_tokens": 16, **settings})
    return HybridPromptLM(lm[0], lm[1], config)


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_bridge_one_hot_token_is_the_teacher_embedding_of_its_string(lm, teachers, name):
    """one_hot(i) @ B @ E_teacher is the mean teacher input embedding of tokenizing LM token i's string
    (alpha: WordPiece, beta: byte-level BPE; special tokens and whitespace give the teacher nothing)."""
    vocab = LmVocabulary(lm[1])
    teacher = teachers[name]
    soft = SoftTeacher(teacher, vocab)
    weight = teacher.model.get_input_embeddings().weight
    strings = [vocab.text([i]) for i in range(vocab.size)]
    bridged = torch.eye(vocab.size) @ soft.token_embeddings  # (V_LM, d): every one-hot LM token at once
    checked = 0
    for i, ids in enumerate(teacher.tokenizer(strings, add_special_tokens=False)["input_ids"]):
        if ids:
            assert torch.allclose(bridged[i], weight[ids].mean(0), atol=1e-6), (i, strings[i])
            checked += 1
        else:
            assert not soft.bridge.has_ids[i] and torch.count_nonzero(bridged[i]) == 0
    assert checked > 0.9 * vocab.size
    assert not soft.bridge.has_ids[lm[1].eos_token_id]


def test_teacher_reads_one_hot_text_through_the_bridge_as_it_reads_the_text(lm, synthetic_task, teachers):
    """Whole words that are one LM token and one teacher token: the assembled input ([CLS] ... [SEP] or <s> ... </s>,
    a token the teacher tokenizes to nothing left out, positions after EOS dropped) gives the logits of the text."""
    tok = lm[1]
    words = [" striker victory team goal", " pasta dough basil", " rocket orbit planet moon", " stock bank"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in words]
    space, eos = tok(" ", add_special_tokens=False)["input_ids"], tok.eos_token_id
    rows[1] = rows[1][:1] + space + rows[1][1:] + [eos] + rows[0][:2]  # a lone space, then text after EOS
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), eos)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    generator = _generator(lm, synthetic_task)
    texts = [generator.info.vocab.text(r[:r.index(eos)] if eos in r else r) for r in rows]  # what generation writes
    assert texts[1] == " pasta  dough basil"
    for teacher in teachers.values():
        soft = SoftTeacher(teacher, generator.info.vocab)
        y = torch.nn.functional.one_hot(ids, generator.info.vocab.size).float()
        keep = generator.text_positions(ids, soft.bridge.has_ids)
        with torch.no_grad():
            bridged = soft.logits(y, keep)
        direct = teacher(texts, with_blocks=False).logits
        assert torch.allclose(bridged, direct, atol=1e-5), teacher.name


def test_bridge_builds_for_an_lm_tokenizer_that_is_not_byte_level(teachers):
    """A WordPiece vocabulary as the 'LM' side: no byte table, so every token's text comes from the tokenizer."""
    wordpiece = teachers["alpha"].tokenizer
    vocab = LmVocabulary(wordpiece)
    assert not vocab.byte_level
    soft = SoftTeacher(teachers["beta"], vocab)
    i = wordpiece.convert_tokens_to_ids("rocket")
    ids = teachers["beta"].tokenizer("rocket", add_special_tokens=False)["input_ids"]
    weight = teachers["beta"].model.get_input_embeddings().weight
    assert torch.allclose(soft.token_embeddings[i], weight[ids].mean(0), atol=1e-6)


def _target_rate(generator, teacher, prompts, documents, n=64) -> float:
    rows = [PromptRow(prompts[i % teacher.num_labels], generator.source_ids(documents[(7 * i) % len(documents)]),
                      1000 + i) for i in range(n)]
    _, predicted = teacher.predict([r.text for r in generator.generate(rows)])
    return float((predicted == torch.arange(n) % teacher.num_labels).float().mean())


def test_tuning_raises_the_target_class_rate_and_changes_only_the_prompts(lm, synthetic_task, teachers, documents):
    """Teacher beta (space / finance): the untuned prompts' rewrites hit the target class about half the time;
    20 tuning steps raise that well above it. The LM's and the teacher's weights stay bit-identical."""
    generator = _generator(lm, synthetic_task, tuning_steps=20, tuning_batch_size=8)
    teacher = teachers["beta"]
    before = {k: v.clone() for k, v in [*generator.lm.state_dict().items(),
                                         *(("t." + k, v) for k, v in teacher.model.state_dict().items())]}
    untuned = generator.initial_prompts(teacher.num_labels, torch.Generator().manual_seed(3))
    result = tune_prompts(generator, teacher, documents, seed=3)
    after = {**generator.lm.state_dict(), **{"t." + k: v for k, v in teacher.model.state_dict().items()}}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert result.prompts.shape == (2, 8, 64)  # (C, P, d_LM)
    assert torch.equal(generator.initial_prompts(2, torch.Generator().manual_seed(3)), untuned)  # the start point
    rate_untuned = _target_rate(generator, teacher, untuned, documents)
    rate_tuned = _target_rate(generator, teacher, result.prompts, documents)
    assert rate_tuned >= 0.8 and rate_tuned >= rate_untuned + 0.25, (rate_untuned, rate_tuned)
    assert [r["step"] for r in result.history] == list(range(1, 21))


def test_straight_through_relaxation_feeds_one_hot_draws_and_reaches_the_prompts(lm, synthetic_task, teachers):
    generator = _generator(lm, synthetic_task, relaxation="straight_through", max_new_tokens=4)
    prompts = generator.initial_prompts(2, torch.Generator().manual_seed(0)).requires_grad_(True)
    sources = [generator.source_ids("the match and the goal"), generator.source_ids("bake the bread")]
    y, ids = generator.decode_soft(sources, prompts, torch.Generator().manual_seed(1), stable_level=1.0,
                                   temperature=1.0, relaxation="straight_through")
    assert torch.allclose(y, torch.nn.functional.one_hot(ids, y.shape[-1]).float(), atol=1e-6)
    soft = SoftTeacher(teachers["alpha"], generator.info.vocab)
    soft.logits(y, generator.text_positions(ids, soft.bridge.has_ids))[:, 0].sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_raising_the_stable_level_lowers_distinct_n(lm, synthetic_task, documents):
    """The stable level multiplies the logits before each draw: higher is closer to greedy, so the rewrites of
    the same documents under many seeds share more of their n-grams (docs/prompt-tuned.md)."""
    prompts = _generator(lm, synthetic_task).initial_prompts(1, torch.Generator().manual_seed(0))[0]
    distinct = {}
    for level in (0.5, 1.0, 5.0):
        generator = _generator(lm, synthetic_task, stable_level=level)
        rows = [PromptRow(prompts, generator.source_ids(documents[i % 4]), 100 + i) for i in range(48)]
        words = [r.text.split() for r in generator.generate(rows)]
        distinct[level] = (distinct_n(words, 1), distinct_n(words, 2))
    assert distinct[0.5][1] > distinct[1.0][1] > distinct[5.0][1], distinct
    assert distinct[0.5][0] > distinct[1.0][0] > distinct[5.0][0], distinct


def test_a_request_writes_the_same_text_alone_or_in_a_batch(lm, synthetic_task, documents):
    generator = _generator(lm, synthetic_task, dtype="float64", batch_size=5)
    prompts = generator.initial_prompts(2, torch.Generator().manual_seed(0))
    rows = [PromptRow(prompts[i % 2], generator.source_ids(documents[i]), 7 + i) for i in range(5)]
    together = generator.generate(rows)
    assert [generator.generate([r])[0] for r in rows] == together
    assert all(r.stop in ("eos", "length") and len(r.token_ids) >= 4 for r in together)  # min_new_tokens 4
