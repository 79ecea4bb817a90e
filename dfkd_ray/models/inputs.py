"""Tokenized model inputs: made on the host, copied to the model's device without a host wait.

A distillation step tokenizes its batch for the student and for every teacher. Made apart from the
step (:meth:`dfkd_ray.train.step.Distiller.encode`, in Ray Data's prefetch threads during training),
the tokenization overlaps the previous step's GPU work instead of holding the next step's launch.
Page-locked (pinned) host tensors make the copy to a GPU asynchronous, so the host queues the
step's kernels behind the copies instead of waiting for each copy to finish.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch


def encode_texts(tokenizer, texts: Sequence[str], *, max_length: int, token_types: bool,
                 pin: bool = False) -> dict[str, torch.Tensor]:
    """Padded, truncated ``(B, T)`` host tensors: ``input_ids``, ``attention_mask`` and, where the model
    takes them (``token_types``), ``token_type_ids``; page-locked when ``pin`` (a CUDA model's inputs)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    keep = ("input_ids", "attention_mask") + (("token_type_ids",) if token_types else ())
    return {k: (v.pin_memory() if pin else v) for k, v in enc.items() if k in keep}


def encoding_key(tokenizer, *, max_length: int, token_types: bool) -> tuple:
    """Equal for two models exactly when :func:`encode_texts` gives them the same tensors: the same
    fast tokenizer (its serialised pipeline: normaliser, pre-tokeniser, vocabulary, special-token
    template), padding and truncation sides, pad id, ``max_length`` and ``token_types``. A batch is
    then tokenized once for all of them (teachers fine-tuned from one base, and a student from the
    same base, share it). A slow (Python) tokenizer is only ever equal to itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = (("fast", hashlib.sha256(backend.to_str().encode()).hexdigest()) if backend is not None
                else ("object", id(tokenizer)))
    return (identity, type(tokenizer).__name__, getattr(tokenizer, "padding_side", None),
            getattr(tokenizer, "truncation_side", None), getattr(tokenizer, "pad_token_id", None), int(max_length),
            bool(token_types))


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``inputs`` on ``device``; from pinned host memory the copies are queued, not waited for."""
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def pin_for(device: torch.device | str) -> bool:
    """Whether host inputs bound for ``device`` should be page-locked (CUDA devices only)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()
