"""The benchmark specs (``benchmarks/specs/*.yaml``) against their schema, and the messages of bad specs.

No data is read: a spec is checked on its own (label names, teachers' classes, files, rows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the harness is imported as the benchmark scripts import it

from harness.rows import ROWS  # noqa: E402
from harness.spec import SpecError, label_names, load_spec, parse_spec  # noqa: E402

SPECS = sorted((BENCHMARKS / "specs").glob("*.yaml"))


def good() -> dict:
    """A valid spec, as parsed YAML."""
    return {"name": "toy", "labels": {"names": ["a", "b", "c"], "first_id": 1},
            "train": [{"path": "train.csv.xz"}], "test": [{"path": "test.tsv", "text_columns": ["content"]}],
            "dev": [{"path": "train.csv.xz"}],
            "teachers": {"ab": {"classes": ["a", "b"]}, "c": {"classes": ["c"], "num_layers": 2}},
            "student": {"num_layers": 3}, "rows": ["vanilla_random", "stratanet"], "samples_per_class": 10}


def problems(data: dict) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(data, "toy.yaml")
    return str(e.value)


def test_the_four_benchmarks_have_specs():
    assert {p.stem for p in SPECS} >= {"agnews", "agnews_unbalanced", "dbpedia3", "sst2"}


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_files_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert path.read_text().startswith("# python benchmarks/amalgamation.py --spec benchmarks/specs/" + path.name)
    names = spec.labels.names
    assert sorted(c for t in spec.teachers.values() for c in t.classes) == sorted(names)  # disjoint, complete


def test_agnews_spec_is_the_original_setting():
    spec = load_spec(BENCHMARKS / "specs" / "agnews.yaml")
    assert spec.labels.names == ["World", "Sports", "Business", "Sci/Tech"]
    assert {n: t.classes for n, t in spec.teachers.items()} == {
        "world_sports": ["World", "Sports"], "business_scitech": ["Business", "Sci/Tech"]}
    assert spec.rows == list(ROWS) and spec.samples_per_class == 1250 and spec.student.num_layers == 3


def test_a_good_spec_parses():
    spec = parse_spec(good(), "toy.yaml")
    assert spec.teachers["c"].num_layers == 2 and spec.join == " " and spec.text_columns == ["text"]


@pytest.mark.parametrize("change, where, says", [
    (lambda d: d["teachers"]["ab"]["classes"].__setitem__(1, "B"), "teachers.ab.classes[1]", "did you mean 'b'"),
    (lambda d: d["teachers"].pop("c"), "teachers", "no teacher knows ['c']"),
    (lambda d: d["teachers"]["ab"].update(depth=3), "teachers.ab.depth", "valid here: classes, layers, num_layers"),
    (lambda d: d.update(row=["stratanet"]), "row", "did you mean 'rows'"),
    (lambda d: d["rows"].append("stratanet_typo"), "rows", "unknown row(s) ['stratanet_typo']"),
    (lambda d: d["test"][0].update(path="test.json"), "test[0].path", "neither .csv nor .tsv"),
    (lambda d: d["train"][0].update(path="../train.csv"), "train[0].path", "relative to --data"),
    (lambda d: d["labels"].update(names_file="classes.txt"), "labels", "either names"),
    (lambda d: d.pop("samples_per_class"), "samples_per_class", "required"),
    (lambda d: d["student"].update(layers=[0, 1]), "student.num_layers", "not both"),
    (lambda d: d["teachers"].update({"bad name": {"classes": ["c"]}}), "teachers.bad name", "not a valid teacher name"),
])
def test_a_bad_spec_names_the_field_and_the_fix(change, where, says):
    data = good()
    change(data)
    message = problems(data)
    assert f"- {where}: " in message and says in message, message
    assert message.startswith(("1 problem(s) in benchmark spec toy.yaml", "2 problem(s) in benchmark spec toy.yaml"))


def test_every_problem_is_reported_at_once():
    data = good()
    data["samples_per_class"] = 0
    data["test"] = []
    assert problems(data).startswith("2 problem(s)")


def test_a_missing_or_unreadable_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_label_names_from_a_file_are_checked_against_the_teachers(tmp_path):
    data = good()
    data["labels"] = {"names_file": "classes.txt", "first_id": 1}
    spec = parse_spec(data, "toy.yaml")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert label_names(spec, tmp_path) == ["a", "b", "c"]
    (tmp_path / "classes.txt").write_text("a\nb\nd\n")
    with pytest.raises(SpecError, match=r"teachers.c.classes\[0\]: 'c' is not a label name"):
        label_names(spec, tmp_path)

