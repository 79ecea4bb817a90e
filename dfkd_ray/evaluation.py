"""Evaluation on a labelled file: the student, each teacher and the teachers' ensemble over the union labels.

This is the only place where real labelled data enters a job, and it never enters training. The
file (``eval.path``: CSV, TSV, JSONL / JSON lines or Parquet) has a text column and a label column
(``eval.text_column``, ``eval.label_column``). Raw label values pass through ``eval.label_map``
(raw value as a string -> label name; values not in the map are used as they are) and are matched
to the union label names after :func:`~dfkd_ray.labels.normalize_label`. Problems raise
:class:`EvalDataError` naming the file, the config field and the fix.

Scores (scikit-learn): accuracy, macro F1, per-class precision / recall / F1 / support and the
confusion matrix over all union labels (rows: true label, columns: prediction). Macro F1 averages
the labels that occur in the file or in the predictions (scikit-learn's default), so an eval file
covering only some labels is not penalised for the others; per-class rows list every union label.

Confidence diagnostics: :func:`auroc` (how well a score separates two sets of texts) and
:func:`kd_target_scores` (the distillation's KD target scored as a classifier on labelled text).

Teachers are scored over the union label space too: a teacher's predictions are mapped through
``UnionLabelSpace.teacher_to_global``, so it can only be right on rows of its own classes; its
accuracy on those rows is reported as ``own_accuracy``. The ensemble predicts the argmax of the
teachers' logits placed into the union space (a label two teachers share takes the larger logit).

Engine layer: torch, transformers, pandas, pyarrow, scikit-learn, matplotlib; never ``ray``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from dfkd_ray.labels import UnionLabelSpace, normalize_label

log = logging.getLogger(__name__)

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
ENSEMBLE_RULE = "argmax of the teachers' logits in the union label space (shared labels: max over teachers)"


class EvalDataError(ValueError):
    """The labelled eval file cannot be used as it is; the message names the file, the field and the fix."""


# --------------------------------------------------------------------------------------------
# reading the labelled file


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for c in _COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise EvalDataError(f"eval file {str(path)!r} (eval.path): unknown format; use .csv, .tsv, .jsonl, .json "
                        "(JSON lines) or .parquet")


def _first_char(path: Path) -> str:
    """The first non-blank character of a (possibly compressed) text file, '' when there is none."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read(4096).lstrip()[:1]
    except (OSError, EOFError, lzma.LZMAError):
        return ""


def _read_table(path: Path):
    import pandas as pd

    fmt = _format_of(path)
    try:
        if fmt in ("csv", "tsv"):
            # Raw values stay strings ('1', not 1); only empty cells are missing (a text 'NA' is a text).
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                               na_values=[""])
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "json" and _first_char(path) == "[":
            return pd.read_json(path, dtype=False)  # a .json file holding one array of records
        return pd.read_json(path, lines=True, dtype=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (ValueError, OSError, ImportError) as e:
        raise EvalDataError(f"eval file {str(path)!r} (eval.path) could not be read as {fmt}: {e}") from e


def _raw_key(value) -> str:
    """A label value as the string ``eval.label_map`` is keyed by (1, 1.0 and '1' are all '1')."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _raw_key(value.item())
    return str(value).strip()


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return True
    return isinstance(value, str) and not value.strip()


def _rows(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i + 1) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def load_labelled(path: Union[str, Path], *, text_column: str = "text", label_column: str = "label",
                  label_map: Optional[Mapping[str, str]] = None,
                  label_space: Union[UnionLabelSpace, Sequence[str]]) -> tuple[list[str], list[int]]:
    """Texts and global label ids from a labelled file.

    Args:
        path: ``.csv``, ``.tsv``, ``.jsonl`` / ``.json`` (JSON lines, or one JSON array) or ``.parquet``
            (optionally compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``).
        text_column / label_column: column names (``eval.text_column`` / ``eval.label_column``).
        label_map: raw label value as a string -> label name (``eval.label_map``); values not in it are
            taken as label names themselves.
        label_space: the union label space (or its names in global id order).

    Raises:
        EvalDataError: unreadable or empty file, missing columns, missing or empty texts or labels,
            label values that are no union label.
    """
    path = Path(path)
    names = list(label_space.names if isinstance(label_space, UnionLabelSpace) else label_space)
    index = {normalize_label(n): i for i, n in enumerate(names)}
    label_map = {str(k): v for k, v in (label_map or {}).items()}
    if not path.is_file():
        raise EvalDataError(f"eval file {str(path)!r} (eval.path) does not exist")
    df = _read_table(path)
    if len(df.columns) == 0 or len(df) == 0:
        raise EvalDataError(f"eval file {str(path)!r} (eval.path) is empty: it needs a header / field names and one "
                            f"row per labelled text (columns {text_column!r} and {label_column!r})")
    columns = [str(c) for c in df.columns]
    missing = [(field, col) for field, col in (("eval.text_column", text_column), ("eval.label_column", label_column))
               if col not in columns]
    if missing:
        what = "; ".join(f"no column {col!r} ({field})" for field, col in missing)
        raise EvalDataError(f"eval file {str(path)!r}: {what}. Its columns are {columns}; set "
                            f"{' and '.join(f for f, _ in missing)} to the right one(s)")
    raw_texts = df[text_column].tolist()
    raw_labels = df[label_column].tolist()

    bad_text = [i for i, t in enumerate(raw_texts) if _is_missing(t)]
    if bad_text:
        raise EvalDataError(f"eval file {str(path)!r}: {len(bad_text)} of {len(raw_texts)} rows have a missing or empty "
                            f"text in column {text_column!r} (eval.text_column), data rows {_rows(bad_text)} "
                            "(1 = first data row); fill them in or remove those rows")
    bad_label = [i for i, v in enumerate(raw_labels) if _is_missing(v)]
    if bad_label:
        raise EvalDataError(f"eval file {str(path)!r}: {len(bad_label)} of {len(raw_labels)} rows have no label in column "
                            f"{label_column!r} (eval.label_column), data rows {_rows(bad_label)} (1 = first data row); "
                            "label them or remove those rows")

    labels: list[int] = []
    unknown: Counter = Counter()
    for value in raw_labels:
        key = _raw_key(value)
        name = label_map.get(key, key)
        gid = index.get(normalize_label(name))
        if gid is None:
            unknown[(key, name) if key in label_map else (key, None)] += 1
        labels.append(-1 if gid is None else gid)
    if unknown:
        shown = ", ".join(f"{k!r}" + (f" (mapped to {n!r})" if n is not None else "") + f" x{c}"
                          for (k, n), c in unknown.most_common(10))
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        fix = ("fix those names in eval.label_map" if all(n is not None for (_, n) in unknown)
               else "map raw values to label names with eval.label_map (e.g. {'1': 'World'}) or fix the file")
        raise EvalDataError(
            f"eval file {str(path)!r}: {sum(unknown.values())} of {len(raw_labels)} rows have labels in column "
            f"{label_column!r} (eval.label_column) that are no union label: {shown}{more}. The union labels are "
            f"{names} (compared ignoring case, spaces, '_' and '-'); {fix}, or remove those rows")
    return [str(t) for t in raw_texts], labels


# --------------------------------------------------------------------------------------------
# scores


def evaluate_predictions(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    ``labels`` and ``predictions`` are global ids in ``range(len(label_names))``. Per-class scores and
    the matrix cover every label (``zero_division=0``); macro F1 averages the labels that occur in
    ``labels`` or ``predictions``.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y = [int(v) for v in labels]
    p = [int(v) for v in predictions]
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    if not y:
        raise ValueError("nothing to evaluate: no rows")
    c = len(label_names)
    out_of_range = [v for v in y + p if not 0 <= v < c]
    if out_of_range:
        raise ValueError(f"label ids must lie in [0, {c}), got {sorted(set(out_of_range))[:10]}")
    everything = list(range(c))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=everything, zero_division=0)
    present = sorted(set(y) | set(p))
    return {
        "rows": len(y),
        "accuracy": float(accuracy_score(y, p)),
        "macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(label_names)},
        "confusion": confusion_matrix(y, p, labels=everything).tolist(),
    }


def _chunks(n: int, size: int, desc: str):
    """``(start, stop)`` batches over ``n`` rows with a tqdm bar on stderr when there is more than one
    batch (silenced by ``TQDM_DISABLE=1``; in job logs, which are no terminal, one line every 30 s)."""
    import sys

    from tqdm.auto import tqdm

    options = {"disable": True} if n <= size else {}  # otherwise TQDM_DISABLE decides
    mininterval = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(total=n, desc=desc, unit="rows", mininterval=mininterval, **options) as bar:
        for start in range(0, n, size):
            stop = min(n, start + size)
            yield start, stop
            bar.update(stop - start)


def _label_ids(model_labels: Sequence[str], space: UnionLabelSpace, who: str) -> list[int]:
    """Global id of each of a classifier's output labels (by normalised name)."""
    ids = []
    for name in model_labels:
        try:
            ids.append(space.global_id(name))
        except KeyError:
            raise EvalDataError(f"{who} predicts label {name!r}, which is not in the union label space "
                                f"{list(space.names)}; was it trained for these teachers?") from None
    return ids


class ExportedStudent:
    """An exported student directory (``AutoModelForSequenceClassification`` + tokenizer) with
    :meth:`Student.predict`'s interface. ``labels`` are its ``id2label`` names in id order."""

    def __init__(self, directory: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                 max_length: Optional[int] = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dfkd_ray.labels import ordered_labels

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise EvalDataError(f"student directory {str(self.directory)!r} has no config.json; export the student "
                                "with Student.save_pretrained first")
        self.model = AutoModelForSequenceClassification.from_pretrained(self.directory).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.labels = ordered_labels(self.model.config.id2label)
        limits = [v for v in (max_length, self.tokenizer.model_max_length,
                              getattr(self.model.config, "max_position_embeddings", None)) if v]
        self.max_length = int(min(limits)) if limits else 512
        self._keys = ("input_ids", "attention_mask") + \
            (("token_type_ids",) if getattr(self.model.config, "type_vocab_size", 1) > 1 else ())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        probs = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in self._keys}
            probs.append(self.model(**enc).logits.float().softmax(-1).cpu())
        p = torch.cat(probs) if probs else torch.zeros(0, len(self.labels))
        return p, p.argmax(-1)


def evaluate_student(student, texts: Sequence[str], labels: Sequence[int], space: UnionLabelSpace,
                     batch_size: int = 64) -> dict:
    """Score a classifier over the union labels.

    ``student``: a :class:`~dfkd_ray.models.student.Student`, an :class:`ExportedStudent`, or anything
    with ``labels`` (its output names in id order) and ``predict(texts, batch_size) -> (probs, ids)``.
    """
    ids = torch.tensor(_label_ids(student.labels, space, "the student"))
    preds = []
    for start, stop in _chunks(len(texts), max(batch_size * 8, 1), "eval student"):
        preds.append(ids[student.predict(list(texts[start:stop]), batch_size=batch_size)[1]])
    predictions = torch.cat(preds).tolist() if preds else []
    return evaluate_predictions(labels, predictions, space.names)


@torch.no_grad()
def teacher_logits(teachers: Mapping[str, object], texts: Sequence[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Each teacher's logits ``(B, C_k)`` (float32, CPU) for ``texts``."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in teachers}
    for start, stop in _chunks(len(texts), batch_size, "eval teachers"):
        batch = list(texts[start:stop])
        for name, teacher in teachers.items():
            out[name].append(teacher(batch, with_blocks=False).logits.float().cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def ensemble_predictions(logits: Mapping[str, torch.Tensor], space: UnionLabelSpace) -> torch.Tensor:
    """Global ids: argmax over the teachers' logits placed into the union space; a label that several
    teachers have takes the largest of their logits. ``logits[name]``: ``(B, C_k)``."""
    first = next(iter(logits.values()))
    union = torch.full((first.shape[0], space.num_labels), float("-inf"))
    for name, z in logits.items():
        for c, g in enumerate(space.teacher_to_global[name]):
            union[:, g] = torch.maximum(union[:, g], z[:, c].float())
    return union.argmax(-1)


def evaluate_teachers(teachers: Mapping[str, object], texts: Sequence[str], labels: Sequence[int],
                      space: UnionLabelSpace, batch_size: int = 64) -> dict:
    """Each teacher and the ensemble scored over the union labels.

    Returns ``{"teachers": {name: metrics + own_labels, own_rows, own_accuracy}, "ensemble": metrics + rule}``.
    ``own_accuracy`` is the teacher's accuracy on the rows whose label is one of its classes (None
    when there are none).
    """
    missing = [n for n in teachers if n not in space.teacher_to_global]
    if missing:
        raise ValueError(f"teachers {missing} are not in the label space (it has {list(space.teachers)})")
    logits = teacher_logits(teachers, texts, batch_size)
    y = torch.tensor([int(v) for v in labels])
    result: dict = {"teachers": {}}
    for name, z in logits.items():
        to_global = torch.tensor(space.teacher_to_global[name])
        pred = to_global[z.argmax(-1)]
        metrics = evaluate_predictions(y.tolist(), pred.tolist(), space.names)
        own = torch.isin(y, to_global)
        n_own = int(own.sum())
        metrics.update({"own_labels": [space.names[g] for g in sorted(set(to_global.tolist()))], "own_rows": n_own,
                        "own_accuracy": float((pred[own] == y[own]).float().mean()) if n_own else None})
        result["teachers"][name] = metrics
    ensemble = evaluate_predictions(y.tolist(), ensemble_predictions(logits, space).tolist(), space.names)
    ensemble["rule"] = ENSEMBLE_RULE
    result["ensemble"] = ensemble
    return result


# --------------------------------------------------------------------------------------------
# confidence diagnostics


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Probability that a random OOD score exceeds a random in-distribution score (ties count 1/2);
    NaN when either side is empty. Any shapes (flattened)."""
    from sklearn.metrics import roc_auc_score

    a, b = in_scores.detach().flatten().double().cpu(), out_scores.detach().flatten().double().cpu()
    if not a.numel() or not b.numel():
        return math.nan
    return float(roc_auc_score([0] * a.numel() + [1] * b.numel(), torch.cat([a, b]).numpy()))


@torch.no_grad()
def kd_target_scores(logits: Sequence[torch.Tensor], index: Sequence[torch.Tensor], labels: torch.Tensor,
                     conf: torch.Tensor, *, powers: Sequence[float], num_labels: int, temperature: float) -> dict:
    """The KD target as a classifier on labelled text, built as the distillation loss builds it:
    :func:`~dfkd_ray.math.losses.union_target` of the teachers' logits with
    :func:`~dfkd_ray.math.amalgamation.kd_teacher_weights` of their confidences.

    Args:
        logits: K tensors ``(M, C_k)``, each teacher's logits.
        index: K long tensors ``(C_k,)``, teacher class -> union label id.
        labels: ``(M,)`` true union label ids.
        conf: ``(M, K)`` the teachers' (last-block) confidences.
        powers: the ``kd_confidence_power`` values to score.
        num_labels: ``C``, the union labels.
        temperature: ``amalgamation.temperature``.

    Returns:
        ``selects_own``: share of rows whose largest confidence is a teacher that knows the true
        class; ``accuracy_by_power``: ``{str(power): accuracy of the target's argmax}``.
    """
    from dfkd_ray.math.amalgamation import kd_teacher_weights
    from dfkd_ray.math.losses import union_target

    own = torch.stack([torch.isin(labels, i) for i in index], dim=-1)  # (M, K) teacher k knows the true class
    accuracy = {}
    for power in powers:
        p_t = union_target(logits, index, kd_teacher_weights(conf, power), num_labels, temperature)  # (M, C)
        accuracy[str(power)] = float((p_t.argmax(-1) == labels).float().mean())
    return {"selects_own": float(own.gather(1, conf.argmax(-1, keepdim=True)).float().mean()),
            "accuracy_by_power": accuracy}


# --------------------------------------------------------------------------------------------
# report


def plot_confusion(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: Union[str, Path],
                   title: str = "confusion matrix") -> Path:
    """A PNG of the confusion matrix (rows: true label, columns: prediction), coloured by row share,
    counts written in the cells (up to 30 labels)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=float)
    c = len(label_names)
    if m.shape != (c, c):
        raise ValueError(f"confusion matrix of shape {m.shape} for {c} labels")
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = min(4.0 + 0.45 * c, 24.0)
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's rows")
    ax.set_xticks(range(c), labels=list(label_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(label_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def summarize(results: Mapping, where: Union[str, Path, None] = None) -> str:
    """One line, e.g. ``eval: student acc 0.913 (macro-F1 0.90) | alpha 0.48 (own 0.97) | ensemble 0.88 on 400 rows (dir)``."""
    parts = []
    if results.get("student"):
        s = results["student"]
        parts.append(f"student acc {s['accuracy']:.3f} (macro-F1 {s['macro_f1']:.2f})")
    for name, t in (results.get("teachers") or {}).items():
        own = f" (own {t['own_accuracy']:.2f})" if t.get("own_accuracy") is not None else ""
        parts.append(f"{name} {t['accuracy']:.2f}{own}")
    if results.get("ensemble"):
        parts.append(f"ensemble {results['ensemble']['accuracy']:.2f}")
    line = "eval: " + " | ".join(parts or ["nothing scored"]) + f" on {results.get('rows', 0)} rows"
    return line + (f" ({where})" if where is not None else "")


@dataclass(frozen=True)
class EvalReport:
    """What :func:`write_eval_report` wrote: the summary line and the files by role
    (``json``, ``confusion_student``, ``confusion_<teacher>``, ``confusion_ensemble``)."""

    summary: str
    files: dict


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_eval_report(results: Mapping, directory: Union[str, Path]) -> EvalReport:
    """Write ``eval.json`` and confusion PNGs (student, each teacher, ensemble) into ``directory``.

    ``results``: a dict with ``labels`` (union names), ``rows`` and any of ``student`` (metrics),
    ``teachers`` ({name: metrics}) and ``ensemble`` (metrics), as :func:`run_evaluation` builds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(results["labels"])
    files: dict[str, Path] = {}
    scored = []
    if results.get("student"):
        scored.append(("student", "student", results["student"]))
    for name, t in (results.get("teachers") or {}).items():
        scored.append((name, f"teacher {name}", t))
    if results.get("ensemble"):
        scored.append(("ensemble", "teacher ensemble", results["ensemble"]))
    for key, title, metrics in scored:
        path = directory / f"confusion_{key}.png"
        plot_confusion(metrics["confusion"], names, path,
                       f"{title}: acc {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
                       f"({metrics['rows']} rows)")
        files[f"confusion_{key}"] = path
    files = {"json": directory / "eval.json", **files}
    summary = summarize(results, directory)
    _write_json(files["json"], {**results, "summary": summary, "files": {k: str(v) for k, v in files.items()}})
    return EvalReport(summary=summary, files=files)


def run_evaluation(cfg, student_dir: Union[str, Path, None], *, teachers: Optional[Mapping[str, object]] = None,
                   device: Union[str, torch.device] = "cpu", out_dir: Union[str, Path, None] = None) -> dict:
    """Score the exported student (if ``student_dir``), each teacher and their ensemble on ``cfg.eval``.

    Args:
        cfg: the :class:`~dfkd_ray.config.JobConfig`; ``cfg.eval.path`` must be set.
        student_dir: an exported student (``Student.save_pretrained``), or None for teachers only.
        teachers: loaded :class:`~dfkd_ray.models.teacher.Teacher` objects by name; loaded from the
            config when None.
        device: where the student (and teachers loaded here) run.
        out_dir: where the report goes; default ``<output.dir>/eval``.

    Returns:
        The results (as in ``eval.json``) plus ``summary`` (one line) and ``files`` (paths by role).
    """
    ev = cfg.eval
    if ev.path is None:
        raise EvalDataError("eval.path is not set: give a labelled CSV/TSV/JSONL/Parquet file to evaluate on")
    space = UnionLabelSpace.from_teachers(cfg.teacher_labels())
    texts, labels = load_labelled(ev.path, text_column=ev.text_column, label_column=ev.label_column,
                                  label_map=ev.label_map, label_space=space)
    names = list(space.names)
    counts = Counter(labels)
    results: dict = {"file": str(ev.path), "rows": len(texts), "labels": names,
                     "label_counts": {names[i]: counts.get(i, 0) for i in range(len(names))}}
    log.info("eval: %d rows from %s", len(texts), ev.path)
    if student_dir is not None:
        student = ExportedStudent(student_dir, device=device, max_length=cfg.student.max_length)
        results["student_dir"] = str(student_dir)
        results["student"] = evaluate_student(student, texts, labels, space, ev.batch_size)
        del student
    if teachers is None:
        from dfkd_ray.models.teacher import load_teachers

        teachers = load_teachers(cfg.teachers, device=str(device))
    results.update(evaluate_teachers(teachers, texts, labels, space, ev.batch_size))
    report = write_eval_report(results, Path(out_dir) if out_dir is not None else cfg.output.dir / "eval")
    results["summary"] = report.summary
    results["files"] = {k: str(v) for k, v in report.files.items()}
    return results
