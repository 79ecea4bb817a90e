"""StrataNet Table 3 baseline 'Random Text (R)': random words from the teacher's vocabulary."""

from __future__ import annotations

import random

from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.sources.base import TransferSource


def word_vocabulary(tokenizer) -> list[str]:
    """Whole alphabetic words of a tokenizer's vocabulary, sorted.

    A vocabulary entry counts as a word when it decodes to letters only (two or more) and the
    tokenizer maps that word back to a single token, alone or after a space: WordPiece
    continuations (``##ing``) and byte-level BPE fragments are left out.
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    candidates = sorted({w for w in (tokenizer.decode([i]).strip() for i in ids) if len(w) >= 2 and w.isalpha()})
    if not candidates:
        return []
    alone = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    spaced = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
    return [w for w, a, s in zip(candidates, alone, spaced) if len(a) == 1 or len(s) == 1]


class RandomWordsSource(TransferSource):
    name = "random_words"
    targeted = False

    def __init__(self, config, teachers, label_space):
        super().__init__(config, teachers, label_space)
        self.vocab = {}
        for name, teacher in teachers.items():
            words = word_vocabulary(teacher.tokenizer)
            if len(words) < 2:
                raise ValueError(f"teacher {name}: its tokenizer has {len(words)} whole words; the random_words "
                                 "source needs a word vocabulary (use transfer.source=corpus instead)")
            self.vocab[name] = words

    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        cfg = self.config.transfer.random_words
        out = []
        for r in requests:
            rng = random.Random(r.seed)
            n = rng.randint(cfg.min_words, cfg.max_words)
            words = self.vocab[r.teacher]
            out.append((" ".join(rng.choice(words) for _ in range(n)), {"num_words": n}))
        return out
