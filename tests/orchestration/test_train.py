"""What distillation on Ray reads of a transfer set."""

from __future__ import annotations

from dfkd_ray.transfer.schema import rows_to_table
from dfkd_ray.transfer.store import TransferSetStore


def _row(i: int, heldout: bool) -> dict:
    return {"sample_id": f"t/0/{i}", "text": f"text {i}", "label": 0, "label_name": "a", "teacher": "t",
            "teacher_class": 0, "source": "corpus", "source_params": "{}", "confidence": 0.5, "num_tokens": 2,
            "seed": i, "heldout": heldout}


def test_training_text_is_the_complete_sets_training_rows_in_shard_order(tmp_path):
    """The trainer's dataset: the text of every shard in shard order (written out of order here), held-out
    rows dropped unless asked for, one table, read without Ray Data's footer-reading actors."""
    from dfkd_ray.orchestration.train import training_text

    store = TransferSetStore.open(tmp_path / "ts", fingerprint="f", description={}, num_shards=3)
    shards = {2: [_row(6, False), _row(7, True)], 0: [_row(0, True), _row(1, False), _row(2, False)],
              1: [_row(3, False), _row(4, True), _row(5, False)]}
    for k, rows in shards.items():
        store.write_shard(k, rows_to_table(rows))
    store.finish({})

    table = training_text(tmp_path / "ts", include_heldout=False)
    assert table.column_names == ["text"]
    assert table.column("text").to_pylist() == ["text 1", "text 2", "text 3", "text 5", "text 6"]
    assert training_text(tmp_path / "ts", include_heldout=True).column("text").to_pylist() == [
        f"text {i}" for i in range(8)]
