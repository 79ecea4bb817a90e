"""Writing a transfer set in one process: resume after a real kill, refusal of a changed config, the
confidence filter with its retries, and rows duplicated across shards regenerated."""

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
from dfkd_ray.transfer.filters import Deduplicator
from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.schema import TRANSFER_SCHEMA
from dfkd_ray.transfer.store import MANIFEST, TransferSetError, read_transfer_table, transfer_set_files
from dfkd_ray.transfer.writer import fill_requests, write_transfer_set


class _Scripted:
    """A source whose row for (sample index, attempt) is scripted: ``(confidence, text)``."""

    def __init__(self, script: dict[tuple[int, int], tuple[float, str]]):
        self.script, self.asked = script, []

    def generate(self, requests):
        self.asked.append([(r.index, r.attempt) for r in requests])
        return [dict(zip(("confidence", "text"), self.script[r.index, r.attempt]), sample_id=r.sample_id)
                for r in requests]


def test_fill_requests_retries_rejected_requests_with_their_next_attempts():
    requests = [Request("t", 0, 0, "a", i, seed=100 + i) for i in range(3)]
    source = _Scripted({(0, 3): (0.9, "first"),
                        (1, 3): (0.2, "unsure"), (1, 4): (0.9, "first"), (1, 5): (0.8, "second"),
                        (2, 3): (0.1, "x"), (2, 4): (0.3, "y"), (2, 5): (0.4, "z")})
    filled = fill_requests(source, requests, range(3, 6), min_confidence=0.5, dedup=Deduplicator("exact"))
    assert source.asked == [[(0, 3), (1, 3), (2, 3)], [(1, 4), (2, 4)], [(1, 5), (2, 5)]]
    assert [row["sample_id"] for row in filled.rows] == ["t/0/0", "t/0/1"]  # request order
    assert [row["text"] for row in filled.rows] == ["first", "second"]
    assert filled.given_up == [requests[2]] and filled.generated == 7
    assert filled.rejects == {"low_confidence": 4, "duplicate": 1}
    assert filled.rejected_confidence == [0.2, 0.1, 0.3, 0.4]


def _config_file(job_dict, tmp_path, out: Path, samples: int, shard_size: int) -> Path:
    d = dict(job_dict)
    # 1,600 requests over a 400-document corpus repeat documents: keep them (dedup none)
    d["transfer"] = {**job_dict["transfer"], "samples_per_class": samples, "shard_size": shard_size, "dedup": "none"}
    d["output"] = {"dir": str(out)}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


_WRITER = """
import sys
from dfkd_ray.config import load_config
from dfkd_ray.transfer.writer import write_transfer_set
write_transfer_set(load_config(sys.argv[1]))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_corpus_set_killed_midway_and_rewritten(job_dict, tmp_path, ray_local):
    """Kill a real writer process mid-run: only complete shards are visible, the rerun finishes the
    set, and the result equals an uninterrupted run; Ray Data and datasets read it."""
    samples, shard_size = 400, 16  # 1,600 requests in 100 shards: seconds of work, killed early
    cfg_path = _config_file(job_dict, tmp_path, tmp_path / "killed", samples, shard_size)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(cfg_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    ts = tmp_path / "killed" / "transfer_set"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ts / MANIFEST).is_file():
            done = json.loads((ts / MANIFEST).read_text())["shards"]
            if len(done) >= 3:
                break
        time.sleep(0.01)
    assert proc.poll() is None, f"writer ended before it could be killed:\n{proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    manifest = json.loads((ts / MANIFEST).read_text())
    assert not manifest["complete"] and 3 <= len(manifest["shards"]) < 100
    for f in ts.glob("*.parquet"):  # every visible shard is whole
        assert len(pq.read_table(f)) > 0
    with pytest.raises(TransferSetError, match="unfinished"):
        transfer_set_files(ts)

    cfg = validate_config(yaml.safe_load(cfg_path.read_text()))
    write_transfer_set(cfg, progress=False)
    resumed = read_transfer_table(ts)

    fresh_cfg = validate_config(yaml.safe_load(_config_file(job_dict, tmp_path, tmp_path / "fresh", samples,
                                                            shard_size).read_text()))
    fresh = read_transfer_table(write_transfer_set(fresh_cfg, progress=False))
    assert resumed.num_rows == fresh.num_rows == 4 * samples
    assert resumed.equals(fresh)
    timing = ("generator_seconds", "samples_per_s")
    summaries = [{k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in timing}
                 for d in (ts, tmp_path / "fresh" / "transfer_set")]
    assert summaries[0] == summaries[1]
    assert len(set(resumed.column("sample_id").to_pylist())) == resumed.num_rows
    assert not list(ts.glob(".*.tmp"))

    files = transfer_set_files(ts)
    ds = ray_local.data.read_parquet(files)
    assert ds.count() == resumed.num_rows
    assert set(ds.schema().names) == set(TRANSFER_SCHEMA.names)

    import datasets

    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert len(hf) == resumed.num_rows and hf[0]["sample_id"] == resumed.column("sample_id")[0].as_py()


def test_rewrite_with_changed_config_is_refused(job_dict, tmp_path):
    cfg = validate_config(job_dict)
    write_transfer_set(cfg, progress=False)
    before = read_transfer_table(cfg.output.dir / "transfer_set")
    changed = dict(job_dict, transfer={**job_dict["transfer"], "samples_per_class": 9})
    with pytest.raises(TransferSetError, match=r"samples_per_class: 8 -> 9"):
        write_transfer_set(validate_config(changed), progress=False)
    assert read_transfer_table(cfg.output.dir / "transfer_set").equals(before)  # untouched


def test_min_confidence_filters(job_dict):
    job_dict["transfer"]["min_confidence"] = 0.9
    cfg = validate_config(job_dict)
    table = read_transfer_table(write_transfer_set(cfg, progress=False))
    assert all(c >= 0.9 for c in table.column("confidence").to_pylist())
    manifest = json.loads((cfg.output.dir / "transfer_set" / MANIFEST).read_text())
    shards = manifest["shards"].values()
    # each rejected try was retried with another document, up to max_attempts
    assert sum(s["generated"] for s in shards) == table.num_rows + sum(s["rejects"].get("low_confidence", 0) for s in shards)
    assert sum(s["given_up"] for s in shards) + table.num_rows == 32
    assert manifest["summary"]["rows"] == table.num_rows


def test_duplicates_across_shards_are_regenerated(job_dict, tmp_path):
    """A corpus where every document appears twice: shards filtered apart hold the same text; the
    final pass must replace the later copies with new rows (not drop them), deterministically."""
    docs = [f"document number {i} tells about topic {i % 7} and more words" for i in range(40)]
    corpus = tmp_path / "twice.txt"
    corpus.write_text("\n".join(docs + docs) + "\n")
    job_dict["transfer"].update(samples_per_class=6, shard_size=4, dedup="exact", max_attempts=3,
                                corpus={"path": str(corpus)})

    def make(out):
        job_dict["output"]["dir"] = str(out)
        cfg = validate_config(job_dict)
        return cfg, read_transfer_table(write_transfer_set(cfg, progress=False))

    cfg, table = make(tmp_path / "a")
    summary = json.loads((cfg.output.dir / "transfer_set" / MANIFEST).read_text())["summary"]
    texts = table.column("text").to_pylist()
    assert summary["rejects"].get("duplicate_across_shards", 0) > 0  # the set up really made some
    assert len(set(texts)) == len(texts) == table.num_rows
    assert table.num_rows + summary["given_up"] == summary["requests"] == 24
    assert summary["given_up"] == 0  # 40 distinct documents leave room for 24 distinct rows
    ids = table.column("sample_id").to_pylist()
    assert len(set(ids)) == len(ids)
    _, again = make(tmp_path / "b")
    assert again.equals(table)


def test_corpus_with_fewer_documents_than_requests_gives_up_the_rest(job_dict, tmp_path):
    """4 distinct documents for 32 requests with dedup on: later shards hold only rows that repeat an
    earlier shard's. The final pass drops them, cannot refill them, and counts them as given up."""
    corpus = tmp_path / "four.txt"
    corpus.write_text("".join(f"document {i} speaks of one thing only\n" for i in range(4)))
    job_dict["transfer"].update(samples_per_class=8, shard_size=4, dedup="exact", min_confidence=0.0,
                                corpus={"path": str(corpus)})
    cfg = validate_config(job_dict)
    for _ in range(2):  # the rerun finds the finished set
        table = read_transfer_table(write_transfer_set(cfg, progress=False))
    summary = json.loads((cfg.output.dir / "transfer_set" / MANIFEST).read_text())["summary"]
    assert table.num_rows == 4 and len(set(table.column("text").to_pylist())) == 4
    assert summary["rows"] + summary["given_up"] == summary["requests"] == 32


def test_damaged_shard_and_lost_manifest_of_a_finished_set_are_repaired(job_dict, capsys):
    """A finished set with a truncated shard: the rerun names it, moves it aside, remakes its
    requests and ends with the same set; then with its manifest deleted, the same again."""
    job_dict["transfer"]["samples_per_class"] = 4
    cfg = validate_config(job_dict)
    ts = write_transfer_set(cfg, progress=False)
    before = read_transfer_table(ts)
    shard = ts / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    write_transfer_set(cfg, progress=False)
    assert "shard-00001.parquet is not a readable shard" in capsys.readouterr().out
    assert read_transfer_table(ts).equals(before) and (ts / ".damaged" / "shard-00001.parquet").is_file()
    (ts / MANIFEST).unlink()
    write_transfer_set(cfg, progress=False)
    assert read_transfer_table(ts).equals(before)
