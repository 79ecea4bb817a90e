"""The teacher contract: any HF sequence classifier -> :class:`~dfkd_ray.math.blocks.TeacherOutput`.

Amalgamation and losses see only ``TeacherOutput`` (logits over the teacher's own labels,
mean-pooled states per layer block, mask), never a model class: a BERT, a DistilBERT or a
RoBERTa teacher with its own tokenizer all look the same (the adaptor idea of TextBrewer).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from dfkd_ray.labels import ordered_labels
from dfkd_ray.math.blocks import TeacherOutput, partition_layers, pool_blocks
from dfkd_ray.models.inputs import encode_texts, encoding_key, prepared_attention_mask, to_device

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()


@dataclass
class Teacher:
    """A frozen fine-tuned classifier with its own tokenizer and label names.

    Build with :meth:`from_pretrained`; call with raw texts.
    """

    name: str
    model: torch.nn.Module
    tokenizer: object
    labels: list[str]
    num_blocks: int
    max_length: int = 128
    prepared_mask: Optional[bool] = None  # set by inputs.enable_prepared_mask: None = not checked (the (B, T) mask)

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.num_layers = int(getattr(cfg, "num_hidden_layers"))
        self.hidden_size = int(getattr(cfg, "hidden_size"))
        self.blocks = partition_layers(self.num_layers, self.num_blocks)
        self.model.eval().requires_grad_(False)
        # Models without token type embeddings (DistilBERT, RoBERTa-likes with type_vocab_size 1) take none.
        self._accepts_token_types = getattr(cfg, "type_vocab_size", 1) > 1

    @classmethod
    def from_pretrained(cls, name: str, path: str | Path, *, num_blocks: int, max_length: int = 128,
                        device: str | torch.device = "cpu", dtype: str = "auto",
                        trust_remote_code: bool = False) -> "Teacher":
        """Load ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` from a local directory.

        Safetensors weights are loaded when present; a directory with only pickled weights
        (``pytorch_model.bin``) still loads, with a warning. ``trust_remote_code`` stays off unless
        the config turns it on.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        labels = ordered_labels(config.id2label)
        safetensors = _has_safetensors(path)
        if not safetensors:
            log.warning("teacher %s: %s has no safetensors weights; loading pickled weights", name, path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), use_safetensors=safetensors or None,
            trust_remote_code=trust_remote_code).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return cls(name=name, model=model, tokenizer=tokenizer, labels=labels, num_blocks=num_blocks,
                   max_length=max_length)

    def compiled(self, mode: str) -> "Teacher":
        """The same teacher with its model under ``torch.compile(mode=mode)``: a view sharing the weights,
        so this one stays eager (generation and scoring elsewhere keep their own shapes)."""
        return dataclasses.replace(self, model=torch.compile(self.model, mode=mode))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def encoding_key(self) -> tuple:
        """Models with equal keys get the same :meth:`host_inputs` (:func:`~dfkd_ray.models.inputs.encoding_key`)."""
        return encoding_key(self.tokenizer, max_length=self.max_length, token_types=self._accepts_token_types)

    def host_inputs(self, texts: Sequence[str], *, pin: bool = False,
                    pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
        """This teacher's ``(B, T)`` inputs for ``texts`` on the host (pinned if ``pin``; ``T`` rounded up to a
        multiple of ``pad_to_multiple_of``)."""
        return encode_texts(self.tokenizer, texts, max_length=self.max_length, token_types=self._accepts_token_types,
                            pin=pin, pad_to_multiple_of=pad_to_multiple_of)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """This teacher's inputs for ``texts`` on its device."""
        return to_device(self.host_inputs(texts), self.device)

    @torch.no_grad()
    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    with_blocks: bool = True, **extra) -> TeacherOutput:
        """The contract on already-tokenized inputs. ``input_ids``: (B, T); ``attention_mask``: (B, T), or None
        where no token is padded (only with ``with_blocks=False``: block pooling reads the mask). With
        :attr:`prepared_mask` on, the model gets the mask prepared for its attention kernels."""
        prepare = self.prepared_mask and attention_mask is not None
        mask = prepared_attention_mask(self.model, attention_mask) if prepare else attention_mask
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=with_blocks, **extra)
        logits = out.logits.float()  # (B, C_k)
        if with_blocks:
            states = out.hidden_states[1:]  # L x (B, T, H); [0] is the embedding output
            block_states = pool_blocks(states, attention_mask, self.blocks)  # (B, N, H)
        else:
            block_states = logits.new_zeros(logits.shape[0], self.num_blocks, self.hidden_size)
        return TeacherOutput(logits=logits, block_states=block_states, mask=attention_mask)

    def __call__(self, texts: list[str], *, with_blocks: bool = True) -> TeacherOutput:
        """Logits, block states and mask for a batch of raw texts."""
        if not texts:
            raise ValueError(f"teacher {self.name}: empty batch of texts")
        enc = self.tokenize(texts)
        return self.forward_ids(enc.pop("input_ids"), enc.pop("attention_mask"), with_blocks=with_blocks, **enc)

    def predict(self, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities ``(B, C_k)`` and predicted class ``(B,)``, in batches."""
        probs = []
        for i in range(0, len(texts), batch_size):
            probs.append(self(texts[i:i + batch_size], with_blocks=False).logits.softmax(-1).cpu())
        p = torch.cat(probs) if probs else torch.zeros(0, self.num_labels)
        return p, p.argmax(-1)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text under this teacher's tokenizer, special tokens excluded."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def load_teachers(teachers: Sequence, *, num_blocks: int = 1, device: str | torch.device = "cpu") -> dict[str, Teacher]:
    """Every teacher of a job, by name in config order, from its ``TeacherConfig`` section
    (``name``, ``path``, ``max_length``, ``dtype``, ``trust_remote_code``)."""
    return {t.name: Teacher.from_pretrained(t.name, t.path, num_blocks=num_blocks, max_length=t.max_length,
                                            device=device, dtype=t.dtype, trust_remote_code=t.trust_remote_code)
            for t in teachers}


def run_teachers(teachers: Mapping[str, object], texts: Sequence[str],
                 names: Optional[Sequence[str]] = None) -> dict[str, TeacherOutput]:
    """Every (frozen) teacher on one batch, under ``no_grad``; ``names`` picks and orders them."""
    names = list(names or teachers)
    missing = [n for n in names if n not in teachers]
    if missing:
        raise ValueError(f"no loaded teacher for {missing} (have {list(teachers)})")
    with torch.no_grad():
        return {n: teachers[n](list(texts)) for n in names}


def collect_outputs(teacher, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's block states ``(M, N, H)`` and logits ``(M, C)`` on ``texts``, in batches, float32 on CPU."""
    if not texts:
        raise ValueError("no texts to run the teacher on")
    states, logits = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out = teacher(list(texts[i:i + batch_size]))
            states.append(out.block_states.float().cpu())
            logits.append(out.logits.float().cpu())
    return torch.cat(states), torch.cat(logits)
