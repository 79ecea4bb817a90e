"""The steered generator (StrataNet Eq. 1) on vLLM: a thin adapter around the Hugging Face engine's math.

vLLM V1 has no per-request logits processors; its extension point is one batch-level
``LogitsProcessor`` registered at engine start (``LLM(..., logits_processors=["module:Class"])``)
and built inside the engine process. This module holds three layers:

- :class:`SteeringCore` (no vLLM import): the processor's logic. It keeps each steered row's state
  exact under vLLM's batch updates (:mod:`dfkd_ray.generation.vllm_rows`), keeps each row's text
  teacher-side (:class:`~dfkd_ray.generation.token_map.TeacherRows`, one pool per teacher), and in
  ``apply`` runs the SAME step as the Hugging Face engine --
  :func:`~dfkd_ray.generation.hf.steer_candidates` with a :class:`~dfkd_ray.generation.hf.TeacherScorer`
  -- then writes the reweighted top-``m`` back as logits, ``-inf`` elsewhere. Temperature, top-k and
  top-p are left to vLLM's sampler, which applies them after the processors (vLLM 0.26.0,
  ``vllm/v1/sample/sampler.py``: ``apply_logits_processors`` then ``sample``).
- ``SteeredLogitsProcessor``: the subclass of vLLM's real
  ``vllm.v1.sample.logits_processor.LogitsProcessor``, made by :func:`logits_processor_class` the
  first time it is asked for (``vllm`` is imported then, never at import of this module). vLLM
  loads it by the class path :data:`PROCESSOR`, which resolves through the module ``__getattr__``.
- :class:`VllmSteeredGenerator`: the same ``generate(requests) -> list[GenerationResult]`` as
  :class:`~dfkd_ray.generation.hf.SteeredGenerator`. It builds ``vllm.LLM`` in its constructor,
  before any teacher of its own touches the GPU; the engine loads its teachers lazily, on the
  engine's device, at the first step that needs each.

Per request: ``SamplingParams.extra_args[STEER_KEY]`` = teacher, target class, lambda, m (plain
Python types). Per engine (teacher directories, the lambda schedule, ``keep_prompt``, chunking):
``LLM(additional_config={SETTINGS_KEY: ...})``, which reaches the processor as
``vllm_config.additional_config``.

What vLLM does differently from the Hugging Face engine: its own per-request random streams
(``SamplingParams.seed``), so a request's text is not the same text as the HF engine's for the same
seed -- the distribution it is drawn from is the same (tested on CPU: identical logits in give
identical reweighted logits out, ``tests/generation/test_vllm.py``).

Checked against vLLM 0.26.0 (the PyPI wheel's source): ``LogitsProcessor`` has ``validate_params``
(classmethod), ``__init__(vllm_config, device, is_pin_memory)``, ``is_argmax_invariant``,
``update_state(batch_update)``, ``apply(logits)``; custom processors make the engine fall back from
Model Runner V2 (``vllm/config/vllm.py``), and are refused with speculative decoding
(``build_logitsprocs``). See ``../shared/notes/vllm.md``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from dfkd_ray.generation.hf import (GenerationRequest, GenerationResult, LmTokenRoles, SteeredParams, TeacherScorer,
                                    _Row, candidate_logits, finish_results, prepare_rows, steer_candidates,
                                    teacher_initial)
from dfkd_ray.generation.token_map import LmVocabulary, TeacherRows, TeacherTokenMap, to_device
from dfkd_ray.generation.vllm_rows import STEER_KEY, RowBook, RowState, SteerArgs, parse_steer_args
from dfkd_ray.math.decoding import control_weights

SETTINGS_KEY = "dfkd_steered"
"""Key of ``LLM(additional_config=...)`` holding the engine-wide settings (:func:`engine_settings`)."""

PROCESSOR = f"{__name__}:SteeredLogitsProcessor"
"""The class path given to ``vllm.LLM(logits_processors=[...])``."""

INSTALL_HINT = "pip install 'dfkd-ray[vllm]' on a GPU node (vLLM's wheels are CUDA builds)"


def engine_settings(teachers: dict[str, dict], params: SteeredParams) -> dict:
    """The engine-wide settings, JSON-able (vLLM hashes ``additional_config`` as JSON).

    Args:
        teachers: name -> ``{"path", "max_length", "dtype", "trust_remote_code"}`` (a teacher directory
            as :class:`~dfkd_ray.config.TeacherConfig` has it).
    """
    specs = {}
    for name, t in teachers.items():
        specs[str(name)] = {"path": str(t["path"]), "max_length": int(t.get("max_length", 128)),
                            "dtype": str(t.get("dtype", "auto")), "trust_remote_code": bool(t.get("trust_remote_code", False))}
    return {"teachers": specs, "params": dataclasses.asdict(params)}


class _TextPool:
    """Teacher-side texts of one teacher's rows. A row gets a slot when it first needs scoring and
    frees it when it leaves the batch; the pool is compacted once most slots are free."""

    def __init__(self, tmap: TeacherTokenMap):
        self.tmap = tmap
        self.rows: Optional[TeacherRows] = None
        self.owner: list[Optional[RowState]] = []
        self.free_count = 0

    def add(self, states: list[RowState], initial: list) -> None:
        new = self.tmap.rows(initial)
        self.rows = new if self.rows is None else TeacherRows.stack([self.rows, new])
        for s in states:
            s.slot, s.seen = len(self.owner), 0
            self.owner.append(s)

    def free(self, state: RowState) -> None:
        self.owner[state.slot] = None
        state.slot = -1
        self.free_count += 1
        live = len(self.owner) - self.free_count
        if live == 0 or (self.free_count >= 64 and self.free_count > live):
            keep = [i for i, s in enumerate(self.owner) if s is not None]
            if keep:
                self.rows.keep(np.array(keep, dtype=np.int64))
            else:
                self.rows = None
            self.owner = [self.owner[i] for i in keep]
            for j, s in enumerate(self.owner):
                s.slot = j
            self.free_count = 0


class SteeringCore:
    """The logits processor's logic, without vLLM: row bookkeeping, teacher-side texts, Eq. 1.

    Args:
        vocab: the LM's :class:`LmVocabulary`.
        roles: the LM's EOS / BOS / banned ids (:class:`~dfkd_ray.generation.hf.LmTokenRoles`).
        params: engine-wide :class:`SteeredParams` (schedule, ``min_new_tokens``, ``keep_prompt``,
            chunking, token map); per-request lambda and m come with each row.
        device: the engine's device.
        load_teacher: name -> :class:`~dfkd_ray.models.teacher.Teacher`, called once per teacher, at
            the first step that needs it.
    """

    def __init__(self, vocab: LmVocabulary, roles: LmTokenRoles, params: SteeredParams, device: torch.device | str,
                 load_teacher: Callable[[str], Any]):
        self.vocab = vocab
        self.roles = roles
        self.params = params
        self.device = torch.device(device)
        self.load_teacher = load_teacher
        self.book = RowBook()
        self.scorer = TeacherScorer({}, vocab, params, self.device)
        self.pools: dict[str, _TextPool] = {}
        self._banned = torch.tensor(roles.banned, dtype=torch.long, device=self.device)
        self._eos = torch.tensor(roles.eos_ids, dtype=torch.long, device=self.device)

    @classmethod
    def from_settings(cls, settings: dict, lm_path: str, tokenizer_path: Optional[str], device: torch.device | str,
                      trust_remote_code: bool = False) -> "SteeringCore":
        """Inside the engine process: the LM's tokenizer and config from its directory; teachers from
        the settings' directories, loaded when first needed."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from dfkd_ray.models.teacher import Teacher

        params = SteeredParams(**settings["params"])
        tok = AutoTokenizer.from_pretrained(tokenizer_path or lm_path, trust_remote_code=trust_remote_code)
        cfg = AutoConfig.from_pretrained(lm_path, trust_remote_code=trust_remote_code)
        try:
            gen_cfg = GenerationConfig.from_pretrained(lm_path)
        except OSError:  # no generation_config.json
            gen_cfg = None
        vocab_size = int(getattr(cfg, "vocab_size", len(tok)))
        vocab = LmVocabulary(tok, vocab_size)
        specs = settings["teachers"]
        dev = torch.device(device)

        def load(name: str):
            if name not in specs:
                raise KeyError(f"steered request names teacher {name!r}, but the engine knows only {sorted(specs)}")
            s = specs[name]
            with torch.inference_mode(False):  # apply() may run under inference mode; weights are ordinary tensors
                return Teacher.from_pretrained(name, s["path"], num_blocks=1, max_length=s["max_length"], device=dev,
                                               dtype=s["dtype"], trust_remote_code=s["trust_remote_code"])

        return cls(vocab, LmTokenRoles.of(cfg, gen_cfg, tok, vocab_size), params, dev, load)

    # ------------------------------------------------------------------ vLLM's two calls

    def update_state(self, batch_update: Any) -> None:
        """Apply a ``BatchUpdate`` (or None). Output ids are not read here (see ``vllm_rows``)."""
        for state in self.book.update(batch_update):
            if state.slot >= 0:
                self.pools[state.teacher].free(state)

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Reweight the steered rows of ``(num_reqs, V)`` logits in place; other rows are untouched.

        Every steered row: banned ids and (before ``min_new_tokens``) EOS get ``-inf``. Rows with
        lambda > 0: Eq. 1 over the LM's top-``m`` (rows grouped by ``m``; within a group, teacher
        forwards are batched per teacher), ``-inf`` outside the top-``m``.
        """
        if not len(self.book):
            return logits
        p = self.params
        items = list(self.book.items())  # (slot, state), slots ascending
        steps = [self._sync_len(s) for _, s in items]  # t: tokens generated so far
        guided = [(i, s, t) for (i, s), t in zip(items, steps) if s.args.control_strength > 0]
        self._sync_texts([s for _, s, _ in guided])

        slots = to_device(np.array([i for i, _ in items], dtype=np.int64), self.device)
        sub = logits[slots].float()  # (n, V)
        if len(self._banned):
            sub.index_fill_(1, self._banned, float("-inf"))
        early = [j for j, t in enumerate(steps) if t < p.min_new_tokens]
        if early and len(self._eos):
            rows = to_device(np.array(early, dtype=np.int64), self.device)
            sub[rows.view(-1, 1), self._eos.view(1, -1)] = float("-inf")
        pos = {i: j for j, (i, _) in enumerate(items)}  # slot -> row of sub

        for m in sorted({s.args.top_m for _, s, _ in guided}):
            group = [(i, s, t) for i, s, t in guided if s.args.top_m == m]
            rows = to_device(np.array([pos[i] for i, _, _ in group], dtype=np.int64), self.device)
            x = sub[rows]  # (b, V)
            t = torch.tensor([t for _, _, t in group], device=self.device)
            strength = torch.tensor([s.args.control_strength for _, s, _ in group], dtype=torch.float32, device=self.device)
            lam = control_weights(t, strength, p.lambda_schedule, decay_rate=p.decay_rate, floor=p.lambda_floor)  # (b,)
            targets = torch.tensor([s.args.target for _, s, _ in group], dtype=torch.long, device=self.device)
            groups = {}
            for name in sorted({s.teacher for _, s, _ in group}):
                members = np.array([j for j, (_, s, _) in enumerate(group) if s.teacher == name], dtype=np.int64)
                pool = self.pools[name]
                groups[name] = (members, pool.rows.subset(np.array([group[j][1].slot for j in members], dtype=np.int64)))
            scores, cand = steer_candidates(x, lam, targets, groups, self.scorer, m)  # (b, m) Eq. 1
            sub[rows] = candidate_logits(scores, cand, x.shape[-1])
        logits[slots] = sub.to(logits.dtype)
        if len(self.scorer.events) > 256:  # CUDA timing events: fold them into stats now and then
            self.scorer.settle_timing()
        return logits

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _sync_len(state: RowState) -> int:
        """Tokens generated so far (a trailing async-scheduling placeholder ``-1`` not counted)."""
        out = state.output_ids
        n = len(out)
        while n and out[n - 1] == -1:
            n -= 1
        return n

    def _teacher_pool(self, name: str) -> _TextPool:
        if name not in self.pools:
            if name not in self.scorer.teachers:
                self.scorer.teachers[name] = self.load_teacher(name)
            self.pools[name] = _TextPool(self.scorer.token_map(name))
        return self.pools[name]

    def _sync_texts(self, states: Sequence[RowState]) -> None:
        """Give new rows a teacher-side text (the prompt's, or none) and append every row's new tokens."""
        by_teacher: dict[str, list[RowState]] = {}
        for s in states:
            by_teacher.setdefault(s.teacher, []).append(s)
        p, bos = self.params, self.roles.bos_id
        for name, group in by_teacher.items():
            pool = self._teacher_pool(name)
            new = [s for s in group if s.slot < 0]
            if new:
                pool.add(new, [teacher_initial(self.vocab, s.prompt_ids, bos, p.keep_prompt) for s in new])
            slots, ids = [], []
            for s in group:
                n = self._sync_len(s)
                if n > s.seen:
                    slots.append(s.slot)
                    ids.append(s.output_ids[s.seen:n])
                    s.seen = n
            if slots:
                pool.rows.extend(slots, ids)


# ---------------------------------------------------------------------- the vLLM class, made on demand

_PROCESSOR_CLASS = None


def logits_processor_class():
    """``SteeredLogitsProcessor``, a subclass of ``vllm.v1.sample.logits_processor.LogitsProcessor``.

    Imports vLLM (first call only). vLLM builds one instance per engine worker with
    ``(vllm_config, device, is_pin_memory)``; nothing touches CUDA before the first ``apply`` that
    sees a steered row (the module is imported under vLLM's ``guard_cuda_initialization``).
    """
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is not None:
        return _PROCESSOR_CLASS
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class SteeredLogitsProcessor(LogitsProcessor):
        """Teacher-reweighted top-m decoding (StrataNet Eq. 1) for requests that carry
        ``extra_args["dfkd_steer"]``; other requests pass through untouched."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            """vLLM calls this for every request before it reaches the engine; ValueError if bad."""
            parse_steer_args(getattr(sampling_params, "extra_args", None))

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            settings = (getattr(vllm_config, "additional_config", None) or {}).get(SETTINGS_KEY)
            self.core: Optional[SteeringCore] = None
            if settings is not None:
                mc = vllm_config.model_config
                self.core = SteeringCore.from_settings(settings, mc.model, getattr(mc, "tokenizer", None), device,
                                                       trust_remote_code=bool(getattr(mc, "trust_remote_code", False)))

        def is_argmax_invariant(self) -> bool:
            return False  # the teacher term changes which token wins

        def update_state(self, batch_update) -> None:
            if self.core is None:
                if batch_update is not None and any(parse_steer_args(getattr(a[1], "extra_args", None))
                                                    for a in batch_update.added):
                    raise RuntimeError(f"a request carries extra_args[{STEER_KEY!r}] but the engine was built "
                                       f"without additional_config[{SETTINGS_KEY!r}]; build it with "
                                       "VllmSteeredGenerator")
                return
            self.core.update_state(batch_update)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return logits if self.core is None else self.core.apply(logits)

    SteeredLogitsProcessor.__module__ = __name__
    SteeredLogitsProcessor.__qualname__ = "SteeredLogitsProcessor"
    _PROCESSOR_CLASS = SteeredLogitsProcessor
    return SteeredLogitsProcessor


def __getattr__(name: str):
    # vLLM resolves PROCESSOR with getattr(module, "SteeredLogitsProcessor"): the class is made then.
    if name == "SteeredLogitsProcessor":
        return logits_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- the generator


class VllmSteeredGenerator:
    """Teacher-reweighted top-m decoding with vLLM; the interface of the Hugging Face ``SteeredGenerator``.

    Args:
        lm_path: local causal-LM directory (decoder-only; vLLM no longer runs encoder-decoders).
        teachers: name -> ``{"path", "max_length", "dtype", "trust_remote_code"}``: what the engine loads.
        params: :class:`SteeredParams`; ``batch_size`` becomes vLLM's ``max_num_seqs``, ``dtype``
            the LM's (``auto``: bfloat16; float64 is not a vLLM dtype).
        loaded_teachers: name -> :class:`~dfkd_ray.models.teacher.Teacher` for labels and the final
            confidence on this side; default: loaded here on ``device``, after the engine is built.
        device: for teachers loaded here.
        engine_kwargs: more ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``tensor_parallel_size``,
            ``enforce_eager``, ...). The default ``gpu_memory_utilization`` is 0.6: the engine's
            teachers (weights and activations) are loaded after vLLM has sized its KV cache.
    """

    def __init__(self, lm_path: str | Path, teachers: dict[str, dict], params: SteeredParams = SteeredParams(), *,
                 loaded_teachers: Optional[dict] = None, device: str = "cuda", engine_kwargs: Optional[dict] = None):
        params.validate()
        if params.dtype == "float64":
            raise ValueError("dtype float64 is not supported by the vLLM engine; use auto, bfloat16, float16 or float32")
        if not teachers:
            raise ValueError("no teachers: the steered generator needs at least one teacher")
        self.params = params
        self.lm_path = Path(lm_path)
        # Model Runner V2 (default for dense models in 0.26) has no custom logits processors; say so
        # up front instead of relying on the fallback. The FlashInfer sampler JIT-compiles kernels.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"transfer.steered.engine=vllm needs vLLM: {INSTALL_HINT}") from e

        kwargs = dict(model=str(self.lm_path), logits_processors=[PROCESSOR],
                      additional_config={SETTINGS_KEY: engine_settings(teachers, params)},
                      dtype="bfloat16" if params.dtype == "auto" else params.dtype, seed=0,
                      max_num_seqs=params.batch_size, gpu_memory_utilization=0.6)
        kwargs.update(engine_kwargs or {})
        self.llm = vllm.LLM(**kwargs)  # before any teacher of ours touches the GPU

        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.lm_tokenizer = AutoTokenizer.from_pretrained(self.lm_path)
        cfg = AutoConfig.from_pretrained(self.lm_path)
        try:
            gen_cfg = GenerationConfig.from_pretrained(self.lm_path)
        except OSError:
            gen_cfg = None
        self.vocab_size = int(getattr(cfg, "vocab_size", len(self.lm_tokenizer)))
        self.vocab = LmVocabulary(self.lm_tokenizer, self.vocab_size)
        roles = LmTokenRoles.of(cfg, gen_cfg, self.lm_tokenizer, self.vocab_size)
        self.eos_ids, self.bos_id = roles.eos_ids, roles.bos_id
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 1 << 30)
        self.lm_name = self.lm_path.name
        if loaded_teachers is None:
            from dfkd_ray.models.teacher import Teacher

            loaded_teachers = {n: Teacher.from_pretrained(n, t["path"], num_blocks=1, max_length=int(t.get("max_length", 128)),
                                                          device=device, dtype=t.get("dtype", "auto"),
                                                          trust_remote_code=bool(t.get("trust_remote_code", False)))
                               for n, t in teachers.items()}
        self.teachers = dict(loaded_teachers)
        self._maps: dict[str, TeacherTokenMap] = {}  # for the results' "token_map" field only (CPU)

    def sampling_params(self, row: _Row):
        """The row's ``vllm.SamplingParams``: the steering in ``extra_args``, the draw left to vLLM."""
        from vllm import SamplingParams

        p = self.params
        steer = SteerArgs(row.request.teacher, int(row.request.target), float(row.strength), int(p.top_m))
        return SamplingParams(n=1, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                              seed=int(row.request.seed) % (1 << 63), max_tokens=p.max_new_tokens,
                              min_tokens=p.min_new_tokens, stop_token_ids=list(self.eos_ids), detokenize=False,
                              extra_args=steer.to_extra_args())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Texts for the requests, in order; vLLM schedules them (``max_num_seqs`` at a time)."""
        rows = prepare_rows(requests, self.teachers, self.params, self.lm_tokenizer, self.bos_id, self.context)
        outputs = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in rows],
                                    [self.sampling_params(r) for r in rows], use_tqdm=False)
        for r, o in zip(rows, outputs):
            c = o.outputs[0]
            ids = [int(x) for x in c.token_ids]
            if c.finish_reason == "stop" and ids and ids[-1] in self.eos_ids:
                ids.pop()
                r.stop = "eos"
            else:
                r.stop = "length" if c.finish_reason == "length" else str(c.finish_reason)
            r.generated = ids
        for name in sorted({r.request.teacher for r in rows if r.strength > 0}):
            if name not in self._maps:
                t = self.teachers[name]
                self._maps[name] = TeacherTokenMap(self.vocab, t.tokenizer, t.max_length, "cpu", mode=self.params.token_map)
        return finish_results(rows, vocab=self.vocab, bos_id=self.bos_id, params=self.params, teachers=self.teachers,
                              maps=self._maps, lm_name=self.lm_name, engine="vllm")

