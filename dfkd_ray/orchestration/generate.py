"""Generation at scale: a Ray Data pipeline of generator actors that stream transfer-set shards.

The driver plans the requests table and cuts it into shards (the unit of work and of resume).
Shard indices that the manifest does not list yet become a Ray Dataset; ``map_batches`` runs
:class:`GenerationActor` (a callable class: teachers, LM and transfer source built once in
``__init__``) over them with ``concurrency`` actors, each writing its shards to disk whole
(temporary name, then rename) and returning only a small stats row. The driver streams those rows,
lists each shard in the manifest as it arrives, and shows progress; it never holds the set.
Killed at any point, a rerun with the same config skips listed shards (and adopts renamed
ones the manifest missed), so it ends with the same set as an uninterrupted run.

On a multi-node cluster ``output.dir`` must be a filesystem every node sees (a shared mount).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray

from dfkd_ray.config import JobConfig, claim_output_dir, validate_config
from dfkd_ray.orchestration import worker_device
from dfkd_ray.transfer.store import TransferSetStore, write_shard_file
from dfkd_ray.transfer.writer import (final_line, finalize_transfer_set, fingerprint_of, load_teachers, make_shard,
                                      plan_transfer_set, regenerate_duplicates, transfer_set_dir)


def _build_source(config: dict):
    from dfkd_ray.transfer.sources import get_source_class

    # Validated once on the driver; paths are the driver's view of shared storage.
    cfg = validate_config(config, check_paths=False)
    space, shards, _ = plan_transfer_set(cfg)
    device = worker_device(cfg.ray.gpus_per_generation_actor > 0)
    source_class = get_source_class(cfg.transfer.source)
    if source_class.builds_engine_first(cfg):  # e.g. vLLM: its engine before any teacher touches the GPU
        from dfkd_ray.config import vllm_engine_problem

        problem = vllm_engine_problem()
        if problem:
            raise RuntimeError(problem)
        return cfg, shards, source_class(cfg, None, space)
    return cfg, shards, source_class(cfg, load_teachers(cfg, device=device), space)


def _regenerate_task(config: dict, directory: str, duplicates: dict) -> dict:
    """Ray task: regenerate rows duplicated across shards, with a generator actor's resources."""
    cfg, _, source = _build_source(config)
    return regenerate_duplicates(source, cfg, directory, {int(k): v for k, v in duplicates.items()})


class GenerationActor:
    """Ray Data callable class: builds the engine in ``__init__``, makes whole shards in ``__call__``."""

    def __init__(self, config: dict, directory: str):
        self.directory = Path(directory)
        self.cfg, self.shards, self.source = _build_source(config)

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "rows": [], "stats": []}
        for index in batch["shard"]:
            index = int(index)
            table, stats = make_shard(self.source, self.shards[index], self.cfg)
            write_shard_file(self.directory, index, table, stats)
            out["shard"].append(index)
            out["rows"].append(len(table))
            out["stats"].append(json.dumps(stats))
        return {"shard": np.array(out["shard"], dtype=np.int64), "rows": np.array(out["rows"], dtype=np.int64),
                "stats": np.array(out["stats"], dtype=object)}


def run_generate(cfg: JobConfig, *, progress: bool = True) -> Path:
    """Make (or finish) the transfer set of ``cfg`` on the current Ray cluster; returns its directory."""
    from tqdm.auto import tqdm

    cfg = cfg.absolute()
    claim_output_dir(cfg)
    directory = transfer_set_dir(cfg)
    _, shards, description = plan_transfer_set(cfg)
    store = TransferSetStore.open(directory, fingerprint=fingerprint_of(description), description=description,
                                  num_shards=len(shards))
    if store.complete:
        print(f"transfer set already complete: {directory}")
        return directory
    todo = [i for i in range(len(shards)) if i not in store.done]
    start, generated = time.perf_counter(), 0
    if todo:
        r = cfg.ray
        ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        results = ds.map_batches(
            GenerationActor,
            fn_constructor_kwargs={"config": cfg.to_dict(), "directory": str(directory)},
            batch_size=1, concurrency=min(r.num_generation_actors, len(todo)),
            num_gpus=r.gpus_per_generation_actor, num_cpus=r.cpus_per_generation_actor, batch_format="numpy")
        bar = tqdm(total=len(todo), desc=f"transfer set ({cfg.transfer.source})", unit="shard", disable=not progress)
        for row in results.iter_rows():
            stats = json.loads(row["stats"])
            store.commit_shard(int(row["shard"]), int(row["rows"]), stats)
            generated += stats["generated"]
            bar.update(1)
            bar.set_postfix(rows=sum(s["rows"] for s in store.manifest["shards"].values()),
                            per_s=f"{generated / (time.perf_counter() - start):.1f}")
        bar.close()
    r = cfg.ray

    def regenerate(duplicates: dict) -> dict:
        task = ray.remote(num_cpus=r.cpus_per_generation_actor, num_gpus=r.gpus_per_generation_actor)(_regenerate_task)
        print(f"regenerating {sum(map(len, duplicates.values()))} rows duplicated across shards")
        return {int(k): v for k, v in ray.get(task.remote(cfg.to_dict(), str(directory), duplicates)).items()}

    summary = finalize_transfer_set(store, cfg, wall_seconds=time.perf_counter() - start, generated_now=generated,
                                    regenerate=regenerate)
    print(final_line(summary, directory))
    return directory
