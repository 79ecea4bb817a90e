"""Cross-tokenizer mapping: the incremental teacher ids equal tokenizing the full text, on random streams."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dfkd_ray.generation.token_map import LmVocabulary, TeacherTokenMap

# Characters that stress the word logic: punctuation, contractions, every kind of space, control
# characters BERT deletes, combining marks, CJK, emoji (4-byte UTF-8), and literal special tokens.
POOL = list("abcdefgh xyz,.'!?-0123") + ["\n", "\t", "  ", "\r\n", "\u00e9", "\u00fc", "\u6771", "\u4eac", "\U0001F600",
                                        "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x85", "\x1c", "\x00", "\u0301",
                                        "\ufffd", "[CLS]", "[SEP]", "<mask>", "</s>", "<s>", "'s", "'ll", " The", "ing"]


@pytest.fixture(scope="module")
def lm_tokenizer(synthetic_task):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic_task.lm)


@pytest.fixture(scope="module")
def vocab(lm_tokenizer):
    return LmVocabulary(lm_tokenizer)


def _stream(rng: random.Random, tok, n_chars: int) -> list[int]:
    """LM ids of a random string, with random ids (partial UTF-8 bytes included) spliced in."""
    text = "".join(rng.choice(POOL) for _ in range(n_chars))
    out = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        out.append(i)
        if rng.random() < 0.25:
            out.append(rng.randrange(len(tok)))
    return out


def _variant(tokenizer, edit):
    """A copy of a fast tokenizer with its backend JSON edited."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    edit(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)})


def _check_streams(tmap: TeacherTokenMap, vocab: LmVocabulary, lm_tok, *, streams: int, seed: int,
                   n_cand: int = 12) -> int:
    """Drive rows over random streams; at every step compare every candidate's ids with the reference."""
    rng = random.Random(seed)
    checked = 0
    seqs = [_stream(rng, lm_tok, 30) for _ in range(streams)]
    rows = tmap.rows([b""] * streams if vocab.byte_level else [[]] * streams)
    for t in range(max(len(s) for s in seqs)):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        if t and len(live) < rows.n:  # rows leave as their streams end
            rows.keep(np.array([j for j, i in enumerate(prev) if i in live]))
        cand = np.array([rng.sample(range(len(lm_tok)), n_cand) for _ in live])
        inputs = rows.inputs(cand)
        ids = inputs.input_ids.tolist()
        for r, i in enumerate(live):
            for j, c in enumerate(cand[r]):
                k = r * n_cand + j
                expected = tmap.reference_ids(vocab.text(seqs[i][:t] + [int(c)]))
                assert ids[k][:inputs.lengths[k]] == expected, (vocab.text(seqs[i][:t] + [int(c)]), expected)
                assert all(x == tmap.pad_id for x in ids[k][inputs.lengths[k]:])
                assert inputs.attention_mask[k].sum().item() == len(expected)
                checked += 1
        rows.advance([seqs[i][t] for i in live])
        prev = live
    return checked


def test_lm_text_is_the_tokenizers_decode(lm_tokenizer, vocab):
    assert vocab.byte_level
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(lm_tokenizer)) for _ in range(rng.randrange(1, 25))]
        assert vocab.text(ids) == lm_tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("max_length", [128, 10])
@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_fast_path_equals_full_tokenization(name, max_length, teachers, vocab, lm_tokenizer):
    """WordPiece (alpha) and byte-level BPE (beta) teachers, with and without truncation."""
    teacher = teachers[name]
    tmap = TeacherTokenMap(vocab, teacher.tokenizer, max_length)
    assert tmap.fast, tmap.reason
    assert _check_streams(tmap, vocab, lm_tokenizer, streams=6, seed=len(name) + max_length) > 1000


def test_pair_cache_hits_and_clears_stay_exact(teachers, vocab, lm_tokenizer):
    """Pairs seen before come from the cache with the same ids; a cache cleared at its limit mid-stream
    (here after 50 pairs) and pairs longer than the teacher's capacity stay exact."""
    tmap = TeacherTokenMap(vocab, teachers["alpha"].tokenizer, 10)
    rows = tmap.rows([b"the goa"])
    cand = np.array([[c for c in range(len(lm_tokenizer)) if not tmap.starts_word[c]][:40]])
    first = rows.inputs(cand)
    stored = len(tmap.pair_cache)
    assert stored > 0
    again = rows.inputs(cand)
    assert len(tmap.pair_cache) == stored  # every pair was a hit
    assert torch.equal(first.input_ids, again.input_ids) and np.array_equal(first.lengths, again.lengths)
    # A pending word past the teacher's capacity: lengths stay true, ids are cut like the reference.
    long_rows = tmap.rows([b"x" + b"ab" * 40])
    long = long_rows.inputs(cand)
    for j, c in enumerate(cand[0]):
        expected = tmap.reference_ids("x" + "ab" * 40 + vocab.text([int(c)]))
        assert long.input_ids[j, :long.lengths[j]].tolist() == expected
    tmap.cache_limit = 50
    assert _check_streams(tmap, vocab, lm_tokenizer, streams=4, seed=7) > 500
    assert len(tmap.pair_cache) <= 50 + 4 * 12  # cleared whenever it passed the limit
    tmap.cache_limit, tmap.cache_bytes = 1 << 21, 1  # the byte bound clears it on every call
    assert _check_streams(tmap, vocab, lm_tokenizer, streams=3, seed=8) > 300
    assert len(tmap.pair_cache) <= 3 * 12


def test_reference_ids_are_what_teacher_tokenize_gives(teachers, vocab):
    rng = random.Random(1)
    for teacher in teachers.values():
        tmap = TeacherTokenMap(vocab, teacher.tokenizer, teacher.max_length)
        texts = ["".join(rng.choice(POOL) for _ in range(rng.randrange(0, 300))) for _ in range(20)]
        enc = teacher.tokenize(texts)
        for i, text in enumerate(texts):
            n = int(enc["attention_mask"][i].sum())
            assert enc["input_ids"][i, :n].tolist() == tmap.reference_ids(text)


def test_prefix_space_byte_level_teacher_stays_fast_and_exact(teachers, vocab, lm_tokenizer):
    tok = _variant(teachers["beta"].tokenizer, lambda s: s["pre_tokenizer"].update(add_prefix_space=True))
    tmap = TeacherTokenMap(vocab, tok, 64)
    assert tmap.fast and tmap.family.space_only
    assert _check_streams(tmap, vocab, lm_tokenizer, streams=4, seed=5) > 500


def test_unknown_pre_tokenizer_falls_back_to_the_exact_path(teachers, vocab, lm_tokenizer):
    tok = _variant(teachers["beta"].tokenizer, lambda s: s.update(pre_tokenizer={
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}))
    tmap = TeacherTokenMap(vocab, tok, 64)
    assert not tmap.fast and "Metaspace" in tmap.reason
    assert _check_streams(tmap, vocab, lm_tokenizer, streams=3, seed=6) > 300


def test_whitespace_swallowing_added_token_falls_back(teachers, vocab):
    def edit(spec):
        for tok in spec["added_tokens"]:
            if tok["content"] == "[MASK]":
                tok["rstrip"] = True
    tmap = TeacherTokenMap(vocab, _variant(teachers["alpha"].tokenizer, edit), 64)
    assert not tmap.fast and "[MASK]" in tmap.reason


def test_forced_exact_mode_is_exact(teachers, vocab, lm_tokenizer):
    tmap = TeacherTokenMap(vocab, teachers["alpha"].tokenizer, 16, mode="exact")
    assert not tmap.fast
    assert _check_streams(tmap, vocab, lm_tokenizer, streams=3, seed=7) > 300


def test_prompt_text_and_row_subsets(teachers, vocab, lm_tokenizer):
    """Rows may start from a prompt's text; a subset or a kept row gives the same inputs as a fresh row."""
    tmap = TeacherTokenMap(vocab, teachers["beta"].tokenizer, 40)
    rng = random.Random(8)
    prompts = [vocab.bytes_of(_stream(rng, lm_tokenizer, 12)) for _ in range(4)]
    rows = tmap.rows(prompts)
    steps = [[rng.randrange(len(lm_tokenizer)) for _ in range(4)] for _ in range(5)]
    for chosen in steps:
        rows.advance(chosen)
    cand = np.array([rng.sample(range(len(lm_tokenizer)), 9) for _ in range(4)])
    full = rows.inputs(cand)
    sub = rows.subset(np.array([3, 1])).inputs(cand[[3, 1]])
    rows.keep(np.array([2]))
    kept = rows.inputs(cand[[2]])
    for r, src in [(0, 3), (1, 1)]:
        for j in range(9):
            a, b = sub.input_ids[r * 9 + j], full.input_ids[src * 9 + j]
            assert a[:sub.lengths[r * 9 + j]].tolist() == b[:full.lengths[src * 9 + j]].tolist()
    for j in range(9):
        text = (prompts[2] + vocab.bytes_of([s[2] for s in steps] + [int(cand[2, j])])).decode("utf-8", "replace")
        assert kept.input_ids[j, :kept.lengths[j]].tolist() == tmap.reference_ids(text)


def test_word_starts_skip_the_tokenizer(teachers, vocab, lm_tokenizer):
    """After a finished word, candidates that start a new word come from the precomputed table."""
    tmap = TeacherTokenMap(vocab, teachers["alpha"].tokenizer, 64)
    rows = tmap.rows([b"the goal"])
    word_starts = np.nonzero(tmap.starts_word)[0]
    assert len(word_starts) > 20
    tmap.pair_cache.clear()
    cand = np.array([word_starts[:20]])
    inputs = rows.inputs(cand)
    assert len(tmap.pair_cache) == 0  # no (word, candidate) pair was tokenized
    for j, c in enumerate(cand[0]):
        expected = tmap.reference_ids("the goal" + vocab.text([int(c)]))
        assert inputs.input_ids[j, :inputs.lengths[j]].tolist() == expected
    assert isinstance(inputs.input_ids, torch.Tensor) and inputs.input_ids.device == tmap.device


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_punctuation_and_digit_cuts_skip_the_tokenizer(name, teachers, vocab, lm_tokenizer):
    """After a word, candidates starting with punctuation (or, for byte-level BPE, a digit) also come from
    the table, except where an added token such as ``[CLS]`` could span the cut."""
    tmap = TeacherTokenMap(vocab, teachers[name].tokenizer, 64)
    starts = {i: vocab.text([i])[:1] for i in range(len(lm_tokenizer))}
    punct = [i for i, ch in starts.items() if ch in ",.!?-'" and not tmap.starts_word[i]]
    assert len(punct) >= 5
    rows = tmap.rows([b"the goal"])
    tmap.pair_cache.clear()
    inputs = rows.inputs(np.array([punct]))
    assert len(tmap.pair_cache) == 0
    for j, c in enumerate(punct):
        assert inputs.input_ids[j, :inputs.lengths[j]].tolist() == tmap.reference_ids("the goal" + vocab.text([c]))
    # Text that spells the teacher's special tokens one character at a time stays exact.
    specials = [t for t in tmap.tokenizer.all_special_tokens if len(t) > 2]
    for special in specials:
        chars = [lm_tokenizer(ch, add_special_tokens=False)["input_ids"] for ch in "x" + special + "y"]
        assert all(len(c) == 1 for c in chars)
        rows = tmap.rows([b""])
        singles = np.array([[c[0] for c in chars]])
        so_far: list[int] = []
        for c in chars:
            inputs = rows.inputs(singles)
            for j in range(singles.shape[1]):
                text = vocab.text(so_far + [int(singles[0, j])])
                assert inputs.input_ids[j, :inputs.lengths[j]].tolist() == tmap.reference_ids(text), (special, text)
            rows.advance([c[0]])
            so_far.append(c[0])
