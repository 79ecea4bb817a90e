"""``train.corpus_share``: general-domain documents mixed into the student's training rows, checked
where the config loads and against the corpus file before anything is generated."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.preflight import check_config
from dfkd_ray.transfer.schema import rows_to_table
from dfkd_ray.transfer.sources.corpus import corpus_documents, corpus_share_rows, mix_corpus_documents, training_table


def _corpus(tmp_path, n: int):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"general document {i} about many things" for i in range(n)) + "\n")
    return path


def _config(job_dict, corpus, share: float, seed: int = 0):
    job_dict["transfer"].update(source="random_words", corpus={"path": str(corpus)})
    job_dict["train"] = {"corpus_share": share}
    job_dict["seed"] = seed
    return validate_config(job_dict)


def _rows(n: int) -> pa.Table:
    return pa.table({"text": [f"generated {i}" for i in range(n)], "teacher": [f"t{i % 2}" for i in range(n)]})


def test_the_share_of_rows_is_corpus_documents_every_generated_row_kept_in_a_seeded_mixed_order(job_dict, tmp_path):
    corpus = _corpus(tmp_path, 100)
    rows = _rows(30)
    assert mix_corpus_documents(rows, _config(job_dict, corpus, 0.0)) is rows  # share 0: the set alone
    for share, added in ((0.5, 30), (0.25, 10), (0.75, 90)):
        cfg = _config(job_dict, corpus, share)
        mixed = mix_corpus_documents(rows, cfg)
        assert corpus_share_rows(30, share) == added and mixed.num_rows == 30 + added
        texts, teachers = mixed.column("text").to_pylist(), mixed.column("teacher").to_pylist()
        generated = [(x, t) for x, t in zip(texts, teachers) if t]
        assert Counter(generated) == Counter(zip(rows.column("text").to_pylist(), rows.column("teacher").to_pylist()))
        documents, order = corpus_documents(cfg)
        assert sorted(x for x, t in zip(texts, teachers) if not t) == sorted(documents[i] for i in order[:added])
        # mixed through the table: each half (what each of two workers reads) holds both kinds of rows
        half = mixed.num_rows // 2
        assert all(0 < sum(not t for t in part) < len(part) for part in (teachers[:half], teachers[half:]))
    cfg = _config(job_dict, corpus, 0.5)
    assert mix_corpus_documents(rows, cfg).equals(mix_corpus_documents(rows, cfg))  # deterministic
    other = mix_corpus_documents(rows, _config(job_dict, corpus, 0.5, seed=1))
    assert other.column("text").to_pylist() != mix_corpus_documents(rows, cfg).column("text").to_pylist()


def test_training_table_drops_heldout_rows_before_mixing(job_dict, tmp_path, make_row):
    table = rows_to_table([make_row(i, heldout=i < 4) for i in range(12)])  # 8 training rows
    mixed = training_table(table, _config(job_dict, _corpus(tmp_path, 50), 0.5))
    texts = mixed.column("text").to_pylist()
    assert mixed.num_rows == 16 and not {f"text {i}" for i in range(4)} & set(texts)


def test_too_few_documents_for_the_share_are_refused_before_generation_and_when_mixing(job_dict, tmp_path):
    corpus = _corpus(tmp_path, 20)  # the demo's 4 classes x 8 requests = 32 rows at most
    job_dict["transfer"].update(source="random_words", corpus={"path": str(corpus)})
    job_dict["train"] = {"corpus_share": 0.5}
    with pytest.raises(ConfigError) as e:
        check_config(job_dict)
    message = dict(e.value.problems)["train.corpus_share"]
    for words in ("up to 32 documents", "has 20", str(corpus), "0.38 or less"):
        assert words in message
    job_dict["train"] = {"corpus_share": 0.38}
    assert check_config(job_dict).train.corpus_share == 0.38
    with pytest.raises(ValueError, match=r"train.corpus_share=0.5 asks for 40 corpus documents .* has 20"):
        mix_corpus_documents(_rows(40), _config(job_dict, corpus, 0.5))


@pytest.mark.parametrize("fields,message", [
    ({"transfer": {"corpus": {"path": None}}}, "transfer.corpus.path .* not set"),
    ({"train": {"stream_from_generation": True}}, "stream_from_generation trains its first epoch"),
    ({"transfer": {"source": "embedding_guessing"}}, "crafted pseudo-embeddings"),
    ({"train": {"corpus_share": 1.0}}, "less than 1"),
    ({"transfer": {"source": "corpus"}}, "already trains on documents"),
])
def test_corpus_share_is_checked_where_the_config_loads(job_dict, fields, message):
    job_dict["transfer"]["source"] = "random_words"
    job_dict["train"] = {"corpus_share": 0.5}
    for section, values in fields.items():
        job_dict[section] = {**job_dict.get(section, {}), **values}
    with pytest.raises(ConfigError, match=r"train.corpus_share[\s\S]*" + message):
        validate_config(job_dict)
