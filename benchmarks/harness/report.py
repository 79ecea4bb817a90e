"""The benchmark's markdown tables: one call's (:func:`table_markdown`, :func:`target_markdown`,
:func:`sweep_markdown`) and several calls' together (:func:`combined_markdown`, ``--report``).

Calls that differ only in their rows, seeds and file locations belong to one benchmark: their
per-seed results are pooled per row. Calls with other settings (``--kd-power``, ``--stratanet``,
``--tiny``, ...) form a benchmark variant of their own, named by the settings in which it differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.rows import ROWS

GOAL_OVER_ENSEMBLE = 0.05  # StrataNet's margin over the teachers' ensemble, in every seed
GOAL_OVER_BASELINE = 0.03  # and over the best vanilla (baseline) row
PLUMBING = ("rows", "seeds", "out", "work", "transfer_from", "save_transfer", "save_features", "profile_distill",
            "no_judge", "sweep", "sweep_samples", "device", "report", "spec", "data", "lm", "base", "corpus")
"""Settings that say where a call ran and which of its rows, not what a row measures."""


# ---- one call ---------------------------------------------------------------------------------

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
    powers = list(next(v for t in target.values() for k, v in t.items() if k != "oracle")["accuracy_by_power"])
    lines = ["| transfer set / confidence / transform / fit seed | selects own teacher | "
             + " | ".join(f"gamma {float(p):g}" for p in powers) + " | oracle |",
             "|---|---|" + "---|" * len(powers) + "---|"]
    for key, t in target.items():
        for variant, v in t.items():
            if variant == "oracle":
                continue
            accs = " | ".join(f"{100 * v['accuracy_by_power'][p]:.2f}" for p in powers)
            source, _, seed, *rule = key.split("/")  # rule: a one_class_confidence other than the default
            lines.append(f"| {' / '.join([source, variant, seed, *rule])} | {100 * v['selects_own']:.1f}% | {accs} | "
                         f"{100 * t['oracle']:.2f} |")
    return "\n".join(lines)


def table_markdown(report: dict) -> str:
    sup = report["rows"].get("supervised", {}).get("accuracy")
    lines = ["| row | accuracy | spread (max-min) | seeds | % of supervised | transfer hit rate | judge agreement |",
             "|---|---|---|---|---|---|---|"]
    for row, r in report["rows"].items():
        t = report["transfer"].get(ROWS[row].transfer_set, {}) if row in ROWS else {}
        spread = f"{100 * r['spread']:.2f}" if "spread" in r else "-"
        pct = f"{100 * r['accuracy'] / sup:.1f}%" if sup else "-"
        lines.append(f"| {row} | {100 * r['accuracy']:.2f} | {spread} | {r.get('n', 1)} | {pct} | "
                     f"{t.get('teacher_hit_rate', '-')} | {t.get('judge_agreement', '-')} |")
    return "\n".join(lines)


# ---- several calls ----------------------------------------------------------------------------

def variant_key(report: dict) -> tuple[str, str, str]:
    """``(benchmark, LM, settings)``: calls with the same key pool their seeds."""
    settings = {k: v for k, v in report["settings"].items() if k not in PLUMBING}
    bench = report["benchmark"]
    return bench["name"], bench["lm"], json.dumps(settings, sort_keys=True)


def pooled_rows(reports: list[dict]) -> dict[str, dict]:
    """Row -> ``{"seeds": {seed: result}}`` for the rows trained per seed, ``{"values": [...]}`` for the
    rest (teachers, ensemble, supervised: one value a call); a later call's seed replaces an earlier one's."""
    rows: dict[str, dict] = {}
    for report in reports:
        for row, r in report["rows"].items():
            entry = rows.setdefault(row, {"seeds": {}, "values": []})
            if "seeds" in r:
                entry["seeds"].update(r["seeds"])
            else:
                entry["values"].append(r)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _accuracies(entry: dict) -> dict[str, float]:
    if entry["seeds"]:
        return {s: v["accuracy"] for s, v in sorted(entry["seeds"].items(), key=lambda kv: int(kv[0]))}
    return {str(i): v["accuracy"] for i, v in enumerate(entry["values"])}


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def group_markdown(reports: list[dict]) -> str:
    """One benchmark variant's table: per row the test accuracy per seed, mean, spread, development
    mean, and its margins over the ensemble and over the best baseline row (mean / worst seed)."""
    rows = pooled_rows(reports)
    ensemble = _mean(_accuracies(rows["ensemble"]).values()) if "ensemble" in rows else None
    baselines = {r: _accuracies(e) for r, e in rows.items() if r in ROWS and ROWS[r].role == "baseline" and e["seeds"]}
    best = max(baselines, key=lambda r: _mean(list(baselines[r].values()))) if baselines else None

    def best_at(seed: str) -> float:  # the best baseline row at this seed (a row without it: its mean)
        return max(accs.get(seed, _mean(list(accs.values()))) for accs in baselines.values())

    lines = ["| row | role | test: per seed | mean | spread | dev mean | vs ensemble: mean / worst seed "
             "| vs best baseline: mean / worst seed |", "|---|---|---|---|---|---|---|---|"]
    goal = None
    for row, entry in rows.items():
        accs = _accuracies(entry)
        values = list(accs.values())
        mean = _mean(values)
        role = ROWS[row].role if row in ROWS else ("upper bound" if row == "supervised" else "teachers")
        per_seed = " / ".join(f"{100 * a:.2f}" for a in values) if entry["seeds"] else ""
        dev = [v["dev_accuracy"] for v in entry["seeds"].values() if "dev_accuracy" in v]
        cells = ["", ""]
        if entry["seeds"] and row in ROWS:
            if ensemble is not None:
                cells[0] = f"{_points(mean - ensemble)} / {_points(min(values) - ensemble)}"
            if best is not None and row != best:
                cells[1] = (f"{_points(mean - _mean(list(baselines[best].values())))} / "
                            f"{_points(min(a - best_at(s) for s, a in accs.items()))}")
            elif row == best:
                cells[1] = "best baseline"
            if row == "stratanet" and ensemble is not None and best is not None:
                goal = (min(values) - ensemble, min(a - best_at(s) for s, a in accs.items()), len(values))
        lines.append(f"| {row} | {role} | {per_seed} | {100 * mean:.2f} | "
                     f"{f'{100 * (max(values) - min(values)):.2f}' if len(values) > 1 else ''} | "
                     f"{f'{100 * _mean(dev):.2f}' if dev else ''} | {cells[0]} | {cells[1]} |")
    if goal is not None:
        met = goal[0] >= GOAL_OVER_ENSEMBLE and goal[1] >= GOAL_OVER_BASELINE
        lines.append(f"\nGoal (StrataNet >= ensemble {_points(GOAL_OVER_ENSEMBLE)} and >= best baseline "
                     f"{_points(GOAL_OVER_BASELINE)} points in every seed): **{'met' if met else 'not met'}** over "
                     f"{goal[2]} seed(s); worst seed {_points(goal[0])} over the ensemble, {_points(goal[1])} over "
                     f"the best baseline ({best}).")
    return "\n".join(lines)


def target_summary(reports: list[dict]) -> str:
    """Per confidence fit (transfer set / confidence / transform), over fit seeds: how often the KD
    target picks the teacher that knows the class on real test text, its accuracy at the rows'
    ``kd_confidence_power``, the oracle, and the last-block AUROC on pseudo-text (the benchmark's
    training rows; and the job's own separation estimate from its held-out rows) vs on real text."""
    power = str(float(reports[0]["settings"].get("kd_power", 64.0)))
    fits: dict[str, dict] = {}
    for report in reports:
        for key, t in report.get("target", {}).items():
            source, confidence, seed, *rule = key.split("/")  # rule: a one_class_confidence other than the default
            for variant, v in t.items():
                if variant == "oracle":
                    continue
                f = fits.setdefault(" / ".join([source, variant, *rule]), {"seeds": {}, "oracle": t["oracle"], "pseudo": {}})
                f["seeds"][seed] = v
                auroc = report.get("auroc", {}).get(f"{source}/{confidence}/{seed}")
                if auroc:
                    f["pseudo"][seed] = auroc
    if not fits:
        return ""
    lines = [f"| confidence fit | fit seeds | selects own teacher | KD target, gamma {float(power):g} | oracle "
             "| last-block AUROC, pseudo-text | separation estimate (job) | last-block AUROC, real text |",
             "|---|---|---|---|---|---|---|---|"]
    for name, f in fits.items():
        runs = list(f["seeds"].values())
        teachers = list(runs[0]["auroc_last"])
        real = " / ".join(f"{_mean([r['auroc_last'][n] for r in runs]):.3f}" for n in teachers)
        pseudo = (" / ".join(f"{_mean([a[n][-1] for a in f['pseudo'].values()]):.3f}" for n in teachers)
                  if f["pseudo"] else "")
        estimates = [r.get("separation_last", {}) for r in runs]
        estimate = (" / ".join(f"{_mean([e[n] for e in estimates]):.3f}" for n in teachers)
                    if all(e.get(n) is not None for e in estimates for n in teachers) else "-")
        accuracy = [r["accuracy_by_power"][power] for r in runs if power in r["accuracy_by_power"]]
        lines.append(f"| {name} | {len(runs)} | {100 * _mean([r['selects_own'] for r in runs]):.1f}% | "
                     f"{f'{100 * _mean(accuracy):.2f}' if accuracy else '-'} | {100 * f['oracle']:.2f} | "
                     f"{pseudo} | {estimate} | {real} |")
    return "\n".join(lines)


def combined_markdown(paths: list[Path]) -> str:
    """Every benchmark variant of the given result files: a heading, its row table with the goal line,
    and its confidence-fit summary."""
    groups: dict[tuple, list[dict]] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "benchmark" not in report:
            raise SystemExit(f"--report: {path} is not a result file of benchmarks/amalgamation.py (no 'benchmark')")
        groups.setdefault(variant_key(report), []).append(report)
    first_of: dict[tuple, dict] = {}
    out = []
    for (name, lm, settings), reports in groups.items():
        settings = json.loads(settings)
        base = first_of.setdefault((name, lm), settings)
        differs = ", ".join(f"{k}={settings.get(k)}" for k in sorted(set(settings) | set(base))
                            if settings.get(k) != base.get(k))
        devices = sorted({r["device"] for r in reports})
        out += [f"### {name} · {lm}{f' · {differs}' if differs else ''}",
                f"{len(reports)} result file(s); device: {', '.join(devices)}", "", group_markdown(reports)]
        summary = target_summary(reports)
        if summary:
            out += ["", summary]
        out.append("")
    return "\n".join(out)
