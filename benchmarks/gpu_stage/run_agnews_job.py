"""The AG News job as users run it, ``jobs/amalgamate.py --config jobs/configs/agnews.yaml``, on one
GPU node under Ray, once per generation actor layout; wall time and GPU utilisation per stage.

The setting is the AG News benchmark's, read from its spec (``benchmarks/specs/agnews.yaml``) by the
harness ``benchmarks/amalgamation.py`` runs (:mod:`harness.setup`): the teachers are the spec's
(fine-tuned here from the MiniLM encoder on the spec's train rows of their classes, or taken from
``--teachers``), and the job's settings are the benchmark's StrataNet row (``job_config(settings,
"stratanet", seed)``), written as ``section.key=value`` overrides of ``jobs/configs/agnews.yaml``; the
runner checks that the YAML plus its overrides validate to exactly that row, so the job's student
accuracy compares with the benchmark's StrataNet row. The eval file is the spec's test rows as the
benchmark reads them (the spec's text columns joined: title and description).

Each layout ``NxS`` runs N generation actors of S GPUs each (``ray.num_generation_actors``,
``ray.gpus_per_generation_actor``); the first (``--full``) runs the whole job (generation,
confidence, distillation on one Ray Train worker with the GPU, export, eval), the others only
generation (``jobs/generate.py``: the stages after it do not depend on the layout). ``nvidia-smi``
samples utilisation and memory every 0.5 s; samples are assigned to the stage whose window holds
them (stage ends: the stage's ``stage.json`` or the transfer set's ``summary.json``).

GPU node (repository root; the Ray wheels installed, ``PYTHONPATH`` holding them)::

    python3 -m benchmarks.gpu_stage.run_agnews_job --lm LM_DIR --base MINILM_DIR --agnews AGNEWS_DIR \\
        --work /tmp/agnews-job --layouts 4x0.25,2x0.5,1x1 --out agnews_job.json

A layout already finished in ``--work`` (its record in ``WORK/results.json``) is not run again, and
one an earlier command left unfinished starts afresh, so a long sweep can be split over several
commands. CPU dry run (tiny sizes, minutes): ``--tiny``
(layouts like ``2x0``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness, imported as benchmarks/amalgamation.py imports it

from harness.setup import (Settings, add_row_arguments, add_setting_arguments, finetune_teachers, job_config,  # noqa: E402
                           label_space, read_data)
from harness.spec import SpecError, load_spec  # noqa: E402

SPEC = ROOT / "benchmarks" / "specs" / "agnews.yaml"
CONFIG = ROOT / "jobs" / "configs" / "agnews.yaml"
RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")
"""The ``ray`` command of this interpreter's Ray, wherever its scripts folder is."""
UNUSED_BY_STEERED = ("transfer.corpus.", "transfer.random_words.")
"""Sections the benchmark row fills but a steered transfer set never reads: not overridden."""

# the stage whose window ends when this file appears under output.dir
STAGE_ENDS = {"generation": "transfer_set/summary.json", "confidence": "confidence/stage.json",
              "distill": "distill/stage.json", "eval": "eval/stage.json"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the job's config ---------------------------------------------------------------------------

def leaves(data, prefix: str = "") -> dict:
    """``{"section.key": value}`` of a config dump, down to the config's fields (a dict-valued field,
    e.g. ``eval.label_map``, is one leaf; list items are numbered, ``teachers.0.path``)."""
    from dfkd_ray.config.schema import is_field_path

    out = {}
    items = enumerate(data) if isinstance(data, list) else data.items()
    for key, value in items:
        path = f"{prefix}{key}"
        nested = isinstance(value, (dict, list)) and value and all(
            is_field_path(f"{path}.{k}") for k in (range(len(value)) if isinstance(value, list) else value))
        out.update(leaves(value, f"{path}.") if nested else {path: value})
    return out


def row_overrides(row, extra: dict) -> list[str]:
    """``key=value`` overrides of ``jobs/configs/agnews.yaml`` that give the benchmark's ``row`` config
    plus ``extra`` fields; raises when the YAML and the overrides validate to anything else."""
    from dfkd_ray.config import read_config, validate_config
    from dfkd_ray.config.loading import apply_overrides
    from dfkd_ray.stages import diff_descriptions

    base = leaves(validate_config(read_config(CONFIG)).model_dump(mode="json"))
    want = leaves(row.model_dump(mode="json"))
    overrides = [f"{k}={json.dumps(v)}" for k, v in want.items()
                 if base.get(k) != v and k not in extra and not k.startswith(UNUSED_BY_STEERED)]
    overrides += [f"{k}={json.dumps(v)}" for k, v in extra.items()]
    got = validate_config(read_config(CONFIG, overrides)).model_dump(mode="json")
    expected = validate_config(apply_overrides(row.model_dump(mode="json"),
                                               [f"{k}={json.dumps(v)}" for k, v in extra.items()])).model_dump(mode="json")
    for section in ("corpus", "random_words"):
        got["transfer"].pop(section), expected["transfer"].pop(section)
    changes = diff_descriptions(expected, got)
    if changes:
        raise SystemExit(f"{CONFIG.name} with the overrides differs from the benchmark row: {changes}")
    return overrides


def write_eval_file(data: dict, path: Path) -> Path:
    """The test rows as the benchmark scores them: ``text`` (the spec's text columns joined), ``label``
    the union label id + 1 (``eval.label_map`` names them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((t, y + 1) for t, y in zip(data["test_texts"], data["test_labels"]))
    return path


def eval_label_map(space) -> dict[str, str]:
    """``eval.label_map`` of :func:`write_eval_file`'s labels: union label id + 1 -> label name."""
    return {str(i + 1): name for i, name in enumerate(space.names)}


# ---- GPU sampling and stage windows ---------------------------------------------------------------

class GpuSampler:
    """``nvidia-smi`` writing utilisation (%) and memory used (MiB) every ``interval_ms`` to a file."""

    def __init__(self, path: Path, interval_ms: int = 500):
        self.path, self.proc = path, None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", str(interval_ms), "-f", str(path)])

    def stop(self) -> list[tuple[float, int, float, float]]:
        """(unix time, gpu index, utilisation %, memory MiB) of every sample."""
        if self.proc is None:
            return []
        self.proc.terminate()
        self.proc.wait()
        return parse_samples(self.path.read_text() if self.path.is_file() else "")


def parse_samples(text: str) -> list[tuple[float, int, float, float]]:
    """``nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader,nounits``
    lines as (unix time, gpu index, utilisation %, memory MiB); other lines are skipped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            when = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((when, int(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            continue  # a line cut off when the sampler stopped
    return samples


def stage_windows(out_dir: Path, started: float, ended: float) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end) in unix time. ``startup`` (preflight, Ray, the actors loading their
    models) ends when the first transfer-set shard started (its stats: ``finished_at - seconds``);
    each later stage starts where the one before ended; ``finish`` is what is left (summary, Ray's
    shutdown)."""
    windows, last = {}, started
    manifest = out_dir / "transfer_set" / "manifest.json"
    if manifest.is_file():
        shards = json.loads(manifest.read_text())["shards"].values()
        firsts = [s["finished_at"] - s["seconds"] for s in shards if "finished_at" in s]
        if firsts:
            windows["startup"] = (started, min(firsts))
            last = min(firsts)
    for stage, marker in STAGE_ENDS.items():
        path = out_dir / marker
        if path.is_file():
            end = path.stat().st_mtime
            windows[stage] = (last, end)
            last = end
    windows["finish"] = (last, ended)
    return windows


def stage_table(windows: dict, samples: list) -> dict:
    """Per stage: seconds, mean and peak GPU utilisation (%), peak memory (MiB) of its samples."""
    out = {}
    for stage, (a, b) in windows.items():
        inside = [s for s in samples if a <= s[0] < b]
        out[stage] = {"seconds": round(b - a, 1), "samples": len(inside)}
        if inside:
            out[stage].update(gpu_util_mean=round(sum(s[2] for s in inside) / len(inside), 1),
                              gpu_util_max=max(s[2] for s in inside), memory_mib_max=max(s[3] for s in inside))
    return out


# ---- running one layout ---------------------------------------------------------------------------

def parse_layout(text: str) -> tuple[int, float]:
    actors, sep, share = text.lower().partition("x")
    try:
        n, s = int(actors), float(share)
    except ValueError:
        n, s, sep = 0, 0.0, ""
    if not sep or n < 1 or s < 0:
        raise SystemExit(f"--layouts: {text!r} is not ACTORSxGPUS (e.g. 4x0.25)")
    return n, s


def run_layout(args, label: str, overrides: list[str], full: bool, env: dict, log_path: Path) -> dict:
    """One job command (the whole job, or generation only) with GPU sampling; its record."""
    out_dir = args.work / "runs" / label
    if out_dir.exists():  # a run an earlier command left unfinished: its stages' times would be partial
        shutil.rmtree(out_dir)
    script = "jobs/amalgamate.py" if full else "jobs/generate.py"
    job = [sys.executable, script, "--config", str(CONFIG.relative_to(ROOT)), *overrides]
    if args.ray == "submit":
        job = [*RAY_CLI, "job", "submit", "--address", env["RAY_DASHBOARD_URL"], "--working-dir", ".", "--", *job]
    sampler = GpuSampler(args.work / f"gpu-{label}.csv")
    started = time.time()
    with open(log_path, "w") as logfile:
        proc = subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            logfile.write(f"{time.time():.3f} {line}")
            print(f"  {line}", end="", flush=True)
        status = proc.wait()
    ended = time.time()
    samples = sampler.stop()
    record = {"layout": label, "script": script, "exit_status": status,
              "seconds": round(ended - started, 1), "command": " ".join(job[:-len(overrides)]) + " <overrides>",
              "stages": stage_table(stage_windows(out_dir, started, ended), samples),
              "gpu_samples": len(samples), "log": str(log_path)}
    summary = out_dir / "transfer_set" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        record["transfer_set"] = {k: s.get(k) for k in ("rows", "requests", "given_up", "generator_seconds",
                                                        "samples_per_s", "mean_tokens", "distinct_2")}
    if (out_dir / "summary.json").is_file():
        s = json.loads((out_dir / "summary.json").read_text())
        ev = s.get("eval") or {}
        record["eval"] = {"student_accuracy": (ev.get("student") or {}).get("accuracy"),
                          "ensemble_accuracy": (ev.get("ensemble") or {}).get("accuracy"),
                          "teachers": {n: t.get("accuracy") for n, t in (ev.get("teachers") or {}).items()},
                          "rows": ev.get("rows")}
        record["train"] = {"steps": s.get("steps"), **(s.get("train") or {})}
    return record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_head(args, env: dict) -> tuple[subprocess.Popen, dict]:
    """``ray start --head --block`` on free ports with this node's GPUs (and the dashboard, for
    ``--ray submit``), as a child of this process: stopping it (:func:`stop_head`) ends this head's
    processes and no other Ray's. Returns it and the variables that point jobs at it."""
    gpus = 0
    if shutil.which("nvidia-smi"):
        gpus = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines())
    port, dashboard = free_port(), free_port()
    ports = {option: free_port() for option in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "metrics-export-port", "runtime-env-agent-port",
                                                 "ray-client-server-port")}  # none taken by another Ray here
    cmd = [*RAY_CLI, "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count()}",
           f"--num-gpus={gpus}", "--disable-usage-stats", f"--include-dashboard={args.ray == 'submit'}",
           f"--dashboard-port={dashboard}", *(f"--{option}={n}" for option, n in ports.items())]
    log(" ".join(cmd[3:9]))
    head_log = args.work / "ray-head.log"
    head = subprocess.Popen(cmd, env=env, stdout=open(head_log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while True:
        if head.poll() is not None:
            raise SystemExit(f"ray start --head exited with {head.returncode}; see {head_log}")
        try:
            if "Ray runtime started" not in head_log.read_text(errors="replace"):  # printed once the node is up
                raise ConnectionError("the head is starting")
            if args.ray == "submit":
                urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
                # the job server answers before the node's agent that runs jobs is up ("No available agent")
                probe = subprocess.run([*RAY_CLI, "job", "submit", "--address", url, "--", sys.executable, "-c", "0"],
                                       env=env, capture_output=True, text=True)
                if probe.returncode != 0:
                    raise ConnectionError(probe.stdout[-300:] + probe.stderr[-300:])
            break
        except OSError as e:
            if time.time() > deadline:
                stop_head(head)
                raise SystemExit(f"the Ray head did not take jobs within 180 s ({e}); see {head_log}")
            time.sleep(2)
    return head, {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_DASHBOARD_URL": url}


def stop_head(head: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C: ``ray start --block`` then shuts down the processes it started."""
    head.send_signal(signal.SIGINT)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> Settings:
    """The command line with the AG News spec: what :func:`harness.setup.job_config` builds the row from."""
    try:
        spec = load_spec(SPEC)
    except SpecError as e:
        raise SystemExit(str(e)) from None
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lm", type=Path, required=True, help="base causal LM directory (the benchmark's: lm-gpt2-news)")
    p.add_argument("--base", type=Path, required=True, help="MiniLM encoder directory: teachers and student start here")
    p.add_argument("--agnews", type=Path, required=True,
                   help=f"AG News directory: the data files of {SPEC.relative_to(ROOT)} are relative to it")
    p.add_argument("--teachers", type=Path, default=None,
                   help=f"a directory holding fine-tuned {' and '.join(spec.teachers)} (default: fine-tune them into WORK)")
    p.add_argument("--work", type=Path, default=Path("/tmp/agnews-job"))
    p.add_argument("--out", type=Path, default=Path("agnews_job.json"))
    p.add_argument("--layouts", default="4x0.25,2x0.5,1x1", help="generation actor layouts ACTORSxGPUS, in order")
    p.add_argument("--full", default="", help="layouts that run the whole job (default: the first)")
    p.add_argument("--ray", choices=("own", "head", "submit"), default="own",
                   help="own: each job starts its own local Ray; head: `ray start --head` first, jobs join it; "
                        "submit: the same with the dashboard, jobs go through `ray job submit`")
    p.add_argument("--shard-size", type=int, default=250, help="requests per shard: the unit an actor takes")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: 300 rows, 12 samples per class, 1 epoch")
    # The benchmark's StrataNet row (benchmarks/amalgamation.py's defaults, RESULTS.md "AG News").
    add_setting_arguments(p, spec.samples_per_class)
    add_row_arguments(p)
    args = p.parse_args(argv)
    args.layout_list = [t.strip() for t in args.layouts.split(",") if t.strip()]
    for text in args.layout_list:
        parse_layout(text)
    args.full_list = [t.strip() for t in args.full.split(",") if t.strip()] or args.layout_list[:1]
    if args.tiny:  # the benchmark's --tiny sizes
        args.samples_per_class, args.shard_size, args.gen_batch, args.max_new_tokens, args.top_m = 12, 24, 24, 12, 8
        args.epochs, args.teacher_epochs, args.max_length = 1, 1, 64
        args.min_confidence, args.heldout_fraction, args.batch_size = 0.0, 0.5, 4
    args.work = args.work.resolve()
    args.corpus = None  # the steered row reads no corpus (job_config fills transfer.corpus, which is not overridden)
    return Settings(args, spec, args.work)


def device_name() -> str:
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True).stdout.split("\n")
        return ", ".join(n.strip() for n in names if n.strip())
    return f"CPU only ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    import torch

    settings = parse_args(argv)
    args = settings.args
    args.work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    device = torch.device(args.device)
    results_path = args.work / "results.json"
    report = json.loads(results_path.read_text()) if results_path.is_file() else {"layouts": {}}
    report.update(device=device_name(), python=platform.python_version(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:])

    space = label_space(settings.spec)
    try:
        data = read_data(settings.spec, args.agnews, space, limit=300 if args.tiny else 0)
    except SpecError as e:
        raise SystemExit(f"{e} (--agnews {args.agnews})") from None
    teachers = {n: args.teachers / n if args.teachers else settings.teacher_dir(n) for n in settings.spec.teachers}
    if args.teachers is None and not all((path / "config.json").is_file() for path in teachers.values()):
        log(f"fine-tuning the teachers {list(settings.spec.teachers)} on {device}")
        report["teachers"] = finetune_teachers(settings, data, space, device)
        if cuda:
            torch.cuda.empty_cache()  # the jobs' processes get the memory; this one keeps only its CUDA context
    eval_file = write_eval_file(data, args.work / "agnews_test_titledesc.csv")

    row = job_config(settings, "stratanet", args.seed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    head = None
    if args.ray != "own":
        head, address = start_head(args, env)
        env.update(address)
    try:
        for label in args.layout_list:
            if report["layouts"].get(label, {}).get("exit_status") == 0:
                log(f"layout {label}: finished earlier, kept ({results_path})")
                continue
            actors, share = parse_layout(label)
            extra = {"name": f"agnews-{label}", "output.dir": str(args.work / "runs" / label),
                     "ray.num_generation_actors": actors, "ray.gpus_per_generation_actor": share,
                     "ray.num_train_workers": 1, "ray.use_gpu": cuda,
                     "eval.path": str(eval_file), "eval.text_column": "text", "eval.label_column": "label",
                     "eval.label_map": eval_label_map(space)}
            extra.update({f"teachers.{i}.path": str(path) for i, path in enumerate(teachers.values())})
            overrides = row_overrides(row, extra)
            full = label in args.full_list
            log(f"layout {label}: {actors} generation actor(s) x {share:g} GPU, {'whole job' if full else 'generation'}")
            record = run_layout(args, label, overrides, full, env, args.work / f"job-{label}.log")
            record["overrides"] = overrides
            report["layouts"][label] = record
            results_path.write_text(json.dumps(report, indent=1))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(results_path, args.out)
            log(f"layout {label}: exit {record['exit_status']} in {record['seconds']:.0f} s")
    finally:
        if head is not None:
            stop_head(head)
    print(table(report))
    shutil.copyfile(results_path, args.out)
    return 0 if all(r.get("exit_status") == 0 for r in report["layouts"].values()) else 1


def table(report: dict) -> str:
    stages = ["startup", *STAGE_ENDS, "finish"]
    lines = [f"device: {report['device']}; torch {report['torch']}; {report['date']}",
             "layout    status  total s  " + "  ".join(f"{s:>17}" for s in stages) + "  samples/s  student acc",
             "                           " + "  ".join(f"{'s / util% / MiB':>17}" for _ in stages)]
    for label, r in report["layouts"].items():
        cells = []
        for s in stages:
            st = r["stages"].get(s)
            cells.append(f"{st['seconds']:>5.0f} / {st.get('gpu_util_mean', '-'):>4} / {st.get('memory_mib_max', '-'):>5}"
                         if st else f"{'-':>17}")
        rate = (r.get("transfer_set") or {}).get("samples_per_s")
        acc = (r.get("eval") or {}).get("student_accuracy")
        lines.append(f"{label:<9} {r['exit_status']:>6}  {r['seconds']:>7.0f}  " + "  ".join(f"{c:>17}" for c in cells)
                     + f"  {'-' if rate is None else f'{rate:.1f}':>9}  {'-' if acc is None else f'{acc:.4f}':>11}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
