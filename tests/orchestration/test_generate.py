"""Generation at scale on a local Ray: two actors, resume after a real kill, filters, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dfkd_ray.config import validate_config
from dfkd_ray.transfer.schema import validate_table
from dfkd_ray.transfer.store import MANIFEST, TransferSetError, read_transfer_table, transfer_set_files
from dfkd_ray.transfer.writer import TransferSetEmpty

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.ray


def _cfg(job_dict, out: Path, **transfer):
    d = json.loads(json.dumps(job_dict))
    d["transfer"].update(transfer)
    d["output"] = {"dir": str(out)}
    d["ray"] = {"num_generation_actors": 2, "cpus_per_generation_actor": 1}
    return d


def test_two_actors_filters_summary_and_a_changed_config(job_dict, tmp_path, ray_local, monkeypatch):
    from dfkd_ray.orchestration.generate import run_generate

    # Ray Data starts pool actors asynchronously: on 12 quick shards the first actor up may make
    # them all before the second has loaded its teachers. Start work only once both are up.
    monkeypatch.setattr(ray_local.data.DataContext.get_current(), "wait_for_min_actors_s", 300)

    cfg = validate_config(_cfg(job_dict, tmp_path / "out", samples_per_class=24, shard_size=8, min_confidence=0.8,
                               max_attempts=4, dedup="near"))
    directory = run_generate(cfg, progress=False)
    table = read_transfer_table(directory)
    validate_table(table)
    assert all(c >= 0.8 for c in table.column("confidence").to_pylist())
    manifest = json.loads((directory / MANIFEST).read_text())
    summary = manifest["summary"]
    assert summary["rows"] == table.num_rows == 96 - summary["given_up"]
    assert summary["requests"] == 96
    assert {"rows", "per_class", "confidence_histogram", "distinct_1", "distinct_2", "mean_tokens",
            "rejects", "samples_per_s"} <= set(summary)
    assert sum(r["rows"] for r in summary["per_class"]) == table.num_rows
    assert (directory / "summary.png").stat().st_size > 10_000
    # both actors made shards: each shard records the process (host:pid) that generated it
    assert len({s["worker"] for s in manifest["shards"].values()}) == 2, manifest["shards"]
    assert json.loads((directory / "summary.json").read_text())["rows"] == table.num_rows
    # a second run finds it complete and changes nothing
    assert read_transfer_table(run_generate(cfg, progress=False)).equals(table)
    # a changed config is refused, not mixed into the finished set
    changed = validate_config(_cfg(job_dict, tmp_path / "out", samples_per_class=24, shard_size=4, min_confidence=0.8,
                                   max_attempts=4, dedup="near"))
    with pytest.raises(TransferSetError, match=r"different configuration.*shard_size: 8 -> 4"):
        run_generate(changed, progress=False)
    assert read_transfer_table(directory).equals(table)


def test_duplicates_across_actors_are_regenerated_like_in_one_process(job_dict, tmp_path, ray_local):
    """Every corpus document twice: two actors write shards holding the same texts; the driver's
    final pass replaces the later copies by regenerated rows (a Ray task), giving the same set as the
    single-process writer."""
    from dfkd_ray.orchestration.generate import run_generate
    from dfkd_ray.transfer.writer import write_transfer_set

    docs = [f"document number {i} tells about topic {i % 7} and more words" for i in range(40)]
    corpus = tmp_path / "twice.txt"
    corpus.write_text("\n".join(docs + docs) + "\n")
    kw = dict(samples_per_class=6, shard_size=4, dedup="exact", max_attempts=3, corpus={"path": str(corpus)})
    table = read_transfer_table(run_generate(validate_config(_cfg(job_dict, tmp_path / "ray", **kw)), progress=False))
    summary = json.loads((tmp_path / "ray" / "transfer_set" / MANIFEST).read_text())["summary"]
    assert summary["rejects"]["duplicate_across_shards"] > 0
    assert table.num_rows == 24 and len(set(table.column("text").to_pylist())) == 24
    reference = read_transfer_table(write_transfer_set(validate_config(_cfg(job_dict, tmp_path / "one", **kw)),
                                                       progress=False))
    assert table.equals(reference)


TIMING = ("generator_seconds", "samples_per_s")


def _summary(directory: Path) -> dict:
    """summary.json without the fields that measure time."""
    return {k: v for k, v in json.loads((directory / "summary.json").read_text()).items() if k not in TIMING}


@pytest.mark.slow
def test_resume_after_killing_the_job(job_dict, tmp_path, ray_local, ray_local_address):
    """SIGKILL `jobs/generate.py` mid-run, rerun, and compare with an uninterrupted run: same rows,
    same summary (timings aside), also for a shard renamed into place but not yet in the manifest."""
    from dfkd_ray.orchestration.generate import run_generate

    # 600 requests in 100 shards; the threshold makes rejects and given-up requests to account for
    kw = dict(samples_per_class=150, shard_size=6, dedup="none", min_confidence=0.9, max_attempts=2)
    killed = _cfg(job_dict, tmp_path / "killed", **kw)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(killed))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(path),
                             f"ray.address={ray_local_address}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    ts = tmp_path / "killed" / "transfer_set"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ts / MANIFEST).is_file() and len(json.loads((ts / MANIFEST).read_text())["shards"]) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((ts / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) < 100
    for f in ts.glob("shard-*.parquet"):
        pq.read_table(f)  # every visible shard is whole
    with pytest.raises(TransferSetError, match="unfinished"):
        transfer_set_files(ts)
    # The state a kill between a shard's rename and the manifest update leaves (the kill above
    # lands there only by chance): the resume adopts that shard, statistics included.
    dropped = sorted(manifest["shards"])[-1]
    del manifest["shards"][dropped]
    (ts / MANIFEST).write_text(json.dumps(manifest))

    resumed = read_transfer_table(run_generate(validate_config(killed), progress=False))
    fresh = read_transfer_table(run_generate(validate_config(_cfg(job_dict, tmp_path / "fresh", **kw)), progress=False))
    assert resumed.num_rows == fresh.num_rows
    assert resumed.equals(fresh)
    assert len(set(resumed.column("sample_id").to_pylist())) == resumed.num_rows
    summary = _summary(ts)
    assert summary == _summary(tmp_path / "fresh" / "transfer_set")
    assert summary["requests"] == 600 and summary["rows"] == 600 - summary["given_up"]
    assert summary["rejects"]["low_confidence"] > 0


def test_threshold_that_rejects_everything_is_a_clear_error(job_dict, tmp_path, ray_local):
    from dfkd_ray.orchestration.generate import run_generate

    cfg = validate_config(_cfg(job_dict, tmp_path / "out", samples_per_class=4, shard_size=8, min_confidence=1.0,
                               max_attempts=2))
    with pytest.raises(TransferSetEmpty, match=r"min_confidence=1.0.*rejected confidences: min 0\.\d+.*max 0\.\d+"):
        run_generate(cfg, progress=False)
    assert not json.loads((tmp_path / "out" / "transfer_set" / MANIFEST).read_text())["complete"]


def test_steered_two_actors_give_requested_counts(job_dict, synthetic_task, tmp_path, ray_local):
    """A targeted source: after confidence filtering and retries, every (teacher, class) has its count."""
    from dfkd_ray.orchestration.generate import run_generate

    d = _cfg(job_dict, tmp_path / "out", source="steered", samples_per_class=6, shard_size=6, min_confidence=0.6,
             max_attempts=5, dedup="exact")
    # prompt "the": the demo LM does not open with a topic's name, a word the other teacher never saw
    d["transfer"]["steered"] = {"lm_path": str(synthetic_task.lm), "control_strength": 4.0, "top_m": 20, "top_k": 10,
                                "max_new_tokens": 12, "min_new_tokens": 4, "batch_size": 12, "prompt": "the"}
    cfg = validate_config(d)
    table = read_transfer_table(run_generate(cfg, progress=False))
    validate_table(table)
    rows = table.to_pylist()
    counts = {}
    for r in rows:
        counts[(r["teacher"], r["teacher_class"])] = counts.get((r["teacher"], r["teacher_class"]), 0) + 1
        assert r["source"] == "steered" and r["confidence"] >= 0.6
    assert counts == {(t, c): 6 for t in ("alpha", "beta") for c in (0, 1)}
    assert len({r["text"].casefold() for r in rows}) == len(rows)


def test_job_script_reports_a_user_error_without_traceback(job_dict, tmp_path, ray_local_address):
    """jobs/generate.py prints the project's user-facing errors (here a TransferSetError: the set's
    directory holds someone's files) as one message and exits 2, like a bad config."""
    d = _cfg(job_dict, tmp_path / "out")
    (tmp_path / "out" / "transfer_set").mkdir(parents=True)
    (tmp_path / "out" / "transfer_set" / "notes.txt").write_text("mine")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(path),
                           f"ray.address={ray_local_address}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: " in proc.stderr and "is not empty but has no manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "transfer_set" / "notes.txt").read_text() == "mine"


def test_the_generation_pipeline_uses_no_deprecated_ray_data_argument(job_dict, tmp_path, ray_local):
    """``map_batches(concurrency=n)`` logged a deprecation warning on every job's console; a fixed pool
    of ``ray.num_generation_actors`` actors is ``compute=ActorPoolStrategy(size=n)``."""
    import logging

    from dfkd_ray.orchestration.generate import generation_pipeline

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    try:
        generation_pipeline(validate_config(_cfg(job_dict, tmp_path / "out")), tmp_path, [0, 1, 2])
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecated" in r.getMessage()]
