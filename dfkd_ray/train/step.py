"""Distilling the student: the per-worker step, its checkpoints and the export (no Ray here).

The Ray Train loop (:mod:`dfkd_ray.orchestration.train`) and the benchmarks (no Ray) both drive
:class:`Distiller`; one :meth:`Distiller.step` is one optimiser step on one batch of texts:

* ``amalgamation.method: stratanet``: frozen teachers (no grad) -> fitted confidence statistics
  -> ST-amalg -> block L2 + confidence-weighted KL (StrataNet Eq. 2-8,
  :func:`~dfkd_ray.models.amalgamator.amalgamation_step`);
* ``vanilla``: KL to one softmax over the concatenated teacher logits
  (:func:`~dfkd_ray.math.losses.concat_target`), the baseline of StrataNet Table 3.

Precision (``train.precision``): ``bfloat16`` (or ``auto`` on CUDA) runs the student and ST-amalg under
bfloat16 autocast, with float32 weights and optimiser state; the teachers run outside it in their own
dtype, the confidence statistics and the losses in float32. The default stays ``float32``, the
precision every recorded quality number was trained in. A step reads the GPU's results once, after the
backward pass (its metrics and the finite-loss check), so the host queues the whole forward and
backward pass without waiting.

Compilation (``train.compile``): the student's and the teachers' models run under ``torch.compile``
in the given mode; the confidence statistics, ST-amalg and the losses stay eager.
``train.pad_to_multiple_of`` rounds each batch's token length up, so a compiled step meets a few
input shapes instead of one per longest text.

Optimiser: AdamW (weight decay on weights, not on biases and norms; fused on CUDA), linear warmup over
``train.warmup_epochs`` then linear decay to 0, gradient clipping at ``train.grad_clip``; defaults
are StrataNet's appendix (lr 2e-5, batch 16, 10 epochs, 2 warmup epochs). The appendix does not
say whether the warmup counts in epochs or steps, nor the decay; we take epochs and linear decay.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dfkd_ray.config import JobConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.losses import concat_target, kd_loss
from dfkd_ray.models.inputs import enable_prepared_mask, pin_for, to_device
from dfkd_ray.models.kernels import attention_kernels, set_matmul_precision
from dfkd_ray.train.epochs import StepPlan, iterate_epochs, prefetch

CHECKPOINT_STATE = "state.json"


def autocast_dtype(precision: str, device: torch.device | str) -> Optional[torch.dtype]:
    """``train.precision`` -> the autocast dtype of a step, or None (float32): ``auto`` is bfloat16 on
    CUDA and float32 elsewhere (bfloat16 autocast on a CPU is slower than float32 there)."""
    if precision == "bfloat16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class EncodedBatch:
    """One batch tokenized for the student and every teacher, as host tensors (pinned for a GPU):
    :meth:`Distiller.encode` makes it away from the step, :meth:`Distiller.step` copies it over."""

    texts: list[str]
    student: dict[str, torch.Tensor]  # (B, T_s) each
    teachers: dict[str, dict[str, torch.Tensor]]  # teacher name -> (B, T_k) each
    source_teachers: Optional[torch.Tensor] = None  # (B,) index of the teacher each row was made for

    def __len__(self) -> int:
        return len(self.texts)


class Distiller:
    """Student (+ ST-amalg), frozen teachers, estimators, optimiser and schedule of one worker.

    Args:
        cfg: the job config.
        plan: the step plan (:meth:`StepPlan.of`).
        device: where the student trains and the teachers run.
        teachers: loaded teachers (``num_blocks`` = the student's depth); loaded from the config if None.
        estimators: fitted confidence statistics (``stratanet`` only).
        wrap: wraps the trainable module, e.g. ``ray.train.torch.prepare_model`` for DDP.
    """

    def __init__(self, cfg: JobConfig, plan: StepPlan, *, device: str | torch.device = "cpu",
                 teachers: Optional[dict] = None, estimators: Optional[dict] = None,
                 wrap: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None):
        from transformers import get_linear_schedule_with_warmup

        from dfkd_ray.models.amalgamator import Amalgamator
        from dfkd_ray.models.student import Student
        from dfkd_ray.models.teacher import load_teachers

        self.cfg, self.plan, self.device = cfg, plan, torch.device(device)
        a = cfg.amalgamation
        self.vanilla = a.method == "vanilla"
        self.space = UnionLabelSpace.from_teachers(cfg.teacher_labels())
        torch.manual_seed(cfg.seed)  # classifier head, projections and ST-amalg start the same on every worker
        student = Student.from_config(cfg.student, labels=self.space.names, amalg_dim=a.amalg_dim)
        self.teachers = teachers if teachers is not None else load_teachers(
            cfg.teachers, num_blocks=student.num_blocks, device=self.device)
        self.names = [t.name for t in cfg.teachers]
        if self.vanilla:
            student.proj.requires_grad_(False)  # no block loss: keep DDP from waiting for their gradients
            module: torch.nn.Module = student
            self.estimators = None
        else:
            if estimators is None:
                raise ValueError("amalgamation.method stratanet needs fitted confidence statistics (estimators)")
            module = Amalgamator.build(student, {n: self.teachers[n] for n in self.names}, self.space, a)
            if a.alpha == 0:
                module.fusion.requires_grad_(False)
                student.proj.requires_grad_(False)
            self.estimators = {n: e.to(self.device) for n, e in estimators.items()}
        module.to(self.device)
        self.student = student
        self.module = module
        self.model = wrap(module) if wrap is not None else module
        # fused: one CUDA kernel updates every parameter of a group (elsewhere torch's default loop)
        self.optimizer = torch.optim.AdamW(_param_groups(module, cfg.train.weight_decay), lr=cfg.train.learning_rate,
                                           fused=self.device.type == "cuda")
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, plan.warmup_steps, plan.total_steps)
        self.step_count = 0
        self.label_index = [torch.tensor(self.space.teacher_to_global[n], device=self.device) for n in self.names]
        self.autocast_dtype = autocast_dtype(cfg.train.precision, self.device)
        set_matmul_precision(cfg.train.matmul_precision, self.device)  # process-wide on a GPU: set by every distiller
        for model in [self.student, *(self.teachers[n] for n in self.names)]:
            enable_prepared_mask(model)  # 4D masks where they give the same outputs: no host read per forward
        if cfg.train.compile != "none":  # after the eager mask probe
            # the student in place (its state_dict keys, checkpoints and export unchanged); the teachers as
            # compiled views of the same weights, so a caller's teachers stay eager
            self.student.model.compile(mode=cfg.train.compile)
            self.teachers = {**self.teachers, **{n: self.teachers[n].compiled(cfg.train.compile) for n in self.names}}
        self.pin = pin_for(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The student's compute precision (``train.precision``): bfloat16 autocast, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode(self, texts: Sequence[str], source_teachers: Optional[Sequence[str]] = None) -> EncodedBatch:
        """Tokenize a batch for the student and every teacher, on the host (pinned when training on a
        GPU). Thread-safe against :meth:`step`: training calls it in Ray Data's prefetch threads, so a
        batch is tokenized while the previous step runs.

        ``source_teachers``: the name of the teacher each row was made for (the transfer set's
        ``teacher`` column; empty for a row made for no teacher, e.g. a corpus document of
        ``train.corpus_share``), which ``amalgamation.kd_source_weight`` reads."""
        texts = [str(t) for t in texts]
        sources = None
        if source_teachers is not None:
            sources = [str(n) for n in source_teachers]
            if len(sources) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(sources)} source teachers")
            unknown = sorted(set(sources) - set(self.names) - {""})
            if unknown:
                raise ValueError(f"rows made for teachers {unknown}, which the config does not name "
                                 f"(teachers: {self.names}): the transfer set belongs to another job")
            sources = torch.tensor([self.names.index(n) if n else -1 for n in sources], dtype=torch.long)
            sources = sources.pin_memory() if self.pin else sources
        encoded: dict[tuple, dict[str, torch.Tensor]] = {}  # one tokenization per distinct encoding
        multiple = self.cfg.train.pad_to_multiple_of

        def inputs(model) -> dict[str, torch.Tensor]:
            key = model.encoding_key
            if key not in encoded:
                encoded[key] = model.host_inputs(texts, pin=self.pin, pad_to_multiple_of=multiple)
            return encoded[key]

        return EncodedBatch(texts=texts, student=inputs(self.student),
                            teachers={n: inputs(self.teachers[n]) for n in self.names}, source_teachers=sources)

    def losses(self, batch: Sequence[str] | EncodedBatch) -> dict[str, torch.Tensor]:
        """The losses and diagnostics of one batch of texts, or of an :meth:`encode`-d one (no optimiser
        step): the teachers in their own dtype, then the student (and ST-amalg) under :meth:`autocast`."""
        from dfkd_ray.models.amalgamator import amalgamation_step

        enc = batch if isinstance(batch, EncodedBatch) else self.encode(batch)
        copies: dict[tuple, dict[str, torch.Tensor]] = {}  # models sharing an encoding share its copy

        def on(inputs: dict, device: torch.device) -> dict[str, torch.Tensor]:
            key = (id(inputs), device)
            if key not in copies:
                copies[key] = to_device(inputs, device)
            return copies[key]

        with torch.no_grad():
            outs = {n: self.teachers[n].forward_ids(**on(enc.teachers[n], self.teachers[n].device)) for n in self.names}
        student_inputs = on(enc.student, self.device)
        with self.autocast():
            if not self.vanilla:
                return amalgamation_step(self.model, enc.texts, estimators=self.estimators, teacher_outputs=outs,
                                         student_inputs=student_inputs, source_teachers=enc.source_teachers)
            logits = self.model(**student_inputs).logits.float()  # (B, C)
        target = concat_target([outs[n].logits.to(self.device) for n in self.names], self.label_index,
                               self.space.num_labels, self.cfg.amalgamation.temperature)  # (B, C)
        loss = kd_loss(logits, target, self.cfg.amalgamation.temperature)
        with torch.no_grad():
            agreement = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss": loss, "kd": loss.detach(), "agreement": agreement}

    def step(self, batch: Sequence[str] | EncodedBatch) -> dict[str, float]:
        """One optimiser step on a batch of texts (or an :meth:`encode`-d batch); returns the batch's
        metrics as floats.

        The metrics are read from the device once, after the backward pass; a non-finite loss raises
        there, before the optimiser touches the weights."""
        self.model.train()
        with attention_kernels(self.cfg.train.sdpa, self.device):
            losses = self.losses(batch)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
        names = list(losses)
        values = torch.stack([losses[k].detach().float() for k in names] + [grad_norm.float()]).tolist()  # one read
        out = dict(zip(names, values[:-1]))
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite loss {out['loss']} at step {self.step_count}; lower "
                                     "train.learning_rate or check the transfer set")
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        out.update(grad_norm=values[-1], lr=self.scheduler.get_last_lr()[0], step=self.step_count)
        return out

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, **position) -> Path:
        """Student (+ ST-amalg), optimiser, schedule, step and ``position`` (e.g. epoch, batch) -> ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, directory / "model.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / "optimizer.pt")
        (directory / CHECKPOINT_STATE).write_text(json.dumps({"step": self.step_count, **position}))
        return directory

    def load_checkpoint(self, directory: str | Path) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; returns its state (``step`` and the position)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        self.module.load_state_dict(load_file(directory / "model.safetensors", device=str(self.device)))
        opt = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        state = json.loads((directory / CHECKPOINT_STATE).read_text())
        self.step_count = int(state["step"])
        return state

    def export(self, directory: str | Path) -> Path:
        """The student as a standard Hugging Face classifier directory (union ``id2label``)."""
        return self.student.save_pretrained(directory)


def train_in_process(cfg: JobConfig, texts: Sequence[str], *, device: str | torch.device = "cpu",
                     teachers: Optional[dict] = None, estimators: Optional[dict] = None, world_size: int = 1,
                     on_epoch: Optional[Callable[[int, dict], None]] = None,
                     source_teachers: Optional[Sequence[str]] = None) -> tuple[Distiller, dict]:
    """Train a student on ``texts`` in this process, as ``world_size`` Ray Train workers would.

    For benchmarks without Ray: the step plan of ``world_size`` workers, each step on their batches
    together (``train.batch_size * world_size`` rows, full batches only), every epoch shuffled with
    the per-epoch seed of the Ray loop (``seed * 1000 + epoch``), each batch tokenized in a background
    thread while the step before it runs. ``on_epoch(epoch, metrics)`` is
    called after each epoch's last step. ``source_teachers``: the teacher each text was made for (the
    transfer set's ``teacher`` column; ``amalgamation.kd_source_weight`` reads it). Returns the
    distiller and the last step's metrics.
    """
    texts = list(texts)
    sources = None if source_teachers is None else list(source_teachers)
    if sources is not None and len(sources) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(sources)} source teachers")
    plan = StepPlan.of(len(texts), cfg, world_size)
    distiller = Distiller(cfg, plan, device=device, teachers=teachers, estimators=estimators)
    size = cfg.train.batch_size * world_size

    def epoch_batches(epoch: int):
        order = list(range(len(texts)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        starts = range(0, len(order) - size + 1, size)
        batches = (distiller.encode([texts[i] for i in order[s:s + size]],
                                    None if sources is None else [sources[i] for i in order[s:s + size]])
                   for s in starts)
        return prefetch(batches, size=1)  # the next batch tokenized meanwhile

    metrics: dict = {}
    for epoch, index, batch in iterate_epochs(epoch_batches, plan):
        metrics = distiller.step(batch)
        if on_epoch is not None and index + 1 == plan.steps_per_epoch:
            on_epoch(epoch, metrics)
    return distiller, metrics
