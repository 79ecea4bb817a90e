"""A benchmark's setting, from its spec: the data, the fine-tuned teachers, the supervised student,
and each row's job config (``benchmarks/amalgamation.py`` runs them).

Teachers are fine-tuned here from the base encoder on the spec's train rows of their classes, each
keeping the encoder layers its spec entry asks for. The supervised student (the upper bound, also
the judge of transfer-set labels) is the amalgamation rows' student shape trained with
cross-entropy on the labelled train rows; that is plain supervised fine-tuning, which the library
(data-free distillation) has no step for, so it is written here once for teachers and student.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

from dfkd_ray.config import AmalgamationConfig, JobConfig, SteeredConfig, TrainConfig, validate_config
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.writer import write_transfer_set

from harness.rows import ROWS, TRANSFER_SETS
from harness.spec import SEPARATORS, BenchmarkSpec, DataFile, SpecError, data_suffixes, label_names


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data -----------------------------------------------------------------------------------

def read_table(spec: BenchmarkSpec, data_dir: Path, split: str, index: int, file: DataFile,
               names: list[str], space: UnionLabelSpace) -> tuple[list[str], list[int]]:
    """One data file: its texts (the text columns joined) and labels as union label ids."""
    import pandas as pd

    where = f"{split}[{index}]"
    path = data_dir / file.path
    if not path.is_file():
        raise SpecError([(f"{where}.path", f"{str(path)!r} does not exist: check --data")], spec.name)
    columns = file.text_columns or spec.text_columns
    table_format, _ = data_suffixes(file.path)
    options = {"quoting": csv.QUOTE_NONE} if SEPARATORS[table_format] == "\t" else {}
    table = pd.read_csv(path, sep=SEPARATORS[table_format], keep_default_na=False,
                        dtype={c: str for c in columns}, **options)  # compression from the suffix
    missing = [c for c in [*columns, spec.labels.column] if c not in table.columns]
    if missing:
        raise SpecError([(f"{where}.text_columns" if spec.labels.column not in missing else "labels.column",
                          f"{file.path} has no column(s) {missing}; its columns are {list(table.columns)}")], spec.name)
    try:
        ids = [int(v) - spec.labels.first_id for v in table[spec.labels.column]]
    except ValueError as e:
        raise SpecError([("labels.column", f"{file.path}: column {spec.labels.column!r} must hold integer label ids "
                                           f"({e})")], spec.name) from None
    bad = sorted({i + spec.labels.first_id for i in ids if not 0 <= i < len(names)})
    if bad:
        raise SpecError([("labels", f"{file.path} has label ids {bad[:10]} outside {spec.labels.first_id}.."
                                    f"{spec.labels.first_id + len(names) - 1} ({len(names)} names from first_id "
                                    f"{spec.labels.first_id})")], spec.name)
    union = [space.global_id(n) for n in names]  # label id -> union label id
    texts = [spec.join.join(values) for values in zip(*(table[c].tolist() for c in columns))]
    return texts, [union[i] for i in ids]


def label_space(spec: BenchmarkSpec) -> UnionLabelSpace:
    """The student's labels: the union of the teachers' classes, teachers in spec order."""
    return UnionLabelSpace.from_teachers({name: t.classes for name, t in spec.teachers.items()})


def read_data(spec: BenchmarkSpec, data_dir: Path, space: UnionLabelSpace, limit: int = 0) -> dict:
    """``{split}_texts`` and ``{split}_labels`` (union label ids) of the train, test and development
    rows, each split its files in spec order; ``limit`` keeps a seeded sample of that many rows per split."""
    names = label_names(spec, data_dir)
    data = {}
    for split in ("train", "test", "dev"):
        texts, labels = [], []
        for i, file in enumerate(getattr(spec, split)):
            t, y = read_table(spec, data_dir, split, i, file, names, space)
            texts += t
            labels += y
        data[f"{split}_texts"], data[f"{split}_labels"] = texts, labels
    if limit:
        rng = random.Random(0)
        for split in ("test", "train", "dev"):
            idx = rng.sample(range(len(data[f"{split}_texts"])), min(limit, len(data[f"{split}_texts"])))
            data[f"{split}_texts"] = [data[f"{split}_texts"][i] for i in idx]
            data[f"{split}_labels"] = [data[f"{split}_labels"][i] for i in idx]
    return data


# ---- supervised models (teachers, the upper-bound student) ------------------------------------

def batches(n: int, size: int, seed: int, drop_last: bool = True):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    stop = n - n % size if drop_last else n
    return [order[i:i + size] for i in range(0, stop, size)]


def train_classifier(model, tokenize, texts, labels, *, epochs, lr, batch_size, seed, device, desc) -> float:
    """Cross-entropy fine-tuning (AdamW, 6% linear warmup, clipping at 1); returns the seconds it took."""
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


def finetune_teacher(base: Path, out: Path, names: list[str], texts, labels, args, device, *,
                     layers: list[int] | None = None, num_layers: int | None = None) -> dict:
    """A teacher over ``names``: AutoModelForSequenceClassification from ``base`` (keeping ``layers`` /
    ``num_layers`` of its encoder layers, all by default) + its tokenizer -> ``out``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dfkd_ray.models.student import keep_layers, select_layers

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        dtype=torch.float32).to(device)
    if layers is not None or num_layers is not None:
        keep_layers(model, select_layers(model.config.num_hidden_layers, layers, num_layers))

    def tokenize(batch):
        return tok(batch, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt").to(device)

    secs = train_classifier(model, tokenize, texts, labels, epochs=args.teacher_epochs, lr=args.teacher_lr,
                            batch_size=32, seed=args.seed, device=device, desc=f"teacher {out.name}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()[:16]
    return {"rows": len(texts), "layers": model.config.num_hidden_layers, "seconds": round(secs, 1),
            "weights_sha256": digest}


def finetune_teachers(settings: "Settings", data: dict, space: UnionLabelSpace, device) -> dict:
    """Every teacher of the spec, each on the train rows of its classes; their phase records by name."""
    phases = {}
    for name, teacher in settings.spec.teachers.items():
        ids = [space.global_id(c) for c in teacher.classes]
        idx = [i for i, y in enumerate(data["train_labels"]) if y in ids]
        phases[f"teacher {name}"] = finetune_teacher(
            settings.args.base, settings.teacher_dir(name), teacher.classes, [data["train_texts"][i] for i in idx],
            [ids.index(data["train_labels"][i]) for i in idx], settings.args, device,
            layers=teacher.layers, num_layers=teacher.num_layers)
    return phases


def train_supervised(cfg: JobConfig, data: dict, space: UnionLabelSpace, args, device) -> tuple[object, dict]:
    """The amalgamation rows' student shape trained on the labelled train rows (upper bound, judge)."""
    from dfkd_ray.models.student import Student

    torch.manual_seed(args.seed)
    student = Student.from_config(cfg.student, labels=list(space.names), amalg_dim=cfg.amalgamation.amalg_dim).to(device)
    student.proj.requires_grad_(False)
    secs = train_classifier(student, student.tokenize, data["train_texts"], data["train_labels"],
                            epochs=args.supervised_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                            device=device, desc="supervised student")
    return student, {"rows": len(data["train_texts"]), "seconds": round(secs, 1)}


# ---- each row's job config ------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What every row's job config is built from: the command line, the spec, the work directory."""

    args: argparse.Namespace
    spec: BenchmarkSpec
    work: Path

    def teacher_dir(self, name: str) -> Path:
        return self.work / "teachers" / name

    @property
    def real_text_file(self) -> Path:
        """The spec's train texts, one per line: the corpus of the ``real`` transfer set."""
        return self.work / "train_text.txt"


AMALGAMATION = AmalgamationConfig.model_fields
STEERED = SteeredConfig.model_fields
TRAIN = TrainConfig.model_fields


def add_setting_arguments(p: argparse.ArgumentParser, samples_per_class: int | None) -> None:
    """The generation and training settings that :func:`job_config`, :func:`steered_section` and
    :func:`finetune_teacher` read from ``args``, with the benchmark's defaults (RESULTS.md "AG News"):
    every script that builds the benchmark's jobs takes them alike."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-class", type=int, default=samples_per_class,
                   help="transfer texts per (teacher, class) (default: the spec's samples_per_class)")
    p.add_argument("--gen-batch", type=int, default=500)
    p.add_argument("--top-m", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-confidence", type=float, default=0.5, help="steered rows only")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="rows kept to fit confidence statistics")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--precision", choices=get_args(TRAIN["precision"].annotation), default=TRAIN["precision"].default,
                   help="train.precision of every distillation row (the student's compute)")
    p.add_argument("--matmul-precision", choices=get_args(TRAIN["matmul_precision"].annotation),
                   default=TRAIN["matmul_precision"].default,
                   help="train.matmul_precision of every distillation row (high: TF32 float32 products on CUDA)")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--teacher-lr", type=float, default=5e-5)


def add_row_arguments(p: argparse.ArgumentParser) -> None:
    """The steered generation and amalgamation settings of the rows (:func:`steered_section`,
    :func:`amalgamation_section`): the benchmark's lambda and prompt, the job's amalgamation defaults."""
    p.add_argument("--control-strength", type=float, default=64.0,
                   help="lambda of the steered rows (transfer.steered.control_strength; the AG News job's, chosen on "
                        "its development rows; tables dated before 2026-12-07 used 32)")
    p.add_argument("--prompt", default="Category: {label}",
                   help="steered prompt template (StrataNet Table 1); '' for none. The set keeps only the continuation")
    p.add_argument("--lambda-schedule", choices=get_args(STEERED["lambda_schedule"].annotation),
                   default=STEERED["lambda_schedule"].default)
    p.add_argument("--decay-rate", type=float, default=STEERED["decay_rate"].default,
                   help="per-token lambda decay (decay schedule)")
    # The amalgamation settings default to the job's (AmalgamationConfig), so a row without flags
    # measures what the job runs.
    p.add_argument("--temperature", type=float, default=AMALGAMATION["temperature"].default)
    p.add_argument("--kd-power", type=float, default=AMALGAMATION["kd_confidence_power"].default,
                   help="amalgamation.kd_confidence_power of the stratanet rows (gamma of the KD teacher weights)")
    p.add_argument("--confidence-transform", choices=get_args(AMALGAMATION["confidence_transform"].annotation),
                   default=AMALGAMATION["confidence_transform"].default,
                   help="amalgamation.confidence_transform of the stratanet rows")
    p.add_argument("--stratanet", default="", metavar="KEY=VALUE,...",
                   help="amalgamation fields of the StrataNet rows (after --kd-power), e.g. 'alpha=0.3,train_fusion=false'")
    p.add_argument("--steered", default="", metavar="KEY=VALUE,...",
                   help="transfer.steered fields of the steered set (after --control-strength, --prompt, ...), "
                        "e.g. 'start_new_word=true'")
    p.add_argument("--prompt-tuned", default="", metavar="KEY=VALUE,...",
                   help="transfer.prompt_tuned fields of the prompt-tuned rows, e.g. 'stable_level=5,commander=paraphrase'")


def length_fields(args) -> dict:
    """A generated text's length bounds, shared by the text-generating rows: ``--max-new-tokens``, and
    at least 16 tokens (or the whole budget, where it is shorter)."""
    return {"max_new_tokens": args.max_new_tokens, "min_new_tokens": min(16, args.max_new_tokens)}


def steered_section(args, overrides: dict | None = None) -> dict:
    """``transfer.steered`` of every row: the command line's fields, then ``--steered``, then a
    ``--sweep`` variant's ``overrides``."""
    return {"engine": "hf", "lm_path": str(args.lm), "control_strength": args.control_strength,
            "top_m": args.top_m, "top_k": min(args.top_m, 50), "top_p": 0.9,
            **length_fields(args), "prompt": args.prompt,
            "lambda_schedule": args.lambda_schedule, "decay_rate": args.decay_rate,
            "batch_size": args.gen_batch, **parse_fields(getattr(args, "steered", ""), "--steered"), **(overrides or {})}


def amalgamation_section(args, row: str) -> dict:
    """``amalgamation`` of one row: its method/confidence/fusion plus the command line's KD settings."""
    section = {**ROWS[row].amalgamation, "amalg_dim": 256, "temperature": args.temperature}
    if section["method"] == "stratanet":
        section.update(kd_confidence_power=args.kd_power, confidence_transform=args.confidence_transform)
        section.update(parse_fields(args.stratanet, "--stratanet"))
    return section


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied, sections (dicts) merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def job_config(settings: Settings, row: str, seed: int, *, steered: dict | None = None,
               samples_per_class: int | None = None) -> JobConfig:
    """The job config of one row (:data:`harness.rows.ROWS`): the fields every transfer set shares, then
    its own (:data:`harness.rows.TRANSFER_SETS`); ``steered`` overrides ``transfer.steered`` fields (``--sweep``)."""
    args, spec, work = settings.args, settings.spec, settings.work
    shared = {"samples_per_class": samples_per_class or args.samples_per_class, "shard_size": args.shard_size,
              "dedup": "near", "heldout_fraction": args.heldout_fraction, "max_attempts": 3, "min_confidence": 0.0,
              "random_words": {"min_words": 16, "max_words": 48},
              "corpus": {"path": str(args.corpus), "min_words": 8, "max_words": 64},
              "steered": steered_section(args, steered)}
    data = {"name": f"{spec.name}-{row}", "seed": seed,
            "teachers": [{"name": n, "path": str(settings.teacher_dir(n)), "max_length": args.max_length}
                         for n in spec.teachers],
            "transfer": merged(shared, TRANSFER_SETS[ROWS[row].transfer_set](settings)),
            "amalgamation": amalgamation_section(args, row),
            "student": {"path": str(args.base), **spec.student.model_dump(exclude_none=True),
                        "max_length": args.max_length},
            "train": {"learning_rate": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                      "warmup_epochs": min(1.0, args.epochs), "precision": args.precision,
                      "matmul_precision": args.matmul_precision, **ROWS[row].train},
            "ray": {"use_gpu": args.device == "cuda"}, "output": {"dir": str(work / "runs" / row)}}
    return validate_config(data, source=f"benchmark row {row}")


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


# ---- transfer sets --------------------------------------------------------------------------

def transfer_dir(work: Path, source: str) -> Path:
    return work / "transfer" / source


def make_transfer_set(cfg: JobConfig, directory: Path, device) -> tuple[object, dict]:
    """Write ``cfg``'s transfer set to ``directory`` (a ``prompt_tuned`` set's prompts tuned first, under
    ``output.dir/prompts``); returns its table and summary."""
    if cfg.transfer.source == "prompt_tuned":
        from dfkd_ray.generation.prompt_tuning import write_prompts

        write_prompts(cfg, device=str(device))
    write_transfer_set(cfg, directory, device=str(device), progress=False)
    return read_transfer_table(directory), json.loads((directory / "summary.json").read_text())
