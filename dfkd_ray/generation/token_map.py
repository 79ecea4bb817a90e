"""Cross-tokenizer scoring inputs: the teacher's ids for "row text + each candidate", built incrementally.

Eq. 1 of StrataNet needs ``log P_teacher(c | x_<=t)`` for every row and each of its ``m`` candidate
tokens, but the teacher's tokenizer generally differs from the LM's. Re-tokenizing ``prefix +
candidate`` for all ``B*m`` pairs every step makes the tokenizer the bottleneck. This module keeps
the tokenizer out of the hot loop and still gives exactly the ids that tokenizing the full text
gives (``tests/generation/test_token_map.py`` checks it on random token streams, non-ASCII, control
characters and literal special-token strings included).

How. A row's text is cut into *words* at every position where a whitespace character follows a
non-whitespace one. The teacher tokenizers we accept never merge across such a cut: WordPiece and
BERT-style pre-tokenizers split on whitespace (and punctuation), and the GPT-2 byte-level regex
(RoBERTa, GPT-2) has no alternative that spans a non-space character followed by a space. So

    ids(text) = ids(word_1) + ... + ids(word_n)

and the row keeps the ids of its *settled* words (all but the last) on the device, and only the
last, *pending* word ``P`` as bytes. For a candidate token ``x`` with bytes ``b(x)``:

- if ``b(x)`` starts with whitespace and ``P`` ends with a non-space character (or the text is
  empty, or ``x`` adds no text): ``ids = settled + ids(P) + table[x]``, where ``table[x] =
  ids(decode(b(x)))`` is precomputed once per (LM, teacher) pair;
- otherwise ``x`` continues the word: ``ids = settled + ids(decode(P + b(x)))``, tokenized (with a
  cache keyed by ``(P, x)``) in one batched call.

The ``B*m`` inputs (special tokens, settled ids, pending ids, candidate ids, truncation to the
teacher's ``max_length`` exactly as ``Teacher.tokenize`` truncates, padding) are assembled by
gathers on the device. Text is kept as raw bytes, so a multi-byte UTF-8 character split across LM
tokens is handled: until it is complete it decodes to U+FFFD, exactly as the LM tokenizer's own
``decode`` shows it.

When the fast path cannot be shown exact -- an LM that is not byte-level BPE, a teacher normalizer
or pre-tokenizer outside the known families, an added token that swallows following whitespace,
left truncation, or a failed self-check at construction -- :class:`TeacherTokenMap` falls back to
the *exact* path: every candidate's full text is decoded and tokenized by the teacher's own
tokenizer. ``mode="exact"`` forces it (the benchmark's naive reference).
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Unicode White_Space (what Rust's char::is_whitespace and Oniguruma's \s match).
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B))
                        + "\u2028\u2029\u202f\u205f\u3000")
# After BertNormalizer(clean_text) the control characters among them (VT, FF, NEL) are deleted, not
# split on, so only these separate words for BERT-style tokenizers.
BERT_SPACE = frozenset(c for c in WHITE_SPACE if c in "\t\n\r" or unicodedata.category(c) in ("Zs", "Zl", "Zp"))

_BERT_PRE = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_BERT_PRE_EXTRA = {"Punctuation", "Digits", "UnicodeScripts"}
_BERT_NORM = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
_BYTE_NORM = {"Lowercase", "NFC", "NFD", "NFKC", "NFKD"}
_MODELS = {"WordPiece", "BPE", "Unigram", "WordLevel"}
_PROBES = ["Hello world, it's 3 o'clock!  \n\tNew line:\r\n", "caf\u00e9 na\u00efve \u00dcber \u6771\u4eac \u0645\u0631\u062d\u0628\u0627",
           "a\u00a0b\u3000c\u2028d \x0bx\x0cy\x85z \x1cq", "[CLS] <mask> <s> </s>x [SEP]y", "  lead  trail  ",
           "emoji \U0001F600\U0001F680 tabs\t\tend", "e\u0301 \u0301x A\u030a", "\ufffd\u00ad\u200bzero width"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _decode(buf: bytes) -> str:
    return buf.decode("utf-8", "replace")


def _types(node: dict | None) -> list[dict]:
    """Flatten a tokenizers component (``Sequence`` nodes expanded)."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [t for n in inner for t in _types(n)]
    return [node]


class LmVocabulary:
    """The base LM's tokens as raw bytes, so a row's text can be decoded one token at a time.

    ``token_bytes[i]`` is token ``i``'s bytes (empty for special tokens and ids the tokenizer does not
    know); :meth:`text` is what ``tokenizer.decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False)`` gives. Only byte-level BPE tokenizers (GPT-2, RoBERTa,
    LLaMA-3, Qwen, ...) have such bytes; for others ``token_bytes`` is None and every text is decoded
    by the tokenizer (the exact path).
    """

    def __init__(self, tokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.size = max(int(vocab_size or 0), len(tokenizer))
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self.token_bytes: list[bytes] | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return
        spec = json.loads(backend.to_str())
        if [d.get("type") for d in _types(spec.get("decoder"))] != ["ByteLevel"]:
            return
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        table = []
        for i in range(self.size):
            tok = backend.id_to_token(i) if i < len(tokenizer) else None
            if tok is None or i in self.special_ids:
                table.append(b"")
                continue
            try:
                table.append(bytes(byte_of[c] for c in tok))
            except KeyError:  # an added token holding plain text: the ByteLevel decoder keeps its UTF-8
                table.append(tok.encode("utf-8"))
        self.token_bytes = table

    @property
    def byte_level(self) -> bool:
        return self.token_bytes is not None

    def word_continuations(self) -> list[int]:
        """Ids of tokens that continue the word before them: their text starts with a letter, a digit
        or a non-ASCII character, with no space (byte-level BPE: no leading ``Ġ``; SentencePiece: no
        leading ``▁``). After a prompt ending in a word (``Category: Plant``) such a token rewrites that
        word (``Plantation``)."""
        if self.token_bytes is not None:
            return [i for i, b in enumerate(self.token_bytes) if b and (b[0] >= 0x80 or chr(b[0]).isalnum())]
        out = []
        for i, tok in enumerate(self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))):
            if i in self.special_ids or not tok or tok[0] in "\u2581\u0120 ":
                continue
            if tok.startswith("##") or tok[0].isalnum() or ord(tok[0]) >= 0x80:
                out.append(i)
        return out

    def text(self, ids: Sequence[int]) -> str:
        if self.token_bytes is not None:
            return _decode(b"".join(self.token_bytes[i] for i in ids))
        return self.tokenizer.decode([i for i in ids if i not in self.special_ids and i < len(self.tokenizer)],
                                     skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        assert self.token_bytes is not None
        return b"".join(self.token_bytes[i] for i in ids)


def _ws_run_regex(space: frozenset[str]) -> re.Pattern:
    alts = sorted({c.encode("utf-8") for c in space}, key=len, reverse=True)
    return re.compile(b"(?:" + b"|".join(re.escape(a) for a in alts) + b")+")


@dataclass(frozen=True)
class _Family:
    space: frozenset[str]
    space_only: bool  # ByteLevel(add_prefix_space=True): a word may only start with U+0020
    kind: str  # "bert" or "bytelevel": which ASCII character-class changes are cuts too


# ASCII character classes: 0 other (space, control, non-ASCII), 1 letter, 2 digit, 3 punctuation, 4 apostrophe.
_CLASS = np.zeros(129, dtype=np.int64)  # index 128: not ASCII / nothing
for _b in range(128):
    _c = chr(_b)
    _CLASS[_b] = 1 if _c.isalpha() else 2 if _c.isdigit() else 4 if _c == "'" else 3 if _c in string.punctuation else 0


def _class_cuts(kind: str) -> np.ndarray:
    """``cut[a, b]``: a text whose last character has class ``a`` and a continuation whose first character
    has class ``b`` tokenize apart (the pre-tokenizer always splits there).

    BERT-style pre-tokenizers isolate every punctuation character. The GPT-2 byte-level regex matches
    runs of letters, of digits and of other characters separately; a run ending in an apostrophe may
    continue as a contraction (``'s``, ``'ll``), so apostrophe-then-letter is no cut.
    """
    cut = np.zeros((5, 5), dtype=bool)
    for a in range(1, 5):
        for b in range(1, 5):
            if kind == "bert":
                cut[a, b] = a in (3, 4) or b in (3, 4)
            else:
                bb = 3 if b == 4 else b
                cut[a, b] = (a == 1 and bb in (2, 3)) or (a == 2 and bb in (1, 3)) or (a == 3 and bb in (1, 2)) \
                    or (a == 4 and bb == 2)
    return cut


class TeacherTokenMap:
    """Maps (row text, LM candidate) pairs to one teacher's input ids; one per (LM, teacher) pair.

    Args:
        vocab: the LM's :class:`LmVocabulary`.
        tokenizer: the teacher's Hugging Face tokenizer.
        max_length: the teacher's truncation length (``Teacher.max_length``).
        device: where the tables and assembled inputs live.
        mode: ``auto`` (fast path when it is exact for this pair, else exact) or ``exact``.

    Attributes:
        fast: whether the incremental path is used; ``reason`` says why not.
    """

    def __init__(self, vocab: LmVocabulary, tokenizer, max_length: int, device: torch.device | str = "cpu",
                 mode: str = "auto"):
        if mode not in ("auto", "exact"):
            raise ValueError(f"token map mode must be 'auto' or 'exact', got {mode!r}")
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix, self.suffix = self._specials()
        self.capacity = self.max_length - len(self.prefix) - len(self.suffix)  # content tokens kept
        if self.capacity < 1:
            raise ValueError(f"teacher max_length {max_length} leaves no room for text besides its special tokens")
        self.prefix_t = torch.tensor(self.prefix + [self.pad_id], dtype=torch.long, device=self.device)
        self.suffix_t = torch.tensor(self.suffix + [self.pad_id], dtype=torch.long, device=self.device)
        self.word_cache: dict[bytes, tuple[int, ...]] = {}
        self.cache_limit = 1 << 21  # entries of each cache before it is cleared
        self.cache_bytes = 1 << 28  # and bytes of the pair cache's id array
        self.pair_cache = PairCache(self.pad_id, vocab.size)
        self.family: _Family | None = None
        self.reason = "forced by mode='exact'" if mode == "exact" else self._analyze()
        self.fast = self.reason == ""
        if self.fast:
            self._backend = self._private_backend()
            self.reason = self._self_check()
            self.fast = self.reason == ""
        if self.fast:
            self._build_tables()

    # ------------------------------------------------------------------ set-up

    def _specials(self) -> tuple[list[int], list[int]]:
        probe = "hello"
        full = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"])
        body = list(self.tokenizer(probe, add_special_tokens=False)["input_ids"])
        for j in range(len(full) - len(body) + 1):
            if full[j:j + len(body)] == body:
                return full[:j], full[j + len(body):]
        raise ValueError("cannot locate the teacher's special tokens around a text; is it a sequence classifier tokenizer?")

    def _analyze(self) -> str:
        """Empty string when the fast path is exact for this pair, else the reason it is not."""
        if not self.vocab.byte_level:
            return "the LM tokenizer is not byte-level BPE"
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return "the teacher tokenizer is not a fast (Rust) tokenizer"
        if getattr(self.tokenizer, "truncation_side", "right") != "right":
            return "the teacher tokenizer truncates on the left"
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") not in _MODELS or model.get("dropout"):
            return f"teacher model type {model.get('type')!r} (dropout {model.get('dropout')})"
        added = spec.get("added_tokens") or []
        for tok in added:
            if tok.get("rstrip") or any(c in WHITE_SPACE for c in tok.get("content", "")):
                return f"added token {tok.get('content')!r} absorbs or contains whitespace"
        # An added token ("[CLS]", "<mask>") found in the text can span a class cut: no cut between two
        # characters adjacent in one (any case); none at all if one must stand alone as a word.
        self._no_class_cuts = any(tok.get("single_word") for tok in added)
        self._joined = {(a, b) for tok in added for text in {tok.get("content", ""), tok.get("content", "").lower(),
                                                            tok.get("content", "").upper()}
                        for a, b in zip(text, text[1:]) if ord(a) < 128 and ord(b) < 128}
        norms = [n.get("type") for n in _types(spec.get("normalizer"))]
        pres = _types(spec.get("pre_tokenizer"))
        kinds = [p.get("type") for p in pres]
        if kinds and all(k in _BERT_PRE | _BERT_PRE_EXTRA for k in kinds) and any(k in _BERT_PRE for k in kinds):
            bad = [n for n in norms if n not in _BERT_NORM]
            if bad:
                return f"teacher normalizers {bad} are not known to act per character"
            self.family = _Family(BERT_SPACE, False, "bert")
            return ""
        if kinds == ["ByteLevel"] and pres[0].get("use_regex", True):
            bad = [n for n in norms if n not in _BYTE_NORM]
            if bad:
                return f"teacher normalizers {bad} are not known to act per character"
            self.family = _Family(WHITE_SPACE, bool(pres[0].get("add_prefix_space", False)), "bytelevel")
            return ""
        return f"teacher pre-tokenizer {kinds} is not a known whitespace-splitting one"

    def _private_backend(self):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        # With add_prefix_space a piece that does not start with a space would get one: no class cuts.
        none = self._no_class_cuts or self.family.space_only
        self.class_cut = np.zeros((5, 5), dtype=bool) if none else _class_cuts(self.family.kind)
        self.joined = np.zeros((129, 129), dtype=bool)  # [last byte, first byte] pairs inside an added token
        for a, b in self._joined:
            self.joined[ord(a), ord(b)] = True
        return backend

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Content ids of each text (no special tokens, no truncation), as the teacher tokenizes it."""
        if not texts:
            return []
        if self.fast:
            batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # no offsets: cheaper
            return [e.ids for e in batch(texts, add_special_tokens=False)]
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def reference_ids(self, text: str) -> list[int]:
        """What ``Teacher.tokenize`` gives for one text: special tokens, right truncation to ``max_length``."""
        return list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])

    def _class_cut(self, a: str, b: str) -> bool:
        if ord(a) >= 128 or ord(b) >= 128:
            return False
        return bool(self.class_cut[_CLASS[ord(a)], _CLASS[ord(b)]]) and not self.joined[ord(a), ord(b)]

    def _words(self, text: str, classes: bool = False) -> list[str]:
        space, only = self.family.space, self.family.space_only
        cuts = [i for i in range(1, len(text))
                if (text[i] in space and text[i - 1] not in space and (not only or text[i] == " "))
                or (classes and self._class_cut(text[i - 1], text[i]))]
        return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]

    def _self_check(self) -> str:
        """Additivity over words (and over class cuts) on probe texts, and agreement with the tokenizer's call."""
        for text in _PROBES:
            whole = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self.encode([text])[0] != whole:
                return "the tokenizers backend disagrees with the Hugging Face tokenizer call"
            for classes in (False, True):
                parts = [i for w in self._words(text, classes) for i in self.encode([w])[0]]
                if parts != whole:
                    return f"self-check failed: tokenizing piece by piece differs on {text!r}"
        return ""

    def _build_tables(self) -> None:
        tb = self.vocab.token_bytes
        space = self.family.space
        texts = [_decode(b) for b in tb]
        ids = self.encode(texts)
        width = max(1, min(self.capacity, max(len(x) for x in ids)))
        table = np.full((len(tb), width), self.pad_id, dtype=np.int64)
        lengths = np.zeros(len(tb), dtype=np.int64)
        for i, x in enumerate(ids):
            x = x[:width]
            table[i, :len(x)] = x
            lengths[i] = len(x)
        first = [t[:1] for t in texts]
        self.starts_word = np.array([(f == " ") if self.family.space_only else (f in space and f != "") for f in first])
        self.adds_nothing = np.array([len(b) == 0 for b in tb])
        self.first_byte = np.array([b[0] if b and b[0] < 128 else 128 for b in tb], dtype=np.int64)  # 128: none
        self.table_len = lengths
        self.table = torch.from_numpy(table).to(self.device)
        self._space_re = _ws_run_regex(space)
        self._space_end = tuple(c.encode("utf-8") for c in space)

    # ------------------------------------------------------------------ word logic (fast path)

    def last_cut(self, buf: bytes) -> int:
        """Byte offset of the last word start in ``buf`` (0 if the whole buffer is one word)."""
        cut = 0
        for run in self._space_re.finditer(buf):  # maximal runs of space characters
            i = run.start()
            if i > 0 and (not self.family.space_only or buf[i] == 0x20):
                cut = i
        return cut

    def ends_open(self, buf: bytes) -> bool:
        """Whether a candidate that starts with a space would start a new word after ``buf``."""
        return len(buf) > 0 and not buf.endswith(self._space_end)

    def word_ids(self, bufs: list[bytes]) -> list[tuple[int, ...]]:
        """Teacher ids of each byte string's text, through a cache."""
        cache = self.word_cache
        if len(cache) > self.cache_limit:  # clear before looking up, so every buffer of this call is encoded
            cache.clear()
        missing = list({b for b in bufs if b not in cache})
        if missing:
            for b, x in zip(missing, self.encode([_decode(b) for b in missing])):
                cache[b] = tuple(x)
        return [cache[b] for b in bufs]

    def pair_ids(self, words: list[bytes], rows: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher ids of ``decode(words[rows[i]] + bytes(cands[i]))`` for each pair ``i``, through a cache.

        Returns a right-padded ``(P, W)`` array (ids past the teacher's capacity dropped) and the
        ``(P,)`` true lengths. Only pairs never seen before reach the tokenizer (in one batched call).
        """
        cache, tb = self.pair_cache, self.vocab.token_bytes
        if len(cache) > self.cache_limit or len(cache.words) > self.cache_limit or cache.ids.nbytes > self.cache_bytes:
            cache.clear()
        uniq, inv, slots = cache.find(words, np.asarray(rows, dtype=np.int64), np.asarray(cands, dtype=np.int64))
        unseen = np.flatnonzero(slots < 0)
        if len(unseen):
            word_ids, cand_ids = np.divmod(uniq[unseen], cache.vocab_size)
            texts = [_decode(cache.words[w] + tb[c]) for w, c in zip(word_ids.tolist(), cand_ids.tolist())]
            # ids past the teacher's capacity are truncated away anyway: not stored
            slots[unseen] = cache.add(uniq[unseen], _pad(self.encode(texts), self.pad_id, width=self.capacity))
        return cache.get(slots[inv])

    def rows(self, initial: Sequence[bytes | Sequence[int]]) -> "TeacherRows":
        """State for ``len(initial)`` rows whose text starts as given (prompt bytes, or LM ids for a
        non-byte-level LM; empty for none)."""
        return TeacherRows(self, initial)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; to an accelerator through pinned memory without blocking the host."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pad(seqs: Sequence[Sequence[int]], pad: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(len(seqs), max(1, longest))`` int64 array (at most ``width`` columns, longer
    sequences cut) and the ``(len(seqs),)`` true lengths, filled without a Python loop over cells."""
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    cols_kept = max(1, int(lengths.max(initial=0)))
    if width is not None:
        cols_kept = max(1, min(cols_kept, width))
    out = np.full((len(seqs), cols_kept), pad, dtype=np.int64)
    total = int(lengths.sum())
    if total:
        flat = np.fromiter((i for x in seqs for i in x), dtype=np.int64, count=total)
        rows = np.repeat(np.arange(len(seqs)), lengths)
        cols = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = cols < cols_kept
        out[rows[keep], cols[keep]] = flat[keep]
    return out, lengths


class PairCache:
    """Teacher ids of (pending word, LM candidate) pairs, stored as one padded array.

    A pair's key is ``word id * V + candidate`` (``word id`` interned per distinct word bytes, ``V`` the
    LM vocabulary). Lookups and results are whole numpy arrays, so a step's few thousand pairs cost
    one ``np.unique`` and a dictionary probe per distinct pair instead of Python work per pair and
    per id.

    Args:
        pad: the teacher's pad id; vocab_size: the LM's ``V``.
    """

    def __init__(self, pad: int, vocab_size: int):
        self.pad, self.vocab_size = pad, vocab_size
        self.clear()

    def clear(self) -> None:
        self.word_index: dict[bytes, int] = {}
        self.words: list[bytes] = []
        self.slot: dict[int, int] = {}  # key -> row of ``ids``/``lengths``
        self.ids = np.full((1024, 1), self.pad, dtype=np.int32)  # (capacity, W); int32 halves a wide cache
        self.lengths = np.zeros(1024, dtype=np.int64)  # (capacity,) true lengths
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def find(self, words: list[bytes], rows: np.ndarray, cands: np.ndarray):
        """The distinct keys ``(U,)`` of the pairs ``(words[rows[i]], cands[i])``, each pair's index into
        them ``(P,)``, and their slots ``(U,)`` (-1: not stored)."""
        index = self.word_index
        for w in words:
            if w not in index:
                index[w] = len(self.words)
                self.words.append(w)
        wid = np.fromiter((index[w] for w in words), dtype=np.int64, count=len(words))  # (n,)
        uniq, inv = np.unique(wid[rows] * self.vocab_size + cands, return_inverse=True)  # (U,), (P,)
        get = self.slot.get
        return uniq, inv, np.fromiter((get(k, -1) for k in uniq.tolist()), dtype=np.int64, count=len(uniq))

    def add(self, keys: np.ndarray, padded: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Store the padded ids and true lengths of distinct unstored ``keys``; returns their slots."""
        ids, lengths = padded
        n, w = ids.shape
        need = self.count + n
        if need > len(self.lengths) or w > self.ids.shape[1]:
            cap = max(need, 2 * len(self.lengths)) if need > len(self.lengths) else len(self.lengths)
            grown = np.full((cap, max(w, self.ids.shape[1])), self.pad, dtype=np.int32)
            grown[:self.count, :self.ids.shape[1]] = self.ids[:self.count]
            self.ids = grown
            self.lengths = np.concatenate([self.lengths[:self.count], np.zeros(cap - self.count, dtype=np.int64)])
        self.ids[self.count:need, :w] = ids
        self.lengths[self.count:need] = lengths
        slots = np.arange(self.count, need)
        self.slot.update(zip(keys.tolist(), slots.tolist()))
        self.count = need
        return slots

    def get(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Padded ids ``(P, W)`` and true lengths ``(P,)`` of stored slots."""
        lengths = self.lengths[slots]
        width = max(1, min(int(lengths.max(initial=0)), self.ids.shape[1]))
        return self.ids[slots, :width].astype(np.int64), lengths


@dataclass
class TeacherInputs:
    """The ``N = n*m`` assembled teacher inputs of one step (row-major: row 0's m candidates first)."""

    input_ids: torch.Tensor  # (N, L) right-padded
    attention_mask: torch.Tensor  # (N, L)
    lengths: np.ndarray  # (N,) real tokens per sequence, special tokens included

    def take(self, index: np.ndarray) -> "TeacherInputs":
        """The inputs at flat positions ``index`` ``(K,)`` (candidates the teacher scores), in that order."""
        index_d = to_device(np.asarray(index, dtype=np.int64), self.input_ids.device)
        return TeacherInputs(self.input_ids[index_d], self.attention_mask[index_d], self.lengths[index])


class TeacherRows:
    """Incremental text state of ``n`` rows under one teacher's tokenizer (see the module docstring)."""

    def __init__(self, tmap: TeacherTokenMap, initial: Sequence[bytes | Sequence[int]]):
        self.map = tmap
        n = len(initial)
        self.n = n
        dev = tmap.device
        if tmap.fast:
            self.settled = torch.full((n, tmap.capacity), tmap.pad_id, dtype=torch.long, device=dev)  # (n, C)
            self.settled_len = np.zeros(n, dtype=np.int64)  # true length (may exceed C)
            self.pending: list[bytes] = [b""] * n
            self._append([bytes(x) for x in initial], list(range(n)))
        else:
            # exact path: the whole text (bytes for a byte-level LM, else the LM ids)
            self.full: list = [bytes(x) if tmap.vocab.byte_level else list(x) for x in initial]

    # ---------------------------------------------------------------- state

    def _append(self, new: list[bytes], rows: list[int]) -> None:
        """Append bytes to rows' pending words, settling every word that is complete."""
        tm = self.map
        settle_rows, settle_bufs = [], []
        for r, b in zip(rows, new):
            buf = self.pending[r] + b
            cut = tm.last_cut(buf)
            if cut:
                settle_rows.append(r)
                settle_bufs.append(buf[:cut])
                buf = buf[cut:]
            self.pending[r] = buf
        if settle_rows:
            ids = tm.word_ids(settle_bufs)
            rr, pos, vals = [], [], []
            for r, x in zip(settle_rows, ids):
                start = int(self.settled_len[r])
                keep = max(0, min(len(x), tm.capacity - start))
                rr.extend([r] * keep)
                pos.extend(range(start, start + keep))
                vals.extend(x[:keep])
                self.settled_len[r] = start + len(x)
            if vals:
                idx = to_device(np.array([rr, pos, vals], dtype=np.int64), tm.device)
                self.settled[idx[0], idx[1]] = idx[2]

    def advance(self, chosen: Sequence[int]) -> None:
        """Append each row's chosen LM token."""
        tm = self.map
        if tm.fast:
            tb = tm.vocab.token_bytes
            self._append([tb[c] for c in chosen], list(range(self.n)))
        elif tm.vocab.byte_level:
            tb = tm.vocab.token_bytes
            self.full = [f + tb[c] for f, c in zip(self.full, chosen)]
        else:
            self.full = [f + [int(c)] for f, c in zip(self.full, chosen)]

    def extend(self, rows: Sequence[int], ids: Sequence[Sequence[int]]) -> None:
        """Append any number of LM tokens (``ids[j]``, possibly none) to row ``rows[j]``.

        The same state as :meth:`advance` one token at a time: a settled piece of text spanning
        several words has the ids of those words in turn (the cut property of the module docstring).
        For engines whose rows do not all gain one token per step (vLLM's persistent batch).
        """
        tm = self.map
        rows = [int(r) for r in rows]
        if tm.fast:
            tb = tm.vocab.token_bytes
            self._append([b"".join(tb[c] for c in x) for x in ids], rows)
        elif tm.vocab.byte_level:
            tb = tm.vocab.token_bytes
            for r, x in zip(rows, ids):
                self.full[r] = self.full[r] + b"".join(tb[c] for c in x)
        else:
            for r, x in zip(rows, ids):
                self.full[r] = self.full[r] + [int(c) for c in x]

    @staticmethod
    def stack(parts: Sequence["TeacherRows"]) -> "TeacherRows":
        """The rows of ``parts`` one after the other, as one state (all parts share one token map)."""
        if not parts:
            raise ValueError("stack needs at least one TeacherRows")
        tm = parts[0].map
        if any(p.map is not tm for p in parts):
            raise ValueError("cannot stack rows of different token maps")
        out = TeacherRows.__new__(TeacherRows)
        out.map, out.n = tm, sum(p.n for p in parts)
        if tm.fast:
            out.settled = torch.cat([p.settled for p in parts])
            out.settled_len = np.concatenate([p.settled_len for p in parts])
            out.pending = [b for p in parts for b in p.pending]
        else:
            out.full = [f for p in parts for f in p.full]
        return out

    def keep(self, idx: np.ndarray) -> None:
        """Keep only rows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        self.n = len(idx)
        if self.map.fast:
            self.settled = self.settled[torch.from_numpy(idx).to(self.map.device)]
            self.settled_len = self.settled_len[idx]
            self.pending = [self.pending[i] for i in idx]
        else:
            self.full = [self.full[i] for i in idx]

    def subset(self, idx: np.ndarray) -> "TeacherRows":
        """A copy holding rows ``idx`` only (to score some rows; this state is left as it is)."""
        part = TeacherRows.__new__(TeacherRows)
        part.map, part.n = self.map, len(idx)
        if self.map.fast:
            part.settled = self.settled[torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.map.device)]
            part.settled_len = self.settled_len[idx]
            part.pending = [self.pending[i] for i in idx]
        else:
            part.full = [self.full[i] for i in idx]
        return part

    def saturated(self) -> np.ndarray:
        """``(n,)`` rows whose settled text already fills the teacher's ``max_length``: every candidate
        gives the teacher the same truncated input, so it cannot tell them apart."""
        if self.map.fast:
            return self.settled_len >= self.map.capacity
        return np.zeros(self.n, dtype=bool)

    # ---------------------------------------------------------------- inputs

    def inputs(self, cand: np.ndarray, cand_dev: torch.Tensor | None = None) -> TeacherInputs:
        """Teacher inputs for every (row, candidate): ``cand`` is ``(n, m)`` LM token ids."""
        tm = self.map
        cand = np.asarray(cand, dtype=np.int64)
        n, m = cand.shape
        if tm.fast:
            return self._fast_inputs(cand, cand_dev if cand_dev is not None else to_device(cand, tm.device))
        return self._exact_inputs(cand)

    def _exact_inputs(self, cand: np.ndarray) -> TeacherInputs:
        tm = self.map
        n, m = cand.shape
        if tm.vocab.byte_level:
            tb = tm.vocab.token_bytes
            texts = [_decode(self.full[r] + tb[c]) for r in range(n) for c in cand[r]]
        else:
            texts = [tm.vocab.text(self.full[r] + [int(c)]) for r in range(n) for c in cand[r]]
        ids, lengths = _pad(tm.encode(texts), tm.pad_id, width=tm.capacity)
        none = np.zeros(n, dtype=np.int64)
        return self._assemble(cand, None, np.zeros((n, m), dtype=bool), none, np.zeros((n, m), dtype=np.int64), none,
                              (ids, np.minimum(lengths, tm.capacity)))

    def _fast_inputs(self, cand: np.ndarray, cand_dev: torch.Tensor) -> TeacherInputs:
        tm = self.map
        n, m = cand.shape
        pend = self.pending
        is_empty = np.array([len(p) == 0 for p in pend])  # (n,) nothing pending: text is empty
        is_open = np.array([tm.ends_open(p) for p in pend])  # (n,)
        last = np.array([p[-1] if p and p[-1] < 128 else 128 for p in pend], dtype=np.int64)  # (n,) last ASCII byte
        first = tm.first_byte[cand]  # (n, m)
        cut = tm.class_cut[_CLASS[last][:, None], _CLASS[first]] & ~tm.joined[last[:, None], first]  # (n, m)
        fast = (is_open[:, None] & tm.starts_word[cand]) | cut | tm.adds_nothing[cand] | is_empty[:, None]  # (n, m)
        p_ids = tm.word_ids(pend)
        p_len = np.array([len(x) for x in p_ids], dtype=np.int64)
        sr, sc = np.nonzero(~fast)
        slow = tm.pair_ids(pend, sr, cand[sr, sc]) if len(sr) else None
        return self._assemble(cand, cand_dev, fast, p_len, tm.table_len[cand], self.settled_len, slow,
                              p_ids=p_ids, slow_rc=(sr, sc))

    def _assemble(self, cand, cand_dev, fast, p_len, t_len, s_len, slow, *, p_ids=None, slow_rc=None) -> TeacherInputs:
        """Gather [prefix specials] + settled + pending + candidate tail + [suffix specials] on the device.

        For a fast pair the tail is ``pending ids + table[candidate]``; for a slow pair it is the
        tokenized ``pending + candidate`` (``slow``: padded ids and lengths, row-major over the ~fast
        pairs; None if there are none).
        """
        tm = self.map
        dev = tm.device
        n, m = cand.shape
        C, n_pre, n_suf = tm.capacity, len(tm.prefix), len(tm.suffix)
        s_len = np.minimum(np.asarray(s_len), C)  # settled ids kept on the device
        slow_len = np.zeros((n, m), dtype=np.int64)
        if slow_rc is None:  # exact path: every pair is slow, row-major
            slow_rc = np.nonzero(~fast)
        sr, sc = slow_rc
        if len(sr):
            slow_len[sr, sc] = slow[1]
        p_part = np.where(fast, np.asarray(p_len).reshape(n, 1), 0)  # (n, m) pending ids precede a fast tail
        t_part = np.where(fast, t_len, slow_len)  # (n, m)
        content = np.minimum(s_len[:, None] + p_part + t_part, C)  # (n, m) after truncation
        lengths = (n_pre + content + n_suf).reshape(-1)
        L = int(lengths.max())

        k = torch.arange(L, device=dev).view(1, 1, L) - n_pre  # content position of each column
        packed = to_device(np.concatenate([np.broadcast_to(s_len[:, None], (n, m)).reshape(-1), p_part.reshape(-1),
                                           content.reshape(-1), fast.reshape(-1).astype(np.int64)]), dev)
        s_len_d = packed[:n * m:m].view(n, 1, 1)  # one host-to-device copy for the per-pair numbers
        p_part_d = packed[n * m:2 * n * m].view(n, m, 1)
        content_d = packed[2 * n * m:3 * n * m].view(n, m, 1)
        fast_d = packed[3 * n * m:].view(n, m, 1).bool()

        out = torch.full((n, m, L), tm.pad_id, dtype=torch.long, device=dev)
        if C > 0 and hasattr(self, "settled"):
            s_vals = self.settled.gather(1, k.view(1, L).clamp(0, C - 1).expand(n, L)).view(n, 1, L)
            out = torch.where(k < s_len_d, s_vals, out)
        if p_ids is not None:
            p_np, _ = _pad(p_ids, tm.pad_id)
            width = p_np.shape[1]
            p_tab = to_device(p_np, dev)
            p_vals = p_tab.gather(1, (k.view(1, L) - s_len_d.view(n, 1)).clamp(0, width - 1)).view(n, 1, L)
            in_p = (k >= s_len_d) & (k < s_len_d + p_part_d)
            out = torch.where(in_p, p_vals, out)
        t_start = s_len_d + p_part_d  # (n, m, 1)
        rel = k - t_start  # (n, m, L)
        tail = torch.full((n, m, L), tm.pad_id, dtype=torch.long, device=dev)
        if cand_dev is not None and bool(fast.any()):
            width = tm.table.shape[1]
            t_rows = tm.table[cand_dev]  # (n, m, W)
            tail = torch.where(fast_d, t_rows.gather(2, rel.clamp(0, width - 1)), tail)
        if len(sr):
            r_np = slow[0]
            width = r_np.shape[1]
            r_tab = torch.full((n, m, width), tm.pad_id, dtype=torch.long, device=dev)
            where = to_device(np.stack([sr, sc]).astype(np.int64), dev)
            r_tab[where[0], where[1]] = to_device(r_np, dev)
            tail = torch.where(fast_d, tail, r_tab.gather(2, rel.clamp(0, width - 1)))
        out = torch.where((rel >= 0) & (k < content_d), tail, out)
        if n_pre:
            col = torch.arange(L, device=dev).view(1, 1, L)
            out = torch.where(col < n_pre, tm.prefix_t[col.clamp(max=n_pre)], out)
        if n_suf:
            j = k - content_d  # (n, m, L)
            out = torch.where((j >= 0) & (j < n_suf), tm.suffix_t[j.clamp(0, n_suf)], out)
        mask = torch.arange(L, device=dev).view(1, L) < (content_d.view(-1, 1) + n_pre + n_suf)
        return TeacherInputs(out.view(n * m, L), mask.long(), lengths)
