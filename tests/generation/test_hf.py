"""The Hugging Face steered generator (StrataNet section 4.2, Eq. 1) on the fixture LM and teachers."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from dfkd_ray.config import SteeredConfig
from dfkd_ray.generation.hf import SteeredGenerator
from dfkd_ray.generation.steering import GenerationRequest
from dfkd_ray.math.decoding import control_weights, reweight, row_uniforms, sample_candidates, sample_top_k


@pytest.fixture(scope="module")
def lm_and_tokenizer(synthetic_task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(synthetic_task.lm, dtype=torch.float32)
    return lm, AutoTokenizer.from_pretrained(synthetic_task.lm)


@pytest.fixture(scope="module")
def teachers64(teachers):
    """float64 copies of the fixture teachers: a reference run where last-bit kernel noise cannot move a decision."""
    from dfkd_ray.models.teacher import Teacher

    return {n: Teacher(name=n, model=copy.deepcopy(t.model).double(), tokenizer=t.tokenizer, labels=t.labels,
                       num_blocks=1, max_length=t.max_length) for n, t in teachers.items()}


def make(lm_and_tokenizer, teachers, **params) -> SteeredGenerator:
    lm, tok = lm_and_tokenizer
    return SteeredGenerator(copy.deepcopy(lm), tok, teachers, SteeredConfig(**params))


def mixed_requests(n: int, strengths=(None,)) -> list[GenerationRequest]:
    prompts = [None, "", "Category: {label}", "the"]
    return [GenerationRequest(teacher=("alpha", "beta")[i % 2], target=(i // 2) % 2, seed=1000 + 37 * i,
                              prompt=prompts[i % len(prompts)], control_strength=strengths[i % len(strengths)])
            for i in range(n)]


def prompt_ids(gen: SteeredGenerator, req: GenerationRequest) -> list[int]:
    label = gen.teachers[req.teacher].labels[req.target]
    text = (gen.config.prompt if req.prompt is None else req.prompt).replace("{label}", label)
    lm = gen.lm_info
    return [lm.bos_id] + (lm.tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])


@torch.inference_mode()
def plain_sampling(gen: SteeredGenerator, req: GenerationRequest) -> list[int]:
    """Reference: one request alone, the full prefix through the LM each step, plain top-k sampling."""
    p = gen.config
    ids = prompt_ids(gen, req)
    u = row_uniforms([req.seed], p.max_new_tokens)[0]
    out = []
    for t in range(p.max_new_tokens):
        logits = gen.lm(torch.tensor([ids + out])).logits[:, -1].clone()
        if t < p.min_new_tokens:
            logits[:, gen.lm_info.eos_ids] = float("-inf")
        x = int(sample_top_k(logits, u[t:t + 1], top_k=p.top_k, top_p=p.top_p, temperature=p.temperature))
        if x in gen.lm_info.eos_ids:
            break
        out.append(x)
    return out


@torch.inference_mode()
def score_every_token(gen: SteeredGenerator, req: GenerationRequest) -> list[int]:
    """Reference: each of the LM's top-m tokens (best first, lowest id first on ties; with
    ``candidate_mass`` < 1 only those within the LM's nucleus of that mass) scored by its full text
    through ``Teacher.__call__``, every other token ``-inf``; one request alone."""
    p = gen.config
    teacher = gen.teachers[req.teacher]
    ids = prompt_ids(gen, req)
    u = row_uniforms([req.seed], p.max_new_tokens)[0]
    V = gen.lm.config.vocab_size
    out = []
    for t in range(p.max_new_tokens):
        logits = gen.lm(torch.tensor([ids + out])).logits[:, -1].clone()
        if t < p.min_new_tokens:
            logits[:, gen.lm_info.eos_ids] = float("-inf")
        lp = torch.log_softmax(logits, -1)  # (1, V)
        cand, total = [], 0.0
        for v in sorted(range(V), key=lambda v: (-float(lp[0, v]), v))[:p.top_m]:
            if total >= p.candidate_mass:
                break
            cand.append(v)
            total += float(lp[0, v].exp())
        texts = [gen.lm_info.vocab.text(out + [v]) for v in cand]
        tlp = torch.full((1, V), float("-inf"), dtype=lp.dtype)
        tlp[0, cand] = torch.log_softmax(teacher(texts, with_blocks=False).logits, -1)[:, req.target].to(lp.dtype)
        lam = control_weights(torch.tensor([t]), torch.tensor([p.control_strength]), p.lambda_schedule,
                              decay_rate=p.decay_rate, floor=p.lambda_floor)
        x = int(sample_candidates(reweight(lp, tlp, lam), torch.arange(V).view(1, V), u[t:t + 1], top_k=p.top_k,
                                  top_p=p.top_p, temperature=p.temperature))
        if x in gen.lm_info.eos_ids:
            break
        out.append(x)
    return out


def test_lambda_zero_equals_plain_top_k_sampling(lm_and_tokenizer, teachers64):
    params = dict(control_strength=0.0, top_m=30, top_k=12, top_p=0.9, temperature=0.9, max_new_tokens=24,
                  min_new_tokens=3, dtype="float64", batch_size=16)
    # All rows unguided (the plain sampler), then unguided rows batched with guided ones (the Eq. 1 path).
    gen = make(lm_and_tokenizer, teachers64, **params)
    reqs = mixed_requests(6)
    mixed = mixed_requests(8, strengths=(0.0, 6.0))
    for results, requests in [(gen.generate(reqs), reqs), (gen.generate(mixed), mixed)]:
        checked = 0
        for res, req in zip(results, requests):
            if req.control_strength in (None, 0.0):
                assert res.token_ids == plain_sampling(gen, req)
                checked += 1
        assert checked >= 4
    assert gen.stats.teacher_forwards > 0  # the second batch went through the teacher-scored path


def test_m_equal_to_vocabulary_matches_scoring_every_token(lm_and_tokenizer, teachers64):
    V = lm_and_tokenizer[0].config.vocab_size
    gen = make(lm_and_tokenizer, teachers64, control_strength=6.0, lambda_schedule="decay", decay_rate=0.8,
               lambda_floor=0.3, top_m=V, top_k=40, top_p=0.9, max_new_tokens=8, min_new_tokens=2, dtype="float64",
               teacher_chunk_tokens=2048)  # small budget: several padded chunks per step
    reqs = [GenerationRequest("alpha", 0, seed=5), GenerationRequest("beta", 1, seed=6, prompt="Category: {label}")]
    for res, req in zip(gen.generate(reqs), reqs):
        assert len(res.token_ids) >= 2
        assert res.token_ids == score_every_token(gen, req)


def test_candidate_mass_matches_scoring_only_the_lms_nucleus_and_forwards_fewer_candidates(lm_and_tokenizer,
                                                                                           teachers64):
    """``candidate_mass`` < 1 writes what the slow reference writes when only the LM's nucleus is
    reweighted and drawn, and the teacher scores fewer candidates than with every top-m one."""
    common = dict(control_strength=6.0, top_m=60, top_k=40, top_p=0.9, max_new_tokens=8, min_new_tokens=2,
                  dtype="float64", teacher_chunk_tokens=2048)
    reqs = [GenerationRequest("alpha", 0, seed=5), GenerationRequest("beta", 1, seed=6, prompt="Category: {label}")]
    gen = make(lm_and_tokenizer, teachers64, candidate_mass=0.9, **common)
    for res, req in zip(gen.generate(reqs), reqs):
        assert len(res.token_ids) >= 2 and res.params["candidate_mass"] == 0.9
        assert res.token_ids == score_every_token(gen, req)
    nucleus = gen.stats.teacher_sequences / gen.stats.steps
    full = make(lm_and_tokenizer, teachers64, **common)
    full.generate(reqs)
    assert nucleus < 0.9 * full.stats.teacher_sequences / full.stats.steps  # 0.79 on the demo LM


def test_steering_moves_the_teachers_prediction(lm_and_tokenizer, teachers):
    """lambda > 0 makes each teacher's prediction match the target far more often than lambda = 0; both
    teachers' tokenizers (WordPiece; a byte-level BPE of their own) differ from the LM's.

    Each seed is used once per class, so unguided texts do not depend on the target and a two-class
    teacher agrees with exactly half of them: the baseline is chance by construction. The prompt
    "the" (no topic) keeps the demo LM from opening with a topic's name ("space: ..."), a word
    teacher alpha never saw."""
    reqs = [GenerationRequest(t, c, seed=10_000 + 101 * i) for t in ("alpha", "beta") for c in range(2)
            for i in range(16)]
    accuracy = {}
    for lam in (0.0, 8.0):
        gen = make(lm_and_tokenizer, teachers, control_strength=lam, top_m=20, top_k=10, max_new_tokens=16,
                   min_new_tokens=4, batch_size=64, prompt="the")
        results = gen.generate(reqs)
        for name in ("alpha", "beta"):
            pairs = [(res, req) for res, req in zip(results, reqs) if req.teacher == name]
            accuracy[name, lam] = sum(res.teacher_prediction == req.target for res, req in pairs) / len(pairs)
        if lam:
            texts = {name: [r.text for r, q in zip(results, reqs) if q.teacher == name] for name in teachers}
            for name, t in teachers.items():  # the recorded confidence is the teacher's on the final text
                probs, _ = t.predict(texts[name])
                recorded = [r.teacher_confidence for r, q in zip(results, reqs) if q.teacher == name]
                targets = [q.target for q in reqs if q.teacher == name]
                assert torch.allclose(probs[torch.arange(len(targets)), targets], torch.tensor(recorded), atol=1e-5)
    for name in ("alpha", "beta"):
        assert accuracy[name, 0.0] == 0.5, accuracy
        assert accuracy[name, 8.0] >= 0.9, accuracy  # a margin of 0.4 over 32 samples per teacher


def test_output_does_not_depend_on_the_batch(lm_and_tokenizer, teachers64):
    reqs = mixed_requests(10, strengths=(None, 0.0, 3.0))
    common = dict(control_strength=8.0, top_m=16, top_k=8, top_p=0.95, max_new_tokens=10, min_new_tokens=2,
                  dtype="float64", teacher_chunk_tokens=1024, teacher_batching="uniform")  # unpadded forwards too
    together = make(lm_and_tokenizer, teachers64, batch_size=16, **common).generate(reqs)
    alone = make(lm_and_tokenizer, teachers64, batch_size=1, **common).generate(reqs)
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    shuffled = make(lm_and_tokenizer, teachers64, batch_size=3, **common).generate([reqs[i] for i in order])
    regrouped = [None] * len(reqs)
    for j, i in enumerate(order):
        regrouped[i] = shuffled[j]
    for a, b, c in zip(together, alone, regrouped):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.text == b.text == c.text
    assert {r.stop_reason for r in together} == {"eos", "length"}  # rows left the batch at different steps
    assert len({tuple(r.token_ids) for r in together}) == len(reqs)


def test_interleaved_parts_decode_what_one_part_does(lm_and_tokenizer, teachers64, monkeypatch):
    """``decode_parts`` only schedules: parts take turns at every wait, rows leave their part at
    different steps, and each request's text is what one undivided batch gives."""
    from dfkd_ray.generation import hf

    reqs = mixed_requests(10, strengths=(None, 0.0, 3.0))
    common = dict(control_strength=8.0, top_m=16, top_k=8, top_p=0.95, max_new_tokens=10, min_new_tokens=2,
                  dtype="float64", teacher_chunk_tokens=1024, batch_size=10)
    whole = make(lm_and_tokenizer, teachers64, decode_parts=1, **common).generate(reqs)
    resumed: list[list[int]] = []  # per batch, which part each resumption went to
    real = hf.interleave

    def recording(parts, device):
        resumed.append([])

        def tagged(i, part):
            for mark in part:
                resumed[-1].append(i)
                yield mark
        return real([tagged(i, part) for i, part in enumerate(parts)], device)

    monkeypatch.setattr(hf, "interleave", recording)
    split = make(lm_and_tokenizer, teachers64, decode_parts=3, **common).generate(reqs)
    assert [r.token_ids for r in split] == [r.token_ids for r in whole]
    assert [r.text for r in split] == [r.text for r in whole]
    assert [r.teacher_confidence for r in split] == [r.teacher_confidence for r in whole]
    assert {r.stop_reason for r in whole} == {"eos", "length"}
    order = resumed[0]
    assert set(order) == {0, 1, 2}
    assert order[:6] == [0, 1, 2, 0, 1, 2]  # off CUDA the parts take turns, one wait each
    # Parts stay in turn after one of them finished: none runs twice in a row while others are live.
    last = {i: max(j for j, x in enumerate(order) if x == i) for i in range(3)}
    for j in range(1, len(order)):
        live = [i for i in range(3) if last[i] >= j]
        if len(live) > 1:
            assert order[j] != order[j - 1]
    # More parts than rows: one row a part.
    few = make(lm_and_tokenizer, teachers64, decode_parts=8, **{**common, "batch_size": 3}).generate(reqs[:3])
    assert [r.token_ids for r in few] == [r.token_ids for r in whole[:3]]
    assert len(set(resumed[-1])) == 3


def test_attention_kernels_leaves_out_cudnn_on_cuda_only(lm_and_tokenizer, teachers, monkeypatch, kernel_recorder):
    from dfkd_ray.generation import hf, steering
    from dfkd_ray.models.kernels import attention_kernels

    cuda = torch.device("cuda")  # only flags change: no GPU needed
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    with attention_kernels("no_cudnn", cuda):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    for choice, device in (("any", cuda), ("no_cudnn", torch.device("cpu"))):
        with attention_kernels(choice, device):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    forwards_inside, lm_inside = [0], [0]  # LM steps and scoring run inside it

    original = teachers["alpha"].forward_ids

    def counting(*args, **kwargs):
        forwards_inside[0] += kernel_recorder.inside
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "attention_kernels", kernel_recorder)  # the LM steps
    monkeypatch.setattr(steering, "attention_kernels", kernel_recorder)  # teacher scoring
    monkeypatch.setattr(teachers["alpha"], "forward_ids", counting)
    gen = make(lm_and_tokenizer, teachers, sdpa="any", top_m=8, top_k=4, max_new_tokens=3, min_new_tokens=3)
    lm_forward = gen.lm.forward

    def lm_counting(*args, **kwargs):
        lm_inside[0] += kernel_recorder.inside
        return lm_forward(*args, **kwargs)

    monkeypatch.setattr(gen.lm, "forward", lm_counting)
    gen.generate([GenerationRequest("alpha", 1, seed=5)])
    assert set(kernel_recorder.seen) == {"any"}
    assert forwards_inside[0] == gen.stats.teacher_forwards >= 3
    assert lm_inside[0] == gen.stats.lm_forwards >= 3


def test_results_record_parameters_and_keep_prompt(lm_and_tokenizer, teachers):
    gen = make(lm_and_tokenizer, teachers, control_strength=4.0, top_m=10, top_k=5, max_new_tokens=6,
               min_new_tokens=6, prompt="Category: {label}", keep_prompt=True)
    res = gen.generate([GenerationRequest("beta", 1, seed=3)])[0]
    assert res.text.startswith("Category: finance")
    assert res.num_tokens == 6 and res.stop_reason == "length"
    assert res.params["prompt"] == "Category: finance" and res.params["lm_tokens"] == 6
    assert res.params["top_m"] == 10 and res.params["control_strength"] == 4.0 and res.params["token_map"] == "fast"
    json.dumps(res.params)
    probs, _ = teachers["beta"].predict([res.text])
    assert abs(float(probs[0, 1]) - res.teacher_confidence) < 1e-6


def test_the_kv_cache_goes_by_the_name_this_transformers_reads(lm_and_tokenizer, teachers):
    """transformers >= 5.2x reads ``cache`` and warns that ``past_key_values`` goes away in 5.40; older versions
    know only ``past_key_values``: the generator passes whichever the LM's forward names, so no warning (the
    cached decode itself is checked against full-prefix sampling above)."""
    gen = make(lm_and_tokenizer, teachers, control_strength=4.0, top_m=10, top_k=5, max_new_tokens=4, min_new_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.generate([GenerationRequest("alpha", 0, seed=5)])
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_bad_requests_fail_before_generation(lm_and_tokenizer, teachers, monkeypatch):
    """Every request is checked before any decoding; bad settings are the config's to refuse
    (``tests/generation/test_steered_source.py``)."""
    gen = make(lm_and_tokenizer, teachers, max_new_tokens=8, top_m=10, top_k=5)
    monkeypatch.setattr(gen, "_generate_batch", lambda rows: pytest.fail("generation started"))
    good = GenerationRequest("alpha", 0, seed=1)
    cases = [
        ([], "no requests"),
        ([good, GenerationRequest("gamma", 0, seed=1)], "unknown teacher 'gamma'"),
        ([good, GenerationRequest("alpha", 2, seed=1)], "teacher 'alpha' has no class 2"),
        ([GenerationRequest("beta", -1, seed=1)], "has no class -1"),
        ([GenerationRequest("alpha", 0, seed=1, control_strength=-0.5)], "must be a finite number >= 0"),
        ([GenerationRequest("alpha", 0, seed=1, prompt="goal " * 200)], "longer than the LM's context"),
        ([GenerationRequest("alpha", 0, seed=1, prompt="goal " * 120)], "exceeds the LM's context"),  # a token a word
    ]
    for requests, message in cases:
        with pytest.raises(ValueError, match=message):
            gen.generate(requests)


def test_start_new_word_never_continues_the_prompts_last_word(lm_and_tokenizer, teachers):
    """``Category: cooking`` may go on as ``cookingcooking``; with ``start_new_word`` the first new token
    starts a word (a space or punctuation first), guided or not."""
    reqs = [GenerationRequest(("alpha", "beta")[i % 2], (i // 2) % 2, seed=100 + i,
                              control_strength=(0.0, 4.0)[i % 3 == 0]) for i in range(24)]
    starts = {}
    for flag in (False, True):
        gen = make(lm_and_tokenizer, teachers, control_strength=4.0, top_m=10, top_k=10, max_new_tokens=6,
                   min_new_tokens=2, prompt="Category: {label}", start_new_word=flag)
        results = gen.generate(reqs)
        assert all(r.params["start_new_word"] is flag for r in results)  # recorded with every row
        starts[flag] = [r.text[:1] for r in results]
    assert sum(s.isalnum() for s in starts[False]) > 0
    assert not any(s.isalnum() for s in starts[True])


def test_word_continuations_of_a_byte_level_vocabulary(lm_and_tokenizer):
    """A token continues the word before it when its text starts with a letter, digit or non-ASCII
    byte and no space; special tokens, space-led tokens and punctuation never do."""
    from dfkd_ray.generation.token_map import LmVocabulary

    _, tok = lm_and_tokenizer
    continuations = set(LmVocabulary(tok).word_continuations())
    texts = tok.convert_ids_to_tokens(list(range(len(tok))))
    for token_id, text in enumerate(texts):
        if token_id in tok.all_special_ids or text[0] in "\u0120\u010a" or text[0] in ".,:;!?'\"()-":
            assert token_id not in continuations, text
        elif text[0].isascii() and text[0].isalnum():
            assert token_id in continuations, text
    assert len(continuations) > 100 and any(t.startswith("\u0120") for t in texts)
