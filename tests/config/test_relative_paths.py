"""Where relative config paths point: the current directory, except in Ray's temporary copy of a
submitted working directory (``ray job submit --working-dir .``), where they are under
``$DFKD_RAY_HOME`` (default ``~/dfkd-ray``). No Ray here: the copy is a directory named like Ray's."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfkd_ray.config import ConfigError, read_config
from dfkd_ray.preflight import parse_job_args
from dfkd_ray.preflight import check_config, in_ray_working_dir_copy, relative_path_base

SMOKE = Path(__file__).parents[2] / "jobs" / "configs" / "smoke.yaml"

RAY_COPY = "ray/session_2026-01-01_00-00-00_000000_1/runtime_resources/working_dir_files/_ray_pkg_5f2a9c"
"""Where Ray 2.60 unpacks a submitted working directory, below its temp dir."""


@pytest.fixture
def in_ray_copy(tmp_path, monkeypatch) -> Path:
    """The current directory is a Ray job's copy of the working directory; returns the copy."""
    copy = tmp_path / RAY_COPY
    (copy / "jobs").mkdir(parents=True)
    monkeypatch.chdir(copy)
    return copy


@pytest.mark.parametrize("path, inside", [
    (f"/tmp/{RAY_COPY}", True),
    (f"/tmp/{RAY_COPY}/jobs", True),
    ("/opt/dfkd-ray", False),
    ("/tmp/ray/session_1/runtime_resources/working_dir_files", False),
    ("/data/_ray_pkg_5f2a9c", False),
    ("/data/working_dir_files/runs", False),
])
def test_ray_working_dir_copy_is_recognised_by_its_path(path, inside):
    assert in_ray_working_dir_copy(path) is inside


def test_outside_a_ray_copy_relative_paths_are_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DFKD_RAY_HOME", str(tmp_path / "elsewhere"))
    assert relative_path_base() == tmp_path


def test_submitted_smoke_job_writes_and_finds_its_demo_under_dfkd_ray_home(in_ray_copy, synthetic_task, tmp_path,
                                                                            monkeypatch):
    """The smoke preset as submitted by the README: every relative path (output.dir, demo, the demo's
    models and files) lands under DFKD_RAY_HOME, where a later submission finds the built demo; nothing
    is written into Ray's copy."""
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    (home / ".cache" / "demo").symlink_to(synthetic_task.root)  # built by an earlier submission
    monkeypatch.setenv("DFKD_RAY_HOME", str(home))
    cfg = check_config(read_config(SMOKE))
    assert cfg.output.dir == home / "runs" / "smoke"
    assert cfg.demo == home / ".cache" / "demo"
    assert cfg.teachers[0].path == home / ".cache" / "demo" / "teacher_alpha"
    assert cfg.transfer.steered.lm_path == home / ".cache" / "demo" / "lm" and cfg.eval.path.is_file()
    assert sorted(p.name for p in in_ray_copy.iterdir()) == ["jobs"]
    out = tmp_path / "results"
    assert check_config(read_config(SMOKE, [f"output.dir={out}"])).output.dir == out  # absolute: as given


def test_dfkd_ray_home_defaults_to_dfkd_ray_in_the_home_directory(in_ray_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("DFKD_RAY_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert relative_path_base() == tmp_path / "me" / "dfkd-ray"


def test_relative_dfkd_ray_home_is_refused(in_ray_copy, job_dict, monkeypatch):
    monkeypatch.setenv("DFKD_RAY_HOME", "results")
    with pytest.raises(ConfigError) as err:
        check_config(job_dict)
    assert "must be an absolute path, got 'results'" in dict(err.value.problems)["DFKD_RAY_HOME"]


def test_submitted_job_says_where_relative_paths_point(in_ray_copy, job_dict, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv("DFKD_RAY_HOME", str(tmp_path / "home"))
    (in_ray_copy / "jobs" / "job.yaml").write_text(yaml.safe_dump(job_dict))
    cfg = parse_job_args("test", ["--config", "jobs/job.yaml", "output.dir=runs/job"])
    assert cfg.output.dir == tmp_path / "home" / "runs" / "job"
    assert f"relative paths in the config are under {tmp_path / 'home'} ($DFKD_RAY_HOME)" in capsys.readouterr().out
