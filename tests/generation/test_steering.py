"""The steering step both engines share (dfkd_ray.generation.steering): Eq. 1 up to the draw, the token
masks, the LM's token roles, the teacher's chunked forwards."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfkd_ray.generation.steering import (LmInfo, RowControls, SteeringStats, TeacherScorer, TokenMasks, plan_chunks,
                                          steer_step)
from dfkd_ray.math.decoding import row_uniforms, sample_candidates, sample_top_k


def _logits(B: int, V: int, seed: int, *, quantize: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    if quantize:  # bf16-like values: many exact ties
        x = (x * 4).round() / 4
    return x


def _scorer(teacher_logprobs: torch.Tensor, schedule: str = "constant", **schedule_args):
    """Stands in for a TeacherScorer: the config's schedule, fixed teacher log-probs, the lambdas it was given."""
    seen = {}

    def logprobs(groups, cand, lam, targets, scored=None):
        seen.update(cand=cand, lam=lam, targets=targets, scored=scored)
        return teacher_logprobs if scored is None else teacher_logprobs.masked_fill(~scored, 0.0)

    config = SimpleNamespace(lambda_schedule=schedule, decay_rate=schedule_args.get("decay_rate", 0.97),
                             lambda_floor=schedule_args.get("lambda_floor", 0.25),
                             candidate_mass=schedule_args.get("candidate_mass", 1.0))
    return SimpleNamespace(config=config, logprobs=logprobs, seen=seen)


NO_MASKS = TokenMasks(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("top_k,m,top_p,temperature", [(1, 5, 1.0, 1.0), (10, 10, 0.9, 1.0), (20, 50, 0.9, 0.7),
                                                        (50, 200, 1.0, 1.3), (5, 300, 0.5, 1.0)])
def test_steer_step_with_lambda_zero_samples_what_top_k_sampling_does(quantize, top_k, m, top_p, temperature):
    """Eq. 1 with lambda = 0 over the top-m samples exactly what top-k sampling of the full logits samples,
    whatever the teacher says: the Hugging Face engine's two paths (guided rows in the batch or not) agree."""
    B, V = 64, 300
    logits = _logits(B, V, seed=top_k + m, quantize=quantize)
    scorer = _scorer(torch.log_softmax(_logits(B, min(m, V), seed=99), -1))
    controls = RowControls(torch.zeros(B), torch.zeros(B, dtype=torch.long))
    for step in range(4):
        u = row_uniforms(list(range(100 + step * B, 100 + (step + 1) * B)), 1)[:, 0]
        plain = sample_top_k(logits, u, top_k=top_k, top_p=top_p, temperature=temperature)
        scores, cand = steer_step(logits.clone(), torch.full((B,), step), controls, {"teacher": None},
                                  masks=NO_MASKS, scorer=scorer, top_m=m)
        guided = sample_candidates(scores, cand, u, top_k=top_k, top_p=top_p, temperature=temperature)
        assert torch.equal(plain, guided)


def test_steer_step_is_eq1_on_the_top_m_with_the_scheduled_lambda():
    B, V, m = 4, 40, 6
    logits = _logits(B, V, seed=3)
    teacher = torch.log_softmax(_logits(B, m, seed=4), -1)
    scorer = _scorer(teacher, "decay", decay_rate=0.5, lambda_floor=0.3)
    controls = RowControls(torch.tensor([8.0, 0.0, 2.0, 4.0]), torch.tensor([1, 0, 1, 0]))
    steps = torch.tensor([0, 1, 1, 5])
    scores, cand = steer_step(logits.clone(), steps, controls, {"teacher": None}, masks=NO_MASKS, scorer=scorer, top_m=m)
    lam = torch.tensor([8.0, 0.0, 2.0 * 0.5, 4.0 * 0.3])
    assert torch.allclose(scorer.seen["lam"], lam) and torch.equal(scorer.seen["targets"], controls.targets)
    lp = torch.log_softmax(logits, -1)
    top = torch.sort(lp, dim=-1, descending=True, stable=True)
    assert torch.equal(cand, top.indices[:, :m])
    assert torch.allclose(scores, top.values[:, :m] + lam.view(-1, 1) * teacher)
    assert torch.equal(scores[1], top.values[1, :m])  # lambda_t = 0: exactly the LM's log-probabilities


def test_candidate_mass_scores_and_draws_only_the_lms_nucleus_of_guided_rows():
    """Guided rows keep Eq. 1 on the candidates within the LM's nucleus and -inf on the rest (never
    drawn); a row with lambda_t = 0 keeps all its top-m LM log-probabilities."""
    B, V, m, mass = 4, 40, 12, 0.6
    logits = _logits(B, V, seed=5)
    teacher = torch.log_softmax(_logits(B, m, seed=6), -1)
    scorer = _scorer(teacher, candidate_mass=mass)
    controls = RowControls(torch.tensor([8.0, 0.0, 2.0, 4.0]), torch.tensor([1, 0, 1, 0]))
    steps = torch.zeros(B, dtype=torch.long)
    scores, cand = steer_step(logits.clone(), steps, controls, {"teacher": None}, masks=NO_MASKS, scorer=scorer,
                              top_m=m)
    top = torch.sort(torch.log_softmax(logits, -1), dim=-1, descending=True, stable=True)
    values = top.values[:, :m]
    for b in range(B):  # slow reference: walk each row's candidates until the LM's mass is reached
        total, nucleus = 0.0, []
        for j in range(m):
            nucleus.append(total < mass)
            total += float(values[b, j].exp())
        nucleus = torch.tensor(nucleus) | (controls.strength[b] == 0)
        assert torch.equal(scorer.seen["scored"][b], nucleus)
        assert torch.equal(torch.isfinite(scores[b]), nucleus)
        expected = values[b] + controls.strength[b] * teacher[b]
        assert torch.allclose(scores[b][nucleus], expected[nucleus])
    assert 1 <= int(scorer.seen["scored"][0].sum()) < m  # the cut is real on this row


def test_token_masks_ban_special_ids_always_and_eos_only_early():
    V = 12
    masks = TokenMasks(torch.tensor([3, 7]), torch.tensor([0, 11]), min_new_tokens=2)
    logits = _logits(4, V, seed=5)
    steps = torch.tensor([0, 1, 2, 9])
    masked = logits.clone()
    masks.apply(masked, steps)
    assert not torch.isfinite(masked[:, [3, 7]]).any()
    assert not torch.isfinite(masked[:2][:, [0, 11]]).any() and torch.equal(masked[2:, [0, 11]], logits[2:, [0, 11]])
    keep = [i for i in range(V) if i not in (0, 3, 7, 11)]
    assert torch.equal(masked[:, keep], logits[:, keep])
    # No guided row: the masks are the whole step.
    again = logits.clone()
    controls = RowControls(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    assert steer_step(again, steps, controls, {}, masks=masks, scorer=_scorer(None), top_m=5) is None
    assert torch.equal(again, masked)
    # Candidates never include a masked id.
    _, cand = steer_step(logits.clone(), steps, RowControls(torch.ones(4), torch.zeros(4, dtype=torch.long)),
                         {"teacher": None}, masks=masks, scorer=_scorer(torch.zeros(4, V)), top_m=V)
    for row, s in zip(cand.tolist(), steps.tolist()):
        banned = {3, 7} | ({0, 11} if s < 2 else set())
        assert not banned & set(row[:V - len(banned)])


def test_lm_info_from_a_directory_equals_from_the_loaded_model(synthetic_task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(synthetic_task.lm)
    tok = AutoTokenizer.from_pretrained(synthetic_task.lm)
    loaded = LmInfo.from_model(lm, tok, "lm")
    read = LmInfo.from_dir(synthetic_task.lm)
    fields = ("eos_ids", "bos_id", "pad_id", "banned", "context")
    assert [getattr(read, f) for f in fields] == [getattr(loaded, f) for f in fields]
    assert read.eos_ids and read.bos_id is not None and read.context == lm.config.n_positions
    assert read.name == synthetic_task.lm.name and read.vocab.byte_level == loaded.vocab.byte_level
    assert dataclasses.replace(read, banned=[1]).banned == [1]


def test_stats_count_forwards_and_host_timed_seconds():
    stats = SteeringStats()
    stats.add_forward(np.array([3, 5]), width=5)
    with stats.timing(torch.device("cpu")):
        pass
    assert (stats.teacher_forwards, stats.teacher_sequences, stats.teacher_tokens, stats.teacher_padded_tokens,
            stats.teacher_tokens_sq) == (1, 2, 8, 10, 34)
    assert stats.teacher_seconds == stats.teacher_busy_seconds > 0 and stats.pending == []
    stats.settle_timing(torch.device("cpu"))  # nothing pending off CUDA
    assert stats.teacher_forwards == 1


@pytest.mark.parametrize("budget", [16, 4096])  # unpadded chunks (equal lengths) / one padded chunk
def test_scorer_gives_the_same_log_probs_with_the_teachers_prepared_masks(teachers, budget):
    """A teacher with prepared masks on (as a distiller or, on CUDA, the scorer turns them on) scores
    padded chunks with its 4D mask and unpadded ones with none, as it does with the (n, W) masks."""
    from dfkd_ray.config import SteeredConfig
    from dfkd_ray.generation.token_map import TeacherInputs
    from dfkd_ray.models.inputs import enable_prepared_mask

    t = teachers["alpha"]
    texts = ["the market fell", "the match ended", "a much longer sentence about the match and the goal"]
    enc = t.tokenizer(texts, padding=True, return_tensors="pt")
    inputs = TeacherInputs(enc["input_ids"], enc["attention_mask"], enc["attention_mask"].sum(1).numpy())
    targets = torch.tensor([0, 1, 0])
    config = SteeredConfig(lm_path="unused", teacher_chunk_tokens=budget)
    plan = plan_chunks(np.sort(inputs.lengths), budget, uniform=config.teacher_batching == "uniform")
    assert any(same for *_, same in plan) == (budget == 16) and any(not same for *_, same in plan) == (budget == 4096)
    scorer = TeacherScorer({"alpha": t}, None, config, "cpu")
    plain = scorer.score(t, inputs, targets)
    assert enable_prepared_mask(t)
    try:
        torch.testing.assert_close(scorer.score(t, inputs, targets), plain)
    finally:
        t.prepared_mask = None


@pytest.mark.parametrize("uniform", [True, False])
def test_plan_chunks_covers_every_sequence_within_budget(uniform):
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


def test_token_masks_ban_word_continuations_at_the_first_step_only():
    V = 10
    masks = TokenMasks(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0,
                       continuations=torch.tensor([2, 5]))
    logits = _logits(3, V, seed=7)
    steps = torch.tensor([0, 1, 0])
    masked = logits.clone()
    masks.apply(masked, steps)
    assert not torch.isfinite(masked[[0, 2]][:, [2, 5]]).any()
    assert torch.equal(masked[1], logits[1])
    keep = [i for i in range(V) if i not in (2, 5)]
    assert torch.equal(masked[:, keep], logits[:, keep])
