"""CUDA-stream helpers of the Hugging Face engine: decoding parts that take turns at their GPU waits.

A batch may decode as several parts (``SteeredConfig.decode_parts``), each a generator that yields a
:func:`gpu_mark` just before it would wait for the GPU; :func:`interleave` runs the parts, each on
its own CUDA stream, so one part's host work runs while another part's kernels keep the GPU busy.
:func:`covered` measures how long any of a set of timed spans was running (teacher forwards on
several streams overlap).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch


def covered(spans: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gpu_mark(device: torch.device) -> Optional[torch.cuda.Event]:
    """A CUDA event recorded on the current stream (``None`` off CUDA): what a decoding part yields
    to :func:`interleave` before it waits for the GPU."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def interleave(parts: Sequence, device: torch.device) -> None:
    """Run decoding coroutines to the end, switching between them where they would wait for the GPU.

    Each part is a generator that yields a :func:`gpu_mark` just before it synchronises with the GPU
    (reading its candidates back, reading its draws back). On CUDA each part runs on its own stream and
    the next part resumed is one whose awaited work has finished (the first in line when none has),
    so one part's host work -- building teacher inputs, row bookkeeping, advancing the token map --
    and its LM step run while another part's teacher forwards keep the GPU busy. A part reads only
    its own tensors, so the interleaving changes timing, not results. Off CUDA the parts simply take
    turns.
    """
    if len(parts) == 1:
        for _ in parts[0]:
            pass
        return
    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    streams = [torch.cuda.Stream(device) for _ in parts] if cuda else [None] * len(parts)
    for s in streams:
        if s is not None:
            s.wait_stream(main)  # the parts' inputs were made on the main stream
    waiting: list[tuple[int, Optional[torch.cuda.Event]]] = [(i, None) for i in range(len(parts))]
    while waiting:
        pick = 0
        if cuda:  # the first part whose GPU work is done; else the one queued longest
            pick = next((j for j, (_, ev) in enumerate(waiting) if ev is None or ev.query()), 0)
        i, _ = waiting.pop(pick)
        with torch.cuda.stream(streams[i]) if cuda else contextlib.nullcontext():
            try:
                waiting.append((i, next(parts[i])))
            except StopIteration:
                pass
    for s in streams:
        if s is not None:
            main.wait_stream(s)
