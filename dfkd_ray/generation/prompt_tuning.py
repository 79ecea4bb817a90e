"""DFKD-T3 (arXiv 2311.01689) transfer generation: a frozen LM rewrites general-domain documents into
task text through a tuned hybrid prompt, on Hugging Face transformers.

The generator's input for a request (teacher ``k``, class ``c``, corpus document ``d``) is

    [BOS] ids(d)[:max_source_tokens] ids(" " + commander) S_{k,c}          (embeddings (L, d_LM))

where ``S_{k,c}`` ``(P, d_LM)`` are the request's soft vectors and ``commander`` the hard commander
token (the paper's hybrid prompt); the LM's continuation is the transfer text. For a decoder-only LM
the prompt follows the document, as GPT-2 is asked to summarise with a "TL;DR:" after the article
(Radford et al. 2019); the paper's T5 reads it before the document in its encoder.

Tuning (:func:`tune_prompts`, per teacher, every class at once): the LM decodes ``max_new_tokens``
tokens with Gumbel draws whose logits the stable level scales
(:func:`~dfkd_ray.math.prompt_tuning.gumbel_softmax`). The teacher reads each step's token
distribution ``y_t`` ``(V_LM,)`` as the input embedding ``y_t @ B @ E_teacher``, where ``B``
``(V_LM, V_teacher)`` is the fixed :class:`VocabularyBridge` (:class:`SoftTeacher`). With
``relaxation: soft`` (the default) ``y_t`` is the Gumbel-softmax vector and the LM continues from
the drawn token, as it does when generating; with ``straight_through`` ``y_t`` is the one-hot draw
carrying the soft vector's gradient, fed to the LM as ``y_t @ E_LM`` too. The specificity and
diversity losses (:mod:`dfkd_ray.math.prompt_tuning`) reach the soft vectors only: the LM and the
teacher stay frozen.

Generation (:meth:`HybridPromptLM.generate`, the ``hf`` engine) decodes from the prompt embeddings
with a KV cache and draws each token from ``softmax(stable_level * logits)`` with the request's own
uniforms. Tuned prompts are saved per teacher as safetensors under ``output.dir/prompts/`` with the
description that made them (:func:`tune_teacher`, :func:`write_prompts`, :func:`load_prompts`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from dfkd_ray.generation.steering import LmInfo, TokenMasks, lm_dtype
from dfkd_ray.generation.token_map import LmVocabulary, TeacherTokenMap
from dfkd_ray.math.decoding import row_uniforms
from dfkd_ray.math.prompt_tuning import (diversity_loss, gumbel_noise, gumbel_softmax, specificity_loss, stable_sample,
                                         straight_through)
from dfkd_ray.stages import StageMismatch, diff_descriptions, fingerprint

if TYPE_CHECKING:
    from dfkd_ray.config import JobConfig
    from dfkd_ray.config.schema import PromptTunedConfig
    from dfkd_ray.models.teacher import Teacher


# ---------------------------------------------------------------------- the vocabulary bridge


class VocabularyBridge:
    """The fixed LM-to-teacher vocabulary map of one (LM, teacher) pair.

    ``matrix`` ``(V_LM, V_teacher)`` is sparse: row ``i`` is the mean of the one-hot vectors of the
    teacher ids that the teacher's tokenizer gives for LM token ``i``'s text (no special tokens),
    so ``one_hot(i) @ matrix @ E_teacher`` is the mean teacher input embedding of that text.
    Special tokens and tokens whose text the teacher tokenizes to nothing (whitespace) have an
    empty row; ``has_ids`` ``(V_LM,)`` marks the others.

    Built from the token-map machinery of steered generation: each token's text from
    :class:`~dfkd_ray.generation.token_map.LmVocabulary`, its teacher ids from
    :meth:`TeacherTokenMap.encode <dfkd_ray.generation.token_map.TeacherTokenMap.encode>`.
    """

    def __init__(self, matrix: torch.Tensor, has_ids: torch.Tensor):
        self.matrix = matrix
        self.has_ids = has_ids

    @classmethod
    def build(cls, vocab: LmVocabulary, token_map: TeacherTokenMap) -> "VocabularyBridge":
        texts = [vocab.text([i]) for i in range(vocab.size)]
        ids = token_map.encode(texts)
        rows = [i for i, x in enumerate(ids) for _ in x]
        cols = [t for x in ids for t in x]
        vals = [1.0 / len(x) for x in ids for _ in x]
        V_t = len(token_map.tokenizer)
        matrix = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).view(2, -1),
                                         torch.tensor(vals, dtype=torch.float32), (vocab.size, V_t),
                                         check_invariants=True).coalesce()
        has_ids = torch.tensor([len(x) > 0 for x in ids], dtype=torch.bool)
        return cls(matrix.to(token_map.device), has_ids.to(token_map.device))

    def embeddings(self, teacher_embeddings: torch.Tensor) -> torch.Tensor:
        """``(V_LM, d_teacher)``: ``matrix @ teacher_embeddings``, each LM token's mean teacher input embedding."""
        return torch.sparse.mm(self.matrix, teacher_embeddings.float())


class SoftTeacher:
    """A frozen teacher read through the bridge: logits for texts given as (soft) LM token distributions.

    The teacher's input is ``[prefix specials] content [suffix specials]`` as its tokenizer lays out a
    text, where the content is one bridged embedding per kept LM token, in order (tokens that give
    the teacher nothing, and those after EOS, are left out), cut to the teacher's ``max_length``.

    Args:
        teacher: the frozen :class:`~dfkd_ray.models.teacher.Teacher`.
        vocab: the LM's vocabulary.
    """

    def __init__(self, teacher: "Teacher", vocab: LmVocabulary):
        self.teacher = teacher
        device = teacher.device
        token_map = TeacherTokenMap(vocab, teacher.tokenizer, teacher.max_length, device, mode="exact")
        self.bridge = VocabularyBridge.build(vocab, token_map)
        weight = teacher.model.get_input_embeddings().weight  # (V_teacher, d_teacher)
        self.token_embeddings = self.bridge.embeddings(weight).to(weight.dtype)  # (V_LM, d_teacher)
        self.prefix = weight[torch.tensor(token_map.prefix, dtype=torch.long, device=device)]  # (n_pre, d)
        self.suffix = weight[torch.tensor(token_map.suffix, dtype=torch.long, device=device)]  # (n_suf, d)
        self.capacity = token_map.capacity

    def logits(self, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``(B, C)`` for token distributions ``y`` ``(B, T, V_LM)`` (one-hot in value for
        drawn tokens); ``keep`` ``(B, T)`` bool marks the positions that are text."""
        B, T, _ = y.shape
        content = y.to(self.token_embeddings.dtype) @ self.token_embeddings  # (B, T, d)
        d = content.shape[-1]
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, T) kept positions first
        content = content.gather(1, order.unsqueeze(-1).expand(B, T, d))  # (B, T, d)
        count = keep.sum(1).clamp(max=self.capacity)  # (B,) content tokens after truncation
        n_pre, n_suf = len(self.prefix), len(self.suffix)
        L = n_pre + int(count.max()) + n_suf
        col = torch.arange(L, device=y.device)  # (L,)
        k = col - n_pre  # (L,) content index of each column
        seq = content.new_zeros(B, L, d)
        if n_pre:
            seq = torch.where((col < n_pre).view(1, L, 1), self.prefix[col.clamp(max=n_pre - 1)].unsqueeze(0), seq)
        in_content = (k >= 0).view(1, L) & (k.view(1, L) < count.view(B, 1))  # (B, L)
        seq = torch.where(in_content.unsqueeze(-1), content[:, k.clamp(0, T - 1)], seq)
        if n_suf:
            j = k.view(1, L) - count.view(B, 1)  # (B, L) suffix index
            in_suffix = (j >= 0) & (j < n_suf)
            seq = torch.where(in_suffix.unsqueeze(-1), self.suffix[j.clamp(0, n_suf - 1)], seq)
        mask = (col.view(1, L) < (n_pre + count + n_suf).view(B, 1)).long()  # (B, L)
        return self.teacher.model(inputs_embeds=seq, attention_mask=mask).logits.float()  # (B, C)


# ---------------------------------------------------------------------- the generator


@dataclass(frozen=True)
class PromptRow:
    """One text to write: the soft vectors ``(P, d_LM)`` of its teacher and class, the LM ids of its
    source document (already cut), and the request's seed."""

    soft: torch.Tensor
    source_ids: list[int]
    seed: int


@dataclass
class Rewrite:
    """A generated text: its LM token ids and why decoding stopped (``eos`` or ``length``)."""

    text: str
    token_ids: list[int]
    stop: str


class HybridPromptLM:
    """The frozen decoder-only LM of DFKD-T3 and its hybrid prompt (module docstring).

    Args:
        lm: a causal LM (``AutoModelForCausalLM``); moved to ``device`` in ``config.dtype``, frozen.
        tokenizer: its tokenizer.
        config: the ``transfer.prompt_tuned`` section.
        device: where the LM runs.
        name: recorded with each text.
    """

    def __init__(self, lm, tokenizer, config: "PromptTunedConfig", *, device: torch.device | str = "cpu",
                 name: str = ""):
        self.config = config
        self.device = torch.device(device)
        self.lm = lm.to(device=self.device, dtype=lm_dtype(config.dtype, self.device)).eval().requires_grad_(False)
        # transformers >= 5.2x names the KV cache argument ``cache``; older versions ``past_key_values``
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.info = LmInfo.from_model(lm, tokenizer, name)
        self.embedding = self.lm.get_input_embeddings()
        self.commander_ids = commander_pieces(tokenizer, config.commander)
        self.masks = TokenMasks.of(self.info, config.min_new_tokens, self.device)
        self._source_cache: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(cls, config: "PromptTunedConfig", *, device: torch.device | str = "cpu") -> "HybridPromptLM":
        """The LM of ``config.lm_path`` (a local causal-LM directory)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = torch.device(device)
        lm = AutoModelForCausalLM.from_pretrained(config.lm_path, dtype=lm_dtype(config.dtype, dev))
        return cls(lm, AutoTokenizer.from_pretrained(config.lm_path), config, device=dev, name=config.lm_path.name)

    def source_ids(self, document: str) -> list[int]:
        """``[BOS] + ids(document)``, cut to ``max_source_tokens`` document tokens (cached per document)."""
        if document not in self._source_cache:
            ids = list(self.info.tokenizer(document, add_special_tokens=False)["input_ids"])
            ids = ids[:self.config.max_source_tokens]
            self._source_cache[document] = ([self.info.bos_id] if self.info.bos_id is not None else []) + ids
        return self._source_cache[document]

    def initial_prompts(self, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        """``(C, P, d_LM)`` float32 soft vectors to start tuning from: the input embeddings of tokens drawn
        uniformly from the ids the LM may generate (prompt tuning's vocabulary initialisation, Lester et al. 2021)."""
        banned = set(self.info.banned) | set(self.info.eos_ids)
        allowed = torch.tensor([i for i in range(self.info.vocab.size) if i not in banned], dtype=torch.long)
        pick = allowed[torch.randint(len(allowed), (num_classes * self.config.num_soft_tokens,), generator=generator)]
        weight = self.embedding.weight.detach().float().cpu()
        return weight[pick].view(num_classes, self.config.num_soft_tokens, -1).clone()

    def prompt_inputs(self, sources: Sequence[Sequence[int]], soft: torch.Tensor):
        """Left-padded ``inputs_embeds (B, L, d)``, ``attention_mask (B, L)`` and ``position_ids (B, L)``
        of the hybrid prompts: each source's ids, the commander's, then that row's ``soft (B, P, d)``."""
        B = len(sources)
        rows = [list(s) + self.commander_ids for s in sources]
        width = max(len(r) for r in rows)
        ids = torch.full((B, width), self.info.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width + soft.shape[1]), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        tokens = self.embedding(ids)  # (B, width, d)
        embeds = torch.cat([tokens, soft.to(device=self.device, dtype=tokens.dtype)], dim=1)  # (B, L, d)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L) real tokens only
        return embeds, mask, positions

    def _forward(self, embeds, mask, positions, cache):
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float()  # (B, V)

    def _ban_bias(self, steps: int) -> torch.Tensor:
        """``(steps, V)`` additive logit bias: ``-inf`` for banned ids, and for EOS before ``min_new_tokens``."""
        logits = torch.zeros(steps, self.info.vocab.size, device=self.device)
        self.masks.apply(logits, torch.arange(steps, device=self.device))
        return logits

    def decode_soft(self, sources: Sequence[Sequence[int]], soft: torch.Tensor, generator: torch.Generator, *,
                    stable_level: float, temperature: float, relaxation: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``max_new_tokens`` tokens with Gumbel draws (:func:`~dfkd_ray.math.prompt_tuning.gumbel_softmax`),
        differentiable in ``soft`` (the prompt's soft vectors ``(B, P, d)``).

        ``relaxation``: ``soft`` returns the Gumbel-softmax vectors and feeds the LM each drawn token
        (its embedding, no gradient: the LM writes what generation writes); ``straight_through``
        returns and feeds ``one_hot(x) - y_soft.detach() + y_soft`` (gradient through both).

        Returns ``y (B, T, V)`` for the teacher and the drawn ids ``(B, T)``.
        """
        from transformers import DynamicCache

        if relaxation not in ("soft", "straight_through"):
            raise ValueError(f"relaxation must be 'soft' or 'straight_through', got {relaxation!r}")
        T = self.config.max_new_tokens
        embeds, mask, positions = self.prompt_inputs(sources, soft)
        bias = self._ban_bias(T)  # (T, V)
        weight = self.embedding.weight  # (V, d)
        cache = DynamicCache()
        logits = self._forward(embeds, mask, positions, cache)  # (B, V)
        position = positions[:, -1:]  # (B, 1)
        ys, ids = [], []
        for t in range(T):
            noise = gumbel_noise(logits.shape, generator, device=self.device)  # (B, V)
            y, x = gumbel_softmax(logits + bias[t], noise, stable_level=stable_level, temperature=temperature)
            if relaxation == "straight_through":
                y = straight_through(y, x)  # (B, V) one-hot in value
            ys.append(y)
            ids.append(x)
            if t + 1 == T:
                break
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            position = position + 1
            step = (y.to(weight.dtype) @ weight) if relaxation == "straight_through" else self.embedding(x)  # (B, d)
            logits = self._forward(step.unsqueeze(1), mask, position, cache)
        return torch.stack(ys, dim=1), torch.stack(ids, dim=1)

    def text_positions(self, ids: torch.Tensor, has_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` bool: drawn tokens that are text for a teacher -- before the row's first EOS and
        giving the teacher at least one id (``has_ids`` ``(V,)``, :attr:`VocabularyBridge.has_ids`)."""
        eos = torch.zeros_like(ids, dtype=torch.bool)
        for e in self.info.eos_ids:
            eos |= ids == e
        before_eos = eos.long().cumsum(1) == 0  # (B, T)
        return before_eos & has_ids[ids]

    @torch.no_grad()
    def generate(self, rows: Sequence[PromptRow]) -> list[Rewrite]:
        """The texts of ``rows``, in order, ``config.batch_size`` rows at a time."""
        out: list[Rewrite] = []
        for s in range(0, len(rows), self.config.batch_size):
            out.extend(self._generate_batch(rows[s:s + self.config.batch_size]))
        return out

    def _generate_batch(self, rows: Sequence[PromptRow]) -> list[Rewrite]:
        from transformers import DynamicCache

        c, T = self.config, self.config.max_new_tokens
        soft = torch.stack([r.soft for r in rows])  # (B, P, d)
        embeds, mask, positions = self.prompt_inputs([r.source_ids for r in rows], soft)
        u = row_uniforms([r.seed for r in rows], T, self.device)  # (B, T)
        cache = DynamicCache()
        logits = self._forward(embeds, mask, positions, cache)  # (B, V)
        position = positions[:, -1:]
        generated: list[list[int]] = [[] for _ in rows]
        stop = ["length"] * len(rows)
        done = [False] * len(rows)
        eos = set(self.info.eos_ids)
        for t in range(T):
            self.masks.apply(logits, torch.full((len(rows),), t, device=self.device))
            chosen = stable_sample(logits, u[:, t], stable_level=c.stable_level)  # (B,)
            for b, x in enumerate(chosen.tolist()):
                if done[b]:
                    continue
                if x in eos:
                    done[b], stop[b] = True, "eos"
                else:
                    generated[b].append(x)
            if all(done) or t + 1 == T:
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            position = position + 1
            logits = self._forward(self.embedding(chosen.view(-1, 1)), mask, position, cache)
        return [Rewrite(self.info.vocab.text(g), g, s) for g, s in zip(generated, stop)]


def commander_pieces(tokenizer, commander: str) -> list[int]:
    """The LM ids of the commander as a word after the source text: ``ids(" " + commander)``."""
    return list(tokenizer(" " + commander.strip(), add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- tuning


@dataclass
class TuningResult:
    """Tuned soft prompts ``(C, P, d_LM)`` float32 on the CPU and the per-step record of the losses."""

    prompts: torch.Tensor
    history: list[dict] = field(default_factory=list)


def tune_prompts(generator: HybridPromptLM, teacher: "Teacher", documents: Sequence[str], *, seed: int,
                 on_step: Callable[[dict], None] | None = None) -> TuningResult:
    """Tune one teacher's soft prompts, every class together (DFKD-T3 section 3).

    Each step draws ``tuning_batch_size`` documents (seeded) and a class for each row (balanced:
    every class the same number of times, up to one), decodes with
    :meth:`HybridPromptLM.decode_soft`, reads the texts with the teacher through the bridge
    (:class:`SoftTeacher`) and takes an Adam step on ``specificity_weight * specificity +
    diversity_weight * diversity``. Only the soft vectors have gradients.

    Args:
        generator: the frozen LM with its hybrid prompt settings (``generator.config``).
        teacher: the frozen teacher.
        documents: the general-domain corpus.
        seed: seeds the initial vectors, the documents, the classes and the Gumbel noise.
        on_step: called with each step's record (``step``, ``loss``, ``specificity``, ``diversity``,
            ``target_rate``: the share of rows the teacher put in their target class, through the bridge).
    """
    if not documents:
        raise ValueError("no documents to rewrite: the corpus is empty")
    c = generator.config
    C = teacher.num_labels
    soft_teacher = SoftTeacher(teacher, generator.info.vocab)
    init = torch.Generator().manual_seed(seed)
    prompts = torch.nn.Parameter(generator.initial_prompts(C, init).to(generator.device))  # (C, P, d)
    optimizer = torch.optim.Adam([prompts], lr=c.learning_rate)
    noise = torch.Generator(device=generator.device).manual_seed(seed)
    pick = random.Random(seed)
    history = []
    for step in range(c.tuning_steps):
        B = c.tuning_batch_size
        targets = torch.arange(B) % C
        targets = targets[torch.randperm(B, generator=init)].to(generator.device)  # (B,)
        sources = [generator.source_ids(documents[pick.randrange(len(documents))]) for _ in range(B)]
        y, ids = generator.decode_soft(sources, prompts[targets], noise, stable_level=c.stable_level,
                                       temperature=c.gumbel_temperature, relaxation=c.relaxation)  # (B, T, V), (B, T)
        keep = generator.text_positions(ids, soft_teacher.bridge.has_ids)  # (B, T)
        logits = soft_teacher.logits(y, keep)  # (B, C)
        spec, div = specificity_loss(logits, targets), diversity_loss(logits)
        loss = c.specificity_weight * spec + c.diversity_weight * div
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {"step": step + 1, "loss": loss.item(), "specificity": spec.item(), "diversity": div.item(),
                  "target_rate": float((logits.argmax(-1) == targets).float().mean())}
        history.append(record)
        if on_step is not None:
            on_step(record)
    return TuningResult(prompts.detach().float().cpu(), history)


# ---------------------------------------------------------------------- prompt files (output.dir/prompts)


PROMPTS_DIR = "prompts"
PROMPT_TENSOR = "soft_prompts"
# Fields of ``transfer.prompt_tuned`` that decide generation only, not the tuned prompts.
_GENERATION_ONLY_KEYS = ("batch_size",)


def prompts_dir(cfg: "JobConfig") -> Path:
    return cfg.output.dir / PROMPTS_DIR


def prompt_file(cfg: "JobConfig", teacher: str) -> Path:
    return prompts_dir(cfg) / f"{teacher}.safetensors"


def teacher_seed(job_seed: int, teacher: str) -> int:
    """The tuning seed of one teacher: depends on the job seed and the teacher's name only."""
    return int.from_bytes(hashlib.blake2b(f"{job_seed}|prompt_tuned|{teacher}".encode(), digest_size=8).digest(),
                          "little") >> 1


def prompt_description(cfg: "JobConfig", teacher: str) -> dict:
    """Everything that decides one teacher's tuned prompts; its fingerprint is stored in the file."""
    t = next(t for t in cfg.teachers if t.name == teacher)
    tuning = cfg.transfer.prompt_tuned.model_dump(mode="json")
    for key in _GENERATION_ONLY_KEYS:
        tuning.pop(key)
    tuning["lm_path"] = str(Path(tuning["lm_path"]).resolve())
    corpus = cfg.transfer.corpus.model_dump(mode="json")
    corpus["path"] = str(Path(corpus["path"]).resolve())
    return {"seed": cfg.seed, "corpus": corpus, "prompt_tuned": tuning,
            "teacher": {"name": t.name, "path": str(Path(t.path).resolve()), "labels": cfg.teacher_labels()[t.name],
                        "max_length": t.max_length}}


def prompts_description(cfg: "JobConfig") -> dict:
    """The prompt-tuning stage's description: every teacher's :func:`prompt_description`."""
    return {t.name: prompt_description(cfg, t.name) for t in cfg.teachers}


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_prompt_file(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A prompt file's ``(C, P, d_LM)`` tensor and its metadata (``description`` and ``summary`` parsed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensor = f.get_tensor(PROMPT_TENSOR)
    return tensor, {k: json.loads(v) if k in ("description", "summary") else v for k, v in meta.items()}


def finished_prompt(cfg: "JobConfig", teacher: str) -> dict | None:
    """The summary of ``teacher``'s prompt file when it was made for this config, else None (no file).

    Raises :class:`~dfkd_ray.stages.StageMismatch` (the changed fields listed) when the file was made
    with another configuration, as a finished stage would.
    """
    path = prompt_file(cfg, teacher)
    if not path.is_file():
        return None
    _, meta = read_prompt_file(path)
    description = prompt_description(cfg, teacher)
    if meta.get("fingerprint") == fingerprint(description):
        return meta["summary"]
    changes = diff_descriptions(meta.get("description", {}), json.loads(json.dumps(description)))
    raise StageMismatch(f"prompts: {path} was tuned with a different configuration (changed: "
                        f"{'; '.join(changes[:8]) or 'unknown'}). It was not touched: choose another output.dir, "
                        f"or delete {prompts_dir(cfg)} to tune again and the stages after it")


def save_prompts(path: str | Path, prompts: torch.Tensor, *, description: dict, summary: dict) -> Path:
    """Write a prompt file atomically (temporary name, then rename): a killed run leaves none half-written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({PROMPT_TENSOR: prompts.contiguous()}, str(tmp),
              metadata={"fingerprint": fingerprint(description), "description": json.dumps(description, sort_keys=True),
                        "summary": json.dumps(summary, sort_keys=True)})
    os.replace(tmp, path)
    return path


def tune_teacher(cfg: "JobConfig", teacher: str, *, device: str = "cpu", progress_every: int = 0) -> dict:
    """Tune and save one teacher's prompts (or find them tuned); returns the file's summary.

    Loads the LM and that teacher on ``device``, reads the corpus, runs :func:`tune_prompts` and
    writes ``output.dir/prompts/<teacher>.safetensors``. ``progress_every`` > 0 prints a line every
    that many steps (the caller reports the end).
    """
    from dfkd_ray.models.teacher import load_teachers
    from dfkd_ray.transfer.sources.corpus import read_documents

    done = finished_prompt(cfg, teacher)
    if done is not None:
        return done
    c, corpus = cfg.transfer.prompt_tuned, cfg.transfer.corpus
    start = time.perf_counter()
    documents = read_documents(corpus.path, min_words=corpus.min_words, max_words=corpus.max_words,
                               encoding=corpus.encoding)
    loaded = load_teachers([t for t in cfg.teachers if t.name == teacher], device=device)[teacher]
    generator = HybridPromptLM.from_pretrained(c, device=device)

    def report(record: dict) -> None:
        if progress_every and record["step"] % progress_every == 0 and record["step"] < c.tuning_steps:
            print(f"prompt tuning {teacher}: step {record['step']}/{c.tuning_steps}, loss {record['loss']:.4f} "
                  f"(specificity {record['specificity']:.4f}, diversity {record['diversity']:.4f}), "
                  f"target rate {record['target_rate']:.2f}", flush=True)

    result = tune_prompts(generator, loaded, documents, seed=teacher_seed(cfg.seed, teacher), on_step=report)
    last = result.history[-max(1, len(result.history) // 10):]  # the last tenth of the steps
    summary = {"teacher": teacher, "labels": loaded.labels, "steps": len(result.history),
               "seconds": round(time.perf_counter() - start, 2), "device": str(device),
               "first": result.history[0], "final": {k: round(sum(r[k] for r in last) / len(last), 4)
                                                     for k in ("loss", "specificity", "diversity", "target_rate")}}
    save_prompts(prompt_file(cfg, teacher), result.prompts, description=prompt_description(cfg, teacher),
                 summary=summary)
    return summary


def write_prompts(cfg: "JobConfig", *, device: str = "cpu", progress_every: int = 0) -> Path:
    """Tune (or find tuned) every teacher's prompts in this process and record the stage; returns the
    directory. The in-process twin of :func:`dfkd_ray.orchestration.prompts.run_prompt_tuning`."""
    from dfkd_ray.stages import mark_done, stage_done

    directory = prompts_dir(cfg)
    description = prompts_description(cfg)
    if stage_done(directory, description, stage="prompts"):
        return directory
    summaries = {}
    for t in cfg.teachers:
        summaries[t.name] = tune_teacher(cfg, t.name, device=device, progress_every=progress_every)
        if progress_every:
            print(tuned_line(cfg, t.name, summaries[t.name]), flush=True)
    mark_done(directory, description, teachers=summaries)
    return directory


def tuned_line(cfg: "JobConfig", teacher: str, summary: dict) -> str:
    """The line that reports one teacher's tuned prompts."""
    return (f"prompt tuning: {teacher} done in {summary['seconds']:.1f} s ({summary['steps']} steps), teacher "
            f"target rate {summary['first']['target_rate']:.2f} -> {summary['final']['target_rate']:.2f} -> "
            f"{prompt_file(cfg, teacher)}")


@dataclass(frozen=True)
class TunedPrompts:
    """One teacher's tuned prompts ``(C, P, d_LM)`` and the digest of the file they came from."""

    prompts: torch.Tensor
    digest: str


def load_prompts(cfg: "JobConfig") -> dict[str, TunedPrompts]:
    """Every teacher's tuned prompts, checked against this config; raises FileNotFoundError naming the
    teachers whose prompts are missing (tune them first)."""
    missing = [t.name for t in cfg.teachers if finished_prompt(cfg, t.name) is None]
    if missing:
        raise FileNotFoundError(f"no tuned prompts for teachers {missing} under {prompts_dir(cfg)}: tune them first "
                                "(jobs/amalgamate.py and jobs/generate.py do, or dfkd_ray.generation.prompt_tuning."
                                "write_prompts in one process)")
    out = {}
    for t in cfg.teachers:
        path = prompt_file(cfg, t.name)
        out[t.name] = TunedPrompts(read_prompt_file(path)[0], file_digest(path))
    return out
