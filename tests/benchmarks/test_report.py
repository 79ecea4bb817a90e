"""``benchmarks/amalgamation.py --report``: result files of separate calls pooled per benchmark, with
the goal margins (StrataNet over the ensemble and over the best baseline row, worst seed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the harness is imported as the benchmark scripts import it

from harness.report import combined_markdown  # noqa: E402


def result(rows: dict, *, lm: str = "lm-a", kd_power: float = 64.0, fixed: bool = True) -> dict:
    """A result file as the harness writes it: ``rows`` maps a row to {seed: accuracy}."""
    out = {name: {"seeds": {str(s): {"accuracy": a, "dev_accuracy": a - 0.01} for s, a in seeds.items()}}
           for name, seeds in rows.items()}
    if fixed:
        out = {"teacher 1 (t1)": {"accuracy": 0.5}, "ensemble": {"accuracy": 0.6}, **out}
    return {"device": "cpu", "benchmark": {"name": "toy", "lm": lm},
            "settings": {"kd_power": kd_power, "seeds": "0", "rows": "", "out": "x.json", "work": "/tmp/w"},
            "rows": out, "target": {}, "auroc": {}}


def write(tmp_path: Path, name: str, report: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def table_line(markdown: str, row: str) -> list[str]:
    line = next(l for l in markdown.splitlines() if l.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_seeds_of_separate_calls_are_pooled_with_goal_margins(tmp_path):
    a = write(tmp_path, "a.json", result({"vanilla_random": {0: 0.70, 1: 0.72}, "stratanet": {0: 0.76}}))
    b = write(tmp_path, "b.json", result({"stratanet": {1: 0.80}, "vanilla_corpus": {0: 0.65}}, fixed=False))
    md = combined_markdown([a, b])
    assert md.count("### toy · lm-a") == 1 and "2 result file(s)" in md
    strata = table_line(md, "stratanet")
    assert strata[2:5] == ["76.00 / 80.00", "78.00", "4.00"]  # per seed, mean, spread
    # ensemble 60: mean +18, worst seed +16; best baseline vanilla_random (71): mean +7, worst seed 76 - 70 = +6
    assert strata[6:] == ["+18.00 / +16.00", "+7.00 / +6.00"]
    assert table_line(md, "vanilla_random")[7] == "best baseline"
    assert "**met** over 2 seed(s); worst seed +16.00 over the ensemble, +6.00 over the best baseline" in md


def test_the_goal_line_says_when_a_seed_misses(tmp_path):
    a = write(tmp_path, "a.json", result({"vanilla_random": {0: 0.70, 1: 0.70}, "stratanet": {0: 0.80, 1: 0.72}}))
    assert "**not met** over 2 seed(s); worst seed +12.00 over the ensemble, +2.00 over" in combined_markdown([a])


def test_other_settings_or_another_lm_are_separate_benchmarks(tmp_path):
    a = write(tmp_path, "a.json", result({"stratanet": {0: 0.76}}))
    b = write(tmp_path, "b.json", result({"stratanet": {0: 0.70}}, kd_power=1.0))
    c = write(tmp_path, "c.json", result({"stratanet": {0: 0.60}}, lm="lm-b"))
    md = combined_markdown([a, b, c])
    assert "### toy · lm-a\n" in md and "### toy · lm-a · kd_power=1.0" in md and "### toy · lm-b\n" in md


def test_confidence_summary_puts_the_jobs_estimate_beside_the_real_text_auroc(tmp_path):
    """Per confidence fit, over fit seeds: the pseudo-text AUROC, the job's label-free separation
    estimate and the real-text AUROC of each teacher, side by side (means over seeds)."""
    def fit(estimate):
        return {"selects_own": 0.8, "auroc_last": {"t1": 0.9, "t2": 0.6},
                "separation_last": {"t1": estimate, "t2": 0.7}, "accuracy_by_power": {"64.0": 0.75}}
    reports = []
    for seed, estimate in ((0, 0.94), (1, 0.96)):
        r = result({"stratanet": {seed: 0.76}})
        r["target"] = {f"steered/rmd/seed{seed}": {"oracle": 0.95, "rmd/contrast": fit(estimate),
                                                   "rmd/logistic": {**fit(None), "separation_last": {"t1": None,
                                                                                                     "t2": None}}}}
        r["auroc"] = {f"steered/rmd/seed{seed}": {"t1": [0.8, 0.97], "t2": [0.7, 0.77]}}
        reports.append(write(tmp_path, f"{seed}.json", r))
    md = combined_markdown(reports)
    assert table_line(md, "steered / rmd/contrast")[5:] == ["0.970 / 0.770", "0.950 / 0.700", "0.900 / 0.600"]
    assert table_line(md, "steered / rmd/logistic")[6] == "-"
