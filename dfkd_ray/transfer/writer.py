"""Write a transfer set in one process: requests -> source -> filtered Parquet shards.

The Ray Data pipeline (``dfkd_ray.orchestration``) spreads the same shards over actors; this
single-process writer is the reference and what a laptop smoke test uses. Both resume: shards
already in the manifest are skipped, so rerunning after a kill finishes the set.

Run it alone: ``python -m dfkd_ray.transfer.writer --config jobs/configs/X.yaml [key=value ...]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from dfkd_ray.config import JobConfig, load_config
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.transfer.requests import Request, build_requests
from dfkd_ray.transfer.schema import rows_to_table
from dfkd_ray.transfer.store import TransferSetStore

log = logging.getLogger(__name__)


def transfer_set_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "transfer_set"


def transfer_description(cfg: JobConfig, teacher_labels: dict[str, list[str]]) -> dict:
    """Everything that decides a transfer set's content; its hash is the set's fingerprint."""
    return {
        "seed": cfg.seed,
        "teachers": {t.name: {"path": str(Path(t.path).resolve()), "labels": teacher_labels[t.name],
                              "max_length": t.max_length} for t in cfg.teachers},
        "transfer": cfg.transfer.model_dump(mode="json"),
    }


def plan_transfer_set(cfg: JobConfig) -> tuple[UnionLabelSpace, list[list[Request]], dict]:
    """The label space, the requests cut into shards, and the set's description."""
    teacher_labels = cfg.teacher_labels()
    space = UnionLabelSpace.from_teachers(teacher_labels)
    requests = build_requests(teacher_labels, space, samples_per_class=cfg.transfer.samples_per_class,
                              job_seed=cfg.seed, class_weights=cfg.transfer.class_weights)
    size = cfg.transfer.shard_size
    shards = [requests[i:i + size] for i in range(0, len(requests), size)]
    return space, shards, transfer_description(cfg, teacher_labels)


def load_teachers(cfg: JobConfig, *, num_blocks: int = 1, device: str = "cpu") -> dict:
    from dfkd_ray.models.teacher import Teacher

    return {t.name: Teacher.from_pretrained(t.name, t.path, num_blocks=num_blocks, max_length=t.max_length,
                                            device=device, dtype=t.dtype, trust_remote_code=t.trust_remote_code)
            for t in cfg.teachers}


def fingerprint_of(description: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def write_transfer_set(cfg: JobConfig, directory: str | Path | None = None, *, device: str = "cpu",
                       progress: bool = True) -> Path:
    """Make (or finish) the transfer set of ``cfg``; returns its directory."""
    from tqdm.auto import tqdm

    from dfkd_ray.transfer.sources import get_source_class

    directory = Path(directory) if directory is not None else transfer_set_dir(cfg)
    space, shards, description = plan_transfer_set(cfg)
    store = TransferSetStore.open(directory, fingerprint=fingerprint_of(description), description=description,
                                  num_shards=len(shards))
    todo = [i for i in range(len(shards)) if i not in store.done]
    if todo:
        teachers = load_teachers(cfg, device=device)
        source = get_source_class(cfg.transfer.source)(cfg, teachers, space)
        start, made, kept = time.perf_counter(), 0, 0
        bar = tqdm(todo, desc=f"transfer set ({cfg.transfer.source})", unit="shard", disable=not progress)
        for i in bar:
            table = rows_to_table(source.generate(shards[i]))
            made += len(table)
            rejected = len(table)
            table = table.filter(pc.greater_equal(table["confidence"], cfg.transfer.min_confidence))
            rejected -= len(table)
            kept += len(table)
            store.write_shard(i, table, {"requests": len(shards[i]), "rejected_low_confidence": rejected})
            bar.set_postfix(rows=kept, per_s=f"{made / (time.perf_counter() - start):.1f}")
    store.finish()
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = write_transfer_set(cfg)
    print(f"transfer set: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
