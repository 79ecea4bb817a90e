"""Does the data-free proxy choose as labelled accuracy would? Configurations on the AG News replica,
each scored by the proxy and by real test accuracy.

The setting is the AG News benchmark's, read from its spec (``benchmarks/specs/agnews.yaml``) by the
harness ``benchmarks/amalgamation.py`` runs (:mod:`harness.setup`): the spec's teachers (two MiniLM
teachers fine-tuned on disjoint halves of the AG News labels), its student depth (3 layers), its
test rows (7,600) and development rows. Every configuration is a job config with some fields
changed (lambda, KD power, alpha, the method); configurations whose generation settings are equal
share one transfer set. Each is trained in this process exactly as one Ray Train worker trains it
(``train_in_process``) and scored by the sweep's own trial scorer
(:class:`dfkd_ray.tuning.proxy.TrialScorer`, on the sweep's probe set, made by
:func:`dfkd_ray.tuning.proxy.probe_config`) and on the test set. No Ray.

Reported: each configuration's proxy, soft proxy, test and development accuracy; Spearman's rank
correlation between each proxy and test accuracy; the test accuracy of the configuration each proxy
picks against the best one.

GPU (repository root; fixtures and data wherever they are)::

    python benchmarks/tune_proxy.py --lm LM_DIR --base MINILM_DIR --agnews AGNEWS_DIR --work /tmp/tune-proxy \
        --out tune_proxy.json [--teachers-from /tmp/agnews/teachers]

Configurations can run as separate processes on one GPU (``--configs`` split, the first process's
teachers shared through ``--teachers-from``); ``--report A.json B.json ... --out merged.json``
prints and writes them as one table, the rank correlations computed over all of them.

CPU dry run (tiny sizes, a few minutes): add ``--tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dfkd_ray.config import JobConfig, validate_config
from dfkd_ray.confidence import fit_confidence
from dfkd_ray.evaluation import evaluate_student
from dfkd_ray.models.teacher import load_teachers
from dfkd_ray.train.epochs import student_num_blocks
from dfkd_ray.train.step import train_in_process
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.sources.corpus import training_table
from dfkd_ray.transfer.writer import write_transfer_set
from dfkd_ray.tuning.proxy import TrialScorer, probe_config
from dfkd_ray.tuning.results import rank_correlation
from dfkd_ray.tuning.space import generation_fingerprint, set_dotted

from harness.setup import Settings, add_setting_arguments, finetune_teachers, label_space, length_fields, read_data
from harness.spec import SpecError, load_spec

SPEC = Path(__file__).resolve().parent / "specs" / "agnews.yaml"

CONFIGS = ("lam0:transfer.steered.control_strength=0;"
           "lam8:transfer.steered.control_strength=8;"
           "lam32:;"
           "lam64:transfer.steered.control_strength=64;"
           "gamma0:amalgamation.kd_confidence_power=0;"
           "gamma1:amalgamation.kd_confidence_power=1;"
           "gamma1000:amalgamation.kd_confidence_power=1000;"
           "alpha0:amalgamation.alpha=0;"
           "alpha3:amalgamation.alpha=3;"
           "vanilla:amalgamation.method=vanilla")
"""The default configurations: ``name:dotted.key=value,...`` over the base config, ';' between them."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_configs(spec: str) -> dict[str, dict]:
    """``"name:key=value,key=value;name2:..."`` -> {name: {dotted key: value}} (values parsed as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for part in filter(None, (x.strip() for x in spec.split(";"))):
        name, _, body = part.partition(":")
        if not name or name in out:
            raise SystemExit(f"--configs: {part!r} needs a new name before ':'")
        fields = {}
        for item in filter(None, (x.strip() for x in body.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"--configs {name!r}: {item!r} is not key=value")
            fields[key.strip()] = yaml.safe_load(value)
        out[name] = fields
    return out


def base_config(settings: Settings) -> dict:
    """The AG News replica's job config (``docs/benchmarks.md``), as a plain dict: the spec's
    teachers and student depth, the command line's sizes."""
    args, spec = settings.args, settings.spec
    return {
        "name": f"{spec.name}-tune", "seed": args.seed,
        "teachers": [{"name": n, "path": str(args.teachers_from / n if args.teachers_from else settings.teacher_dir(n)),
                      "max_length": args.max_length} for n in spec.teachers],
        "transfer": {"source": "steered", "samples_per_class": args.samples_per_class, "shard_size": args.shard_size,
                     "dedup": "near", "heldout_fraction": args.heldout_fraction, "min_confidence": args.min_confidence,
                     "steered": {"engine": "hf", "lm_path": str(args.lm), "control_strength": 32.0,
                                 "top_m": args.top_m, "top_k": min(args.top_m, 50), "top_p": 0.9,
                                 **length_fields(args),
                                 "prompt": "Category: {label}", "batch_size": args.gen_batch}},
        "amalgamation": {"method": "stratanet", "amalg_dim": 256, "temperature": 0.75},
        "student": {"path": str(args.base), **spec.student.model_dump(exclude_none=True),
                    "max_length": args.max_length},
        "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                  "warmup_epochs": min(1.0, args.epochs)},
        "tune": {"proxy_samples_per_class": args.probe_samples},
        "ray": {"use_gpu": args.device == "cuda"}, "output": {"dir": str(args.work / "runs")},
    }


def config_of(base: dict, fields: dict, name: str) -> JobConfig:
    data = json.loads(json.dumps(base))
    for key, value in fields.items():
        set_dotted(data, key, value)
    return validate_config(data, source=f"configuration {name}")


def parse_args(argv=None) -> tuple[Settings, dict[str, dict]]:
    """The command line with the AG News spec, and the configurations, each checked before any model is trained."""
    try:
        spec = load_spec(SPEC)
    except SpecError as e:
        raise SystemExit(str(e)) from None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", type=Path, required=True, help="base causal LM directory (the lm-gpt2-news fixture)")
    p.add_argument("--base", type=Path, required=True, help="MiniLM fixture: teachers and the student start here")
    p.add_argument("--agnews", type=Path, required=True,
                   help=f"AG News directory: the data files of benchmarks/specs/{SPEC.name} are relative to it")
    p.add_argument("--teachers-from", type=Path, default=None,
                   help="teachers fine-tuned by an earlier run (" + ", ".join(f"<dir>/{n}" for n in spec.teachers) + ")")
    p.add_argument("--work", type=Path, default=Path("/tmp/tune-proxy"))
    p.add_argument("--out", type=Path, default=Path("tune_proxy.json"))
    p.add_argument("--configs", default=CONFIGS, help="name:dotted.key=value,...;... (default: 10 configurations)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_setting_arguments(p, spec.samples_per_class)
    p.add_argument("--probe-samples", type=int, default=250, help="tune.proxy_samples_per_class")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--tiny", action="store_true", help="CPU dry run: 300 test rows, tiny sets and budgets")
    args = p.parse_args(argv)
    if args.tiny:
        args.samples_per_class, args.probe_samples, args.shard_size, args.gen_batch = 16, 4, 32, 32
        args.top_m, args.max_new_tokens, args.max_length, args.batch_size = 8, 12, 64, 4
        args.epochs, args.teacher_epochs, args.min_confidence, args.heldout_fraction = 1, 1, 0.0, 0.5
    settings = Settings(args, spec, args.work)
    configs = parse_configs(args.configs)
    base = base_config(settings)
    for name, fields in configs.items():  # bad keys or values fail here, before any model is trained
        try:
            config_of(base, fields, name)
        except ValueError as e:
            p.error(str(e))
    return settings, configs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--report" in argv:  # merge earlier outputs: no model, no data
        p = argparse.ArgumentParser(description="merge tune_proxy outputs")
        p.add_argument("--report", type=Path, nargs="+", required=True, metavar="RESULT_JSON")
        p.add_argument("--out", type=Path, default=Path("tune_proxy.json"))
        merge = p.parse_args(argv)
        return merge_reports(merge.report, merge.out)
    settings, configs = parse_args(argv)
    args = settings.args
    device = torch.device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "configs": {}}
    space = label_space(settings.spec)
    try:
        data = read_data(settings.spec, args.agnews, space, limit=300 if args.tiny else 0)
    except SpecError as e:
        raise SystemExit(f"{e} (--agnews {args.agnews})") from None
    if args.teachers_from is None:
        report["teachers"] = finetune_teachers(settings, data, space, device)
    base = base_config(settings)
    cfgs = {name: config_of(base, fields, name) for name, fields in configs.items()}
    first = next(iter(cfgs.values()))
    teachers = load_teachers(first.teachers, num_blocks=student_num_blocks(first), device=str(device))

    def transfer_set(cfg: JobConfig) -> Path:
        directory = args.work / "transfer" / generation_fingerprint(cfg)
        write_transfer_set(cfg, directory, device=str(device), progress=False)
        return directory

    probe = probe_config(validate_config(base))
    probe_dir = transfer_set(probe)
    log(f"probe set: {read_transfer_table(probe_dir).num_rows} texts -> {probe_dir}")
    scorer = TrialScorer(validate_config(base), str(probe_dir))
    for name, cfg in cfgs.items():
        start = time.perf_counter()
        table = read_transfer_table(transfer_set(cfg))
        estimators = fit_confidence(cfg, table, teachers) if cfg.amalgamation.method == "stratanet" else None
        rows = training_table(table, cfg)
        distiller, _ = train_in_process(cfg, rows.column("text").to_pylist(), device=device, teachers=teachers,
                                        estimators=estimators, source_teachers=rows.column("teacher").to_pylist())
        student = distiller.student
        scores = scorer(student)
        scores["test_accuracy"] = evaluate_student(student, data["test_texts"], data["test_labels"], space, 256)["accuracy"]
        scores["dev_accuracy"] = evaluate_student(student, data["dev_texts"], data["dev_labels"], space, 256)["accuracy"]
        report["configs"][name] = {"fields": configs[name], **{k: round(v, 4) for k, v in scores.items()},
                                   "seconds": round(time.perf_counter() - start, 1)}
        log(f"{name}: {json.dumps(report['configs'][name])}")
        del distiller, student
        args.out.write_text(json.dumps(report, indent=1))
    report["summary"] = summary(report["configs"])
    report["seconds"] = round(time.perf_counter() - began, 1)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def summary(rows: dict[str, dict]) -> dict:
    """Per ranking (the proxy, the soft proxy, development accuracy): Spearman's rank correlation with
    test accuracy, the configuration it picks, that pick's test accuracy and its gap to the best."""
    test = [r["test_accuracy"] for r in rows.values()]
    best = max(test)
    out = {}
    for proxy in ("proxy", "proxy_soft", "dev_accuracy"):
        values = [r[proxy] for r in rows.values()]
        pick = max(rows, key=lambda n: rows[n][proxy])
        out[proxy] = {"spearman": round(rank_correlation(values, test), 4), "pick": pick,
                      "pick_test_accuracy": rows[pick]["test_accuracy"], "best_test_accuracy": best,
                      "gap_points": round(100 * (best - rows[pick]["test_accuracy"]), 2)}
    return out


def merge_reports(paths: list[Path], out: Path) -> int:
    """Configurations scored by separate processes (``--configs`` split across them, one teacher set
    through ``--teachers-from``) as one table: their rows together, the summary over all of them."""
    merged: dict = {"parts": [], "configs": {}}
    for path in paths:
        part = json.loads(path.read_text())
        clash = sorted(set(part["configs"]) & set(merged["configs"]))
        if clash:
            raise SystemExit(f"--report: configurations {clash} appear in more than one file (one is {path})")
        merged["configs"].update(part["configs"])
        merged["parts"].append({k: part.get(k) for k in ("command", "device", "torch", "date", "seconds")})
    if len(merged["configs"]) < 2:
        raise SystemExit("--report: fewer than two configurations scored; nothing to rank")
    merged["summary"] = summary(merged["configs"])
    out.write_text(json.dumps(merged, indent=1))
    print(markdown(merged))
    return 0


def markdown(report: dict) -> str:
    lines = ["| configuration | fields | proxy | proxy_soft | dev accuracy | test accuracy |", "|---|---|---|---|---|---|"]
    for name, r in sorted(report["configs"].items(), key=lambda kv: -kv[1]["test_accuracy"]):
        fields = ", ".join(f"{k}={v}" for k, v in r["fields"].items()) or "(base)"
        lines.append(f"| {name} | {fields} | {r['proxy']:.4f} | {r['proxy_soft']:.4f} | {100 * r['dev_accuracy']:.2f} | "
                     f"{100 * r['test_accuracy']:.2f} |")
    lines += ["", "| ranked by | Spearman vs test | pick | its test accuracy | best test accuracy | gap (points) |",
              "|---|---|---|---|---|---|"]
    for proxy, s in report["summary"].items():
        lines.append(f"| {proxy} | {s['spearman']:.3f} | {s['pick']} | {100 * s['pick_test_accuracy']:.2f} | "
                     f"{100 * s['best_test_accuracy']:.2f} | {s['gap_points']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
