"""AG News data-free amalgamation: the quality table (a scaled-down replica of StrataNet Table 3).

Two teachers are fine-tuned here from the MiniLM fixture on real AG News train rows: ``world_sports``
on {World, Sports}, ``business_scitech`` on {Business, Sci/Tech}. Every amalgamation row then
trains the same 3-layer MiniLM student with the same transfer-set size and training budget, and is
scored on the full AG News test set (7,600 rows, ``title + " " + description``):

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

Nothing here re-implements the pipeline: transfer sets come from
:func:`dfkd_ray.transfer.writer.write_transfer_set` (the single-process twin of the Ray generation
stage, sharing ``make_shard``/sources/filters), confidence statistics from
:func:`dfkd_ray.train.loop.fit_confidence`, training from :class:`dfkd_ray.train.loop.Distiller`
(+ ``iterate_epochs``), scores from :mod:`dfkd_ray.evaluation`. The GPU machine has no Ray.

Diagnostics per transfer set: the source teacher's hit rate (its argmax equals the row's target
class; for untargeted sources that is true by construction), the supervised judge's agreement with
the row's label (the share of text that is really of its class), and for the confidence estimators
the AUROC of "other teacher's rows" vs "own rows" per block (higher = better separated).

GPU (repository root; fixtures and data copied under .carry/ag, pydantic + datasketch wheels in .whl):
    python benchmarks/agnews.py --lm .carry/ag/lm-gpt2-news --base .carry/ag/minilm-l6-trim \
        --agnews .carry/ag/agnews --corpus .carry/ag/corpus_sample_5k.txt.xz --work /tmp/agnews \
        --out $OUT/agnews.json
CPU dry run (tiny sizes, minutes): add ``--tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfkd_ray.config import AmalgamationConfig, JobConfig, SteeredConfig, validate_config  # noqa: E402
from dfkd_ray.train.loop import fit_confidence, train_in_process  # noqa: E402
from dfkd_ray.evaluation import evaluate_student, evaluate_teachers  # noqa: E402
from dfkd_ray.labels import UnionLabelSpace  # noqa: E402
from dfkd_ray.math.amalgamation import kd_teacher_weights  # noqa: E402
from dfkd_ray.math.confidence import auroc  # noqa: E402
from dfkd_ray.math.losses import union_target  # noqa: E402
from dfkd_ray.models.amalgamator import collect_outputs  # noqa: E402
from dfkd_ray.transfer.store import read_transfer_table  # noqa: E402
from dfkd_ray.models.teacher import load_teachers  # noqa: E402
from dfkd_ray.transfer.writer import write_transfer_set  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]  # AG News labels 1..4
TEACHERS = {"world_sports": ["World", "Sports"], "business_scitech": ["Business", "Sci/Tech"]}
SOURCES = {"vanilla_random": "random_words", "vanilla_corpus": "corpus", "vanilla_steered": "steered",
           "stratanet": "steered", "stratanet_msp": "steered", "stratanet_nost": "steered",
           "stratanet_random": "random_words", "stratanet_corpus": "corpus",
           "vanilla_real": "real", "stratanet_real": "real"}
KIND = {"real": "corpus"}  # the transfer source that builds a set (real AG News text: a corpus file)
AMALGAMATION = {"vanilla_random": {"method": "vanilla"}, "vanilla_corpus": {"method": "vanilla"},
                "vanilla_steered": {"method": "vanilla"},
                "stratanet": {"method": "stratanet", "confidence": "rmd", "fusion": "st"},
                "stratanet_msp": {"method": "stratanet", "confidence": "msp", "fusion": "st"},
                "stratanet_nost": {"method": "stratanet", "confidence": "rmd", "fusion": "no_st"},
                "stratanet_random": {"method": "stratanet", "confidence": "rmd", "fusion": "st"},
                "stratanet_corpus": {"method": "stratanet", "confidence": "rmd", "fusion": "st"},
                "vanilla_real": {"method": "vanilla"},
                "stratanet_real": {"method": "stratanet", "confidence": "rmd", "fusion": "st"}}
ROWS = list(SOURCES)
TARGET_POWERS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 1000.0)  # kd_confidence_power values the target diagnostic scores


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data -----------------------------------------------------------------------------------

def read_agnews(directory: Path, limit: int = 0) -> dict:
    """Test (title + " " + description) and the two train subsets, labels as 0-based global ids."""
    import pandas as pd

    def find(stem: str) -> Path:
        for suffix in (".csv", ".csv.xz", ".csv.gz"):
            if (directory / f"{stem}{suffix}").is_file():
                return directory / f"{stem}{suffix}"
        raise FileNotFoundError(f"{directory}/{stem}.csv(.xz) is missing; pass --agnews <shared/data/agnews>")

    test = pd.read_csv(find("test"), keep_default_na=False)
    titledesc, desc = (pd.read_csv(find(s), keep_default_na=False)
                       for s in ("train_subset_lst5k_titledesc", "train_subset_dhim_desc"))
    train = pd.concat([titledesc, desc], ignore_index=True)
    data = {"test_texts": (test["title"] + " " + test["description"]).tolist(),
            "test_labels": (test["label"].astype(int) - 1).tolist(),
            "train_texts": train["text"].tolist(), "train_labels": (train["label"].astype(int) - 1).tolist(),
            # development rows: the title + description train rows (written like the test rows); settings
            # are chosen on them, the test set only reports. The teachers are fine-tuned on them.
            "dev_texts": titledesc["text"].tolist(), "dev_labels": (titledesc["label"].astype(int) - 1).tolist()}
    if limit:
        rng = random.Random(0)
        for split in ("test", "train", "dev"):
            idx = rng.sample(range(len(data[f"{split}_texts"])), min(limit, len(data[f"{split}_texts"])))
            data[f"{split}_texts"] = [data[f"{split}_texts"][i] for i in idx]
            data[f"{split}_labels"] = [data[f"{split}_labels"][i] for i in idx]
    return data


def batches(n: int, size: int, seed: int, drop_last: bool = True):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    stop = n - n % size if drop_last else n
    return [order[i:i + size] for i in range(0, stop, size)]


# ---- supervised models (teachers, the upper-bound student) ------------------------------------

def _train_classifier(model, tokenize, texts, labels, *, epochs, lr, batch_size, seed, device, desc) -> float:
    from transformers import get_linear_schedule_with_warmup

    steps = epochs * (len(texts) // batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    y_all = torch.tensor(labels)
    # Deterministic kernels while fine-tuning: a later call of this script (reusing saved transfer
    # sets) retrains the very same teachers; the weights' digest in the JSON shows it.
    torch.use_deterministic_algorithms(True, warn_only=True)
    model.train()
    start, done = time.perf_counter(), 0
    for epoch in range(epochs):
        for idx in batches(len(texts), batch_size, seed * 100 + epoch):
            enc = tokenize([texts[i] for i in idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            done += 1
        log(f"{desc}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f} ({done}/{steps} steps)")
    torch.use_deterministic_algorithms(False)
    model.eval()
    return time.perf_counter() - start


def finetune_teacher(base: Path, out: Path, names: list[str], texts, labels, args, device) -> dict:
    """A 2-class MiniLM teacher: AutoModelForSequenceClassification + its tokenizer -> ``out``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        dtype=torch.float32).to(device)

    def tokenize(batch):
        return tok(batch, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt").to(device)

    secs = _train_classifier(model, tokenize, texts, labels, epochs=args.teacher_epochs, lr=args.teacher_lr,
                             batch_size=32, seed=args.seed, device=device, desc=f"teacher {out.name}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()[:16]
    return {"rows": len(texts), "seconds": round(secs, 1), "weights_sha256": digest}


def train_supervised(cfg: JobConfig, data: dict, args, device) -> tuple[object, dict]:
    """The amalgamation rows' student shape trained on the labelled train rows (upper bound, judge)."""
    from dfkd_ray.models.student import Student

    torch.manual_seed(args.seed)
    student = Student.from_config(cfg.student, labels=LABELS, amalg_dim=cfg.amalgamation.amalg_dim).to(device)
    student.proj.requires_grad_(False)
    secs = _train_classifier(student, student.tokenize, data["train_texts"], data["train_labels"],
                             epochs=args.supervised_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             device=device, desc="supervised student")
    return student, {"rows": len(data["train_texts"]), "seconds": round(secs, 1)}


# ---- configs --------------------------------------------------------------------------------

def real_text_file(work: Path) -> Path:
    """The AG News train texts, one per line: the corpus of the ``real`` diagnostic rows."""
    return work / "agnews_train_text.txt"


def steered_section(args, overrides: dict | None = None) -> dict:
    """``transfer.steered`` of every row, with a ``--sweep`` variant's ``overrides``."""
    return {"engine": "hf", "lm_path": str(args.lm), "control_strength": args.control_strength,
            "top_m": args.top_m, "top_k": min(args.top_m, 50), "top_p": 0.9,
            "max_new_tokens": args.max_new_tokens, "min_new_tokens": min(16, args.max_new_tokens), "prompt": args.prompt,
            "lambda_schedule": args.lambda_schedule, "decay_rate": args.decay_rate,
            "batch_size": args.gen_batch, **(overrides or {})}


def job_config(args, work: Path, row: str, seed: int, *, steered: dict | None = None,
               samples_per_class: int | None = None) -> JobConfig:
    """The job config of one row; ``steered`` overrides ``transfer.steered`` fields (``--sweep``)."""
    source = SOURCES.get(row, "steered")
    kind = KIND.get(source, source)
    transfer = {"source": kind, "samples_per_class": samples_per_class or args.samples_per_class,
                "shard_size": args.shard_size,
                "dedup": "near", "heldout_fraction": args.heldout_fraction, "max_attempts": 3,
                "min_confidence": args.min_confidence if kind == "steered" else 0.0,
                "random_words": {"min_words": 16, "max_words": 48},
                "corpus": {"path": str(real_text_file(work) if source == "real" else args.corpus),
                           "min_words": 8, "max_words": 64},
                "steered": steered_section(args, steered)}
    data = {"name": f"agnews-{row}", "seed": seed,
            "teachers": [{"name": n, "path": str(work / "teachers" / n), "max_length": args.max_length}
                         for n in TEACHERS],
            "transfer": transfer,
            "amalgamation": amalgamation_section(args, row),
            "student": {"path": str(args.base), "num_layers": 3, "max_length": args.max_length},
            "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                      "warmup_epochs": min(1.0, args.epochs), "shuffle_buffer": 0},
            "ray": {"use_gpu": args.device == "cuda"}, "output": {"dir": str(work / "runs" / row)}}
    return validate_config(data, source=f"benchmark row {row}")


def amalgamation_section(args, row: str) -> dict:
    """``amalgamation`` of one row: its method/confidence/fusion plus the command line's KD settings."""
    section = {**AMALGAMATION.get(row, {"method": "vanilla"}), "amalg_dim": 256, "temperature": args.temperature}
    if section["method"] == "stratanet":
        section.update(kd_confidence_power=args.kd_power, confidence_transform=args.confidence_transform)
        section.update(parse_fields(args.stratanet, "--stratanet"))
    return section


def parse_fields(body: str, flag: str) -> dict:
    """``"key=value,key=value"`` -> {key: value}: numbers and booleans parsed, the rest kept as text (so a
    value cannot hold ',' or ';'); the keys are checked when the config that holds them is validated."""
    import yaml

    fields = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"{flag}: {item!r} is not key=value (e.g. alpha=0.3)")
        parsed = yaml.safe_load(value) if value.strip() else ""
        fields[key.strip()] = parsed if isinstance(parsed, (bool, int, float)) else value.strip()
    return fields


def parse_sweep(spec: str) -> dict[str, dict]:
    """``"name:key=value,key=value;name2:..."`` -> {name: {key: value}} (numbers and booleans parsed, the
    rest kept as text, so a value cannot hold ',' or ';'; the keys are ``transfer.steered`` fields,
    checked when each variant's config is validated)."""
    out: dict[str, dict] = {}
    for part in filter(None, (x.strip() for x in spec.split(";"))):
        name, _, body = part.partition(":")
        if not name or name in out:
            raise SystemExit(f"--sweep: variant {part!r} needs a new name before ':' (e.g. 'decay:lambda_schedule=decay')")
        out[name] = parse_fields(body, f"--sweep variant {name!r}")
    return out


def transfer_dir(work: Path, source: str) -> Path:
    return work / "transfer" / source


def make_transfer_set(cfg: JobConfig, directory: Path, device) -> tuple[object, dict]:
    """Write ``cfg``'s transfer set to ``directory``; returns its table and summary."""
    write_transfer_set(cfg, directory, device=str(device), progress=False)
    return read_transfer_table(directory), json.loads((directory / "summary.json").read_text())


# ---- distillation ---------------------------------------------------------------------------

def distill(cfg: JobConfig, table, teachers: dict, estimators, device) -> tuple[object, dict]:
    """Train one student exactly as a single Ray Train worker does (``train_in_process``)."""
    held = table.column("heldout").to_pylist()
    texts = [t for t, h in zip(table.column("text").to_pylist(), held) if not h]

    def on_epoch(epoch: int, m: dict) -> None:
        extra = " ".join(f"{k} {m[k]:.4f}" for k in ("kd", "block", "agreement") if k in m)
        log(f"  {cfg.name} seed {cfg.seed}: epoch {epoch + 1} step {m['step']} loss {m['loss']:.4f} {extra}")

    start = time.perf_counter()
    distiller, last = train_in_process(cfg, texts, device=device, teachers=teachers, estimators=estimators,
                                       on_epoch=on_epoch)
    distiller.model.eval()
    return distiller.student, {"rows": distiller.plan.rows, "steps": distiller.plan.total_steps,
                               "seconds": round(time.perf_counter() - start, 1),
                               "final": {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}


def profile_distill(cfg: JobConfig, table, teachers: dict, estimators, device, steps: int = 20) -> str:
    """torch.profiler over ``steps`` optimiser steps (after 5 unprofiled ones) of this row's training:
    where a distillation step's time goes (host, kernels, waits), as the profiler's top-20 table."""
    from torch.profiler import ProfilerActivity, profile

    from dfkd_ray.train.loop import Distiller, StepPlan

    held = table.column("heldout").to_pylist()
    texts = [t for t, h in zip(table.column("text").to_pylist(), held) if not h]
    size = cfg.train.batch_size
    batches_ = [[texts[(b * size + j) % len(texts)] for j in range(size)] for b in range(steps + 5)]
    distiller = Distiller(cfg, StepPlan.of(len(texts), cfg, 1), device=device, teachers=teachers, estimators=estimators)
    for b in batches_[:5]:
        distiller.step(b)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches_[5:]:
            distiller.step(b)
    wall = time.perf_counter() - start
    table_ = prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60)
    return f"{steps} steps in {wall:.2f} s under the profiler ({1e3 * wall / steps:.1f} ms a step)\n{table_}"


# ---- diagnostics ----------------------------------------------------------------------------

@torch.no_grad()
def transfer_diagnostics(table, teachers: dict, judge, space: UnionLabelSpace) -> dict:
    texts = table.column("text").to_pylist()
    teacher_of = table.column("teacher").to_pylist()
    target = table.column("teacher_class").to_pylist()
    label = table.column("label").to_pylist()
    hits, per_teacher = [], {}
    for name, teacher in teachers.items():
        idx = [i for i, t in enumerate(teacher_of) if t == name]
        _, pred = teacher.predict([texts[i] for i in idx], batch_size=256)
        h = [int(p) == target[i] for p, i in zip(pred.tolist(), idx)]
        hits += h
        per_teacher[name] = round(sum(h) / max(1, len(h)), 4)
    _, judged = judge.predict(texts, batch_size=256)
    agree = [int(j) == lab for j, lab in zip(judged.tolist(), label)]
    by_class = {space.names[c]: round(sum(a for a, lab in zip(agree, label) if lab == c) /
                                     max(1, sum(1 for lab in label if lab == c)), 4) for c in sorted(set(label))}
    conf = table.column("confidence").to_pylist()
    ntok = table.column("num_tokens").to_pylist()
    return {"rows": len(texts), "teacher_hit_rate": round(sum(hits) / max(1, len(hits)), 4),
            "teacher_hit_rate_by_teacher": per_teacher,
            "judge_agreement": round(sum(agree) / max(1, len(agree)), 4), "judge_agreement_by_class": by_class,
            "label_counts": {space.names[c]: label.count(c) for c in sorted(set(label))},
            "mean_teacher_confidence": round(sum(conf) / max(1, len(conf)), 4),
            "mean_tokens": round(sum(ntok) / max(1, len(ntok)), 1)}


@torch.no_grad()
def confidence_auroc(table, teachers: dict, estimators: dict) -> dict:
    """Per teacher, per block: AUROC of the estimator's OOD score, other teacher's rows vs own rows
    (training rows only, never the held-out rows it was fitted on)."""
    texts = table.column("text").to_pylist()
    teacher_of = table.column("teacher").to_pylist()
    held = table.column("heldout").to_pylist()
    out = {}
    for name, teacher in teachers.items():
        est = estimators[name]
        scores = {True: [], False: []}
        for own in (True, False):
            idx = [i for i, (t, h) in enumerate(zip(teacher_of, held)) if not h and (t == name) == own]
            for s in range(0, len(idx), 256):
                o = teacher([texts[i] for i in idx[s:s + 256]])
                scores[own].append(est.scores(o.block_states, o.logits).cpu())
        a, b = torch.cat(scores[True]), torch.cat(scores[False])  # (M_in, N), (M_out, N)
        out[name] = [round(auroc(a[:, j], b[:, j]), 4) for j in range(a.shape[1])]
    return out


@torch.no_grad()
def target_accuracy(cfg: JobConfig, estimators: dict, table, teachers: dict, space: UnionLabelSpace,
                    test_outputs: dict, labels: list[int]) -> dict:
    """Where the confidence stage loses accuracy, on real text: the KD target (the confidence-weighted
    union of the teachers, :func:`union_target` with :func:`kd_teacher_weights`, exactly as the
    distillation loss builds it) scored as a classifier on the AG News test set, for every
    ``kd_confidence_power`` in ``TARGET_POWERS`` and both confidence transforms: ``estimators`` (the
    row's fit, with ``cfg``'s transform) and the other transform fitted the same way
    (:func:`fit_confidence` on the transfer set's held-out rows).

    Also per variant: ``selects_own`` (share of test texts whose largest KD weight goes to the teacher
    that knows the true class) and ``auroc_last`` (last-block confidence, texts of the teacher's own
    classes vs the others'); and ``oracle`` (all weight on the teacher that knows the class: the
    target's ceiling with these teachers).
    """
    names = list(teachers)
    y = torch.tensor(labels)  # (M,)
    index = [torch.tensor(space.teacher_to_global[n]) for n in names]
    logits = [test_outputs[n][1] for n in names]  # K x (M, C_k)
    own = torch.stack([torch.isin(y, i) for i in index], dim=-1)  # (M, K) teacher k knows the true class
    score = partial(kd_target_scores, logits, index, y, num_labels=space.num_labels,
                    temperature=cfg.amalgamation.temperature)
    # oracle: power 1 on 0/1 confidences puts all weight on the teacher that knows the class
    out = {"oracle": round(score(own.float(), powers=(1.0,))["accuracy_by_power"]["1.0"], 4)}
    for transform in ("logistic", "ecdf"):
        if transform != cfg.amalgamation.confidence_transform:
            amalg = cfg.amalgamation.model_copy(update={"confidence_transform": transform})
            fitted = fit_confidence(cfg.model_copy(update={"amalgamation": amalg}), table, teachers)
        else:
            fitted = estimators
        conf = torch.stack([fitted[n].confidence(*test_outputs[n])[:, -1] for n in names], dim=-1)  # (M, K)
        scores = score(conf, powers=TARGET_POWERS)
        out[f"{cfg.amalgamation.confidence}/{transform}"] = {
            "selects_own": round(scores["selects_own"], 4),
            "auroc_last": {n: round(auroc(-conf[own[:, i], i], -conf[~own[:, i], i]), 4) for i, n in enumerate(names)},
            "accuracy_by_power": {p: round(a, 4) for p, a in scores["accuracy_by_power"].items()}}
    return out


@torch.no_grad()
def kd_target_scores(logits: list[torch.Tensor], index: list[torch.Tensor], labels: torch.Tensor,
                     conf: torch.Tensor, *, powers, num_labels: int, temperature: float) -> dict:
    """The KD target as a classifier: ``union_target`` of the teachers' ``logits`` (K x (M, C_k), placed
    by ``index``) with ``kd_teacher_weights(conf, power)`` (``conf`` (M, K)), as the loss builds it.

    Returns ``selects_own`` (share of rows whose largest weight is the teacher that knows the true
    class) and ``accuracy_by_power`` ({str(power): accuracy}).
    """
    own = torch.stack([torch.isin(labels, i) for i in index], dim=-1)  # (M, K)
    accuracy = {}
    for power in powers:
        p_t = union_target(logits, index, kd_teacher_weights(conf, power), num_labels, temperature)  # (M, C)
        accuracy[str(power)] = float((p_t.argmax(-1) == labels).float().mean())
    return {"selects_own": float(own.gather(1, conf.argmax(-1, keepdim=True)).float().mean()),
            "accuracy_by_power": accuracy}


@torch.no_grad()
def save_features(directory: Path, table, teachers: dict, test_outputs: dict, test_labels: list[int],
                  dev_texts: list[str], dev_labels: list[int]) -> None:
    """Teacher features of the transfer set, the test set and a development set as safetensors, one file
    per teacher and block (``<teacher>-block<b>.safetensors``: ``transfer`` (M, H), ``test`` (7600, H)
    and ``dev`` (M_dev, H), float16) plus ``meta.safetensors`` (logits, labels, held-out flags, source
    teacher ids): what confidence and KD-weighting variants need, to be studied on a CPU without the GPU
    that trained the teachers. The development rows are the title + description AG News *train* rows:
    variants are chosen on them, so that the test set is only reported. (The teachers were fine-tuned on
    them, so a teacher's features of its own classes' dev rows are in-sample: a biased, but test-free,
    check of which teacher a variant trusts.)"""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    texts = table.column("text").to_pylist()
    names = list(teachers)
    source = table.column("teacher").to_pylist()
    meta = {"transfer_label": torch.tensor(table.column("label").to_pylist()),
            "transfer_teacher": torch.tensor([names.index(t) for t in source]),
            "transfer_class": torch.tensor(table.column("teacher_class").to_pylist()),
            "transfer_heldout": torch.tensor(table.column("heldout").to_pylist()),
            "test_label": torch.tensor(test_labels), "dev_label": torch.tensor(dev_labels)}
    for name, teacher in teachers.items():
        states, logits = collect_outputs(teacher, texts, 256)  # (M, N, H), (M, C_k)
        dev_states, dev_logits = collect_outputs(teacher, dev_texts, 256)  # (M_dev, N, H), (M_dev, C_k)
        meta[f"{name}.transfer_logits"], meta[f"{name}.test_logits"] = logits, test_outputs[name][1]
        meta[f"{name}.dev_logits"] = dev_logits
        for b in range(states.shape[1]):
            save_file({"transfer": states[:, b].half().contiguous(),
                       "test": test_outputs[name][0][:, b].half().contiguous(),
                       "dev": dev_states[:, b].half().contiguous()},
                      str(directory / f"{name}-block{b + 1}.safetensors"))
    save_file({k: v.contiguous() for k, v in meta.items()}, str(directory / "meta.safetensors"))


# ---- main -----------------------------------------------------------------------------------

def accuracy_row(results: dict) -> dict:
    """Accuracy, macro F1, recall per class and the confusion matrix (rows: true class): which class
    a student gives up shows there, not in the accuracy."""
    return {"accuracy": round(results["accuracy"], 4), "macro_f1": round(results["macro_f1"], 4),
            "recall": {n: round(c["recall"], 4) for n, c in results["per_class"].items()},
            "confusion": results["confusion"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", type=Path, required=True, help="base causal LM (shared/fixtures/lm-gpt2-news)")
    p.add_argument("--base", type=Path, required=True, help="MiniLM fixture: teachers and the student start here")
    p.add_argument("--agnews", type=Path, required=True, help="shared/data/agnews (csv or csv.xz files)")
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
                   help="lambda; 32 with the class prompt: the best student on the development rows in session 11 "
                        "(StrataNet dev 83.3%% vs 81.2%% at 16; 64 wrote more on-class text but its students fell to 66-73%%)")
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
    device = torch.device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (fine-tuning)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "phases": {}, "transfer": {}, "sweep": {}, "auroc": {}, "target": {}, "rows": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    began = time.perf_counter()
    data = read_agnews(args.agnews, limit=300 if args.tiny else 0)
    space = UnionLabelSpace.from_teachers(TEACHERS)
    assert list(space.names) == LABELS, space.names
    log(f"AG News: {len(data['train_texts'])} train rows, {len(data['test_texts'])} test rows; device {device}")
    if any(SOURCES[r] == "real" for r in rows):
        real_text_file(work).write_text("".join(" ".join(t.split()) + "\n" for t in data["train_texts"]))

    # 1. teachers, fine-tuned on their halves of the labels
    for name, names in TEACHERS.items():
        ids = [LABELS.index(n) for n in names]
        idx = [i for i, y in enumerate(data["train_labels"]) if y in ids]
        report["phases"][f"teacher {name}"] = finetune_teacher(
            args.base, work / "teachers" / name, names, [data["train_texts"][i] for i in idx],
            [ids.index(data["train_labels"][i]) for i in idx], args, device)
    base_cfg = job_config(args, work, "stratanet", args.seed)
    teachers = load_teachers(base_cfg.teachers, num_blocks=3, device=str(device))
    scored = evaluate_teachers(teachers, data["test_texts"], data["test_labels"], space, batch_size=256)
    for i, (name, m) in enumerate(scored["teachers"].items()):
        report["rows"][f"teacher {i + 1} ({name})"] = {"accuracy": round(m["accuracy"], 4),
                                                        "own_accuracy": round(m["own_accuracy"], 4)}
    report["rows"]["ensemble"] = {"accuracy": round(scored["ensemble"]["accuracy"], 4)}
    log(f"teachers: {json.dumps(report['rows'])}")
    save()

    # 2. supervised upper bound (also the judge of transfer-set labels)
    judge = None
    if not args.no_judge:
        judge, info = train_supervised(base_cfg, data, args, device)
        report["phases"]["supervised"] = info
        report["rows"]["supervised"] = accuracy_row(
            evaluate_student(judge, data["test_texts"], data["test_labels"], space, batch_size=256))
        log(f"supervised: {report['rows']['supervised']}")
        save()

    # 2b. small steered sets under each --sweep variant: the judge says which writes more of its class
    for name, fields in sweep.items():
        cfg = job_config(args, work, f"sweep-{name}", args.seed, steered=fields, samples_per_class=args.sweep_samples)
        directory = work / "sweep" / name
        start = time.perf_counter()
        table, summary = make_transfer_set(cfg, directory, device)
        diag = transfer_diagnostics(table, teachers, judge, space)
        diag.update(settings=fields, seconds=round(time.perf_counter() - start, 1),
                    samples_per_s=summary.get("samples_per_s"), rejects=summary.get("rejects"),
                    distinct_2=round(summary.get("distinct_2", 0.0), 4),
                    examples=[t[:160] for t in table.column("text").to_pylist()[::max(1, len(table) // 4)][:4]])
        report["sweep"][name] = diag
        log(f"sweep {name}: {json.dumps({k: v for k, v in diag.items() if k != 'examples'})}")
        save()
    if sweep:
        print(sweep_markdown(report["sweep"]))

    # 3. transfer sets (one per source), shared by the rows that use that source
    tables = {}
    for source in sorted({SOURCES[r] for r in rows}):
        row = next(r for r in rows if SOURCES[r] == source)
        cfg = job_config(args, work, row, args.seed)
        directory = transfer_dir(work, source)
        start = time.perf_counter()
        if args.transfer_from is not None:  # what --save-transfer wrote in an earlier call
            tables[source] = pq.read_table(args.transfer_from / f"{source}.parquet")
            summary = json.loads((args.transfer_from / f"{source}.summary.json").read_text())
            log(f"transfer set {source}: reusing {args.transfer_from / source}.parquet ({len(tables[source])} rows)")
        else:
            tables[source], summary = make_transfer_set(cfg, directory, device)
        diag = transfer_diagnostics(tables[source], teachers, judge, space) if judge is not None else {}
        diag.update(seconds=round(time.perf_counter() - start, 1),
                    samples_per_s=summary.get("samples_per_s"), rejects=summary.get("rejects"),
                    given_up=summary.get("given_up"))
        report["transfer"][source] = diag
        log(f"transfer set {source}: {json.dumps(diag)}")
        if args.save_transfer is not None and args.transfer_from is None:
            args.save_transfer.mkdir(parents=True, exist_ok=True)
            pq.write_table(tables[source], args.save_transfer / f"{source}.parquet")
            (args.save_transfer / f"{source}.summary.json").write_text(json.dumps(summary))
        save()

    # 4. amalgamation rows
    estimators_cache: dict = {}
    test_outputs: dict = {}  # every teacher on the test set, once: (block states, logits)

    def teacher_test_outputs() -> dict:
        if not test_outputs:
            test_outputs.update({n: collect_outputs(t, data["test_texts"], 256) for n, t in teachers.items()})
        return test_outputs

    if args.save_features is not None:
        save_features(args.save_features, tables["steered"], teachers, teacher_test_outputs(), data["test_labels"],
                      data["dev_texts"], data["dev_labels"])
        log(f"teacher features -> {args.save_features}")
    for seed in seeds:
        for row in rows:
            cfg = job_config(args, work, row, seed)
            table = tables[SOURCES[row]]
            est = None
            if cfg.amalgamation.method == "stratanet":
                # the Ray job fits with the job's seed (fold split), so each seed fits its own
                key = (SOURCES[row], cfg.amalgamation.confidence, seed)
                if key not in estimators_cache:
                    estimators_cache[key] = fit_confidence(cfg, table, teachers)
                    if cfg.amalgamation.confidence != "msp":
                        report["auroc"][f"{key[0]}/{key[1]}/seed{seed}"] = confidence_auroc(
                            table, teachers, estimators_cache[key])
                        log(f"confidence {key}: AUROC per block {report['auroc'][f'{key[0]}/{key[1]}/seed{seed}']}")
                    report["target"][f"{key[0]}/{key[1]}/seed{seed}"] = target_accuracy(
                        cfg, estimators_cache[key], table, teachers, space, teacher_test_outputs(), data["test_labels"])
                    log(f"KD target on the test set {key}: {json.dumps(report['target'][f'{key[0]}/{key[1]}/seed{seed}'])}")
                est = estimators_cache[key]
            if args.profile_distill and "profile" not in report:
                report["profile"] = profile_distill(cfg, table, teachers, est, device)
                print(report["profile"], flush=True)
            student, info = distill(cfg, table, teachers, est, device)
            result = accuracy_row(evaluate_student(student, data["test_texts"], data["test_labels"], space,
                                                   batch_size=256))
            result["dev_accuracy"] = round(evaluate_student(student, data["dev_texts"], data["dev_labels"], space,
                                                            batch_size=256)["accuracy"], 4)
            report["rows"].setdefault(row, {"seeds": {}})["seeds"][str(seed)] = {**result, **info}
            accs = [v["accuracy"] for v in report["rows"][row]["seeds"].values()]
            report["rows"][row].update(accuracy=round(sum(accs) / len(accs), 4),
                                       spread=round(max(accs) - min(accs), 4), n=len(accs))
            log(f"{row} seed {seed}: accuracy {result['accuracy']:.4f}, development rows {result['dev_accuracy']:.4f} "
                f"({info['seconds']} s)")
            del student
            save()
    report["seconds"] = round(time.perf_counter() - began, 1)
    save()
    if report["target"]:
        print(target_markdown(report["target"]))
    print(table_markdown(report))
    return 0


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
