"""Prompt tuning of DFKD-T3 on Ray: one task per teacher, before the ``prompt_tuned`` transfer set is made.

Each task loads the LM and its teacher (on a GPU when ``ray.use_gpu``), tunes that teacher's soft
prompts (:func:`~dfkd_ray.generation.prompt_tuning.tune_teacher`) and writes them whole to
``output.dir/prompts/<teacher>.safetensors`` (temporary name, then rename), with the description
that made them. When every teacher is done the driver writes the stage record
(``prompts/stage.json``, :mod:`dfkd_ray.stages`).

Resume: a rerun skips the stage when its record matches; after a kill it keeps every teacher whose
file was written for this config and tunes the rest. A file or record made with another
configuration is refused with the changed fields listed, like any finished stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from dfkd_ray.config import JobConfig
from dfkd_ray.generation.prompt_tuning import (finished_prompt, prompts_description, prompts_dir, tune_teacher,
                                               tuned_line)
from dfkd_ray.orchestration.runtime import worker_device
from dfkd_ray.stages import mark_done, stage_done


def _tune_task(cfg: JobConfig, teacher: str, use_gpu: bool, progress_every: int) -> dict:
    return tune_teacher(cfg, teacher, device=worker_device(use_gpu), progress_every=progress_every)


def prompts_complete(cfg: JobConfig) -> bool:
    """Whether every teacher's prompts are tuned for this config (raises StageMismatch for another config's)."""
    cfg = cfg.absolute()
    return stage_done(prompts_dir(cfg), prompts_description(cfg), stage="prompts")


def run_prompt_tuning(cfg: JobConfig, *, progress: bool = True) -> Path:
    """Tune (or finish tuning) the prompts of every teacher of ``cfg`` on the current Ray cluster; returns
    their directory."""
    cfg = cfg.absolute()
    directory = prompts_dir(cfg)
    description = prompts_description(cfg)
    if stage_done(directory, description, stage="prompts"):
        print(f"prompts already tuned: {directory}")
        return directory
    summaries = {t.name: s for t in cfg.teachers if (s := finished_prompt(cfg, t.name)) is not None}
    todo = [t.name for t in cfg.teachers if t.name not in summaries]
    if summaries:
        print(f"prompt tuning: resuming, the prompts of {len(summaries)} of {len(cfg.teachers)} teachers are kept "
              f"from an earlier run ({', '.join(summaries)}), {len(todo)} to tune")
    every = max(1, cfg.transfer.prompt_tuned.tuning_steps // 4) if progress else 0
    gpu = 1 if cfg.ray.use_gpu else 0
    task = ray.remote(num_cpus=cfg.ray.cpus_per_train_worker, num_gpus=gpu)(_tune_task)
    start = time.perf_counter()
    refs = {task.remote(cfg, name, bool(gpu), every): name for name in todo}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            name = refs[ref]
            summaries[name] = ray.get(ref)
            print(tuned_line(cfg, name, summaries[name]), flush=True)
    mark_done(directory, description, teachers=summaries)
    print(f"prompt tuning: {len(todo)} teacher(s) tuned in {time.perf_counter() - start:.1f} s -> {directory}")
    return directory
