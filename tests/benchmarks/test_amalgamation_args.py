"""``benchmarks/amalgamation.py``'s command line: rows and sweep variants checked before any model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import amalgamation  # noqa: E402


def test_rows_none_runs_only_the_sweep_and_bad_variants_are_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a document\n")
    common = ["--spec", str(BENCHMARKS / "specs" / "agnews.yaml"), "--data", str(tmp_path), "--lm", str(tmp_path),
              "--base", str(tmp_path), "--corpus", str(corpus), "--work", str(tmp_path / "work")]
    _, _, rows, _, sweep = amalgamation.parse_args([*common, "--rows", "none", "--sweep",
                                                    "base:;mass90:candidate_mass=0.9"])
    assert rows == [] and sweep == {"base": {}, "mass90": {"candidate_mass": 0.9}}
    _, _, rows, _, _ = amalgamation.parse_args([*common, "--rows", "stratanet,vanilla_steered"])
    assert rows == ["stratanet", "vanilla_steered"]
    with pytest.raises(SystemExit):
        amalgamation.parse_args([*common, "--rows", "none", "--sweep", "bad:candidate_mass=0"])
    assert "--sweep variant 'bad': transfer.steered.candidate_mass" in capsys.readouterr().err
