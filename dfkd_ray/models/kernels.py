"""Attention-kernel choice for the models this package runs (engines and distillation alike)."""

from __future__ import annotations

import contextlib

import torch


def attention_kernels(choice: str, device: torch.device):
    """A context that limits ``scaled_dot_product_attention``: the hf engine's LM steps, teacher scoring
    (``transfer.steered.sdpa``) and distillation steps (``train.sdpa``) run inside it.

    ``"no_cudnn"`` allows flash, memory-efficient and math kernels but not cuDNN's. cuDNN's fused
    attention builds an execution plan the first time it sees an input shape, and decoding rarely
    repeats one: the teacher gets a new ``(sequences, width)`` almost every forward (H100, BERT-base
    teacher, ``benchmarks/teacher_forward.py``: a guided run took 43.7 s the first time and 25.0 s when
    repeated with the same shapes), and the LM's key length grows by one every step (GPT-2-small
    shape, 256 rows: 5 ms of host time per layer and step building plans, 30 ms a step, against
    0.16 s of GPU kernels for 64 steps). Distillation pads each batch to its longest text: under the
    profiler (two MiniLM-6 teachers in bf16, a 3-layer student, batch 32) cuDNN's attention took 1.12
    s of the 2.36 s of host time of 20 steps, but without the profiler a whole 840-step row took
    about as long either way (84.5 s without cuDNN, 85.6 s with it, ``benchmarks/agnews.py``; its step
    is bound by per-op host time elsewhere). ``"any"`` leaves the choice to torch. Models that do not
    use SDPA, and CPUs, are not affected.
    """
    if choice == "any" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
