"""Steered generation (StrataNet section 4.2): what both engines share, and the one step of Eq. 1.

A general-domain causal LM writes text of a chosen class ``c`` because a teacher reweights the LM's
``m`` most likely next tokens (Eq. 1; the pure functions are in :mod:`dfkd_ray.math.decoding`):

    s_t(x) = log p_LM(x | x_<t) + lambda_t * log P_teacher(c | x_<t, x)

The Hugging Face engine (:mod:`dfkd_ray.generation.hf`) samples from these scores; the vLLM adapter
(:mod:`dfkd_ray.generation.vllm`) writes them back as logits for vLLM's sampler. Both take their
settings as one :class:`~dfkd_ray.config.SteeredConfig` and share, from this module:

- :class:`GenerationRequest` and :class:`GenerationResult`; :class:`SteeredRow`, a request while
  it decodes; :func:`prepare_rows` checks every request before generation, :func:`finish_results`
  turns rows into texts and records the teacher's final confidence;
- :class:`LmInfo`: the LM's vocabulary, which ids end, start, pad a text or are never sampled, its
  context length and name, read once from a model directory or a loaded model;
- :class:`TeacherScorer`: the teacher term ``log P_teacher(c | x_<t, x)`` of every row's candidates,
  one batched teacher forward per chunk of length-sorted candidate texts, its work counted in one
  :class:`SteeringStats`;
- :func:`steer_step`: one step up to the draw -- the :class:`TokenMasks` (special tokens, EOS before
  ``min_new_tokens``, the prompt's last word continued with ``start_new_word``), ``lambda_t`` (:func:`~dfkd_ray.math.decoding.control_weights`), the LM's
  top-``m``, the teacher term and :func:`~dfkd_ray.math.decoding.reweight`.

Choices the paper leaves open (fields of ``SteeredConfig``): the teacher scores, and the transfer set
keeps, the continuation only (``keep_prompt=False``; a prompt such as ``Category: {label}`` would
otherwise hand the student its label); the text is exactly what the teacher scored (no stripping);
special tokens other than EOS are never sampled; a row whose text already fills the teacher's
``max_length`` continues without guidance (every candidate would give the teacher the same
truncated input).

The teacher's confidence in the target is recorded for every sample. It is what the teacher
believes, not evidence that the text is of the class: the reweighting can find text that fools a
teacher. Never report it as quality.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from dfkd_ray.generation.streams import covered
from dfkd_ray.generation.token_map import LmVocabulary, TeacherInputs, TeacherRows, TeacherTokenMap, to_device
from dfkd_ray.math.decoding import control_weights, lm_nucleus, reweight, select_top_m
from dfkd_ray.models.inputs import enable_prepared_mask
from dfkd_ray.models.kernels import attention_kernels

if TYPE_CHECKING:
    from dfkd_ray.config import SteeredConfig

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lm_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The LM's dtype for ``SteeredConfig.dtype``: ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


# ---------------------------------------------------------------------- requests, rows, results


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
class SteeredRow:
    """A checked request while it decodes (:func:`prepare_rows`).

    Attributes:
        index: the request's position in its ``generate`` call.
        prompt: the filled prompt template; prompt_ids: its LM ids, BOS first when the LM has one.
        strength: the row's ``lambda``; generated: LM ids so far (EOS not included); stop: why it ended.
    """

    index: int
    request: GenerationRequest
    prompt: str
    prompt_ids: list[int]
    strength: float
    generated: list[int] = field(default_factory=list)
    stop: str = ""

    @property
    def guided(self) -> bool:
        """Whether the row's teacher reweights its tokens (``lambda > 0``)."""
        return self.strength > 0


@dataclass(frozen=True)
class LmInfo:
    """What the engines need to know about the base LM, read once.

    Attributes:
        name: recorded in each result's ``params``.
        tokenizer: the LM's tokenizer; vocab: its :class:`LmVocabulary` (token bytes and texts).
        eos_ids: ids that end a text; bos_id: the id a text starts with (None: no BOS token);
        pad_id: left padding of a batch; banned: never sampled (special tokens other than EOS,
            and ids the tokenizer cannot decode); context: the LM's longest sequence.
    """

    name: str
    tokenizer: Any
    vocab: LmVocabulary
    eos_ids: list[int]
    bos_id: Optional[int]
    pad_id: int
    banned: list[int]
    context: int

    @classmethod
    def of(cls, config, generation_config, tokenizer, name: str = "") -> "LmInfo":
        """From a causal LM's ``config``, its ``generation_config`` (or None) and its tokenizer."""
        vocab_size = int(getattr(config, "vocab_size", len(tokenizer)))
        eos = getattr(generation_config, "eos_token_id", None)
        eos = eos if eos is not None else (config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id)
        eos_ids = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
        bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
        special = {int(i) for i in tokenizer.all_special_ids}
        banned = sorted((special - set(eos_ids)) | set(range(len(tokenizer), vocab_size)))
        context = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 1 << 30)
        return cls(name=name, tokenizer=tokenizer, vocab=LmVocabulary(tokenizer, vocab_size), eos_ids=eos_ids,
                   bos_id=None if bos_id is None else int(bos_id), pad_id=int(pad_id), banned=banned, context=context)

    @classmethod
    def from_model(cls, lm, tokenizer, name: str = "") -> "LmInfo":
        """From a loaded causal LM and its tokenizer; ``name`` defaults to the model's own path."""
        return cls.of(lm.config, getattr(lm, "generation_config", None), tokenizer,
                      name or str(getattr(lm.config, "_name_or_path", "")))

    @classmethod
    def from_dir(cls, path: str | Path, *, tokenizer_path: str | Path | None = None,
                 trust_remote_code: bool = False) -> "LmInfo":
        """From a causal-LM directory (config, generation config when present, tokenizer), no weights."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json
            generation_config = None
        return cls.of(config, generation_config, tokenizer, Path(path).name)


def teacher_initial(lm: LmInfo, prompt_ids: Sequence[int], keep_prompt: bool):
    """The text a row's teacher sees before the first generated token: the prompt without BOS when
    ``keep_prompt``, else nothing (bytes for a byte-level LM, else LM ids)."""
    ids = list(prompt_ids)
    if lm.bos_id is not None and ids[:1] == [lm.bos_id]:
        ids = ids[1:]
    if not keep_prompt:
        ids = []
    return lm.vocab.bytes_of(ids) if lm.vocab.byte_level else ids


def prepare_rows(requests: Sequence[GenerationRequest], teachers: dict, config: "SteeredConfig",
                 lm: LmInfo) -> list[SteeredRow]:
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
        strength = config.control_strength if r.control_strength is None else float(r.control_strength)
        if not (math.isfinite(strength) and strength >= 0):
            problems.append(f"request {i}: control_strength (lambda) must be a finite number >= 0, got {strength}")
            continue
        template = config.prompt if r.prompt is None else r.prompt
        prompt = template.replace("{label}", labels[int(r.target)])
        ids = list(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
        if lm.bos_id is not None and (not ids or ids[0] != lm.bos_id):
            ids = [int(lm.bos_id)] + ids
        if not ids:
            problems.append(f"request {i}: the LM has no BOS token, so an empty prompt gives it nothing to "
                            "condition on; give a prompt")
            continue
        if len(ids) >= lm.context:
            problems.append(f"request {i}: prompt is {len(ids)} LM tokens, longer than the LM's context "
                            f"({lm.context}); shorten it")
            continue
        if len(ids) + config.max_new_tokens > lm.context:
            problems.append(f"request {i}: prompt ({len(ids)} tokens) + max_new_tokens ({config.max_new_tokens}) "
                            f"exceeds the LM's context ({lm.context}); lower max_new_tokens or shorten the prompt")
            continue
        rows.append(SteeredRow(i, r, prompt, ids, strength))
    if problems:
        raise ValueError(f"{len(problems)} bad generation request(s): " + "; ".join(problems))
    return rows


def finish_results(rows: Sequence[SteeredRow], *, lm: LmInfo, config: "SteeredConfig", teachers: dict, maps: dict,
                   engine: str) -> list[GenerationResult]:
    """Texts, and the teacher's final confidence in each row's target."""
    c = config
    texts = []
    for r in rows:
        body = r.prompt_ids[1:] if (lm.bos_id is not None and r.prompt_ids[:1] == [lm.bos_id]) else r.prompt_ids
        texts.append(lm.vocab.text((list(body) if c.keep_prompt else []) + r.generated))
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
            "engine": engine, "lm": lm.name, "control_strength": r.strength,
            "lambda_schedule": c.lambda_schedule, "decay_rate": c.decay_rate, "lambda_floor": c.lambda_floor,
            "top_m": c.top_m, "candidate_mass": c.candidate_mass, "top_k": c.top_k, "top_p": c.top_p,
            "temperature": c.temperature,
            "max_new_tokens": c.max_new_tokens, "min_new_tokens": c.min_new_tokens, "prompt": r.prompt,
            "keep_prompt": c.keep_prompt, "start_new_word": c.start_new_word, "lm_tokens": len(r.generated),
            "stop": r.stop,
            "token_map": ("fast" if tmap.fast else "exact") if tmap is not None else "none",
        }
        out.append(GenerationResult(text=texts[i], token_ids=list(r.generated), num_tokens=len(r.generated),
                                    stop_reason=r.stop, teacher_confidence=conf[i], teacher_prediction=pred[i],
                                    params=record))
    return out


# ---------------------------------------------------------------------- the teacher term


@dataclass
class SteeringStats:
    """Work counters of an engine (reset by each ``generate`` of the Hugging Face engine).

    ``steps`` and ``lm_forwards`` count per decoding part: with ``decode_parts`` P a batch's token
    position is P steps (one per part), so divide by P for positions. ``teacher_seconds`` sums every
    teacher forward's time, ``teacher_busy_seconds`` counts the time any forward was running (less
    when decoding parts ran forwards side by side on their own streams); on CUDA both are measured
    with events and added by :meth:`settle_timing`.
    """

    steps: float = 0.0
    lm_forwards: float = 0.0
    teacher_forwards: float = 0.0
    teacher_sequences: float = 0.0
    teacher_tokens: float = 0.0
    teacher_padded_tokens: float = 0.0
    teacher_tokens_sq: float = 0.0
    teacher_seconds: float = 0.0
    teacher_busy_seconds: float = 0.0
    tokenizer_seconds: float = 0.0
    pending: list = field(default_factory=list, repr=False)  # CUDA (start, end) events not yet settled

    def add_forward(self, lengths: np.ndarray, width: int) -> None:
        """One teacher forward of sequences of real ``lengths`` ``(n,)``, padded to ``width``."""
        self.teacher_forwards += 1
        self.teacher_sequences += len(lengths)
        self.teacher_tokens += float(lengths.sum())
        self.teacher_tokens_sq += float((lengths.astype(np.float64) ** 2).sum())
        self.teacher_padded_tokens += float(len(lengths) * width)

    @contextlib.contextmanager
    def timing(self, device: torch.device):
        """Time a teacher forward: CUDA events on CUDA (no synchronisation), the host clock elsewhere."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            dt = time.perf_counter() - t0
            self.teacher_seconds += dt
            self.teacher_busy_seconds += dt

    def settle_timing(self, device: torch.device) -> None:
        """Wait for the timed CUDA forwards and add their times (see the class docstring)."""
        if self.pending:
            torch.cuda.synchronize(device)
            ref = self.pending[0][0]
            spans = [(ref.elapsed_time(a), ref.elapsed_time(b)) for a, b in self.pending]  # ms after the first start
            self.teacher_seconds += sum(e - s for s, e in spans) / 1e3
            self.teacher_busy_seconds += covered(spans) / 1e3
            self.pending = []


def plan_chunks(lengths: np.ndarray, budget: int, *, uniform: bool = False, slack: float = 0.1,
                min_fraction: float = 0.125) -> list[tuple[int, int, bool]]:
    """Cut length-sorted sequences into teacher forwards ``(start, end, same_length)``.

    Padded chunks (the default): at most ``budget`` padded tokens (count x longest length), ending
    early, once a chunk holds ``min_fraction * budget`` padded tokens, before the sequence that
    would make its padding exceed ``slack`` of its real tokens.

    ``uniform``: every run of sequences that share one length and hold at least ``min_fraction *
    budget`` tokens is a forward of its own, unpadded and without an attention mask; the shorter
    runs between them are packed as above. More, smaller forwards: whether that beats the mask and
    padding it saves depends on the teacher and the device (``SteeredConfig.teacher_batching``).

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


class TeacherScorer:
    """The teacher term of Eq. 1: ``log P_teacher(c | x_<t, x)`` for every row's candidates.

    Both engines hold each row's teacher-side text as :class:`~dfkd_ray.generation.token_map.TeacherRows`
    grouped by teacher and call :meth:`logprobs` through :func:`steer_step`. The teacher's ids come
    from :mod:`dfkd_ray.generation.token_map` (incremental, exact); each step's ``B_k * m`` candidate
    texts of a teacher are scored in batched forwards (no grad, sequences sorted by length and cut
    into chunks of at most ``teacher_chunk_tokens`` padded tokens, :func:`plan_chunks`; the
    teacher's own dtype).

    Args:
        teachers: name -> :class:`~dfkd_ray.models.teacher.Teacher`; the vLLM adapter fills it lazily.
        lm: the base LM's :class:`LmInfo`.
        config: ``SteeredConfig`` (``teacher_chunk_tokens``, ``teacher_batching``, ``sdpa``, ``token_map``,
            and the ``lambda_t`` schedule :func:`steer_step` reads).
        device: where candidates and teacher inputs live.
    """

    def __init__(self, teachers: dict, lm: LmInfo, config: "SteeredConfig", device: torch.device | str):
        self.teachers = teachers
        self.lm = lm
        self.config = config
        self.device = torch.device(device)
        self.maps: dict[str, TeacherTokenMap] = {}
        self.stats = SteeringStats()

    def token_map(self, teacher: str) -> TeacherTokenMap:
        """The (LM, teacher) token map, built on first use."""
        if teacher not in self.maps:
            t = self.teachers[teacher]
            self.maps[teacher] = TeacherTokenMap(self.lm.vocab, t.tokenizer, t.max_length, self.device,
                                                 mode=self.config.token_map)
        return self.maps[teacher]

    def logprobs(self, groups: dict, cand: torch.Tensor, lam: torch.Tensor, targets: torch.Tensor,
                 scored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, m)`` ``log P_teacher(target | text + candidate)``; 0 for unguided or saturated rows.

        Args:
            groups: teacher name -> ``(members (n,) batch rows, TeacherRows of those rows in that order)``.
            cand: ``(B, m)`` candidate LM ids; lam: ``(B,)`` ``lambda_t``; targets: ``(B,)`` class ids.
            scored: ``(B, m)`` bool, the candidates to score (``candidate_mass``); None: all. The others
                get 0 and are never forwarded.
        """
        B, m = cand.shape
        out = torch.zeros(B, m, dtype=torch.float32, device=self.device)
        cand_np = cand.cpu().numpy()
        lam_np = lam.cpu().numpy()
        scored_np = None if scored is None else scored.cpu().numpy()
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
            self.stats.tokenizer_seconds += time.perf_counter() - t0
            rows_d = to_device(rows, self.device)
            tgt = targets[rows_d].repeat_interleave(m)  # (n*m,)
            if scored_np is None:
                lp = self.score(self.teachers[name], inputs, tgt)  # (n*m,)
            else:  # the LM's nucleus only: forward K <= n*m pairs, the rest stay 0
                keep = np.flatnonzero(scored_np[rows].reshape(-1))  # (K,) flat (row, candidate) positions
                keep_d = to_device(keep, self.device)
                lp = torch.zeros(len(rows) * m, dtype=torch.float32, device=self.device)
                lp[keep_d] = self.score(self.teachers[name], inputs.take(keep), tgt[keep_d])  # (K,)
            out[rows_d] = lp.view(len(rows), m)
        return out

    def score(self, teacher, inputs: TeacherInputs, targets: torch.Tensor) -> torch.Tensor:
        """Teacher log-probabilities of ``targets`` for assembled inputs, in length-sorted chunks."""
        lengths = inputs.lengths
        order = np.argsort(lengths, kind="stable")
        order_d = to_device(order, self.device)  # one copy; chunks slice it on the device
        out = torch.empty(len(lengths), dtype=torch.float32, device=self.device)
        cuda = self.device.type == "cuda"
        plan = plan_chunks(lengths[order], self.config.teacher_chunk_tokens,
                           uniform=self.config.teacher_batching == "uniform")
        with attention_kernels(self.config.sdpa, self.device):
            for s, e, same in plan:
                idx = order[s:e]
                width = int(lengths[idx[-1]])
                idx_d = order_d[s:e]
                x = inputs.input_ids[:, :width][idx_d]  # (n, width), contiguous
                a = None if same else inputs.attention_mask[:, :width][idx_d]  # no padding: no mask
                if a is not None and cuda:
                    # Once per teacher: a 4D mask where the teacher reads it as the (n, W) one. transformers
                    # asks of a (n, W) mask whether any token is padded, a read that waits for the GPU once
                    # per forward; with a 4D mask one part's forwards queue while another's run (streams.interleave).
                    enable_prepared_mask(teacher)
                with self.stats.timing(self.device):  # CUDA events: no synchronisation inside the loop
                    logits = teacher.forward_ids(x, a, with_blocks=False).logits  # (n, C) float32
                out[idx_d] = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[idx_d].view(-1, 1)).squeeze(1)
                self.stats.add_forward(lengths[idx], width)
        return out


def teacher_groups(rows: Sequence[SteeredRow], scorer: TeacherScorer) -> dict[str, tuple[np.ndarray, TeacherRows]]:
    """The guided rows of a batch by teacher: ``name -> (members (n,) batch positions, their
    teacher-side texts before the first generated token)``, the ``groups`` of :func:`steer_step`."""
    groups = {}
    for name in sorted({r.request.teacher for r in rows if r.guided}):
        members = np.array([b for b, r in enumerate(rows) if r.request.teacher == name and r.guided])
        initial = [teacher_initial(scorer.lm, rows[b].prompt_ids, scorer.config.keep_prompt) for b in members]
        groups[name] = (members, scorer.token_map(name).rows(initial))
    return groups


# ---------------------------------------------------------------------- the step


@dataclass(frozen=True)
class TokenMasks:
    """The LM ids a row may not draw, on the device: ``banned`` (:attr:`LmInfo.banned`) at every step,
    ``eos`` before the row has ``min_new_tokens`` tokens, and ``continuations`` (tokens that continue
    the prompt's last word, :meth:`~dfkd_ray.generation.token_map.LmVocabulary.word_continuations`) at
    the first step when ``transfer.steered.start_new_word`` is on."""

    banned: torch.Tensor  # (n_banned,) int64
    eos: torch.Tensor  # (n_eos,) int64
    min_new_tokens: int
    continuations: Optional[torch.Tensor] = None  # (n_continuations,) int64, banned at step 0

    @classmethod
    def of(cls, lm: LmInfo, min_new_tokens: int, device: torch.device | str, *,
           start_new_word: bool = False) -> "TokenMasks":
        continuations = (torch.tensor(lm.vocab.word_continuations(), dtype=torch.long, device=device)
                         if start_new_word else None)
        return cls(torch.tensor(lm.banned, dtype=torch.long, device=device),
                   torch.tensor(lm.eos_ids, dtype=torch.long, device=device), int(min_new_tokens), continuations)

    def apply(self, logits: torch.Tensor, steps: torch.Tensor) -> None:
        """``-inf`` in place on ``(B, V)`` logits: banned ids, EOS on rows whose ``steps (B,)``
        (tokens generated so far) is below ``min_new_tokens``, and word continuations on rows at
        step 0. No host-device synchronisation."""
        if len(self.banned):
            logits.index_fill_(1, self.banned, float("-inf"))
        if len(self.eos) and self.min_new_tokens > 0:
            early = (steps < self.min_new_tokens).view(-1, 1)  # (B, 1)
            logits.index_copy_(1, self.eos, torch.where(early, float("-inf"), logits.index_select(1, self.eos)))
        if self.continuations is not None and len(self.continuations):
            first = (steps == 0).view(-1, 1)  # (B, 1)
            logits.index_copy_(1, self.continuations,
                               torch.where(first, float("-inf"), logits.index_select(1, self.continuations)))


@dataclass
class RowControls:
    """What steers each row of a batch, on the device: ``strength`` ``(B,)`` float32, the row's
    ``lambda``; ``targets`` ``(B,)`` int64, its class ``c`` of its teacher."""

    strength: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def for_rows(cls, rows: Sequence[SteeredRow], device: torch.device | str) -> "RowControls":
        return cls(torch.tensor([r.strength for r in rows], dtype=torch.float32, device=device),
                   torch.tensor([int(r.request.target) for r in rows], dtype=torch.long, device=device))

    def select(self, index: torch.Tensor) -> "RowControls":
        """The controls of the rows at ``index`` (rows that stay in the batch)."""
        return RowControls(self.strength[index], self.targets[index])


def steer_step(logits: torch.Tensor, steps: torch.Tensor, controls: RowControls, groups: dict, *,
               masks: TokenMasks, scorer: TeacherScorer, top_m: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """One step of StrataNet Eq. 1 for a batch, up to the draw; both engines run it.

    First the :class:`TokenMasks`, in place on ``logits``. Then, when some row is guided
    (``groups`` not empty): ``lambda_t`` of every row (:func:`~dfkd_ray.math.decoding.control_weights`
    with the config's schedule), the LM's top-``m`` by log-probability
    (:func:`~dfkd_ray.math.decoding.select_top_m`), the teacher term (:meth:`TeacherScorer.logprobs`)
    and ``log p_LM + lambda_t * log P_teacher`` (:func:`~dfkd_ray.math.decoding.reweight`). The Hugging
    Face engine samples from the result with :func:`~dfkd_ray.math.decoding.sample_candidates`; the
    vLLM adapter scatters it into full-vocabulary logits (:func:`candidate_logits`) for vLLM's sampler.

    Args:
        logits: ``(B, V)`` LM logits; masked in place.
        steps: ``(B,)`` int64 tokens each row has generated (``t``).
        controls: each row's ``lambda`` and target class.
        groups: teacher name -> ``(members, TeacherRows)``: the guided rows and their text so far,
            teacher-side (see :meth:`TeacherScorer.logprobs`); rows of no group get no teacher term.
        top_m: candidates per row (``m >= V`` keeps the whole vocabulary).

    With ``transfer.steered.candidate_mass`` below 1, a guided row's teacher scores only the
    candidates within the LM's nucleus of that mass (:func:`~dfkd_ray.math.decoding.lm_nucleus`); the
    others get ``-inf``, so they are never drawn.

    Returns:
        None when no row is guided (the masked logits are the step: plain top-k sampling is Eq. 1
        with ``lambda = 0``); else ``scores (B, m)`` and ``cand (B, m)`` LM ids, ordered by (LM
        log-prob desc, id asc).
    """
    masks.apply(logits, steps)
    if not groups:
        return None
    c = scorer.config
    lam = control_weights(steps, controls.strength, c.lambda_schedule, decay_rate=c.decay_rate,
                          floor=c.lambda_floor)  # (B,) lambda_t
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    values, cand = select_top_m(logprobs, min(top_m, logprobs.shape[-1]))  # (B, m)
    # candidate_mass < 1: guided rows (lambda_t > 0) score and draw only the LM's nucleus of that mass
    scored = (lm_nucleus(values, c.candidate_mass) | (lam <= 0).view(-1, 1)  # (B, m)
              if c.candidate_mass < 1.0 else None)
    tlp = scorer.logprobs(groups, cand, lam, controls.targets, scored)  # (B, m) log P_teacher(c | x_<=t)
    scores = reweight(values, tlp, lam)  # (B, m) Eq. 1
    return (scores if scored is None else scores.masked_fill(~scored, float("-inf"))), cand


def candidate_logits(scores: torch.Tensor, cand: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(B, V)`` logits that are the candidates' scores and ``-inf`` elsewhere: sampling from them
    with temperature, top-k (``k <= m``) and top-p is sampling among the scored candidates."""
    out = torch.full((scores.shape[0], vocab_size), float("-inf"), dtype=scores.dtype, device=scores.device)
    return out.scatter_(1, cand, scores)
