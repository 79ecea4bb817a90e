"""Confidence statistics and distillation on a Ray cluster.

``run_confidence``: one Ray task (a GPU when ``ray.use_gpu``) fits each teacher's confidence
statistics on its held-out rows of the transfer set -> ``output.dir/confidence/``.

``run_distill``: a Ray Train ``TorchTrainer``. The transfer set is read as a Ray Dataset
(the text of the manifest's shards, held-out rows dropped, one block) and split across
``ray.num_train_workers`` workers; each worker's loop (:func:`train_loop_per_worker`) builds a
:class:`~dfkd_ray.train.step.Distiller` (student + ST-amalg under DDP, frozen teachers in the
config's dtype, the fitted estimators), reads ``get_dataset_shard("train")`` in batches with a
per-epoch seeded local shuffle, and reports metrics every ``train.report_every_steps`` and a
checkpoint (model, optimiser, schedule, step, epoch and batch position) every
``train.checkpoint_every_steps``. A failed worker is restarted by Ray Train up to
``train.max_failures`` times and continues from the last checkpoint; a rerun of a killed job finds
the same run (its name carries the stage fingerprint) under ``output.dir/ray_train`` and continues
from its last checkpoint too. Rank 0 writes ``distill/metrics.jsonl``, ``distill/loss_curves.png``
and the exported student ``output.dir/student`` (a standard Hugging Face directory).

``run_stream_epoch`` (``train.stream_from_generation``, driven by
:mod:`dfkd_ray.orchestration.streaming`): the same loop on a ``"train"`` dataset that is the live
generation pipeline, for the first epoch only; then ``run_distill`` continues from its last
checkpoint on the finished Parquet set (``after_stream``) with exact row counts.

Resuming inside an epoch skips the batches the checkpoint had consumed; with a fixed number of
workers the per-epoch shuffle is seeded, but Ray Data does not promise the same split of rows over
workers on every execution, so a resumed epoch may see a different (equally sized) order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from dfkd_ray.config import JobConfig
from dfkd_ray.train.epochs import StepPlan, student_num_blocks
from dfkd_ray.orchestration.runtime import worker_device, worker_print
from dfkd_ray.stages import fingerprint, mark_done, read_record, stage_done
from dfkd_ray.transfer.schema import TRANSFER_SCHEMA
from dfkd_ray.transfer.sources.corpus import mix_corpus_documents
from dfkd_ray.transfer.store import read_manifest, read_transfer_table, transfer_set_files
from dfkd_ray.transfer.streaming_plan import training_rows

# Settings of how a run reports, recovers or picks kernels, not what it trains: out of the stage record.
_TRAIN_ONLY_KEYS = ("report_every_steps", "checkpoint_every_steps", "max_failures", "sdpa")
# What the confidence stage only reports on: a changed warning threshold does not retrain the student.
_AMALGAMATION_REPORT_KEYS = ("separation_warning",)


def confidence_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "confidence"


def distill_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "distill"


def student_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "student"


def confidence_description(cfg: JobConfig, transfer_dir: Path, rows_dir: Path | None = None) -> dict:
    a = cfg.amalgamation
    fitted_on = {"fitted_on": {"heldout_pass": read_manifest(rows_dir)["fingerprint"]}} if rows_dir else {}
    return {"transfer_set": read_manifest(transfer_dir)["fingerprint"], "seed": cfg.seed, **fitted_on,
            "num_blocks": student_num_blocks(cfg),
            "teachers": {t.name: str(Path(t.path).resolve()) for t in cfg.teachers},
            "amalgamation": {k: getattr(a, k) for k in ("confidence", "shrinkage", "confidence_transform",
                                                          "confidence_center", "confidence_center_sd",
                                                          "confidence_quantile", "calibration_fraction",
                                                          "calibration_folds", "calibration_repeats",
                                                          "rmd_background")}}


def _fit_confidence_task(cfg: JobConfig, rows_dir: str, out: str, use_gpu: bool) -> dict:
    from dfkd_ray.confidence import fit_confidence, save_estimators
    from dfkd_ray.models.teacher import load_teachers

    device = worker_device(use_gpu)
    teachers = load_teachers(cfg.teachers, num_blocks=student_num_blocks(cfg), device=device)
    if cfg.transfer.source == "embedding_guessing":  # no text: fitted on pseudo-samples of the held-out requests
        from dfkd_ray.train.embedding_guessing import fit_crafted_confidence

        estimators = fit_crafted_confidence(cfg, teachers, device=device)
    else:
        estimators = fit_confidence(cfg, read_transfer_table(rows_dir), teachers)
    tmp = Path(tempfile.mkdtemp(prefix=".confidence-", dir=Path(out).parent))
    save_estimators(tmp, estimators)
    _publish(tmp, Path(out))
    return {n: e.meta for n, e in estimators.items()}


def run_confidence(cfg: JobConfig, transfer_dir: Path, *, rows_dir: Path | None = None) -> Path | None:
    """Fit (or find) the confidence statistics; ``None`` for ``amalgamation.method: vanilla``.

    They are fitted on the held-out rows of the finished transfer set, or of ``rows_dir`` (the
    held-out pass of streaming mode, made before the set is finished; the stage record says which).
    """
    if cfg.amalgamation.method == "vanilla":
        return None
    cfg = cfg.absolute()
    out = confidence_dir(cfg)
    desc = confidence_description(cfg, transfer_dir, rows_dir)
    if stage_done(out, desc, stage="confidence"):
        print(f"confidence statistics already fitted: {out}")
        _print_separation(cfg, read_record(out).get("teachers", {}))
        return out
    gpu = 1 if cfg.ray.use_gpu else 0
    task = ray.remote(num_cpus=cfg.ray.cpus_per_train_worker, num_gpus=gpu)(_fit_confidence_task)
    start = time.perf_counter()
    meta = ray.get(task.remote(cfg, str(rows_dir or transfer_dir), str(out), bool(gpu)))
    mark_done(out, desc, teachers=meta)
    print(f"confidence statistics ({cfg.amalgamation.confidence}) fitted for {list(meta)} in "
          f"{time.perf_counter() - start:.1f} s -> {out}")
    _print_separation(cfg, meta)
    return out


def _print_separation(cfg: JobConfig, metas: dict) -> None:
    from dfkd_ray.confidence import separation_report

    for line in separation_report(metas, cfg.amalgamation.separation_warning,
                                  one_class=cfg.amalgamation.one_class_confidence):
        print(line)


def distill_description(cfg: JobConfig, transfer_dir: Path, conf_dir: Path | None) -> dict:
    return {"transfer_set": read_manifest(transfer_dir)["fingerprint"], "seed": cfg.seed,
            "confidence": read_record(conf_dir)["fingerprint"] if conf_dir is not None else None,
            "teachers": {t.name: str(Path(t.path).resolve()) for t in cfg.teachers},
            "amalgamation": {k: v for k, v in cfg.amalgamation.model_dump(mode="json").items()
                             if k not in _AMALGAMATION_REPORT_KEYS},
            "student": cfg.student.model_dump(mode="json"),
            "train": {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _TRAIN_ONLY_KEYS},
            "num_train_workers": cfg.ray.num_train_workers,
            **({"corpus": file_identity(cfg.transfer.corpus)} if cfg.train.corpus_share > 0 else {})}


def file_identity(corpus) -> dict:
    """What the corpus documents mixed into training depend on: the file (path, size, modification
    time) and how documents are read from it."""
    stat = Path(corpus.path).stat()
    return {"path": str(Path(corpus.path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "min_words": corpus.min_words, "max_words": corpus.max_words, "encoding": corpus.encoding}


def training_text(transfer_dir: Path, include_heldout: bool) -> pa.Table:
    """The ``text`` and ``teacher`` columns of the complete shards in shard order, held-out rows dropped unless
    ``include_heldout``: the training dataset, one block (``ray.data.from_arrow``), which Ray Train
    splits into one contiguous range of rows per worker, as ``ray.data.read_parquet`` gave it for a
    set of small shards (it coalesces them into one block). The process that builds the trainer reads
    it: the set is two string columns and read once per run, where ``read_parquet`` would first start a pool
    of footer-reading actors (up to 32 processes in Ray 2.60) and read tasks to learn what the
    manifest already says."""
    tables = [training_rows(pq.read_table(f, columns=["text", "teacher", "heldout"]), include_heldout)
              for f in transfer_set_files(transfer_dir)]
    return pa.concat_tables(tables) if tables else training_rows(TRANSFER_SCHEMA.empty_table(), include_heldout)


def student_training_text(cfg: JobConfig, transfer_dir: Path) -> pa.Table:
    """What the student trains on: the set's training rows (:func:`training_text`) with
    ``train.corpus_share`` of them corpus documents, in a seeded order
    (:func:`~dfkd_ray.transfer.sources.corpus.mix_corpus_documents`)."""
    return mix_corpus_documents(training_text(transfer_dir, cfg.train.include_heldout), cfg)


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished output from its temporary directory into place, replacing what an earlier
    attempt left there unfinished (its stage was not recorded)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _start_position(distiller, init_checkpoint: str | None, main: bool, stream: bool) -> tuple[int, int, int]:
    """Load where a train worker starts: Ray Train's latest checkpoint of this run (a retry, or a
    rerun of a killed job), else ``init_checkpoint`` (the end of the streamed epoch), else step 0.
    Returns ``(epoch, batches of it already consumed, step resumed from or 0)``; the main worker
    (rank 0) says which."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = distiller.load_checkpoint(d)
        epoch, skip = int(state["epoch"]), int(state["batch"])
        if main:
            worker_print(f"distill: resumed from the checkpoint of step {state['step']} (epoch {epoch}, batch {skip})")
        return epoch, skip, distiller.step_count
    if init_checkpoint:
        state = distiller.load_checkpoint(init_checkpoint)
        if main:
            worker_print(f"distill: continuing after the streamed epoch from step {state['step']}, reading the finished set")
        return int(state["epoch"]), int(state["batch"]), 0
    if main and stream:
        worker_print("distill: streaming the first epoch from the generation pipeline from step 0")
    return 0, 0, 0


class _EncodeTexts(NumpyBatchCollateFn):
    """Ray Data collate function: a batch's ``text`` and ``teacher`` columns -> an encoded batch
    (``encode``: :meth:`~dfkd_ray.train.step.Distiller.encode`). Ray runs it in its prefetch thread, so
    the next batch is tokenized while the current step runs."""

    def __init__(self, encode):
        self.encode = encode

    def __call__(self, batch: dict):
        return self.encode([str(x) for x in batch["text"]], [str(x) for x in batch["teacher"]])


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker loop: data shard -> teachers (no grad) -> confidences -> step; report + checkpoint.

    ``config["stream"]``: the shard is the live generation stream, read once (the first epoch; see
    :func:`~dfkd_ray.train.epochs.iterate_stream`), ending with a checkpoint and no export.
    ``config["init_checkpoint"]``: where to start when Ray Train has no checkpoint of this run (the
    end of the streamed epoch).
    ``config["scorer"]``: called by rank 0 on the student at the end of every epoch (and of the last
    step); every worker then reports ``epoch`` with its scores (a sweep's trial,
    :mod:`dfkd_ray.orchestration.tune`).
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from dfkd_ray.confidence import load_estimators
    from dfkd_ray.train.epochs import iterate_epochs, iterate_stream, prefetch
    from dfkd_ray.train.metrics import MetricsLog
    from dfkd_ray.train.step import Distiller

    cfg: JobConfig = config["job"]
    plan = StepPlan(**config["plan"])
    stream = bool(config.get("stream"))
    t = cfg.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    crafted = cfg.transfer.source == "embedding_guessing"  # no dataset: each worker crafts its batches
    if crafted:
        from dfkd_ray.train.embedding_guessing import EmbeddingGuessingDistiller, crafting_requests, request_batches

        requests = crafting_requests(cfg, heldout=False)
    else:
        shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int, buffer: int = t.shuffle_buffer, encode=None):
        """The epoch's batches: ``(texts, source teachers)``, or with ``encode`` (:meth:`Distiller.encode`)
        batches tokenized in Ray Data's prefetch thread while the step before runs."""
        if crafted:  # this worker's share of the epoch's requests, as batches of pseudo-samples to craft
            yield from request_batches(requests, cfg, epoch, rank=rank, world_size=plan.world_size)
            return
        shuffle = dict(local_shuffle_buffer_size=buffer or None,
                       local_shuffle_seed=cfg.seed * 1000 + epoch if buffer else None)
        if encode is not None:
            yield from shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=_EncodeTexts(encode),
                                                drop_last=True, **shuffle)
            return
        for batch in shard.iter_batches(batch_size=t.batch_size, batch_format="numpy", drop_last=True, **shuffle):
            yield [str(x) for x in batch["text"]], [str(x) for x in batch["teacher"]]

    if stream:
        # Start the generation pipeline now: its actors start up while this worker loads its models.
        # The local shuffle buffer is capped at two shards' requests: a batch is given once the buffer
        # is full, so a larger one would hold the first step back until most of the set is made; two
        # shards (each usually of one class: they are cut from a class-major table) still mix classes.
        streamed = prefetch(batches(0, min(t.shuffle_buffer, 2 * cfg.transfer.shard_size)))
    estimators = load_estimators(config["confidence_dir"], device) if config["confidence_dir"] else None
    distiller = (EmbeddingGuessingDistiller if crafted else Distiller)(cfg, plan, device=device, estimators=estimators,
                                                                        wrap=ray.train.torch.prepare_model)

    start_epoch, skip, resumed_from = _start_position(distiller, config.get("init_checkpoint"), rank == 0, stream)
    log = MetricsLog(config["metrics_path"], resume_step=distiller.step_count) if rank == 0 else None

    began, seen, metrics = time.perf_counter(), 0, {}
    timing: dict = {}

    def checkpoint_and_report(metrics: dict, position: tuple[int, int] | None) -> None:
        if position is not None:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    distiller.save_checkpoint(tmp, epoch=position[0], batch=position[1])
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)
        else:
            ray.train.report(metrics)

    def step(batch, epoch: int, index: int, per_epoch: int, nxt: tuple[int, int], last: bool) -> dict:
        nonlocal seen
        if isinstance(batch, tuple):  # (texts, source teachers) of the stream
            batch = distiller.encode(*batch)
        metrics = distiller.step(batch)
        timing.setdefault("first_step_at", time.time())
        seen += len(batch)
        n = distiller.step_count
        want_ckpt = n % t.checkpoint_every_steps == 0 or last
        if not (want_ckpt or n % t.report_every_steps == 0):
            return metrics
        metrics.update(epoch=epoch + (index + 1) / per_epoch, resumed_from=resumed_from,
                       samples_per_s=round(seen * plan.world_size / (time.perf_counter() - began), 2))
        checkpoint_and_report(metrics, nxt if want_ckpt else None)
        if rank == 0:
            log.write(metrics)
            extra = "".join(f" {k} {metrics[k]:.4f}" for k in ("block", "kd", "pt", "mask", "hit", "agreement")
                            if k in metrics)
            worker_print(f"distill: step {n}/{plan.total_steps} epoch {metrics['epoch']:.2f} loss {metrics['loss']:.4f}"
                         f"{extra} lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s")
        return metrics

    if stream:
        if start_epoch == 0:
            for index, batch in iterate_stream(streamed, plan, start_step=distiller.step_count, skip_batches=skip,
                                               device=device):
                metrics = step(batch, 0, index, plan.steps_per_epoch, (0, index + 1), False)
        else:  # a rerun whose streamed epoch had finished: the stream replays the shards on disk
            for _ in streamed:
                pass
        timing["stream_end_at"] = time.time()
        # The end of the streamed epoch: the checkpoint the Parquet epochs start from.
        checkpoint_and_report({"step": distiller.step_count, "epoch": 1.0, "streamed": 1}, (1, 0))
        return {**metrics, **timing, "steps": distiller.step_count}

    scorer = config.get("scorer")
    encode = None if crafted else distiller.encode
    for epoch, index, batch in iterate_epochs(lambda e: batches(e, encode=encode), plan, start_epoch=start_epoch,
                                              skip_batches=skip, start_step=distiller.step_count):
        nxt = (epoch, index + 1) if index + 1 < plan.steps_per_epoch else (epoch + 1, 0)
        metrics = step(batch, epoch, index, plan.steps_per_epoch, nxt, distiller.step_count + 1 >= plan.total_steps)
        if scorer is not None and (index + 1 == plan.steps_per_epoch or distiller.step_count >= plan.total_steps):
            scores = scorer(distiller.student) if rank == 0 else {}
            done = round(epoch + (index + 1) / plan.steps_per_epoch, 4)
            ray.train.report({"epoch": done, **scores})
            if rank == 0:
                worker_print(f"distill: epoch {done:g} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if rank == 0:
        log.plot(Path(config["metrics_path"]).with_name("loss_curves.png"),
                 title=f"{cfg.name}: {cfg.amalgamation.method} on {cfg.transfer.source}")
        out = Path(config["student_dir"])
        tmp = Path(tempfile.mkdtemp(prefix=".student-", dir=out.parent))
        distiller.export(tmp)
        _publish(tmp, out)
    return {**metrics, "steps": distiller.step_count}


def _trainer(cfg: JobConfig, desc: dict, ds, plan: StepPlan, conf_dir: Path | None, *, run_suffix: str = "",
             dataset_config=None, callbacks: tuple = (), **loop_config):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    out = distill_dir(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg, "plan": plan.__dict__,
                           "confidence_dir": str(conf_dir) if conf_dir is not None else None,
                           "metrics_path": str((out / "metrics.jsonl").resolve()),
                           "student_dir": str(student_dir(cfg).resolve()), **loop_config},
        scaling_config=ScalingConfig(num_workers=r.num_train_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_train_worker}),
        run_config=RunConfig(name=f"distill-{fingerprint(desc)}{run_suffix}",
                             storage_path=str((cfg.output.dir / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks),
                             # each report and checkpoint is logged at INFO; the step lines say it
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": ds} if ds is not None else None, dataset_config=dataset_config)


def _fit(trainer):
    """``trainer.fit()``, run in a helper thread while this one waits, so that Ctrl-C reaches the job
    as ``KeyboardInterrupt`` (see :func:`~dfkd_ray.orchestration.runtime.run_job`): in the main
    thread Ray Train 2.60 installs a SIGINT handler of its own, which aborts the run and exits the
    process with status 1 and no word of why. Its result, or its error, is returned or raised here."""
    import threading

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.error is not None:
        raise result.error
    return result


def stream_dir(cfg: JobConfig) -> Path:
    """The record of a finished streamed epoch (``stage.json``)."""
    return distill_dir(cfg) / "stream"


def run_stream_epoch(cfg: JobConfig, transfer_dir: Path, conf_dir: Path | None, stream, planned_rows: int) -> dict:
    """Train the first epoch on ``stream`` (the live generation pipeline, a lazy Ray Dataset of
    ``text``), or find that it was; returns its record (the checkpoint the next epochs start from,
    its steps, warmup and wall-clock times). A rerun of a killed one resumes from its last
    checkpoint (Ray Train finds the run by name); the stream replays the shards already on disk.
    """
    from ray.train import DataConfig

    cfg = cfg.absolute()
    out = stream_dir(cfg)
    desc = distill_description(cfg, transfer_dir, conf_dir)
    if stage_done(out, desc, stage="distill (streamed epoch)"):
        return read_record(out)
    out.mkdir(parents=True, exist_ok=True)
    r = cfg.ray
    plan = StepPlan.of(planned_rows, cfg, r.num_train_workers)
    options = DataConfig.default_ingest_options()
    options.preserve_order = False  # a shard that finishes first is trained on first
    print(f"distill: {cfg.amalgamation.method}, first epoch streamed from generation: at most {plan.rows} rows, "
          f"{r.num_train_workers} worker(s) x batch {cfg.train.batch_size}, <= {plan.steps_per_epoch} steps "
          f"({plan.warmup_steps} warmup)")
    start = time.perf_counter()
    result = _fit(_trainer(cfg, desc, stream, plan, conf_dir, run_suffix="-stream", stream=True,
                           dataset_config=DataConfig(execution_options=options)))
    final = result.return_value or {}
    mark_done(out, desc, checkpoint=result.checkpoint.path, steps=final.get("steps"), plan=plan.__dict__,
              first_step_at=final.get("first_step_at"), stream_end_at=final.get("stream_end_at"),
              seconds=round(time.perf_counter() - start, 1))
    return read_record(out)


def run_distill(cfg: JobConfig, transfer_dir: Path, conf_dir: Path | None, *, after_stream: dict | None = None,
                scorer=None, callbacks: tuple = ()) -> Path:
    """Train (or find) the student; returns the exported student directory.

    ``after_stream``: the record of a streamed first epoch (:func:`run_stream_epoch`); training then
    starts from its checkpoint and makes the remaining ``train.epochs - 1`` epochs on the finished set.
    ``scorer`` and ``callbacks`` (Ray Train callbacks) are a sweep trial's: scores reported at the end
    of every epoch (see :func:`train_loop_per_worker`), forwarded to Ray Tune.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # per-epoch split bars drown the step lines
    context.execution_options.preserve_order = True  # the same rows reach the same worker on every run

    cfg = cfg.absolute()
    out, student = distill_dir(cfg), student_dir(cfg)
    desc = distill_description(cfg, transfer_dir, conf_dir)
    if stage_done(out, desc, stage="distill"):
        print(f"student already distilled: {student}")
        return student
    out.mkdir(parents=True, exist_ok=True)
    r = cfg.ray
    crafted = cfg.transfer.source == "embedding_guessing"
    if crafted:  # pseudo-samples crafted inside training: one per training request and epoch
        from dfkd_ray.train.embedding_guessing import crafting_requests

        rows = len(crafting_requests(cfg, heldout=False))
    else:
        text = student_training_text(cfg, transfer_dir)
        rows = text.num_rows
    if after_stream is None:
        plan = StepPlan.of(rows, cfg, r.num_train_workers)
    else:
        plan = StepPlan.after_stream(rows, cfg, r.num_train_workers, streamed_steps=int(after_stream["steps"]),
                                     warmup_steps=int(after_stream["plan"]["warmup_steps"]))
    ds = None
    if not crafted:
        ds = ray.data.from_arrow(text)  # in the object store: every epoch re-iterates it from there
    streamed = f", after {after_stream['steps']} streamed steps" if after_stream else ""
    what = "pseudo-samples crafted per epoch" if crafted else "rows"
    print(f"distill: {cfg.amalgamation.method} on {plan.rows} {what}, {r.num_train_workers} worker(s) x batch "
          f"{cfg.train.batch_size}, {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.warmup_steps} "
          f"warmup{streamed})")
    start = time.perf_counter()
    result = _fit(_trainer(cfg, desc, ds, plan, conf_dir, callbacks=callbacks, scorer=scorer,
                           init_checkpoint=after_stream["checkpoint"] if after_stream else None))
    final = result.return_value or {}
    mark_done(out, desc, student=str(student), steps=final.get("steps"), rows=plan.rows,
              seconds=round(time.perf_counter() - start, 1),
              final={k: final[k] for k in ("loss", "kd", "block", "agreement") if k in final})
    return student
