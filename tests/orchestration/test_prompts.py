"""Prompt tuning as a stage: killed mid-way it keeps the finished teachers' prompts; on Ray, one task per
teacher, then the prompt_tuned set through the generation actors."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _job(job_dict, synthetic_task, out: Path, **prompt_tuned) -> dict:
    d = copy.deepcopy(job_dict)
    d["transfer"] = {"source": "prompt_tuned", "samples_per_class": 2, "shard_size": 4,
                     "corpus": {"path": str(synthetic_task.corpus)},
                     "prompt_tuned": {"lm_path": str(synthetic_task.lm), "tuning_batch_size": 2, "max_new_tokens": 4,
                                      "max_source_tokens": 6, "num_soft_tokens": 2, **prompt_tuned}}
    d["output"] = {"dir": str(out)}
    d["ray"] = {"num_generation_actors": 1}
    return d


TUNE = ("import json, sys\n"
        "from dfkd_ray.config import validate_config\n"
        "from dfkd_ray.generation.prompt_tuning import write_prompts\n"
        "write_prompts(validate_config(json.loads(sys.argv[1])))\n")


@pytest.mark.usefixtures("seeded_single_thread")
def test_killed_while_tuning_the_second_teacher_a_rerun_keeps_the_first(job_dict, synthetic_task, tmp_path,
                                                                           monkeypatch):
    """SIGKILL the tuning process once teacher alpha's prompts are written (beta's are being tuned); the rerun
    tunes beta only and leaves alpha's file as it was."""
    import dfkd_ray.generation.prompt_tuning as prompt_tuning
    from dfkd_ray.config import validate_config
    from dfkd_ray.stages import read_record

    d = _job(job_dict, synthetic_task, tmp_path / "out", tuning_steps=60)
    prompts = tmp_path / "out" / "prompts"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", TUNE, json.dumps(d)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (prompts / "alpha.safetensors").is_file():
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in prompts.iterdir()) == ["alpha.safetensors"]  # no record, no half-written beta
    alpha = (prompts / "alpha.safetensors").read_bytes(), (prompts / "alpha.safetensors").stat().st_mtime_ns

    tuned = []
    real = prompt_tuning.tune_prompts
    monkeypatch.setattr(prompt_tuning, "tune_prompts", lambda gen, teacher, *a, **k: tuned.append(teacher.name)
                        or real(gen, teacher, *a, **k))
    prompt_tuning.write_prompts(validate_config(d))
    assert tuned == ["beta"]
    assert ((prompts / "alpha.safetensors").read_bytes(), (prompts / "alpha.safetensors").stat().st_mtime_ns) == alpha
    assert set(read_record(prompts)["teachers"]) == {"alpha", "beta"}


@pytest.mark.ray
@pytest.mark.slow
def test_prompt_tuning_tasks_then_generation_actors_on_ray(job_dict, synthetic_task, tmp_path, ray_local, capsys):
    """run_generate with transfer.source prompt_tuned: the prompts are tuned in Ray tasks, the set is written by
    the generation actors; a rerun after losing one teacher's file retunes that teacher only, and a changed
    tuning setting is refused."""
    from dfkd_ray.config import validate_config
    from dfkd_ray.generation.prompt_tuning import read_prompt_file
    from dfkd_ray.orchestration.generate import run_generate
    from dfkd_ray.orchestration.prompts import run_prompt_tuning
    from dfkd_ray.stages import StageMismatch
    from dfkd_ray.transfer.store import read_transfer_table

    cfg = validate_config(_job(job_dict, synthetic_task, tmp_path / "out", tuning_steps=3))
    table = read_transfer_table(run_generate(cfg, progress=False))
    out = capsys.readouterr().out
    assert "prompt tuning: alpha done" in out and "prompt tuning: beta done" in out, out
    assert table.num_rows == 8 and set(table.column("source").to_pylist()) == {"prompt_tuned"}

    prompts = tmp_path / "out" / "prompts"
    alpha_mtime = (prompts / "alpha.safetensors").stat().st_mtime_ns
    beta = read_prompt_file(prompts / "beta.safetensors")[0]
    (prompts / "stage.json").unlink()
    (prompts / "beta.safetensors").unlink()
    run_prompt_tuning(cfg, progress=False)
    out = capsys.readouterr().out
    assert "the prompts of 1 of 2 teachers are kept" in out and "prompt tuning: beta done" in out, out
    assert "alpha done" not in out and (prompts / "alpha.safetensors").stat().st_mtime_ns == alpha_mtime
    assert read_prompt_file(prompts / "beta.safetensors")[0].equal(beta)  # the same seed tunes the same prompts

    with pytest.raises(StageMismatch, match="tuning_steps: 3 -> 4"):
        run_prompt_tuning(validate_config(_job(job_dict, synthetic_task, tmp_path / "out", tuning_steps=4)))
