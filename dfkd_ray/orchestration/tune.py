"""A sweep on Ray Tune: trials over ``tune.search_space``, each a job of its own, ranked by the
data-free proxy or by accuracy on a labelled development file.

The driver (:func:`run_tune`) makes the probe set the proxy scores on (:mod:`dfkd_ray.tuning.proxy`),
and the transfer set when no generation field is searched, then runs a ``ray.tune.Tuner`` over
the search space (grid values with ``tune.grid_search``, ranges sampled uniformly or log-uniformly,
``tune.num_samples`` times; Tune's ``BasicVariantGenerator``), at most
``tune.max_concurrent_trials`` at once, with ASHA stopping the weaker trials at the end of an epoch
(``tune.scheduler``). One trial (:func:`run_trial`) is:

1. its transfer set: trials whose generation settings are equal share one, made once under
   ``tune/transfer_sets/<fingerprint>/`` (the first trial to need it makes it on Ray Data while the
   others wait on a file lock; a rerun finds it there);
2. its confidence statistics, then a Ray Train ``TorchTrainer`` distillation (the job's own
   stages, :mod:`dfkd_ray.orchestration.train`) under ``tune/trials/<trial id>/``, whose main
   worker scores the student at the end of every epoch (:class:`~dfkd_ray.tuning.proxy.TrialScorer`);
   ``EpochScores``, a ``TuneReportCallback``, forwards those reports to Tune, so a Tune iteration
   is an epoch.

Rerunning the same command restores the sweep (``Tuner.can_restore`` / ``Tuner.restore``): finished
and stopped trials are kept, unfinished ones run again and their Train runs continue from their
last checkpoints (a run is named after its stage, under the trial's directory). A sweep whose
settings changed is refused. The sweep writes ``tune/results.csv``, ``results.md``, ``metric.png``,
``best.yaml`` and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dfkd_ray.config import ConfigError, JobConfig
from dfkd_ray.config.schema import field_annotation
from dfkd_ray.orchestration.generate import run_generate
from dfkd_ray.orchestration.runtime import root_cause
from dfkd_ray.orchestration.train import distill_dir, run_confidence, run_distill
from dfkd_ray.preflight import LOCK_FILE, claim_output_dir
from dfkd_ray.stages import STAGE_FILE, StageMismatch, diff_descriptions, fingerprint
from dfkd_ray.tuning.proxy import TrialScorer, probe_config
from dfkd_ray.tuning.results import (SCORES, TrialRecord, final_line, plot_metric, progress_line, ranked,
                                     write_best_config, write_tables)
from dfkd_ray.tuning.space import (TRIAL_ACTOR_CPUS, concurrency_problems, describe_sweep, generation_fingerprint,
                                   most_epochs, searches_generation, trial_config)

SWEEP_FILE = "sweep.json"
"""Under ``tune/``: the description of the sweep that writes there (a rerun must match it)."""


def tune_dir(cfg: JobConfig) -> Path:
    return cfg.output.dir / "tune"


def shared_transfer_set(cfg: JobConfig, sets_dir: Path, *, progress: bool = False) -> Path:
    """The transfer set of ``cfg``'s generation settings under ``sets_dir/<fingerprint>/``: made once
    (Ray Data, :func:`~dfkd_ray.orchestration.generate.run_generate`), found by every later trial and
    rerun. A file lock lets one process make it while others with the same settings wait."""
    from filelock import FileLock

    fp = generation_fingerprint(cfg)
    maker = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": sets_dir / fp})})
    sets_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(sets_dir / f".{fp}.lock")):
        try:
            return run_generate(maker, progress=progress)
        finally:
            # run_generate locks its directory for the life of its process (one job per directory); here
            # the file lock above is the one that counts, and another trial's process comes next.
            (maker.output.dir / LOCK_FILE).unlink(missing_ok=True)


def search_domains(cfg: JobConfig) -> dict:
    """``tune.search_space`` as Tune's param space: grid values, or a uniform or log-uniform range
    (integers for an integer field, ``high`` included)."""
    space = {}
    for key, dim in cfg.tune.search_space.items():
        if dim.values is not None:
            space[key] = tune.grid_search(list(dim.values))
        elif field_annotation(key) is int:
            low, high = int(dim.low), int(dim.high) + 1
            space[key] = tune.lograndint(low, high) if dim.log else tune.randint(low, high)
        else:
            space[key] = tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)
    return space


class EpochScores(TuneReportCallback):
    """Forwards to Tune the reports of the end of each epoch (those with the sweep's scores), not the
    step reports between them: one Tune iteration per epoch, each with the metric ASHA ranks by."""

    def after_report(self, run_context, metrics, checkpoint):
        if any(s in metrics[0] for s in SCORES):
            super().after_report(run_context, metrics, checkpoint)


def _call(fn, *args):
    context = ray.data.DataContext.get_current()  # as the driver's (start_ray, run_distill)
    context.raise_original_map_exception = True
    context.enable_progress_bars = False
    return fn(*args)


def outside_trial(fn, *args):
    """``fn(*args)`` in a Ray task of its own outside the trial's placement group, so the tasks and
    actors it starts (generator actors, the confidence task) are scheduled as a job's are: Tune
    places a trial and everything it starts in the trial's placement group, which holds only the
    trial's own process."""
    return ray.get(ray.remote(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)(_call).remote(fn, *args))


def run_trial(params: dict, *, base: JobConfig, probe_dir: Optional[str]) -> None:
    """One trial (a Tune function trainable): transfer set (shared), confidence statistics, a Ray
    Train distillation that reports the trial's scores at the end of every epoch."""
    trial_id = tune.get_context().get_trial_id()
    root = tune_dir(base)
    cfg = trial_config(base, params, root / "trials" / trial_id)
    cfg.output.dir.mkdir(parents=True, exist_ok=True)
    transfer = outside_trial(shared_transfer_set, cfg, root / "transfer_sets")
    confidence = outside_trial(run_confidence, cfg, transfer)
    scorer = TrialScorer(base, probe_dir)
    distilled_before = (distill_dir(cfg) / STAGE_FILE).is_file()
    student = run_distill(cfg, transfer, confidence, scorer=scorer, callbacks=(EpochScores(),))
    if distilled_before:  # a rerun after a kill that came before Tune recorded the trial's end: score it once more
        from dfkd_ray.evaluation import ExportedStudent

        tune.report({"epoch": cfg.train.epochs, **scorer(ExportedStudent(student, max_length=cfg.student.max_length))})


def trial_record(cfg: JobConfig, trial_id: str, params: Optional[dict], last: Optional[dict], *, error: str = "",
                 running: bool = False) -> TrialRecord:
    """A trial as a row of the results: its last epoch's scores and how it ended. ``params`` is None
    for a trial that failed before Tune recorded its configuration."""
    params = params or {}
    planned = float(params.get("train.epochs", cfg.train.epochs))
    last = last or {}
    epochs = float(last.get("epoch", 0.0))
    record = TrialRecord(trial=trial_id, params={k: params.get(k) for k in cfg.tune.search_space},
                         scores={s: float(last[s]) for s in SCORES if s in last}, epochs=epochs,
                         planned_epochs=planned)
    if error:
        record.status, record.error = "error", error
    elif running:
        record.status = "running"
    elif epochs >= planned - 1e-6:
        record.status = "finished"
    elif epochs > 0:
        record.status = "stopped early"
    return record


class Progress(tune.Callback):
    """Prints each trial's scored epochs and a progress line (finished, stopped early, errors,
    running, waiting) whenever a trial starts or ends."""

    def __init__(self, cfg: JobConfig, total: int):
        self.cfg, self.total = cfg, total

    def _line(self, trials, ended=None, error: str = "") -> None:
        records = [trial_record(self.cfg, t.trial_id, t.config, t.last_result,
                                error=error if t is ended else "failed" if t.status == "ERROR" else "",
                                running=t.status == "RUNNING" and t is not ended)
                   for t in trials if t.status != "PENDING" or t is ended]
        print(progress_line(records, self.total), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={v}" for k, v in trial.config.items())
        print(f"tune: trial {trial.trial_id} started ({params})", flush=True)
        self._line(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        scores = " ".join(f"{s} {result[s]:.4f}" for s in SCORES if s in result)
        print(f"tune: trial {trial.trial_id} epoch {result.get('epoch', 0):g}: {scores}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, ended=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"tune: trial {trial.trial_id} failed; its error is in {trial.path}", file=sys.stderr, flush=True)
        self._line(trials, ended=trial, error="failed")


def _check_sweep(cfg: JobConfig, root: Path) -> None:
    """Record the sweep's description, or refuse one that differs from the sweep already there."""
    desc = describe_sweep(cfg)
    path = root / SWEEP_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old["fingerprint"] != fingerprint(desc):
            changes = diff_descriptions(old["description"], json.loads(json.dumps(desc)))
            raise StageMismatch(f"tune: {root} holds a sweep made with other settings (changed: "
                                f"{'; '.join(changes[:8])}). It was not touched: choose another output.dir, or "
                                f"delete {root} to start the sweep again")
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint(desc), "description": desc}, indent=1, default=str))


def _grid_size(cfg: JobConfig) -> int:
    size = cfg.tune.num_samples
    for dim in cfg.tune.search_space.values():
        size *= len(dim.values) if dim.values is not None else 1
    return size


def run_tune(cfg: JobConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the sweep of ``cfg``; returns its summary (best trial, its YAML, every trial)."""
    start = time.perf_counter()
    cfg = cfg.absolute()
    if not cfg.tune.search_space:
        raise ConfigError([("tune.search_space", "is empty: name the config fields to search, e.g. "
                                                 "transfer.steered.control_strength: {values: [8, 32]}")])
    claim_output_dir(cfg)
    root = tune_dir(cfg)
    _check_sweep(cfg, root)
    if cfg.ray.address is not None or "RAY_ADDRESS" in os.environ:
        have = ray.cluster_resources()
        for field, message in concurrency_problems(cfg, have, "the cluster now"):
            print(f"warning: {field}: {message}; trials beyond what fits wait until the cluster grows", flush=True)
    metric = cfg.tune.ranked_by()
    probe_dir = None
    if cfg.transfer.steered.lm_path is not None:
        print("tune: the probe set the proxy scores trials on", flush=True)
        probe_dir = str(shared_transfer_set(probe_config(cfg), root / "probe_set", progress=progress))
    if not searches_generation(cfg):
        print("tune: the transfer set every trial trains on", flush=True)
        shared_transfer_set(cfg, root / "transfer_sets", progress=progress)

    total = _grid_size(cfg)
    # Tune's own console table and experiment banner: the Progress lines below say it for the job
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg, probe_dir=probe_dir),
                                    {"CPU": TRIAL_ACTOR_CPUS})
    path = root / "ray_tune" / "sweep"
    if tune.Tuner.can_restore(path):
        print(f"tune: resuming the sweep in {path} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        t = cfg.tune
        max_t = most_epochs(cfg)
        scheduler = (tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(t.grace_epochs, max_t),
                                                   reduction_factor=t.reduction_factor, stop_last_trials=False)
                     if t.scheduler == "asha" else None)
        tuner = tune.Tuner(
            trainable, param_space=search_domains(cfg),
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=t.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=t.max_concurrent_trials),
            run_config=tune.RunConfig(name="sweep", storage_path=str((root / "ray_tune").resolve()), verbose=0,
                                      callbacks=[Progress(cfg, total)]))
    print(f"tune: {total} trials ranked by {metric}, {cfg.tune.max_concurrent_trials} at once", flush=True)
    grid = tuner.fit()

    records = []
    for result in grid:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        cause = root_cause(result.error) if result.error else None
        error = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}" if cause else ""
        records.append(trial_record(cfg, trial_id, result.config, last, error=error))
    keys = list(cfg.tune.search_space)
    files = {**write_tables(records, keys, metric, root), "plot": plot_metric(records, keys, metric, root / "metric.png")}
    order = [r for r in ranked(records, metric) if metric in r.scores]
    best = order[0] if order else None
    best_yaml = None
    if best is not None:
        best_cfg = trial_config(cfg, best.params, cfg.output.dir / "best").model_copy(update={"name": f"{cfg.name}-best"})
        best_yaml = write_best_config(best_cfg, root / "best.yaml", cfg.name)
    summary = {"name": cfg.name, "metric": metric, "seconds": round(time.perf_counter() - start, 1),
               "best": best.__dict__ if best else None, "best_yaml": str(best_yaml) if best_yaml else None,
               "files": {k: str(v) for k, v in files.items()}, "trials": [r.__dict__ for r in records]}
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    # The sweep is over. Ray forwards the trials' output to this console with a delay, so a worker's
    # last lines could follow the summary: disconnect first, and the table and the final line end it.
    ray.shutdown()
    print(Path(files["markdown"]).read_text(), end="")
    print(final_line(cfg.name, best, metric, best_yaml, summary["seconds"], len(records)), flush=True)
    return summary
