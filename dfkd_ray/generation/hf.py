"""The steerable generator of StrataNet section 4.2 on Hugging Face transformers.

A general-domain causal LM writes text of a chosen class because a teacher reweights its next-token
choices (Eq. 1, :mod:`dfkd_ray.math.decoding`). This engine is the CPU reference and the GPU
workhorse wherever vLLM is absent:

- many requests decode together with the LM's KV cache (left padding, explicit position ids);
  each request has its own teacher, target class, seed, prompt and control strength; rows stop at
  EOS or ``max_new_tokens`` (EOS is banned before ``min_new_tokens``) and leave the batch;
- each step, for each teacher, the ``B_k * m`` candidate continuations of its rows are scored in one
  batched teacher forward (no grad, dynamic padding, sequences sorted by length and cut into chunks
  of at most ``teacher_chunk_tokens`` padded tokens; the teacher's own dtype, bf16 on GPU);
- on CUDA, the LM and the teachers run without cuDNN's attention by default (:func:`attention_kernels`)
  and, if asked, a batch decodes as ``decode_parts`` interleaved parts, one CUDA stream each (:func:`interleave`);
- the teacher's ids come from :mod:`dfkd_ray.generation.token_map` (incremental, exact);
- a request's draws come from its own generator, so its output does not depend on the batch. Stock
  BLAS kernels are not batch-invariant (a row's logits change in the last bits with the batch
  size: MKL's sgemm does, cuBLAS does), so bitwise equality across batch compositions holds when
  those last bits cannot move a decision; run the LM and teachers in float64 (``dtype``) for a
  reference where they practically never can. See ``tests/generation/test_hf.py``.

The teacher's confidence in the target is recorded for every sample. It is what the teacher
believes, not evidence that the text is of the class: the reweighting can find text that fools a
teacher. Never report it as quality.

The step itself -- top-``m`` of the LM, the teacher term, Eq. 1 -- is :func:`steer_candidates` with a
:class:`TeacherScorer`; the vLLM engine (:mod:`dfkd_ray.generation.vllm`) calls the same two, as
do request checking (:func:`prepare_rows`) and results (:func:`finish_results`).

Choices the paper leaves open (fields of :class:`SteeredParams` / ``SteeredConfig``): the teacher
scores, and the transfer set keeps, the continuation only (``keep_prompt=False``; a prompt such as
``Category: {label}`` would otherwise hand the student its label); the text is exactly what the
teacher scored (no stripping); special tokens other than EOS are never sampled; a row whose text
already fills the teacher's ``max_length`` continues without guidance (every candidate would give
the teacher the same truncated input).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dfkd_ray.generation.token_map import LmVocabulary, TeacherInputs, TeacherRows, TeacherTokenMap, to_device
from dfkd_ray.math.decoding import (SCHEDULES, control_weights, reweight, row_uniforms, sample_candidates,
                                    sample_top_k, select_top_m)
from dfkd_ray.models.kernels import attention_kernels

# Work counters of a generator (``stats``). ``steps`` and ``lm_forwards`` count per decoding part: with
# ``decode_parts`` P a batch's token position is P steps (one per part), so divide by P for positions.
_STAT_KEYS = ("steps", "teacher_forwards", "teacher_sequences", "teacher_tokens", "teacher_padded_tokens",
              "teacher_tokens_sq", "teacher_seconds", "teacher_busy_seconds", "tokenizer_seconds", "lm_forwards")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SteeredParams:
    """Decoding parameters; mirrors ``SteeredConfig`` without pydantic (see there for each field)."""

    control_strength: float = 8.0
    lambda_schedule: str = "constant"
    decay_rate: float = 0.97
    lambda_floor: float = 0.25
    top_m: int = 50
    top_k: int = 50
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 64
    min_new_tokens: int = 8
    prompt: str = ""
    keep_prompt: bool = False
    batch_size: int = 32
    teacher_chunk_tokens: int = 262_144
    teacher_batching: str = "padded"
    sdpa: str = "no_cudnn"
    decode_parts: int = 1
    token_map: str = "auto"
    dtype: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> "SteeredParams":
        """From a ``SteeredConfig`` (or anything with the same attribute names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)})

    def validate(self) -> None:
        """Raise ``ValueError`` naming every bad field."""
        bad = []
        if not (math.isfinite(self.control_strength) and self.control_strength >= 0):
            bad.append(f"control_strength (lambda) must be a finite number >= 0, got {self.control_strength}")
        if self.lambda_schedule not in SCHEDULES:
            bad.append(f"lambda_schedule must be one of {SCHEDULES}, got {self.lambda_schedule!r}")
        if not 0 < self.decay_rate <= 1:
            bad.append(f"decay_rate must be in (0, 1], got {self.decay_rate}")
        if not 0 <= self.lambda_floor <= 1:
            bad.append(f"lambda_floor must be in [0, 1], got {self.lambda_floor}")
        if self.top_m < 1:
            bad.append(f"top_m must be >= 1, got {self.top_m}")
        if self.top_k < 1:
            bad.append(f"top_k must be >= 1, got {self.top_k}")
        if self.top_k > self.top_m:
            bad.append(f"top_k ({self.top_k}) must be <= top_m ({self.top_m}): top-k samples among the teacher-scored top-m")
        if not 0 < self.top_p <= 1:
            bad.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad.append(f"temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            bad.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad.append(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if self.batch_size < 1:
            bad.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.teacher_chunk_tokens < 1:
            bad.append(f"teacher_chunk_tokens must be >= 1, got {self.teacher_chunk_tokens}")
        if self.teacher_batching not in ("padded", "uniform"):
            bad.append(f"teacher_batching must be 'padded' or 'uniform', got {self.teacher_batching!r}")
        if self.sdpa not in ("no_cudnn", "any"):
            bad.append(f"sdpa must be 'no_cudnn' or 'any', got {self.sdpa!r}")
        if self.decode_parts < 1:
            bad.append(f"decode_parts must be >= 1, got {self.decode_parts}")
        if self.token_map not in ("auto", "exact"):
            bad.append(f"token_map must be 'auto' or 'exact', got {self.token_map!r}")
        if self.dtype not in ("auto", *_DTYPES):
            bad.append(f"dtype must be one of {('auto', *_DTYPES)}, got {self.dtype!r}")
        if bad:
            raise ValueError("bad steered-generation parameters: " + "; ".join(bad))


@dataclass(frozen=True)
class GenerationRequest:
    """One text to write.

    Attributes:
        teacher: name of the teacher that steers it.
        target: the teacher's class id ``c`` to steer towards.
        seed: the request's seed; the same seed gives the same text whatever else is in the batch.
        prompt: ``None``: the engine's ``prompt`` template; else this template ('' for none). In a
            template ``{label}`` becomes the teacher's name for ``target``.
        control_strength: ``None``: the engine's; else this request's ``lambda``.
    """

    teacher: str
    target: int
    seed: int
    prompt: Optional[str] = None
    control_strength: Optional[float] = None


@dataclass
class GenerationResult:
    """One generated text and what made it.

    ``teacher_confidence`` is ``P_teacher(target | text)``: recorded, never a measure of quality.
    """

    text: str
    token_ids: list[int]
    num_tokens: int
    stop_reason: str
    teacher_confidence: float
    teacher_prediction: int
    params: dict = field(default_factory=dict)


@dataclass
class _Row:
    index: int
    request: GenerationRequest
    prompt: str
    prompt_ids: list[int]
    strength: float
    generated: list[int] = field(default_factory=list)
    stop: str = ""


def resolve_lm_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def plan_chunks(lengths: np.ndarray, budget: int, *, uniform: bool = False, slack: float = 0.1,
                min_fraction: float = 0.125) -> list[tuple[int, int, bool]]:
    """Cut length-sorted sequences into teacher forwards ``(start, end, same_length)``.

    Padded chunks (the default): at most ``budget`` padded tokens (count x longest length), ending
    early, once a chunk holds ``min_fraction * budget`` padded tokens, before the sequence that
    would make its padding exceed ``slack`` of its real tokens.

    ``uniform``: every run of sequences that share one length and hold at least ``min_fraction *
    budget`` tokens is a forward of its own, unpadded and without an attention mask; the shorter
    runs between them are packed as above. On an H100 (BERT-base teacher, benchmarks/RESULTS.md) it
    was slower: ~2.8x as many forwards cost more than the mask and padding they save.

    Args:
        lengths: ``(N,)`` ascending.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    N = len(lengths)
    min_tokens = max(1, int(budget * min_fraction))
    chunks: list[tuple[int, int, bool]] = []

    def padded(a: int, b: int) -> None:
        part = lengths[a:b]
        csum = np.concatenate([[0], np.cumsum(part)])
        s = 0
        while s < len(part):
            count = np.arange(1, len(part) - s + 1)
            pad = count * part[s:]  # padded tokens of chunk [s, s + count)
            real = csum[s + 1:] - csum[s]
            stop = pad > budget
            stop[1:] |= (pad[1:] > (1 + slack) * real[1:]) & (pad[:-1] >= min_tokens)
            stop[0] = False
            e = s + (int(np.argmax(stop)) if stop.any() else len(part) - s)
            chunks.append((a + s, a + e, bool(part[s] == part[e - 1])))
            s = e

    edges = np.flatnonzero(np.diff(lengths)) + 1
    pending = 0  # start of short runs not yet planned
    for s, e in zip(np.concatenate([[0], edges]), np.concatenate([edges, [N]])):
        s, e, width = int(s), int(e), int(lengths[s])
        if uniform and (e - s) * width >= min_tokens:
            if pending < s:
                padded(pending, s)
            per = max(1, budget // width)
            chunks.extend((a, min(e, a + per), True) for a in range(s, e, per))
            pending = e
    if pending < N:
        padded(pending, N)
    return chunks


@dataclass(frozen=True)
class LmTokenRoles:
    """Which LM ids end, start and pad a text, and which are never sampled."""

    eos_ids: list[int]
    bos_id: Optional[int]
    pad_id: int
    banned: list[int]  # special tokens other than EOS, and ids the tokenizer cannot decode

    @classmethod
    def of(cls, config, generation_config, tokenizer, vocab_size: int) -> "LmTokenRoles":
        """From a causal LM's ``config``, its ``generation_config`` (or None) and its tokenizer."""
        eos = getattr(generation_config, "eos_token_id", None)
        eos = eos if eos is not None else (config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id)
        eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
        special = {int(i) for i in tokenizer.all_special_ids}
        banned = sorted((special - set(eos_ids)) | set(range(len(tokenizer), vocab_size)))
        return cls(eos_ids, None if bos_id is None else int(bos_id), int(pad_id), banned)


def teacher_initial(vocab: LmVocabulary, prompt_ids: Sequence[int], bos_id: Optional[int], keep_prompt: bool):
    """The text a row's teacher sees before the first generated token: the prompt without BOS when
    ``keep_prompt``, else nothing (bytes for a byte-level LM, else LM ids)."""
    ids = list(prompt_ids)
    if bos_id is not None and ids[:1] == [bos_id]:
        ids = ids[1:]
    if not keep_prompt:
        ids = []
    return vocab.bytes_of(ids) if vocab.byte_level else ids


def attention_mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """``(n, W)`` padding mask -> ``(n, 1, 1, W)`` boolean (True: attend), a mask transformers takes as prepared."""
    return mask[:, None, None, :].bool()


def accepts_4d_mask(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int = 8) -> bool:
    """Whether ``teacher``'s model reads a prepared 4D mask as it reads the 2D padding mask.

    transformers turns a 2D mask into the 4D one its attention takes, and first asks whether any
    position is padded at all: a ``.all()`` that waits for the GPU to finish everything queued, once
    per forward. A prepared mask skips that question, so one part's teacher forwards can be queued
    while another part's run (see :func:`interleave`). Checked once per teacher on the first rows of a
    padded chunk, on the last hidden states of real tokens (which change when padding is attended,
    even where a saturated classifier's logits barely do) and on the logits; a model that rejects a
    prepared mask or reads it differently keeps the 2D one.
    """
    x, a = input_ids[:rows], attention_mask[:rows]
    real = a.bool()  # (n, W)
    try:
        ref = teacher.model(input_ids=x, attention_mask=a, output_hidden_states=True)
        got = teacher.model(input_ids=x, attention_mask=attention_mask_4d(a), output_hidden_states=True)
        h_ref, h_got = ref.hidden_states[-1][real].float(), got.hidden_states[-1][real].float()  # (tokens, H)
        scale = float(h_ref.abs().max()) or 1.0
        return (h_got.shape == h_ref.shape and got.logits.shape == ref.logits.shape
                and bool(torch.allclose(h_got, h_ref, rtol=2e-2, atol=2e-2 * scale))
                and bool(torch.allclose(got.logits.float(), ref.logits.float(), rtol=2e-2, atol=2e-2)))
    except Exception:  # noqa: BLE001 - a model that cannot take a prepared mask keeps the 2D one
        return False


def covered(spans: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gpu_mark(device: torch.device) -> Optional[torch.cuda.Event]:
    """A CUDA event recorded on the current stream (``None`` off CUDA): what a decoding part yields
    to :func:`interleave` before it waits for the GPU."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def interleave(parts: Sequence, device: torch.device) -> None:
    """Run decoding coroutines to the end, switching between them where they would wait for the GPU.

    Each part is a generator that yields a :func:`gpu_mark` just before it synchronises with the GPU
    (reading its candidates back, reading its draws back). On CUDA each part runs on its own stream and
    the next part resumed is one whose awaited work has finished (the first in line when none has),
    so one part's host work -- building teacher inputs, row bookkeeping, advancing the token map --
    and its LM step run while another part's teacher forwards keep the GPU busy. A part reads only
    its own tensors, so the interleaving changes timing, not results. Off CUDA the parts simply take
    turns.
    """
    if len(parts) == 1:
        for _ in parts[0]:
            pass
        return
    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    streams = [torch.cuda.Stream(device) for _ in parts] if cuda else [None] * len(parts)
    for s in streams:
        if s is not None:
            s.wait_stream(main)  # the parts' inputs were made on the main stream
    waiting: list[tuple[int, Optional[torch.cuda.Event]]] = [(i, None) for i in range(len(parts))]
    while waiting:
        pick = 0
        if cuda:  # the first part whose GPU work is done; else the one queued longest
            pick = next((j for j, (_, ev) in enumerate(waiting) if ev is None or ev.query()), 0)
        i, _ = waiting.pop(pick)
        with torch.cuda.stream(streams[i]) if cuda else contextlib.nullcontext():
            try:
                waiting.append((i, next(parts[i])))
            except StopIteration:
                pass
    for s in streams:
        if s is not None:
            main.wait_stream(s)


class TeacherScorer:
    """The teacher term of Eq. 1: ``log P_teacher(c | x_<t, x)`` for every row's candidates.

    Shared by the Hugging Face engine and the vLLM logits processor: both hold each row's
    teacher-side text as :class:`~dfkd_ray.generation.token_map.TeacherRows` grouped by teacher and
    call :meth:`logprobs` (through :func:`steer_candidates`).

    Args:
        teachers: name -> :class:`~dfkd_ray.models.teacher.Teacher`; the vLLM engine fills it lazily.
        vocab: the LM's :class:`LmVocabulary`.
        params: :class:`SteeredParams` (``teacher_chunk_tokens``, ``teacher_batching``, ``token_map``).
        device: where candidates and teacher inputs live.
    """

    def __init__(self, teachers: dict, vocab: LmVocabulary, params: "SteeredParams", device: torch.device):
        self.teachers = teachers
        self.vocab = vocab
        self.params = params
        self.device = torch.device(device)
        self.maps: dict[str, TeacherTokenMap] = {}
        self.stats: dict[str, float] = {k: 0.0 for k in _STAT_KEYS}
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.mask_4d: dict[str, bool] = {}  # teacher -> takes a prepared 4D mask (CUDA only; see accepts_4d_mask)

    def token_map(self, teacher: str) -> TeacherTokenMap:
        """The (LM, teacher) token map, built on first use."""
        if teacher not in self.maps:
            t = self.teachers[teacher]
            self.maps[teacher] = TeacherTokenMap(self.vocab, t.tokenizer, t.max_length, self.device, mode=self.params.token_map)
        return self.maps[teacher]

    def settle_timing(self) -> None:
        """Fold the CUDA-event times of finished teacher forwards into ``stats``: ``teacher_seconds``
        sums every forward's time, ``teacher_busy_seconds`` counts the time any forward was running
        (less when decoding parts ran forwards side by side on their own streams)."""
        if self.events:
            torch.cuda.synchronize(self.device)
            ref = self.events[0][0]
            spans = [(ref.elapsed_time(a), ref.elapsed_time(b)) for a, b in self.events]  # ms after the first start
            self.stats["teacher_seconds"] += sum(e - s for s, e in spans) / 1e3
            self.stats["teacher_busy_seconds"] += covered(spans) / 1e3
            self.events = []

    def logprobs(self, groups: dict, cand: torch.Tensor, lam: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(B, m)`` ``log P_teacher(target | text + candidate)``; 0 for unguided or saturated rows.

        Args:
            groups: teacher name -> ``(members (n,) batch rows, TeacherRows of those rows in that order)``.
            cand: ``(B, m)`` candidate LM ids; lam: ``(B,)`` ``lambda_t``; targets: ``(B,)`` class ids.
        """
        B, m = cand.shape
        out = torch.zeros(B, m, dtype=torch.float32, device=self.device)
        cand_np = cand.cpu().numpy()
        lam_np = lam.cpu().numpy()
        for name, (members, state) in groups.items():
            live = (lam_np[members] > 0) & ~state.saturated()
            if not live.any():
                continue
            t0 = time.perf_counter()
            if live.all():
                inputs = state.inputs(cand_np[members], cand[to_device(members, self.device)])
                rows = members
            else:  # score only rows that need it (the others' values are never used)
                sub = np.nonzero(live)[0]
                rows = members[sub]
                inputs = state.subset(sub).inputs(cand_np[rows], cand[to_device(rows, self.device)])
            self.stats["tokenizer_seconds"] += time.perf_counter() - t0
            rows_d = to_device(rows, self.device)
            tgt = targets[rows_d].repeat_interleave(m)  # (n*m,)
            lp = self.score(self.teachers[name], inputs, tgt)  # (n*m,)
            out[rows_d] = lp.view(len(rows), m)
        return out

    def score(self, teacher, inputs: TeacherInputs, targets: torch.Tensor) -> torch.Tensor:
        """Teacher log-probabilities of ``targets`` for assembled inputs, in length-sorted chunks."""
        lengths = inputs.lengths
        order = np.argsort(lengths, kind="stable")
        order_d = to_device(order, self.device)  # one copy; chunks slice it on the device
        out = torch.empty(len(lengths), dtype=torch.float32, device=self.device)
        cuda = self.device.type == "cuda"
        plan = plan_chunks(lengths[order], self.params.teacher_chunk_tokens,
                           uniform=self.params.teacher_batching == "uniform")
        with attention_kernels(self.params.sdpa, self.device):
            for s, e, same in plan:
                idx = order[s:e]
                width = int(lengths[idx[-1]])
                idx_d = order_d[s:e]
                x = inputs.input_ids[:, :width][idx_d]  # (n, width), contiguous
                a = None if same else inputs.attention_mask[:, :width][idx_d]  # no padding: no mask
                if a is not None and cuda:
                    if teacher.name not in self.mask_4d:
                        self.mask_4d[teacher.name] = accepts_4d_mask(teacher, x, a)
                    if self.mask_4d[teacher.name]:
                        a = attention_mask_4d(a)  # no host-device wait inside the forward
                if cuda:  # timed with events: no synchronisation inside the loop
                    ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    ev[0].record()
                else:
                    t0 = time.perf_counter()
                logits = teacher.forward_ids(x, a, with_blocks=False).logits  # (n, C) float32
                if cuda:
                    ev[1].record()
                    self.events.append(ev)
                else:
                    dt = time.perf_counter() - t0
                    self.stats["teacher_seconds"] += dt
                    self.stats["teacher_busy_seconds"] += dt
                out[idx_d] = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[idx_d].view(-1, 1)).squeeze(1)
                st = self.stats
                st["teacher_forwards"] += 1
                st["teacher_sequences"] += len(idx)
                st["teacher_tokens"] += float(lengths[idx].sum())
                st["teacher_tokens_sq"] += float((lengths[idx].astype(np.float64) ** 2).sum())
                st["teacher_padded_tokens"] += float(len(idx) * width)
        return out


def steer_candidates(logits: torch.Tensor, lam: torch.Tensor, targets: torch.Tensor, groups: dict,
                     scorer: TeacherScorer, top_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Eq. 1 for a batch, up to the draw: the LM's top-``m`` and their reweighted scores.

    The one reweighting both engines run: the Hugging Face engine samples from the result with
    :func:`~dfkd_ray.math.decoding.sample_candidates`; the vLLM logits processor scatters it into
    full-vocabulary logits (:func:`candidate_logits`) and leaves temperature, top-k and top-p to
    vLLM's sampler.

    Args:
        logits: ``(B, V)`` LM logits, banned tokens already ``-inf``.
        lam: ``(B,)`` ``lambda_t``; targets: ``(B,)`` each row's class of its teacher.
        groups: teacher name -> ``(members, TeacherRows)``: each row's text so far, teacher-side
            (see :meth:`TeacherScorer.logprobs`).
        top_m: candidates per row (``m >= V`` keeps the whole vocabulary).

    Returns:
        ``scores (B, m)`` (Eq. 1) and ``cand (B, m)`` LM ids, ordered by (LM log-prob desc, id asc).
    """
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    values, cand = select_top_m(logprobs, min(top_m, logprobs.shape[-1]))  # (B, m)
    tlp = scorer.logprobs(groups, cand, lam, targets)  # (B, m) log P_teacher(c | x_<=t)
    return reweight(values, tlp, lam), cand  # (B, m) Eq. 1


def candidate_logits(scores: torch.Tensor, cand: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(B, V)`` logits that are the candidates' scores and ``-inf`` elsewhere: sampling from them
    with temperature, top-k (``k <= m``) and top-p is sampling among the scored candidates."""
    out = torch.full((scores.shape[0], vocab_size), float("-inf"), dtype=scores.dtype, device=scores.device)
    return out.scatter_(1, cand, scores)


def prepare_rows(requests: Sequence[GenerationRequest], teachers: dict, p: "SteeredParams", lm_tokenizer,
                 bos_id: Optional[int], context: int) -> list[_Row]:
    """Check every request before any generation starts; raise one error listing the problems."""
    if len(requests) == 0:
        raise ValueError("no requests: pass at least one GenerationRequest")
    problems, rows = [], []
    for i, r in enumerate(requests):
        if r.teacher not in teachers:
            problems.append(f"request {i}: unknown teacher {r.teacher!r}; loaded: {sorted(teachers)}")
            continue
        labels = teachers[r.teacher].labels
        if not (isinstance(r.target, (int, np.integer)) and 0 <= int(r.target) < len(labels)):
            problems.append(f"request {i}: teacher {r.teacher!r} has no class {r.target!r}; "
                            f"its classes are 0..{len(labels) - 1} ({labels})")
            continue
        strength = p.control_strength if r.control_strength is None else float(r.control_strength)
        if not (math.isfinite(strength) and strength >= 0):
            problems.append(f"request {i}: control_strength (lambda) must be a finite number >= 0, got {strength}")
            continue
        template = p.prompt if r.prompt is None else r.prompt
        prompt = template.replace("{label}", labels[int(r.target)])
        ids = list(lm_tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
        if bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [int(bos_id)] + ids
        if not ids:
            problems.append(f"request {i}: the LM has no BOS token, so an empty prompt gives it nothing to "
                            "condition on; give a prompt")
            continue
        if len(ids) >= context:
            problems.append(f"request {i}: prompt is {len(ids)} LM tokens, longer than the LM's context "
                            f"({context}); shorten it")
            continue
        if len(ids) + p.max_new_tokens > context:
            problems.append(f"request {i}: prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                            f"exceeds the LM's context ({context}); lower max_new_tokens or shorten the prompt")
            continue
        rows.append(_Row(i, r, prompt, ids, strength))
    if problems:
        raise ValueError(f"{len(problems)} bad generation request(s): " + "; ".join(problems))
    return rows


def finish_results(rows: list[_Row], *, vocab: LmVocabulary, bos_id: Optional[int], params: "SteeredParams",
                   teachers: dict, maps: dict, lm_name: str, engine: str) -> list[GenerationResult]:
    """Texts, and the teacher's final confidence in each row's target."""
    p = params
    texts = []
    for r in rows:
        body = r.prompt_ids[1:] if (bos_id is not None and r.prompt_ids[:1] == [bos_id]) else r.prompt_ids
        texts.append(vocab.text((list(body) if p.keep_prompt else []) + r.generated))
    conf = [0.0] * len(rows)
    pred = [0] * len(rows)
    by_teacher: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_teacher.setdefault(r.request.teacher, []).append(i)
    for name, idx in by_teacher.items():
        probs, predicted = teachers[name].predict([texts[i] for i in idx])
        for j, i in enumerate(idx):
            conf[i] = float(probs[j, int(rows[i].request.target)])
            pred[i] = int(predicted[j])
    out = []
    for i, r in enumerate(rows):
        tmap = maps.get(r.request.teacher)
        record = {
            "engine": engine, "lm": lm_name, "control_strength": r.strength,
            "lambda_schedule": p.lambda_schedule, "decay_rate": p.decay_rate, "lambda_floor": p.lambda_floor,
            "top_m": p.top_m, "top_k": p.top_k, "top_p": p.top_p, "temperature": p.temperature,
            "max_new_tokens": p.max_new_tokens, "min_new_tokens": p.min_new_tokens, "prompt": r.prompt,
            "keep_prompt": p.keep_prompt, "lm_tokens": len(r.generated), "stop": r.stop,
            "token_map": ("fast" if tmap.fast else "exact") if tmap is not None else "none",
        }
        out.append(GenerationResult(text=texts[i], token_ids=list(r.generated), num_tokens=len(r.generated),
                                    stop_reason=r.stop, teacher_confidence=conf[i], teacher_prediction=pred[i],
                                    params=record))
    return out


class SteeredGenerator:
    """Teacher-reweighted top-m decoding (StrataNet Eq. 1) with a Hugging Face causal LM.

    Args:
        lm: a causal LM (``AutoModelForCausalLM``); moved to ``device`` in ``params.dtype``.
        lm_tokenizer: its tokenizer.
        teachers: name -> :class:`~dfkd_ray.models.teacher.Teacher` (``tokenizer``, ``labels``,
            ``max_length``, ``forward_ids``).
        params: :class:`SteeredParams`.
        device: defaults to the first teacher's device.
        lm_name: recorded in each result's ``params``.
    """

    def __init__(self, lm, lm_tokenizer, teachers: dict, params: SteeredParams = SteeredParams(), *,
                 device: torch.device | str | None = None, lm_name: str = ""):
        params.validate()
        if not teachers:
            raise ValueError("no teachers: the steered generator needs at least one teacher")
        self.params = params
        self.teachers = dict(teachers)
        self.device = torch.device(device) if device is not None else next(iter(self.teachers.values())).device
        self.lm = lm.to(device=self.device, dtype=resolve_lm_dtype(params.dtype, self.device)).eval().requires_grad_(False)
        # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` is deprecated,
        # to be removed in 5.40); older versions know only ``past_key_values``
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.lm_tokenizer = lm_tokenizer
        self.lm_name = lm_name or str(getattr(lm.config, "_name_or_path", ""))
        cfg = lm.config
        self.vocab_size = int(getattr(cfg, "vocab_size", len(lm_tokenizer)))
        self.vocab = LmVocabulary(lm_tokenizer, self.vocab_size)
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 1 << 30)
        roles = LmTokenRoles.of(cfg, getattr(lm, "generation_config", None), lm_tokenizer, self.vocab_size)
        self.eos_ids, self.bos_id, self.pad_id = roles.eos_ids, roles.bos_id, roles.pad_id
        self.banned = roles.banned  # never sampled: special tokens other than EOS, ids the tokenizer cannot decode
        self.scorer = TeacherScorer(self.teachers, self.vocab, params, self.device)
        self.stats: dict[str, float] = self.scorer.stats

    @classmethod
    def from_pretrained(cls, lm_path: str | Path, teachers: dict, params: SteeredParams = SteeredParams(), *,
                        device: torch.device | str | None = None) -> "SteeredGenerator":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm_path = Path(lm_path)
        dev = torch.device(device) if device is not None else next(iter(teachers.values())).device
        lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=resolve_lm_dtype(params.dtype, dev))
        tok = AutoTokenizer.from_pretrained(lm_path)
        return cls(lm, tok, teachers, params, device=dev, lm_name=lm_path.name)

    def token_map(self, teacher: str) -> TeacherTokenMap:
        """The (LM, teacher) token map, built on first use."""
        return self.scorer.token_map(teacher)

    # ------------------------------------------------------------------ requests

    def _prepare(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        return prepare_rows(requests, self.teachers, self.params, self.lm_tokenizer, self.bos_id, self.context)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Texts for the requests, in order; ``params.batch_size`` rows decode together."""
        rows = self._prepare(requests)
        for name in sorted({r.request.teacher for r in rows if r.strength > 0}):
            self.token_map(name)
        self.stats = self.scorer.stats = {k: 0.0 for k in _STAT_KEYS}
        self.scorer.events = []
        results: list[GenerationResult] = []
        bs = self.params.batch_size
        with torch.inference_mode():
            for s in range(0, len(rows), bs):
                results.extend(self._generate_batch(rows[s:s + bs]))
        self.scorer.settle_timing()
        return results

    # ------------------------------------------------------------------ decoding

    def _lm_forward(self, input_ids, attention_mask, position_ids, cache):
        self.stats["lm_forwards"] += 1
        with attention_kernels(self.params.sdpa, self.device):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        logits = out.logits[:, -1, :]  # (B, V)
        return logits.clone() if logits.dtype == torch.float64 else logits.float()

    def _generate_batch(self, rows: list[_Row]) -> list[GenerationResult]:
        """Decode one batch: its rows split into ``decode_parts`` parts that :func:`interleave` runs."""
        cuts = np.linspace(0, len(rows), min(self.params.decode_parts, len(rows)) + 1).round().astype(int)
        interleave([self._decode(rows[a:b]) for a, b in zip(cuts[:-1], cuts[1:])], self.device)
        return self._finish(rows)

    def _decode(self, rows: list[_Row]):
        """Decode ``rows`` to the end (filling each row's ``generated`` and ``stop``); a generator that
        yields a :func:`gpu_mark` before each wait for the GPU (see :func:`interleave`)."""
        from transformers import DynamicCache

        p, dev = self.params, self.device
        B = len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[b, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T) positions count real tokens only
        u = row_uniforms([r.request.seed for r in rows], p.max_new_tokens, dev)  # (B, T_new)
        strength = torch.tensor([r.strength for r in rows], dtype=torch.float32, device=dev)  # (B,)
        active = np.arange(B)  # batch row -> index into rows
        # Guided rows of each teacher, with their incremental teacher-side text.
        groups: dict[str, tuple[np.ndarray, TeacherRows]] = {}
        for name in sorted({r.request.teacher for r in rows if r.strength > 0}):
            members = np.array([b for b, r in enumerate(rows) if r.request.teacher == name and r.strength > 0])
            tmap = self.token_map(name)
            initial = [self._initial(rows[b], tmap) for b in members]
            groups[name] = (members, tmap.rows(initial))
        targets = torch.tensor([int(r.request.target) for r in rows], dtype=torch.long, device=dev)

        cache = DynamicCache()
        logits = self._lm_forward(ids, mask, pos, cache)
        pos = pos[:, -1]  # (B,)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        banned = torch.tensor(self.banned, dtype=torch.long, device=dev)
        for t in range(p.max_new_tokens):
            yield gpu_mark(dev)  # next: the candidates come back to the host
            self.stats["steps"] += 1
            if len(banned):
                logits.index_fill_(1, banned, float("-inf"))
            if t < p.min_new_tokens and len(eos):
                logits.index_fill_(1, eos, float("-inf"))
            broken = ~torch.isfinite(logits.max(-1).values)  # (B,) NaN or nothing allowed; read with the tokens
            lam = control_weights(torch.full((len(active),), t, device=dev), strength, p.lambda_schedule,
                                  decay_rate=p.decay_rate, floor=p.lambda_floor)  # (B,) lambda_t
            if groups:
                scores, cand = steer_candidates(logits, lam, targets, groups, self.scorer, p.top_m)  # (B, m) Eq. 1
                chosen = sample_candidates(scores, cand, u[:, t], top_k=p.top_k, top_p=p.top_p,
                                           temperature=p.temperature)
            else:  # lambda = 0 everywhere: plain top-k sampling (identical result, no top-m work)
                chosen = sample_top_k(logits, u[:, t], top_k=p.top_k, top_p=p.top_p, temperature=p.temperature)
            yield gpu_mark(dev)  # next: the draws come back to the host
            chosen_list = torch.where(broken, -1, chosen).tolist()
            if -1 in chosen_list:
                raise FloatingPointError("the LM produced non-finite logits for every token of a row (NaN or all -inf)")
            done = []
            for b, c in enumerate(chosen_list):
                row = rows[active[b]]
                if c in self.eos_ids:
                    row.stop = "eos"
                    done.append(b)
                    continue
                row.generated.append(c)
                if t + 1 == p.max_new_tokens:
                    row.stop = "length"
                    done.append(b)
            if len(done) == len(active):
                break
            if done:  # finished rows leave the batch
                keep = np.setdiff1d(np.arange(len(active)), np.array(done))
                keep_d = to_device(keep, dev)
                cache.batch_select_indices(keep_d)
                mask, pos, u, strength, targets, chosen = (x[keep_d] for x in (mask, pos, u, strength, targets, chosen))
                chosen_list = [chosen_list[i] for i in keep]
                new_index = np.full(len(active), -1)
                new_index[keep] = np.arange(len(keep))
                for name, (members, state) in list(groups.items()):
                    local = np.nonzero(np.isin(members, keep))[0]
                    state.keep(local)
                    groups[name] = (new_index[members[local]], state)
                    if len(local) == 0:
                        del groups[name]
                active = active[keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            pos = pos + 1
            logits = self._lm_forward(chosen.view(-1, 1), mask, pos.view(-1, 1), cache)  # queued on the GPU ...
            t0 = time.perf_counter()
            for name, (members, state) in groups.items():  # ... while the teacher-side text advances here
                state.advance([chosen_list[b] for b in members])
            self.stats["tokenizer_seconds"] += time.perf_counter() - t0

    def _initial(self, row: _Row, tmap: TeacherTokenMap):
        """The text a row's teacher sees before the first generated token."""
        return teacher_initial(self.vocab, row.prompt_ids, self.bos_id, self.params.keep_prompt)

    def _finish(self, rows: list[_Row]) -> list[GenerationResult]:
        return finish_results(rows, vocab=self.vocab, bos_id=self.bos_id, params=self.params, teachers=self.teachers,
                              maps=self.scorer.maps, lm_name=self.lm_name, engine="hf")
