"""Per-row steering state of a vLLM persistent batch, kept exact under vLLM's batch updates.

vLLM V1 runs a batch-level logits processor: ``apply(logits)`` sees ``(num_reqs, V)`` logits whose
row ``i`` is whichever request sits in slot ``i`` of the engine's persistent batch now. Before a
step whose batch changed, ``update_state(BatchUpdate)`` reports the changes, to be processed in
this order (vLLM 0.26.0, ``vllm/v1/sample/logits_processor/interface.py``, ``BatchUpdate``: "removed,
added, moved"):

- ``removed``: slots whose request left (finished, aborted or preempted);
- ``added``: ``(slot, SamplingParams, prompt_ids, output_ids)``; a new request, or a preempted one
  coming back with the tokens it already has. ``output_ids`` is the engine's live list, appended
  every step: read it when scoring, in ``apply``, not in ``update_state`` (with async scheduling
  its last entry can still be a ``-1`` placeholder there; vLLM repairs it before sampling,
  ``gpu_input_batch.py`` ``update_async_output_token_ids``). An added slot may already hold a
  request: the new one replaces it;
- ``moved``: ``(a, b, UNIDIRECTIONAL)``: the request in ``a`` now sits in ``b`` (whatever was in
  ``b`` is gone) and ``a`` is empty -- ``InputBatch.condense`` slides the last requests into the
  holes that removals left; ``(a, b, SWAP)``: ``a`` and ``b`` trade requests.

``update_state(None)`` means no membership change. A slot freed by ``removed`` and refilled in the
same step appears only in ``added`` (``BatchUpdateBuilder.pop_removed`` in ``_register_add_request``).

This module is plain Python: no vLLM import, so the bookkeeping is tested on CPU against a model of
the batch as a list (``tests/generation/test_vllm.py``). The adapter in
:mod:`dfkd_ray.generation.vllm` feeds it vLLM's real ``BatchUpdate`` objects, whose fields
have the same names; a direction is vLLM's ``MoveDirectionality`` or one of the strings below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

UNIDIRECTIONAL = "UNIDIRECTIONAL"
SWAP = "SWAP"

STEER_KEY = "dfkd_steer"
"""Key of ``SamplingParams.extra_args`` holding a request's steering: a dict of plain Python types
``{"teacher": str, "target": int, "control_strength": float, "top_m": int}``."""


def direction(d: Any) -> str:
    """``UNIDIRECTIONAL`` or ``SWAP`` from vLLM's ``MoveDirectionality`` member or such a string."""
    name = getattr(d, "name", d)
    if name not in (UNIDIRECTIONAL, SWAP):
        raise ValueError(f"unknown move directionality {d!r}")
    return name


@dataclass(frozen=True)
class SteerArgs:
    """One request's steering, as carried in ``SamplingParams.extra_args[STEER_KEY]``."""

    teacher: str
    target: int
    control_strength: float
    top_m: int

    def to_extra_args(self) -> dict:
        """Plain Python types only: numpy scalars (from Ray Data batches) would break vLLM's
        serialization of the request."""
        return {STEER_KEY: {"teacher": str(self.teacher), "target": int(self.target),
                            "control_strength": float(self.control_strength), "top_m": int(self.top_m)}}


def parse_steer_args(extra_args: Optional[dict]) -> Optional[SteerArgs]:
    """A request's :class:`SteerArgs`, or None when it carries none (the processor leaves it alone).

    Raises ``ValueError`` naming every bad field: vLLM calls this through the processor's
    ``validate_params`` before the request reaches the engine.
    """
    if not extra_args or STEER_KEY not in extra_args:
        return None
    raw = extra_args[STEER_KEY]
    if not isinstance(raw, dict):
        raise ValueError(f"extra_args[{STEER_KEY!r}] must be a dict, got {type(raw).__name__}")
    bad = []
    unknown = sorted(set(raw) - {"teacher", "target", "control_strength", "top_m"})
    if unknown:
        bad.append(f"unknown keys {unknown}")
    teacher, target = raw.get("teacher"), raw.get("target")
    strength, top_m = raw.get("control_strength"), raw.get("top_m")
    if not (isinstance(teacher, str) and teacher):
        bad.append(f"teacher must be a non-empty str, got {teacher!r}")
    if not (type(target) is int and target >= 0):
        bad.append(f"target must be an int >= 0, got {target!r} ({type(target).__name__})")
    if not (type(strength) in (int, float) and math.isfinite(strength) and strength >= 0):
        bad.append(f"control_strength must be a finite float >= 0, got {strength!r} ({type(strength).__name__})")
    if not (type(top_m) is int and top_m >= 1):
        bad.append(f"top_m must be an int >= 1, got {top_m!r} ({type(top_m).__name__})")
    if bad:
        raise ValueError(f"bad extra_args[{STEER_KEY!r}]: " + "; ".join(bad))
    return SteerArgs(teacher, target, float(strength), top_m)


@dataclass(eq=False)
class RowState:
    """One steered request while it sits in the batch.

    ``output_ids`` is vLLM's live list (never copied). ``slot`` and ``seen`` belong to the engine:
    where the row's teacher-side text lives and how many output ids it holds.
    """

    args: SteerArgs
    prompt_ids: list[int]
    output_ids: list[int]
    slot: int = -1
    seen: int = 0

    @property
    def teacher(self) -> str:
        return self.args.teacher


def row_from_added(params: Any, prompt_ids: Optional[Sequence[int]], output_ids: list[int]) -> Optional[RowState]:
    """The state of an added request (None if it is not steered); ``params`` has ``extra_args``."""
    args = parse_steer_args(getattr(params, "extra_args", None))
    if args is None:
        return None
    return RowState(args, list(prompt_ids or []), output_ids)


class RowBook:
    """Steered rows by batch slot, updated exactly as vLLM moves requests around.

    Args:
        make: ``(params, prompt_ids, output_ids) -> RowState | None`` for an added request.
    """

    def __init__(self, make: Callable[[Any, Optional[Sequence[int]], list[int]], Optional[RowState]] = row_from_added):
        self.make = make
        self.rows: dict[int, RowState] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def update(self, batch_update: Any) -> list[RowState]:
        """Apply one ``BatchUpdate`` (``removed``, ``added``, ``moved``, ``batch_size``), or None.

        Returns the states that left the batch (removed, replaced by an added request, or
        overwritten by a one-way move), so the engine can free what they hold.
        """
        if batch_update is None:
            return []
        rows = self.rows
        gone: list[RowState] = []

        def drop(state: Optional[RowState]) -> None:
            if state is not None:
                gone.append(state)

        for i in batch_update.removed:
            drop(rows.pop(i, None))
        for i, params, prompt_ids, output_ids in batch_update.added:
            drop(rows.pop(i, None))
            state = self.make(params, prompt_ids, output_ids)
            if state is not None:
                rows[i] = state
        for a, b, d in batch_update.moved:
            sa, sb = rows.pop(a, None), rows.pop(b, None)
            if sa is not None:
                rows[b] = sa
            if direction(d) == SWAP:
                if sb is not None:
                    rows[a] = sb
            else:
                drop(sb)
        size = getattr(batch_update, "batch_size", None)
        if size is not None and rows and max(rows) >= size:
            raise RuntimeError(f"row bookkeeping out of step with vLLM: steered rows at slots "
                               f"{sorted(i for i in rows if i >= size)} but the batch has {size} requests")
        return gone

    def slots(self) -> list[int]:
        """Occupied slots, ascending."""
        return sorted(self.rows)

    def items(self) -> Iterable[tuple[int, RowState]]:
        return ((i, self.rows[i]) for i in sorted(self.rows))
