"""One typed, validated configuration for a whole job.

A job's config is a YAML file under ``jobs/configs/`` plus dotted ``section.key=value`` overrides
from the command line (``teachers.0.path=...`` indexes lists). :func:`load_config` validates
everything at once, before Ray starts, and raises one :class:`ConfigError` listing every problem
with its field path and the fix: unknown keys (with the nearest valid name), wrong types,
out-of-range values, missing model directories, teacher directories without ``id2label``, label
names that clash after normalisation, and an output directory holding another job's results.

Checks that read the filesystem run when ``check_paths=True`` (the default); tests of the schema
alone pass ``check_paths=False``. Pure pydantic + PyYAML: importing this module imports neither
torch, transformers nor Ray.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError, core_schema

from dfkd_ray.labels import label_clashes, normalize_label, ordered_labels

JOB_MARKER = "dfkd_job.json"
"""File in ``output.dir`` recording which job owns the directory."""

_TEACHER_LABELS = "_teacher_labels"
"""Validation-context key: every teacher's label names, for ``transfer.class_weights``."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
# Attention kernels of a stage (dfkd_ray.models.kernels.attention_kernels): without cuDNN, or torch's choice.
AttentionKernels = Literal["no_cudnn", "any"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_paths(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_paths", False))


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _fail_at(loc: tuple, kind: str, message: str, value: Any = None) -> ValidationError:
    """An error at ``loc`` below the field being validated (pydantic nests a ValidationError raised
    inside a validator under that field's location): a section's cross-field check can then name
    the exact sub-field, e.g. ``transfer.corpus.path`` from a validator of ``transfer.corpus``."""
    return ValidationError.from_exception_data(kind, [{"type": _fail(kind, message), "loc": loc, "input": value}])


def _valid(info: ValidationInfo, *names: str) -> Optional[tuple]:
    """The already-validated values of earlier fields of the same model, or None when one of them
    failed (its own error is reported; a check depending on it would only add noise).

    Cross-field checks are field validators that read earlier fields through ``info.data`` rather
    than ``mode='after'`` model validators, because pydantic skips a model validator as soon as any
    field fails: with field validators every problem is reported at once, each at its field path.
    """
    if not all(n in info.data for n in names):
        return None
    return tuple(info.data[n] for n in names)


def read_model_config(path: Path) -> dict:
    """The ``config.json`` of a Hugging Face model directory, or a clear error."""
    cfg_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise _fail("missing_dir", f"directory {str(path)!r} does not exist; point it at a local Hugging Face "
                                   "model directory (download hub models first, e.g. `hf download NAME --local-dir DIR`)")
    if not cfg_file.is_file():
        raise _fail("not_a_model", f"{str(path)!r} has no config.json; it is not a Hugging Face model directory "
                                   "(save one with `model.save_pretrained(DIR)`)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise _fail("bad_model_config", f"{cfg_file} is not valid JSON ({e}); re-save the model") from e


# --------------------------------------------------------------------------------------------
# teachers


class TeacherConfig(_Section):
    """One fine-tuned teacher: a local ``AutoModelForSequenceClassification`` directory."""

    name: Annotated[str, Field(pattern=_NAME, description="short id used in the transfer set and logs")]
    path: Path = Field(description="local HF model directory with config.json (id2label) and tokenizer files")
    trust_remote_code: bool = Field(False, description="allow the directory's own modelling code; off by default")
    max_length: int = Field(128, ge=8, le=8192, description="teacher tokenizer truncation length")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU")

    @field_validator("path")
    @classmethod
    def _teacher_dir(cls, path: Path, info: ValidationInfo) -> Path:
        if not _check_paths(info):
            return path
        cfg = read_model_config(path)
        id2label = cfg.get("id2label")
        if not id2label:
            raise _fail("no_id2label", f"{path}/config.json has no id2label; a teacher must name its classes: set "
                                       "model.config.id2label = {0: 'name', ...} and save_pretrained again")
        try:
            labels = ordered_labels(id2label)
        except ValueError as e:
            raise _fail("bad_id2label", f"{path}/config.json: {e}") from e
        if all(lbl.upper().startswith("LABEL_") for lbl in labels):
            raise _fail("generic_id2label", f"{path}/config.json id2label only has placeholder names {labels}; "
                                            "give the classes their real names so teachers' labels can be merged")
        clashes = label_clashes(labels)
        if clashes:
            a, b = clashes[0]
            raise _fail("label_clash", f"labels {a!r} and {b!r} in {path}/config.json are the same label after "
                                       "normalisation (case, spaces, '_' and '-' are ignored); rename one")
        return path


# --------------------------------------------------------------------------------------------
# transfer set and its sources


class RandomWordsConfig(_Section):
    """StrataNet Table 3 baseline 'R': texts of random words from a teacher's vocabulary."""

    min_words: int = Field(8, ge=1, le=4096)
    max_words: int = Field(48, ge=1, le=4096)

    @field_validator("max_words")
    @classmethod
    def _order(cls, max_words: int, info: ValidationInfo) -> int:
        earlier = _valid(info, "min_words")
        if earlier and earlier[0] > max_words:
            raise ValueError(f"min_words ({earlier[0]}) must be <= max_words ({max_words})")
        return max_words


class CorpusConfig(_Section):
    """StrataNet Table 3 baseline 'CD': cross-domain documents from a text file.

    One document per line; ``.txt``, ``.txt.gz``, ``.txt.xz`` and ``.txt.bz2`` are read.
    """

    path: Optional[Path] = Field(None, description="text file, one document per line")
    max_words: int = Field(128, ge=1, le=100_000, description="documents are cut to this many words")
    min_words: int = Field(4, ge=1, description="shorter lines are skipped")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if path is not None and _check_paths(info) and not path.is_file():
            raise _fail("missing_file", f"corpus file {str(path)!r} does not exist; give a text file with one document per line")
        return path


def vllm_engine_problem() -> str:
    """Why ``transfer.steered.engine: vllm`` cannot run on this machine, or '' when it can (vLLM
    importable and a CUDA GPU visible). Cheap: vLLM is looked up, not imported; torch is imported
    only when vLLM is there, to ask for CUDA."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ("transfer.steered.engine=vllm needs vLLM, which is not installed here: on a GPU node run "
                "pip install 'dfkd-ray[vllm]' (vLLM's wheels are CUDA builds), or set transfer.steered.engine=hf")
    import torch

    if not torch.cuda.is_available():
        return ("transfer.steered.engine=vllm needs a CUDA GPU and none is visible here: run on a GPU node with "
                "pip install 'dfkd-ray[vllm]', or set transfer.steered.engine=hf")
    return ""


class SteeredConfig(_Section):
    """StrataNet section 4.2: a base LM whose top-m next tokens a teacher reweights (Eq. 1)."""

    engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers (CPU reference, any GPU); vllm: a vLLM logits "
                                                          "processor, GPU nodes with pip install 'dfkd-ray[vllm]'")
    lm_path: Optional[Path] = Field(None, description="local causal-LM directory (the base PLM)")
    control_strength: float = Field(
        8.0, ge=0.0, le=1000.0,
        description="lambda in Eq. 1; 0 = plain LM sampling. Depends on the LM and teachers: choose it by the student "
                    "on development rows, not by how on-class the text is (AG News with the class prompt: 32 best; 64 "
                    "wrote more on-class text but broke the confidence calibration; benchmarks/RESULTS.md, session 11)")
    lambda_schedule: Literal["constant", "decay"] = Field(
        "constant", description="decay: lambda_t = lambda * max(lambda_floor, decay_rate**t), stronger early (Gu et al. 2022)")
    decay_rate: float = Field(0.97, gt=0.0, le=1.0)
    lambda_floor: float = Field(0.25, ge=0.0, le=1.0)
    top_m: int = Field(50, ge=1, le=1_000_000, description="candidates the teacher scores per step")
    top_k: int = Field(50, ge=1, description="sampled from the reweighted top-m; must be <= top_m")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus threshold after reweighting (paper appendix: 0.9)")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    max_new_tokens: int = Field(64, ge=1, le=8192)
    min_new_tokens: int = Field(8, ge=0, le=8192)
    prompt: str = Field("", description="prefix template; '{label}' becomes the target class name, e.g. 'Category: {label}'")
    keep_prompt: bool = Field(False, description="false: the teacher scores and the set keeps only the continuation "
                                                 "(a prompt naming the class would hand the student its label)")
    batch_size: int = Field(32, ge=1, le=65536, description="requests decoded together by one engine")
    teacher_chunk_tokens: int = Field(262_144, ge=1, description="padded teacher tokens per forward; bounds memory "
                                                                 "(candidates are sorted by length before chunking)")
    teacher_batching: Literal["padded", "uniform"] = Field(
        "padded", description="padded: length-sorted, padded chunks (measured faster on an H100); uniform: "
                              "candidates of one length share an unpadded, unmasked forward when enough of them do")
    sdpa: AttentionKernels = Field(
        "no_cudnn", description="attention kernels for teacher scoring and the hf engine's LM; no_cudnn: flash, "
                                "memory-efficient or math (cuDNN's builds a plan per new input shape, ms to tens of ms "
                                "each on an H100, and decoding rarely repeats a shape); any: torch's own choice. Picks "
                                "kernels, not content: not part of the transfer set's fingerprint")
    decode_parts: int = Field(
        1, ge=1, le=64, description="each batch decodes as this many interleaved parts, each on its own CUDA stream, so "
                                    "one part's host work and LM step run while another's teacher forwards do. Measured "
                                    "on an H100 (benchmarks/RESULTS.md): 2 parts tied with 1 at 256 rows and lost at 64 "
                                    "(smaller, more padded teacher forwards), hence 1. Schedules work, not content: not "
                                    "part of the transfer set's fingerprint")
    token_map: Literal["auto", "exact"] = Field(
        "auto", description="auto: incremental cross-tokenizer ids, exact path when it cannot be proven exact; "
                            "exact: re-tokenize every candidate's full text (slow reference)")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="LM dtype; auto: bfloat16 on GPU, float32 on CPU; float64 for a reference run")

    @field_validator("lm_path")
    @classmethod
    def _lm_dir(cls, path: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if path is not None and _check_paths(info):
            read_model_config(path)
        return path

    @field_validator("engine")
    @classmethod
    def _engine_here(cls, engine: str, info: ValidationInfo) -> str:
        # Checked where the job starts, unless it was submitted to a cluster (RAY_ADDRESS set): a
        # CPU head node lacks vLLM and GPUs by design; the generation actors check again there.
        local = _check_paths(info) and not os.environ.get("RAY_ADDRESS")
        problem = vllm_engine_problem() if engine == "vllm" and local else ""
        if problem:
            raise _fail("engine_unavailable", problem)
        return engine

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, top_k: int, info: ValidationInfo) -> int:
        earlier = _valid(info, "top_m")
        if earlier and top_k > earlier[0]:
            raise ValueError(f"top_k ({top_k}) must be <= top_m ({earlier[0]}): top-k samples among the teacher-scored top-m")
        return top_k

    @field_validator("min_new_tokens")
    @classmethod
    def _min_new(cls, min_new: int, info: ValidationInfo) -> int:
        earlier = _valid(info, "max_new_tokens")
        if earlier and min_new > earlier[0]:
            raise ValueError(f"min_new_tokens ({min_new}) must be <= max_new_tokens ({earlier[0]})")
        return min_new


SourceName = Literal["random_words", "corpus", "steered", "prompt_tuned", "embedding_guessing"]
IMPLEMENTED_SOURCES = ("random_words", "corpus", "steered")
"""Sources with an implementation in :mod:`dfkd_ray.transfer.sources`; others are planned."""


class TransferConfig(_Section):
    """The transfer set: which source writes it, how many samples per class, filters, sharding."""

    source: SourceName = Field(description="which transfer source writes the set; see IMPLEMENTED_SOURCES")
    samples_per_class: int = Field(200, ge=1, le=10_000_000, description="requests per (teacher, class)")
    class_weights: dict[str, float] = Field(
        default_factory=dict, description="label name -> multiplier of samples_per_class (default 1.0 each)")
    shard_size: int = Field(256, ge=1, le=10_000_000, description="requests per Parquet shard")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="drop rows whose teacher confidence is below")
    max_attempts: int = Field(3, ge=1, le=100, description="tries per request (new seed each) before a rejected "
                                                          "request is given up; rejects are reported by reason")
    dedup: Literal["none", "exact", "near"] = Field("exact", description="exact: same normalised text; near: also MinHash "
                                                                          "Jaccard of word 3-grams >= near_duplicate_threshold")
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Jaccard of word 3-grams, with dedup=near")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of each teacher's rows kept for confidence statistics")
    random_words: RandomWordsConfig = RandomWordsConfig()
    corpus: CorpusConfig = CorpusConfig()
    steered: SteeredConfig = SteeredConfig()

    @field_validator("source")
    @classmethod
    def _implemented(cls, source: str) -> str:
        if source not in IMPLEMENTED_SOURCES:
            raise _fail("not_implemented", f"transfer source {source!r} is not implemented yet; "
                                           f"choose one of {list(IMPLEMENTED_SOURCES)}")
        return source

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, w: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        bad = {k: v for k, v in w.items() if not (v >= 0)}
        if bad:
            raise ValueError(f"class weights must be >= 0, got {bad}")
        # Published by JobConfig's teachers validator (teachers come before transfer), only when
        # every teacher directory validated: an incomplete label set would flag real labels.
        names = (info.context or {}).get(_TEACHER_LABELS)
        if names is not None:
            known = {normalize_label(n) for n in names}
            unknown = [k for k in w if normalize_label(k) not in known]
            if unknown:
                raise _fail("unknown_label", f"names labels no teacher has: {unknown}; known: {names}")
        return w

    @field_validator("corpus")
    @classmethod
    def _corpus_ready(cls, corpus: CorpusConfig, info: ValidationInfo) -> CorpusConfig:
        if _valid(info, "source") == ("corpus",) and corpus.path is None:
            raise _fail_at(("path",), "missing_corpus",
                           "source 'corpus' needs transfer.corpus.path (a text file, one document per line)")
        return corpus

    @field_validator("steered")
    @classmethod
    def _steered_ready(cls, steered: SteeredConfig, info: ValidationInfo) -> SteeredConfig:
        if _valid(info, "source") == ("steered",) and steered.lm_path is None:
            raise _fail_at(("lm_path",), "missing_lm",
                           "source 'steered' needs transfer.steered.lm_path (a local causal-LM directory)")
        return steered


# --------------------------------------------------------------------------------------------
# amalgamation, student, training, evaluation, tune, resources, output


class AmalgamationConfig(_Section):
    """StrataNet sections 4.3-5: confidence estimation, block fusion and the loss weights (Eq. 8).

    ``method: vanilla`` is the papers' baseline: KL to one softmax over the concatenated teacher
    logits, no confidence statistics, no block loss (``alpha``, ``fusion`` and ``confidence`` unused).
    """

    method: Literal["stratanet", "vanilla"] = Field(
        "stratanet", description="stratanet: confidence-weighted KD + block loss; vanilla: KL to concatenated teachers")

    confidence: Literal["rmd", "md", "msp"] = Field("rmd", description="rmd (Ren et al. 2021), md, or max softmax probability")
    fusion: Literal["st", "mul", "no_st"] = Field("st", description="st: Selective Transformer; mul and no_st: paper ablations")
    shrinkage: float = Field(0.1, ge=0.0, le=1.0, description="covariance shrinkage toward a scaled identity (few samples, wide features)")
    amalg_dim: int = Field(256, ge=8, le=8192, description="width of the amalgamated block space")
    amalg_heads: int = Field(4, ge=1, le=64)
    alpha: float = Field(1.0, ge=0.0, description="weight of the block L2 loss (the paper gives no value; on AG News "
                                                   "0.3, 1 and 3 tied within the seed spread: benchmarks/RESULTS.md, session 9)")
    beta: float = Field(1.0, ge=0.0, description="weight of the KL loss")
    temperature: float = Field(0.75, gt=0.0, le=100.0, description="KD temperature (paper appendix: 0.75)")
    confidence_transform: Literal["logistic", "ecdf"] = Field(
        "logistic", description="OOD score -> confidence in [0, 1], calibrated on held-out in-distribution scores: "
                                "logistic centred at confidence_center, or ecdf (conformal p-value)")
    confidence_center: Literal["quantile", "moments"] = Field(
        "quantile",
        description="logistic only: the held-out in-distribution score that maps to confidence 0.5, which sets the "
                    "offset between teachers on text beyond their pseudo-data. quantile: the empirical "
                    "confidence_quantile; moments: mean + confidence_center_sd standard deviations (steadier across "
                    "fold seeds and a better KD target on AG News development rows, but a worse student there: "
                    "80.8% vs 81.2%; benchmarks/RESULTS.md, session 10)")
    confidence_center_sd: float = Field(
        4.0, gt=0.0, le=100.0,
        description="confidence_center moments only: z in mean + z sd (Cantelli: at most 1/(1+z^2) of "
                    "in-distribution scores lie beyond). 4 and 4.5 tied for the AG News student (6: 78.0%)")
    confidence_quantile: float = Field(
        0.995, gt=0.0, lt=1.0,
        description="confidence_center quantile: the held-out score quantile that maps to confidence 0.5. 0.995: "
                    "chosen on AG News development rows (benchmarks/RESULTS.md, session 8; 0.95 before)")
    rmd_background: Literal["all_teachers", "own"] = Field(
        "all_teachers",
        description="rmd only: fit teacher k's background Gaussian (MD_0, Eq. 3) on its features of every teacher's "
                    "held-out pseudo-data (all_teachers: the text the student sees) or of its own only (own: Ren "
                    "et al.'s literal definition)")
    kd_confidence_power: float = Field(
        64.0, ge=0.0, le=1000.0,
        description="gamma of the KD teacher weights c_k^gamma / sum_j c_j^gamma (last-block confidences; the paper "
                    "says only 'confidence weighted'): 1 = proportional, larger = the more in-domain teacher "
                    "dominates the target, 0 = uniform. 64: chosen from 8, 16, 64, 1000 by the AG News student's "
                    "accuracy on development rows (82.4% vs 79.7% at 8 and 78.9% at 1000; benchmarks/RESULTS.md, "
                    "session 8)")
    calibration_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="calibration_folds 0 only: share of each teacher's "
                                                                           "held-out pseudo-data that calibrates the transform; the rest fits the Gaussians")
    calibration_folds: int = Field(
        5, ge=0, le=100, description="rmd/md: calibrate on cross-fitted scores of every held-out sample (F folds; the "
                                     "Gaussians are then fitted on all of them); 0 = one random calibration_fraction split")

    @field_validator("calibration_folds")
    @classmethod
    def _folds(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("calibration_folds 1 leaves nothing to fit on: use >= 2 folds (cross-fitting) or 0 "
                             "(one calibration_fraction split)")
        return folds

    calibration_repeats: int = Field(
        1, ge=1, le=100,
        description="rmd/md with calibration_folds >= 2 (unused with 0): repeat the cross-fitting with this many "
                    "fold splits and calibrate on all their out-of-fit scores. Steadies a moments centre; an extreme "
                    "quantile of the pooled scores is worse than of one split's (AG News: KD target 75.2% vs 81.3%)")

    share_st_layer: bool = Field(False, description="one ST-amalg Transformer layer for all blocks (default: one per block)")
    amalg_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout inside the ST-amalg Transformer layer")
    center_block_loss: bool = Field(
        True, description="Eq. 7 on batch-centred vectors (not in the paper): the targets share a large common "
                          "component, and matching it by an input-independent shift of the student's embeddings "
                          "washed out word identity in our runs (KD stalled at chance with alpha >= 0.1)")
    train_fusion: bool = Field(
        True, description="true (the paper): ST-amalg learns through the block loss; false: its targets are a fixed, "
                          "randomly initialised confidence-gated function of the teacher features")

    @field_validator("amalg_heads")
    @classmethod
    def _heads(cls, heads: int, info: ValidationInfo) -> int:
        earlier = _valid(info, "amalg_dim")
        if earlier and earlier[0] % heads:
            raise ValueError(f"amalg_dim ({earlier[0]}) must be divisible by amalg_heads ({heads})")
        return heads

    @field_validator("beta")
    @classmethod
    def _some_loss(cls, beta: float, info: ValidationInfo) -> float:
        if _valid(info, "alpha") == (0,) and beta == 0:
            raise ValueError("alpha and beta are both 0: nothing would be learned; set beta > 0 (KL) and/or alpha > 0 (blocks)")
        return beta


class StudentConfig(_Section):
    """The compact student: a pretrained encoder directory, optionally with a subset of its layers."""

    path: Optional[Path] = Field(None, description="local HF encoder directory the student starts from")
    layers: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, description="which layers to keep, e.g. [0, 2, 4]")
    num_layers: Optional[int] = Field(None, ge=1, le=256, description="keep this many layers, evenly spaced")
    max_length: int = Field(128, ge=8, le=8192)
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="classifier dropout (paper appendix: 0.2)")

    @field_validator("path")
    @classmethod
    def _student_dir(cls, path: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if path is not None and _check_paths(info):
            read_model_config(path)
        return path

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: Optional[list[int]]) -> Optional[list[int]]:
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ValueError(f"layers must be a non-empty list of distinct layer indices, got {layers}")
        return layers

    @field_validator("num_layers")
    @classmethod
    def _one_of(cls, num_layers: Optional[int], info: ValidationInfo) -> Optional[int]:
        earlier = _valid(info, "layers")
        if num_layers is not None and earlier and earlier[0] is not None:
            raise ValueError("set either layers or num_layers, not both")
        return num_layers


class TrainConfig(_Section):
    """Distillation schedule; defaults are StrataNet's appendix (Table 4)."""

    learning_rate: float = Field(2e-5, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1, le=65536, description="per worker")
    epochs: float = Field(10, gt=0.0, le=10_000)
    warmup_epochs: float = Field(2, ge=0.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    report_every_steps: int = Field(20, ge=1)
    checkpoint_every_steps: int = Field(200, ge=1)
    max_failures: int = Field(3, ge=0, description="worker failures Ray Train recovers from (from the last checkpoint)")
    shuffle_buffer: int = Field(1000, ge=0, description="rows in each worker's local shuffle buffer (0: no shuffle)")
    include_heldout: bool = Field(False, description="also train on the held-out rows that fit the confidence statistics")
    sdpa: AttentionKernels = Field(
        "no_cudnn", description="attention kernels of each distillation step (teachers, student, backward); no_cudnn: "
                                "flash, memory-efficient or math (cuDNN's builds a plan per new batch width: half the "
                                "host time of a profiled step on an H100, though a whole AG News row took about as long "
                                "either way); any: torch's own choice. Picks kernels, not results")
    stream_from_generation: bool = Field(
        False, description="jobs/amalgamate.py: train the first epoch on rows as the generator actors make them "
                           "(the held-out rows are made first, for the confidence statistics); later epochs read the "
                           "finished Parquet set. For when generation is long and the trainers would sit idle")

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup(cls, warmup: float, info: ValidationInfo) -> float:
        earlier = _valid(info, "epochs")
        if earlier and warmup > earlier[0]:
            raise ValueError(f"warmup_epochs ({warmup}) must be <= epochs ({earlier[0]})")
        return warmup


class EvalConfig(_Section):
    """A labelled file (CSV, JSONL or Parquet) scored after training; never used for training."""

    path: Optional[Path] = None
    text_column: str = "text"
    label_column: str = "label"
    label_map: dict[str, str] = Field(default_factory=dict, description="raw label value -> label name, e.g. {'1': 'World'}")
    batch_size: int = Field(64, ge=1)

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if path is not None and _check_paths(info):
            if not path.is_file():
                raise _fail("missing_file", f"eval file {str(path)!r} does not exist")
            if not any(str(path).endswith(s) for s in (".csv", ".jsonl", ".json", ".parquet", ".tsv")):
                raise _fail("bad_format", f"eval file {str(path)!r} must be .csv, .tsv, .jsonl or .parquet")
        return path


class SearchDim(_Section):
    """One dimension of a Tune search space: a grid of values or a range."""

    values: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False

    @model_validator(mode="after")
    def _one(self) -> "SearchDim":
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError("give either values: [...] or both low and high")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("log-uniform ranges need low > 0")
        return self


def _search_key(key: str) -> str:
    if not _is_field_path(key):
        raise _fail("unknown_field", f"search-space key {key!r} is not a config field "
                                     "(e.g. 'transfer.steered.control_strength')")
    return key


class TuneConfig(_Section):
    """Ray Tune sweep over dotted config keys (e.g. ``transfer.steered.control_strength``)."""

    # Keys are validated as dict keys: reported at tune.search_space.<key>, together with its value's errors.
    search_space: dict[Annotated[str, AfterValidator(_search_key)], SearchDim] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    metric: str = "eval_accuracy"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(1, ge=1)


class RayConfig(_Section):
    """Where the job runs and how much of the cluster each stage takes."""

    address: Optional[str] = Field(None, description="None: local Ray, or the cluster under `ray job submit`")
    num_generation_actors: int = Field(1, ge=1)
    gpus_per_generation_actor: float = Field(0.0, ge=0.0, le=8.0, description="fractional allowed")
    cpus_per_generation_actor: float = Field(1.0, gt=0.0)
    num_train_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_train_worker: float = Field(1.0, gt=0.0)


class OutputConfig(_Section):
    dir: Path = Field(description="everything the job writes lands here; one job per directory")


# --------------------------------------------------------------------------------------------
# the job


class JobConfig(_Section):
    """A whole job: teachers -> transfer set -> amalgamation -> student -> evaluation -> export."""

    name: Annotated[str, Field(pattern=_NAME)]
    seed: int = Field(0, ge=0, le=2**31 - 1)
    teachers: list[TeacherConfig] = Field(min_length=1)
    transfer: TransferConfig
    amalgamation: AmalgamationConfig = AmalgamationConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig
    demo: Optional[Path] = Field(None, description="smoke presets only: build the offline synthetic demo task "
                                                   "(teachers, LM, student, corpus, eval file) here on first use")

    # Checks across sections are field validators too (not a model validator, which pydantic skips
    # once any field fails), so they are reported together with every field error.

    @field_validator("teachers")
    @classmethod
    def _unique(cls, teachers: list[TeacherConfig], info: ValidationInfo) -> list[TeacherConfig]:
        seen: set[str] = set()
        for i, t in enumerate(teachers):
            if t.name in seen:
                raise _fail_at((i, "name"), "duplicate_teacher",
                               f"teacher names must be unique, {t.name!r} repeats; rename one", t.name)
            seen.add(t.name)
        if _check_paths(info) and info.context is not None:
            labels = {t.name: ordered_labels(read_model_config(t.path)["id2label"]) for t in teachers}
            info.context[_TEACHER_LABELS] = sorted({n for names in labels.values() for n in names})
        return teachers

    @field_validator("train")
    @classmethod
    def _stream_needs_heldout(cls, train: TrainConfig, info: ValidationInfo) -> TrainConfig:
        earlier = _valid(info, "transfer", "amalgamation")
        if (earlier and train.stream_from_generation and earlier[1].method == "stratanet"
                and earlier[0].heldout_fraction == 0):
            raise _fail_at(("stream_from_generation",), "stream_without_heldout",
                           "train.stream_from_generation with amalgamation.method stratanet fits the confidence "
                           "statistics on held-out rows made before training starts, and transfer.heldout_fraction "
                           "is 0: set transfer.heldout_fraction > 0 (e.g. 0.1), or amalgamation.method: vanilla",
                           True)
        return train

    @field_validator("output")
    @classmethod
    def _own_output_dir(cls, output: OutputConfig, info: ValidationInfo) -> OutputConfig:
        marker = output.dir / JOB_MARKER
        earlier = _valid(info, "name")
        if earlier and _check_paths(info) and marker.is_file():
            try:
                owner = json.loads(marker.read_text()).get("name")
            except json.JSONDecodeError:
                owner = "<unreadable>"
            if owner != earlier[0]:
                raise _fail_at(("dir",), "foreign_output_dir",
                               f"{str(output.dir)!r} holds the results of job {owner!r}; give job {earlier[0]!r} "
                               "its own output.dir (nothing there was touched)")
        return output

    def teacher_labels(self) -> dict[str, list[str]]:
        """Each teacher's class names in id order, read from its config.json."""
        return {t.name: ordered_labels(read_model_config(t.path)["id2label"]) for t in self.teachers}

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def absolute(self) -> "JobConfig":
        """The same config with every path made absolute against the current directory.

        Ray Train workers run in their own directories, and a cluster's workers on other nodes: the
        driver resolves relative paths once, before handing the config to any of them.
        """
        def walk(obj):
            if isinstance(obj, BaseModel):
                return obj.model_copy(update={k: walk(getattr(obj, k)) for k in type(obj).model_fields})
            if isinstance(obj, Path):
                return obj.expanduser().absolute()
            if isinstance(obj, list):
                return [walk(x) for x in obj]
            return obj

        return walk(self)

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named top-level sections (all when none), for stage outputs."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# loading, overrides and error reporting


class ConfigError(ValueError):
    """Every problem found in a config, each as ``(field path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in {source}:"] + [f"  - {p}: {m}" for p, m in problems]
        super().__init__("\n".join(lines))


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...], list[...], dict[str, ...], Annotated[...]."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (list, tuple):
        return _unwrap(typing.get_args(annotation)[0])
    if origin is dict:
        return _unwrap(typing.get_args(annotation)[1])
    if origin is not None:  # Union / Optional
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                found = _unwrap(arg)
                if isinstance(found, type) and issubclass(found, BaseModel):
                    return found
    return annotation


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(part)
        if field is None:
            # dict keys (e.g. tune.search_space.<key>) keep the value model
            continue
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _is_field_path(dotted: str) -> bool:
    model: Any = JobConfig
    for part in dotted.split("."):
        if part.isdigit():
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = _unwrap(model.model_fields[part].annotation)
    return True


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # a dict key's own error (tune.search_space.<key>)
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


_PYDANTIC_ERRORS = set(typing.get_args(core_schema.ErrorType)) - {"value_error", "assertion_error"}
"""pydantic's own error kinds, whose messages do not show the offending value; ours do."""


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            msg = f"unknown key {str(loc[-1])!r}" + (f"; did you mean {near[0]!r}?" if near else "") + \
                  (f" Valid keys: {', '.join(valid)}" if valid else "")
        elif e["type"] == "missing":
            msg = "required field is missing; add it"
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{msg}, got {e.get('input')!r}"
        elif e["type"] in _PYDANTIC_ERRORS and isinstance(e.get("input"), (str, int, float, bool)) and "got" not in msg:
            msg = f"{msg} (got {e['input']!r})"
        problems.append((_format_loc(loc), msg))
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b.c=value'`` -> (['a','b','c'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([(text, "override must look like section.key=value")], "overrides")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([(key, "empty key segment in override")], "overrides")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([(key, f"value {raw!r} is not valid YAML: {e}")], "overrides") from e
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data, default=str))  # deep copy, plain types
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError([(".".join(parts[:i + 1]), f"no list element {part} (the list has {len(node)})")],
                                      "overrides")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError([(".".join(parts[:i + 1]), "is a value, not a section")], "overrides")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError([(".".join(parts), f"no list element {last} (the list has {len(node)})")], "overrides")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _resolve_paths(data: Any, base: Path) -> Any:
    """Relative ``path``/``dir``/``lm_path`` values in the YAML are relative to the working directory
    (where ``ray job submit --working-dir .`` runs); ``~`` and ``$VARS`` are expanded."""
    if isinstance(data, dict):
        return {k: (os.path.expandvars(os.path.expanduser(v)) if isinstance(v, str) and k in ("path", "dir", "lm_path") else _resolve_paths(v, base))
                for k, v in data.items()}
    if isinstance(data, list):
        return [_resolve_paths(v, base) for v in data]
    return data


def validate_config(data: dict, *, check_paths: bool = True, source: str = "config") -> JobConfig:
    """Validate a plain dict; raise :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([("<root>", f"a config must be a mapping of sections, got {type(data).__name__}")], source)
    try:
        return JobConfig.model_validate(_resolve_paths(data, Path.cwd()), context={"check_paths": check_paths})
    except ValidationError as e:
        raise ConfigError(_problems(e), source) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True) -> JobConfig:
    """Load a YAML config, apply ``section.key=value`` overrides and validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("--config", f"file {str(path)!r} does not exist")], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([("<yaml>", f"not valid YAML: {e}")], str(path)) from None
    data = apply_overrides(data, list(overrides))
    if check_paths and isinstance(data, dict) and isinstance(data.get("demo"), str):
        from dfkd_ray.synthetic import build_synthetic_task

        build_synthetic_task(data["demo"])  # cached: a no-op once built
    return validate_config(data, check_paths=check_paths, source=str(path))


def parse_job_args(description: str, argv: list[str] | None = None) -> JobConfig:
    """The command line every job script takes: ``--config YAML`` and ``section.key=value`` overrides.

    A bad config prints every problem (field path and fix) and exits with status 2, before Ray starts.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


def claim_output_dir(cfg: JobConfig) -> Path:
    """Create ``output.dir`` and record that this job owns it (idempotent for the same job)."""
    out = cfg.output.dir
    out.mkdir(parents=True, exist_ok=True)
    marker = out / JOB_MARKER
    if marker.is_file():
        owner = json.loads(marker.read_text()).get("name")
        if owner != cfg.name:
            raise ConfigError([("output.dir", f"{out} holds the results of job {owner!r}")])
    else:
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": cfg.name}, indent=2))
        os.replace(tmp, marker)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out
