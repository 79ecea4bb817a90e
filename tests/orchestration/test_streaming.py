"""Streaming mode on a local Ray: the smoke preset with `train.stream_from_generation: true`.

Training reads its first epoch from the live generation pipeline: it must start before the last
shard is written, end with the same transfer set as the non-streaming pipeline, and give a student
that beats chance. Shards a killed run left on disk (uncommitted) are adopted and replayed."""

from __future__ import annotations

import json
import shutil

import pytest

from dfkd_ray.stages import read_record
from dfkd_ray.transfer.store import (MANIFEST, TransferSetStore, read_manifest, read_transfer_table,
                                     read_shard_stats)

pytestmark = pytest.mark.ray

COLUMNS = ["sample_id", "text", "label", "teacher", "teacher_class", "seed", "heldout"]


@pytest.mark.slow
def test_stream_overlaps_generation_and_makes_the_same_set(smoke_config, tmp_path, ray_local):
    from dfkd_ray.orchestration.amalgamate import run_amalgamate
    from dfkd_ray.transfer.writer import write_transfer_set

    # Generation must outlast what a train worker does before its first step (load the student and the
    # teachers, about 3-4 s on 2 busy cores): 512 requests of 16 tokens each, about 3x the preset's
    # generation (with 256 shorter texts it once finished 0.3 s before the first step). Small shards:
    # the first batch waits for about two shards per worker. Six epochs, not the preset's twelve: quality
    # is not what this test is about (the smoke test's is), but the streamed epoch's batches hold one or
    # two classes, in an order set by the actors' timing, and with only two shuffled epochs after it a
    # student on a loaded machine once ended at chance (0.27).
    overrides = ("transfer.samples_per_class=128", "transfer.shard_size=16", "transfer.steered.min_new_tokens=16",
                 "train.epochs=6")
    # The same set made without streaming: the reference single-process writer (the Ray pipeline
    # equals it; this one costs no actor start-ups).
    reference = write_transfer_set(smoke_config(tmp_path / "ref", *overrides), progress=False)
    cfg = smoke_config(tmp_path / "stream", "train.stream_from_generation=true", *overrides)
    # A killed streaming run: a manifest that lists nothing and two shards written but not committed.
    ref = read_manifest(reference)
    ts = tmp_path / "stream" / "transfer_set"
    TransferSetStore.open(ts, fingerprint=ref["fingerprint"], description=ref["description"],
                          num_shards=ref["num_shards"])
    for name in ("shard-00000.parquet", "shard-00005.parquet"):
        shutil.copy(reference / name, ts / name)

    summary = run_amalgamate(cfg, progress=False)

    # (a) training overlapped generation: its first step came before the last shard was written
    out = cfg.output.dir
    record = read_record(out / "distill" / "stream")
    manifest = json.loads((ts / MANIFEST).read_text())
    finished = sorted(s["finished_at"] for s in manifest["shards"].values() if "finished_at" in s)
    assert record["steps"] > 0 and record["first_step_at"] < finished[-1], (record, finished)
    # (b) the set on disk is complete and holds the same rows as the non-streaming pipeline's
    assert manifest["complete"] and len(manifest["shards"]) == ref["num_shards"]
    got, want = read_transfer_table(ts), read_transfer_table(reference)
    assert got.select(COLUMNS).equals(want.select(COLUMNS))
    assert manifest["summary"]["requests"] == ref["summary"]["requests"] == 512
    assert manifest["summary"]["rows"] == ref["summary"]["rows"]
    for name in ("shard-00000.parquet", "shard-00005.parquet"):  # adopted, replayed, not made again
        assert read_shard_stats(ts / name) == read_shard_stats(reference / name)
        assert manifest["shards"][name[6:11]]["seconds"] == ref["shards"][name[6:11]]["seconds"]
    # the later epochs continued from the streamed epoch, on the finished set
    distill = read_record(out / "distill")
    metrics = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert distill["steps"] == summary["steps"] > record["steps"] and metrics[-1]["step"] == summary["steps"]
    assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics})
    assert read_record(out / "confidence")["description"]["fitted_on"]["heldout_pass"]
    # (c) the exported student beats chance (1/4) on the eval file
    assert summary["eval"]["student"]["accuracy"] >= 0.4, summary["eval"]
    assert (out / "student" / "config.json").is_file()
    # a rerun finds every stage (held-out pass, confidence, streamed epoch, set, student) and redoes none
    weights = (out / "student" / "model.safetensors").stat().st_mtime_ns
    again = run_amalgamate(cfg, progress=False)
    assert again["eval"]["student"] == summary["eval"]["student"]
    assert (out / "student" / "model.safetensors").stat().st_mtime_ns == weights


def test_warns_when_the_cluster_cannot_hold_trainers_and_actors_at_once(smoke_config, tmp_path, ray_local):
    from dfkd_ray.orchestration.streaming import check_room

    assert check_room(smoke_config(tmp_path, "train.stream_from_generation=true")) == ""  # 2 + 2 of 8 CPUs
    warning = check_room(smoke_config(tmp_path, "train.stream_from_generation=true", "ray.num_generation_actors=7"))
    assert "need 9 CPUs (the cluster has 8 now)" in warning and "ray.num_generation_actors" in warning
