"""The AG News benchmark's setting: the data, the two fine-tuned teachers, the supervised student, and
each table row's job config (``benchmarks/agnews.py`` runs them).

Teachers are fine-tuned here from the MiniLM fixture on real AG News train rows: ``world_sports`` on
{World, Sports}, ``business_scitech`` on {Business, Sci/Tech}. The supervised student (the upper
bound, also the judge of transfer-set labels) is the amalgamation rows' student shape trained with
cross-entropy on the labelled train rows; that is plain supervised fine-tuning, which the library
(data-free distillation) has no step for, so it is written here once for teachers and student.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch

from dfkd_ray.config import JobConfig, validate_config
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.writer import write_transfer_set

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
        raise FileNotFoundError(f"{directory}/{stem}.csv(.xz) is missing; pass --agnews <the AG News csv directory>")

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


def real_text_file(work: Path) -> Path:
    """The AG News train texts, one per line: the corpus of the ``real`` diagnostic rows."""
    return work / "agnews_train_text.txt"


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

    secs = train_classifier(model, tokenize, texts, labels, epochs=args.teacher_epochs, lr=args.teacher_lr,
                            batch_size=32, seed=args.seed, device=device, desc=f"teacher {out.name}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()[:16]
    return {"rows": len(texts), "seconds": round(secs, 1), "weights_sha256": digest}


def finetune_teachers(args, data: dict, work: Path, device) -> dict:
    """Both teachers, each on the train rows of its half of the labels; their phase records by name."""
    phases = {}
    for name, names in TEACHERS.items():
        ids = [LABELS.index(n) for n in names]
        idx = [i for i, y in enumerate(data["train_labels"]) if y in ids]
        phases[f"teacher {name}"] = finetune_teacher(
            args.base, work / "teachers" / name, names, [data["train_texts"][i] for i in idx],
            [ids.index(data["train_labels"][i]) for i in idx], args, device)
    return phases


def train_supervised(cfg: JobConfig, data: dict, args, device) -> tuple[object, dict]:
    """The amalgamation rows' student shape trained on the labelled train rows (upper bound, judge)."""
    from dfkd_ray.models.student import Student

    torch.manual_seed(args.seed)
    student = Student.from_config(cfg.student, labels=LABELS, amalg_dim=cfg.amalgamation.amalg_dim).to(device)
    student.proj.requires_grad_(False)
    secs = train_classifier(student, student.tokenize, data["train_texts"], data["train_labels"],
                            epochs=args.supervised_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                            device=device, desc="supervised student")
    return student, {"rows": len(data["train_texts"]), "seconds": round(secs, 1)}


# ---- each row's job config ------------------------------------------------------------------

def steered_section(args, overrides: dict | None = None) -> dict:
    """``transfer.steered`` of every row, with a ``--sweep`` variant's ``overrides``."""
    return {"engine": "hf", "lm_path": str(args.lm), "control_strength": args.control_strength,
            "top_m": args.top_m, "top_k": min(args.top_m, 50), "top_p": 0.9,
            "max_new_tokens": args.max_new_tokens, "min_new_tokens": min(16, args.max_new_tokens), "prompt": args.prompt,
            "lambda_schedule": args.lambda_schedule, "decay_rate": args.decay_rate,
            "batch_size": args.gen_batch, **(overrides or {})}


def amalgamation_section(args, row: str) -> dict:
    """``amalgamation`` of one row: its method/confidence/fusion plus the command line's KD settings."""
    section = {**AMALGAMATION.get(row, {"method": "vanilla"}), "amalg_dim": 256, "temperature": args.temperature}
    if section["method"] == "stratanet":
        section.update(kd_confidence_power=args.kd_power, confidence_transform=args.confidence_transform)
        section.update(parse_fields(args.stratanet, "--stratanet"))
    return section


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
    """Write ``cfg``'s transfer set to ``directory``; returns its table and summary."""
    write_transfer_set(cfg, directory, device=str(device), progress=False)
    return read_transfer_table(directory), json.loads((directory / "summary.json").read_text())


def training_texts(table) -> list[str]:
    """The transfer set's training texts (its held-out rows fit the confidence statistics only)."""
    held = table.column("heldout").to_pylist()
    return [t for t, h in zip(table.column("text").to_pylist(), held) if not h]
