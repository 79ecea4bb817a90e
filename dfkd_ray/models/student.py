"""The compact student (StrataNet section 3 and appendix A): a pretrained encoder with a subset of its layers,
a classifier over the union labels, and per-block projections into the amalgamated space.

The student IS a Hugging Face ``AutoModelForSequenceClassification`` (built from the encoder
directory: encoder weights loaded, classification head newly initialised, ``id2label`` = the union
labels) whose layer list was cut down. Saving it (:meth:`Student.save_pretrained`) therefore gives a
standard classifier directory; the block projections are training-only and are not exported.

Layer keeping: ``layers=[0, 2, 4]`` keeps those layers (in depth order); ``num_layers=n`` keeps
``n`` layers evenly spaced from the first to the last (``round(linspace(0, L-1, n))``: 6 of 12 gives
``[0, 2, 4, 7, 9, 11]``, DistilBERT's choice; 1 keeps layer 0); neither keeps all. Works for models whose encoder
holds its layers in one ``nn.ModuleList`` at ``encoder.layer`` (BERT, RoBERTa, ELECTRA, XLM-R,
DeBERTa), ``transformer.layer`` (DistilBERT) or ``layers``; others (e.g. ALBERT's shared layer
groups) raise a clear error.

Blocks: ``N`` defaults to the kept depth (one layer per block, section 5.1); block features are
mask-aware token means pooled per block exactly as for teachers (:func:`~dfkd_ray.math.blocks.pool_blocks`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from dfkd_ray.config import StudentConfig
from dfkd_ray.math.blocks import partition_layers, pool_blocks
from dfkd_ray.models.inputs import encode_texts, encoding_key, prepared_attention_mask, to_device

log = logging.getLogger(__name__)

LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")
"""Where encoders keep their ``nn.ModuleList`` of transformer layers, relative to ``model.base_model``."""

_DROPOUT_FIELDS = ("classifier_dropout", "seq_classif_dropout")  # BERT/RoBERTa/ELECTRA, DistilBERT


def select_layers(total: int, layers: Optional[Sequence[int]] = None, num_layers: Optional[int] = None) -> list[int]:
    """Indices of the layers to keep out of ``total``, sorted.

    Raises:
        ValueError: both or an invalid one of ``layers`` / ``num_layers`` given.
    """
    if layers is not None and num_layers is not None:
        raise ValueError("set either layers or num_layers, not both")
    if layers is not None:
        keep = sorted(int(i) for i in layers)
        if not keep or len(set(keep)) != len(keep):
            raise ValueError(f"layers must be a non-empty list of distinct layer indices, got {list(layers)}")
        if keep[0] < 0 or keep[-1] >= total:
            raise ValueError(f"layers {list(layers)} out of range: the encoder has layers 0..{total - 1}")
        return keep
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must lie in [1, {total}] (the encoder has {total} layers), got {num_layers}")
        if num_layers == 1:
            return [0]  # the first layer still reads the embeddings it was trained on
        return sorted({round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)})
    return list(range(total))


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(owner, attribute, ModuleList)`` of the transformer layers of a HF model's base model."""
    base = getattr(model, "base_model", model)
    for path in LAYER_PATHS:
        owner: object = base
        parts = path.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
        layers = getattr(owner, parts[-1], None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return owner, parts[-1], layers  # type: ignore[return-value]
    raise ValueError(f"cannot find the transformer layers of {type(base).__name__}: the student must keep them in "
                     f"one nn.ModuleList at one of {', '.join(LAYER_PATHS)} (BERT, RoBERTa, ELECTRA, DeBERTa, "
                     "DistilBERT-like encoders); models with shared layer groups (ALBERT) are not supported")


def keep_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Cut a HF model's layer list down to ``keep`` in place and update its config."""
    owner, attr, layers = find_layer_list(model)
    total = len(layers)
    configured = getattr(model.config, "num_hidden_layers", total)
    if configured != total:
        raise ValueError(f"{type(model).__name__}: config says {configured} layers but the layer list holds {total}")
    keep = select_layers(total, layers=keep)
    kept = nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(kept):  # cache bookkeeping of some layers refers to their position
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    setattr(owner, attr, kept)
    for name in ("n_layers", "num_layers"):  # DistilBERT's Transformer keeps its own count
        if isinstance(getattr(owner, name, None), int):
            setattr(owner, name, len(keep))
    model.config.num_hidden_layers = len(keep)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        model.config.layer_types = [layer_types[i] for i in keep]


@dataclass
class StudentOutput:
    """What the student gives for a batch.

    Attributes:
        logits: ``(B, C)`` over the union labels.
        block_states: ``(B, N, H_s)`` mean-pooled block features.
        projections: ``(B, N, D)`` block features projected into the amalgamated space (``s^b``, Eq. 7).
        mask: ``(B, T)`` the student's attention mask.
    """

    logits: torch.Tensor
    block_states: torch.Tensor
    projections: torch.Tensor
    mask: torch.Tensor


class Student(nn.Module):
    """A HF sequence classifier over the union labels plus per-block projections ``P^b: H_s -> D``.

    Build with :meth:`from_config`. ``forward`` takes token ids (so DDP can
    wrap the module); :meth:`encode` takes raw texts.
    """

    def __init__(self, model: nn.Module, tokenizer, labels: Sequence[str], kept_layers: Sequence[int], *,
                 amalg_dim: int, num_blocks: Optional[int], max_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.kept_layers = list(kept_layers)
        self.max_length = max_length
        cfg = model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        if self.num_layers != len(self.kept_layers):
            raise ValueError(f"model has {self.num_layers} layers but kept_layers lists {len(self.kept_layers)}")
        if int(getattr(cfg, "num_labels", len(self.labels))) != len(self.labels):
            raise ValueError(f"classifier has {cfg.num_labels} outputs for {len(self.labels)} labels")
        self.num_blocks = int(num_blocks or self.num_layers)
        self.blocks = partition_layers(self.num_layers, self.num_blocks)
        self.amalg_dim = int(amalg_dim)
        self.proj = nn.ModuleList([nn.Linear(self.hidden_size, self.amalg_dim) for _ in range(self.num_blocks)])
        self._accepts_token_types = getattr(cfg, "type_vocab_size", 1) > 1
        self.prepared_mask: Optional[bool] = None  # set by inputs.enable_prepared_mask: None = not checked (the (B, T) mask)

    @classmethod
    def from_config(cls, cfg: StudentConfig, *, labels: Sequence[str], amalg_dim: int,
                    num_blocks: Optional[int] = None) -> "Student":
        """Build from the ``student`` section: its encoder (or classifier) directory ``path`` with its
        tokenizer, the kept ``layers`` / ``num_layers`` (see the module docstring), classifier
        ``dropout`` and tokenizer ``max_length``.

        Args:
            cfg: the :class:`~dfkd_ray.config.StudentConfig` (``path`` must be set).
            labels: the union label names, in global id order.
            amalg_dim: ``D`` (``amalgamation.amalg_dim``).
            num_blocks: ``N``; default the kept depth.
        """
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        if cfg.path is None:
            raise ValueError("student.path is not set: point it at a local HF encoder directory")
        if not labels:
            raise ValueError("the student needs at least one label")
        path = Path(cfg.path)
        config = AutoConfig.from_pretrained(path)
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        dropout_field = next((f for f in _DROPOUT_FIELDS if hasattr(config, f)), None)
        if dropout_field is None:
            log.warning("student %s: %s has no classifier dropout setting; using its default", path, type(config).__name__)
        else:
            setattr(config, dropout_field, float(cfg.dropout))
        total = int(config.num_hidden_layers)
        keep = select_layers(total, cfg.layers, cfg.num_layers)
        # Encoder weights only: a fine-tuned classifier directory's old head (other labels) is never reused.
        encoder = AutoModel.from_pretrained(path, config=config, dtype=torch.float32)
        model = AutoModelForSequenceClassification.from_config(config).float()
        missing, _ = model.base_model.load_state_dict(encoder.state_dict(), strict=False)  # extra: e.g. an unused pooler
        if missing:
            raise ValueError(f"student {path}: the encoder lacks weights the classifier needs: {missing[:5]}")
        del encoder
        if len(keep) < total:
            keep_layers(model, keep)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return cls(model.train(), tokenizer, labels, keep, amalg_dim=amalg_dim, num_blocks=num_blocks,
                   max_length=cfg.max_length)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def encoding_key(self) -> tuple:
        """Models with equal keys get the same :meth:`host_inputs` (:func:`~dfkd_ray.models.inputs.encoding_key`)."""
        return encoding_key(self.tokenizer, max_length=self.max_length, token_types=self._accepts_token_types)

    def host_inputs(self, texts: Sequence[str], *, pin: bool = False,
                    pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
        """The student's ``(B, T)`` inputs for ``texts`` on the host (pinned if ``pin``; ``T`` rounded up to a
        multiple of ``pad_to_multiple_of``)."""
        if not texts:
            raise ValueError("student: empty batch of texts")
        return encode_texts(self.tokenizer, texts, max_length=self.max_length, token_types=self._accepts_token_types,
                            pin=pin, pad_to_multiple_of=pad_to_multiple_of)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The student's inputs for ``texts`` on its device."""
        return to_device(self.host_inputs(texts), self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> StudentOutput:
        """``input_ids``, ``attention_mask``: (B, T) -> :class:`StudentOutput`."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        mask = prepared_attention_mask(self.model, attention_mask) if self.prepared_mask else attention_mask
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra)
        states = out.hidden_states[1:]  # L_s x (B, T, H_s); [0] is the embedding output
        if len(states) != self.num_layers:
            raise RuntimeError(f"expected {self.num_layers} layer outputs, got {len(states)}")
        block_states = pool_blocks(states, attention_mask, self.blocks)  # (B, N, H_s)
        projections = torch.stack([p(block_states[:, b]) for b, p in enumerate(self.proj)], dim=1)  # (B, N, D)
        return StudentOutput(logits=out.logits.float(), block_states=block_states, projections=projections,
                             mask=attention_mask)

    def encode(self, texts: Sequence[str]) -> StudentOutput:
        """:meth:`forward` on raw texts."""
        return self(**self.tokenize(texts))

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities ``(B, C)`` over the union labels and predicted ids ``(B,)`` (eval mode, restored after)."""
        was_training = self.training
        self.eval()
        try:
            probs = [self.model(**self.tokenize(texts[i:i + batch_size])).logits.float().softmax(-1).cpu()
                     for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        p = torch.cat(probs) if probs else torch.zeros(0, self.num_labels)
        return p, p.argmax(-1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """A standard ``AutoModelForSequenceClassification`` directory (kept layers, union ``id2label``)
        plus the tokenizer; the block projections are training-only and are left out.

        The saved tokenizer's ``model_max_length`` is the student's ``max_length`` (capped by the
        model's positions), so ``pipeline(..., truncation=True)`` truncates long texts as in training.
        """
        directory = Path(directory)
        self.model.save_pretrained(directory)
        limit = min(self.max_length, int(getattr(self.model.config, "max_position_embeddings", None) or self.max_length))
        saved = self.tokenizer.model_max_length
        self.tokenizer.model_max_length = min(int(saved or limit), limit)
        try:
            self.tokenizer.save_pretrained(directory)
        finally:
            self.tokenizer.model_max_length = saved
        return directory
