"""Diagnostics of the amalgamation benchmark (``benchmarks/amalgamation.py``): what each stage gives on real text.

- :func:`transfer_diagnostics`: a transfer set's teacher hit rate (the source teacher's argmax is the
  row's target class; true by construction for untargeted sources), the supervised judge's agreement
  with the row's label (the share of text that is really of its class), length and confidence.
- :func:`confidence_auroc`: per teacher and block, the AUROC of the estimator's OOD score, other
  teachers' rows vs its own (higher = better separated).
- :func:`target_accuracy`: the KD target scored as a classifier on the test set, per
  ``kd_confidence_power`` (:func:`dfkd_ray.evaluation.kd_target_scores`).
- :func:`save_features`: teacher features for ``benchmarks/confidence_variants.py``.
- :func:`profile_distill`: where a distillation step's time goes.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch

from dfkd_ray.config import JobConfig
from dfkd_ray.confidence import fit_confidence, one_class_rule
from dfkd_ray.evaluation import auroc, kd_target_scores
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.models.teacher import collect_outputs
from dfkd_ray.transfer.sources.corpus import training_table


TARGET_POWERS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 1000.0)  # kd_confidence_power values the target diagnostic scores


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
    union of the teachers, exactly as the distillation loss builds it) scored as a classifier on the
    benchmark's test set, for every ``kd_confidence_power`` in ``TARGET_POWERS`` and both confidence
    transforms: ``estimators`` (the row's fit, with ``cfg``'s transform) and the other transform
    fitted the same way (:func:`fit_confidence` on the transfer set's held-out rows).

    Also per variant: ``selects_own`` (share of test texts whose largest KD weight goes to the teacher
    that knows the true class), ``auroc_last`` (last-block confidence, texts of the teacher's own
    classes vs the others') and ``separation_last`` (the job's label-free estimate of that AUROC from
    pseudo-text, :meth:`~dfkd_ray.confidence.ConfidenceEstimator.separation`; ``None`` for transforms
    that keep no other-teacher scores); and ``oracle`` (all weight on the teacher that knows the
    class: the target's ceiling with these teachers).
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
    for transform in ("logistic", "ecdf", "contrast"):
        if transform != cfg.amalgamation.confidence_transform:
            amalg = cfg.amalgamation.model_copy(update={"confidence_transform": transform})
            fitted = fit_confidence(cfg.model_copy(update={"amalgamation": amalg}), table, teachers)
        else:
            fitted = estimators
        conf = one_class_rule([fitted[n].confidence(*test_outputs[n])[:, -1:] for n in names],
                              [fitted[n].num_classes for n in names], cfg.amalgamation.one_class_confidence)
        conf = torch.cat(conf, dim=-1)  # (M, K) last block
        scores = score(conf, powers=TARGET_POWERS)
        out[f"{cfg.amalgamation.confidence}/{transform}"] = {
            "selects_own": round(scores["selects_own"], 4),
            "auroc_last": {n: round(auroc(-conf[own[:, i], i], -conf[~own[:, i], i]), 4) for i, n in enumerate(names)},
            "separation_last": {n: (fitted[n].meta["separation"] or [None])[-1] for n in names},
            "accuracy_by_power": {p: round(a, 4) for p, a in scores["accuracy_by_power"].items()}}
    return out


@torch.no_grad()
def save_features(directory: Path, table, teachers: dict, space: UnionLabelSpace, test_outputs: dict,
                  test_labels: list[int], dev_texts: list[str], dev_labels: list[int]) -> None:
    """Teacher features of the transfer set, the test set and a development set as safetensors, one file
    per teacher and block (``<teacher>-block<b>.safetensors``: ``transfer`` (M, H), ``test`` (M_test, H)
    and ``dev`` (M_dev, H), float16) plus ``meta.safetensors`` (logits, labels, held-out flags, source
    teacher ids; its metadata ``label_space`` holds the union labels and each teacher's classes, as
    :meth:`UnionLabelSpace.to_dict`): what confidence and KD-weighting variants need, to be studied on a
    CPU without the GPU that trained the teachers. The development rows are the spec's ``dev`` rows:
    variants are chosen on them, so that the test set is only reported. (Where the teachers were
    fine-tuned on them, a teacher's features of its own classes' dev rows are in-sample: a biased, but
    test-free, check of which teacher a variant trusts.)"""
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
    save_file({k: v.contiguous() for k, v in meta.items()}, str(directory / "meta.safetensors"),
              metadata={"label_space": json.dumps(space.to_dict())})


def profile_distill(cfg: JobConfig, table, teachers: dict, estimators, device, steps: int = 20) -> str:
    """torch.profiler over ``steps`` optimiser steps (after 5 unprofiled ones) of this row's training:
    where a distillation step's time goes (host, kernels, waits), as the profiler's top-20 table."""
    from torch.profiler import ProfilerActivity, profile

    from dfkd_ray.train.epochs import StepPlan
    from dfkd_ray.train.step import Distiller

    rows = training_table(table, cfg)
    texts, sources = rows.column("text").to_pylist(), rows.column("teacher").to_pylist()
    size = cfg.train.batch_size
    picks = [[(b * size + j) % len(texts) for j in range(size)] for b in range(steps + 5)]
    distiller = Distiller(cfg, StepPlan.of(len(texts), cfg, 1), device=device, teachers=teachers, estimators=estimators)
    batches_ = [distiller.encode([texts[i] for i in p], [sources[i] for i in p]) for p in picks]
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
