"""AS-DFD (Ma et al., EMNLP 2020) inside training: each step crafts its batch of pseudo-embeddings
(the construction stage), then distils on it (no Ray here).

``transfer.source: embedding_guessing`` makes no text. Its transfer-set stage records an empty set
(:func:`record_no_text`) so the rest of a job (stage records, confidence, evaluation, export) runs
unchanged, and every optimiser step of :class:`EmbeddingGuessingDistiller` runs Algorithm 1 on
one batch:

1. **Construction** (:class:`Crafter`): pseudo-samples start as ``N(mu, sigma^2)`` draws under the
   alignment constraints (:mod:`dfkd_ray.math.embedding_guessing`); then ``rounds`` times
   (``n_iter``): ``teacher_steps`` Adam steps (``n_T``) lowering each sample's teacher cross-entropy
   toward its target class (Eq. 2), and ``adversarial_steps`` (``n_S``) raising the student's
   masked-embedding loss ``L_MASK`` (Eq. 3), with the student and ``W`` fixed. Adam's learning rate
   ``eta`` is fixed (appendix A.1); each objective has its own Adam state.
2. **Distillation**: ``L_KD = L_KL + alpha L_PT`` (Eq. 4-6) trains the student, ``L_MASK`` trains
   ``W`` only (Algorithm 1, lines 16-17); one AdamW step on their sum, with the job's schedule.

The pseudo-samples of a run are the rows a text source would make: the request table of
``transfer.samples_per_class`` per (teacher, class) (:func:`~dfkd_ray.transfer.requests.build_requests`),
its held-out requests set aside for the confidence statistics. Every epoch crafts each training
request anew (its starting point seeded by the request and the epoch), so ``train.epochs`` epochs
craft ``epochs x`` the training requests, and a job makes as many steps as a text source with the
same ``samples_per_class``, ``epochs`` and ``batch_size`` whose filters drop no row.
Each Ray Train worker crafts its own share of every epoch's requests.

**Several teachers** (the amalgamation adaptation): a request's pseudo-sample is crafted by its own
teacher toward one of that teacher's classes; every teacher then labels every sample, and the KD
target over the union labels follows ``amalgamation.method``: ``vanilla``, one softmax over the
concatenated teacher logits; ``stratanet``, the confidence-weighted mixture, with each teacher's
confidence statistics fitted on its block features of its own held-out pseudo-samples
(:func:`fit_crafted_confidence`: crafted like training's, without the adversarial steps, which need
the student that training makes). ``L_PT`` matches a sample's [CLS] state to the teacher that crafted
it. All teachers share one input-embedding space (tokenizer and embedding layer; the preflight
checks it), the student holds the first teacher's embedding layer, frozen.

A pseudo-sample lives in the space of the embedding layer's *output* (Eq. 1): teachers and student
run their transformer layers on it with the embedding layer bypassed
(:mod:`dfkd_ray.models.embedding_student`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from dfkd_ray.config import EmbeddingGuessingConfig, JobConfig
from dfkd_ray.confidence.estimator import teacher_confidences
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.math.amalgamation import kd_teacher_weights
from dfkd_ray.math.embedding_guessing import (align, cls_distance_loss, gather_positions, initial_content, input_loss,
                                              mask_positions, masked_embedding_loss)
from dfkd_ray.math.losses import concat_target, kd_loss, union_target
from dfkd_ray.models.embedding_student import (EmbeddingStudent, SpecialEmbeddings, special_embeddings,
                                               teacher_on_embeddings)
from dfkd_ray.train.epochs import StepPlan, iterate_epochs
from dfkd_ray.train.step import Distiller, _param_groups
from dfkd_ray.transfer.requests import Request, build_requests, is_heldout

SOURCE = "embedding_guessing"


@dataclass(frozen=True)
class PseudoSample:
    """One pseudo-sample to craft: its teacher, that teacher's target class, and the seed of its start."""

    teacher: str
    teacher_class: int
    seed: int


def sample_seed(request: Request, epoch: int) -> int:
    """The 63-bit seed of ``request``'s pseudo-sample in ``epoch`` (epoch -1: the held-out pass)."""
    digest = hashlib.blake2b(f"{request.seed}|{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def crafting_requests(cfg: JobConfig, *, heldout: bool) -> list[Request]:
    """The job's requests whose pseudo-samples train the student (``heldout=False``; with
    ``train.include_heldout`` all of them), or those held out for the confidence statistics."""
    labels = cfg.teacher_labels()
    requests = build_requests(labels, UnionLabelSpace.from_teachers(labels),
                              samples_per_class=cfg.transfer.samples_per_class, job_seed=cfg.seed,
                              class_weights=cfg.transfer.class_weights)
    fraction = cfg.transfer.heldout_fraction
    if heldout:
        return [r for r in requests if is_heldout(r, fraction)]
    return [r for r in requests if cfg.train.include_heldout or not is_heldout(r, fraction)]


def request_batches(requests: Sequence[Request], cfg: JobConfig, epoch: int, *, rank: int = 0, world_size: int = 1,
                    batch_size: Optional[int] = None):
    """One worker's batches of ``epoch``: the requests shuffled with the epoch's seed (``seed * 1000 +
    epoch``, as the text loop's shuffle), every ``world_size``-th from ``rank`` on, in full batches of
    ``batch_size`` (default ``train.batch_size``), each a list of :class:`PseudoSample`."""
    size = batch_size or cfg.train.batch_size
    order = list(range(len(requests)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    mine = [requests[i] for i in order[rank::world_size]]
    for start in range(0, len(mine) - size + 1, size):
        yield [PseudoSample(r.teacher, r.teacher_class, sample_seed(r, epoch)) for r in mine[start:start + size]]


@dataclass
class Crafted:
    """A crafted batch.

    Attributes:
        embeds: ``(B, l, d)`` the pseudo-embeddings ``e`` (detached).
        attention_mask: ``(B, l)``.
        lengths: ``(B,)`` visible lengths.
        owner: ``(B,)`` index of the teacher that crafted each sample (config order).
        targets: ``(B,)`` each sample's target class among its teacher's classes.
        hit: share of the batch its teacher assigns to the target class, after construction.
        seed: the batch's seed (from its samples'), which seeds its masked positions.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    owner: torch.Tensor
    targets: torch.Tensor
    hit: float
    seed: int


class Crafter:
    """The construction stage (Algorithm 1, lines 3-13) for teachers that share one embedding layer.

    Args:
        teachers: loaded teachers by name, in config order (the first one's tokenizer and embedding
            layer give the [CLS]/[SEP]/padding/[MASK] vectors).
        settings: the ``transfer.embedding_guessing`` section.
        device: where crafting runs.
    """

    def __init__(self, teachers: Mapping[str, object], settings: EmbeddingGuessingConfig,
                 device: str | torch.device = "cpu"):
        self.teachers = dict(teachers)
        self.names = list(self.teachers)
        self.settings = settings
        self.device = torch.device(device)
        first = self.teachers[self.names[0]]
        self.specials: SpecialEmbeddings = special_embeddings(first.model, first.tokenizer, settings.length).to(
            self.device)
        self.width = int(self.specials.cls.shape[0])

    def start(self, samples: Sequence[PseudoSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's starting content ``(B, l, d)`` and visible length ``(B,)``, on the device."""
        s = self.settings
        content, lengths = initial_content([torch.Generator().manual_seed(p.seed) for p in samples], s.length,
                                           self.width, mean=s.mean, sigma=s.sigma, min_length=s.min_length)
        return content.to(self.device), lengths.to(self.device)

    def teacher_loss(self, e: torch.Tensor, mask: torch.Tensor, owner: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2 summed over the batch, each sample under its own teacher; and whether each sample's
        teacher predicts its target ``(B,)``."""
        loss, hit = e.new_zeros(()), torch.zeros_like(targets, dtype=torch.bool)
        for k, name in enumerate(self.names):
            rows = (owner == k).nonzero().squeeze(1)
            if rows.numel():
                out, _ = teacher_on_embeddings(self.teachers[name], e[rows], mask[rows], with_states=False)
                loss = loss + input_loss(out.logits, targets[rows])
                hit[rows] = out.logits.argmax(-1) == targets[rows]
        return loss, hit

    def craft(self, samples: Sequence[PseudoSample], student: Optional[EmbeddingStudent] = None) -> Crafted:
        """Craft ``samples``: ``rounds`` x (``teacher_steps`` toward the targets, then ``adversarial_steps``
        raising ``student``'s ``L_MASK``; none without a student). The student is run in eval mode and
        left as it was; its parameters get no gradient."""
        s = self.settings
        owner = torch.tensor([self.names.index(p.teacher) for p in samples], device=self.device)
        targets = torch.tensor([p.teacher_class for p in samples], device=self.device)
        content, lengths = self.start(samples)
        content.requires_grad_(True)
        sp = self.specials
        toward_targets = torch.optim.Adam([content], lr=s.learning_rate)
        against_student = torch.optim.Adam([content], lr=s.learning_rate)
        seed = sum(p.seed for p in samples) % (2 ** 63)
        masking = torch.Generator().manual_seed(seed)
        adversary = student is not None and s.adversarial_steps > 0
        was_training = student.training if student is not None else False
        if adversary:
            student.eval()
        try:
            for _ in range(s.rounds):
                for _ in range(s.teacher_steps):
                    e, mask = align(content, lengths, sp.cls, sp.sep, sp.pad)
                    loss, _ = self.teacher_loss(e, mask, owner, targets)
                    content.grad, = torch.autograd.grad(loss, content)
                    toward_targets.step()
                for _ in range(s.adversarial_steps if adversary else 0):
                    e, mask = align(content, lengths, sp.cls, sp.sep, sp.pad)
                    positions = mask_positions(lengths, masking)
                    out = student(e, mask, positions, sp.mask, train_head_only=False)
                    l_mask = masked_embedding_loss(gather_positions(e, positions), out.predicted)
                    grad, = torch.autograd.grad(l_mask, content)
                    content.grad = -grad  # ascend L_MASK
                    against_student.step()
        finally:
            if student is not None:
                student.train(was_training)
        with torch.no_grad():
            e, mask = align(content.detach(), lengths, sp.cls, sp.sep, sp.pad)
            _, hit = self.teacher_loss(e, mask, owner, targets)
        return Crafted(embeds=e, attention_mask=mask, lengths=lengths, owner=owner, targets=targets,
                       hit=float(hit.float().mean()), seed=seed)

    def mask_loss(self, student: EmbeddingStudent, crafted: Crafted, generator: torch.Generator) -> torch.Tensor:
        """``L_MASK`` (Eq. 3) of ``student`` on a crafted batch, masked positions drawn from ``generator``."""
        positions = mask_positions(crafted.lengths, generator)
        out = student(crafted.embeds, crafted.attention_mask, positions, self.specials.mask, train_head_only=True)
        return masked_embedding_loss(gather_positions(crafted.embeds, positions), out.predicted)


class EmbeddingGuessingDistiller(Distiller):
    """The AS-DFD worker: :class:`Distiller`'s step, checkpoints and export, on batches of
    :class:`PseudoSample` instead of texts (each step crafts its batch first).

    Args:
        cfg: the job config (``transfer.source: embedding_guessing``).
        plan: the step plan (:func:`crafting_plan`).
        device: where crafting and training run.
        teachers: loaded teachers (``num_blocks`` = the student's depth); loaded from the config if None.
        estimators: fitted confidence statistics (``amalgamation.method: stratanet`` only).
        wrap: wraps the trainable module (student classifier + ``W``), e.g. for DDP.
    """

    def __init__(self, cfg: JobConfig, plan: StepPlan, *, device: str | torch.device = "cpu",
                 teachers: Optional[dict] = None, estimators: Optional[dict] = None,
                 wrap: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None):
        from transformers import get_linear_schedule_with_warmup

        from dfkd_ray.models.teacher import load_teachers
        from dfkd_ray.train.epochs import student_num_blocks

        if cfg.transfer.source != SOURCE:
            raise ValueError(f"transfer.source is {cfg.transfer.source!r}: the embedding-guessing distiller needs "
                             f"{SOURCE!r}")
        self.cfg, self.plan, self.device = cfg, plan, torch.device(device)
        a = cfg.amalgamation
        self.vanilla = a.method == "vanilla"
        self.space = UnionLabelSpace.from_teachers(cfg.teacher_labels())
        self.names = [t.name for t in cfg.teachers]
        self.teachers = teachers if teachers is not None else load_teachers(
            cfg.teachers, num_blocks=student_num_blocks(cfg), device=self.device)
        if not self.vanilla:
            if estimators is None:
                raise ValueError("amalgamation.method stratanet needs fitted confidence statistics (estimators)")
            self.estimators = {n: e.to(self.device) for n, e in estimators.items()}
        else:
            self.estimators = None
        torch.manual_seed(cfg.seed)  # classifier head and W start the same on every worker
        self.student, module = EmbeddingStudent.build(cfg.student, self.space.names, self.teachers[self.names[0]],
                                                      amalg_dim=a.amalg_dim)
        module.to(self.device)
        self.module = module
        self.model = wrap(module) if wrap is not None else module
        self.crafter = Crafter({n: self.teachers[n] for n in self.names}, cfg.transfer.embedding_guessing, self.device)
        self.optimizer = torch.optim.AdamW(_param_groups(module, cfg.train.weight_decay), lr=cfg.train.learning_rate)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, plan.warmup_steps, plan.total_steps)
        self.step_count = 0
        self.label_index = [torch.tensor(self.space.teacher_to_global[n], device=self.device) for n in self.names]

    def craft(self, samples: Sequence[PseudoSample]) -> Crafted:
        """The construction stage on ``samples`` against the current student."""
        return self.crafter.craft(samples, self.module)

    def losses(self, samples: Sequence[PseudoSample]) -> dict[str, torch.Tensor]:
        """Craft the batch (:meth:`craft`), then its distillation losses (:meth:`distillation_losses`)."""
        return self.distillation_losses(self.craft(samples))

    def distillation_losses(self, crafted: Crafted) -> dict[str, torch.Tensor]:
        """The distillation stage on a crafted batch: ``loss`` = ``L_KL + alpha L_PT + L_MASK``
        (``L_MASK`` reaches ``W`` only), with ``kd``, ``pt``, ``mask``, ``agreement`` (student argmax =
        target argmax), ``hit`` (the construction's target hit rate) and, for stratanet, per teacher
        ``confidence/<name>`` and ``kd_weight/<name>``."""
        a, settings = self.cfg.amalgamation, self.cfg.transfer.embedding_guessing
        e, mask = crafted.embeds, crafted.attention_mask
        extra: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            outs = {n: teacher_on_embeddings(self.teachers[n], e, mask, with_states=True) for n in self.names}
            logits = [outs[n][0].logits for n in self.names]  # K x (B, C_k)
            if self.vanilla:
                target = concat_target(logits, self.label_index, self.space.num_labels, a.temperature)  # (B, C)
            else:
                conf = teacher_confidences(self.estimators, {n: outs[n][0] for n in self.names}, self.names,
                                           one_class=a.one_class_confidence)  # K x (B, N)
                weights = kd_teacher_weights(torch.stack([c[:, -1] for c in conf], dim=-1),
                                             a.kd_confidence_power)  # (B, K)
                target = union_target(logits, self.label_index, weights, self.space.num_labels, a.temperature)
                for k, n in enumerate(self.names):
                    extra[f"confidence/{n}"] = conf[k].mean()
                    extra[f"kd_weight/{n}"] = weights[:, k].mean()
            cls_states = torch.stack([outs[n][1] for n in self.names])  # (K, B, H)
            teacher_cls = cls_states[crafted.owner, torch.arange(e.shape[0], device=e.device)]  # (B, H)
        positions = mask_positions(crafted.lengths, torch.Generator().manual_seed(crafted.seed))
        out = self.model(e, mask, positions, self.crafter.specials.mask, train_head_only=True)
        l_kd = kd_loss(out.logits, target, a.temperature)  # Eq. 4
        l_pt = cls_distance_loss(teacher_cls, out.cls)  # Eq. 5
        l_mask = masked_embedding_loss(gather_positions(e, positions), out.predicted)  # Eq. 3, trains W
        loss = l_kd + settings.pt_weight * l_pt + l_mask  # Eq. 6, plus W's objective
        with torch.no_grad():
            agreement = (out.logits.argmax(-1) == target.argmax(-1)).float().mean()
        return {"loss": loss, "kd": l_kd.detach(), "pt": l_pt.detach(), "mask": l_mask.detach(),
                "agreement": agreement, "hit": torch.tensor(crafted.hit), **extra}


def crafting_plan(cfg: JobConfig, world_size: int = 1) -> StepPlan:
    """The step plan of a job's training requests over ``world_size`` workers."""
    return StepPlan.of(len(crafting_requests(cfg, heldout=False)), cfg, world_size)


def fit_crafted_confidence(cfg: JobConfig, teachers: Mapping[str, object], *,
                           device: str | torch.device = "cpu") -> dict:
    """Every teacher's confidence statistics (StrataNet section 5.1) from its block features of
    pseudo-samples crafted for its held-out requests (without adversarial steps: there is no
    student yet); the class of a sample's Gaussian is its target class. With ``rmd_background:
    all_teachers`` teacher k's background also sees the other teachers' held-out samples.

    Raises:
        ValueError: a teacher has too few held-out requests (see ``transfer.heldout_fraction``).
    """
    from dfkd_ray.confidence.fitting import fit_estimator

    a = cfg.amalgamation
    names = [t.name for t in cfg.teachers]
    requests = crafting_requests(cfg, heldout=True)
    need = max(8, a.calibration_folds + 2)
    few = {n: c for n in names if (c := sum(r.teacher == n for r in requests)) < need}
    if few:
        raise ValueError(f"too few held-out pseudo-samples to fit confidence statistics: {few} (need >= {need} per "
                         f"teacher with amalgamation.calibration_folds {a.calibration_folds}). Raise "
                         "transfer.heldout_fraction or transfer.samples_per_class, or lower calibration_folds")
    crafter = Crafter({n: teachers[n] for n in names}, cfg.transfer.embedding_guessing, device)
    samples = [PseudoSample(r.teacher, r.teacher_class, sample_seed(r, -1)) for r in requests]
    size = cfg.train.batch_size
    states: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    logits: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, len(samples), size):
        crafted = crafter.craft(samples[start:start + size])
        with torch.no_grad():
            for n in names:
                out, _ = teacher_on_embeddings(teachers[n], crafted.embeds, crafted.attention_mask, with_states=True)
                states[n].append(out.block_states.float().cpu())
                logits[n].append(out.logits.float().cpu())
    owner = torch.tensor([names.index(p.teacher) for p in samples])  # (M,)
    classes = torch.tensor([p.teacher_class for p in samples])  # (M,)
    shared = a.confidence == "rmd" and a.rmd_background == "all_teachers" and len(names) > 1
    estimators = {}
    for k, n in enumerate(names):
        h, z = torch.cat(states[n]), torch.cat(logits[n])  # (M, N, H), (M, C_k)
        own = owner == k
        estimators[n] = fit_estimator(h[own], z[own], classes[own], a, seed=cfg.seed,
                                      background_states=h[~own] if shared else None)
    return estimators


def record_no_text(cfg: JobConfig) -> Path:
    """The transfer-set stage of ``embedding_guessing``: an empty, complete transfer set whose
    manifest records that the source makes no text (its fingerprint covers the crafting settings,
    so the later stages' records do too); returns its directory."""
    from dfkd_ray.stages import fingerprint
    from dfkd_ray.transfer.store import TransferSetStore
    from dfkd_ray.transfer.writer import transfer_description, transfer_set_dir

    cfg = cfg.absolute()
    description = transfer_description(cfg, cfg.teacher_labels())
    store = TransferSetStore.open(transfer_set_dir(cfg), fingerprint=fingerprint(description),
                                  description=description, num_shards=0)
    pseudo = len(crafting_requests(cfg, heldout=False))
    if not store.complete:
        store.finish({"rows": 0, "text": False, "source": SOURCE, "pseudo_samples_per_epoch": pseudo})
    print(f"transfer set: no text; transfer.source {SOURCE} crafts {pseudo} pseudo-samples per epoch inside "
          f"training -> {store.directory}")
    return store.directory


def train_embedding_guessing(cfg: JobConfig, *, device: str | torch.device = "cpu", teachers: Optional[dict] = None,
                             estimators: Optional[dict] = None, world_size: int = 1,
                             on_step: Optional[Callable[[dict], None]] = None) -> tuple[EmbeddingGuessingDistiller, dict]:
    """AS-DFD training in this process, as ``world_size`` Ray Train workers would make it (for
    benchmarks, no Ray): the step plan of ``world_size`` workers, each step crafting and distilling
    their batches together (``train.batch_size * world_size`` pseudo-samples).

    Args:
        cfg: a job config with ``transfer.source: embedding_guessing``.
        device: where crafting and training run.
        teachers: loaded teachers with ``num_blocks`` = the student's depth (loaded if None).
        estimators: for ``amalgamation.method: stratanet``; fitted here
            (:func:`fit_crafted_confidence`) when None.
        world_size: the workers whose plan and batches are reproduced.
        on_step: called with each step's metrics.

    Returns:
        The distiller (its ``student`` exports with ``export(dir)``) and the last step's metrics.
    """
    from dfkd_ray.models.teacher import load_teachers
    from dfkd_ray.train.epochs import student_num_blocks

    if teachers is None:
        teachers = load_teachers(cfg.teachers, num_blocks=student_num_blocks(cfg), device=device)
    if cfg.amalgamation.method == "stratanet" and estimators is None:
        estimators = fit_crafted_confidence(cfg, teachers, device=device)
    plan = crafting_plan(cfg, world_size)
    distiller = EmbeddingGuessingDistiller(cfg, plan, device=device, teachers=teachers, estimators=estimators)
    requests = crafting_requests(cfg, heldout=False)
    size = cfg.train.batch_size * world_size

    def epoch_batches(epoch: int):
        return request_batches(requests, cfg, epoch, batch_size=size)

    metrics: dict = {}
    for _, _, batch in iterate_epochs(epoch_batches, plan):
        metrics = distiller.step(batch)
        if on_step is not None:
            on_step(metrics)
    return distiller, metrics
