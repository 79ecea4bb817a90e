"""The steered generator (StrataNet section 4.2) on the fixture LM and teachers, and the 'steered' source."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from dfkd_ray.generation.hf import GenerationRequest, SteeredGenerator, SteeredParams, plan_chunks
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
    return SteeredGenerator(copy.deepcopy(lm), tok, teachers, SteeredParams(**params))


def mixed_requests(n: int, strengths=(None,)) -> list[GenerationRequest]:
    prompts = [None, "", "Category: {label}", "the"]
    return [GenerationRequest(teacher=("alpha", "beta")[i % 2], target=(i // 2) % 2, seed=1000 + 37 * i,
                              prompt=prompts[i % len(prompts)], control_strength=strengths[i % len(strengths)])
            for i in range(n)]


def prompt_ids(gen: SteeredGenerator, req: GenerationRequest) -> list[int]:
    label = gen.teachers[req.teacher].labels[req.target]
    text = (gen.params.prompt if req.prompt is None else req.prompt).replace("{label}", label)
    return [gen.bos_id] + (gen.lm_tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])


@torch.inference_mode()
def plain_sampling(gen: SteeredGenerator, req: GenerationRequest) -> list[int]:
    """Reference: one request alone, the full prefix through the LM each step, plain top-k sampling."""
    p = gen.params
    ids = prompt_ids(gen, req)
    u = row_uniforms([req.seed], p.max_new_tokens)[0]
    out = []
    for t in range(p.max_new_tokens):
        logits = gen.lm(torch.tensor([ids + out])).logits[:, -1].clone()
        if t < p.min_new_tokens:
            logits[:, gen.eos_ids] = float("-inf")
        x = int(sample_top_k(logits, u[t:t + 1], top_k=p.top_k, top_p=p.top_p, temperature=p.temperature))
        if x in gen.eos_ids:
            break
        out.append(x)
    return out


@torch.inference_mode()
def score_every_token(gen: SteeredGenerator, req: GenerationRequest) -> list[int]:
    """Reference for m = V: every vocabulary token's full text through ``Teacher.__call__``, one request alone."""
    p = gen.params
    teacher = gen.teachers[req.teacher]
    ids = prompt_ids(gen, req)
    u = row_uniforms([req.seed], p.max_new_tokens)[0]
    V = gen.lm.config.vocab_size
    out = []
    for t in range(p.max_new_tokens):
        logits = gen.lm(torch.tensor([ids + out])).logits[:, -1].clone()
        if t < p.min_new_tokens:
            logits[:, gen.eos_ids] = float("-inf")
        lp = torch.log_softmax(logits, -1)  # (1, V)
        texts = [gen.vocab.text(out + [v]) for v in range(V)]
        tlp = torch.log_softmax(teacher(texts, with_blocks=False).logits, -1)[:, req.target].view(1, V)
        lam = control_weights(torch.tensor([t]), torch.tensor([p.control_strength]), p.lambda_schedule,
                              decay_rate=p.decay_rate, floor=p.lambda_floor)
        x = int(sample_candidates(reweight(lp, tlp, lam), torch.arange(V).view(1, V), u[t:t + 1], top_k=p.top_k,
                                  top_p=p.top_p, temperature=p.temperature))
        if x in gen.eos_ids:
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
    assert gen.stats["teacher_forwards"] > 0  # the second batch went through the teacher-scored path


def test_m_equal_to_vocabulary_matches_scoring_every_token(lm_and_tokenizer, teachers64):
    V = lm_and_tokenizer[0].config.vocab_size
    gen = make(lm_and_tokenizer, teachers64, control_strength=6.0, lambda_schedule="decay", decay_rate=0.8,
               lambda_floor=0.3, top_m=V, top_k=40, top_p=0.9, max_new_tokens=8, min_new_tokens=2, dtype="float64",
               teacher_chunk_tokens=2048)  # small budget: several padded chunks per step
    reqs = [GenerationRequest("alpha", 0, seed=5), GenerationRequest("beta", 1, seed=6, prompt="Category: {label}")]
    for res, req in zip(gen.generate(reqs), reqs):
        assert len(res.token_ids) >= 2
        assert res.token_ids == score_every_token(gen, req)


def test_steering_moves_the_teachers_prediction(lm_and_tokenizer, teachers):
    """lambda > 0 makes each teacher's prediction match the target far more often than lambda = 0; both
    teachers' tokenizers (WordPiece; a byte-level BPE of their own) differ from the LM's.

    Each seed is used once per class, so unguided texts do not depend on the target and a two-class
    teacher agrees with exactly half of them: the baseline is chance by construction."""
    reqs = [GenerationRequest(t, c, seed=10_000 + 101 * i) for t in ("alpha", "beta") for c in range(2)
            for i in range(16)]
    accuracy = {}
    for lam in (0.0, 8.0):
        gen = make(lm_and_tokenizer, teachers, control_strength=lam, top_m=20, top_k=10, max_new_tokens=16,
                   min_new_tokens=4, batch_size=64)
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


def test_covered_is_the_length_of_a_union_of_intervals():
    from dfkd_ray.generation.hf import covered

    assert covered([]) == 0.0
    assert covered([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7), (2.5, 2.6)]) == pytest.approx(4.0)
    assert covered([(3.0, 4.0), (0.0, 10.0)]) == pytest.approx(10.0)


def test_prepared_4d_mask_is_used_only_where_the_teacher_reads_it_the_same(teachers):
    from types import SimpleNamespace

    from dfkd_ray.generation.hf import accepts_4d_mask, attention_mask_4d

    t = teachers["alpha"]
    enc = t.tokenizer(["the market fell", "a much longer sentence about the match and the goal"],
                      padding=True, return_tensors="pt")
    x, a = enc["input_ids"], enc["attention_mask"]
    assert not bool(a.all())  # a padded chunk
    assert accepts_4d_mask(t, x, a)
    two = t.forward_ids(x, a, with_blocks=False).logits
    four = t.forward_ids(x, attention_mask_4d(a), with_blocks=False).logits
    torch.testing.assert_close(four, two)
    # A model that rejects a prepared mask, and one that reads it differently, keep the 2D mask.
    def rejects_4d(input_ids, attention_mask, **kw):
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2D")
        return t.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
    assert not accepts_4d_mask(SimpleNamespace(model=rejects_4d), x, a)

    def ignores_4d(input_ids, attention_mask, **kw):
        return t.model(input_ids=input_ids, attention_mask=None if attention_mask.dim() == 4 else attention_mask, **kw)
    assert not accepts_4d_mask(SimpleNamespace(model=ignores_4d), x, a)


def test_interleave_resumes_parts_until_each_ends():
    from dfkd_ray.generation.hf import interleave

    seen = []

    def part(name, waits):
        for w in range(waits):
            seen.append((name, w))
            yield None
        seen.append((name, "end"))

    interleave([part("a", 2), part("b", 0), part("c", 1)], torch.device("cpu"))
    assert seen == [("a", 0), ("b", "end"), ("c", 0), ("a", 1), ("c", "end"), ("a", "end")]
    seen.clear()
    interleave([part("solo", 2)], torch.device("cpu"))
    assert seen == [("solo", 0), ("solo", 1), ("solo", "end")]


def test_attention_kernels_leaves_out_cudnn_on_cuda_only(lm_and_tokenizer, teachers, monkeypatch, kernel_recorder):
    from dfkd_ray.generation import hf

    cuda = torch.device("cuda")  # only flags change: no GPU needed
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    with hf.attention_kernels("no_cudnn", cuda):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    for choice, device in (("any", cuda), ("no_cudnn", torch.device("cpu"))):
        with hf.attention_kernels(choice, device):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    forwards_inside, lm_inside = [0], [0]  # LM steps and scoring run inside it

    original = teachers["alpha"].forward_ids

    def counting(*args, **kwargs):
        forwards_inside[0] += kernel_recorder.inside
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "attention_kernels", kernel_recorder)
    monkeypatch.setattr(teachers["alpha"], "forward_ids", counting)
    gen = make(lm_and_tokenizer, teachers, sdpa="any", top_m=8, top_k=4, max_new_tokens=3, min_new_tokens=3)
    lm_forward = gen.lm.forward

    def lm_counting(*args, **kwargs):
        lm_inside[0] += kernel_recorder.inside
        return lm_forward(*args, **kwargs)

    monkeypatch.setattr(gen.lm, "forward", lm_counting)
    gen.generate([GenerationRequest("alpha", 1, seed=5)])
    assert set(kernel_recorder.seen) == {"any"}
    assert forwards_inside[0] == gen.stats["teacher_forwards"] >= 3
    assert lm_inside[0] == gen.stats["lm_forwards"] >= 3


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


def test_bad_parameters_fail_before_generation(lm_and_tokenizer, teachers, monkeypatch):
    with pytest.raises(ValueError, match=r"top_k \(60\) must be <= top_m \(50\)"):
        make(lm_and_tokenizer, teachers, top_m=50, top_k=60)
    with pytest.raises(ValueError, match="control_strength"):
        make(lm_and_tokenizer, teachers, control_strength=-1.0)
    with pytest.raises(ValueError, match="sdpa must be 'no_cudnn' or 'any'"):
        make(lm_and_tokenizer, teachers, sdpa="cudnn")
    with pytest.raises(ValueError, match="decode_parts must be >= 1"):
        make(lm_and_tokenizer, teachers, decode_parts=0)
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


def test_config_rejects_bad_steered_settings(job_dict, synthetic_task):
    from dfkd_ray.config import ConfigError, validate_config

    def with_steered(**steered):
        d = copy.deepcopy(job_dict)
        d["transfer"] = {"source": "steered", "steered": {"lm_path": str(synthetic_task.lm), **steered}}
        return d

    validate_config(with_steered())
    for steered, message in [({"top_k": 60, "top_m": 50}, "top_k"), ({"control_strength": -1}, "control_strength"),
                             ({"token_map": "fast"}, "token_map"), ({"sdpa": "cudnn"}, "sdpa"),
                             ({"decode_parts": 0}, "decode_parts")]:  # engine: vllm in tests/generation/test_vllm.py
        with pytest.raises(ConfigError, match=message):
            validate_config(with_steered(**steered))


def test_kernel_and_schedule_settings_leave_the_transfer_set_fingerprint_alone(job_dict, synthetic_task):
    """A kernel choice or a GPU schedule, like the device, does not decide content: a set made before the field
    existed (or with the other value) resumes instead of being refused."""
    from dfkd_ray.config import validate_config
    from dfkd_ray.transfer.writer import plan_transfer_set

    def fingerprint(**steered):
        d = copy.deepcopy(job_dict)
        d["transfer"] = {"source": "steered", "steered": {"lm_path": str(synthetic_task.lm), **steered}}
        return plan_transfer_set(validate_config(d))[2]

    base = fingerprint()
    assert "sdpa" not in base["transfer"]["steered"] and "decode_parts" not in base["transfer"]["steered"]
    assert fingerprint(sdpa="any") == base
    assert fingerprint(decode_parts=4) == base
    assert fingerprint(top_m=60) != base  # content settings still count


def test_steered_source_writes_a_transfer_set(job_dict, synthetic_task, tmp_path):
    from dfkd_ray.config import validate_config
    from dfkd_ray.transfer.store import read_transfer_table
    from dfkd_ray.transfer.writer import write_transfer_set

    d = copy.deepcopy(job_dict)
    d["transfer"] = {"source": "steered", "samples_per_class": 2, "shard_size": 4,
                     "steered": {"lm_path": str(synthetic_task.lm), "top_m": 12, "top_k": 6, "max_new_tokens": 10,
                                 "min_new_tokens": 3, "prompt": "Category: {label}", "batch_size": 4}}
    cfg = validate_config(d)
    out = write_transfer_set(cfg, tmp_path / "set", progress=False)
    table = read_transfer_table(out)
    assert table.num_rows == 8
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {"steered"}
    assert {(r["teacher"], r["teacher_class"]) for r in rows} == {("alpha", 0), ("alpha", 1), ("beta", 0), ("beta", 1)}
    for r in rows:
        params = json.loads(r["source_params"])
        assert params["control_strength"] == 8.0 and params["top_m"] == 12 and 3 <= params["lm_tokens"] <= 10
        assert params["prompt"].startswith("Category: ") and not r["text"].startswith("Category")
        assert 0.0 <= r["confidence"] <= 1.0


@pytest.mark.parametrize("uniform", [True, False])
def test_plan_chunks_covers_every_sequence_within_budget(uniform):
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.sort(np.concatenate([rng.integers(3, 40, 300), np.full(200, 17), np.full(90, 33)]))
    budget = 2048
    chunks = plan_chunks(lengths, budget, uniform=uniform)
    assert [s for s, _, _ in chunks] == [0] + [e for _, e, _ in chunks[:-1]] and chunks[-1][1] == len(lengths)
    for s, e, same in chunks:
        assert e > s and (e - s) * lengths[e - 1] <= budget or e - s == 1
        assert same == (lengths[s] == lengths[e - 1])
    if uniform:  # the long run of 17s is cut into unpadded forwards of its own
        assert any(same and lengths[s] == 17 and e - s > 30 for s, e, same in chunks)
    padded = sum((e - s) * int(lengths[e - 1]) for s, e, _ in chunks)
    assert padded <= 1.5 * lengths.sum()
