"""The sections of a job's config: every field with its type, range and default, and the rules
that relate fields to each other.

Single-field limits are pydantic constraints (``Field(ge=...)``, ``Literal``, an
``AfterValidator`` in the field's type). A rule between fields is declared with :func:`rule`; it
runs as a field validator of the field it reports at, so it is reported together with every other
problem, at its exact path. Nothing here reads the filesystem (see :mod:`dfkd_ray.preflight`).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
# Attention kernels of a stage (dfkd_ray.models.kernels.attention_kernels): without cuDNN, or torch's choice.
AttentionKernels = Literal["no_cudnn", "any"]
Precision = Literal["auto", "float32", "bfloat16"]
MatmulPrecision = Literal["highest", "high"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def rule(field: str, *reads: str) -> Callable:
    """Declare a rule between fields of one section, reported at ``field`` or below it.

    The decorated ``check(value, *values_of_reads)`` returns None when the rule holds, else the
    problem: a message for ``field`` itself, or ``(loc, message)`` for a place below it, e.g.
    ``(("path",), ...)`` from a rule on ``transfer.corpus`` reports at ``transfer.corpus.path``.
    ``reads`` are fields declared before ``field``; the rule runs only when all of them validated
    (a failed one reports its own problem). It runs as a field validator, not a model validator,
    because pydantic skips model validators once any field fails: this way every problem of a
    config is reported at once.
    """
    def decorate(check: Callable) -> Any:
        def validate(cls, value, info: ValidationInfo):
            if all(name in info.data for name in reads):
                problem = check(value, *(info.data[name] for name in reads))
                if problem:
                    loc, message = problem if isinstance(problem, tuple) else ((), problem)
                    raise ValidationError.from_exception_data(
                        "rule", [{"type": PydanticCustomError("rule", message), "loc": loc, "input": value}])
            return value

        return field_validator(field)(classmethod(validate))

    return decorate


def section_type(annotation: Any) -> Optional[type[BaseModel]]:
    """The section model a field holds: itself, or inside ``Optional``, ``list`` or ``dict``."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


# --------------------------------------------------------------------------------------------
# teachers


class TeacherConfig(_Section):
    """One fine-tuned teacher: a local ``AutoModelForSequenceClassification`` directory."""

    name: Annotated[str, Field(pattern=_NAME, description="short id used in the transfer set and logs")]
    path: Path = Field(description="local HF model directory with config.json (id2label) and tokenizer files")
    labels: Optional[list[str]] = Field(
        None, min_length=1, description="class names in id order; filled from the directory's config.json id2label "
                                        "by the preflight, or given and then checked against it")
    trust_remote_code: bool = Field(False, description="allow the directory's own modelling code; off by default")
    max_length: int = Field(128, ge=8, le=8192, description="teacher tokenizer truncation length")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU")


# --------------------------------------------------------------------------------------------
# transfer set and its sources


class RandomWordsConfig(_Section):
    """StrataNet Table 3 baseline 'R': texts of random words from a teacher's vocabulary."""

    min_words: int = Field(8, ge=1, le=4096, description="fewest words in a text")
    max_words: int = Field(48, ge=1, le=4096, description="most words in a text")

    @rule("max_words", "min_words")
    def _words_in_order(max_words, min_words):
        if min_words > max_words:
            return f"min_words ({min_words}) must be <= max_words ({max_words})"


def _known_encoding(name: str) -> str:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown text encoding {name!r}; use a Python codec name such as utf-8, latin-1 "
                         "or cp1252") from None
    return name


class CorpusConfig(_Section):
    """StrataNet Table 3 baseline 'CD': cross-domain documents from a text file.

    One document per line; ``.txt``, ``.txt.gz``, ``.txt.xz`` and ``.txt.bz2`` are read.
    """

    path: Optional[Path] = Field(None, description="text file, one document per line")
    max_words: int = Field(128, ge=1, le=100_000, description="documents are cut to this many words")
    min_words: int = Field(4, ge=1, description="shorter lines are skipped")
    encoding: Annotated[str, AfterValidator(_known_encoding)] = Field(
        "utf-8", description="the file's text encoding; read strictly: a byte that is not valid in it stops the job")


def _new_tokens_in_order(min_new: int, max_new: int) -> Optional[str]:
    """The rule of every generation section: no more tokens before EOS is allowed than in all."""
    if min_new > max_new:
        return f"min_new_tokens ({min_new}) must be <= max_new_tokens ({max_new})"


class SteeredConfig(_Section):
    """StrataNet section 4.2: a base LM whose top-m next tokens a teacher reweights (Eq. 1)."""

    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers (CPU or GPU); vllm: a vLLM logits processor on GPU nodes")
    lm_path: Optional[Path] = Field(None, description="local causal-LM directory (the base PLM)")
    control_strength: float = Field(
        8.0, ge=0.0, le=1000.0, description="lambda in Eq. 1 (0: plain LM sampling); choose it by the student's "
                                            "accuracy on development rows")
    lambda_schedule: Literal["constant", "decay"] = Field(
        "constant", description="decay: lambda_t = lambda * max(lambda_floor, decay_rate**t), stronger early")
    decay_rate: float = Field(0.97, gt=0.0, le=1.0, description="per-token factor of lambda_schedule decay")
    lambda_floor: float = Field(0.25, ge=0.0, le=1.0, description="lambda_schedule decay never goes below this "
                                                                  "share of lambda")
    top_m: int = Field(50, ge=1, le=1_000_000, description="candidates the teacher scores per step")
    candidate_mass: float = Field(
        1.0, gt=0.0, le=1.0, description="the teacher scores only the top-m candidates within the LM's nucleus of "
                                         "this probability mass (at least one); 1: all top_m (the paper's)")
    top_k: int = Field(50, ge=1, description="sampled from the reweighted top-m; must be <= top_m")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus threshold after reweighting")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="sampling temperature after reweighting")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="longest continuation, in LM tokens")
    min_new_tokens: int = Field(8, ge=0, le=8192, description="EOS is banned before this many new tokens")
    prompt: str = Field("", description="prefix template; '{label}' becomes the target class name")
    keep_prompt: bool = Field(False, description="keep the prompt in the text the teacher scores and the set stores")
    start_new_word: bool = Field(
        False, description="the first new token starts a new word: tokens that would continue the prompt's last "
                           "word ('Category: Plant' -> 'Plantation') are banned at the first step")
    batch_size: int = Field(32, ge=1, le=65536, description="requests decoded together by one engine")
    teacher_chunk_tokens: int = Field(262_144, ge=1, description="padded teacher tokens per forward; bounds memory")
    teacher_batching: Literal["padded", "uniform"] = Field(
        "padded", description="padded: length-sorted padded chunks; uniform: unpadded forwards per candidate length")
    sdpa: AttentionKernels = Field(
        "no_cudnn", description="attention kernels of teacher scoring and the hf LM; not part of the set's fingerprint")
    decode_parts: int = Field(
        1, ge=1, le=64, description="interleaved parts per batch, each on its own CUDA stream; not part of the "
                                    "set's fingerprint")
    token_map: Literal["auto", "exact"] = Field(
        "auto", description="auto: incremental cross-tokenizer ids; exact: re-tokenize every candidate (reference)")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="LM dtype; auto: bfloat16 on GPU, float32 on CPU")

    @rule("top_k", "top_m")
    def _top_k_within_top_m(top_k, top_m):
        if top_k > top_m:
            return f"top_k ({top_k}) must be <= top_m ({top_m}): top-k samples among the teacher-scored top-m"

    _min_within_max = rule("min_new_tokens", "max_new_tokens")(_new_tokens_in_order)


def _at_least_one_soft_token(p: int) -> int:
    if p < 1:
        raise ValueError(f"num_soft_tokens (P) is {p}: the hybrid prompt needs at least one trainable soft vector "
                         "per teacher and class; set transfer.prompt_tuned.num_soft_tokens >= 1 (e.g. 8)")
    return p


def _positive_stable_level(level: float) -> float:
    if not level > 0:
        raise ValueError(f"stable_level is {level}: it multiplies the LM's logits before each draw (1: plain "
                         "sampling, higher: closer to greedy), so it must be > 0; set it to 1, 5 or 10 as in DFKD-T3")
    return level


class PromptTunedConfig(_Section):
    """DFKD-T3: a frozen LM rewrites general-domain documents (``transfer.corpus``) into task text
    through a hybrid prompt -- a commander token and ``num_soft_tokens`` soft vectors per teacher and
    class, tuned against the teacher (specificity and diversity losses, Gumbel-softmax decoding)."""

    lm_path: Optional[Path] = Field(None, description="local causal-LM directory (the frozen generator)")
    commander: str = Field("summarize", min_length=1, description="the hard commander token that starts the "
                                                                   "hybrid prompt (DFKD-T3 Table 3: summarize, "
                                                                   "adapt, expand, paraphrase)")
    num_soft_tokens: Annotated[int, AfterValidator(_at_least_one_soft_token)] = Field(
        8, le=1024, description="P: trainable soft vectors per teacher and class")
    stable_level: Annotated[float, AfterValidator(_positive_stable_level)] = Field(
        1.0, le=1000.0, description="s: the LM's logits are multiplied by s before each Gumbel draw (1: plain "
                                    "sampling; higher: more deterministic, less diverse)")
    relaxation: Literal["soft", "straight_through"] = Field(
        "soft", description="what the teacher reads while tuning: soft, the Gumbel-softmax vectors (the LM "
                            "continues from the drawn token); straight_through, the one-hot draws with the soft "
                            "vectors' gradient, in the teacher and the LM")
    gumbel_temperature: float = Field(1.0, gt=0.0, le=100.0, description="tau of the Gumbel-softmax relaxation")
    specificity_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of the teacher cross-entropy "
                                                                          "toward the target class")
    diversity_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of log C - entropy of the "
                                                                        "batch-mean teacher prediction")
    tuning_steps: int = Field(200, ge=1, le=1_000_000, description="optimizer steps per teacher")
    tuning_batch_size: int = Field(16, ge=1, le=65536, description="generated texts per tuning step")
    learning_rate: float = Field(0.01, gt=0.0, le=100.0, description="Adam learning rate of the soft vectors")
    max_source_tokens: int = Field(64, ge=1, le=8192, description="a corpus document is cut to this many LM "
                                                                 "tokens before the commander")
    max_new_tokens: int = Field(32, ge=1, le=8192, description="longest rewrite, in LM tokens (tuning and "
                                                               "generation)")
    min_new_tokens: int = Field(4, ge=0, le=8192, description="EOS is banned before this many new tokens")
    batch_size: int = Field(32, ge=1, le=65536, description="requests generated together")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="LM dtype; auto: bfloat16 on GPU, float32 on CPU")

    _min_within_max = rule("min_new_tokens", "max_new_tokens")(_new_tokens_in_order)

    @rule("diversity_weight", "specificity_weight")
    def _some_tuning_loss(diversity, specificity):
        if diversity == 0 and specificity == 0:
            return ("specificity_weight and diversity_weight are both 0: the prompts would not be tuned; set "
                    "specificity_weight > 0")


class EmbeddingGuessingConfig(_Section):
    """AS-DFD (Ma et al. 2020): pseudo-embeddings crafted in the teachers' input-embedding space
    during training (Algorithm 1), no text. Defaults are the paper's (section 4.4, appendix A)."""

    mean: float = Field(0.0, ge=-100.0, le=100.0, description="mu of the Gaussian the pseudo-embeddings start from")
    sigma: float = Field(0.35, gt=0.0, le=100.0, description="sigma of that Gaussian (the paper's best of 0.05-1)")
    length: int = Field(128, ge=3, le=8192, description="l: positions of a pseudo-sample, [CLS] and [SEP] included")
    min_length: int = Field(8, ge=3, le=8192, description="shortest pseudo-sample after its random tail is masked")
    rounds: int = Field(5, ge=0, le=1000, description="n_iter construction rounds per batch (0: random Gaussian "
                                                      "embeddings, no construction)")
    teacher_steps: int = Field(5, ge=0, le=1000, description="n_T steps toward the target class per round (Eq. 2)")
    adversarial_steps: int = Field(1, ge=0, le=1000, description="n_S steps raising the student's L_MASK per round "
                                                                 "(Eq. 3)")
    learning_rate: float = Field(1e-2, gt=0.0, le=100.0, description="eta: Adam learning rate of the construction steps")
    pt_weight: float = Field(250.0, ge=0.0, le=1e6, description="alpha of Eq. 6: weight of L_PT, the [CLS] distance")

    @rule("min_length", "length")
    def _min_within_length(min_length, length):
        if min_length > length:
            return f"min_length ({min_length}) must be <= length ({length})"


SourceName = Literal["random_words", "corpus", "steered", "prompt_tuned", "embedding_guessing"]
"""The transfer sources: the text sources of :mod:`dfkd_ray.transfer.sources`, and ``embedding_guessing``,
which crafts pseudo-embeddings inside training (:mod:`dfkd_ray.train.embedding_guessing`)."""


def _non_negative(weights: dict[str, float]) -> dict[str, float]:
    bad = {k: v for k, v in weights.items() if not v >= 0}
    if bad:
        raise ValueError(f"class weights must be >= 0, got {bad}")
    return weights


class TransferConfig(_Section):
    """The transfer set: which source writes it, how many samples per class, filters, sharding."""

    source: SourceName = Field(description="which transfer source writes the set")
    samples_per_class: int = Field(200, ge=1, le=10_000_000, description="requests per (teacher, class)")
    class_weights: Annotated[dict[str, float], AfterValidator(_non_negative)] = Field(
        default_factory=dict, description="label name -> multiplier of samples_per_class (default 1.0 each)")
    shard_size: int = Field(256, ge=1, le=10_000_000, description="requests per Parquet shard (the unit of resume)")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="drop rows whose teacher confidence is below")
    max_attempts: int = Field(3, ge=1, le=100, description="tries per request (a new seed each) before it is given up")
    dedup: Literal["none", "exact", "near"] = Field(
        "exact", description="exact: same normalised text; near: also MinHash Jaccard >= near_duplicate_threshold")
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Jaccard of word 3-grams, with dedup=near")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of each teacher's rows kept for the "
                                                                     "confidence statistics")
    random_words: RandomWordsConfig = RandomWordsConfig()
    corpus: CorpusConfig = CorpusConfig()
    steered: SteeredConfig = SteeredConfig()
    prompt_tuned: PromptTunedConfig = PromptTunedConfig()
    embedding_guessing: EmbeddingGuessingConfig = EmbeddingGuessingConfig()

    @rule("corpus", "source")
    def _corpus_has_path(corpus, source):
        if source == "corpus" and corpus.path is None:
            return ("path",), "source 'corpus' needs transfer.corpus.path (a text file, one document per line)"

    @rule("steered", "source")
    def _steered_has_lm(steered, source):
        if source == "steered" and steered.lm_path is None:
            return ("lm_path",), "source 'steered' needs transfer.steered.lm_path (a local causal-LM directory)"

    @rule("corpus", "source")
    def _prompt_tuned_has_corpus(corpus, source):
        if source == "prompt_tuned" and corpus.path is None:
            return ("path",), ("source 'prompt_tuned' rewrites general-domain documents and needs transfer.corpus.path "
                               "(a text file, one document per line)")

    @rule("prompt_tuned", "source")
    def _prompt_tuned_has_lm(prompt_tuned, source):
        if source == "prompt_tuned" and prompt_tuned.lm_path is None:
            return ("lm_path",), "source 'prompt_tuned' needs transfer.prompt_tuned.lm_path (a local causal-LM directory)"


# --------------------------------------------------------------------------------------------
# amalgamation, student, training, evaluation, tune, resources, output


def _folds(folds: int) -> int:
    if folds == 1:
        raise ValueError("calibration_folds 1 leaves nothing to fit on: use >= 2 folds (cross-fitting) or 0 "
                         "(one calibration_fraction split)")
    return folds


class AmalgamationConfig(_Section):
    """StrataNet sections 4.3-5: confidence estimation, block fusion and the loss weights (Eq. 8).

    ``method: vanilla`` is the papers' baseline: KL to one softmax over the concatenated teacher
    logits, no confidence statistics, no block loss (``alpha``, ``fusion`` and ``confidence`` unused).
    """

    method: Literal["stratanet", "vanilla"] = Field(
        "stratanet", description="stratanet: confidence-weighted KD + block loss; vanilla: KL to concatenated teachers")
    confidence: Literal["rmd", "md", "msp"] = Field(
        "rmd", description="rmd: relative Mahalanobis distance (Ren et al. 2021); md: Mahalanobis; msp: max softmax")
    fusion: Literal["st", "mul", "no_st"] = Field("st", description="st: Selective Transformer; mul and no_st: "
                                                                    "the paper's ablations")
    shrinkage: float = Field(0.1, ge=0.0, le=1.0, description="covariance shrinkage toward a scaled identity")
    amalg_dim: int = Field(256, ge=8, le=8192, description="width of the amalgamated block space")
    amalg_heads: int = Field(4, ge=1, le=64, description="attention heads of the ST-amalg layer; must divide amalg_dim")
    alpha: float = Field(1.0, ge=0.0, description="weight of the block L2 loss (Eq. 8)")
    beta: float = Field(1.0, ge=0.0, description="weight of the KL loss (Eq. 8)")
    temperature: float = Field(0.75, gt=0.0, le=100.0, description="KD temperature")
    confidence_transform: Literal["logistic", "ecdf", "contrast"] = Field(
        "contrast", description="OOD score -> confidence: logistic centred at confidence_center, ecdf (p-value), or "
                                "contrast (placed between the teacher's own and the other teachers' pseudo-data; "
                                "one teacher: logistic)")
    contrast_sharpness: float = Field(8.0, gt=0.0, le=100.0, description="kappa of the contrast transform: "
                                                                       "confidence sigmoid(kappa/2) at the median of "
                                                                       "the teacher's own pseudo-data")
    separation_warning: float = Field(
        0.8, ge=0.5, le=1.0, description="the job warns when a teacher's last-block separation (AUROC of its own "
                                         "held-out pseudo-text against the other teachers', out of fit; contrast "
                                         "transform) is below this: its confidence may then follow the wrong teacher "
                                         "on real text")
    confidence_center: Literal["quantile", "moments"] = Field(
        "quantile", description="logistic centre: the confidence_quantile of held-out scores, or mean + "
                                "confidence_center_sd sd")
    confidence_center_sd: float = Field(4.0, gt=0.0, le=100.0, description="z of the moments centre mean + z sd")
    confidence_quantile: float = Field(0.995, gt=0.0, lt=1.0, description="held-out score quantile that maps to "
                                                                         "confidence 0.5")
    rmd_background: Literal["all_teachers", "own"] = Field(
        "all_teachers", description="rmd background Gaussian (Eq. 3) fitted on every teacher's held-out rows, or "
                                    "on its own only")
    kd_confidence_power: float = Field(
        64.0, ge=0.0, le=1000.0, description="gamma of the KD teacher weights c_k^gamma / sum_j c_j^gamma "
                                             "(0: uniform, 1: proportional)")
    one_class_confidence: Literal["elimination", "own"] = Field(
        "elimination", description="a teacher of one class (its softmax is 1 on every text, its rows unsteered): "
                                   "elimination, its own confidence times 1 - the largest confidence of the teachers "
                                   "of two or more classes (its class is what they do not claim); own: its own "
                                   "statistics alone, as every other teacher")
    kd_source_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="an ablation: share of each training row's KD teacher weights given to the "
                                         "teacher the row was made for (its source teacher), (1 - rho) confidence "
                                         "weights + rho one-hot; 0: StrataNet's confidence weights alone (1 was 3-27 "
                                         "points worse on the GPU benchmarks)")
    calibration_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="calibration_folds 0 only: share of "
                                                                         "held-out rows that calibrates the transform")
    calibration_folds: Annotated[int, AfterValidator(_folds)] = Field(
        5, ge=0, le=100, description="rmd/md: cross-fitted calibration over F folds; 0: one calibration_fraction "
                                     "split")
    calibration_repeats: int = Field(1, ge=1, le=100, description="repeat the cross-fitting with this many fold "
                                                                  "splits (calibration_folds >= 2)")
    share_st_layer: bool = Field(False, description="one ST-amalg layer for all blocks (default: one per block)")
    amalg_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout inside the ST-amalg layer")
    center_block_loss: bool = Field(True, description="Eq. 7 on batch-centred vectors")
    center_block_loss_within: Literal["batch", "confident_teacher"] = Field(
        "batch", description="centre Eq. 7 over the whole batch, or within the rows whose most confident teacher "
                             "(last block) is the same, so teachers' domain offsets do not enter the loss")
    train_fusion: bool = Field(False, description="true: train ST-amalg through the block loss, as the paper does; "
                                                  "false: a fixed random fusion, which the student and the fusion "
                                                  "cannot shrink together to an uninformative target")

    @rule("amalg_heads", "amalg_dim")
    def _heads_divide_dim(heads, dim):
        if dim % heads:
            return f"amalg_dim ({dim}) must be divisible by amalg_heads ({heads})"

    @rule("center_block_loss_within", "center_block_loss")
    def _groups_need_centring(within, center):
        if within != "batch" and not center:
            return (f"center_block_loss_within {within} chooses where Eq. 7 is centred, but center_block_loss is "
                    "false: set center_block_loss: true, or leave center_block_loss_within at batch")

    @rule("calibration_folds", "confidence_transform")
    def _contrast_is_cross_fitted(folds, transform):
        if transform == "contrast" and folds < 2:
            return ("confidence_transform contrast scores every held-out row with statistics fitted without it; "
                    "set amalgamation.calibration_folds >= 2")

    @rule("beta", "alpha")
    def _some_loss(beta, alpha):
        if alpha == 0 and beta == 0:
            return "alpha and beta are both 0: nothing would be learned; set beta > 0 (KL) and/or alpha > 0 (blocks)"


def _distinct(layers: list[int]) -> list[int]:
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct layer indices, got {layers}")
    return layers


class StudentConfig(_Section):
    """The compact student: a pretrained encoder directory, optionally with a subset of its layers."""

    path: Optional[Path] = Field(None, description="local HF encoder directory the student starts from")
    layers: Optional[Annotated[list[Annotated[int, Field(ge=0)]], AfterValidator(_distinct)]] = Field(
        None, description="which layers to keep, e.g. [0, 2, 4]")
    num_layers: Optional[int] = Field(None, ge=1, le=256, description="keep this many layers, evenly spaced")
    max_length: int = Field(128, ge=8, le=8192, description="student tokenizer truncation length")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="classifier dropout")

    @rule("num_layers", "layers")
    def _layers_or_num_layers(num_layers, layers):
        if num_layers is not None and layers is not None:
            return "set either layers or num_layers, not both"


class TrainConfig(_Section):
    """Distillation schedule; defaults are StrataNet's appendix (Table 4)."""

    learning_rate: float = Field(2e-5, gt=0.0, le=1.0, description="peak learning rate")
    batch_size: int = Field(16, ge=1, le=65536, description="per worker")
    epochs: float = Field(10, gt=0.0, le=10_000, description="passes over the transfer set")
    warmup_epochs: float = Field(2, ge=0.0, description="linear warmup, then linear decay to 0")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="gradient norm clip")
    report_every_steps: int = Field(20, ge=1, description="steps between metric reports")
    checkpoint_every_steps: int = Field(200, ge=1, description="steps between checkpoints")
    max_failures: int = Field(3, ge=0, description="worker failures Ray Train recovers from (from the last checkpoint)")
    shuffle_buffer: int = Field(1000, ge=0, description="rows in each worker's local shuffle buffer (0: no shuffle)")
    include_heldout: bool = Field(False, description="also train on the held-out rows that fit the confidence statistics")
    sdpa: AttentionKernels = Field("no_cudnn", description="attention kernels of each distillation step")
    precision: Precision = Field(
        "float32", description="the student's and ST-amalg's compute in a step: float32, or bfloat16 autocast; auto = "
                               "bfloat16 on CUDA, float32 elsewhere (weights, optimiser state, losses and confidences "
                               "stay float32; teachers run in their own dtype)")
    matmul_precision: MatmulPrecision = Field(
        "high", description="float32 matrix products on CUDA (torch.set_float32_matmul_precision): highest = "
                            "full float32, high = TensorFloat-32 tensor cores (10-bit mantissa inputs, float32 "
                            "accumulation), for the teachers and float32 students alike; CPUs stay full float32")
    compile: CompileMode = Field(
        "none", description="torch.compile the student's and the teachers' models for distillation (the mode: "
                            "default fuses kernels; reduce-overhead also replays CUDA graphs, one per input shape); "
                            "none: eager PyTorch. The first steps of each new input shape pay the compilation")
    pad_to_multiple_of: int = Field(
        1, ge=1, le=512, description="pad each training batch's token length up to a multiple of this (1: to the "
                                     "batch's longest text); bounds the input shapes a compiled step sees")
    stream_from_generation: bool = Field(
        False, description="train the first epoch on rows as the generator actors make them (jobs/amalgamate.py)")
    corpus_share: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of the training rows that are documents of transfer.corpus.path, "
                                         "mixed into the transfer set's rows (unlabelled: each step's KD target "
                                         "labels them from the teachers, as it labels generated rows; the confidence "
                                         "statistics are fitted on generated rows only); 0: the transfer set alone")

    @rule("warmup_epochs", "epochs")
    def _warmup_within_epochs(warmup, epochs):
        if warmup > epochs:
            return f"warmup_epochs ({warmup}) must be <= epochs ({epochs})"


class EvalConfig(_Section):
    """A labelled file (CSV, JSONL or Parquet) scored after training; never used for training."""

    path: Optional[Path] = Field(None, description="labelled .csv, .tsv, .jsonl or .parquet file")
    text_column: str = Field("text", description="column holding the texts")
    label_column: str = Field("label", description="column holding the labels")
    label_map: dict[str, str] = Field(default_factory=dict, description="raw label value -> label name, e.g. "
                                                                        "{'1': 'World'}")
    batch_size: int = Field(64, ge=1, description="texts per forward")


class SearchDim(_Section):
    """One dimension of a Tune search space: a grid of values, or a range sampled ``num_samples`` times."""

    values: Optional[list[Any]] = Field(None, min_length=1, description="grid of values, each tried")
    low: Optional[float] = Field(None, description="lower end of a range")
    high: Optional[float] = Field(None, description="upper end of a range (inclusive for integer fields)")
    log: bool = Field(False, description="sample the range log-uniformly")

    # A rule about the whole dimension, reported at the dimension itself.
    @model_validator(mode="after")
    def _values_or_range(self) -> "SearchDim":
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError("give either values: [...] or both low and high")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("log-uniform ranges need low > 0")
        return self


def field_annotation(dotted: str) -> Any:
    """The type of the config field ``dotted`` names (list indices allowed), without ``Optional``;
    None when it names no field."""
    model: Optional[type[BaseModel]] = JobConfig
    annotation: Any = None
    for part in dotted.split("."):
        if part.isdigit():
            continue
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = section_type(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def is_field_path(dotted: str) -> bool:
    """Whether ``dotted`` (e.g. ``transfer.steered.control_strength``, list indices allowed) names a config field."""
    return field_annotation(dotted) is not None


UNSEARCHABLE = {"name": "names the job", "output": "is where the sweep writes", "tune": "is the sweep itself",
                "ray": "sets each trial's resources", "eval": "reports, it does not choose", "demo": "builds the demo"}
"""Top-level sections a search space may not vary, and why."""

TUNE_METRICS = {"proxy_soft": "the data-free proxy: the student's mean probability of each probe text's class "
                              "(no labels; docs/tuning.md)",
                "proxy": "the data-free proxy's argmax form: the share of probe texts assigned to their class",
                "dev_accuracy": "the student's accuracy on tune.dev, a labelled development file"}
"""What a trial reports at the end of every epoch, and so what ``tune.metric`` may rank by (higher is better)."""

DATA_FREE_METRIC = "proxy_soft"
"""What trials are ranked by without a labelled development file. Good students agree with nearly every
probe text's class, so ``proxy`` saturates and stops ordering them; ``proxy_soft`` ranked AG News
configurations closer to development accuracy (docs/tuning.md)."""


def _search_key(key: str) -> str:
    annotation = field_annotation(key)
    if annotation is None:
        raise ValueError(f"search-space key {key!r} is not a config field (e.g. 'transfer.steered.control_strength')")
    top = key.split(".")[0]
    if top in UNSEARCHABLE:
        raise ValueError(f"search-space key {key!r}: the {top!r} section {UNSEARCHABLE[top]}; search fields of "
                         "teachers, transfer, amalgamation, student, train or seed")
    if section_type(annotation) is not None:
        raise ValueError(f"search-space key {key!r} is a section; name one of its fields, e.g. '{key}.<field>'")
    return key


def _known_metric(metric: Optional[str]) -> Optional[str]:
    if metric is None or metric in TUNE_METRICS:
        return metric
    if metric == "eval_accuracy":
        raise ValueError(f"eval.path reports the chosen configuration, it does not choose it: rank trials by "
                         f"{DATA_FREE_METRIC!r}, or by 'dev_accuracy' on a labelled development file (tune.dev.path)")
    raise ValueError(f"no trial reports metric {metric!r}; trials report {', '.join(TUNE_METRICS)} "
                     f"(leave tune.metric unset: dev_accuracy with tune.dev.path, else {DATA_FREE_METRIC})")


class TuneConfig(_Section):
    """A Ray Tune sweep (``jobs/tune.py``) over dotted config keys (e.g. ``transfer.steered.control_strength``).

    Each trial is a job with the sampled values: its transfer set (shared by trials whose
    generation settings are equal), confidence statistics and a Ray Train distillation, scored at
    the end of every epoch by ``metric``; ASHA stops the weaker trials early, in epochs.
    """

    # Keys are validated as dict keys: reported at tune.search_space.<key>, together with its value's errors.
    search_space: dict[Annotated[str, AfterValidator(_search_key)], SearchDim] = Field(
        default_factory=dict, description="dotted config key -> its values or range")
    num_samples: int = Field(1, ge=1, le=10_000, description="samples of the ranges; each runs every grid point")
    dev: EvalConfig = Field(EvalConfig(), description="labelled development file that dev_accuracy scores "
                                                      "(same fields as eval); never eval.path")
    metric: Annotated[Optional[str], AfterValidator(_known_metric)] = Field(
        None, description=f"{', '.join(TUNE_METRICS)}; unset: dev_accuracy when tune.dev.path is set, "
                          f"else {DATA_FREE_METRIC}")
    max_concurrent_trials: int = Field(1, ge=1, le=1024, description="trials running at once")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop weaker trials early (per epoch); "
                                                                   "fifo: run every trial to the end")
    grace_epochs: int = Field(1, ge=1, description="asha: epochs every trial runs before it may be stopped")
    reduction_factor: int = Field(2, ge=2, le=16, description="asha: keep about 1/reduction_factor of trials "
                                                              "at each rung")
    proxy_samples_per_class: int = Field(16, ge=2, le=100_000, description="probe texts per (teacher, class) "
                                                                           "the proxy scores")

    @rule("search_space")
    def _ranges_on_numbers(space):
        for key, dim in space.items():
            annotation = field_annotation(key)
            if dim.values is None and annotation not in (int, float):
                kind = (f"one of {', '.join(map(repr, typing.get_args(annotation)))}"
                        if typing.get_origin(annotation) is Literal else getattr(annotation, "__name__", str(annotation)))
                return (key,), (f"a range (low/high) needs a numeric field, and {key} is {kind}; list the choices "
                                "instead: values: [...]")

    @rule("metric", "dev")
    def _dev_for_dev_accuracy(metric, dev):
        if metric == "dev_accuracy" and dev.path is None:
            return ("metric dev_accuracy needs a labelled development file: set tune.dev.path, or metric: "
                    f"{DATA_FREE_METRIC}")

    def ranked_by(self) -> str:
        """The metric trials are ranked by: ``metric``, else dev_accuracy with a dev file, else
        :data:`DATA_FREE_METRIC`."""
        return self.metric or ("dev_accuracy" if self.dev.path is not None else DATA_FREE_METRIC)


def _gpu_share(gpus: float) -> float:
    if gpus > 1 and not float(gpus).is_integer():
        raise ValueError(f"Ray gives one process a share of one GPU (below 1) or whole GPUs, and {gpus:g} is "
                         "neither: use a share such as 0.5 or 0.25, or a whole number")
    if 0 < gpus < 1e-4:
        raise ValueError(f"{gpus:g} is below 0.0001, the smallest GPU share Ray books; use 0 for no GPU")
    return gpus


class RayConfig(_Section):
    """Where the job runs and how much of the cluster each stage takes."""

    address: Optional[str] = Field(None, description="None: local Ray, or the cluster under `ray job submit`")
    num_generation_actors: int = Field(1, ge=1, description="generator actors making the transfer set")
    gpus_per_generation_actor: Annotated[float, AfterValidator(_gpu_share)] = Field(
        0.0, ge=0.0, le=8.0, description="a share of one GPU (e.g. 0.25: four actors a GPU) or whole GPUs")
    cpus_per_generation_actor: float = Field(1.0, gt=0.0, description="CPUs each generator actor reserves")
    num_train_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel)")
    use_gpu: bool = Field(False, description="one GPU per train worker (and for the confidence and eval tasks)")
    cpus_per_train_worker: float = Field(1.0, gt=0.0, description="CPUs each train worker reserves")
    report_poll_interval_s: float = Field(
        0.25, gt=0.0, le=60.0, description="seconds between Ray Train's collections of worker reports "
                                           "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker's report waits "
                                           "until the one before it is collected, so Ray's own 2 s stalls "
                                           "training that reports or checkpoints more often than that")


class OutputConfig(_Section):
    dir: Path = Field(description="everything the job writes lands here; one job per directory")


# --------------------------------------------------------------------------------------------
# the job


class JobConfig(_Section):
    """A whole job: teachers -> transfer set -> amalgamation -> student -> evaluation -> export."""

    name: Annotated[str, Field(pattern=_NAME, description="the job's name; it owns output.dir")]
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds requests, initialisation and shuffling")
    teachers: list[TeacherConfig] = Field(min_length=1, description="the teachers to amalgamate")
    transfer: TransferConfig
    amalgamation: AmalgamationConfig = AmalgamationConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig
    demo: Optional[Path] = Field(None, description="build the offline synthetic demo task here on first use "
                                                   "(smoke presets)")

    @rule("teachers")
    def _unique_names(teachers):
        seen: set[str] = set()
        for i, t in enumerate(teachers):
            if t.name in seen:
                return (i, "name"), f"teacher names must be unique, {t.name!r} repeats; rename one"
            seen.add(t.name)

    @rule("train", "transfer", "amalgamation")
    def _stream_needs_heldout(train, transfer, amalgamation):
        if train.stream_from_generation and amalgamation.method == "stratanet" and transfer.heldout_fraction == 0:
            return ("stream_from_generation",), (
                "train.stream_from_generation with amalgamation.method stratanet fits the confidence statistics on "
                "held-out rows made before training starts, and transfer.heldout_fraction is 0: set "
                "transfer.heldout_fraction > 0 (e.g. 0.1), or amalgamation.method: vanilla")

    @rule("tune", "transfer", "eval")
    def _tune_ranking(tune, transfer, eval):
        if tune.search_space and tune.ranked_by() != "dev_accuracy" and transfer.steered.lm_path is None:
            return ("metric",), ("the proxy scores trials on probe texts that transfer.steered.lm_path writes, and it is "
                                 "not set: set transfer.steered.lm_path (a local causal-LM directory), or give a "
                                 "labelled development file (tune.dev.path)")
        if tune.dev.path is not None and tune.dev.path == eval.path:
            return ("dev", "path"), ("tune.dev.path is eval.path: the eval file reports the chosen configuration and "
                                     "must not choose it; give a separate labelled development file")

    @rule("amalgamation", "transfer")
    def _source_weight_needs_source_rows(amalgamation, transfer):
        if amalgamation.kd_source_weight > 0 and amalgamation.method == "vanilla":
            return ("kd_source_weight",), ("amalgamation.kd_source_weight weights StrataNet's KD target and "
                                           "amalgamation.method is vanilla: set kd_source_weight=0, or method=stratanet")
        if amalgamation.kd_source_weight > 0 and transfer.source == "embedding_guessing":
            return ("kd_source_weight",), ("transfer.source embedding_guessing crafts pseudo-embeddings, not rows made "
                                           "for a teacher's class: set amalgamation.kd_source_weight=0")

    @rule("train", "transfer")
    def _corpus_share_has_documents(train, transfer):
        if train.corpus_share == 0:
            return None
        if transfer.source == "embedding_guessing":
            return ("corpus_share",), ("transfer.source embedding_guessing trains on crafted pseudo-embeddings, not "
                                       "text, so there is no text to mix corpus documents into: set train.corpus_share=0")
        if transfer.source == "corpus":
            return ("corpus_share",), ("transfer.source corpus already trains on documents of transfer.corpus.path "
                                       "(the same seeded order, so the mix would repeat them): set "
                                       "train.corpus_share=0, or a source that writes text")
        if transfer.corpus.path is None:
            return ("corpus_share",), (f"train.corpus_share={train.corpus_share} mixes documents of "
                                       "transfer.corpus.path into training and it is not set: give "
                                       "transfer.corpus.path (a text file, one document per line), or set "
                                       "train.corpus_share=0")
        if train.stream_from_generation:
            return ("corpus_share",), ("train.stream_from_generation trains its first epoch on the generator's rows "
                                       "alone, and train.corpus_share mixes corpus documents into every epoch: set "
                                       "train.corpus_share=0, or train.stream_from_generation=false")

    @rule("train", "transfer")
    def _compiled_steps_read_text(train, transfer):
        if train.compile != "none" and transfer.source == "embedding_guessing":
            return ("compile",), ("train.compile compiles the models of a step on tokenized text, and transfer.source "
                                  "embedding_guessing crafts pseudo-embeddings inside each step (run eagerly): set "
                                  "train.compile: none")

    @rule("train", "teachers", "student")
    def _padding_within_max_length(train, teachers, student):
        m = train.pad_to_multiple_of
        lengths = {"student.max_length": student.max_length,
                   **{f"teachers[{i}].max_length": t.max_length for i, t in enumerate(teachers)}}
        off = {k: v for k, v in lengths.items() if v % m}
        if off:
            return ("pad_to_multiple_of",), (
                f"train.pad_to_multiple_of ({m}) must divide every max_length a batch is truncated to, or padding "
                f"would run past it: {', '.join(f'{k} is {v}' for k, v in off.items())}; pick a divisor of them "
                "(e.g. 8 or 32 for 128), or 1")

    @rule("train", "transfer")
    def _crafted_batches_are_not_streamed(train, transfer):
        if train.stream_from_generation and transfer.source == "embedding_guessing":
            return ("stream_from_generation",), (
                "transfer.source embedding_guessing crafts its pseudo-embeddings inside training, so there is no "
                "generation to stream from: set train.stream_from_generation=false")

    def teacher_labels(self) -> dict[str, list[str]]:
        """Each teacher's class names in id order: ``labels`` as the preflight filled them, else read
        from the directory's config.json (library use without the preflight)."""
        from dfkd_ray.labels import read_teacher_labels

        return {t.name: t.labels if t.labels is not None else read_teacher_labels(t.path) for t in self.teachers}

    def absolute(self, base: Optional[Path] = None) -> "JobConfig":
        """The same config with every relative path joined to ``base`` (default: the current directory).

        Ray Train workers run in their own directories, and a cluster's workers on other nodes: the
        driver resolves relative paths once, before handing the config to any of them. The preflight
        picks ``base`` (:func:`dfkd_ray.preflight.relative_path_base`).
        """
        root = Path.cwd() if base is None else Path(base)

        def walk(obj):
            if isinstance(obj, BaseModel):
                return obj.model_copy(update={k: walk(getattr(obj, k)) for k in type(obj).model_fields})
            if isinstance(obj, Path):
                return root / obj.expanduser()  # an absolute path stays as it is
            if isinstance(obj, list):
                return [walk(x) for x in obj]
            return obj

        return walk(self)
