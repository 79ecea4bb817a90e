"""Data-free amalgamation benchmark, driven by a dataset spec: the quality table (a scaled-down
replica of StrataNet Table 3) on any labelled text-classification data.

The spec (``benchmarks/specs/<name>.yaml``, :mod:`harness.spec`) names the data files, the labels,
the teachers (which classes each is fine-tuned on, from which layers of the base encoder) and the
student's depth; nothing about a dataset is written here. The teachers are fine-tuned from
``--base`` on the spec's train rows of their classes (:mod:`harness.setup`). Every amalgamation row
then trains the same student with the same transfer-set size and training budget, and is scored on
the spec's test rows and development rows:

    supervised      the student trained on the labelled train rows (the upper bound; also the judge)
    teacher k       each teacher over the union labels; ensemble = argmax of the placed teacher logits
    vanilla_random  KL to the concatenated teacher outputs, on ``random_words`` text
    vanilla_corpus  the same on ``corpus`` text (``--corpus``, a general-domain text file)
    vanilla_steered the same on the steered set (generation without RMD/ST-amalg)
    stratanet       steered generation + RMD confidence + ST-amalg (block L2 + confidence-weighted KL)
    stratanet_msp   the same with maximum-softmax-probability confidence instead of RMD
    stratanet_nost  the same with ``fusion: no_st`` (linear layer over the confidence-weighted sum)
    stratanet_trained_st  the same with ST-amalg trained through the block loss (``train_fusion: true``, the paper's)
    stratanet_source the same with each row's KD target from the teacher it was made for (``kd_source_weight: 1``)
    stratanet_mix25, stratanet_mix50   the same with 25% / 50% of the training rows ``--corpus`` documents
                    (``train.corpus_share``; the student trains more steps over the larger table)
    stratanet_random, stratanet_corpus   diagnostics: StrataNet's machinery on untargeted text
    vanilla_real, stratanet_real   diagnostics: the same training on the spec's train text (no labels:
                    the teachers label it, as for ``corpus``). The gap between these and the steered
                    rows is what generation loses; the gap to ``supervised`` is what the teachers and
                    the distillation lose.

The rows are a registry (:mod:`harness.rows`); a new transfer source adds its rows there, in one
place. A spec's ``rows`` are what a plain run makes; ``--rows`` picks others.

``--sweep`` writes small steered sets under several decoding settings (``name:key=value,...``,
keys of ``transfer.steered``) and reports each one's teacher hit rate, judge agreement (by class)
and distinct-2 -- a cheap way to choose the generation settings before a full-size set.

The pipeline is the library's: transfer sets from :func:`dfkd_ray.transfer.writer.write_transfer_set`
(the single-process twin of the Ray generation stage), confidence statistics from
:func:`dfkd_ray.confidence.fit_confidence`, training from :func:`dfkd_ray.train.step.train_in_process`
(the :class:`~dfkd_ray.train.step.Distiller` of a Ray Train worker), scores from
:mod:`dfkd_ray.evaluation`; no Ray. Per transfer set and confidence fit it also reports the
diagnostics of :mod:`harness.diagnostics`.

GPU (repository root; the fixtures and data wherever they are)::

    python benchmarks/amalgamation.py --spec benchmarks/specs/agnews.yaml --data AGNEWS_DIR \
        --lm LM_DIR --base MINILM_DIR --corpus corpus_sample_5k.txt.xz --work /tmp/agnews --out agnews.json

CPU dry run (tiny sizes, minutes): add ``--tiny --device cpu``. Rows and seeds can run as separate
processes (``--save-transfer`` once, then ``--transfer-from``); ``--report A.json B.json ...`` prints
their tables together, per benchmark, with the seeds pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

from dfkd_ray.config import AmalgamationConfig, ConfigError, JobConfig, SteeredConfig
from dfkd_ray.confidence import fit_confidence
from dfkd_ray.evaluation import evaluate_student, evaluate_teachers
from dfkd_ray.models.teacher import collect_outputs, load_teachers
from dfkd_ray.train.epochs import student_num_blocks
from dfkd_ray.train.step import train_in_process
from dfkd_ray.transfer.sources.corpus import corpus_problems, training_table

from harness.diagnostics import (confidence_auroc, profile_distill, save_features, target_accuracy,
                                 transfer_diagnostics)
from harness.report import combined_markdown, sweep_markdown, table_markdown, target_markdown
from harness.rows import ROWS
from harness.setup import (Settings, add_row_arguments, add_setting_arguments, amalgamation_section, finetune_teachers, job_config, label_space, log,
                           make_transfer_set, parse_sweep, read_data, steered_section, train_supervised,
                           transfer_dir)
from harness.spec import SpecError, load_spec


def accuracy_row(results: dict) -> dict:
    """Accuracy, macro F1, recall per class and the confusion matrix (rows: true class): which class
    a student gives up shows there, not in the accuracy."""
    return {"accuracy": round(results["accuracy"], 4), "macro_f1": round(results["macro_f1"], 4),
            "recall": {n: round(c["recall"], 4) for n, c in results["per_class"].items()},
            "confusion": results["confusion"]}


def distill(cfg: JobConfig, table, teachers: dict, estimators, device) -> tuple[object, dict]:
    """Train one student exactly as a single Ray Train worker does (``train_in_process``)."""
    def on_epoch(epoch: int, m: dict) -> None:
        extra = " ".join(f"{k} {m[k]:.4f}" for k in ("kd", "block", "agreement") if k in m)
        log(f"  {cfg.name} seed {cfg.seed}: epoch {epoch + 1} step {m['step']} loss {m['loss']:.4f} {extra}")

    start = time.perf_counter()
    rows = training_table(table, cfg)  # the transfer set's training rows, train.corpus_share mixed in
    distiller, last = train_in_process(cfg, rows.column("text").to_pylist(), device=device, teachers=teachers,
                                       estimators=estimators, on_epoch=on_epoch,
                                       source_teachers=rows.column("teacher").to_pylist())
    distiller.model.eval()
    return distiller.student, {"rows": distiller.plan.rows, "steps": distiller.plan.total_steps,
                               "seconds": round(time.perf_counter() - start, 1),
                               "final": {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}


# ---- command line ---------------------------------------------------------------------------

def parse_args(argv=None):
    """The command line, checked (spec, rows, sweep variants, amalgamation fields, every row's job
    config) before any model is trained; ``--tiny`` shrinks every size. With ``--report`` only the
    result files are read."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", type=Path, nargs="+", metavar="RESULT_JSON",
                   help="print the tables of these result files together (per benchmark, seeds pooled) and exit")
    p.add_argument("--spec", type=Path, help="benchmark spec, e.g. benchmarks/specs/agnews.yaml")
    p.add_argument("--data", type=Path, help="the directory the spec's data files are relative to")
    p.add_argument("--lm", type=Path, help="base causal LM directory of the steered rows")
    p.add_argument("--base", type=Path, help="encoder directory: teachers and the student start here")
    p.add_argument("--corpus", type=Path, help="general-domain text file, one document per line (corpus rows)")
    p.add_argument("--work", type=Path, default=Path("/tmp/amalgamation-bench"))
    p.add_argument("--out", type=Path, default=Path("amalgamation.json"))
    p.add_argument("--rows", default="", help=f"comma-separated subset of {list(ROWS)} (default: the spec's rows); "
                   "none: only the teachers, the judge and --sweep")
    p.add_argument("--seeds", default="0", help="distillation seeds, e.g. 0,1,2 (transfer sets use seed 0)")
    p.add_argument("--transfer-from", type=Path, default=None,
                   help="reuse transfer sets made by an earlier run (<dir>/<set>.parquet), instead of generating")
    p.add_argument("--save-transfer", type=Path, default=None, help="copy each transfer set's Parquet here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_setting_arguments(p, samples_per_class=None)
    add_row_arguments(p)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--supervised-epochs", type=int, default=3)
    p.add_argument("--no-judge", action="store_true", help="skip the supervised row (and the judge diagnostics)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: 300 train/test/dev rows, 12 samples per class")
    p.add_argument("--sweep", default="", help="steered variants to compare before the rows, e.g. "
                   "\"base:;prompt:prompt=Category: {label};decay:lambda_schedule=decay,decay_rate=0.95\"")
    p.add_argument("--sweep-samples", type=int, default=100, help="samples per class of each --sweep variant")
    p.add_argument("--save-features", type=Path, default=None,
                   help="write the teachers' block features and logits on the steered set, the test set and the "
                        "development rows here (safetensors, see save_features) to choose confidence settings "
                        "offline (benchmarks/confidence_variants.py)")
    p.add_argument("--profile-distill", action="store_true",
                   help="profile 20 steps of the first amalgamation row's training and print the table")
    args = p.parse_args(argv)
    if args.report:
        return args, None, [], [], {}
    missing = [f"--{k}" for k in ("spec", "data", "lm", "base", "corpus") if getattr(args, k) is None]
    if missing:
        p.error(f"{', '.join(missing)} required (or --report RESULT_JSON ... to print earlier results)")
    absent = [f"--{k} {getattr(args, k)}" for k in ("data", "lm", "base", "corpus") if not getattr(args, k).exists()]
    if absent:
        p.error(f"{', '.join(absent)}: no such file or directory")
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        p.error(str(e))
    if args.samples_per_class is None:
        args.samples_per_class = spec.samples_per_class
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] or list(spec.rows)
    if rows == ["none"]:  # the teachers, the judge and --sweep only
        rows = []
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.transfer_from is not None:
        lacking = sorted({ROWS[r].transfer_set for r in rows
                          if not (args.transfer_from / f"{ROWS[r].transfer_set}.parquet").is_file()})
        if lacking:
            p.error(f"--transfer-from {args.transfer_from} has no {', '.join(s + '.parquet' for s in lacking)}: "
                    "make them with --save-transfer, or drop the rows that train on them")
    if args.save_features is not None and not any(ROWS[r].transfer_set == "steered" for r in rows):
        p.error("--save-features saves features of the steered set: add a steered row to --rows (e.g. stratanet)")
    sweep = parse_sweep(args.sweep)
    if sweep and args.no_judge:
        p.error("--sweep compares variants by the judge's agreement: drop --no-judge")
    for name, fields in sweep.items():  # bad keys or values fail here, before any model is trained
        try:
            SteeredConfig.model_validate(steered_section(args, fields))
        except ValidationError as e:
            p.error(f"--sweep variant {name!r}: "
                    + "; ".join(f"transfer.steered.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    try:  # --kd-power / --confidence-transform / --stratanet: checked here, not after the teachers are fine-tuned
        AmalgamationConfig.model_validate(amalgamation_section(args, "stratanet"))
    except ValidationError as e:
        p.error("; ".join(f"amalgamation.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    if args.tiny:
        args.samples_per_class, args.shard_size, args.gen_batch, args.max_new_tokens, args.top_m = 12, 24, 24, 12, 8
        args.epochs, args.teacher_epochs, args.supervised_epochs, args.max_length = 1, 1, 1, 64
        args.min_confidence, args.heldout_fraction, args.batch_size = 0.0, 0.5, 4
        args.sweep_samples = min(args.sweep_samples, 6)
    settings = Settings(args, spec, args.work)
    try:  # every row's job config (the spec's student layers among them)
        configs = {ROWS[row].transfer_set: job_config(settings, row, args.seed) for row in rows}
    except ConfigError as e:
        p.error(str(e))
    teacher_labels = {name: t.classes for name, t in spec.teachers.items()}
    for name, cfg in configs.items():  # a corpus too small for the set fails now (the real set's file comes later)
        if args.transfer_from is None and cfg.transfer.source == "corpus" and cfg.transfer.corpus.path.exists():
            problems = corpus_problems(cfg, teacher_labels)
            if problems:
                p.error(f"the {name} transfer set: " + "; ".join(f"{where}: {message}" for where, message in problems)
                        + " (--samples-per-class sets transfer.samples_per_class)")
    return args, settings, rows, seeds, sweep


# ---- the phases -----------------------------------------------------------------------------

class Bench:
    """One call of the benchmark: its settings, data, work directory and the JSON report it writes
    after every phase (so a killed call leaves what it measured)."""

    def __init__(self, settings: Settings, argv, device: torch.device):
        args = settings.args
        self.settings, self.args, self.device, self.work = settings, args, device, args.work
        self.report: dict = {
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "benchmark": {"name": settings.spec.name, "lm": args.lm.name, "spec": settings.spec.model_dump()},
            "phases": {}, "transfer": {}, "sweep": {}, "auroc": {}, "target": {}, "rows": {}}
        self.space = label_space(settings.spec)
        self.data = read_data(settings.spec, args.data, self.space, limit=300 if args.tiny else 0)
        self.teachers: dict = {}
        self.judge = None
        self._test_outputs: dict = {}

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.report, indent=1))

    def test_outputs(self) -> dict:
        """Every teacher's (block states, logits) on the test set, computed once."""
        if not self._test_outputs:
            self._test_outputs.update({n: collect_outputs(t, self.data["test_texts"], 256)
                                       for n, t in self.teachers.items()})
        return self._test_outputs

    def score_student(self, student) -> dict:
        """Test-set scores of a student, plus its accuracy on the development rows."""
        data = self.data
        result = accuracy_row(evaluate_student(student, data["test_texts"], data["test_labels"], self.space,
                                               batch_size=256))
        result["dev_accuracy"] = round(evaluate_student(student, data["dev_texts"], data["dev_labels"], self.space,
                                                        batch_size=256)["accuracy"], 4)
        return result

    def fine_tune_teachers(self) -> None:
        """1. The teachers, each fine-tuned on its classes, scored on the test set."""
        args, rows = self.args, self.report["rows"]
        self.report["phases"].update(finetune_teachers(self.settings, self.data, self.space, self.device))
        base_cfg = job_config(self.settings, "stratanet", args.seed)
        self.teachers = load_teachers(base_cfg.teachers, num_blocks=student_num_blocks(base_cfg),
                                      device=str(self.device))
        scored = evaluate_teachers(self.teachers, self.data["test_texts"], self.data["test_labels"], self.space,
                                   batch_size=256)
        for i, (name, m) in enumerate(scored["teachers"].items()):
            rows[f"teacher {i + 1} ({name})"] = {"accuracy": round(m["accuracy"], 4),
                                                 "own_accuracy": round(m["own_accuracy"], 4)}
        rows["ensemble"] = {"accuracy": round(scored["ensemble"]["accuracy"], 4)}
        log(f"teachers: {json.dumps(rows)}")
        self.save()

    def train_judge(self) -> None:
        """2. The supervised upper bound (also the judge of transfer-set labels)."""
        args = self.args
        self.judge, info = train_supervised(job_config(self.settings, "stratanet", args.seed), self.data,
                                            self.space, args, self.device)
        self.report["phases"]["supervised"] = info
        self.report["rows"]["supervised"] = accuracy_row(
            evaluate_student(self.judge, self.data["test_texts"], self.data["test_labels"], self.space,
                             batch_size=256))
        log(f"supervised: {self.report['rows']['supervised']}")
        self.save()

    def sweep(self, variants: dict) -> None:
        """2b. Small steered sets under each ``--sweep`` variant: the judge says which writes more of its class."""
        args = self.args
        for name, fields in variants.items():
            cfg = job_config(self.settings, "vanilla_steered", args.seed, steered=fields,  # a steered set's config
                             samples_per_class=args.sweep_samples)
            start = time.perf_counter()
            table, summary = make_transfer_set(cfg, self.work / "sweep" / name, self.device)
            diag = transfer_diagnostics(table, self.teachers, self.judge, self.space)
            diag.update(settings=fields, seconds=round(time.perf_counter() - start, 1),
                        samples_per_s=summary.get("samples_per_s"), rejects=summary.get("rejects"),
                        distinct_2=round(summary.get("distinct_2", 0.0), 4),
                        examples=[t[:160] for t in table.column("text").to_pylist()[::max(1, len(table) // 4)][:4]])
            self.report["sweep"][name] = diag
            log(f"sweep {name}: {json.dumps({k: v for k, v in diag.items() if k != 'examples'})}")
            self.save()
        if variants:
            print(sweep_markdown(self.report["sweep"]))

    def transfer_sets(self, rows: list[str]) -> dict:
        """3. One transfer set per name, shared by the rows that train on it; their tables."""
        args, tables = self.args, {}
        for source in sorted({ROWS[r].transfer_set for r in rows}):
            row = next(r for r in rows if ROWS[r].transfer_set == source)
            cfg = job_config(self.settings, row, args.seed)
            start = time.perf_counter()
            if args.transfer_from is not None:  # what --save-transfer wrote in an earlier call
                tables[source] = pq.read_table(args.transfer_from / f"{source}.parquet")
                summary = json.loads((args.transfer_from / f"{source}.summary.json").read_text())
                log(f"transfer set {source}: reusing {args.transfer_from / source}.parquet ({len(tables[source])} rows)")
            else:
                tables[source], summary = make_transfer_set(cfg, transfer_dir(self.work, source), self.device)
            diag = (transfer_diagnostics(tables[source], self.teachers, self.judge, self.space)
                    if self.judge is not None else {})
            diag.update(seconds=round(time.perf_counter() - start, 1),
                        samples_per_s=summary.get("samples_per_s"), rejects=summary.get("rejects"),
                        given_up=summary.get("given_up"))
            self.report["transfer"][source] = diag
            log(f"transfer set {source}: {json.dumps(diag)}")
            if args.save_transfer is not None and args.transfer_from is None:
                args.save_transfer.mkdir(parents=True, exist_ok=True)
                pq.write_table(tables[source], args.save_transfer / f"{source}.parquet")
                (args.save_transfer / f"{source}.summary.json").write_text(json.dumps(summary))
            self.save()
        return tables

    def amalgamation_rows(self, rows: list[str], seeds: list[int], tables: dict) -> None:
        """4. Every row and seed: confidence statistics (stratanet; fitted once per transfer set,
        method and seed, as the job fits them with its seed) with their diagnostics, a student, its scores."""
        args, report, data = self.args, self.report, self.data
        estimators_cache: dict = {}
        if args.save_features is not None:
            save_features(args.save_features, tables["steered"], self.teachers, self.space, self.test_outputs(),
                          data["test_labels"], data["dev_texts"], data["dev_labels"])
            log(f"teacher features -> {args.save_features}")
        for seed in seeds:
            for row in rows:
                cfg = job_config(self.settings, row, seed)
                table = tables[ROWS[row].transfer_set]
                est = None
                if cfg.amalgamation.method == "stratanet":
                    key = (ROWS[row].transfer_set, cfg.amalgamation.confidence, seed)
                    name = f"{key[0]}/{key[1]}/seed{seed}"
                    if key not in estimators_cache:
                        estimators_cache[key] = fit_confidence(cfg, table, self.teachers)
                        if cfg.amalgamation.confidence != "msp":
                            report["auroc"][name] = confidence_auroc(table, self.teachers, estimators_cache[key])
                            log(f"confidence {key}: AUROC per block {report['auroc'][name]}")
                    if cfg.amalgamation.one_class_confidence != "elimination":  # a target of its own
                        name += f"/one_class_{cfg.amalgamation.one_class_confidence}"
                    if name not in report["target"]:
                        report["target"][name] = target_accuracy(cfg, estimators_cache[key], table, self.teachers,
                                                                  self.space, self.test_outputs(), data["test_labels"])
                        log(f"KD target on the test set {name}: {json.dumps(report['target'][name])}")
                    est = estimators_cache[key]
                if args.profile_distill and "profile" not in report:
                    report["profile"] = profile_distill(cfg, table, self.teachers, est, self.device)
                    print(report["profile"], flush=True)
                student, info = distill(cfg, table, self.teachers, est, self.device)
                result = self.score_student(student)
                entry = report["rows"].setdefault(row, {"seeds": {}})
                entry["seeds"][str(seed)] = {**result, **info}
                accs = [v["accuracy"] for v in entry["seeds"].values()]
                entry.update(accuracy=round(sum(accs) / len(accs), 4), spread=round(max(accs) - min(accs), 4),
                             n=len(accs))
                log(f"{row} seed {seed}: accuracy {result['accuracy']:.4f}, development rows "
                    f"{result['dev_accuracy']:.4f} ({info['seconds']} s)")
                del student
                self.save()


def main(argv=None) -> int:
    args, settings, rows, seeds, sweep = parse_args(argv)
    if args.report:
        print(combined_markdown(args.report))
        return 0
    device = torch.device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (fine-tuning)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        bench = Bench(settings, argv, device)
    except SpecError as e:
        raise SystemExit(str(e)) from None
    log(f"{settings.spec.name}: {len(bench.data['train_texts'])} train rows, {len(bench.data['test_texts'])} test rows, "
        f"{len(bench.data['dev_texts'])} development rows; labels {list(bench.space.names)}; device {device}")
    if any(ROWS[r].transfer_set == "real" for r in rows):
        settings.real_text_file.write_text("".join(" ".join(t.split()) + "\n" for t in bench.data["train_texts"]))
    bench.fine_tune_teachers()
    if not args.no_judge:
        bench.train_judge()
    bench.sweep(sweep)
    tables = bench.transfer_sets(rows)
    bench.amalgamation_rows(rows, seeds, tables)
    bench.report["seconds"] = round(time.perf_counter() - began, 1)
    bench.save()
    if bench.report["target"]:
        print(target_markdown(bench.report["target"]))
    print(table_markdown(bench.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
