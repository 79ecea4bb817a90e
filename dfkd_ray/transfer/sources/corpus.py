"""StrataNet Table 3 baseline 'Cross-Domain texts (CD)': documents from a general-domain text file."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
from pathlib import Path

from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.sources.base import TransferSource

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def read_documents(path: str | Path, *, min_words: int, max_words: int) -> list[str]:
    """Non-empty lines of at least ``min_words`` words, each cut to ``max_words`` words."""
    path = Path(path)
    opener = _OPENERS.get(path.suffix, open)
    docs = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            words = line.split()
            if len(words) >= min_words:
                docs.append(" ".join(words[:max_words]))
    return docs


class CorpusSource(TransferSource):
    """Request ``ordinal`` picks document ``perm[ordinal % n]`` of a seeded permutation, so a set of
    up to ``n`` requests uses distinct documents and any request maps to the same document on any
    worker; a retry (``attempt > 0``) draws a document from the retry's seed."""

    name = "corpus"
    targeted = False

    def __init__(self, config, teachers, label_space):
        super().__init__(config, teachers, label_space)
        cfg = config.transfer.corpus
        self.documents = read_documents(cfg.path, min_words=cfg.min_words, max_words=cfg.max_words)
        if not self.documents:
            raise ValueError(f"transfer.corpus.path {cfg.path} has no line with >= {cfg.min_words} words "
                             "(transfer.corpus.min_words); give a text file with one document per line")
        self.order = list(range(len(self.documents)))
        random.Random(config.seed).shuffle(self.order)

    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        out = []
        for r in requests:
            n = len(self.documents)
            doc = self.order[r.ordinal % n] if r.attempt == 0 else random.Random(r.seed).randrange(n)
            out.append((self.documents[doc], {"document": doc}))
        return out
