"""StrataNet Table 3 baseline 'Cross-Domain texts (CD)': documents from a general-domain text file."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
from pathlib import Path

import pyarrow as pa

from dfkd_ray.config import JobConfig
from dfkd_ray.labels import normalize_label
from dfkd_ray.transfer.filters import normalize_text
from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.sources.base import TransferSource

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


class CorpusEncodingError(ValueError):
    """A corpus file that is not text in ``transfer.corpus.encoding``."""


def read_documents(path: str | Path, *, min_words: int, max_words: int, encoding: str = "utf-8") -> list[str]:
    """Non-empty lines of at least ``min_words`` words, each cut to ``max_words`` words.

    Decoded strictly: a byte sequence that is not valid in ``encoding`` raises
    :class:`CorpusEncodingError` naming the file, its byte offset and line, never a replacement
    character in the transfer set.
    """
    path = Path(path)
    opener = _OPENERS.get(path.suffix, open)
    docs = []
    try:
        with opener(path, "rt", encoding=encoding, errors="strict") as f:
            for line in f:
                words = line.split()
                if len(words) >= min_words:
                    docs.append(" ".join(words[:max_words]))
    except UnicodeDecodeError:
        raise _encoding_error(path, opener, encoding) from None
    return docs


def _encoding_error(path: Path, opener, encoding: str) -> CorpusEncodingError:
    """Where the file stops being ``encoding`` (the error of a text-mode read is relative to a chunk;
    decoding the bytes whole gives the offset in the file)."""
    with opener(path, "rb") as f:
        data = f.read()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = "of the decompressed text " if opener is not open else ""
        return CorpusEncodingError(
            f"{path} is not {encoding} text: byte {e.start} {where}(line {line}) is "
            f"{data[e.start:e.end]!r} ({e.reason}); set transfer.corpus.encoding to the file's encoding "
            "(e.g. latin-1 or cp1252), or convert the file to UTF-8")
    return CorpusEncodingError(f"{path} is not {encoding} text; set transfer.corpus.encoding to the file's encoding")


def corpus_problems(cfg: JobConfig, teacher_labels: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The corpus source's problems with its file, found by reading it once before any generation:
    not text in ``transfer.corpus.encoding``, no document of ``min_words`` words, or (with
    ``transfer.dedup`` on, where each row needs its own document) fewer distinct documents than requests.
    Returns ``(field path, message)`` pairs."""
    c, t = cfg.transfer.corpus, cfg.transfer
    try:
        docs = read_documents(c.path, min_words=c.min_words, max_words=c.max_words, encoding=c.encoding)
    except CorpusEncodingError as e:
        return [("transfer.corpus.encoding", str(e))]
    if not docs:
        return [("transfer.corpus.path", _no_documents(c))]
    if t.dedup == "none":
        return []
    distinct = len({normalize_text(d) for d in docs})
    wanted = _count_requests(teacher_labels, t.samples_per_class, t.class_weights)
    if distinct >= wanted:
        return []
    fits = t.samples_per_class * distinct // wanted
    while fits > 0 and _count_requests(teacher_labels, fits, t.class_weights) > distinct:
        fits -= 1
    return [("transfer.samples_per_class",
             f"the set asks for {wanted} rows (transfer.samples_per_class={t.samples_per_class} for each of "
             f"{sum(map(len, teacher_labels.values()))} teacher classes) but {c.path} has {distinct} distinct documents "
             f"of >= {c.min_words} words, and with transfer.dedup={t.dedup} each row needs its own: set "
             f"transfer.samples_per_class to {fits} or less, add documents, lower transfer.corpus.min_words, "
             "or set transfer.dedup=none to let rows repeat documents")]


def _count_requests(teacher_labels: dict[str, list[str]], samples_per_class: int,
                    class_weights: dict[str, float]) -> int:
    """How many requests :func:`~dfkd_ray.transfer.requests.build_requests` makes, without making them."""
    weights = {normalize_label(k): v for k, v in class_weights.items()}
    return sum(round(samples_per_class * weights.get(normalize_label(name), 1.0))
               for labels in teacher_labels.values() for name in labels)


def _no_documents(c) -> str:
    return (f"{c.path} has no line with >= {c.min_words} words (transfer.corpus.min_words); "
            "give a text file with one document per line")


def corpus_documents(config) -> tuple[list[str], list[int]]:
    """``transfer.corpus``'s documents and their seeded order (``perm``, seeded by the job's ``seed``)."""
    cfg = config.transfer.corpus
    documents = read_documents(cfg.path, min_words=cfg.min_words, max_words=cfg.max_words, encoding=cfg.encoding)
    if not documents:
        raise ValueError(f"transfer.corpus.path: {_no_documents(cfg)}")
    order = list(range(len(documents)))
    random.Random(config.seed).shuffle(order)
    return documents, order


def corpus_share_rows(transfer_rows: int, share: float) -> int:
    """How many corpus documents make ``share`` of the training rows next to ``transfer_rows`` rows."""
    return round(transfer_rows * share / (1.0 - share))


def mix_corpus_documents(rows: pa.Table, config) -> pa.Table:
    """The training rows (``text``, ``teacher``) with ``train.corpus_share`` of them general-domain
    documents: ``rows`` (the transfer set's training rows) plus the first documents of the corpus's
    seeded order (:func:`corpus_documents`), their ``teacher`` empty (made for no teacher), the whole
    table in a seeded order so that every worker's contiguous range and every batch mixes both.

    The student learns the KD target on text the generator did not write: each step labels every row
    from the teachers (StrataNet Eq. 4-5 with the confidence statistics fitted on generated rows), so
    corpus rows need no labels. ``rows`` is returned as it is when the share is 0.
    """
    share = config.train.corpus_share
    if share == 0:
        return rows
    wanted = corpus_share_rows(rows.num_rows, share)
    documents, order = corpus_documents(config)
    if wanted > len(order):
        raise ValueError(f"train.corpus_share={share} asks for {wanted} corpus documents next to {rows.num_rows} "
                         f"transfer rows and {config.transfer.corpus.path} has {len(order)} of >= "
                         f"{config.transfer.corpus.min_words} words: lower train.corpus_share or give more documents")
    rows = rows.select(["text", "teacher"])
    corpus = pa.table({"text": [documents[i] for i in order[:wanted]], "teacher": [""] * wanted}).cast(rows.schema)
    mixed = pa.concat_tables([rows, corpus])
    shuffled = list(range(mixed.num_rows))
    random.Random(config.seed).shuffle(shuffled)
    return mixed.take(pa.array(shuffled))


def training_table(table: pa.Table, config) -> pa.Table:
    """The rows a student trains on, from a transfer set's ``table``: its training rows
    (:func:`~dfkd_ray.transfer.streaming_plan.training_rows`) with ``train.corpus_share`` corpus
    documents mixed in (:func:`mix_corpus_documents`)."""
    from dfkd_ray.transfer.streaming_plan import training_rows

    return mix_corpus_documents(training_rows(table, config.train.include_heldout), config)


def corpus_share_problems(cfg: JobConfig, teacher_labels: dict[str, list[str]]) -> list[tuple[str, str]]:
    """``train.corpus_share``'s problems with the corpus file, found before any generation: not text
    in ``transfer.corpus.encoding``, or fewer documents than the share needs next to the most rows
    the transfer set can have. Returns ``(field path, message)`` pairs."""
    c, t = cfg.transfer.corpus, cfg.transfer
    try:
        docs = read_documents(c.path, min_words=c.min_words, max_words=c.max_words, encoding=c.encoding)
    except CorpusEncodingError as e:
        return [("transfer.corpus.encoding", str(e))]
    most = _count_requests(teacher_labels, t.samples_per_class, t.class_weights)
    wanted = corpus_share_rows(most, cfg.train.corpus_share)
    if wanted <= len(docs):
        return []
    fits = len(docs) / (len(docs) + most)
    return [("train.corpus_share",
             f"train.corpus_share={cfg.train.corpus_share} asks for up to {wanted} documents next to the transfer "
             f"set's {most} rows and {c.path} has {len(docs)} of >= {c.min_words} words: set train.corpus_share to "
             f"{int(fits * 100) / 100} or less, add documents, or lower transfer.corpus.min_words")]


class CorpusSource(TransferSource):
    """Request ``ordinal`` picks document ``perm[ordinal % n]`` of a seeded permutation, so a set of
    up to ``n`` requests uses distinct documents and any request maps to the same document on any
    worker; a retry (``attempt > 0``) draws a document from the retry's seed."""

    name = "corpus"
    targeted = False

    def __init__(self, config, teachers, label_space):
        super().__init__(config, teachers, label_space)
        self.documents, self.order = corpus_documents(config)

    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        out = []
        for r in requests:
            n = len(self.documents)
            doc = self.order[r.ordinal % n] if r.attempt == 0 else random.Random(r.seed).randrange(n)
            out.append((self.documents[doc], {"document": doc}))
        return out
