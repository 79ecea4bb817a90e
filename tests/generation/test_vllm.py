"""The vLLM engine on CPU, without vLLM: row bookkeeping under vLLM's batch updates, the adapter's
apply step against the Hugging Face engine's reweighting, the generator's plumbing through a stand-in
``vllm`` module, and the config check. With vLLM importable: the adapter is a real vLLM logits
processor and passes vLLM's own parameter validation."""

from __future__ import annotations

import copy
import dataclasses
import random
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from dfkd_ray.config import SteeredConfig, TeacherConfig
from dfkd_ray.generation import hf
from dfkd_ray.generation.hf import SteeredGenerator
from dfkd_ray.generation.steering import GenerationRequest, candidate_logits, prepare_rows
from dfkd_ray.generation.vllm import PROCESSOR, SETTINGS_KEY, SteeringCore, engine_settings
from dfkd_ray.generation.vllm_rows import (STEER_KEY, SWAP, UNIDIRECTIONAL, RowBook, SteerArgs, direction,
                                           parse_steer_args)

pytestmark = pytest.mark.usefixtures("seeded_single_thread")


@dataclass
class Update:
    """Stands in for vLLM's ``BatchUpdate`` (same field names)."""

    batch_size: int
    removed: list = field(default_factory=list)
    added: list = field(default_factory=list)
    moved: list = field(default_factory=list)


def params_for(teacher="alpha", target=0, strength=4.0, top_m=8):
    return types.SimpleNamespace(extra_args=SteerArgs(teacher, target, strength, top_m).to_extra_args())


PLAIN = types.SimpleNamespace(extra_args=None)  # a request that is not steered


def teachers_at(book: RowBook) -> dict[int, tuple]:
    return {i: (s.teacher, s.args.target, id(s.output_ids)) for i, s in book.rows.items()}


# ---------------------------------------------------------------------- bookkeeping, by hand


def test_add_remove_move_swap_by_hand():
    book = RowBook()
    outs = [[] for _ in range(5)]
    book.update(Update(4, added=[(0, params_for("alpha", 0), [1], outs[0]), (1, params_for("beta", 1), [1], outs[1]),
                                 (2, PLAIN, [1], outs[2]), (3, params_for("alpha", 1), [1], outs[3])]))
    assert sorted(book.rows) == [0, 1, 3]  # the plain request is not tracked
    assert book.rows[1].output_ids is outs[1]  # vLLM's live list, not a copy

    # Remove slot 1, condense: slot 3 slides into the hole (vLLM's InputBatch.condense).
    gone = book.update(Update(3, removed=[1], moved=[(3, 1, UNIDIRECTIONAL)]))
    assert [g.teacher for g in gone] == ["beta"]
    assert teachers_at(book) == {0: ("alpha", 0, id(outs[0])), 1: ("alpha", 1, id(outs[3]))}

    # Swap 0 <-> 2 (2 holds the plain request): the steered row follows.
    book.update(Update(3, moved=[(0, 2, SWAP)]))
    assert teachers_at(book) == {1: ("alpha", 1, id(outs[3])), 2: ("alpha", 0, id(outs[0]))}

    # A slot freed and refilled in the same step: the new request replaces the old one.
    gone = book.update(Update(3, removed=[2], added=[(2, params_for("beta", 0), [1], outs[4])]))
    assert [g.args.target for g in gone] == [0] and book.rows[2].teacher == "beta"
    # Added over an occupied slot (vLLM: "added ... may replace existing requests"), by a plain request.
    gone = book.update(Update(3, added=[(1, PLAIN, [1], [])]))
    assert [g.teacher for g in gone] == ["alpha"] and sorted(book.rows) == [2]
    # One-way move onto an occupied slot drops what was there.
    book.update(Update(3, added=[(0, params_for("alpha", 1), [1], [])]))
    gone = book.update(Update(2, moved=[(2, 0, UNIDIRECTIONAL)]))
    assert [g.args.target for g in gone] == [1] and teachers_at(book) == {0: ("beta", 0, id(outs[4]))}
    assert book.update(None) == [] and sorted(book.rows) == [0]


def test_bookkeeping_refuses_rows_beyond_the_batch():
    book = RowBook()
    book.update(Update(3, added=[(2, params_for(), [1], [])]))
    with pytest.raises(RuntimeError, match="out of step"):
        book.update(Update(2))  # vLLM says 2 requests, but a steered row sits in slot 2


def test_directions_accept_vllm_enum_members_by_name():
    assert direction(types.SimpleNamespace(name="SWAP")) == SWAP and direction("UNIDIRECTIONAL") == UNIDIRECTIONAL
    with pytest.raises(ValueError):
        direction("SIDEWAYS")


def test_steer_args_are_plain_types_and_checked():
    args = SteerArgs("alpha", 1, 2.5, 20)
    extra = args.to_extra_args()
    assert parse_steer_args(extra) == args and parse_steer_args(None) is None and parse_steer_args({"x": 1}) is None
    assert {type(v) for v in extra[STEER_KEY].values()} == {str, int, float}
    bad = {"teacher": "", "target": np.int64(1), "control_strength": -1.0, "top_m": 0, "k": 1}
    with pytest.raises(ValueError) as e:
        parse_steer_args({STEER_KEY: bad})
    for word in ("unknown keys ['k']", "teacher", "target", "int64", "control_strength", "top_m"):
        assert word in str(e.value)
    with pytest.raises(ValueError, match="target"):
        parse_steer_args({STEER_KEY: {**extra[STEER_KEY], "target": True}})


# ---------------------------------------------------------------------- bookkeeping, randomized


def _apply_to_list(batch: list, update: Update, steered) -> None:
    """The plain model: a list of requests (None = empty slot), updated removed -> added -> moved."""
    need = max([update.batch_size - 1] + [a[0] for a in update.added] + [max(m[:2]) for m in update.moved]) + 1
    batch.extend([None] * (need - len(batch)))
    for i in update.removed:
        batch[i] = None
    for i, params, _, out in update.added:
        batch[i] = (params, out)
    for a, b, d in update.moved:
        if d == SWAP:
            batch[a], batch[b] = batch[b], batch[a]
        else:
            batch[b], batch[a] = batch[a], None


def _expected(batch: list) -> dict[int, tuple]:
    return {i: (x[0].extra_args[STEER_KEY]["teacher"], x[0].extra_args[STEER_KEY]["target"], id(x[1]))
            for i, x in enumerate(batch) if x is not None and x[0].extra_args}


def _random_request(rng: random.Random):
    params = PLAIN if rng.random() < 0.25 else params_for(rng.choice("abc"), rng.randrange(4))
    return params, [1], []


def test_random_updates_match_a_list_model():
    """Arbitrary update sequences (any slot, any direction) against the list model."""
    rng = random.Random(0)
    for trial in range(30):
        book, batch, size = RowBook(), [], 0
        for step in range(40):
            occupied = [i for i, x in enumerate(batch) if x is not None]
            removed = rng.sample(occupied, rng.randint(0, len(occupied))) if occupied and rng.random() < 0.5 else []
            width = max(len(batch), 1) + 2
            added = [(i, *_random_request(rng)) for i in rng.sample(range(width), rng.randint(0, 3))]
            moved = [(*rng.sample(range(width), 2), rng.choice([SWAP, UNIDIRECTIONAL])) for _ in range(rng.randint(0, 3))]
            update = Update(0, removed, added, moved)
            _apply_to_list(batch, update, None)
            update.batch_size = max([i + 1 for i, x in enumerate(batch) if x is not None], default=0)
            book.update(update)
            assert teachers_at(book) == _expected(batch), (trial, step)


class FakeInputBatch:
    """vLLM 0.26's persistent batch as it reports changes (``gpu_input_batch.py``): a new request takes
    the lowest slot freed this step (``pop_removed``), else the end; ``condense`` slides the last
    requests into the remaining holes (UNIDIRECTIONAL moves); other code may swap two slots."""

    def __init__(self):
        self.slots: list = []
        self.reset()

    def reset(self):
        self.removed, self.added, self.moved = [], [], []

    def remove(self, i):
        self.slots[i] = None
        self.removed.append(i)

    def add(self, params, prompt, out):
        if self.removed:
            i = min(self.removed)
            self.removed.remove(i)
        else:
            i = len(self.slots)
            self.slots.append(None)
        self.slots[i] = (params, out)
        self.added.append((i, params, prompt, out))

    def swap(self, a, b):
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        self.moved.append((a, b, SWAP))

    def condense_and_report(self) -> Update:
        holes = sorted(self.removed)
        last = len(self.slots) - 1
        while holes:
            while last >= 0 and self.slots[last] is None:
                last -= 1
            if holes[0] >= last:
                break
            h = holes.pop(0)
            self.slots[h], self.slots[last] = self.slots[last], None
            self.moved.append((last, h, UNIDIRECTIONAL))
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        update = Update(len(self.slots), sorted(self.removed, reverse=True), list(self.added), list(self.moved))
        self.reset()
        return update


def test_vllm_shaped_updates_match_the_batch():
    """Updates shaped as vLLM makes them: removals, refills of freed slots, condensing moves, swaps."""
    rng = random.Random(1)
    for trial in range(20):
        book, fake = RowBook(), FakeInputBatch()
        for step in range(60):
            live = [i for i, x in enumerate(fake.slots) if x is not None]
            for i in rng.sample(live, min(len(live), rng.randint(0, 3))):
                fake.remove(i)
            for _ in range(rng.randint(0, 3)):
                fake.add(*_random_request(rng))
            update = fake.condense_and_report()
            if len(fake.slots) > 1 and rng.random() < 0.3:  # a swap after condensing (as in a later step)
                a, b = rng.sample(range(len(fake.slots)), 2)
                fake.swap(a, b)
                update.moved.append((a, b, SWAP))
                fake.reset()
            book.update(update)
            assert teachers_at(book) == _expected(fake.slots), (trial, step)


# ---------------------------------------------------------------------- the apply step vs the HF engine


@pytest.fixture(scope="module")
def lm_and_tokenizer(synthetic_task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(synthetic_task.lm, dtype=torch.float32),
            AutoTokenizer.from_pretrained(synthetic_task.lm))


def _core_like(gen: SteeredGenerator, config: SteeredConfig) -> SteeringCore:
    """The adapter's core with the HF generator's LM info and (already loaded) teachers."""
    return SteeringCore(gen.lm_info, config, "cpu", load_teacher=lambda name: gen.teachers[name])


@pytest.mark.parametrize("keep_prompt,candidate_mass", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_apply_gives_the_hf_engines_reweighted_logits(lm_and_tokenizer, teachers, monkeypatch, keep_prompt,
                                                      candidate_mass):
    """Run the HF engine's real decoding loop on made-up LM logits, recording each step's Eq. 1 scores;
    replay the same logits through the adapter's core, its rows scattered over vLLM-style slots
    (shuffled adds, plain requests in between, removals, condensing moves, swaps, a preempted row
    re-added with its tokens). Every steered row's output must equal the HF scores as logits (with
    ``candidate_mass`` < 1: ``-inf`` outside the LM's nucleus, as the HF engine draws)."""
    lm, tok = lm_and_tokenizer
    V = lm.config.vocab_size
    params = SteeredConfig(control_strength=6.0, lambda_schedule="decay", decay_rate=0.8, lambda_floor=0.3, top_m=12,
                           top_k=6, max_new_tokens=9, min_new_tokens=3, keep_prompt=keep_prompt, batch_size=64,
                           candidate_mass=candidate_mass)
    gen = SteeredGenerator(copy.deepcopy(lm), tok, teachers, params)
    prompts = ["", "Category: {label}", "the", None]
    reqs = [GenerationRequest(("alpha", "beta")[i % 2], (i // 2) % 2, seed=100 + i, prompt=prompts[i % 4],
                              control_strength=(None, 3.0, 0.0)[i % 3]) for i in range(9)]
    ends = {0: 4, 3: 6, 5: 4, 7: 7}  # request -> step at which it draws EOS (others run to the length limit)
    g = torch.Generator().manual_seed(0)

    # Record: per step, the active requests (HF row order), their logits, the scores and candidates.
    log = {"active": [], "logits": [], "scores": [], "cand": []}
    active = list(range(len(reqs)))

    def fake_forward(input_ids, attention_mask, position_ids, cache):
        x = torch.randn(len(active), V, generator=g) * 3
        log["active"].append(list(active))
        log["logits"].append(x.clone())  # HF masks its copy in place
        return x

    real_sample = hf.sample_candidates

    def fake_sample(scores, cand, u, **kw):
        t = len(log["scores"])
        log["scores"].append(scores.clone())
        log["cand"].append(cand.clone())
        chosen = real_sample(scores, cand, u, **kw)
        for b, r in enumerate(list(active)):
            if ends.get(r) == t:
                chosen[b] = gen.lm_info.eos_ids[0]
        active[:] = [r for r in active if ends.get(r) != t]
        return chosen

    monkeypatch.setattr(gen, "_lm_forward", fake_forward)
    monkeypatch.setattr(hf, "sample_candidates", fake_sample)
    results = gen.generate(reqs)
    monkeypatch.undo()
    rows = prepare_rows(reqs, gen.teachers, gen.config, gen.lm_info)
    assert [r.stop_reason for r in results].count("eos") == len(ends)

    # Replay through the core.
    core = _core_like(gen, params)
    fake = FakeInputBatch()
    outs = {r: [] for r in range(len(reqs))}
    slot_of = {}
    order = list(range(len(reqs)))
    random.Random(3).shuffle(order)
    for j, r in enumerate(order):
        if j % 3 == 0:
            fake.add(PLAIN, [1], [])  # a request the processor must leave alone
        row = rows[r]
        fake.add(types.SimpleNamespace(extra_args=SteerArgs(row.request.teacher, row.request.target, row.strength,
                                                            params.top_m).to_extra_args()), row.prompt_ids, outs[r])
    core.update_state(fake.condense_and_report())
    checked = 0
    for t, act in enumerate(log["active"][:len(log["scores"])]):
        slot_of = {id(x[1]): i for i, x in enumerate(fake.slots) if x is not None}
        x = torch.randn(len(fake.slots), V, generator=g) * 3
        for b, r in enumerate(act):
            x[slot_of[id(outs[r])]] = log["logits"][t][b]
        y = core.apply(x.clone())
        expected = candidate_logits(log["scores"][t], log["cand"][t], V)
        for i, item in enumerate(fake.slots):
            if item[0] is PLAIN:
                assert torch.equal(y[i], x[i])  # untouched
        for b, r in enumerate(act):
            i = slot_of[id(outs[r])]
            if rows[r].strength > 0:
                assert torch.equal(y[i], expected[b]), (t, r)
                checked += 1
            else:  # unguided: only banned tokens (and EOS before min_new_tokens) masked; top-k is vLLM's
                masked = x[i].clone()
                masked[gen.lm_info.banned] = float("-inf")
                if t < params.min_new_tokens:
                    masked[gen.lm_info.eos_ids] = float("-inf")
                assert torch.equal(y[i], masked)
        # The step's tokens reach vLLM's live lists; finished requests leave; the batch reshuffles.
        chosen = {r: (results[r].token_ids + gen.lm_info.eos_ids)[t] for r in act}
        for r in act:
            outs[r].append(chosen[r])
        for r in act:
            if ends.get(r) == t:
                fake.remove(slot_of[id(outs[r])])
        if t == 2:  # preempt request 4 and bring it back, with its tokens, into another slot
            fake.remove(slot_of[id(outs[4])])
            fake.add(PLAIN, [1], [])
            row = rows[4]
            fake.add(types.SimpleNamespace(extra_args=SteerArgs(row.request.teacher, row.request.target, row.strength,
                                                                params.top_m).to_extra_args()), row.prompt_ids, outs[4])
        update = fake.condense_and_report()
        if len(fake.slots) > 2 and t % 2:
            fake.swap(0, len(fake.slots) - 1)
            update.moved.extend(fake.moved)
            fake.reset()
        core.update_state(update)
    assert checked >= 30
    # with candidate_mass < 1 the cut was real: some candidates were never scored (none otherwise)
    assert any(bool(torch.isinf(s).any()) for s in log["scores"]) == (candidate_mass < 1)


def test_per_row_m_banned_ids_and_min_new_tokens(lm_and_tokenizer, teachers):
    """Each row keeps its own m; banned ids are never candidates; EOS is banned before min_new_tokens."""
    lm, tok = lm_and_tokenizer
    params = SteeredConfig(top_m=10, top_k=5, min_new_tokens=2)
    gen = SteeredGenerator(copy.deepcopy(lm), tok, teachers, params)
    eos, banned = gen.lm_info.eos_ids, [5, 7, 11]
    core = SteeringCore(dataclasses.replace(gen.lm_info, banned=banned), params, "cpu",
                        load_teacher=lambda name: teachers[name])
    core.update_state(Update(4, added=[(0, params_for("alpha", 0, 4.0, 5), [gen.lm_info.bos_id], [11, 12]),
                                       (1, params_for("beta", 1, 4.0, 9), [gen.lm_info.bos_id], []),
                                       (2, params_for("beta", 0, 4.0, 5), [gen.lm_info.bos_id], [13, 14, 15]),
                                       (3, params_for("beta", 0, 0.0, 5), [gen.lm_info.bos_id], [])]))
    x = torch.randn(4, lm.config.vocab_size, generator=torch.Generator().manual_seed(1))
    x[:, banned + eos] = 50.0  # the LM's favourites, all forbidden (EOS only early)
    y = core.apply(x.clone())
    assert torch.isfinite(y[:3]).sum(-1).tolist() == [5, 9, 5]
    assert not torch.isfinite(y[:, banned]).any()
    assert not torch.isfinite(y[[1, 3]][:, eos]).any() and torch.isfinite(y[2, eos]).all()  # row 2 has 3 tokens
    unguided = x[3].clone()
    unguided[banned + eos] = float("-inf")
    assert torch.equal(y[3], unguided)


def test_teachers_load_lazily_and_rows_free_their_text(lm_and_tokenizer, teachers):
    lm, tok = lm_and_tokenizer
    params = SteeredConfig(top_m=6, top_k=3, min_new_tokens=0)
    gen = SteeredGenerator(copy.deepcopy(lm), tok, teachers, params)
    loaded = []
    core = SteeringCore(gen.lm_info, params, "cpu", load_teacher=lambda name: loaded.append(name) or teachers[name])
    core.update_state(Update(2, added=[(0, PLAIN, [1], []), (1, params_for("beta", 0, 0.0), [1], [])]))
    core.apply(torch.zeros(2, lm.config.vocab_size))
    assert loaded == []  # no row needed a teacher yet
    many = [(i, params_for("alpha", i % 2), [gen.lm_info.bos_id], [20 + i]) for i in range(80)]
    core.update_state(Update(80, added=many))
    core.apply(torch.zeros(80, lm.config.vocab_size))
    assert loaded == ["alpha"] and core.pools["alpha"].rows.n == 80
    core.update_state(Update(0, removed=list(range(79, -1, -1))))
    assert len(core.book) == 0 and core.pools["alpha"].rows is None  # all slots freed, pool compacted


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_text_rows_extend_and_stack_equal_token_by_token(lm_and_tokenizer, teachers, mode):
    """What the pools rely on: appending several tokens at once, or none, and stacking states, give the
    teacher inputs that advancing one token at a time gives."""
    from dfkd_ray.generation.token_map import LmVocabulary, TeacherRows, TeacherTokenMap

    _, tok = lm_and_tokenizer
    vocab = LmVocabulary(tok)
    rng = random.Random(5)
    for name, teacher in teachers.items():
        tmap = TeacherTokenMap(vocab, teacher.tokenizer, 24, mode=mode)
        streams = [[rng.randrange(1, len(tok)) for _ in range(n)] for n in (7, 0, 12)]
        one = tmap.rows([b"", vocab.bytes_of([5, 6]), b""])
        for t in range(12):  # the reference: one token at a time, each row with its own
            for r, s in enumerate(streams):
                if t < len(s):
                    one.extend([r], [[s[t]]])
        parts = [tmap.rows([b""]), tmap.rows([vocab.bytes_of([5, 6]), b""])]
        parts[0].extend([0], [streams[0][:3]])
        parts[0].extend([0], [streams[0][3:]])
        parts[1].extend([0, 1], [streams[1], streams[2]])
        many = TeacherRows.stack(parts)
        cand = np.array([rng.sample(range(1, len(tok)), 6) for _ in range(3)])
        a, b = one.inputs(cand), many.inputs(cand)
        assert np.array_equal(a.lengths, b.lengths) and torch.equal(a.input_ids, b.input_ids), (name, mode)


# ---------------------------------------------------------------------- the generator, through a stand-in vllm


def _fake_vllm(lm_path):
    """A ``vllm`` module whose ``LLM`` runs the fixture LM step by step (full recompute), calls the
    adapter's core the way vLLM calls a logits processor, and samples with temperature, top-k, top-p."""
    from transformers import AutoModelForCausalLM

    mod = types.ModuleType("vllm")
    built = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)
            parse_steer_args(self.extra_args)  # what vLLM's validate_params hook runs

    class LLM:
        def __init__(self, **kw):
            built.update(kw)
            assert kw["logits_processors"] == [PROCESSOR]
            self.lm = AutoModelForCausalLM.from_pretrained(kw["model"], dtype=torch.float32)
            self.core = SteeringCore.from_settings(kw["additional_config"][SETTINGS_KEY], kw["model"], None, "cpu")

        @torch.inference_mode()
        def generate(self, prompts, sps, use_tqdm=False):
            reqs = [{"ids": list(p["prompt_token_ids"]), "sp": sp, "out": [], "done": None,
                     "gen": torch.Generator().manual_seed(sp.seed)} for p, sp in zip(prompts, sps)]
            batch = FakeInputBatch()
            for r in reqs:
                batch.add(r["sp"], r["ids"], r["out"])
            self.core.update_state(batch.condense_and_report())
            while batch.slots:
                live = [next(r for r in reqs if r["out"] is x[1]) for x in batch.slots]
                logits = torch.cat([self.lm(torch.tensor([r["ids"] + r["out"]])).logits[:, -1] for r in live])
                for r in live:  # vLLM's built-in min_tokens processor runs before custom ones
                    if len(r["out"]) < r["sp"].min_tokens:
                        logits[live.index(r), r["sp"].stop_token_ids] = float("-inf")
                logits = self.core.apply(logits)
                for b, r in enumerate(live):
                    sp = r["sp"]
                    z = logits[b] / sp.temperature
                    kth = torch.topk(z, sp.top_k).values[-1]
                    z = torch.where(z >= kth, z, float("-inf"))
                    probs = z.softmax(-1)
                    sorted_p, idx = probs.sort(descending=True)
                    drop = (sorted_p.cumsum(0) - sorted_p) >= sp.top_p
                    probs[idx[drop]] = 0
                    x = int(torch.multinomial(probs, 1, generator=r["gen"]))
                    r["out"].append(x)
                    if x in sp.stop_token_ids:
                        r["done"] = "stop"
                    elif len(r["out"]) == sp.max_tokens:
                        r["done"] = "length"
                for i, x in enumerate(batch.slots):
                    if next(r for r in reqs if r["out"] is x[1])["done"]:
                        batch.remove(i)
                self.core.update_state(batch.condense_and_report())
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(r["out"]), finish_reason=r["done"])])
                    for r in reqs]

    mod.LLM, mod.SamplingParams, mod.built = LLM, SamplingParams, built
    return mod


def _keep_vllm_env(monkeypatch):
    """The generator sets vLLM's environment defaults; put the environment back after the test."""
    for name in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_FLASHINFER_SAMPLER"):
        monkeypatch.setenv(name, "0")


def test_generator_steers_through_the_processor(synthetic_task, teachers, monkeypatch):
    """End to end on CPU with a stand-in ``vllm``: requests become SamplingParams with plain extra_args,
    the engine settings reach the processor, texts come back in order with HF-shaped results, and
    steering moves each teacher's prediction to the target (chance without it, by construction)."""
    from dfkd_ray.generation.vllm import VllmSteeredGenerator

    fake = _fake_vllm(synthetic_task.lm)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    _keep_vllm_env(monkeypatch)
    specs = [TeacherConfig(name=n, path=p) for n, p in synthetic_task.teachers.items()]
    reqs = [GenerationRequest(t, c, seed=20_000 + 101 * i) for t in ("alpha", "beta") for c in range(2) for i in range(8)]
    accuracy = {}
    for lam in (0.0, 8.0):
        params = SteeredConfig(lm_path=synthetic_task.lm, control_strength=lam, top_m=20, top_k=10, max_new_tokens=12,
                               min_new_tokens=4, batch_size=32, prompt="the")  # no topic name to open with
        gen = VllmSteeredGenerator(params, specs, loaded_teachers=teachers, device="cpu")
        results = gen.generate(reqs)
        for name in ("alpha", "beta"):
            pairs = [(res, q) for res, q in zip(results, reqs) if q.teacher == name]
            accuracy[name, lam] = sum(res.teacher_prediction == q.target for res, q in pairs) / len(pairs)
    built = fake.built
    assert built["max_num_seqs"] == 32 and built["additional_config"][SETTINGS_KEY] == engine_settings(params, specs)
    res = results[0]
    assert res.params["engine"] == "vllm" and res.params["control_strength"] == 8.0 and res.params["token_map"] == "fast"
    assert res.stop_reason in ("eos", "length") and 4 <= res.num_tokens <= 12 and gen.lm_info.eos_ids[0] not in res.token_ids
    assert res.text == gen.lm_info.vocab.text(res.token_ids)
    for name in ("alpha", "beta"):
        assert accuracy[name, 0.0] == 0.5, accuracy
        assert accuracy[name, 8.0] >= 0.85, accuracy


def test_generator_without_vllm_says_how_to_install(synthetic_task, monkeypatch):
    from dfkd_ray.generation.vllm import VllmSteeredGenerator

    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    _keep_vllm_env(monkeypatch)
    teachers = [TeacherConfig(name="alpha", path="x")]
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]' from the repository root"):
        VllmSteeredGenerator(SteeredConfig(lm_path=synthetic_task.lm), teachers)
    with pytest.raises(ValueError, match="float64"):
        VllmSteeredGenerator(SteeredConfig(lm_path=synthetic_task.lm, dtype="float64"), teachers)


def test_importing_the_adapter_does_not_import_vllm():
    import subprocess

    code = ("import sys, dfkd_ray.generation.vllm, dfkd_ray.generation.vllm_rows\n"
            "print('vllm' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------- the real vLLM, where installed


def test_adapter_is_a_vllm_logits_processor_and_passes_its_validation(synthetic_task):
    pytest.importorskip("vllm", reason="vLLM is not installed (GPU nodes only: pip install -e '.[vllm]')")
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import LogitsProcessor, validate_logits_processors_parameters

    from dfkd_ray.generation.vllm import logits_processor_class

    cls = logits_processor_class()
    assert issubclass(cls, LogitsProcessor) and not getattr(cls, "__abstractmethods__", None)
    good = SamplingParams(top_k=5, extra_args=SteerArgs("alpha", 1, 4.0, 10).to_extra_args())
    validate_logits_processors_parameters([PROCESSOR], good)  # loads the class by its path, as the engine does
    validate_logits_processors_parameters([PROCESSOR], SamplingParams())  # unsteered requests pass
    bad = SamplingParams(extra_args={STEER_KEY: {"teacher": "alpha", "target": -1, "control_strength": 1.0, "top_m": 5}})
    try:  # from 0.30 vLLM turns a processor's ValueError into its own VLLMValidationError (not a ValueError)
        from vllm.exceptions import VLLMValidationError
        errors = (ValueError, VLLMValidationError)
    except ImportError:
        errors = (ValueError,)
    with pytest.raises(errors, match="target"):
        validate_logits_processors_parameters([PROCESSOR], bad)

    # The engine's arguments are vLLM's own (EngineArgs takes every one), the per-request ones too.
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from dfkd_ray.config import SteeredConfig, TeacherConfig
    from dfkd_ray.generation.vllm import VllmSteeredGenerator, llm_arguments

    steered = SteeredConfig(lm_path=synthetic_task.lm, batch_size=7)  # EngineArgs reads the LM's directory
    arguments = llm_arguments(steered, [TeacherConfig(name="alpha", path="t")], {"enforce_eager": True})
    assert set(arguments) <= {f.name for f in dataclasses.fields(EngineArgs)}
    engine = EngineArgs(**arguments)
    assert engine.max_num_seqs == 7 and engine.logits_processors == [PROCESSOR] and engine.enforce_eager
    row = types.SimpleNamespace(request=types.SimpleNamespace(teacher="alpha", target=1, seed=3), strength=4.0)
    owner = types.SimpleNamespace(config=steered, lm_info=types.SimpleNamespace(eos_ids=[0]))
    params = VllmSteeredGenerator.sampling_params(owner, row)
    assert params.extra_args == SteerArgs("alpha", 1, 4.0, steered.top_m).to_extra_args()
    assert (params.max_tokens, params.min_tokens, params.stop_token_ids) == (steered.max_new_tokens,
                                                                             steered.min_new_tokens, [0])

    # vLLM's own update objects drive the bookkeeping (its enum members, its dataclass).
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    book = RowBook()
    book.update(BatchUpdate(batch_size=2, removed=[], added=[(0, good, [1], []), (1, SamplingParams(), [1], [])],
                            moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert sorted(book.rows) == [1] and book.rows[1].args.top_m == 10
    book.update(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert sorted(book.rows) == [0]
    # An engine built without this project's settings passes plain requests through and refuses steered ones.
    proc = cls(types.SimpleNamespace(additional_config={}), torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    x = torch.randn(1, 7)
    assert proc.apply(x) is x
    with pytest.raises(RuntimeError, match="additional_config"):
        proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, good, [1], [])], moved=[]))


# ---------------------------------------------------------------------- config and source


def _steered(job_dict, synthetic_task, **steered):
    d = copy.deepcopy(job_dict)
    d["transfer"] = {"source": "steered", "samples_per_class": 2, "shard_size": 4,
                     "steered": {"lm_path": str(synthetic_task.lm), **steered}}
    return d


def test_config_vllm_engine_needs_vllm_and_a_gpu(job_dict, synthetic_task, monkeypatch):
    import importlib.util

    from dfkd_ray.config import ConfigError, validate_config
    from dfkd_ray.preflight import preflight

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find(name, *a))
    with pytest.raises(ConfigError) as e:
        preflight(validate_config(_steered(job_dict, synthetic_task, engine="vllm")))
    msg = str(e.value)
    assert "transfer.steered.engine" in msg and "pip install -e '.[vllm]' from the repository root" in msg and "not installed" in msg

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"transfer\.steered\.engine.*CUDA GPU"):
        preflight(validate_config(_steered(job_dict, synthetic_task, engine="vllm")))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preflight(validate_config(_steered(job_dict, synthetic_task, engine="vllm"))).transfer.steered.engine == "vllm"


def test_steered_source_builds_the_engine_the_config_names(job_dict, synthetic_task, teachers, monkeypatch):
    from dfkd_ray.config import validate_config
    from dfkd_ray.generation import vllm as adapter
    from dfkd_ray.transfer.sources.steered import SteeredSource

    made = {}

    class Recorder:
        def __init__(self, config, teacher_configs, *, loaded_teachers):
            made.update(config=config, teacher_configs=teacher_configs, loaded=loaded_teachers)

    monkeypatch.setattr(adapter, "VllmSteeredGenerator", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find(name, *a))
    cfg = validate_config(_steered(job_dict, synthetic_task, engine="vllm", top_m=12, top_k=6))
    source = SteeredSource(cfg, teachers, None)
    assert isinstance(source.generator, Recorder) and made["loaded"] is teachers
    assert made["config"] is cfg.transfer.steered and made["config"].top_m == 12
    assert [t.name for t in made["teacher_configs"]] == list(teachers)
    assert made["teacher_configs"][0].path == synthetic_task.teachers["alpha"]
