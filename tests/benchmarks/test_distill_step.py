"""``benchmarks/distill_step.py`` on a CPU (``--tiny``): every (variant, batch) row is measured with the
step it names, and its FLOPs count follows the texts' real tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import distill_step  # noqa: E402


def test_tiny_run_measures_every_variant_and_batch(synthetic_task, tmp_path):
    out = tmp_path / "step.json"
    assert distill_step.main(["--tokenizer", str(synthetic_task.teachers["alpha"]), "--tiny", "--device", "cpu",
                              "--batch-sizes", "2,4", "--steps", "2", "--warmup", "1", "--words", "6",
                              "--variants", "fp32:train.precision=float32;bf16:train.precision=bfloat16",
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("fp32", 2), ("fp32", 4), ("bf16", 2), ("bf16", 4)]
    assert rows[2]["fields"] == {"train.precision": "bfloat16"}
    for r in rows:
        assert r["samples_per_s"] > 0 and 0 < r["mfu"] < 1 and r["syncs_per_step"] is None  # no CUDA here
        assert r["warmup_s"] > 0 and r["step_only_ms"] > 0 and r["cudagraph_skips"] == 0


def test_step_flops_count_real_tokens_only(synthetic_task):
    from transformers import AutoConfig, AutoTokenizer

    path = synthetic_task.teachers["alpha"]
    tok, cfg = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    one = distill_step.step_flops(tok, ["goal"], 32, cfg, cfg)
    padded = distill_step.step_flops(tok, ["goal", "the striker scored a late goal"], 32, cfg, cfg)
    alone = distill_step.step_flops(tok, ["the striker scored a late goal"], 32, cfg, cfg)
    assert padded == pytest.approx(one + alone)  # the short text's padding in a batch adds nothing


def test_a_variant_must_name_field_value_pairs():
    with pytest.raises(SystemExit, match="--variants 'bf16': 'train.precision' is not key=value"):
        distill_step.parse_variants("bf16:train.precision")
