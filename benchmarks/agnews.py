"""AG News data-free amalgamation: the quality table (a scaled-down replica of StrataNet Table 3).

Two teachers are fine-tuned from the MiniLM fixture on real AG News train rows (``world_sports``
on {World, Sports}, ``business_scitech`` on {Business, Sci/Tech}; :mod:`agnews_setup`). Every
amalgamation row then trains the same 3-layer MiniLM student with the same transfer-set size and
training budget, and is scored on the full AG News test set (7,600 rows, ``title + " " + description``):

    supervised      the student trained on the labelled train rows (the upper bound; also the judge)
    teacher 1/2     each teacher over the union labels; ensemble = argmax of the placed teacher logits
    vanilla_random  KL to the concatenated teacher outputs, on ``random_words`` text
    vanilla_corpus  the same on ``corpus`` text (the 5k-document general-domain sample)
    vanilla_steered the same on the steered set (a diagnostic: generation without RMD/ST-amalg)
    stratanet       steered generation + RMD confidence + ST-amalg (block L2 + confidence-weighted KL)
    stratanet_msp   the same with maximum-softmax-probability confidence instead of RMD
    stratanet_nost  the same with ``fusion: no_st`` (linear layer over the confidence-weighted sum)
    vanilla_real, stratanet_real   diagnostics: the same training on real AG News train text (no
                    labels: the teachers label it, as for ``corpus``). The gap between these and the
                    steered rows is what generation loses; the gap to ``supervised`` is what the
                    teachers and the distillation lose.

``--sweep`` writes small steered sets under several decoding settings (``name:key=value,...``,
keys of ``transfer.steered``) and reports each one's teacher hit rate, judge agreement (by class)
and distinct-2 -- a cheap way to choose the generation settings before a full-size set.

The pipeline is the library's: transfer sets from :func:`dfkd_ray.transfer.writer.write_transfer_set`
(the single-process twin of the Ray generation stage), confidence statistics from
:func:`dfkd_ray.confidence.fit_confidence`, training from :func:`dfkd_ray.train.step.train_in_process`
(the :class:`~dfkd_ray.train.step.Distiller` of a Ray Train worker), scores from
:mod:`dfkd_ray.evaluation`; no Ray. Per transfer set and confidence fit it also reports the
diagnostics of :mod:`agnews_diagnostics`.

GPU (repository root; the fixtures and data wherever they are)::

    python benchmarks/agnews.py --lm LM_DIR --base MINILM_DIR --agnews AGNEWS_DIR \
        --corpus corpus_sample_5k.txt.xz --work /tmp/agnews --out agnews.json

CPU dry run (tiny sizes, minutes): add ``--tiny --device cpu``.
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

from dfkd_ray.config import AmalgamationConfig, JobConfig, SteeredConfig
from dfkd_ray.confidence import fit_confidence
from dfkd_ray.evaluation import evaluate_student, evaluate_teachers
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.models.teacher import collect_outputs, load_teachers
from dfkd_ray.train.step import train_in_process

from agnews_diagnostics import (TARGET_POWERS, confidence_auroc, profile_distill, save_features, target_accuracy,
                                transfer_diagnostics)
from agnews_setup import (LABELS, ROWS, SOURCES, TEACHERS, amalgamation_section, finetune_teachers, job_config, log,
                          make_transfer_set, parse_sweep, read_agnews, real_text_file, steered_section,
                          train_supervised, training_texts, transfer_dir)


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
    distiller, last = train_in_process(cfg, training_texts(table), device=device, teachers=teachers,
                                       estimators=estimators, on_epoch=on_epoch)
    distiller.model.eval()
    return distiller.student, {"rows": distiller.plan.rows, "steps": distiller.plan.total_steps,
                               "seconds": round(time.perf_counter() - start, 1),
                               "final": {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}


# ---- command line ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (rows, sweep variants, amalgamation fields) before any model is
    trained; ``--tiny`` shrinks every size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", type=Path, required=True, help="base causal LM directory (e.g. the lm-gpt2-news fixture)")
    p.add_argument("--base", type=Path, required=True, help="MiniLM fixture: teachers and the student start here")
    p.add_argument("--agnews", type=Path, required=True, help="AG News directory (csv or csv.xz files)")
    p.add_argument("--corpus", type=Path, required=True, help="corpus_sample_5k.txt.xz")
    p.add_argument("--work", type=Path, default=Path("/tmp/agnews-bench"))
    p.add_argument("--out", type=Path, default=Path("agnews.json"))
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--seeds", default="0", help="distillation seeds, e.g. 0,1,2 (transfer sets use seed 0)")
    p.add_argument("--transfer-from", type=Path, default=None,
                   help="reuse transfer sets made by an earlier run (<dir>/<source>/), instead of generating")
    p.add_argument("--save-transfer", type=Path, default=None, help="copy each transfer set's Parquet here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-class", type=int, default=1250)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--gen-batch", type=int, default=500)
    p.add_argument("--control-strength", type=float, default=32.0,
                   help="lambda of the steered rows (transfer.steered.control_strength)")
    p.add_argument("--top-m", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt", default="Category: {label}",
                   help="steered prompt template (StrataNet Table 1); '' for none. The set keeps only the continuation")
    p.add_argument("--lambda-schedule", choices=("constant", "decay"), default="constant")
    p.add_argument("--decay-rate", type=float, default=0.97, help="per-token lambda decay (decay schedule)")
    p.add_argument("--min-confidence", type=float, default=0.5, help="steered rows only")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="rows kept to fit confidence statistics")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.75)
    p.add_argument("--kd-power", type=float, default=64.0,
                   help="amalgamation.kd_confidence_power of the stratanet rows (gamma of the KD teacher weights)")
    p.add_argument("--confidence-transform", choices=("logistic", "ecdf"), default="logistic",
                   help="amalgamation.confidence_transform of the stratanet rows")
    p.add_argument("--stratanet", default="", metavar="KEY=VALUE,...",
                   help="amalgamation fields of the StrataNet rows (after --kd-power), e.g. 'alpha=0.3,train_fusion=false'")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--supervised-epochs", type=int, default=3)
    p.add_argument("--no-judge", action="store_true", help="skip the supervised row (and the judge diagnostics)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: 300 train/test rows, 12 samples per class")
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
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {ROWS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.save_features is not None and not any(SOURCES[r] == "steered" for r in rows):
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
    return args, rows, seeds, sweep


# ---- the phases -----------------------------------------------------------------------------

class Bench:
    """One call of the benchmark: its settings, data, work directory and the JSON report it writes
    after every phase (so a killed call leaves what it measured)."""

    def __init__(self, args, argv, device: torch.device):
        self.args, self.device, self.work = args, device, args.work
        self.report: dict = {
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "phases": {}, "transfer": {}, "sweep": {}, "auroc": {}, "target": {}, "rows": {}}
        self.data = read_agnews(args.agnews, limit=300 if args.tiny else 0)
        self.space = UnionLabelSpace.from_teachers(TEACHERS)
        assert list(self.space.names) == LABELS, self.space.names
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
        """1. The teachers, fine-tuned on their halves of the labels, scored on the test set."""
        args, rows = self.args, self.report["rows"]
        self.report["phases"].update(finetune_teachers(args, self.data, self.work, self.device))
        base_cfg = job_config(args, self.work, "stratanet", args.seed)
        self.teachers = load_teachers(base_cfg.teachers, num_blocks=3, device=str(self.device))
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
        self.judge, info = train_supervised(job_config(args, self.work, "stratanet", args.seed), self.data, args,
                                            self.device)
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
            cfg = job_config(args, self.work, f"sweep-{name}", args.seed, steered=fields,
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
        """3. One transfer set per source, shared by the rows that use that source; their tables."""
        args, tables = self.args, {}
        for source in sorted({SOURCES[r] for r in rows}):
            row = next(r for r in rows if SOURCES[r] == source)
            cfg = job_config(args, self.work, row, args.seed)
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
            save_features(args.save_features, tables["steered"], self.teachers, self.test_outputs(),
                          data["test_labels"], data["dev_texts"], data["dev_labels"])
            log(f"teacher features -> {args.save_features}")
        for seed in seeds:
            for row in rows:
                cfg = job_config(args, self.work, row, seed)
                table = tables[SOURCES[row]]
                est = None
                if cfg.amalgamation.method == "stratanet":
                    key = (SOURCES[row], cfg.amalgamation.confidence, seed)
                    name = f"{key[0]}/{key[1]}/seed{seed}"
                    if key not in estimators_cache:
                        estimators_cache[key] = fit_confidence(cfg, table, self.teachers)
                        if cfg.amalgamation.confidence != "msp":
                            report["auroc"][name] = confidence_auroc(table, self.teachers, estimators_cache[key])
                            log(f"confidence {key}: AUROC per block {report['auroc'][name]}")
                        report["target"][name] = target_accuracy(cfg, estimators_cache[key], table, self.teachers,
                                                                  self.space, self.test_outputs(), data["test_labels"])
                        log(f"KD target on the test set {key}: {json.dumps(report['target'][name])}")
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
    args, rows, seeds, sweep = parse_args(argv)
    device = torch.device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (fine-tuning)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    bench = Bench(args, argv, device)
    log(f"AG News: {len(bench.data['train_texts'])} train rows, {len(bench.data['test_texts'])} test rows; "
        f"device {device}")
    if any(SOURCES[r] == "real" for r in rows):
        real_text_file(args.work).write_text("".join(" ".join(t.split()) + "\n" for t in bench.data["train_texts"]))
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


# ---- tables ---------------------------------------------------------------------------------

def sweep_markdown(sweep: dict) -> str:
    names = None
    lines = []
    for name, d in sweep.items():
        by_class = d.get("judge_agreement_by_class", {})
        if names is None:
            names = list(by_class)
            lines += ["| variant | settings | rows | teacher hit | judge agreement | " + " | ".join(names)
                      + " | distinct-2 | samples/s |", "|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
        settings = ", ".join(f"{k}={v}" for k, v in d["settings"].items()) or "(defaults)"
        lines.append(f"| {name} | {settings} | {d['rows']} | {d['teacher_hit_rate']} | {d['judge_agreement']} | "
                     + " | ".join(str(by_class.get(n, "-")) for n in names)
                     + f" | {d['distinct_2']} | {d.get('samples_per_s') or 0:.1f} |")
    return "\n".join(lines)


def target_markdown(target: dict) -> str:
    """The KD target's test-set accuracy by confidence variant and ``kd_confidence_power``."""
    lines = ["| transfer set / confidence / transform / fit seed | selects own teacher | "
             + " | ".join(f"gamma {p:g}" for p in TARGET_POWERS) + " | oracle |",
             "|---|---|" + "---|" * len(TARGET_POWERS) + "---|"]
    for key, t in target.items():
        for variant, v in t.items():
            if variant == "oracle":
                continue
            accs = " | ".join(f"{100 * v['accuracy_by_power'][str(p)]:.2f}" for p in TARGET_POWERS)
            source, _, seed = key.split("/")
            lines.append(f"| {source} / {variant} / {seed} | {100 * v['selects_own']:.1f}% | {accs} | "
                         f"{100 * t['oracle']:.2f} |")
    return "\n".join(lines)


def table_markdown(report: dict) -> str:
    sup = report["rows"].get("supervised", {}).get("accuracy")
    lines = ["| row | accuracy | spread (max-min) | seeds | % of supervised | transfer hit rate | judge agreement |",
             "|---|---|---|---|---|---|---|"]
    for row, r in report["rows"].items():
        src = SOURCES.get(row)
        t = report["transfer"].get(src, {}) if src else {}
        spread = f"{100 * r['spread']:.2f}" if "spread" in r else "-"
        pct = f"{100 * r['accuracy'] / sup:.1f}%" if sup else "-"
        lines.append(f"| {row} | {100 * r['accuracy']:.2f} | {spread} | {r.get('n', 1)} | {pct} | "
                     f"{t.get('teacher_hit_rate', '-')} | {t.get('judge_agreement', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
