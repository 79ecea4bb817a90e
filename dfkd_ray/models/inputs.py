"""Tokenized model inputs: made on the host, copied to the model's device without a host wait.

A distillation step tokenizes its batch for the student and for every teacher. Made apart from the
step (:meth:`dfkd_ray.train.step.Distiller.encode`, in Ray Data's prefetch threads during training),
the tokenization overlaps the previous step's GPU work instead of holding the next step's launch.
Page-locked (pinned) host tensors make the copy to a GPU asynchronous, so the host queues the
step's kernels behind the copies instead of waiting for each copy to finish.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


def encode_texts(tokenizer, texts: Sequence[str], *, max_length: int, token_types: bool,
                 pin: bool = False, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Padded, truncated ``(B, T)`` host tensors: ``input_ids``, ``attention_mask`` and, where the model
    takes them (``token_types``), ``token_type_ids``; page-locked when ``pin`` (a CUDA model's inputs).
    ``T`` is the longest text's length, rounded up to a multiple of ``pad_to_multiple_of``.

    A fast tokenizer's batch goes straight to its Rust pipeline (:func:`padded_pipeline`: the padding
    and truncation ``tokenizer(..., padding=True, truncation=True)`` would set), which encodes without
    holding Python's global lock; only the ids are then read into arrays. Training tokenizes in a
    thread beside the step, and the step's host work needs that lock for every operation it queues, so
    the shorter the tokenizer holds it, the less the step waits. The tensors are those of
    ``tokenizer(...)`` (a test checks this); slow (Python) tokenizers take that call."""
    keep = ("input_ids", "attention_mask") + (("token_type_ids",) if token_types else ())
    pipeline = padded_pipeline(tokenizer, max_length, pad_to_multiple_of)
    if pipeline is None:
        multiple = pad_to_multiple_of if pad_to_multiple_of > 1 else None
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        pad_to_multiple_of=multiple)
        return {k: (v.pin_memory() if pin else v) for k, v in enc.items() if k in keep}
    encodings = pipeline.encode_batch(list(texts))
    returned = getattr(tokenizer, "model_input_names", keep)  # what tokenizer(...) returns besides the ids
    out = {}
    for key in (k for k in keep if k == "input_ids" or k in returned):
        values = torch.from_numpy(np.array([getattr(e, _ENCODING_FIELDS[key]) for e in encodings],
                                           dtype=np.int64))  # (B, T)
        out[key] = values.pin_memory() if pin else values
    return out


_ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
"""Model input name -> the attribute of a ``tokenizers.Encoding`` that holds it."""

_PIPELINES: "weakref.WeakKeyDictionary[object, dict[tuple, object]]" = weakref.WeakKeyDictionary()
_PIPELINES_LOCK = threading.Lock()


def padded_pipeline(tokenizer, max_length: int, pad_to_multiple_of: int = 1):
    """A copy of a fast tokenizer's Rust pipeline with the truncation and padding that
    ``tokenizer(texts, padding=True, truncation=True, max_length=max_length)`` sets (longest-first
    truncation on the tokenizer's side, padding to the longest text with its pad token, id and type id on
    its side), made once per tokenizer and setting; None for a slow tokenizer, or one without a pad token
    (``tokenizer(...)`` then says so). The tokenizer itself is left as it was."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token is None:
        return None
    padding = dict(direction=getattr(tokenizer, "padding_side", "right"), pad_id=tokenizer.pad_token_id,
                   pad_type_id=getattr(tokenizer, "pad_token_type_id", 0), pad_token=tokenizer.pad_token,
                   pad_to_multiple_of=pad_to_multiple_of if pad_to_multiple_of > 1 else None)
    truncation = dict(max_length=int(max_length), stride=0, strategy="longest_first",
                      direction=getattr(tokenizer, "truncation_side", "right"))
    key = (*sorted(padding.items()), *sorted(truncation.items()))  # the tokenizer's sides may change
    with _PIPELINES_LOCK:
        made = _PIPELINES.setdefault(tokenizer, {})  # dropped with the tokenizer
        if key not in made:
            pipeline = copy.deepcopy(backend)
            pipeline.enable_truncation(**truncation)
            pipeline.enable_padding(**padding)
            made[key] = pipeline
        return made[key]


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


# The texts a model's mask forms are compared on: different lengths, so the batch is padded.
MASK_PROBE_TEXTS = ["a short text", "a longer text that needs more tokens than the first one does"]


def prepared_attention_mask(model, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``(B, 1, 1, T)`` attention mask a transformers encoder takes as it is, for its attention
    kernels (``sdpa``: boolean, True = attend; ``eager``: additive, 0 or the dtype's minimum); None for
    other kernels.

    Given the ``(B, T)`` mask, transformers' mask construction first asks whether any token is padded
    (``padding_mask.all()`` in ``masking_utils``): a read of the device that waits for every queued
    kernel, once per model and step. A 4D mask skips the construction, so the host keeps queueing
    the step while the GPU works."""
    kernels = getattr(model.config, "_attn_implementation", None)
    m = attention_mask[:, None, None, :]  # (B, 1, 1, T)
    if kernels == "sdpa":
        return m.to(torch.bool)
    if kernels == "eager":
        dtype = next(model.parameters()).dtype
        return (1.0 - m.to(dtype)) * torch.finfo(dtype).min
    return None


def enable_prepared_mask(holder) -> bool:
    """Set ``holder.prepared_mask`` (a teacher or student: ``model``, ``tokenize``) once, by
    :func:`takes_prepared_mask` on :data:`MASK_PROBE_TEXTS`; returns it."""
    if holder.prepared_mask is None:
        holder.prepared_mask = takes_prepared_mask(holder.model, holder.tokenize(MASK_PROBE_TEXTS))
    return holder.prepared_mask


@torch.no_grad()
def takes_prepared_mask(model, inputs: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``model`` gives the same logits and hidden states with :func:`prepared_attention_mask` as with the
    ``(B, T)`` mask on ``inputs`` (a padded batch on the model's device); run once per model, in eval
    mode (restored after). Architectures that build their masks their own way answer False and keep
    the ``(B, T)`` mask."""
    inputs = dict(inputs)
    mask = inputs.pop("attention_mask")
    prepared = prepared_attention_mask(model, mask)
    if prepared is None or bool(mask.all()):
        return False
    was_training = model.training
    model.eval()
    try:
        plain = model(attention_mask=mask, output_hidden_states=True, **inputs)
        other = model(attention_mask=prepared, output_hidden_states=True, **inputs)
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    tol = 1e-4 if plain.logits.dtype == torch.float32 else 2e-2
    pairs = [(plain.logits, other.logits)] + list(zip(plain.hidden_states, other.hidden_states))
    keep = mask.bool()  # (B, T): padded positions' states are never read (pooling masks them)
    return all(torch.allclose(a[keep].float() if a.ndim == 3 else a.float(), b[keep].float() if b.ndim == 3 else b.float(),
                              rtol=tol, atol=tol) for a, b in pairs)
