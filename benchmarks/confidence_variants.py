"""Choose confidence settings on development rows, offline, from teacher features saved on the GPU.

``benchmarks/amalgamation.py --save-features DIR`` writes the teachers' block features and logits on the
steered transfer set, the benchmark's test set and its development rows, with the label space (the
union labels and each teacher's classes). This script fits the confidence statistics exactly as the job does
(:func:`~dfkd_ray.confidence.fit_estimator` on each teacher's held-out rows, with the other teachers' held-out rows
as ``background_states`` for ``rmd_background: all_teachers``) for a grid of settings and scores the KD
target (:func:`dfkd_ray.evaluation.kd_target_scores`, built as the loss builds it) as a classifier on the
development rows and on the test set. Choose on the development columns; the test columns are what
that choice then reports. The KD target's accuracy on real text is not the student's (a target that is
right on real text is not necessarily one the student learns from the transfer set), so confirm a
choice with ``amalgamation.py`` rows. CPU only, about a second per fit::

    python benchmarks/confidence_variants.py --features DIR --out variants.json \\
        --centers quantile:0.995,moments:4,moments:5.5,moments:6 --repeats 1,4 --seeds 0,1,2,3,4,5

A variant is a ``confidence_transform`` (``--transforms``) x ``one_class_confidence`` rule
(``--one-class``; the rules differ only where a teacher has one class) x ``rmd_background`` x
calibration centre (``quantile:Q`` = ``confidence_center: quantile`` with ``confidence_quantile: Q``;
``moments:Z`` = ``confidence_center: moments`` with ``confidence_center_sd: Z``) x
``calibration_repeats``. The one-class rules on a split with a one-class teacher::

    python benchmarks/confidence_variants.py --features DIR --out variants.json --centers quantile:0.995 \
        --repeats 1 --one-class elimination,own --transforms contrast,logistic,ecdf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

import torch

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.confidence import ConfidenceEstimator, fit_estimator, one_class_rule
from dfkd_ray.evaluation import kd_target_scores
from dfkd_ray.labels import UnionLabelSpace


def load_features(directory: Path) -> tuple[dict, dict, UnionLabelSpace]:
    """``meta``, ``{teacher: {split: (M, N_saved, H) float64}}`` over the saved blocks in block order,
    and the label space the features were saved with."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = load_file(str(directory / "meta.safetensors"))
    with safe_open(str(directory / "meta.safetensors"), "pt") as f:
        saved = (f.metadata() or {}).get("label_space")
    if saved is None:
        raise ValueError(f"{directory} has no label space: save the features again with amalgamation.py --save-features")
    space = UnionLabelSpace.from_dict(json.loads(saved))
    feats = {}
    for name in space.teachers:
        files = sorted(directory.glob(f"{name}-block*.safetensors"), key=lambda f: int(f.stem.rsplit("block", 1)[1]))
        if not files:
            raise FileNotFoundError(f"{directory} has no {name}-block*.safetensors: pass amalgamation.py's --save-features DIR")
        blocks = [load_file(str(f)) for f in files]
        feats[name] = {split: torch.stack([b[split].double() for b in blocks], 1) for split in blocks[0]}
    if "dev_label" not in meta:
        raise ValueError(f"{directory} has no development rows: save the features again with amalgamation.py")
    return meta, feats, space


def parse_center(spec: str) -> dict:
    """``quantile:0.995`` / ``moments:5.5`` -> the ``amalgamation`` fields of that centre."""
    kind, _, value = spec.partition(":")
    try:
        number = float(value)
    except ValueError:
        raise SystemExit(f"--centers: {spec!r} is not quantile:Q or moments:Z (e.g. moments:5.5)") from None
    if kind == "quantile" and 0 < number < 1:
        return {"confidence_center": "quantile", "confidence_quantile": number}
    if kind == "moments" and number > 0:
        return {"confidence_center": "moments", "confidence_center_sd": number}
    raise SystemExit(f"--centers: {spec!r} is not quantile:Q with 0 < Q < 1 or moments:Z with Z > 0")


def fit(meta: dict, feats: dict, space: UnionLabelSpace, cfg: AmalgamationConfig, *,
        seed: int) -> dict[str, ConfidenceEstimator]:
    """Every teacher's statistics from its held-out transfer rows, as the job fits them."""
    held, source = meta["transfer_heldout"].bool(), meta["transfer_teacher"]
    out = {}
    for k, name in enumerate(space.teachers):
        own, others = held & (source == k), held & (source != k)
        x = feats[name]["transfer"]
        out[name] = fit_estimator(
            x[own], meta[f"{name}.transfer_logits"][own], meta["transfer_class"][own], cfg, seed=seed,
            background_states=x[others] if cfg.rmd_background == "all_teachers" else None)
    return out


def score(meta: dict, feats: dict, space: UnionLabelSpace, estimators: dict, split: str, power: float,
          temperature: float, one_class: str = "elimination") -> dict:
    """The KD target as a classifier on ``split`` (:func:`kd_target_scores`), with the job's
    ``one_class_confidence`` rule: accuracy and the share whose top KD weight is the teacher that knows
    the true class."""
    index = [torch.tensor(space.teacher_to_global[n]) for n in space.teachers]
    logits = [meta[f"{n}.{split}_logits"].float() for n in space.teachers]
    conf = one_class_rule([estimators[n].confidence(feats[n][split], logits[k])[:, -1:]
                           for k, n in enumerate(space.teachers)],
                          [estimators[n].num_classes for n in space.teachers], one_class)
    conf = torch.cat(conf, -1)  # (M, K) last-block c_k
    s = kd_target_scores(logits, index, meta[f"{split}_label"], conf, powers=(power,), num_labels=space.num_labels,
                         temperature=temperature)
    return {"accuracy": s["accuracy_by_power"][str(power)], "selects_own": s["selects_own"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=Path, required=True, help="what amalgamation.py --save-features wrote")
    p.add_argument("--out", type=Path, required=True, help="JSON of every variant and seed")
    p.add_argument("--centers", default="quantile:0.995,moments:4,moments:5,moments:5.5,moments:6",
                   help="calibration centres, quantile:Q or moments:Z, comma-separated")
    p.add_argument("--quantiles", default="", help="more quantile centres: 0.99,0.995 = quantile:0.99,quantile:0.995")
    p.add_argument("--repeats", default="1,4", help="calibration_repeats values")
    p.add_argument("--backgrounds", default="all_teachers")
    p.add_argument("--seeds", default="0,1,2,3,4,5", help="fold-split seeds (the job uses its seed)")
    p.add_argument("--one-class", default="elimination", help="one_class_confidence rules, comma-separated "
                                                               "(elimination,own; the same where no teacher has one class)")
    p.add_argument("--transforms", default="contrast", help="confidence_transform values, comma-separated")
    p.add_argument("--power", type=float, default=64.0, help="kd_confidence_power (the config's default)")
    p.add_argument("--temperature", type=float, default=0.75, help="amalgamation.temperature (amalgamation.py's default)")
    args = p.parse_args(argv)
    specs = [c for c in args.centers.split(",") if c] + [f"quantile:{q}" for q in args.quantiles.split(",") if q]
    centers = [(spec, parse_center(spec)) for spec in specs]
    backgrounds = args.backgrounds.split(",")
    bad = [b for b in backgrounds if b not in ("own", "all_teachers")]
    if bad:
        p.error(f"--backgrounds takes own,all_teachers (got {bad})")
    repeats = [int(r) for r in args.repeats.split(",")]
    if not centers or min(repeats) < 1:
        p.error("give at least one centre, and --repeats >= 1")
    seeds = [int(s) for s in args.seeds.split(",")]
    meta, feats, space = load_features(args.features)
    results = []
    rules, transforms = args.one_class.split(","), args.transforms.split(",")
    fields = AmalgamationConfig.model_fields
    for flag, values, field in (("--one-class", rules, "one_class_confidence"), ("--transforms", transforms,
                                                                                  "confidence_transform")):
        allowed = get_args(fields[field].annotation)
        if any(v not in allowed for v in values):
            p.error(f"{flag} takes {','.join(allowed)} (got {','.join(values)})")
    print("| transform | one-class rule | rmd_background | centre | calibration_repeats | dev: target accuracy (mean, min) "
          "| dev: selects own | test: target accuracy (mean, min) | test: selects own |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    grid = [(t, r, b, c, rep) for t in transforms for r in rules for b in backgrounds for c in centers for rep in repeats]
    for transform, rule, background, (spec, center), rep in grid:
        runs = []
        for seed in seeds:
            cfg = AmalgamationConfig(rmd_background=background, calibration_repeats=rep, confidence_transform=transform,
                                     one_class_confidence=rule, **center)
            est = fit(meta, feats, space, cfg, seed=seed)
            runs.append({split: score(meta, feats, space, est, split, args.power, args.temperature, rule)
                         for split in ("dev", "test")})
        row = {"transform": transform, "one_class_confidence": rule, "rmd_background": background,
               "center": spec, "calibration_repeats": rep, "seeds": seeds, "runs": runs}
        cells = []
        for split in ("dev", "test"):
            acc = [r[split]["accuracy"] for r in runs]
            sel = [r[split]["selects_own"] for r in runs]
            row[split] = {"accuracy_mean": sum(acc) / len(acc), "accuracy_min": min(acc),
                          "selects_own_mean": sum(sel) / len(sel)}
            cells += [f"{100 * row[split]['accuracy_mean']:.2f} ({100 * min(acc):.2f})",
                      f"{100 * row[split]['selects_own_mean']:.1f}%"]
        results.append(row)
        print(f"| {transform} | {rule} | {background} | {spec} | {rep} | " + " | ".join(cells) + " |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"features": str(args.features), "power": args.power, "variants": results}, indent=1))
    best = max(results, key=lambda r: r["dev"]["accuracy_mean"])
    print(f"best on the development rows: {best['transform']}, one-class rule {best['one_class_confidence']}, "
          f"rmd_background {best['rmd_background']}, centre {best['center']}, "
          f"calibration_repeats {best['calibration_repeats']} (dev {100 * best['dev']['accuracy_mean']:.2f}%, "
          f"test {100 * best['test']['accuracy_mean']:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
