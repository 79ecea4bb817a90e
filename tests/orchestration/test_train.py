"""What distillation on Ray reads of a transfer set."""

from __future__ import annotations

from dfkd_ray.transfer.schema import rows_to_table
from dfkd_ray.transfer.store import TransferSetStore


def test_training_text_is_the_complete_sets_training_rows_in_shard_order(tmp_path, make_row):
    """The trainer's dataset: the text and source teacher of every shard's rows in shard order (written out
    of order here), held-out rows dropped unless asked for, one table, read without Ray Data's
    footer-reading actors."""
    from dfkd_ray.orchestration.train import training_text

    store = TransferSetStore.open(tmp_path / "ts", fingerprint="f", description={}, num_shards=3)
    held = {0, 4, 7}
    shards = {2: [6, 7], 0: [0, 1, 2], 1: [3, 4, 5]}
    for k, ids in shards.items():
        store.write_shard(k, rows_to_table([make_row(i, heldout=i in held, teacher=f"t{i % 2}") for i in ids]))
    store.finish({})

    table = training_text(tmp_path / "ts", include_heldout=False)
    assert table.column_names == ["text", "teacher"]
    assert table.column("text").to_pylist() == ["text 1", "text 2", "text 3", "text 5", "text 6"]
    assert table.column("teacher").to_pylist() == ["t1", "t0", "t1", "t1", "t0"]
    assert training_text(tmp_path / "ts", include_heldout=True).column("text").to_pylist() == [
        f"text {i}" for i in range(8)]


def test_each_training_batch_is_encoded_with_its_rows_source_teachers():
    """Ray Data's collate function hands a batch's texts and source teachers to ``Distiller.encode``
    (which Ray runs in its prefetch thread)."""
    import numpy as np

    from dfkd_ray.orchestration.train import _EncodeTexts

    seen = []
    collate = _EncodeTexts(lambda texts, sources: seen.append((texts, sources)) or "encoded")
    batch = {"text": np.array(["a b", "c"], dtype=object), "teacher": np.array(["alpha", "beta"], dtype=object),
             "heldout": np.array([False, False])}
    assert collate(batch) == "encoded"
    assert seen == [(["a b", "c"], ["alpha", "beta"])]
