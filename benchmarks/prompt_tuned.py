"""DFKD-T3 prompt-tuned transfer sets in one process (no Ray), and a stable-level sweep.

:func:`write_prompt_tuned_set` is the in-process entry point for a benchmark harness: given a job
config with ``transfer.source: prompt_tuned`` it tunes every teacher's prompts
(:func:`dfkd_ray.generation.prompt_tuning.write_prompts`, into ``output.dir/prompts``) and writes the
transfer set (:func:`dfkd_ray.transfer.writer.write_transfer_set`), exactly what ``jobs/generate.py``
makes on Ray; both steps resume and skip what is done. :func:`prompt_tuned_job` builds such a config
from paths and settings.

The sweep writes one set per (stable level, relaxation) and reports, per point: distinct-2 of the
texts (word bigrams over the set, as ``summary.json``), the teachers' target-class rate (the share of
rows each teacher classifies as the row's class; every generated row is kept: min_confidence 0,
dedup none), mean tokens, and the tuning and generation times. The stable level multiplies the LM's
logits before each draw, so a higher level should lower distinct-2 (docs/prompt-tuned.md).

GPU (repository root; fixtures and data wherever they are; a teacher is NAME=DIR)::

    python benchmarks/prompt_tuned.py --lm LM_DIR --teacher sst2=TEACHER_DIR --corpus corpus_sample_5k.txt.xz \
        --levels 1,5,10,0.5 --samples-per-class 500 --work /tmp/pt --out prompt_tuned.json

CPU dry run on the offline demo task (built under --demo on first use): ``--tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dfkd_ray.config import JobConfig, validate_config
from dfkd_ray.generation.prompt_tuning import prompts_dir, write_prompts
from dfkd_ray.models.teacher import load_teachers
from dfkd_ray.stages import read_record
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.writer import write_transfer_set


def write_prompt_tuned_set(cfg: JobConfig, directory: str | Path | None = None, *, device: str = "cpu",
                           progress: bool = False) -> Path:
    """The prompt-tuned transfer set of ``cfg`` made in this process: prompts tuned (or found) under
    ``output.dir/prompts``, then the set written to ``directory`` (default ``output.dir/transfer_set``);
    returns the set's directory."""
    if cfg.transfer.source != "prompt_tuned":
        raise ValueError(f"transfer.source is {cfg.transfer.source!r}; this writes prompt_tuned sets")
    write_prompts(cfg, device=device, progress_every=max(1, cfg.transfer.prompt_tuned.tuning_steps // 4)
                  if progress else 0)
    return write_transfer_set(cfg, directory, device=device, progress=progress)


def prompt_tuned_job(*, name: str, teachers: dict[str, Path], lm: Path, corpus: Path, out: Path, seed: int = 0,
                     samples_per_class: int = 200, shard_size: int = 500, min_confidence: float = 0.0,
                     dedup: str = "none", max_length: int = 128, **prompt_tuned) -> JobConfig:
    """A validated job config with ``transfer.source: prompt_tuned`` (``prompt_tuned``: fields of
    ``transfer.prompt_tuned`` other than ``lm_path``)."""
    return validate_config({
        "name": name, "seed": seed,
        "teachers": [{"name": n, "path": str(p), "max_length": max_length} for n, p in teachers.items()],
        "transfer": {"source": "prompt_tuned", "samples_per_class": samples_per_class, "shard_size": shard_size,
                     "min_confidence": min_confidence, "dedup": dedup, "corpus": {"path": str(corpus)},
                     "prompt_tuned": {"lm_path": str(lm), **prompt_tuned}},
        "output": {"dir": str(out)}})


def target_rates(cfg: JobConfig, table, device: str) -> dict[str, float]:
    """Per teacher (and ``all``): the share of its rows that the teacher classifies as the row's class."""
    teachers = load_teachers(cfg.teachers, device=device)
    hits, counts = {}, {}
    for name, teacher in teachers.items():
        rows = [r for r in table.to_pylist() if r["teacher"] == name]
        if not rows:
            continue
        _, predicted = teacher.predict([r["text"] for r in rows])
        hits[name] = int(sum(int(p) == r["teacher_class"] for p, r in zip(predicted.tolist(), rows)))
        counts[name] = len(rows)
    rates = {n: round(hits[n] / counts[n], 4) for n in hits}
    rates["all"] = round(sum(hits.values()) / max(1, sum(counts.values())), 4)
    return rates


# transfer.prompt_tuned field -> command-line option (None: the config's default)
SETTINGS = {"commander": "commander", "num_soft_tokens": "num_soft_tokens", "tuning_steps": "tuning_steps",
            "tuning_batch_size": "tuning_batch_size", "learning_rate": "learning_rate",
            "max_source_tokens": "max_source_tokens", "max_new_tokens": "max_new_tokens",
            "min_new_tokens": "min_new_tokens", "batch_size": "gen_batch"}


def point_config(args, level: float, relaxation: str, teachers: dict[str, Path]) -> JobConfig:
    """The job config of one sweep point, validated (the sweep checks every point before it starts)."""
    settings = {key: getattr(args, arg) for key, arg in SETTINGS.items() if getattr(args, arg) is not None}
    return prompt_tuned_job(name=f"pt-{level:g}-{relaxation}", teachers=teachers, lm=args.lm, corpus=args.corpus,
                            out=args.work / f"level{level:g}-{relaxation}", seed=args.seed,
                            samples_per_class=args.samples_per_class, shard_size=args.shard_size,
                            stable_level=level, relaxation=relaxation, **settings)


def sweep_point(args, cfg: JobConfig) -> dict:
    """Tune, write the set, and measure it (see the module docstring)."""
    c = cfg.transfer.prompt_tuned
    level, relaxation = c.stable_level, c.relaxation
    start = time.perf_counter()
    write_prompts(cfg, device=args.device)
    tuned = time.perf_counter()
    directory = write_transfer_set(cfg, device=args.device, progress=False)
    generated = time.perf_counter()
    table = read_transfer_table(directory)
    summary = json.loads((directory / "summary.json").read_text())
    tuning = read_record(prompts_dir(cfg))["teachers"]
    return {"stable_level": level, "relaxation": relaxation, "rows": table.num_rows,
            "distinct_2": round(summary["distinct_2"], 4), "distinct_1": round(summary["distinct_1"], 4),
            "mean_tokens": round(summary["mean_tokens"], 2), "target_rate": target_rates(cfg, table, args.device),
            "tuning_target_rate": {n: s["final"]["target_rate"] for n, s in tuning.items()},
            "tune_seconds": round(tuned - start, 1), "generate_seconds": round(generated - tuned, 1),
            "transfer_set": str(directory)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", type=Path, help="decoder-only causal LM directory")
    p.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR", help="a teacher; repeat for more")
    p.add_argument("--corpus", type=Path, help="general-domain text file, one document per line")
    p.add_argument("--work", type=Path, default=Path("/tmp/prompt-tuned-bench"))
    p.add_argument("--out", type=Path, default=Path("prompt_tuned.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", default="1,5,10,0.5", help="stable levels to sweep")
    p.add_argument("--relaxations", default="soft", help="comma-separated: soft, straight_through")
    for flag, kind in [("--commander", str), ("--num-soft-tokens", int), ("--tuning-steps", int),
                       ("--tuning-batch-size", int), ("--learning-rate", float), ("--max-source-tokens", int),
                       ("--max-new-tokens", int), ("--min-new-tokens", int), ("--gen-batch", int)]:
        p.add_argument(flag, type=kind, default=None, help="transfer.prompt_tuned setting (default: the config's)")
    p.add_argument("--samples-per-class", type=int, default=200)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--tiny", action="store_true", help="CPU dry run on the offline demo task (--demo), small sizes")
    p.add_argument("--demo", type=Path, default=Path(".cache/demo"), help="--tiny: where the demo task is built")
    args = p.parse_args(argv)
    if args.tiny:
        from dfkd_ray.synthetic import build_synthetic_task

        task = build_synthetic_task(args.demo)
        args.lm, args.corpus = args.lm or task.lm, args.corpus or task.corpus
        args.teacher = args.teacher or [f"{n}={d}" for n, d in task.teachers.items()]
        args.tuning_steps, args.tuning_batch_size, args.samples_per_class = 40, 16, 32
        args.max_source_tokens, args.max_new_tokens, args.num_soft_tokens = 16, 16, 8
    if args.lm is None or args.corpus is None or not args.teacher:
        p.error("give --lm, --corpus and at least one --teacher NAME=DIR (or --tiny for the demo task)")
    if any("=" not in t for t in args.teacher):
        p.error("--teacher takes NAME=DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny models: threads only contend
    teachers = {t.split("=", 1)[0]: Path(t.split("=", 1)[1]) for t in args.teacher}
    levels = [float(x) for x in args.levels.split(",")]
    configs = [point_config(args, level, relaxation, teachers)
               for relaxation in args.relaxations.split(",") for level in levels]
    points = [sweep_point(args, cfg) for cfg in configs]
    names = list(teachers)
    print("| stable level | relaxation | rows | distinct-2 | target rate | " + " | ".join(names)
          + " | mean tokens | tune s | generate s |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for r in points:
        print(f"| {r['stable_level']:g} | {r['relaxation']} | {r['rows']} | {r['distinct_2']:.4f} | "
              f"{r['target_rate']['all']:.4f} | " + " | ".join(f"{r['target_rate'].get(n, 0):.4f}" for n in names)
              + f" | {r['mean_tokens']:.1f} | {r['tune_seconds']} | {r['generate_seconds']} |")
    record = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "points": points}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
