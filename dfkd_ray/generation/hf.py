"""The steerable generator of StrataNet section 4.2 on Hugging Face transformers: the decoding loop.

Each step runs :func:`~dfkd_ray.generation.steering.steer_step` (Eq. 1 up to the draw, shared with
the vLLM adapter) and draws each row's token with
:func:`~dfkd_ray.math.decoding.sample_candidates` (or :func:`~dfkd_ray.math.decoding.sample_top_k`
when no row of the batch is guided). This engine is the CPU reference and the GPU workhorse
wherever vLLM is absent:

- many requests decode together with the LM's KV cache (left padding, explicit position ids);
  each request has its own teacher, target class, seed, prompt and control strength; rows stop at
  EOS or ``max_new_tokens`` (EOS is banned before ``min_new_tokens``) and leave the batch;
- on CUDA, the LM and the teachers run without cuDNN's attention by default
  (:func:`~dfkd_ray.models.kernels.attention_kernels`) and, if asked, a batch decodes as
  ``decode_parts`` interleaved parts, one CUDA stream each (:func:`~dfkd_ray.generation.streams.interleave`);
- a request's draws come from its own generator, so its output does not depend on the batch. Stock
  BLAS kernels are not batch-invariant (a row's logits change in the last bits with the batch
  size: MKL's sgemm does, cuBLAS does), so bitwise equality across batch compositions holds when
  those last bits cannot move a decision; run the LM and teachers in float64 (``dtype``) for a
  reference where they practically never can. See ``tests/generation/test_hf.py``.
"""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from dfkd_ray.generation.steering import (GenerationRequest, GenerationResult, LmInfo, RowControls, SteeredRow,
                                          SteeringStats, TeacherScorer, TokenMasks, finish_results, lm_dtype,
                                          prepare_rows, steer_step, teacher_groups)
from dfkd_ray.generation.streams import gpu_mark, interleave
from dfkd_ray.generation.token_map import TeacherTokenMap, to_device
from dfkd_ray.math.decoding import row_uniforms, sample_candidates, sample_top_k
from dfkd_ray.models.kernels import attention_kernels

if TYPE_CHECKING:
    from dfkd_ray.config import SteeredConfig


class SteeredGenerator:
    """Teacher-reweighted top-m decoding (StrataNet Eq. 1) with a Hugging Face causal LM.

    Args:
        lm: a causal LM (``AutoModelForCausalLM``); moved to ``device`` in ``config.dtype``.
        lm_tokenizer: its tokenizer.
        teachers: name -> :class:`~dfkd_ray.models.teacher.Teacher` (``tokenizer``, ``labels``,
            ``max_length``, ``forward_ids``).
        config: the ``transfer.steered`` section, :class:`~dfkd_ray.config.SteeredConfig`.
        device: defaults to the first teacher's device.
        lm_name: recorded in each result's ``params``.
    """

    def __init__(self, lm, lm_tokenizer, teachers: dict, config: "SteeredConfig", *,
                 device: torch.device | str | None = None, lm_name: str = ""):
        if not teachers:
            raise ValueError("no teachers: the steered generator needs at least one teacher")
        self.config = config
        self.teachers = dict(teachers)
        self.device = torch.device(device) if device is not None else next(iter(self.teachers.values())).device
        self.lm = lm.to(device=self.device, dtype=lm_dtype(config.dtype, self.device)).eval().requires_grad_(False)
        # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` is deprecated,
        # to be removed in 5.40); older versions know only ``past_key_values``
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.lm_info = LmInfo.from_model(lm, lm_tokenizer, lm_name)
        self.masks = TokenMasks.of(self.lm_info, config.min_new_tokens, self.device,
                                   start_new_word=config.start_new_word)
        self.scorer = TeacherScorer(self.teachers, self.lm_info, config, self.device)

    @classmethod
    def from_pretrained(cls, config: "SteeredConfig", teachers: dict, *,
                        device: torch.device | str | None = None) -> "SteeredGenerator":
        """The LM of ``config.lm_path`` (a local causal-LM directory) steered by ``teachers``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = torch.device(device) if device is not None else next(iter(teachers.values())).device
        lm = AutoModelForCausalLM.from_pretrained(config.lm_path, dtype=lm_dtype(config.dtype, dev))
        tok = AutoTokenizer.from_pretrained(config.lm_path)
        return cls(lm, tok, teachers, config, device=dev, lm_name=config.lm_path.name)

    @property
    def stats(self) -> SteeringStats:
        """Work counters of the last :meth:`generate`."""
        return self.scorer.stats

    def token_map(self, teacher: str) -> TeacherTokenMap:
        """The (LM, teacher) token map, built on first use."""
        return self.scorer.token_map(teacher)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Texts for the requests, in order; ``config.batch_size`` rows decode together."""
        rows = prepare_rows(requests, self.teachers, self.config, self.lm_info)
        for name in sorted({r.request.teacher for r in rows if r.guided}):
            self.token_map(name)
        self.scorer.stats = SteeringStats()
        results: list[GenerationResult] = []
        bs = self.config.batch_size
        with torch.inference_mode():
            for s in range(0, len(rows), bs):
                results.extend(self._generate_batch(rows[s:s + bs]))
        self.stats.settle_timing(self.device)
        return results

    # ------------------------------------------------------------------ decoding

    def _lm_forward(self, input_ids, attention_mask, position_ids, cache):
        self.stats.lm_forwards += 1
        with attention_kernels(self.config.sdpa, self.device):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        logits = out.logits[:, -1, :]  # (B, V)
        return logits.clone() if logits.dtype == torch.float64 else logits.float()

    def _generate_batch(self, rows: list[SteeredRow]) -> list[GenerationResult]:
        """Decode one batch: its rows split into ``decode_parts`` parts that :func:`interleave` runs."""
        cuts = np.linspace(0, len(rows), min(self.config.decode_parts, len(rows)) + 1).round().astype(int)
        interleave([self._decode(rows[a:b]) for a, b in zip(cuts[:-1], cuts[1:])], self.device)
        return finish_results(rows, lm=self.lm_info, config=self.config, teachers=self.teachers,
                              maps=self.scorer.maps, engine="hf")

    def _decode(self, rows: list[SteeredRow]):
        """Decode ``rows`` to the end (filling each row's ``generated`` and ``stop``); a generator that
        yields a :func:`gpu_mark` before each wait for the GPU (see :func:`interleave`)."""
        from transformers import DynamicCache

        c, dev, eos_ids = self.config, self.device, self.lm_info.eos_ids
        B = len(rows)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((B, width), self.lm_info.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[b, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T) positions count real tokens only
        u = row_uniforms([r.request.seed for r in rows], c.max_new_tokens, dev)  # (B, T_new)
        controls = RowControls.for_rows(rows, dev)
        active = np.arange(B)  # batch row -> index into rows
        groups = teacher_groups(rows, self.scorer)  # guided rows of each teacher, with their teacher-side text

        cache = DynamicCache()
        logits = self._lm_forward(ids, mask, pos, cache)
        pos = pos[:, -1]  # (B,)
        for t in range(c.max_new_tokens):
            yield gpu_mark(dev)  # next: the candidates come back to the host
            self.stats.steps += 1
            steps = torch.full((len(active),), t, device=dev)  # (B,)
            step = steer_step(logits, steps, controls, groups, masks=self.masks, scorer=self.scorer, top_m=c.top_m)
            broken = ~torch.isfinite(logits.max(-1).values)  # (B,) NaN or nothing allowed; read with the tokens
            if step is not None:
                scores, cand = step  # (B, m) Eq. 1
                chosen = sample_candidates(scores, cand, u[:, t], top_k=c.top_k, top_p=c.top_p,
                                           temperature=c.temperature)
            else:  # no row guided: plain top-k sampling (what Eq. 1 gives with lambda = 0, without the top-m work)
                chosen = sample_top_k(logits, u[:, t], top_k=c.top_k, top_p=c.top_p, temperature=c.temperature)
            yield gpu_mark(dev)  # next: the draws come back to the host
            chosen_list = torch.where(broken, -1, chosen).tolist()
            if -1 in chosen_list:
                raise FloatingPointError("the LM produced non-finite logits for every token of a row (NaN or all -inf)")
            done = []
            for b, x in enumerate(chosen_list):
                row = rows[active[b]]
                if x in eos_ids:
                    row.stop = "eos"
                    done.append(b)
                    continue
                row.generated.append(x)
                if t + 1 == c.max_new_tokens:
                    row.stop = "length"
                    done.append(b)
            if len(done) == len(active):
                break
            if done:  # finished rows leave the batch
                keep = np.setdiff1d(np.arange(len(active)), np.array(done))
                keep_d = to_device(keep, dev)
                cache.batch_select_indices(keep_d)
                mask, pos, u, chosen = (x[keep_d] for x in (mask, pos, u, chosen))
                controls = controls.select(keep_d)
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
            self.stats.tokenizer_seconds += time.perf_counter() - t0
