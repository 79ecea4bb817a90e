"""Streaming mode (``train.stream_from_generation``): training consumes the transfer set while the
generator actors still make it.

1. Held-out pass (``stratanet`` only): each shard's held-out requests are generated first, with the
   shard's filters and retries, into ``output.dir/heldout_pass`` (:func:`run_heldout_pass`), and
   the confidence statistics are fitted on them (:func:`run_confidence` with ``rows_dir``).
2. Streamed epoch: a ``TorchTrainer`` whose ``"train"`` dataset is the live generation pipeline
   (:func:`generation_pipeline` with ``stream=True``): each actor writes its shard to disk as
   usual (stats in the file), commits nothing, and passes the shard's training texts on. The
   held-out rows are replayed from the pass, not generated again. Shards come in a class-mixing
   order (:func:`stream_order`); each worker starts the pipeline before it loads its models. The
   plan counts on the planned requests; the epoch stops when the shortest worker split runs dry
   (all workers make the same number of steps), then drains the stream so every shard is written,
   and ends with a checkpoint.
3. The driver adopts the written shards (the store adopts renamed shards with their stats), makes
   any the stream did not, and finalizes the set as :func:`run_generate` always does (duplicates
   across shards replaced, summary, complete).
4. The remaining ``train.epochs - 1`` epochs read the finished Parquet set (exact row counts) and
   continue from the streamed epoch's checkpoint (:func:`run_distill` with ``after_stream``).

Resume: every step is a stage with a record. Killed during the streamed epoch, a rerun keeps the
written shards and resumes training from the epoch's last checkpoint: the stream replays the shards
already on disk (read, not generated) and makes the rest, and the batches the checkpoint had
consumed are skipped, as a resumed Parquet epoch does (which rows those were is not guaranteed to
match). Killed later, the set is finished and training resumes as without streaming.
"""

from __future__ import annotations

import time
from pathlib import Path

from dfkd_ray.config import JobConfig
from dfkd_ray.orchestration.train import run_confidence, run_distill, run_stream_epoch, stream_dir
from dfkd_ray.orchestration.generate import generation_pipeline, run_generate, run_heldout_pass
from dfkd_ray.preflight import claim_output_dir
from dfkd_ray.stages import read_record
from dfkd_ray.transfer.streaming_plan import planned_training_rows, stream_order
from dfkd_ray.transfer.writer import open_transfer_set


def check_room(cfg: JobConfig) -> str:
    """A warning when the cluster cannot hold the train workers and the generator actors at once
    (streaming runs them together; without streaming they take turns), else ''. Only a warning: an
    autoscaling cluster may add the nodes that are missing now."""
    import ray

    r = cfg.ray
    actors = r.num_generation_actors
    need = {"CPU": r.num_train_workers * r.cpus_per_train_worker + actors * r.cpus_per_generation_actor,
            "GPU": r.num_train_workers * (1 if r.use_gpu else 0) + actors * r.gpus_per_generation_actor}
    have = ray.cluster_resources()
    short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g} now)" for k in need if need[k] > have.get(k, 0)]
    if not short:
        return ""
    return ("warning: train.stream_from_generation runs the train workers and the generator actors at the same "
            f"time and they need {' and '.join(short)}; unless the cluster scales up, this waits forever: lower "
            "ray.num_generation_actors (or ray.gpus_per_generation_actor), or set train.stream_from_generation=false")


def run_streaming(cfg: JobConfig, *, progress: bool = True) -> tuple[Path, Path | None, Path]:
    """Transfer set, confidence statistics and student of ``cfg`` with the first epoch streamed
    from generation (or what is left of them); returns their directories."""
    cfg = cfg.absolute()
    claim_output_dir(cfg)
    store, shards, _ = open_transfer_set(cfg)  # adopts the shards of a killed run
    directory = store.directory
    streamed = (stream_dir(cfg) / "stage.json").is_file()
    if store.complete and not streamed:
        print(f"transfer set already complete: {directory}; nothing to stream, training reads it from Parquet")
        conf = run_confidence(cfg, directory)
        return directory, conf, run_distill(cfg, directory, conf)

    warning = check_room(cfg)
    if warning:
        print(warning)
    conf = heldout = None
    if cfg.amalgamation.method != "vanilla":
        heldout = run_heldout_pass(cfg, progress=progress)
        conf = run_confidence(cfg, directory, rows_dir=heldout)
    # Lazy: nothing runs unless the streamed epoch does (a finished one is found by its record,
    # and a changed config is refused there, before any training).
    stream = generation_pipeline(cfg, directory, stream_order(shards), stream=True,
                                 replay_dir=str(heldout) if heldout else None)
    rows = planned_training_rows(shards, cfg.transfer.heldout_fraction, cfg.train.include_heldout)
    if store.done and not streamed:
        print(f"transfer set: resuming, {len(store.done)} of {len(shards)} shards kept from an earlier run")
    start, wall_start = time.perf_counter(), time.time()
    record = run_stream_epoch(cfg, directory, conf, stream, rows)
    # Adopt the shards the stream wrote (with the stats they carry), make any it did not, finalize.
    store, _, _ = open_transfer_set(cfg)
    shard_stats = store.manifest["shards"].values()
    if not streamed and record.get("first_step_at"):
        after = sum(1 for s in shard_stats if s.get("finished_at", 0) > record["first_step_at"])
        print(f"stream: {after} of {len(shards)} shards were written after the first training step")
    # the rate counts what this run generated: shards an earlier run finished are kept, not made again
    generated = 0 if streamed else sum(s.get("generated", 0) for s in shard_stats
                                       if s.get("finished_at", 0) >= wall_start)
    run_generate(cfg, progress=progress, generated_before=generated, started=None if streamed else start)
    return directory, conf, run_distill(cfg, directory, conf, after_stream=record)
