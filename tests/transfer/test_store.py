"""The transfer-set store: complete shards only, adoption of shards a killed run left, refusal of
another configuration's set and of foreign directories."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dfkd_ray.transfer.schema import rows_to_table
from dfkd_ray.transfer.store import (MANIFEST, TransferSetError, TransferSetStore, read_shard_stats,
                                     transfer_set_files, write_shard_file)


def test_store_refuses_other_config_and_foreign_dirs(tmp_path, make_row):
    store = TransferSetStore.open(tmp_path / "ts", fingerprint="aaa", description={"x": 1}, num_shards=2)
    store.write_shard(0, rows_to_table([make_row(0)]))
    with pytest.raises(TransferSetError, match=r"different configuration .*x: 1 -> 2"):
        TransferSetStore.open(tmp_path / "ts", fingerprint="bbb", description={"x": 2}, num_shards=2)
    assert transfer_set_files(tmp_path / "ts", require_complete=False) == [str(tmp_path / "ts" / "shard-00000.parquet")]
    with pytest.raises(TransferSetError, match="unfinished"):
        transfer_set_files(tmp_path / "ts")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TransferSetError, match="not empty"):
        TransferSetStore.open(tmp_path / "other", fingerprint="aaa", description={}, num_shards=1)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_store_adopts_renamed_shard_and_drops_temporaries(tmp_path, make_row):
    d = tmp_path / "ts"
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    store.write_shard(0, rows_to_table([make_row(0)]), {"requests": 1, "given_up": 0})
    # Processes killed after the rename but before the manifest update (a shard with its stats, and
    # one written without any), and one killed mid-write.
    stats = {"requests": 3, "rows": 1, "given_up": 2, "rejects": {"low_confidence": 5}, "worker": "h:1"}
    write_shard_file(d, 1, rows_to_table([make_row(1)]), stats)
    pq.write_table(rows_to_table([make_row(2)]), d / "shard-00002.parquet")
    (d / ".shard-00003.parquet.999.tmp").write_bytes(b"PAR1 half a file")
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.done == {0, 1, 2} and store.missing == [3]
    assert not list(d.glob(".*.tmp"))
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["shards"] == {"00000": {"file": "shard-00000.parquet", "rows": 1, "requests": 1, "given_up": 0},
                                  "00001": {"file": "shard-00001.parquet", **stats},
                                  "00002": {"file": "shard-00002.parquet", "rows": 1}}
    assert read_shard_stats(d / "shard-00001.parquet") == stats
    # A shard replaced (new rows and stats) whose manifest update was lost: the file wins.
    write_shard_file(d, 0, rows_to_table([make_row(0), make_row(5)]), {"requests": 1, "rows": 2, "given_up": 0, "x": 1})
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.manifest["shards"]["00000"] == {"file": "shard-00000.parquet", "rows": 2, "requests": 1,
                                                 "given_up": 0, "x": 1}


def test_store_adopts_uncommitted_actor_shard_with_its_stats(tmp_path, make_row):
    """A shard an actor wrote and no one committed (streaming mode): adopted with the stats it
    carries, its row count taken from the table."""
    d = tmp_path / "ts"
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    store.write_shard(0, rows_to_table([make_row(0)]))
    stats = {"requests": 2, "generated": 3, "given_up": 1, "rejects": {"low_confidence": 2}, "finished_at": 1.5}
    write_shard_file(d, 3, rows_to_table([make_row(3)]), stats)
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.done == {0, 3}
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["shards"]["00003"] == {"file": "shard-00003.parquet", "rows": 1, **stats}
    # Committed as generation does it (the actor's stats, then the driver's entry): a reopen keeps it.
    write_shard_file(d, 1, rows_to_table([make_row(1), make_row(4)]), stats)
    store.commit_shard(1, 2, stats)
    entry = dict(store.manifest["shards"]["00001"])
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.manifest["shards"]["00001"] == entry == {"file": "shard-00001.parquet", "rows": 2, **stats}


def test_set_with_nothing_written_is_replanned_for_a_corrected_config(tmp_path, make_row):
    """A run that failed before writing any shard (say, a wrong corpus path) must not block the
    corrected config; once a shard is written, another config is refused (never mixed)."""
    d = tmp_path / "ts"
    TransferSetStore.open(d, fingerprint="aaa", description={"x": 1}, num_shards=2)
    (d / ".shard-00000.parquet.7.tmp").write_bytes(b"PAR1 half")  # killed mid-write: not a shard
    store = TransferSetStore.open(d, fingerprint="bbb", description={"x": 2}, num_shards=3)
    manifest = json.loads((d / MANIFEST).read_text())
    assert (manifest["fingerprint"], manifest["description"], manifest["num_shards"]) == ("bbb", {"x": 2}, 3)
    assert store.missing == [0, 1, 2]
    write_shard_file(d, 1, rows_to_table([make_row(1)]), {"requests": 1})  # written, not listed yet
    with pytest.raises(TransferSetError, match=r"different configuration .*x: 2 -> 3"):
        TransferSetStore.open(d, fingerprint="ccc", description={"x": 3}, num_shards=3)
    assert json.loads((d / MANIFEST).read_text())["fingerprint"] == "bbb"


def test_damaged_shards_are_moved_aside_and_their_requests_remade(tmp_path, make_row, capsys):
    """A truncated shard (listed) and a foreign Parquet file under a shard's name (not listed) are
    moved to .damaged/, each named in one printed line, and their shards are made again."""
    import pyarrow as pa

    d = tmp_path / "ts"
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    for i in range(4):
        store.write_shard(i, rows_to_table([make_row(i)]), {"requests": 1})
    store.finish({"rows": 4})
    whole = (d / "shard-00000.parquet").read_bytes()
    (d / "shard-00000.parquet").write_bytes(whole[: len(whole) // 2])
    (d / "shard-00002.parquet").unlink()
    store.manifest["shards"].pop("00002")
    store._save()
    pq.write_table(pa.table({"a": [1, 2]}), d / "shard-00002.parquet")
    capsys.readouterr()
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.missing == [0, 2] and not store.complete
    assert sorted(p.name for p in (d / ".damaged").iterdir()) == ["shard-00000.parquet", "shard-00002.parquet"]
    assert (d / ".damaged" / "shard-00000.parquet").read_bytes() == whole[: len(whole) // 2]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(".damaged" in line and "made again" in line for line in lines)
    assert "shard-00000.parquet" in lines[0] and "shard-00002.parquet" in lines[1]
    store.write_shard(0, rows_to_table([make_row(0)]))
    (d / "shard-00000.parquet").write_bytes(b"not parquet at all")  # damaged again: kept apart from the first
    TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert len(list((d / ".damaged").iterdir())) == 3


def test_deleted_manifest_is_rebuilt_from_the_shards(tmp_path, make_row):
    d = tmp_path / "ts"
    store = TransferSetStore.open(d, fingerprint="f", description={"x": 1}, num_shards=3)
    store.write_shard(0, rows_to_table([make_row(0)]), {"requests": 1, "given_up": 0})
    store.write_shard(2, rows_to_table([make_row(2), make_row(3)]), {"requests": 2, "rejects": {"duplicate": 1}})
    before = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).unlink()
    refused = r"shard-00000\.parquet.*made with another configuration.*mv .*shard-\*\.parquet"
    with pytest.raises(TransferSetError, match=refused):
        TransferSetStore.open(d, fingerprint="g", description={"x": 2}, num_shards=3)
    assert not (d / MANIFEST).exists()
    store = TransferSetStore.open(d, fingerprint="f", description={"x": 1}, num_shards=3)
    assert json.loads((d / MANIFEST).read_text()) == before and store.missing == [1]
