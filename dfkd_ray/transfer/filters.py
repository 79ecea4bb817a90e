"""Quality filters for transfer sets: exact and near-duplicate removal.

Exact duplicates compare texts after case folding and whitespace collapsing. Near duplicates
use MinHash LSH (``datasketch``) over word 3-gram shingles (word unigrams for texts shorter than
three words): a text whose estimated Jaccard similarity to an earlier kept text reaches
``threshold`` is a duplicate. First occurrence wins, so processing shards in order gives the same
result on every run.
"""

from __future__ import annotations

import hashlib


def normalize_text(text: str) -> str:
    return " ".join(text.casefold().split())


def shingles(text: str, n: int = 3) -> set[str]:
    words = normalize_text(text).split()
    if len(words) < n:
        return set(words) or {""}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class Deduplicator:
    """Stateful: :meth:`is_duplicate` checks a text against those seen so far and remembers it if new."""

    def __init__(self, mode: str = "exact", threshold: float = 0.9, num_perm: int = 64):
        if mode not in ("none", "exact", "near"):
            raise ValueError(f"dedup mode must be none, exact or near, got {mode!r}")
        self.mode = mode
        self.threshold = threshold
        self.num_perm = num_perm
        self._exact: set[bytes] = set()
        self._lsh = None
        self._count = 0
        if mode == "near":
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def _minhash(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode() for s in shingles(text)])
        return m

    def is_duplicate(self, text: str) -> bool:
        if self.mode == "none":
            return False
        key = hashlib.blake2b(normalize_text(text).encode(), digest_size=16).digest()
        if key in self._exact:
            return True
        if self._lsh is not None:
            m = self._minhash(text)
            if self._lsh.query(m):
                return True
            self._lsh.insert(str(self._count), m)
        self._exact.add(key)
        self._count += 1
        return False
