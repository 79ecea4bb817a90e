"""Config validation and the preflight: every problem reported at once, each naming its field and the fix.

``check_config`` is what a job script runs (schema + preflight); ``load_config`` / ``validate_config``
check the schema only and touch nothing on disk."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from dfkd_ray.config import ConfigError, apply_overrides, load_config, validate_config
from dfkd_ray.preflight import JOB_MARKER, check_config, claim_output_dir, parse_job_args, preflight

CONFIGS = sorted((Path(__file__).parents[2] / "jobs" / "configs").glob("*.yaml"))


def _edit(d: dict, dotted: str, value):
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value


class _Delete:
    """Marks a key to remove; a fixed repr keeps the test ids equal across processes (pytest-xdist)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Delete()


def _teacher_dir(tmp_path: Path, id2label, name="t") -> str:
    d = tmp_path / name
    d.mkdir()
    cfg = {"model_type": "bert"}
    if id2label is not None:
        cfg["id2label"] = id2label
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text("{}")
    return str(d)


# (edit to a valid config, the exact dotted field path the problem is reported under, words in its message)
BAD = [
    ("transfer.smaples_per_class", 5, "transfer.smaples_per_class", "did you mean 'samples_per_class'"),
    ("tranfser", {}, "tranfser", "did you mean 'transfer'"),
    ("transfer.samples_per_class", 0, "transfer.samples_per_class", "greater than or equal to 1"),
    ("transfer.samples_per_class", "many", "transfer.samples_per_class", "valid integer"),
    ("transfer.min_confidence", 1.5, "transfer.min_confidence", "less than or equal to 1"),
    ("transfer.source", "gan", "transfer.source", "'random_words'"),
    ("transfer.embedding_guessing.sigma", 0, "transfer.embedding_guessing.sigma", "greater than 0"),
    ("transfer.embedding_guessing", {"length": 16, "min_length": 20}, "transfer.embedding_guessing.min_length",
     "min_length (20) must be <= length (16)"),
    ("transfer.corpus.path", "/nonexistent/corpus.txt", "transfer.corpus.path", "does not exist"),
    ("transfer.corpus.path", _DELETE, "transfer.corpus.path", "source 'corpus' needs transfer.corpus.path"),
    ("transfer.source", "steered", "transfer.steered.lm_path", "needs transfer.steered.lm_path"),
    ("transfer.steered", {"top_m": 10, "top_k": 20}, "transfer.steered.top_k", "top_k (20) must be <= top_m (10)"),
    ("transfer.steered", {"max_new_tokens": 4}, "transfer.steered.min_new_tokens", "must be <= max_new_tokens (4)"),
    ("transfer.random_words", {"min_words": 9, "max_words": 3}, "transfer.random_words.max_words", "min_words (9)"),
    ("transfer.class_weights", {"sports": -1.0}, "transfer.class_weights", "must be >= 0"),
    ("teachers.0.path", "/nonexistent/teacher", "teachers[0].path", "does not exist"),
    ("teachers.1.name", "alpha", "teachers[1].name", "unique"),
    ("teachers.0.name", "has space", "teachers[0].name", "pattern"),
    ("teachers.0.max_length", 4, "teachers[0].max_length", "greater than or equal to 8"),
    ("teachers", [], "teachers", "at least 1"),
    ("name", _DELETE, "name", "required field is missing"),
    ("output", _DELETE, "output", "required field is missing"),
    ("amalgamation.confidence", "entropy", "amalgamation.confidence", "'rmd'"),
    ("amalgamation.amalg_dim", 102, "amalgamation.amalg_heads", "divisible by amalg_heads"),
    ("amalgamation", {"method": "vanilla", "center_block_loss": False, "center_block_loss_within": "confident_teacher"},
     "amalgamation.center_block_loss_within", "center_block_loss is false"),
    ("amalgamation", {"method": "vanilla", "alpha": 0, "beta": 0}, "amalgamation.beta", "nothing would be learned"),
    ("amalgamation.temperature", 0, "amalgamation.temperature", "greater than 0"),
    ("amalgamation.calibration_folds", 1, "amalgamation.calibration_folds", "nothing to fit on"),
    ("amalgamation.kd_confidence_power", -1, "amalgamation.kd_confidence_power", "greater than or equal to 0"),
    ("amalgamation.rmd_background", "corpus", "amalgamation.rmd_background", "'all_teachers' or 'own'"),
    ("amalgamation.confidence_quantile", 1.0, "amalgamation.confidence_quantile", "less than 1"),
    ("amalgamation.confidence_center", "median", "amalgamation.confidence_center", "'quantile' or 'moments'"),
    ("amalgamation.confidence_center_sd", 0, "amalgamation.confidence_center_sd", "greater than 0"),
    ("amalgamation.calibration_repeats", 0, "amalgamation.calibration_repeats", "greater than or equal to 1"),
    ("student.num_layers", 2, "student.num_layers", "either layers or num_layers"),
    ("train.warmup_epochs", 20, "train.warmup_epochs", "warmup_epochs (20.0) must be <= epochs"),
    ("student.layers", [1, 1], "student.layers", "distinct"),
    ("train.learning_rate", -1, "train.learning_rate", "greater than 0"),
    ("eval.path", "/nonexistent/eval.csv", "eval.path", "does not exist"),
    ("tune.search_space", {"transfer.steered.strength": {"values": [1, 2]}}, "tune.search_space.transfer.steered.strength",
     "is not a config field"),
    ("tune.search_space", {"transfer.seed": {"low": 2, "high": 1}}, "tune.search_space.transfer.seed", "low (2.0) must be < high"),
    ("transfer.class_weights", {"sprots": 2.0}, "transfer.class_weights", "labels no teacher has: ['sprots']"),
    ("ray.gpus_per_generation_actor", -1, "ray.gpus_per_generation_actor", "greater than or equal to 0"),
]


@pytest.mark.parametrize("dotted,value,field,words", BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD])
def test_bad_config_names_field(job_dict, dotted, value, field, words):
    d = copy.deepcopy(job_dict)
    if dotted == "student.num_layers":
        d["student"]["layers"] = [0, 1]
    _edit(d, dotted, value)
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert field in problems, f"{field!r} not among {problems}"  # the exact dotted path, not its section
    assert words in problems[field], problems[field]
    assert f"  - {field}: " in str(err.value)
    assert len(problems) == 1, problems


def test_teacher_dir_problems(job_dict, tmp_path):
    """No id2label, placeholder labels, labels clashing after normalisation, no config.json."""
    d = copy.deepcopy(job_dict)
    d["teachers"] = [
        {"name": "a", "path": _teacher_dir(tmp_path, None, "a")},
        {"name": "b", "path": _teacher_dir(tmp_path, {"0": "LABEL_0", "1": "LABEL_1"}, "b")},
        {"name": "c", "path": _teacher_dir(tmp_path, {"0": "Sci/Tech", "1": "sci/tech "}, "c")},
        {"name": "d", "path": str(tmp_path)},  # a directory, but no config.json
    ]
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert "no id2label" in problems["teachers[0].path"]
    assert "placeholder" in problems["teachers[1].path"]
    assert "same label after normalisation" in problems["teachers[2].path"]
    assert "no config.json" in problems["teachers[3].path"]


def test_all_problems_reported_at_once(job_dict):
    d = copy.deepcopy(job_dict)
    d["transfer"]["samples_per_class"] = -3
    d["train"] = {"epochs": "ten"}
    d["amalgamation"] = {"fusoin": "st"}
    d["teachers"][0]["path"] = "/nope"
    with pytest.raises(ConfigError) as err:
        check_config(d)
    fields = {p for p, _ in err.value.problems}
    assert {"transfer.samples_per_class", "train.epochs", "amalgamation.fusoin", "teachers[0].path"} <= fields
    assert "did you mean 'fusion'" in dict(err.value.problems)["amalgamation.fusoin"]


def test_field_and_cross_field_problems_reported_together(job_dict):
    """A typo (field error) does not hide checks across sections: a foreign output.dir, a class
    weight naming no teacher's label and a bad search-space key all come in one report."""
    (Path(job_dict["output"]["dir"])).mkdir(parents=True)
    (Path(job_dict["output"]["dir"]) / JOB_MARKER).write_text(json.dumps({"name": "someone-else"}))
    d = copy.deepcopy(job_dict)
    d["transfer"]["smaples_per_class"] = 5
    d["transfer"]["class_weights"] = {"sprots": 2.0}
    d["train"] = {"epochs": 1, "warmup_epochs": 3}
    d["tune"] = {"search_space": {"train.lr": {"values": [1e-5]}}}
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert "did you mean 'samples_per_class'" in problems["transfer.smaples_per_class"]
    assert "holds the results of job 'someone-else'" in problems["output.dir"]
    assert "labels no teacher has: ['sprots']" in problems["transfer.class_weights"]
    assert "must be <= epochs" in problems["train.warmup_epochs"]
    assert "not a config field" in problems["tune.search_space.train.lr"]
    assert len(err.value.problems) == 5, err.value.problems


def test_output_dir_of_another_job_is_refused(job_dict):
    cfg = check_config(job_dict)
    claim_output_dir(cfg)
    other = copy.deepcopy(job_dict)
    other["name"] = "another-job"
    with pytest.raises(ConfigError) as err:
        check_config(other)
    assert "holds the results of job 'test-job'" in dict(err.value.problems)["output.dir"]
    with pytest.raises(ConfigError, match="holds the results of job 'test-job'"):
        claim_output_dir(validate_config(other))
    # the same job may come back to its directory (resume)
    assert check_config(job_dict).name == "test-job"
    assert json.loads((cfg.output.dir / JOB_MARKER).read_text())["name"] == "test-job"


def test_valid_config_is_frozen_and_typed(job_dict):
    cfg = validate_config(job_dict)
    assert isinstance(cfg.teachers[0].path, Path)
    assert cfg.transfer.steered.top_p == 0.9 and cfg.amalgamation.temperature == 0.75
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen


def test_overrides(job_dict, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    cfg = load_config(path, ["transfer.samples_per_class=17", "teachers.1.max_length=64",
                             "transfer.class_weights={sports: 2.0}", "amalgamation.fusion=mul"])
    assert cfg.transfer.samples_per_class == 17
    assert cfg.teachers[1].max_length == 64
    assert cfg.transfer.class_weights == {"sports": 2.0}
    assert cfg.amalgamation.fusion == "mul"
    with pytest.raises(ConfigError, match="no list element 5"):
        apply_overrides(job_dict, ["teachers.5.path=x"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(job_dict, ["transfer.samples_per_class"])
    with pytest.raises(ConfigError) as err:
        load_config(path, ["transfer.sample_per_class=3"])
    assert "did you mean 'samples_per_class'" in str(err.value)


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_job_yaml_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("python" in first or "ray job submit" in first), \
        f"{path.name} must start with the command that runs it"
    cfg = load_config(path)
    assert cfg.name


def test_there_are_job_yamls():
    assert len(CONFIGS) >= 2


def test_streaming_without_heldout_rows_reported_with_other_problems(job_dict):
    """train.stream_from_generation with stratanet needs held-out rows: reported at its dotted path,
    naming the field to change, together with unrelated field errors."""
    d = copy.deepcopy(job_dict)
    d["amalgamation"] = {"method": "stratanet"}
    d["transfer"]["heldout_fraction"] = 0
    d["train"] = {"stream_from_generation": True}
    d["eval"] = {"bach_size": 8}
    with pytest.raises(ConfigError) as err:
        validate_config(d)
    problems = dict(err.value.problems)
    assert set(problems) == {"train.stream_from_generation", "eval.bach_size"}, problems
    assert "set transfer.heldout_fraction > 0" in problems["train.stream_from_generation"]
    assert "amalgamation.method: vanilla" in problems["train.stream_from_generation"]
    d["amalgamation"] = {"method": "vanilla"}
    del d["eval"]["bach_size"]
    assert validate_config(d).train.stream_from_generation


def test_loading_has_no_side_effects(job_dict, tmp_path):
    """load_config reads the YAML only: no demo task is built, nothing is created or checked on disk."""
    d = copy.deepcopy(job_dict)
    d["demo"] = str(tmp_path / "demo")
    d["teachers"][0]["path"] = str(tmp_path / "no-such-teacher")
    d["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    cfg = load_config(path)
    assert cfg.demo == tmp_path / "demo" and cfg.teachers[0].labels is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_teacher_folder_without_tokenizer_files_is_refused(job_dict, synthetic_task, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((synthetic_task.teachers["alpha"] / "config.json").read_text())
    d = copy.deepcopy(job_dict)
    d["teachers"][0]["path"] = str(bare)
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    problems = dict(err.value.problems)
    assert list(problems) == ["teachers[0].path"], problems
    assert "no tokenizer files" in problems["teachers[0].path"]


def test_path_problems_say_what_is_there(job_dict, synthetic_task, tmp_path):
    """A file where a folder belongs and a folder where a file belongs are named as such, all at once."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x\n")
    d = copy.deepcopy(job_dict)
    d["teachers"][0]["path"] = str(a_file)
    d["transfer"]["corpus"]["path"] = str(tmp_path)
    d["eval"]["path"] = str(tmp_path)
    d["output"]["dir"] = str(a_file)
    with pytest.raises(ConfigError) as err:
        check_config(d)
    problems = dict(err.value.problems)
    assert set(problems) == {"teachers[0].path", "transfer.corpus.path", "eval.path", "output.dir"}, problems
    assert "is a file, not a model directory" in problems["teachers[0].path"]
    assert "is a folder, not a file" in problems["transfer.corpus.path"]
    assert "is a folder, not a file" in problems["eval.path"]
    assert f"{str(a_file)!r} is a file" in problems["output.dir"]
    d["output"]["dir"] = str(a_file / "out")  # below a file: cannot be made
    with pytest.raises(ConfigError) as err:
        check_config(d)
    assert "cannot be made" in dict(err.value.problems)["output.dir"]


def test_preflight_fills_labels_once_and_makes_paths_absolute(job_dict, synthetic_task, monkeypatch, tmp_path):
    import dfkd_ray.labels
    import dfkd_ray.preflight

    reads = []
    real = dfkd_ray.labels.read_teacher_labels

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(dfkd_ray.preflight, "read_teacher_labels", counting)
    monkeypatch.setattr(dfkd_ray.labels, "read_teacher_labels", counting)
    monkeypatch.chdir(tmp_path)
    d = copy.deepcopy(job_dict)
    d["output"]["dir"] = "relative/out"
    raw = validate_config(d)
    assert raw.output.dir == Path("relative/out")
    cfg = preflight(raw)
    assert len(reads) == 2  # once per teacher
    assert cfg.teacher_labels() == {"alpha": ["sports", "cooking"], "beta": ["space", "finance"]}
    assert [t.labels for t in cfg.teachers] == [["sports", "cooking"], ["space", "finance"]]
    assert len(reads) == 2  # filled: not read again
    assert cfg.output.dir == tmp_path / "relative" / "out" and cfg.teachers[0].path.is_absolute()
    assert not (tmp_path / "relative").exists()  # the preflight checks output.dir, it does not make it
    # without the preflight, the labels are read from config.json (library use)
    assert raw.teacher_labels() == cfg.teacher_labels() and len(reads) == 4

    d["teachers"][0]["labels"] = ["sports", "cooking"]
    assert preflight(validate_config(d)).teachers[0].labels == ["sports", "cooking"]
    d["teachers"][0]["labels"] = ["cooking", "sports"]
    with pytest.raises(ConfigError) as err:
        preflight(validate_config(d))
    assert "differ from id2label" in dict(err.value.problems)["teachers[0].labels"]


def test_eval_file_columns_and_labels_are_checked_before_ray(job_dict, tmp_path):
    d = copy.deepcopy(job_dict)
    d["eval"]["text_column"] = "body"
    with pytest.raises(ConfigError) as err:
        check_config(d)
    assert "no column 'body' (eval.text_column)" in dict(err.value.problems)["eval.path"]
    unknown = tmp_path / "eval.csv"
    unknown.write_text("text,label\nit rained all day,weather\n")
    d = copy.deepcopy(job_dict)
    d["eval"]["path"] = str(unknown)
    with pytest.raises(ConfigError) as err:
        check_config(d)
    assert "weather" in dict(err.value.problems)["eval.path"]


def test_vllm_engine_is_checked_where_the_job_starts_unless_submitted(job_dict, synthetic_task, monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find(name, *a))
    d = copy.deepcopy(job_dict)
    d["transfer"]["steered"] = {"engine": "vllm", "lm_path": str(synthetic_task.lm)}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="not installed"):
        check_config(d)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # `ray job submit`: the generation actors check there
    assert check_config(d).transfer.steered.engine == "vllm"


def test_job_args_print_every_problem_and_exit_2(job_dict, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    with pytest.raises(SystemExit) as exit_:
        parse_job_args("test", ["--config", str(path), "teachers.0.path=/nonexistent/teacher",
                                "transfer.smaples_per_class=3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "teachers[0].path" in err and "transfer.smaples_per_class" in err
    assert parse_job_args("test", ["--config", str(path)]).teachers[0].labels == ["sports", "cooking"]
