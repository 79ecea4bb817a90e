"""Distilling the student on a transfer set: the per-worker engine (no Ray here).

The Ray Train loop (:mod:`dfkd_ray.orchestration.train`) and the GPU benchmarks (no Ray) both
drive :class:`Distiller`; one :meth:`Distiller.step` is one optimiser step on one batch of texts:

* ``amalgamation.method: stratanet``: frozen teachers (no grad) -> fitted confidence statistics
  -> ST-amalg -> block L2 + confidence-weighted KL (StrataNet Eq. 2-8,
  :func:`~dfkd_ray.models.amalgamator.amalgamation_step`);
* ``vanilla``: KL to one softmax over the concatenated teacher logits
  (:func:`~dfkd_ray.math.losses.concat_target`), the baseline of StrataNet Table 3.

Optimiser: AdamW (weight decay on weights, not on biases and norms), linear warmup over
``train.warmup_epochs`` then linear decay to 0, gradient clipping at ``train.grad_clip``; defaults
are StrataNet's appendix (lr 2e-5, batch 16, 10 epochs, 2 warmup epochs). The appendix does not
say whether the warmup counts in epochs or steps, nor the decay; we take epochs and linear decay.

The number of blocks ``N`` is the student's kept depth (one block per student layer); every
teacher is pooled into the same ``N`` blocks (:func:`~dfkd_ray.math.blocks.partition_layers`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dfkd_ray.config import JobConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.losses import concat_target, kd_loss
from dfkd_ray.models.kernels import attention_kernels

CHECKPOINT_STATE = "state.json"


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps a run makes (per worker; every worker makes the same number)."""

    rows: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, rows: int, cfg: JobConfig, world_size: int = 1) -> "StepPlan":
        if rows < world_size:
            raise ValueError(f"the transfer set has {rows} training rows for {world_size} train workers; make a "
                             "larger set (transfer.samples_per_class) or use fewer ray.num_train_workers")
        t = cfg.train
        per_epoch = max(1, (rows // world_size) // t.batch_size)  # full batches only: equal on every worker
        total = max(1, math.ceil(t.epochs * per_epoch))
        return cls(rows, world_size, per_epoch, total, min(total - 1, round(t.warmup_epochs * per_epoch)))

    @classmethod
    def after_stream(cls, rows: int, cfg: JobConfig, world_size: int, *, streamed_steps: int,
                     warmup_steps: int) -> "StepPlan":
        """The plan of the epochs after a streamed first one (``train.stream_from_generation``).

        The streamed epoch was planned on the planned request count and made ``streamed_steps``
        steps; the remaining ``epochs - 1`` epochs read the finished set's ``rows``, so they count
        exactly. Warmup keeps the streamed plan's step count; the linear decay ends at the new total.
        """
        base = cls.of(rows, cfg, world_size)
        total = max(streamed_steps, streamed_steps + math.ceil((cfg.train.epochs - 1) * base.steps_per_epoch))
        return cls(rows, world_size, base.steps_per_epoch, total, max(0, min(warmup_steps, total - 1)))


def student_num_blocks(cfg: JobConfig) -> int:
    """``N``: the student's kept depth, read from its ``config.json`` (no weights loaded)."""
    from dfkd_ray.preflight import read_model_config
    from dfkd_ray.models.student import select_layers

    if cfg.student.path is None:
        raise ValueError("student.path is not set: point it at a local HF encoder directory")
    total = int(read_model_config(cfg.student.path)["num_hidden_layers"])
    return len(select_layers(total, cfg.student.layers, cfg.student.num_layers))


def heldout_rows(table, teacher_names: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """Each teacher's held-out texts and their target classes (``D_k'``, StrataNet section 5.1)."""
    texts = {n: [] for n in teacher_names}
    classes = {n: [] for n in teacher_names}
    for text, teacher, cls_, held in zip(*(table.column(c).to_pylist()
                                           for c in ("text", "teacher", "teacher_class", "heldout"))):
        if held and teacher in texts:
            texts[teacher].append(text)
            classes[teacher].append(cls_)
    return texts, classes


def fit_confidence(cfg: JobConfig, table, teachers: dict) -> dict:
    """Fit every teacher's confidence statistics on its held-out rows of the transfer set."""
    from dfkd_ray.models.amalgamator import fit_estimators

    texts, classes = heldout_rows(table, list(teachers))
    need = max(8, cfg.amalgamation.calibration_folds + 2)  # a cross-fitted fold split needs F + 2 rows
    few = {n: len(v) for n, v in texts.items() if len(v) < need}
    if few:
        raise ValueError(f"too few held-out rows to fit confidence statistics: {few} (need >= {need} per teacher "
                         f"with amalgamation.calibration_folds {cfg.amalgamation.calibration_folds}). "
                         "Raise transfer.heldout_fraction or transfer.samples_per_class, or lower calibration_folds")
    return fit_estimators(teachers, texts, classes, cfg=cfg.amalgamation, seed=cfg.seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
        self.optimizer = torch.optim.AdamW(_param_groups(module, cfg.train.weight_decay), lr=cfg.train.learning_rate)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, plan.warmup_steps, plan.total_steps)
        self.step_count = 0
        self.label_index = [torch.tensor(self.space.teacher_to_global[n], device=self.device) for n in self.names]

    def losses(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The losses and diagnostics of one batch (no optimiser step)."""
        from dfkd_ray.models.amalgamator import amalgamation_step, run_teachers

        texts = [str(t) for t in texts]
        if not self.vanilla:
            return amalgamation_step(self.model, texts, estimators=self.estimators, teachers=self.teachers)
        outs = run_teachers(self.teachers, texts, self.names)
        target = concat_target([outs[n].logits.to(self.device) for n in self.names], self.label_index,
                               self.space.num_labels, self.cfg.amalgamation.temperature)  # (B, C)
        logits = self.model(**self.student.tokenize(texts)).logits  # (B, C)
        loss = kd_loss(logits, target, self.cfg.amalgamation.temperature)
        with torch.no_grad():
            agreement = (logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss": loss, "kd": loss.detach(), "agreement": agreement}

    def step(self, texts: Sequence[str]) -> dict[str, float]:
        """One optimiser step on a batch of texts; returns the batch's metrics as floats."""
        self.model.train()
        with attention_kernels(self.cfg.train.sdpa, self.device):
            losses = self.losses(texts)
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"non-finite loss {losses['loss'].item()} at step {self.step_count}; lower "
                                         "train.learning_rate or check the transfer set")
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out.update(grad_norm=float(grad_norm), lr=self.scheduler.get_last_lr()[0], step=self.step_count)
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


def iterate_epochs(batches_of_epoch: Callable[[int], object], plan: StepPlan, *, start_epoch: int = 0,
                   skip_batches: int = 0, start_step: Optional[int] = None):
    """Yield ``(epoch, batch_in_epoch, batch)`` until ``plan.total_steps`` batches have been given.

    ``batches_of_epoch(e)`` returns an iterable of batches for epoch ``e`` (seeded per epoch); on
    resume, the first ``skip_batches`` batches of ``start_epoch`` are read and dropped (cheap: no
    teacher runs), so the run continues where the checkpoint left it. ``start_step``: the steps
    already made (default ``start_epoch * steps_per_epoch + skip_batches``; after a streamed first
    epoch that made fewer steps than a full one, the checkpoint's step count).
    """
    given = start_epoch * plan.steps_per_epoch + skip_batches if start_step is None else start_step
    epoch = start_epoch
    while given < plan.total_steps:
        read = 0
        for i, batch in enumerate(batches_of_epoch(epoch)):
            read = i + 1
            if i >= plan.steps_per_epoch or given >= plan.total_steps:
                break
            if epoch == start_epoch and i < skip_batches:
                continue
            yield epoch, i, batch
            given += 1
        if read == 0:  # no full batch: looping on would never end
            raise ValueError(f"epoch {epoch} gave no full batch of train.batch_size rows (the plan counted "
                             f"{plan.rows} rows over {plan.world_size} worker(s)); lower train.batch_size or "
                             "make a larger transfer set")
        epoch += 1


def iterate_stream(batches, plan: StepPlan, *, start_step: int = 0, skip_batches: int = 0,
                   device: str | torch.device = "cpu"):
    """Yield ``(batch_in_epoch, batch)`` of a streamed epoch (the live generation pipeline), then drain it.

    The stream's length is not known ahead (requests given up make fewer rows than planned, and
    workers' splits may differ), so before each batch every worker is asked whether it has one
    (:func:`all_workers_have`): all stop together at the shortest split, making the same number of
    DDP steps. Batches stop too at ``plan.total_steps`` (counting ``start_step`` made before) and
    after ``plan.steps_per_epoch``. The rest of the stream is then read without being yielded, so
    the generator actors finish every shard. On resume, the first ``skip_batches`` are dropped.
    """
    it = iter(batches)
    for _ in range(skip_batches):
        next(it, None)
    index, given = skip_batches, start_step
    while given < plan.total_steps and index < plan.steps_per_epoch:
        batch = next(it, None)
        if not all_workers_have(batch is not None, device):
            break
        yield index, batch
        index += 1
        given += 1
    for _ in it:
        pass


def prefetch(iterable, size: int = 2):
    """Iterate ``iterable`` in a background thread from now on, up to ``size`` items ahead; returns
    an iterator over the same items (an exception raised there is raised here).

    A streamed epoch starts its generation pipeline this way before the worker builds its models,
    so the generator actors (an LM, perhaps a vLLM engine) start up meanwhile, not after.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=size)
    end = object()

    def run():
        try:
            for item in iterable:
                q.put((item, None))
            q.put((end, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((end, e))

    threading.Thread(target=run, name="prefetch", daemon=True).start()

    def items():
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item

    return items()


def all_workers_have(has_batch: bool, device: str | torch.device = "cpu") -> bool:
    """True when every DDP worker has a next batch (a MIN all-reduce of ``has_batch``).

    A stream's epoch has no length known in advance, and a worker whose split runs dry must not
    leave the others waiting in DDP's gradient all-reduce: each step asks first, and all stop
    together at the shortest split. Without a process group (one worker) it is ``has_batch``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train_in_process(cfg: JobConfig, texts: Sequence[str], *, device: str | torch.device = "cpu",
                     teachers: Optional[dict] = None, estimators: Optional[dict] = None, world_size: int = 1,
                     on_epoch: Optional[Callable[[int, dict], None]] = None) -> tuple["Distiller", dict]:
    """Train a student on ``texts`` in this process, as ``world_size`` Ray Train workers would.

    For benchmarks without Ray: the step plan of ``world_size`` workers, each step on their batches
    together (``train.batch_size * world_size`` rows, full batches only), every epoch shuffled with
    the per-epoch seed of the Ray loop (``seed * 1000 + epoch``). ``on_epoch(epoch, metrics)`` is
    called after each epoch's last step. Returns the distiller and the last step's metrics.
    """
    texts = list(texts)
    plan = StepPlan.of(len(texts), cfg, world_size)
    distiller = Distiller(cfg, plan, device=device, teachers=teachers, estimators=estimators)
    size = cfg.train.batch_size * world_size

    def epoch_batches(epoch: int):
        order = list(range(len(texts)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield [texts[i] for i in order[start:start + size]]

    metrics: dict = {}
    for epoch, index, batch in iterate_epochs(epoch_batches, plan):
        metrics = distiller.step(batch)
        if on_epoch is not None and index + 1 == plan.steps_per_epoch:
            on_epoch(epoch, metrics)
    return distiller, metrics


class MetricsLog:
    """Training metrics as JSONL (one line per report) and a loss-curve PNG at the end."""

    def __init__(self, path: str | Path, *, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # drop what a failed attempt logged after the checkpoint it resumes from
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.start = time.perf_counter()

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, png: str | Path, title: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read()
        keys = [k for k in ("loss", "kd", "block", "agreement", "target_spread", "lr") if any(k in r for r in rows)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return Path(png)
