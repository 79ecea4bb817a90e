"""The whole job: transfer set -> confidence statistics -> distillation -> evaluation -> export.

Each stage writes its output under ``output.dir`` with a record of what made it
(:mod:`dfkd_ray.stages`; the transfer set keeps its manifest), so a rerun skips finished stages and
continues an unfinished one (transfer-set shards, the last training checkpoint), and a changed
config is refused rather than mixed with old results. Checks that need no model (the config's
files, the labelled eval file's columns and label names, the output directory) are the job
script's preflight (:mod:`dfkd_ray.preflight`), before Ray starts.

The held-out rows that fit the confidence statistics are generated with the transfer set (their
``heldout`` flag), so statistics are fitted after generation, not before as a separate pass.
With ``train.stream_from_generation`` they are made first, and training reads its first epoch from
the live generation pipeline (:mod:`dfkd_ray.orchestration.streaming`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from dfkd_ray.config import JobConfig
from dfkd_ray.orchestration.runtime import worker_device
from dfkd_ray.orchestration.train import distill_dir, run_confidence, run_distill
from dfkd_ray.orchestration.generate import run_generate
from dfkd_ray.orchestration.streaming import run_streaming
from dfkd_ray.preflight import claim_output_dir
from dfkd_ray.stages import mark_done, read_record, stage_done


def eval_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "eval"


def _evaluate_task(cfg: JobConfig, student: str, out: str, use_gpu: bool) -> dict:
    from dfkd_ray.evaluation import run_evaluation

    return run_evaluation(cfg, student, device=worker_device(use_gpu), out_dir=out)


def run_evaluate(cfg: JobConfig, student: Path) -> dict | None:
    """Score the student, the teachers and their ensemble on ``eval.path`` (or find that report)."""
    if cfg.eval.path is None:
        return None
    cfg = cfg.absolute()
    out = eval_dir(cfg)
    desc = {"student": read_record(distill_dir(cfg))["fingerprint"], "eval": cfg.eval.model_dump(mode="json")}
    if stage_done(out, desc, stage="eval"):
        results = json.loads((out / "eval.json").read_text())
        print(f"evaluation already done: {out}")
        return results
    gpu = 1 if cfg.ray.use_gpu else 0
    task = ray.remote(num_cpus=cfg.ray.cpus_per_train_worker, num_gpus=gpu)(_evaluate_task)
    results = ray.get(task.remote(cfg, str(student), str(out), bool(gpu)))
    mark_done(out, desc, summary=results["summary"])
    return results


def run_amalgamate(cfg: JobConfig, *, progress: bool = True) -> dict:
    """Run (or finish) every stage of ``cfg``; returns where each output is and the headline numbers."""
    start = time.perf_counter()
    cfg = cfg.absolute()
    claim_output_dir(cfg)
    if cfg.transfer.source == "prompt_tuned":  # DFKD-T3: the prompts first, then the set they write
        from dfkd_ray.orchestration.prompts import run_prompt_tuning

        run_prompt_tuning(cfg, progress=progress)
    if cfg.train.stream_from_generation:
        transfer, confidence, student = run_streaming(cfg, progress=progress)
    else:
        transfer = run_generate(cfg, progress=progress)
        confidence = run_confidence(cfg, transfer)
        student = run_distill(cfg, transfer, confidence)
    results = run_evaluate(cfg, student)
    distill = read_record(distill_dir(cfg))
    outputs = {
        "transfer_set": str(transfer),
        "confidence": str(confidence) if confidence is not None else None,
        "metrics": str(distill_dir(cfg) / "metrics.jsonl"),
        "loss_curves": str(distill_dir(cfg) / "loss_curves.png"),
        "student": str(student),
        "eval": str(eval_dir(cfg)) if results is not None else None,
    }
    summary = {"name": cfg.name, "outputs": outputs, "seconds": round(time.perf_counter() - start, 1),
               "train": distill.get("final", {}), "steps": distill.get("steps"),
               "eval": {k: results[k] for k in ("student", "teachers", "ensemble", "rows") if k in results}
               if results else None}
    (cfg.output.dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(f"  {k:<13} {v}" for k, v in outputs.items() if v is not None))
    print(final_line(summary, results))
    return summary


def final_line(summary: dict, results: dict | None) -> str:
    acc = ""
    if results and results.get("student"):
        acc = f", student accuracy {results['student']['accuracy']:.3f}"
        if results.get("ensemble"):
            acc += f" (teacher ensemble {results['ensemble']['accuracy']:.3f})"
        acc += f" on {results['rows']} eval rows"
    return (f"amalgamate {summary['name']}: done in {summary['seconds']:.0f} s{acc}; student -> "
            f"{summary['outputs']['student']}")
