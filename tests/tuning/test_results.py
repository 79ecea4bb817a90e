"""A sweep's results: ranking, tables, plot, the best configuration as a job YAML (no Ray)."""

from __future__ import annotations

import csv

from dfkd_ray.config import load_config
from dfkd_ray.tuning.results import (TrialRecord, final_line, plot_metric, progress_line, rank_correlation, ranked,
                                     write_best_config, write_tables)
from dfkd_ray.tuning.space import trial_config

KEYS = ["transfer.steered.control_strength", "amalgamation.kd_confidence_power"]


def records() -> list[TrialRecord]:
    return [TrialRecord("t0", {KEYS[0]: 0.0, KEYS[1]: 3.0}, {"proxy": 0.40, "eval_accuracy": 0.3}, 1, 4, "stopped early"),
            TrialRecord("t1", {KEYS[0]: 8.0, KEYS[1]: 3.0}, {"proxy": 0.90, "eval_accuracy": 0.8}, 4, 4, "finished"),
            TrialRecord("t2", {KEYS[0]: 8.0, KEYS[1]: 50.0}, {}, 0, 4, "error", "ValueError: bad"),
            TrialRecord("t3", {KEYS[0]: 0.0, KEYS[1]: 50.0}, {"proxy": 0.55}, 4, 4, "finished")]


def test_tables_rank_by_the_metric(tmp_path):
    assert [r.trial for r in ranked(records(), "proxy")] == ["t1", "t3", "t0", "t2"]
    files = write_tables(records(), KEYS, "proxy", tmp_path)
    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["trial"] for r in rows] == ["t1", "t3", "t0", "t2"]
    assert rows[0]["metric (proxy)"] == "0.9000" and rows[0]["eval_accuracy"] == "0.8000" and rows[0]["epochs"] == "4/4"
    assert rows[2]["stopped early"] == "yes" and rows[3]["status"] == "error: ValueError: bad"
    md = files["markdown"].read_text().splitlines()
    assert md[0].startswith("| rank | trial | transfer.steered.control_strength |") and len(md) == 6
    assert plot_metric(records(), KEYS, "proxy", tmp_path / "metric.png").stat().st_size > 1000


def test_best_config_is_a_job_that_loads(sweep_config, tmp_path):
    best = trial_config(sweep_config, records()[1].params, tmp_path / "best").model_copy(update={"name": "sweep-best"})
    path = write_best_config(best, tmp_path / "best.yaml", "sweep")
    assert path.read_text().startswith(f"# python jobs/amalgamate.py --config {path}\n")
    cfg = load_config(path)
    assert cfg == best


def test_lines():
    assert progress_line(records()[:3], 5) == "tune: 1 finished, 1 stopped early, 1 errors, 0 running, 2 waiting of 5 trials"
    line = final_line("sweep", records()[1], "proxy", "/x/best.yaml", 12.3, 4)
    assert "best t1 (transfer.steered.control_strength=8, amalgamation.kd_confidence_power=3) proxy 0.9000" in line
    assert line.endswith("python jobs/amalgamate.py --config /x/best.yaml")
    assert abs(rank_correlation([1, 2, 3, 4], [10, 20, 40, 30]) - 0.8) < 1e-9


def test_a_trial_that_failed_before_tune_recorded_it_is_a_row_with_its_error(sweep_config):
    """A trial that died before its first report has no configuration in Tune's results: the sweep
    still writes its row (status error, no scores) instead of failing on it."""
    from dfkd_ray.orchestration.tune import trial_record

    record = trial_record(sweep_config, "run_trial_3", None, None, error="RpcError: GCS timed out")
    assert record.status == "error" and record.error.startswith("RpcError") and not record.scores
    assert set(record.params) == set(sweep_config.tune.search_space)
