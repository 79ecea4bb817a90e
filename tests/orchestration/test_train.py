"""What distillation on Ray reads of a transfer set."""

from __future__ import annotations

from pathlib import Path

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


def test_the_trainers_dataset_mixes_in_the_corpus_share_and_its_stage_depends_on_the_corpus(tmp_path, make_row,
                                                                                           job_dict):
    """With ``train.corpus_share`` the Ray trainer's dataset is the set's training rows plus corpus
    documents made for no teacher (empty ``teacher``), and the distill stage's description names the
    share and the corpus file, so a changed share or file trains again."""
    from dfkd_ray.config import validate_config
    from dfkd_ray.orchestration.train import distill_description, student_training_text, training_text

    store = TransferSetStore.open(tmp_path / "ts", fingerprint="f", description={}, num_shards=1)
    store.write_shard(0, rows_to_table([make_row(i, heldout=i == 0) for i in range(9)]))
    store.finish({})
    job_dict["transfer"]["source"] = "random_words"
    plain = validate_config(job_dict)
    assert student_training_text(plain, tmp_path / "ts").equals(training_text(tmp_path / "ts", False))
    job_dict["train"] = {"corpus_share": 0.5}
    mixed = validate_config(job_dict)
    table = student_training_text(mixed, tmp_path / "ts")
    teachers = table.column("teacher").to_pylist()
    assert table.num_rows == 16 and teachers.count("") == 8 and teachers.count("t") == 8

    before = distill_description(plain, tmp_path / "ts", None)
    after = distill_description(mixed, tmp_path / "ts", None)
    assert "corpus" not in before and after["train"]["corpus_share"] == 0.5
    assert after["corpus"]["path"] == str(Path(job_dict["transfer"]["corpus"]["path"]).resolve())
