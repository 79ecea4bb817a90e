"""``benchmarks/prompt_words.py``: the LM's chance to continue the prompt's last word, and the rows of a
transfer set that start inside it."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import prompt_words  # noqa: E402


def test_rows_starting_inside_a_word_are_counted_per_label(tmp_path):
    path = tmp_path / "steered.parquet"
    pq.write_table(pa.table({"text": ["week ended March 17", " the match", "ation of the moon", ": a plant", "ipos genus"],
                             "label_name": ["Sports", "Sports", "Plant", "Plant", "Plant"]}), path)
    out = prompt_words.transfer_set_starts(path)
    assert out["Sports"] == {"rows": 2, "inside_word": 0.5, "examples": ["week ended March 17"]}
    assert out["Plant"]["rows"] == 3 and out["Plant"]["inside_word"] == round(2 / 3, 4)


def test_the_first_token_table_sums_the_word_continuations(synthetic_task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(synthetic_task.lm)
    lm = AutoModelForCausalLM.from_pretrained(synthetic_task.lm).eval()
    rows = prompt_words.first_token_table(lm, tokenizer, ["sports", "cooking"], "Category: {label}")
    assert [r["label"] for r in rows] == ["sports", "cooking"]
    assert all(0.0 <= r["p_continue"] <= 1.0 and r["top_token"] for r in rows)
    colon = prompt_words.first_token_table(lm, tokenizer, ["sports"], "Category: {label}:")[0]
    assert colon["p_continue"] != rows[0]["p_continue"]  # the probability follows the prompt's end
