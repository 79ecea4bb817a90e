"""The corpus file is checked before anything is generated: its text encoding (read strictly,
never replaced) and whether it holds a distinct document for every request."""

from __future__ import annotations

import pytest

from dfkd_ray.config import ConfigError, validate_config
from dfkd_ray.preflight import check_config
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.writer import transfer_description, write_transfer_set


def _problems(job_dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        check_config(job_dict)
    return dict(e.value.problems)


def test_too_few_distinct_documents_are_refused_before_generation(job_dict, tmp_path):
    corpus = tmp_path / "small.txt"
    docs = [f"document {i} speaks of one thing only" for i in range(10)]
    corpus.write_text("\n".join(docs + docs[:3] + ["too short"]) + "\n")  # 10 distinct, long enough
    job_dict["transfer"].update(samples_per_class=8, corpus={"path": str(corpus)})
    message = _problems(job_dict)["transfer.samples_per_class"]
    for words in ("10 distinct documents", "32 rows", "transfer.samples_per_class", "2 or less", "transfer.dedup=none",
                  str(corpus)):
        assert words in message
    job_dict["transfer"]["dedup"] = "none"  # repeats allowed: documents may serve several requests
    assert check_config(job_dict).transfer.dedup == "none"


def test_empty_corpus_is_refused_before_generation(job_dict, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("too short\n\n")
    job_dict["transfer"]["corpus"] = {"path": str(corpus)}
    assert "no line with >= 4 words" in _problems(job_dict)["transfer.corpus.path"]


def _latin1_corpus(tmp_path, job_dict):
    corpus = tmp_path / "latin1.txt"
    lines = [f"plain words in document number {i}" for i in range(40)] + ["un café très naïve à la maison"]
    corpus.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    job_dict["transfer"]["corpus"] = {"path": str(corpus)}
    return corpus, len("\n".join(lines[:40]).encode()) + 1 + len("un caf")


def test_corpus_in_another_encoding_is_refused_with_offset_and_setting(job_dict, tmp_path):
    corpus, offset = _latin1_corpus(tmp_path, job_dict)
    message = _problems(job_dict)["transfer.corpus.encoding"]
    for words in (str(corpus), f"byte {offset}", "line 41", "utf-8", "transfer.corpus.encoding"):
        assert words in message
    job_dict["transfer"]["corpus"]["encoding"] = "latin-1"
    job_dict["transfer"]["samples_per_class"] = 10  # 41 documents for 40 requests
    cfg = check_config(job_dict)
    texts = read_transfer_table(write_transfer_set(cfg, progress=False)).column("text").to_pylist()
    assert "un café très naïve à la maison" in texts and not any("\ufffd" in t for t in texts)
    # The encoding is part of the set's description, the default only by its absence (sets made
    # before the setting existed keep their fingerprint).
    assert transfer_description(cfg, cfg.teacher_labels())["transfer"]["corpus"]["encoding"] == "latin-1"
    default = validate_config({**job_dict, "transfer": {**job_dict["transfer"], "corpus": {"path": str(corpus)}}})
    assert "encoding" not in transfer_description(default, default.teacher_labels())["transfer"]["corpus"]
    # Likewise the sections of sources that came later: only their own sets are described by them.
    assert not {"prompt_tuned", "embedding_guessing"} & set(transfer_description(cfg, cfg.teacher_labels())["transfer"])


def test_library_reader_never_replaces_bytes(job_dict, tmp_path):
    from dfkd_ray.transfer.sources.corpus import read_documents

    corpus, offset = _latin1_corpus(tmp_path, job_dict)
    with pytest.raises(ValueError, match=f"byte {offset}"):
        read_documents(corpus, min_words=4, max_words=128)
    assert read_documents(corpus, min_words=4, max_words=128, encoding="latin-1")[-1] == "un café très naïve à la maison"


def test_unknown_encoding_is_a_config_error(job_dict):
    job_dict["transfer"]["corpus"]["encoding"] = "utf-9"
    with pytest.raises(ConfigError, match=r"transfer\.corpus\.encoding.*utf-9"):
        validate_config(job_dict)
