"""AS-DFD (Plug & Play Embedding Guessing) rows for a teacher set and a labelled eval file, in one process.

Rows, each the same student shape, budget and seed, scored on the eval file:

- ``teacher <name>`` and ``ensemble``: the teachers over the union labels;
- ``AS-DFD``: ``transfer.source: embedding_guessing`` with the paper's settings (sigma 0.35);
- ``AS-DFD sigma=<s>``: the sigma sweep (``--sigmas``; the paper searched 0.05-1 and chose 0.35);
- ``random embeddings``: the same training on the Gaussian starting points with no construction
  (``rounds: 0``), the first row of the paper's ablation.

Every row calls the library's in-process entry point
:func:`dfkd_ray.train.embedding_guessing.train_embedding_guessing` (what a Ray Train worker runs,
without Ray) and :mod:`dfkd_ray.evaluation`. The table is printed and every row goes to ``--out``
as JSON as soon as it is scored.

    python benchmarks/embedding_guessing.py --teacher world_sports=T1 --teacher business_scitech=T2 \\
        --eval AGNEWS/test.csv --text-column title+description \\
        --label-map 1=World,2=Sports,3=Business,4=Sci/Tech --student ENCODER --num-layers 3 --out asdfd.json
    python benchmarks/embedding_guessing.py --tiny --device cpu --demo .cache/demo --out tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROWS = ("AS-DFD", "sigma sweep", "random embeddings")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR",
                   help="a teacher classifier directory (repeat; all in one input-embedding space)")
    p.add_argument("--student", type=Path, default=None,
                   help="encoder the student starts from (default: the first teacher's directory, as in the paper)")
    p.add_argument("--num-layers", type=int, default=None, help="student layers kept, evenly spaced")
    p.add_argument("--layers", default=None, help="student layers kept, e.g. 0,3,6,9 (the paper's BERT_4)")
    p.add_argument("--eval", type=Path, default=None, help="labelled .csv/.tsv/.jsonl/.parquet file")
    p.add_argument("--text-column", default="text", help="text column, or columns joined by '+' (title+description)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--label-map", default="", metavar="RAW=NAME,...", help="raw label value -> label name")
    p.add_argument("--demo", type=Path, default=None,
                   help="use the offline demo task built here (teachers alpha and gamma, their eval file)")
    p.add_argument("--out", type=Path, default=Path("embedding_guessing.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    p.add_argument("--sigmas", default="0.05,1.0", help="the sweep's other sigmas (AS-DFD itself is sigma 0.35)")
    p.add_argument("--seeds", default="0", help="job seeds, e.g. 0,1,2: each row is trained once per seed")
    p.add_argument("--method", choices=("vanilla", "stratanet"), default="vanilla",
                   help="the KD target over the union labels (amalgamation.method)")
    p.add_argument("--samples-per-class", type=int, default=1250, help="pseudo-samples per (teacher, class) and epoch")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="requests kept for the confidence statistics")
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature (AS-DFD's tau is 1)")
    p.add_argument("--length", type=int, default=128, help="l, positions of a pseudo-sample")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field of every row, dotted (e.g. transfer.embedding_guessing.rounds=3)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run of every row: a few steps on short samples")
    args = p.parse_args(argv)
    if args.demo is None and (not args.teacher or args.eval is None):
        p.error("give --teacher NAME=DIR (one or more) and --eval FILE, or --demo DIR for the offline demo task")
    bad = [r for r in args.rows.split(",") if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {list(ROWS)}")
    if args.tiny:
        args.samples_per_class, args.epochs, args.batch_size, args.length, args.lr = 12, 1, 8, 12, 1e-3
        args.heldout_fraction = 0.5
        args.set = ["transfer.embedding_guessing.rounds=2", "transfer.embedding_guessing.teacher_steps=2",
                    "transfer.embedding_guessing.min_length=4", *args.set]
    return args


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"{flag}: {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _set(data: dict, dotted: str, raw: str) -> None:
    import yaml

    *path, last = dotted.split(".")
    for key in path:
        data = data.setdefault(key, {})
    data[last] = yaml.safe_load(raw)


def base_config(args, teachers: dict[str, str], student: Path) -> dict:
    """The job config every row shares (as a dict; each row edits a copy)."""
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    data = {
        "name": "asdfd-bench", "seed": 0,
        "teachers": [{"name": n, "path": p} for n, p in teachers.items()],
        "transfer": {"source": "embedding_guessing", "samples_per_class": args.samples_per_class,
                     "heldout_fraction": args.heldout_fraction, "embedding_guessing": {"length": args.length}},
        "amalgamation": {"method": args.method, "temperature": args.temperature},
        "student": {"path": str(student), **({"layers": layers} if layers else {}),
                    **({"num_layers": args.num_layers} if args.num_layers else {})},
        "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                  "warmup_epochs": 0.1 * args.epochs},  # the paper's warmup proportion
        "ray": {"use_gpu": args.device.startswith("cuda")}, "output": {"dir": str(args.out.with_suffix(".runs"))},
    }
    for key, value in _pairs(args.set, "--set").items():
        _set(data, key, value)
    return data


def row_configs(args, base: dict) -> dict:
    """Each row's validated config by row name (bad --set keys or values fail here, before training)."""
    import copy

    from dfkd_ray.config import validate_config

    wanted = args.rows.split(",")
    rows: dict[str, dict] = {}
    if "AS-DFD" in wanted:
        rows["AS-DFD"] = {"sigma": 0.35}
    if "sigma sweep" in wanted:
        for s in args.sigmas.split(","):
            rows[f"AS-DFD sigma={float(s):g}"] = {"sigma": float(s)}
    if "random embeddings" in wanted:
        rows["random embeddings"] = {"rounds": 0}
    configs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, fields in rows.items():
            data = copy.deepcopy(base)
            data["seed"] = seed
            data["transfer"]["embedding_guessing"].update(fields)
            configs[name, seed] = validate_config(data, source=f"row {name!r}")
    return configs


def read_eval(args, space) -> tuple[list[str], list[int]]:
    """Texts and global label ids of the eval file; ``a+b`` text columns are joined with a space."""
    from dfkd_ray.evaluation import load_labelled

    label_map = _pairs(args.label_map.split(",") if args.label_map else [], "--label-map")
    if "+" not in args.text_column:
        return load_labelled(args.eval, text_column=args.text_column, label_column=args.label_column,
                             label_map=label_map, label_space=space)
    import tempfile

    import pandas as pd

    columns = args.text_column.split("+")
    frame = pd.read_csv(args.eval, keep_default_na=False, dtype=str, sep="\t" if args.eval.suffix == ".tsv" else ",")
    joined = pd.DataFrame({"text": frame[columns].agg(" ".join, axis=1), "label": frame[args.label_column]})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.csv"
        joined.to_csv(path, index=False)
        return load_labelled(path, label_map=label_map, label_space=space)


def table(report: dict) -> str:
    lines = ["| row | seed | accuracy | macro-F1 | steps | pseudo-samples | seconds | pseudo-samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        lines.append(f"| {r.get('row', name)} | {r.get('seed', '')} | {r['accuracy']:.4f} | "
                     f"{r.get('macro_f1', float('nan')):.4f} | {r.get('steps', '')} | {r.get('pseudo_samples', '')} | "
                     f"{r.get('seconds', '')} | {r.get('pseudo_samples_per_s', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from dfkd_ray.evaluation import evaluate_student, evaluate_teachers
    from dfkd_ray.labels import UnionLabelSpace
    from dfkd_ray.models.teacher import load_teachers
    from dfkd_ray.train.embedding_guessing import train_embedding_guessing
    from dfkd_ray.train.epochs import student_num_blocks

    args = parse_args(argv)
    if args.demo is not None:
        from dfkd_ray.synthetic import build_shared_embedding_teacher, build_synthetic_task

        task = build_synthetic_task(args.demo)
        teachers = {"alpha": str(task.teachers["alpha"]), "gamma": str(build_shared_embedding_teacher(args.demo))}
        args.eval = task.eval_file
    else:
        teachers = _pairs(args.teacher, "--teacher")
    student = args.student or Path(next(iter(teachers.values())))
    configs = row_configs(args, base_config(args, teachers, student))
    device = torch.device(args.device)
    first = next(iter(configs.values()))
    space = UnionLabelSpace.from_teachers(first.teacher_labels())
    texts, labels = read_eval(args, space)
    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "eval_rows": len(texts),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    loaded = load_teachers(first.teachers, num_blocks=student_num_blocks(first), device=str(device))
    scored = evaluate_teachers(loaded, texts, labels, space, batch_size=256)
    for name, m in scored["teachers"].items():
        report["rows"][f"teacher {name}"] = {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
                                             "own_accuracy": m["own_accuracy"] and round(m["own_accuracy"], 4)}
    report["rows"]["ensemble"] = {"accuracy": round(scored["ensemble"]["accuracy"], 4),
                                  "macro_f1": round(scored["ensemble"]["macro_f1"], 4)}
    save()
    for (name, seed), cfg in configs.items():
        start = time.perf_counter()
        distiller, last = train_embedding_guessing(cfg, device=device, teachers=loaded)
        seconds = time.perf_counter() - start
        m = evaluate_student(distiller.student, texts, labels, space, batch_size=256)
        crafted = distiller.step_count * cfg.train.batch_size
        report["rows"][f"{name} (seed {seed})"] = {
            "row": name, "seed": seed, "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
            "recall": {k: round(v["recall"], 4) for k, v in m["per_class"].items()},
            "steps": distiller.step_count, "pseudo_samples": crafted, "seconds": round(seconds, 1),
            "pseudo_samples_per_s": round(crafted / seconds, 2),
            "final": {k: round(v, 4) for k, v in last.items() if isinstance(v, float)},
            "sigma": cfg.transfer.embedding_guessing.sigma, "rounds": cfg.transfer.embedding_guessing.rounds}
        print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: accuracy {m['accuracy']:.4f} after "
              f"{distiller.step_count} steps ({crafted} pseudo-samples, {seconds:.0f} s)", flush=True)
        save()
        del distiller
    print(table(report))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
