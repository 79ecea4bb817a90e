"""Transfer-set format: complete shards only, resume after a real kill, refusal of mixed configs."""

from __future__ import annotations

import collections
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
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.transfer.requests import build_requests, request_seed
from dfkd_ray.transfer.schema import TRANSFER_SCHEMA, SchemaError, rows_to_table
from dfkd_ray.transfer.store import (MANIFEST, TransferSetError, TransferSetStore, read_shard_stats,
                                     read_transfer_table, transfer_set_files, write_shard_file)
from dfkd_ray.transfer.writer import write_transfer_set


def _row(i: int, **kw) -> dict:
    row = {"sample_id": f"t/0/{i}", "text": f"text {i}", "label": 0, "label_name": "a", "teacher": "t",
           "teacher_class": 0, "source": "corpus", "source_params": "{}", "confidence": 0.5, "num_tokens": 2,
           "seed": i, "heldout": False}
    row.update(kw)
    return row


def test_schema_rejects_bad_rows():
    assert rows_to_table([_row(0), _row(1)]).schema.equals(TRANSFER_SCHEMA)
    with pytest.raises(SchemaError, match="missing columns"):
        rows_to_table([{k: v for k, v in _row(0).items() if k != "text"}])
    with pytest.raises(SchemaError, match=r"confidence must lie in \[0, 1\]"):
        rows_to_table([_row(0, confidence=1.5)])
    with pytest.raises(SchemaError, match="not unique"):
        rows_to_table([_row(0), _row(0)])
    with pytest.raises(SchemaError):
        rows_to_table([_row(0, label="zero")])


def test_requests_are_balanced_weighted_and_seeded():
    space = UnionLabelSpace.from_teachers({"a": ["x", "y"], "b": ["y", "z"]})
    reqs = build_requests({"a": ["x", "y"], "b": ["y", "z"]}, space, samples_per_class=4, job_seed=7,
                          class_weights={"Z": 0.5})
    counts = collections.Counter((r.teacher, r.teacher_class) for r in reqs)
    assert counts == {("a", 0): 4, ("a", 1): 4, ("b", 0): 4, ("b", 1): 2}
    assert [r.ordinal for r in reqs] == list(range(len(reqs)))
    assert len({r.sample_id for r in reqs}) == len(reqs)
    assert reqs[0].seed == request_seed(7, "a", 0, 0) != request_seed(8, "a", 0, 0)
    assert {r.label for r in reqs if r.teacher == "b" and r.teacher_class == 0} == {1}  # shared 'y'


def test_store_refuses_other_config_and_foreign_dirs(tmp_path):
    store = TransferSetStore.open(tmp_path / "ts", fingerprint="aaa", description={"x": 1}, num_shards=2)
    store.write_shard(0, rows_to_table([_row(0)]))
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


def test_store_adopts_renamed_shard_and_drops_temporaries(tmp_path):
    d = tmp_path / "ts"
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    store.write_shard(0, rows_to_table([_row(0)]), {"requests": 1, "given_up": 0})
    # Processes killed after the rename but before the manifest update (a shard with its stats, and
    # one written without any), and one killed mid-write.
    stats = {"requests": 3, "rows": 1, "given_up": 2, "rejects": {"low_confidence": 5}, "worker": "h:1"}
    write_shard_file(d, 1, rows_to_table([_row(1)]), stats)
    pq.write_table(rows_to_table([_row(2)]), d / "shard-00002.parquet")
    (d / ".shard-00003.parquet.999.tmp").write_bytes(b"PAR1 half a file")
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.done == {0, 1, 2}
    assert not list(d.glob(".*.tmp"))
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["shards"] == {"00000": {"file": "shard-00000.parquet", "rows": 1, "requests": 1, "given_up": 0},
                                  "00001": {"file": "shard-00001.parquet", **stats},
                                  "00002": {"file": "shard-00002.parquet", "rows": 1}}
    assert read_shard_stats(d / "shard-00001.parquet") == stats
    # A shard replaced (new rows and stats) whose manifest update was lost: the file wins.
    write_shard_file(d, 0, rows_to_table([_row(0), _row(5)]), {"requests": 1, "rows": 2, "given_up": 0, "x": 1})
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.manifest["shards"]["00000"] == {"file": "shard-00000.parquet", "rows": 2, "requests": 1,
                                                 "given_up": 0, "x": 1}



def test_store_adopts_uncommitted_actor_shard_with_its_stats(tmp_path):
    """A shard an actor wrote and no one committed (streaming mode): adopted with the stats it
    carries, its row count taken from the table."""
    d = tmp_path / "ts"
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    store.write_shard(0, rows_to_table([_row(0)]))
    stats = {"requests": 2, "generated": 3, "given_up": 1, "rejects": {"low_confidence": 2}, "finished_at": 1.5}
    write_shard_file(d, 3, rows_to_table([_row(3)]), stats)
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.done == {0, 3}
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["shards"]["00003"] == {"file": "shard-00003.parquet", "rows": 1, **stats}
    # Committed as generation does it (the actor's stats, then the driver's entry): a reopen keeps it.
    write_shard_file(d, 1, rows_to_table([_row(1), _row(4)]), stats)
    store.commit_shard(1, 2, stats)
    entry = dict(store.manifest["shards"]["00001"])
    store = TransferSetStore.open(d, fingerprint="f", description={}, num_shards=4)
    assert store.manifest["shards"]["00001"] == entry == {"file": "shard-00001.parquet", "rows": 2, **stats}

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


@pytest.mark.parametrize("source", ["corpus", "random_words"])
def test_baseline_sources_rows(job_dict, source, teachers):
    job_dict["transfer"]["source"] = source
    job_dict["transfer"]["min_confidence"] = 0.0
    cfg = validate_config(job_dict)
    table = read_transfer_table(write_transfer_set(cfg, progress=False))
    assert table.num_rows == 4 * 8
    rows = table.to_pylist()
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in teachers.items()})
    for r in rows:
        t = teachers[r["teacher"]]
        assert r["source"] == source and r["text"]
        assert r["label"] == space.teacher_to_global[r["teacher"]][r["teacher_class"]]
        # untargeted sources: teacher_class is the teacher's own prediction, confidence its probability
        probs, pred = t.predict([r["text"]])
        assert int(pred[0]) == r["teacher_class"]
        assert abs(float(probs[0, r["teacher_class"]]) - r["confidence"]) < 1e-5
        assert r["num_tokens"] == t.count_tokens([r["text"]])[0]
    if source == "corpus":  # distinct documents while the corpus lasts
        docs = [json.loads(r["source_params"])["document"] for r in rows]
        assert len(set(docs)) == len(docs)
    else:
        vocab_a = set(teachers["alpha"].tokenizer.get_vocab())
        words = [w for r in rows if r["teacher"] == "alpha" for w in r["text"].split()]
        assert all(w in vocab_a for w in words)


def test_random_words_are_mostly_non_topical(teachers):
    """The fixture tokenizers saw general text: topic words are a small share of each teacher's whole
    words (alpha 9%, beta 5%), so random words are mostly general words, as from a real vocabulary."""
    from dfkd_ray.synthetic import TOPICS
    from dfkd_ray.transfer.sources.random_words import word_vocabulary

    topical = {w for words in TOPICS.values() for w in words}
    for name, teacher in teachers.items():
        vocab = word_vocabulary(teacher.tokenizer)
        assert len(vocab) > 1000, name
        assert sum(w in topical for w in vocab) / len(vocab) < 0.15, name
        assert len(topical & set(vocab)) > 0.9 * len(topical), name  # the topic words are there, as words


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


def test_teacher_remote_code_is_off_by_default(job_dict, synthetic_task, tmp_path):
    """A teacher directory whose config.json points at its own modelling code loads with the built-in
    classes: the code is never imported unless teachers[i].trust_remote_code is true."""
    import shutil

    from dfkd_ray.models.teacher import load_teachers

    d = tmp_path / "teacher"
    shutil.copytree(synthetic_task.teachers["alpha"], d)
    ran = tmp_path / "remote_code_ran"
    (d / "custom.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                 "from transformers import BertConfig, BertForSequenceClassification\n"
                                 "class CustomConfig(BertConfig):\n    pass\n"
                                 "class CustomModel(BertForSequenceClassification):\n    pass\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForSequenceClassification": "custom.CustomModel"}
    (d / "config.json").write_text(json.dumps(config))
    job = {**job_dict, "teachers": [{"name": "alpha", "path": str(d)}]}
    cfg = validate_config(job)
    assert cfg.teachers[0].trust_remote_code is False
    teacher = load_teachers(cfg.teachers)["alpha"]
    assert type(teacher.model).__name__ == "BertForSequenceClassification"
    assert not ran.exists()
