"""``benchmarks/tune_proxy.py --report``: configurations scored by separate processes ranked as one
table (Spearman over all of them, each ranking's pick and its gap to the best)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import tune_proxy  # noqa: E402


def part(tmp_path: Path, name: str, configs: dict[str, tuple[float, float, float]]) -> Path:
    """A process's output: configuration -> (proxy, dev accuracy, test accuracy)."""
    path = tmp_path / name
    path.write_text(json.dumps({"command": name, "device": "cpu", "date": "2026-01-01", "configs": {
        c: {"fields": {}, "proxy": p, "proxy_soft": p, "dev_accuracy": d, "test_accuracy": t}
        for c, (p, d, t) in configs.items()}}))
    return path


def test_parts_are_ranked_together(tmp_path):
    a = part(tmp_path, "a.json", {"good": (0.9, 0.80, 0.82), "bad": (0.1, 0.50, 0.40)})
    b = part(tmp_path, "b.json", {"middle": (0.5, 0.81, 0.70), "best": (0.8, 0.79, 0.84)})
    out = tmp_path / "merged.json"
    assert tune_proxy.main(["--report", str(a), str(b), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert set(merged["configs"]) == {"good", "bad", "middle", "best"} and len(merged["parts"]) == 2
    proxy = merged["summary"]["proxy"]
    # proxy ranks good > best > middle > bad; test ranks best > good > middle > bad: rho = 1 - 6*2/(4*15) = 0.8
    assert proxy["spearman"] == pytest.approx(0.8) and proxy["pick"] == "good"
    assert proxy["gap_points"] == pytest.approx(2.0)
    assert merged["summary"]["dev_accuracy"]["pick"] == "middle"


def test_a_configuration_in_two_parts_is_refused(tmp_path):
    a = part(tmp_path, "a.json", {"x": (0.1, 0.5, 0.5), "y": (0.2, 0.5, 0.6)})
    b = part(tmp_path, "b.json", {"x": (0.3, 0.5, 0.5)})
    with pytest.raises(SystemExit, match=r"\['x'\] appear in more than one file"):
        tune_proxy.main(["--report", str(a), str(b), "--out", str(tmp_path / "m.json")])


def test_probe_scores_per_set_weighted_and_pooled():
    """Each probe set's proxies, the confidence-weighted one and their mean over the sets, by hand."""
    import pyarrow as pa
    import torch

    # set a: 4 texts of labels 0, 0, 1, 1; the student is right on texts 0 and 2
    a = pa.table({"label": [0, 0, 1, 1], "confidence": [1.0, 0.5, 0.8, 0.2]})
    probs_a = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    # set b: 2 texts, both right
    b = pa.table({"label": [0, 1], "confidence": [0.5, 0.5]})
    probs_b = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    scores = tune_proxy.probe_scores({"a": probs_a, "b": probs_b}, {"a": a, "b": b})
    assert scores["proxy@a"] == pytest.approx(0.5) and scores["proxy@b"] == pytest.approx(1.0)
    assert scores["proxy_soft@a"] == pytest.approx(((0.9 + 0.3) / 2 + (0.6 + 0.4) / 2) / 2)
    # weighted by confidence within each label: label 0 -> 1.0 / 1.5, label 1 -> 0.8 / 1.0
    assert scores["proxy_conf@a"] == pytest.approx((1.0 / 1.5 + 0.8 / 1.0) / 2)
    assert scores["proxy@pooled"] == pytest.approx(0.75)
    assert scores["proxy_soft@pooled"] == pytest.approx((scores["proxy_soft@a"] + scores["proxy_soft@b"]) / 2)


def test_a_prompt_tuned_configuration_without_a_corpus_is_refused_before_any_model(tmp_path, capsys):
    common = ["--lm", str(tmp_path), "--base", str(tmp_path), "--agnews", str(tmp_path)]
    with pytest.raises(SystemExit):
        tune_proxy.parse_args([*common, "--configs", "base:;stable1:transfer.source=prompt_tuned"])
    err = capsys.readouterr().err
    assert "configuration stable1" in err and "needs transfer.corpus.path" in err  # --corpus gives it
    with pytest.raises(SystemExit):
        tune_proxy.parse_args([*common, "--configs", "base:", "--train", "base,other"])
    assert "--train: ['other'] are not among the configurations" in capsys.readouterr().err
    settings, configs = tune_proxy.parse_args([*common, "--corpus", str(tmp_path / "c.txt"),
                                               "--configs", "base:;stable1:transfer.source=prompt_tuned"])
    assert set(configs) == {"base", "stable1"}
