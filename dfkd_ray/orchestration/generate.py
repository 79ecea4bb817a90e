"""Generation at scale: a Ray Data pipeline of generator actors that stream transfer-set shards.

The driver plans the requests table and cuts it into shards (the unit of work and of resume).
Shard indices that the manifest does not list yet become a Ray Dataset; ``map_batches`` runs
:class:`GenerationActor` (a callable class: teachers, LM and transfer source built once in
``__init__``) over them with a pool of ``ray.num_generation_actors`` actors, each writing its shards to disk whole
(temporary name, then rename) and returning only a small stats row. The driver streams those rows,
lists each shard in the manifest as it arrives, and shows progress; it never holds the set.
Killed at any point, a rerun with the same config skips listed shards (and adopts renamed
ones the manifest missed), so it ends with the same set as an uninterrupted run.

With ``train.stream_from_generation`` (:mod:`dfkd_ray.orchestration.streaming`) the same actor has
two more parts to play: the held-out pass (``part="heldout"``: each shard's held-out requests only,
into their own directory) and the live training stream (``stream=True``: it writes each shard the
same way, commits nothing, and returns the shard's training texts, which a Ray Train
``TorchTrainer`` reads as its ``"train"`` dataset; the driver adopts the shards afterwards).

On a multi-node cluster ``output.dir`` must be a filesystem every node sees (a shared mount).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from dfkd_ray.config import JobConfig
from dfkd_ray.orchestration.runtime import worker_device
from dfkd_ray.preflight import claim_output_dir, vllm_engine_problem
from dfkd_ray.transfer.sources import build_source, get_source_class
from dfkd_ray.transfer.store import TransferSetStore, read_shard_stats, shard_name, write_shard_file
from dfkd_ray.transfer.streaming_plan import ReplaySource, training_rows
from dfkd_ray.transfer.writer import (Part, final_line, finalize_transfer_set, make_shard, open_transfer_set,
                                      plan_transfer_set, regenerate_duplicates)


def _build_source(cfg: JobConfig, part: Part = "all"):
    """The shards' requests and the transfer source of a generator actor or task, on its device."""
    space, shards, _ = plan_transfer_set(cfg, part)
    if get_source_class(cfg.transfer.source).builds_engine_first(cfg):  # e.g. vLLM: its engine before any teacher
        problem = vllm_engine_problem()
        if problem:
            raise RuntimeError(problem)
    return shards, build_source(cfg, space, device=worker_device(cfg.ray.gpus_per_generation_actor > 0))


def _regenerate_task(cfg: JobConfig, directory: str, duplicates: dict) -> dict:
    """Ray task: regenerate rows duplicated across shards, with a generator actor's resources."""
    _, source = _build_source(cfg)
    return regenerate_duplicates(source, cfg, directory, {int(k): v for k, v in duplicates.items()})


class GenerationActor:
    """Ray Data callable class: builds the engine in ``__init__``, makes whole shards in ``__call__``.

    Args:
        cfg: the job's config.
        directory: where the shards go.
        part: ``"all"`` requests of each shard, or ``"heldout"``: only its held-out ones (the
            held-out pass of streaming mode).
        stream: return each shard's training texts (column ``text``) instead of its stats, and
            replay a shard already on disk (an earlier attempt's) instead of making it again.
        replay_dir: a held-out pass whose rows the shards reuse rather than generate again.
    """

    def __init__(self, cfg: JobConfig, directory: str, part: Part = "all", stream: bool = False,
                 replay_dir: str | None = None):
        self.cfg = cfg
        self.directory = Path(directory)
        self.stream = stream
        self.replay_dir = Path(replay_dir) if replay_dir else None
        # An exception here would kill the actor; Ray Data restarts pool actors without end and each
        # death prints its traceback. Kept, and raised by the first batch: the dataset stops once, with it.
        self.error: Exception | None = None
        try:
            self.shards, self.source = _build_source(cfg, part)
        except Exception as e:  # noqa: BLE001 - re-raised by __call__
            self.error = e

    def make(self, index: int):
        """Make shard ``index`` and write it (stats in the file); returns the table and stats."""
        source = self.source
        replay = self.replay_dir / shard_name(index) if self.replay_dir else None
        if replay is not None and replay.is_file():
            source = ReplaySource(source, pq.read_table(replay).to_pylist())
        table, stats = make_shard(source, self.shards[index], self.cfg)
        stats["finished_at"] = round(time.time(), 3)  # wall clock: when the shard was done
        write_shard_file(self.directory, index, table, stats)
        return table, stats

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            raise self.error
        return self._texts(batch) if self.stream else self._stats(batch)

    def _texts(self, batch: dict) -> dict:
        texts, sources = [], []
        for index in map(int, batch["shard"]):
            path = self.directory / shard_name(index)
            if path.is_file():  # written by an earlier attempt: replayed, not generated again
                table, stats = pq.read_table(path), read_shard_stats(path)
            else:
                table, stats = self.make(index)
            rows = training_rows(table, self.cfg.train.include_heldout)
            texts += rows.column("text").to_pylist()
            sources += rows.column("teacher").to_pylist()
            print(f"transfer set: shard {index} written, {len(table)} rows ({stats.get('generated', 0)} "
                  f"generated in {stats.get('seconds', 0):.1f} s)", flush=True)
        return {"text": np.array(texts, dtype=object), "teacher": np.array(sources, dtype=object)}

    def _stats(self, batch: dict) -> dict:
        out = {"shard": [], "rows": [], "stats": []}
        for index in map(int, batch["shard"]):
            table, stats = self.make(index)
            out["shard"].append(index)
            out["rows"].append(len(table))
            out["stats"].append(json.dumps(stats))
        return {"shard": np.array(out["shard"], dtype=np.int64), "rows": np.array(out["rows"], dtype=np.int64),
                "stats": np.array(out["stats"], dtype=object)}


def generation_pipeline(cfg: JobConfig, directory: Path, shards: list[int], **actor_kwargs):
    """The lazy Ray Dataset of :class:`GenerationActor` over ``shards`` (one block each, in order)."""
    r = cfg.ray
    ds = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=len(shards))
    return ds.map_batches(
        GenerationActor,
        fn_constructor_kwargs={"cfg": cfg, "directory": str(directory), **actor_kwargs},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(r.num_generation_actors, len(shards))),
        num_gpus=r.gpus_per_generation_actor, num_cpus=r.cpus_per_generation_actor, batch_format="numpy")


def _generate_and_commit(cfg: JobConfig, store: TransferSetStore, todo: list[int], *, desc: str, progress: bool,
                         **actor_kwargs) -> int:
    """Run the pipeline over ``todo`` and list each shard in the manifest as it arrives; returns rows generated."""
    from tqdm.auto import tqdm

    start, generated = time.perf_counter(), 0
    bar = tqdm(total=len(todo), desc=desc, unit="shard", disable=not progress)
    for row in generation_pipeline(cfg, store.directory, todo, **actor_kwargs).iter_rows():
        stats = json.loads(row["stats"])
        store.commit_shard(int(row["shard"]), int(row["rows"]), stats)
        generated += stats["generated"]
        bar.update(1)
        bar.set_postfix(rows=sum(s["rows"] for s in store.manifest["shards"].values()),
                        per_s=f"{generated / (time.perf_counter() - start):.1f}")
    bar.close()
    return generated


def run_heldout_pass(cfg: JobConfig, *, progress: bool = True) -> Path:
    """Make (or finish) the held-out pass of streaming mode: each shard's held-out requests, with
    the same filters and retries as the full shard, into ``output.dir/heldout_pass``; returns it."""
    cfg = cfg.absolute()
    store, _, _ = open_transfer_set(cfg, part="heldout")
    if store.complete:
        return store.directory
    start = time.perf_counter()
    if store.missing:
        _generate_and_commit(cfg, store, store.missing, desc="held-out pass", progress=progress, part="heldout")
    rows = sum(s["rows"] for s in store.manifest["shards"].values())
    store.finish({"rows": rows})
    print(f"held-out pass: {rows} rows for the confidence statistics in {time.perf_counter() - start:.1f} s -> "
          f"{store.directory}")
    return store.directory


def run_generate(cfg: JobConfig, *, progress: bool = True, generated_before: int = 0,
                 started: float | None = None) -> Path:
    """Make (or finish) the transfer set of ``cfg`` on the current Ray cluster; returns its directory.

    Shards already written (listed, or renamed and adopted: a killed run, or the training stream of
    streaming mode, whose ``generated_before`` rows since ``started``, a ``perf_counter`` time,
    count towards the summary's rate) are kept; the rest are made, then the set is finalized.
    """
    cfg = cfg.absolute()
    claim_output_dir(cfg)
    if cfg.transfer.source == "embedding_guessing":  # pseudo-embeddings are crafted inside training
        from dfkd_ray.train.embedding_guessing import record_no_text

        return record_no_text(cfg)
    if cfg.transfer.source == "prompt_tuned":  # DFKD-T3: the set is written with prompts tuned first
        from dfkd_ray.orchestration.prompts import prompts_complete, run_prompt_tuning

        if not prompts_complete(cfg):
            run_prompt_tuning(cfg, progress=progress)
    store, _, _ = open_transfer_set(cfg)
    if store.complete:
        print(f"transfer set already complete: {store.directory}")
        return store.directory
    start = started if started is not None else time.perf_counter()
    generated = generated_before
    if store.done and store.missing and started is None:
        print(f"transfer set: resuming, {len(store.done)} of {len(store.done) + len(store.missing)} shards kept "
              f"from an earlier run, {len(store.missing)} to make")
    if store.missing:
        generated += _generate_and_commit(cfg, store, store.missing, desc=f"transfer set ({cfg.transfer.source})",
                                          progress=progress)
    r = cfg.ray

    def regenerate(duplicates: dict) -> dict:
        task = ray.remote(num_cpus=r.cpus_per_generation_actor, num_gpus=r.gpus_per_generation_actor)(_regenerate_task)
        print(f"regenerating {sum(map(len, duplicates.values()))} rows duplicated across shards")
        return {int(k): v for k, v in ray.get(task.remote(cfg, str(store.directory), duplicates)).items()}

    summary = finalize_transfer_set(store, cfg, wall_seconds=time.perf_counter() - start, generated_now=generated,
                                    regenerate=regenerate)
    print(final_line(summary, store.directory))
    return store.directory
