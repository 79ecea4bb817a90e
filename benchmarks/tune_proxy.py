"""Does the data-free proxy choose as labelled accuracy would? Configurations on the AG News replica,
each scored by the proxy and by real test accuracy.

The setting is the AG News benchmark's, read from its spec (``benchmarks/specs/agnews.yaml``) by the
harness ``benchmarks/amalgamation.py`` runs (:mod:`harness.setup`): the spec's teachers (two MiniLM
teachers fine-tuned on disjoint halves of the AG News labels), its student depth (3 layers), its
test rows (7,600) and development rows. Every configuration is a job config with some fields
changed (lambda, KD power, alpha, the method, the prompt-tuned source and its stable level);
configurations whose generation settings are equal share one transfer set. Each is trained in this
process exactly as one Ray Train worker trains it (``train_in_process``) and scored by the sweep's own trial scorer
(:class:`dfkd_ray.tuning.proxy.TrialScorer`, on the sweep's probe set, made by
:func:`dfkd_ray.tuning.proxy.probe_config`) and on the test set. No Ray.

Reported: each configuration's proxy, soft proxy, test and development accuracy; Spearman's rank
correlation between each proxy and test accuracy; the test accuracy of the configuration each proxy
picks against the best one.

GPU (repository root; fixtures and data wherever they are)::

    python benchmarks/tune_proxy.py --lm LM_DIR --base MINILM_DIR --agnews AGNEWS_DIR --corpus CORPUS \
        --work /tmp/tune-proxy --out tune_proxy.json [--teachers-from /tmp/agnews/teachers]

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
from dfkd_ray.tuning.proxy import TrialScorer, probe_config, proxy_from_probabilities, union_probabilities
from dfkd_ray.tuning.results import rank_correlation
from dfkd_ray.tuning.space import generation_fingerprint, set_dotted

from harness.rows import TRANSFER_SETS
from harness.setup import (Settings, add_row_arguments, add_setting_arguments, amalgamation_section, finetune_teachers,
                           label_space, make_transfer_set, read_data, steered_section)
from harness.spec import SpecError, load_spec

SPEC = Path(__file__).resolve().parent / "specs" / "agnews.yaml"

CONFIGS = ("lam0:transfer.steered.control_strength=0;"
           "lam8:transfer.steered.control_strength=8;"
           "lam32:transfer.steered.control_strength=32;"
           "lam64:;"
           "gamma0:amalgamation.kd_confidence_power=0;"
           "gamma1:amalgamation.kd_confidence_power=1;"
           "gamma1000:amalgamation.kd_confidence_power=1000;"
           "alpha0:amalgamation.alpha=0;"
           "alpha3:amalgamation.alpha=3;"
           "vanilla:amalgamation.method=vanilla;"
           "stable1:transfer.source=prompt_tuned,transfer.prompt_tuned.stable_level=1;"
           "stable5:transfer.source=prompt_tuned,transfer.prompt_tuned.stable_level=5")
"""The default configurations: ``name:dotted.key=value,...`` over the base config (lambda 64, the AG
News job's), ';' between them. The ``stable`` ones are DFKD-T3 transfer sets (prompts tuned per
teacher class, then ``--corpus`` documents rewritten) at two Gumbel-softmax stable levels."""


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
                     "steered": steered_section(args),
                     "prompt_tuned": TRANSFER_SETS["prompt_tuned"](settings)["prompt_tuned"],
                     # the documents prompt-tuned sets rewrite
                     **({"corpus": {"path": str(args.corpus)}} if args.corpus else {})},
        "amalgamation": amalgamation_section(args, "stratanet"),
        "student": {"path": str(args.base), **spec.student.model_dump(exclude_none=True),
                    "max_length": args.max_length},
        "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                  "warmup_epochs": min(1.0, args.epochs)},
        "tune": {"proxy_samples_per_class": args.probe_samples},
        "ray": {"use_gpu": args.device == "cuda"}, "output": {"dir": str(args.work / "runs")},
    }


def config_of(base: dict, fields: dict, name: str) -> JobConfig:
    """The base config with ``fields`` set, writing under its own ``output.dir`` (prompt-tuned sets keep
    their tuned prompts there)."""
    data = json.loads(json.dumps(base))
    data["output"]["dir"] = str(Path(data["output"]["dir"]) / name)
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
    p.add_argument("--corpus", type=Path, default=None,
                   help="general-domain text file, one document per line: what prompt-tuned configurations rewrite")
    p.add_argument("--teachers-from", type=Path, default=None,
                   help="teachers fine-tuned by an earlier run (" + ", ".join(f"<dir>/{n}" for n in spec.teachers) + ")")
    p.add_argument("--work", type=Path, default=Path("/tmp/tune-proxy"))
    p.add_argument("--out", type=Path, default=Path("tune_proxy.json"))
    p.add_argument("--configs", default=CONFIGS, help="name:dotted.key=value,...;... (default: 12 configurations)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_setting_arguments(p, spec.samples_per_class)
    add_row_arguments(p)
    p.add_argument("--probe-samples", type=int, default=250, help="tune.proxy_samples_per_class")
    p.add_argument("--train", default="", metavar="NAME,...",
                   help="train and score only these configurations (default: all); the probe sets still cover all")
    p.add_argument("--probes-from", type=Path, default=None,
                   help="probe sets made by an earlier run (its WORK/transfer; default: this run's WORK/transfer)")
    p.add_argument("--probes-only", action="store_true",
                   help="fine-tune the teachers and make the probe sets, then stop (for processes that share them)")
    p.add_argument("--save-predictions", type=Path, default=None,
                   help="write each configuration's class probabilities on every probe set here (safetensors)")
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
    unknown = sorted(set(filter(None, args.train.split(","))) - set(configs))
    if unknown:
        p.error(f"--train: {unknown} are not among the configurations {sorted(configs)}")
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
        make_transfer_set(cfg, directory, device)  # a prompt-tuned set's prompts are tuned first
        return directory

    probe_dir = make_probe_sets(cfgs, validate_config(base), args.probes_from or args.work / "transfer", device)
    if args.probes_only:
        return 0
    probes = {name: read_transfer_table(directory) for name, directory in probe_dir.items()}
    scorer = TrialScorer(validate_config(base), str(probe_dir["base"]))
    chosen = set(filter(None, args.train.split(","))) or set(cfgs)
    for name, cfg in cfgs.items():
        if name not in chosen:
            continue
        start = time.perf_counter()
        table = read_transfer_table(transfer_set(cfg))
        estimators = fit_confidence(cfg, table, teachers) if cfg.amalgamation.method == "stratanet" else None
        rows = training_table(table, cfg)
        distiller, _ = train_in_process(cfg, rows.column("text").to_pylist(), device=device, teachers=teachers,
                                        estimators=estimators, source_teachers=rows.column("teacher").to_pylist())
        student = distiller.student
        scores = scorer(student)
        union = {probe: union_probabilities(student, t.column("text").to_pylist(), space, 256)
                 for probe, t in probes.items()}
        scores.update(probe_scores(union, probes))
        if args.save_predictions is not None:
            save_predictions(args.save_predictions, name, union, probes)
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


def make_probe_sets(cfgs: dict[str, JobConfig], base: JobConfig, directory: Path, device) -> dict[str, Path]:
    """The sweep's probe set (``base``: the base configuration's generation settings) and one probe set
    per other generation setting among ``cfgs``, named after the first configuration with it; each
    under ``directory``/<fingerprint>, made there unless an earlier run made it."""
    made: dict[str, Path] = {}
    for name, cfg in {"base": base, **cfgs}.items():
        probe = probe_config(cfg)
        path = directory / generation_fingerprint(probe)
        if path not in made.values():
            write_transfer_set(probe, path, device=str(device), progress=False)
            made[name] = path
            log(f"probe set {name} (lambda {cfg.transfer.steered.control_strength:g}): "
                f"{read_transfer_table(path).num_rows} texts -> {path}")
    return made


def probe_scores(union: dict[str, torch.Tensor], probes: dict) -> dict[str, float]:
    """Per probe set P: ``proxy@P``, ``proxy_soft@P`` and ``proxy_conf@P`` (the agreement with each
    text's class weighted by its teacher's probability of that class, the set's ``confidence``
    column); and ``proxy@pooled`` / ``proxy_soft@pooled``: their means over the probe sets."""
    out: dict[str, float] = {}
    for name, probs in union.items():
        labels = probes[name].column("label").to_pylist()
        for key, value in proxy_from_probabilities(probs, labels).items():
            out[f"{key}@{name}"] = value
        target = torch.tensor(labels)
        weight = torch.tensor(probes[name].column("confidence").to_pylist())  # (M,)
        hits = (probs.argmax(-1) == target).float()  # (M,)
        out[f"proxy_conf@{name}"] = float(torch.stack([(hits * weight)[target == g].sum() / weight[target == g].sum()
                                                       for g in target.unique()]).mean())
    for key in ("proxy", "proxy_soft"):
        out[f"{key}@pooled"] = sum(out[f"{key}@{n}"] for n in union) / len(union)
    return out


def save_predictions(directory: Path, config: str, union: dict[str, torch.Tensor], probes: dict) -> None:
    """``directory/<config>.safetensors``: the student's union-label probabilities on each probe set
    (one tensor per set); ``directory/probes.json``: each set's labels and teacher confidences."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: probs.contiguous() for name, probs in union.items()}, str(directory / f"{config}.safetensors"))
    (directory / "probes.json").write_text(json.dumps(
        {name: {"label": t.column("label").to_pylist(), "confidence": t.column("confidence").to_pylist(),
                "teacher": t.column("teacher").to_pylist()} for name, t in probes.items()}))


def summary(rows: dict[str, dict]) -> dict:
    """Per ranking (each proxy, development accuracy): Spearman's rank correlation with test
    accuracy, the configuration it picks, that pick's test accuracy and its gap to the best."""
    test = [r["test_accuracy"] for r in rows.values()]
    best = max(test)
    out = {}
    rankings = sorted({k for r in rows.values() for k in r if k.startswith("proxy")}) + ["dev_accuracy"]
    for proxy in rankings:
        if not all(proxy in r for r in rows.values()):
            continue
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
