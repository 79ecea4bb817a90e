"""Student accuracy of the smoke chain per transfer source, in one process (no Ray).

The smoke preset (``jobs/configs/smoke.yaml``) on the synthetic task, as ``jobs/amalgamate.py``
runs it, minus Ray: the transfer set (``write_transfer_set``), the confidence statistics
(``fit_confidence``, stratanet only), a :class:`~dfkd_ray.train.step.Distiller` in one process
with the batch of all train workers together (2 x 16: the DDP step of the preset's 2 workers, same
step plan), export, and ``run_evaluation`` on the labelled eval file. One transfer set per
(source, seed), shared by the methods; ``seed`` is the job seed (request seeds, initialisation).

Each student is scored on the eval file and on development rows: 50 sentences a topic drawn like the
eval file's with another seed (``--dev-seed``), written under ``--out``. Settings are chosen on the
development rows; the eval file only reports.

CPU (about a minute per source and seed on 2 cores; builds the task under --demo on first use):
    python benchmarks/smoke_sources.py --sources steered random_words corpus --seeds 0 1 2
    python benchmarks/smoke_sources.py --sources steered --seeds 0 1 2 --set train.epochs=24 --set ray.num_train_workers=1
Prints one JSON line per (source, seed) with the student's accuracy per method (``dev_<method>``: on the
development rows).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from dfkd_ray.config import load_config
from dfkd_ray.preflight import preflight
from dfkd_ray.confidence import fit_confidence
from dfkd_ray.evaluation import run_evaluation
from dfkd_ray.models.teacher import load_teachers
from dfkd_ray.train.epochs import student_num_blocks
from dfkd_ray.train.step import train_in_process
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.sources.corpus import training_table
from dfkd_ray.synthetic import labelled_sentences
from dfkd_ray.transfer.writer import write_transfer_set

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.yaml"


def overrides(demo: Path, out: Path, source: str, seed: int, method: str) -> list[str]:
    return [f"demo={demo}", f"teachers.0.path={demo}/teacher_alpha", f"teachers.1.path={demo}/teacher_beta",
            f"transfer.steered.lm_path={demo}/lm", f"transfer.corpus.path={demo}/corpus.txt",
            f"student.path={demo}/student", f"eval.path={demo}/eval.csv", f"output.dir={out}",
            f"transfer.source={source}", f"seed={seed}", f"amalgamation.method={method}"]


def write_dev_rows(path: Path, seed: int) -> Path:
    """50 labelled sentences a topic, drawn as the eval file's are, with ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(labelled_sentences(50, seed))
    return path


def run(demo: Path, out: Path, source: str, seed: int, methods: list[str], extra: list[str], dev: Path) -> dict:
    out = out / f"{source}-seed{seed}"
    result = {"source": source, "seed": seed, "set": extra}
    transfer = None
    for method in methods:
        cfg = preflight(load_config(SMOKE, overrides(demo, out, source, seed, method) + extra))
        if transfer is None:  # the transfer set does not depend on the method
            start = time.perf_counter()
            transfer = read_transfer_table(write_transfer_set(cfg, progress=False))
            result["transfer_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        rows = training_table(transfer, cfg)
        texts, sources = rows.column("text").to_pylist(), rows.column("teacher").to_pylist()
        teachers = load_teachers(cfg.teachers, num_blocks=student_num_blocks(cfg))
        estimators = fit_confidence(cfg, transfer, teachers) if method == "stratanet" else None
        distiller, _ = train_in_process(cfg, texts, teachers=teachers, estimators=estimators,
                                        world_size=cfg.ray.num_train_workers, source_teachers=sources)
        student = distiller.export(out / f"student-{method}")
        report = run_evaluation(cfg, student, teachers=teachers, out_dir=out / f"eval-{method}")
        result[method] = round(report["student"]["accuracy"], 3)
        dev_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"path": dev})})
        result[f"dev_{method}"] = round(run_evaluation(dev_cfg, student, teachers=teachers,
                                                       out_dir=out / f"dev-{method}")["student"]["accuracy"], 3)
        result[f"{method}_s"] = round(time.perf_counter() - start, 1)
        result["ensemble"] = round(report["ensemble"]["accuracy"], 3)
    result["rows"] = len(texts)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path(".cache/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/smoke_sources"))
    parser.add_argument("--sources", nargs="+", default=["steered", "random_words", "corpus"])
    parser.add_argument("--methods", nargs="+", default=["stratanet", "vanilla"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted config override on top of the smoke preset (repeatable)")
    parser.add_argument("--dev-seed", type=int, default=1000, help="seed of the development rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads only contend
    dev = write_dev_rows(args.out.resolve() / f"dev-{args.dev_seed}.csv", args.dev_seed)
    for source in args.sources:
        for seed in args.seeds:
            print(json.dumps(run(args.demo.resolve(), args.out.resolve(), source, seed, args.methods, args.set, dev)),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
