"""A synthetic topic task with tiny real models, built offline in seconds.

Four topics with distinct vocabularies. Teacher ``alpha`` (BERT, WordPiece tokenizer, 2 layers)
is trained on ``sports`` and ``cooking``; teacher ``beta`` (DistilBERT, byte-level BPE tokenizer,
3 layers, wider) on ``space`` and ``finance``. A tiny GPT-2 (its own byte-level BPE) is trained on
single-topic sentences of all four topics, so a teacher can steer it. Every tokenizer is trained
with ``tokenizers`` on a few hundred KB of generated text; nothing is downloaded.

The tokenizers' training text is mostly general sentences (:func:`general_sentences`: function
words and a general vocabulary of everyday words, ``GENERAL``, with a long tail of made-up rare
words, ``RARE``, drawn Zipf-like), as a real tokenizer is trained on a general corpus. So, as in a
real teacher's 30k-word vocabulary, topic words are a small share of every vocabulary (about 5-10%
of the whole words): a ``random_words`` text is mostly non-topical, the weak baseline of StrataNet
Table 3, not near-perfect in-domain text. Topical sentences (teacher and LM training, the eval
file, the corpus) are topic words and function words only, so the teachers never see the general
words in training, as a fine-tuned classifier never sees most of its vocabulary.

The tests build this once per pytest run (``tests/conftest.py``); the smoke preset builds its demo
teachers, LM, corpus and labelled eval file with the same :func:`build_synthetic_task`.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 3

TOPICS: dict[str, list[str]] = {
    "sports": "goal match team coach player league season score striker referee stadium tournament cup final "
              "keeper defender medal race sprint champion victory fans pitch tennis soccer hockey".split(),
    "cooking": "recipe oven flour butter garlic onion simmer bake roast sauce pepper kitchen chef salad soup "
               "pasta dough spice tomato basil grill whisk dessert cheese skillet".split(),
    "space": "rocket orbit planet galaxy telescope astronaut satellite comet nebula launch moon mars lunar "
             "asteroid cosmic star solar gravity probe spacecraft jupiter eclipse meteor crater module".split(),
    "finance": "stock market bank shares investor profit revenue dividend bond inflation interest trading "
               "earnings credit loan budget merger quarterly fund equity currency debt audit portfolio tax".split(),
}
FILLER = ("the a of and to in on with for this that was is it at by from new after about over "
          "today week said they we one more than").split()
# Everyday words of no topic (none of them a topic word above), the bulk of every tokenizer's vocabulary.
GENERAL = sorted(set("""
person woman child family friend neighbor student doctor driver artist writer farmer worker mother father
sister brother parent baby uncle aunt cousin stranger visitor guest soldier nurse lawyer pilot painter
house home room door window garden street road city town village river lake forest hill mountain bridge
school library office hospital museum church park beach island country castle farm field valley shore
book letter paper pen table chair bed wall floor roof box bag bottle glass phone computer picture photo
camera clock key lamp mirror shoe shirt coat hat dress jacket umbrella map toy blanket pillow candle
basket bucket ladder rope hammer needle thread ribbon button pocket wallet envelope stamp
tree flower leaf grass rain snow wind cloud storm weather summer winter spring autumn morning evening
night afternoon stone sand water fire light shadow color ocean wave island desert jungle meadow
dog cat bird horse cow sheep mouse rabbit bear wolf fox deer duck goose owl frog snake spider
idea story question answer reason problem plan chance choice dream memory voice word name music song
language truth rule law power peace news message moment minute hour year month life age health body
face hand head heart eye ear mouth hair foot arm leg finger shoulder knee smile tear laugh
walk talk sit stand open close read write speak listen hear see look watch think know believe remember
forget feel want need like love hope wish try help ask tell call bring carry hold keep move build fix
clean wash paint draw sing dance sleep wake travel visit wait meet follow learn study teach explain
describe decide agree argue arrive stay live grow turn push pull send receive borrow show hide find
choose begin finish stop continue open climb swim fly drive ride jump sit laugh cry whisper shout
big small old young long short tall high low warm cold quiet loud bright dark heavy soft hard easy
difficult happy sad angry calm busy tired early late simple strange famous quick slow dirty empty
full green blue red yellow brown white black gray pretty ugly kind gentle brave proud careful lucky
honest polite curious nervous lonely friendly silent wooden golden ancient modern narrow wide deep
always never often sometimes usually again almost already soon still together quickly slowly really
very quite perhaps maybe yesterday tomorrow tonight outside inside nearby somewhere everywhere
""".split()))


def _rare_words(n: int, seed: int, taken: set[str]) -> list[str]:
    """``n`` made-up pronounceable words (the long tail of names and rare words in a real vocabulary)."""
    rng, out = random.Random(seed), []
    onsets = "b d f g h k l m n p r s t v z br dr gr kl pl st tr".split()
    vowels, codas = "a e i o u".split(), ["", "", "n", "r", "l", "s"]
    while len(out) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(2, 3)))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


RARE = _rare_words(800, 4321, set(GENERAL) | set(FILLER) | {w for ws in TOPICS.values() for w in ws})
# General sentences draw general words Zipf-like (weight 1 / rank): the listed everyday words (ranks
# in a fixed shuffled order) are the common ones, the made-up RARE words the long tail; a tokenizer
# lists each word it keeps once, common or rare.
_GENERAL_BY_RANK = random.Random(1234).sample(GENERAL, len(GENERAL)) + RARE
_GENERAL_CUM_WEIGHTS = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(_GENERAL_BY_RANK))))
GENERAL_SENTENCES = 3000  # in every tokenizer's training text, beside the topical sentences
TOKENIZER_VOCAB = {"alpha": 2400, "beta": 2400, "lm": 2000}
TEACHER_TOPICS = {"alpha": ["sports", "cooking"], "beta": ["space", "finance"]}


@dataclass(frozen=True)
class SyntheticTask:
    """Paths of everything :func:`build_synthetic_task` made."""

    root: Path
    teachers: dict[str, Path]
    lm: Path
    student: Path
    corpus: Path
    eval_file: Path

    @property
    def labels(self) -> list[str]:
        return list(TOPICS)


def topic_sentence(rng: random.Random, topic: str, min_words: int = 8, max_words: int = 18,
                   topic_share: float = 0.6) -> str:
    """One sentence: topic words with probability ``topic_share``, function words otherwise."""
    n = rng.randint(min_words, max_words)
    words = [rng.choice(TOPICS[topic]) if rng.random() < topic_share else rng.choice(FILLER) for _ in range(n)]
    return " ".join(words)


def general_sentences(n: int, seed: int, min_words: int = 8, max_words: int = 18) -> list[str]:
    """``n`` sentences of no topic: each word a function word or (Zipf-like) a general word, evenly."""
    rng = random.Random(seed)

    def word() -> str:
        if rng.random() < 0.5:
            return rng.choice(FILLER)
        return rng.choices(_GENERAL_BY_RANK, cum_weights=_GENERAL_CUM_WEIGHTS)[0]

    return [" ".join(word() for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def labelled_sentences(n_per_topic: int, seed: int, topics: list[str] | None = None) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = [(topic_sentence(rng, t), t) for t in (topics or list(TOPICS)) for _ in range(n_per_topic)]
    rng.shuffle(rows)
    return rows


def _wordpiece_vocab(words: list[str], vocab_size: int, specials: list[str]) -> dict[str, int]:
    """What ``tokenizers``' WordPiece trainer learns (BPE merges over ``##`` continuations), with ties
    broken by the pair itself: that trainer breaks them in hash order, so its vocabulary (and the
    teacher trained on it) changed from one build to the next."""
    split = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in sorted(Counter(words).items())]
    vocab = list(specials) + sorted({sym for syms, _ in split for sym in syms})
    known = set(vocab)
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, (syms, n) in enumerate(split):
        for pair in zip(syms, syms[1:]):
            pairs[pair] += n
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        c, (a, b) = heapq.heappop(heap)
        if pairs[a, b] != -c or c == 0:
            continue  # stale entry
        merged, changed = a + b[2:], set()
        for i in sorted(where.pop((a, b))):
            syms, n = split[i]
            for pair in zip(syms, syms[1:]):
                pairs[pair] -= n
                changed.add(pair)
            j = 0
            while j < len(syms) - 1:
                if syms[j] == a and syms[j + 1] == b:
                    syms[j:j + 2] = [merged]
                j += 1
            for pair in zip(syms, syms[1:]):
                pairs[pair] += n
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
        for pair in changed:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
    return {t: i for i, t in enumerate(vocab)}


def _train_tokenizer(kind: str, texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":  # BERT style
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        words = [w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))]
        tok = Tokenizer(models.WordPiece(_wordpiece_vocab(words, vocab_size, specials), unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if kind == "roberta_bpe":  # RoBERTa style byte-level BPE
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
        tok.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    if kind == "gpt2_bpe":  # GPT-2 style byte-level BPE, one special token
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def _fit_classifier(model, tokenizer, rows: list[tuple[str, int]], epochs: int, lr: float, seed: int) -> float:
    """Fine-tune a tiny classifier on (text, class) rows; returns final training accuracy."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order), 32):
            batch = [rows[j] for j in order[i:i + 32]]
            enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            enc.pop("token_type_ids", None)
            out = model(**enc, labels=torch.tensor([c for _, c in batch]))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        enc = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc.pop("token_type_ids", None)
        pred = model(**enc).logits.argmax(-1)
    return (pred == torch.tensor([c for _, c in rows])).float().mean().item()


def _fit_lm(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> float:
    import torch

    torch.manual_seed(seed)
    eos = tokenizer.eos_token
    ids = [tokenizer(eos + t + eos)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    loss = float("nan")
    for _ in range(steps):
        pick = torch.randint(len(ids), (32,), generator=g).tolist()
        width = max(len(ids[j]) for j in pick)
        x = torch.full((32, width), tokenizer.eos_token_id)
        labels = torch.full((32, width), -100)
        for r, j in enumerate(pick):
            x[r, :len(ids[j])] = torch.tensor(ids[j])
            labels[r, :len(ids[j])] = torch.tensor(ids[j])
        out = model(input_ids=x, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.loss.item()
    model.eval()
    return loss


def synthetic_task_built(root: str | Path) -> bool:
    """Whether :func:`build_synthetic_task` finds the task under ``root`` built by this builder version."""
    stamp = Path(root) / "BUILT.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("version") == BUILDER_VERSION


def build_synthetic_task(root: str | Path, seed: int = 0) -> SyntheticTask:
    """Build (or reuse, when already built by this builder version) the synthetic task under ``root``."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel)

    root = Path(root)
    task = SyntheticTask(root=root, teachers={name: root / f"teacher_{name}" for name in TEACHER_TOPICS},
                         lm=root / "lm", student=root / "student", corpus=root / "corpus.txt",
                         eval_file=root / "eval.csv")
    stamp = root / "BUILT.json"
    if synthetic_task_built(root):
        return task
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # Tokenizers see general text as well as topical text (as real ones see a general corpus), so
    # their vocabularies are mostly general words.
    tok_text = [s for s, _ in labelled_sentences(60, seed + 1)] + general_sentences(GENERAL_SENTENCES, seed + 2)
    # Teacher alpha: BERT, WordPiece, 2 layers x 32.
    tok_a = _train_tokenizer("wordpiece", tok_text, TOKENIZER_VOCAB["alpha"])
    # Teacher beta: DistilBERT, RoBERTa-style byte-level BPE, 3 layers x 48.
    tok_b = _train_tokenizer("roberta_bpe", tok_text, TOKENIZER_VOCAB["beta"])
    specs = {
        "alpha": (tok_a, BertForSequenceClassification, BertConfig(
            vocab_size=len(tok_a), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, pad_token_id=tok_a.pad_token_id)),
        "beta": (tok_b, DistilBertForSequenceClassification, DistilBertConfig(
            vocab_size=len(tok_b), dim=48, n_layers=3, n_heads=2, hidden_dim=96, max_position_embeddings=128,
            pad_token_id=tok_b.pad_token_id)),
    }
    accuracies = {}
    for k, (name, (tok, cls, cfg)) in enumerate(specs.items()):
        topics = TEACHER_TOPICS[name]
        cfg.num_labels = len(topics)
        cfg.id2label = dict(enumerate(topics))
        cfg.label2id = {t: i for i, t in enumerate(topics)}
        model = cls(cfg)
        rows = [(s, topics.index(t)) for s, t in labelled_sentences(150, seed + 10 + k, topics)]
        accuracies[name] = _fit_classifier(model, tok, rows, epochs=4, lr=2e-3, seed=seed + k)
        model.save_pretrained(task.teachers[name])
        tok.save_pretrained(task.teachers[name])

    # Base LM: GPT-2, trained on single-topic sentences of all topics; its own byte-level BPE also
    # saw general sentences. Half of its sentences start with their topic's name ("space: orbit
    # ..."), as a real LM has read a topic's name next to its text: a class prompt such as
    # "{label}:" then conditions it, as "Category: {label}" conditions a real LM.
    rng = random.Random(seed + 22)
    lm_text = [f"{t}: {s}" if rng.random() < 0.5 else s for s, t in labelled_sentences(200, seed + 20)]
    tok_lm = _train_tokenizer("gpt2_bpe", lm_text + general_sentences(GENERAL_SENTENCES, seed + 21),
                              TOKENIZER_VOCAB["lm"])
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok_lm), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                    bos_token_id=tok_lm.bos_token_id, eos_token_id=tok_lm.eos_token_id))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # some versions note a `loss_type` they do not know: nothing to act on here
    try:
        lm_loss = _fit_lm(lm, tok_lm, lm_text, steps=300, lr=3e-3, seed=seed + 30)
    finally:
        hf_logging.set_verbosity(verbosity)
    lm.save_pretrained(task.lm)
    tok_lm.save_pretrained(task.lm)

    # Student starting point: an untrained 4-layer BERT encoder with teacher alpha's tokenizer.
    student = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok_a), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tok_a.pad_token_id))
    student.base_model.save_pretrained(task.student)
    tok_a.save_pretrained(task.student)

    # A "general-domain" corpus (mixed topics, more filler) and a labelled eval file.
    rng = random.Random(seed + 40)
    corpus = [topic_sentence(rng, rng.choice(list(TOPICS)), 6, 30, topic_share=0.35) for _ in range(400)]
    task.corpus.write_text("\n".join(corpus) + "\n")
    with task.eval_file.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(labelled_sentences(50, seed + 50))

    stamp.write_text(json.dumps({"version": BUILDER_VERSION, "seed": seed, "teacher_train_accuracy": accuracies,
                                 "lm_final_loss": lm_loss}, indent=2))
    return task


SHARED_EMBEDDING_TEACHER = {"name": "gamma", "base": "alpha", "topics": ["space", "finance"]}
"""A teacher that reads teacher alpha's input-embedding space: alpha's BERT fine-tuned on other topics."""


def build_shared_embedding_teacher(root: str | Path, seed: int = 0) -> Path:
    """Teacher ``gamma`` (space/finance) under ``root``, built once on the task of :func:`build_synthetic_task`.

    It is teacher alpha (sports/cooking) fine-tuned on space and finance sentences with a new head
    and its embedding layer frozen, so alpha and gamma share one input-embedding space (alpha's
    tokenizer and word embeddings), as two teachers fine-tuned from one pre-trained encoder nearly
    do. AS-DFD pseudo-embeddings need such teachers (``transfer.source: embedding_guessing``);
    alpha and beta (other tokenizer, other width) cannot share a student's embedding layer.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    task = build_synthetic_task(root, seed=seed)
    spec = SHARED_EMBEDDING_TEACHER
    out = task.root / f"teacher_{spec['name']}"
    stamp = out / "BUILT.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == BUILDER_VERSION:
        return out
    base = task.teachers[spec["base"]]
    topics = spec["topics"]
    config = BertConfig.from_pretrained(base)
    config.num_labels, config.id2label = len(topics), dict(enumerate(topics))
    config.label2id = {t: i for i, t in enumerate(topics)}
    torch.manual_seed(seed + 5)
    model = BertForSequenceClassification(config)
    weights = BertForSequenceClassification.from_pretrained(base).state_dict()
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("classifier.")}, strict=False)
    model.bert.embeddings.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    # More rows and epochs than alpha's: its space and finance words keep alpha's untrained, small embeddings.
    rows = [(s, topics.index(t)) for s, t in labelled_sentences(300, seed + 60, topics)]
    accuracy = _fit_classifier(model, tokenizer, rows, epochs=6, lr=2e-3, seed=seed + 5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps({"version": BUILDER_VERSION, "seed": seed, "base": spec["base"],
                                 "train_accuracy": accuracy}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dfkd_ray.synthetic DIR``: build the demo task (teachers, LM, corpus, eval file)."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the offline synthetic topic task (demo teachers, LM, data).")
    parser.add_argument("root", nargs="?", default=".cache/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    task = build_synthetic_task(args.root, seed=args.seed)
    print(f"synthetic task in {task.root}: teachers {sorted(task.teachers)}, LM {task.lm.name}, "
          f"corpus {task.corpus.name}, eval file {task.eval_file.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
