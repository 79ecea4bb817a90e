"""Attention-kernel choice for the models this package runs (engines and distillation alike)."""

from __future__ import annotations

import contextlib

import torch


def attention_kernels(choice: str, device: torch.device):
    """A context that limits ``scaled_dot_product_attention``: the hf engine's LM steps, teacher scoring
    (``transfer.steered.sdpa``) and distillation steps (``train.sdpa``) run inside it.

    ``"no_cudnn"`` allows flash, memory-efficient and math kernels but not cuDNN's. cuDNN's fused
    attention builds an execution plan the first time it sees an input shape, and decoding rarely
    repeats one: the teacher gets a new ``(sequences, width)`` almost every forward and the LM's key
    length grows by one every step, so plan building can cost more host time than the kernels save
    (``benchmarks/teacher_forward.py`` measures it). ``"any"`` leaves the choice to torch. Models that
    do not use SDPA, and CPUs, are not affected.
    """
    if choice == "any" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def set_matmul_precision(choice: str, device: torch.device) -> bool:
    """``torch.set_float32_matmul_precision(choice)`` (process-wide) when ``device`` is a GPU; returns
    whether it was set. ``"high"`` lets CUDA's float32 matrix products use TensorFloat-32 tensor cores
    (inputs rounded to a 10-bit mantissa, float32 accumulation). On CPUs torch maps the same setting
    to oneDNN's reduced-precision modes, so CPU runs keep torch's own setting and stay full float32."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision(choice)
    return True
