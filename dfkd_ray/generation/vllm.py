"""The steered generator (StrataNet Eq. 1) on vLLM: a thin adapter around the shared steering step.

vLLM V1 has no per-request logits processors; its extension point is one batch-level
``LogitsProcessor`` registered at engine start (``LLM(..., logits_processors=["module:Class"])``)
and built inside the engine process. This module holds three layers:

- :class:`SteeringCore` (no vLLM import): the processor's logic. It keeps each steered row's state
  exact under vLLM's batch updates (:mod:`dfkd_ray.generation.vllm_rows`), keeps each row's text
  teacher-side (:class:`~dfkd_ray.generation.token_map.TeacherRows`, one pool per teacher), and in
  ``apply`` runs the same step as the Hugging Face engine,
  :func:`~dfkd_ray.generation.steering.steer_step`, then writes the reweighted top-``m`` back as
  logits, ``-inf`` elsewhere. Temperature, top-k and top-p are left to vLLM's sampler, which applies
  them after the processors (vLLM 0.26.0, ``vllm/v1/sample/sampler.py``: ``apply_logits_processors``
  then ``sample``).
- ``SteeredLogitsProcessor``: the subclass of vLLM's real
  ``vllm.v1.sample.logits_processor.LogitsProcessor``, made by :func:`logits_processor_class` the
  first time it is asked for (``vllm`` is imported then, never at import of this module). vLLM
  loads it by the class path :data:`PROCESSOR`, which resolves through the module ``__getattr__``.
- :class:`VllmSteeredGenerator`: the same ``generate(requests) -> list[GenerationResult]`` as
  :class:`~dfkd_ray.generation.hf.SteeredGenerator`. It builds ``vllm.LLM`` in its constructor,
  before any teacher of its own touches the GPU; the engine loads its teachers lazily, on the
  engine's device, at the first step that needs each.

Per request: ``SamplingParams.extra_args[STEER_KEY]`` = teacher, target class, lambda, m (plain
Python types; vLLM passes nothing else per request to a processor). Per engine: the
``transfer.steered`` section and the teachers' sections, as JSON
(``LLM(additional_config={SETTINGS_KEY: ...})``), which reach the processor as
``vllm_config.additional_config``.

What vLLM does differently from the Hugging Face engine: its own per-request random streams
(``SamplingParams.seed``), so a request's text is not the same text as the HF engine's for the same
seed -- the distribution it is drawn from is the same (tested on CPU: identical logits in give
identical reweighted logits out, ``tests/generation/test_vllm.py``).

Checked against vLLM 0.26.0 (the PyPI wheel's source): ``LogitsProcessor`` has ``validate_params``
(classmethod), ``__init__(vllm_config, device, is_pin_memory)``, ``is_argmax_invariant``,
``update_state(batch_update)``, ``apply(logits)``; custom processors make the engine fall back from
Model Runner V2 (``vllm/config/vllm.py``), and are refused with speculative decoding
(``build_logitsprocs``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

from dfkd_ray.generation.steering import (GenerationRequest, GenerationResult, LmInfo, RowControls, SteeredRow,
                                          TeacherScorer, TokenMasks, candidate_logits, finish_results, lm_dtype,
                                          prepare_rows, steer_step, teacher_initial)
from dfkd_ray.generation.token_map import TeacherRows, TeacherTokenMap, to_device
from dfkd_ray.generation.vllm_rows import STEER_KEY, RowBook, RowState, SteerArgs, parse_steer_args

if TYPE_CHECKING:
    from dfkd_ray.config import SteeredConfig, TeacherConfig

SETTINGS_KEY = "dfkd_steered"
"""Key of ``LLM(additional_config=...)`` holding the engine-wide settings (:func:`engine_settings`)."""

PROCESSOR = f"{__name__}:SteeredLogitsProcessor"
"""The class path given to ``vllm.LLM(logits_processors=[...])``."""

INSTALL_HINT = "on a GPU node, pip install -e '.[vllm]' from the repository root (vLLM's wheels are CUDA builds)"


def engine_settings(config: "SteeredConfig", teachers: Sequence["TeacherConfig"]) -> dict:
    """The engine-wide settings, JSON (vLLM hashes ``additional_config`` as JSON): the
    ``transfer.steered`` section and the teachers' sections, dumped as they were validated."""
    return {"steered": config.model_dump(mode="json"), "teachers": [t.model_dump(mode="json") for t in teachers]}


def _settings_sections(settings: dict) -> tuple["SteeredConfig", dict[str, "TeacherConfig"]]:
    """The sections back from :func:`engine_settings` (validated when the job's config loaded)."""
    from dfkd_ray.config import SteeredConfig, TeacherConfig

    teachers = [TeacherConfig.model_construct(**t) for t in settings["teachers"]]
    return SteeredConfig.model_construct(**settings["steered"]), {t.name: t for t in teachers}


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
        lm: the base LM's :class:`~dfkd_ray.generation.steering.LmInfo`.
        config: the ``transfer.steered`` section (schedule, ``min_new_tokens``, ``keep_prompt``,
            chunking, token map); per-request lambda and m come with each row.
        device: the engine's device.
        load_teacher: name -> :class:`~dfkd_ray.models.teacher.Teacher`, called once per teacher, at
            the first step that needs it.
    """

    def __init__(self, lm: LmInfo, config: "SteeredConfig", device: torch.device | str,
                 load_teacher: Callable[[str], Any]):
        self.lm = lm
        self.config = config
        self.device = torch.device(device)
        self.load_teacher = load_teacher
        self.book = RowBook()
        self.scorer = TeacherScorer({}, lm, config, self.device)
        self.masks = TokenMasks.of(lm, config.min_new_tokens, self.device, start_new_word=config.start_new_word)
        self.pools: dict[str, _TextPool] = {}

    @classmethod
    def from_settings(cls, settings: dict, lm_path: str, tokenizer_path: Optional[str], device: torch.device | str,
                      trust_remote_code: bool = False) -> "SteeringCore":
        """Inside the engine process: the LM's tokenizer and config from its directory; teachers from
        their sections in the settings, loaded when first needed."""
        from dfkd_ray.models.teacher import load_teachers

        config, specs = _settings_sections(settings)
        lm = LmInfo.from_dir(lm_path, tokenizer_path=tokenizer_path, trust_remote_code=trust_remote_code)
        dev = torch.device(device)

        def load(name: str):
            if name not in specs:
                raise KeyError(f"steered request names teacher {name!r}, but the engine knows only {sorted(specs)}")
            with torch.inference_mode(False):  # apply() may run under inference mode; weights are ordinary tensors
                return load_teachers([specs[name]], num_blocks=1, device=dev)[name]

        return cls(lm, config, dev, load)

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
        lambda > 0: Eq. 1 over the LM's top-``m`` (:func:`steer_step`; rows grouped by ``m``; within a
        group, teacher forwards are batched per teacher), ``-inf`` outside the top-``m``.
        """
        if not len(self.book):
            return logits
        items = list(self.book.items())  # (slot, state), slots ascending
        steps = [self._sync_len(s) for _, s in items]  # t: tokens generated so far
        guided = [(i, s, t) for (i, s), t in zip(items, steps) if s.args.control_strength > 0]
        self._sync_texts([s for _, s, _ in guided])

        slots = to_device(np.array([i for i, _ in items], dtype=np.int64), self.device)
        sub = logits[slots].float()  # (n, V)
        plain = [j for j, (_, s) in enumerate(items) if not s.args.control_strength > 0]
        if plain:  # unguided rows: the masks only; vLLM's sampler does the rest
            rows = to_device(np.array(plain, dtype=np.int64), self.device)
            x = sub[rows]  # (b, V)
            self.masks.apply(x, torch.tensor([steps[j] for j in plain], device=self.device))
            sub[rows] = x
        pos = {i: j for j, (i, _) in enumerate(items)}  # slot -> row of sub

        for m in sorted({s.args.top_m for _, s, _ in guided}):
            group = [(i, s, t) for i, s, t in guided if s.args.top_m == m]
            rows = to_device(np.array([pos[i] for i, _, _ in group], dtype=np.int64), self.device)
            x = sub[rows]  # (b, V)
            t = torch.tensor([t for _, _, t in group], device=self.device)  # (b,)
            controls = RowControls(
                strength=torch.tensor([s.args.control_strength for _, s, _ in group], dtype=torch.float32,
                                      device=self.device),
                targets=torch.tensor([s.args.target for _, s, _ in group], dtype=torch.long, device=self.device))
            groups = {}
            for name in sorted({s.teacher for _, s, _ in group}):
                members = np.array([j for j, (_, s, _) in enumerate(group) if s.teacher == name], dtype=np.int64)
                pool = self.pools[name]
                groups[name] = (members, pool.rows.subset(np.array([group[j][1].slot for j in members], dtype=np.int64)))
            scores, cand = steer_step(x, t, controls, groups, masks=self.masks, scorer=self.scorer, top_m=m)  # (b, m)
            sub[rows] = candidate_logits(scores, cand, x.shape[-1])
        logits[slots] = sub.to(logits.dtype)
        if len(self.scorer.stats.pending) > 256:  # CUDA timing events: fold them into the stats now and then
            self.scorer.stats.settle_timing(self.device)
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
        for name, group in by_teacher.items():
            pool = self._teacher_pool(name)
            new = [s for s in group if s.slot < 0]
            if new:
                pool.add(new, [teacher_initial(self.lm, s.prompt_ids, self.config.keep_prompt) for s in new])
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


def llm_arguments(config: "SteeredConfig", teachers: Sequence["TeacherConfig"],
                  engine_kwargs: Optional[dict] = None) -> dict:
    """The ``vllm.LLM`` arguments of the steered engine: the LM, the processor's class path, the
    settings it reads, the LM's dtype (``auto``: bfloat16), ``max_num_seqs`` = ``batch_size``, 60% of
    GPU memory (the teachers load after vLLM has sized its KV cache); ``engine_kwargs`` override."""
    dtype = str(lm_dtype(config.dtype, torch.device("cuda"))).removeprefix("torch.")  # vLLM runs on CUDA
    kwargs = dict(model=str(config.lm_path), logits_processors=[PROCESSOR],
                  additional_config={SETTINGS_KEY: engine_settings(config, teachers)}, dtype=dtype, seed=0,
                  max_num_seqs=config.batch_size, gpu_memory_utilization=0.6)
    kwargs.update(engine_kwargs or {})
    return kwargs


class VllmSteeredGenerator:
    """Teacher-reweighted top-m decoding with vLLM; the interface of the Hugging Face ``SteeredGenerator``.

    Args:
        config: the ``transfer.steered`` section; ``lm_path`` is a local causal-LM directory
            (decoder-only; vLLM no longer runs encoder-decoders), ``batch_size`` becomes vLLM's
            ``max_num_seqs``, ``dtype`` the LM's (``auto``: bfloat16; float64 is not a vLLM dtype).
        teachers: the teachers' sections (:class:`~dfkd_ray.config.TeacherConfig`): what the engine loads.
        loaded_teachers: name -> :class:`~dfkd_ray.models.teacher.Teacher` for labels and the final
            confidence on this side; default: loaded here on ``device``, after the engine is built.
        device: for teachers loaded here.
        engine_kwargs: more ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``tensor_parallel_size``,
            ``enforce_eager``, ...). The default ``gpu_memory_utilization`` is 0.6: the engine's
            teachers (weights and activations) are loaded after vLLM has sized its KV cache.
    """

    def __init__(self, config: "SteeredConfig", teachers: Sequence["TeacherConfig"], *,
                 loaded_teachers: Optional[dict] = None, device: str = "cuda", engine_kwargs: Optional[dict] = None):
        if config.dtype == "float64":
            raise ValueError("dtype float64 is not supported by the vLLM engine; use auto, bfloat16, float16 or float32")
        if not teachers:
            raise ValueError("no teachers: the steered generator needs at least one teacher")
        self.config = config
        # Model Runner V2 (default for dense models in 0.26) has no custom logits processors; say so
        # up front instead of relying on the fallback. The FlashInfer sampler JIT-compiles kernels.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"transfer.steered.engine=vllm needs vLLM: {INSTALL_HINT}") from e

        # built before any teacher of ours touches the GPU: vLLM sizes its KV cache from the free memory
        self.llm = vllm.LLM(**llm_arguments(config, teachers, engine_kwargs))

        self.lm_info = LmInfo.from_dir(config.lm_path)
        if loaded_teachers is None:
            from dfkd_ray.models.teacher import load_teachers

            loaded_teachers = load_teachers(teachers, num_blocks=1, device=device)
        self.teachers = dict(loaded_teachers)
        self._maps: dict[str, TeacherTokenMap] = {}  # for the results' "token_map" field only (CPU)

    def sampling_params(self, row: SteeredRow):
        """The row's ``vllm.SamplingParams``: the steering in ``extra_args``, the draw left to vLLM."""
        from vllm import SamplingParams

        c = self.config
        steer = SteerArgs(row.request.teacher, int(row.request.target), float(row.strength), int(c.top_m))
        return SamplingParams(n=1, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                              seed=int(row.request.seed) % (1 << 63), max_tokens=c.max_new_tokens,
                              min_tokens=c.min_new_tokens, stop_token_ids=list(self.lm_info.eos_ids), detokenize=False,
                              extra_args=steer.to_extra_args())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Texts for the requests, in order; vLLM schedules them (``max_num_seqs`` at a time)."""
        rows = prepare_rows(requests, self.teachers, self.config, self.lm_info)
        outputs = self.llm.generate([{"prompt_token_ids": r.prompt_ids} for r in rows],
                                    [self.sampling_params(r) for r in rows], use_tqdm=False)
        eos_ids = self.lm_info.eos_ids
        for r, o in zip(rows, outputs):
            c = o.outputs[0]
            ids = [int(x) for x in c.token_ids]
            if c.finish_reason == "stop" and ids and ids[-1] in eos_ids:
                ids.pop()
                r.stop = "eos"
            else:
                r.stop = "length" if c.finish_reason == "length" else str(c.finish_reason)
            r.generated = ids
        for name in sorted({r.request.teacher for r in rows if r.guided}):
            if name not in self._maps:
                t = self.teachers[name]
                self._maps[name] = TeacherTokenMap(self.lm_info.vocab, t.tokenizer, t.max_length, "cpu",
                                                   mode=self.config.token_map)
        return finish_results(rows, lm=self.lm_info, config=self.config, teachers=self.teachers, maps=self._maps,
                              engine="vllm")
