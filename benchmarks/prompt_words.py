"""How often the base LM continues the prompt's last word instead of starting a new one.

A prompt such as ``Category: {label}`` ends in the class name. The LM's first new token may continue
that word (``Category: Plant`` -> ``Plantation``), and since the transfer set keeps the continuation
only, such a row starts with a word fragment and has lost its class name. For every label of a
benchmark spec this prints the LM's probability that the first new token continues the word (the
ids of :meth:`~dfkd_ray.generation.token_map.LmVocabulary.word_continuations`) and its most likely
first token. With ``transfer.steered.start_new_word`` the engines ban those ids at the first step
(``tests/generation/test_hf.py`` checks the decoded texts). CPU is enough (seconds for the fixture
LMs). ``--transfer-set`` also counts, per label, the rows of a made transfer set (its Parquet, as
``benchmarks/amalgamation.py --save-transfer`` keeps it) whose text starts with a letter or digit,
that is inside the prompt's last word, and prints the first words of three of them.
``--judge-samples N`` writes N texts a label at ``lambda`` 0 (what a one-class teacher's rows are: its
softmax cannot steer) with the package's Hugging Face engine, without and with ``start_new_word``, and
scores them with a TF-IDF logistic-regression judge fitted on the spec's train rows (``--data``); the
engine's bookkeeping needs a teacher (``--teacher``, any local classifier: at ``lambda`` 0 it scores
nothing)::

    python benchmarks/prompt_words.py --lm LM_DIR --spec benchmarks/specs/dbpedia3.yaml --data DBPEDIA_DIR \\
        --out prompt_words.json
    python benchmarks/prompt_words.py --lm LM_DIR --spec benchmarks/specs/agnews.yaml --transfer-set sets/steered.parquet
    python benchmarks/prompt_words.py --lm LM_DIR --spec benchmarks/specs/agnews.yaml --data AGNEWS_DIR \\
        --judge-samples 200 --teacher ANY_CLASSIFIER_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.setup import label_space, read_data  # noqa: E402
from harness.spec import label_names, load_spec  # noqa: E402


def first_token_table(lm, tokenizer, labels: list[str], prompt: str) -> list[dict]:
    """Per label: P(first new token continues the word) and the most likely first token."""
    from dfkd_ray.generation.token_map import LmVocabulary

    continuations = torch.tensor(LmVocabulary(tokenizer).word_continuations(), dtype=torch.long)
    rows = []
    for label in labels:
        ids = tokenizer(prompt.replace("{label}", label), return_tensors="pt").input_ids
        with torch.no_grad():
            probs = lm(ids).logits[0, -1].float().softmax(-1)  # (V,)
        rows.append({"label": label, "p_continue": round(float(probs[continuations].sum()), 4),
                     "top_token": tokenizer.convert_ids_to_tokens([int(probs.argmax())])[0]})
    return rows


def transfer_set_starts(path: Path) -> dict[str, dict]:
    """Per label of a transfer set: its rows, the share whose text starts with a letter or digit, and the
    first words of three such rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["text", "label_name"]).to_pydict()
    out: dict[str, dict] = {}
    for text, label in zip(table["text"], table["label_name"]):
        r = out.setdefault(label, {"rows": 0, "inside": 0, "examples": []})
        r["rows"] += 1
        if text[:1].isalnum():
            r["inside"] += 1
            if len(r["examples"]) < 3:
                r["examples"].append(" ".join(text.split()[:5]))
    return {label: {"rows": r["rows"], "inside_word": round(r["inside"] / r["rows"], 4), "examples": r["examples"]}
            for label, r in sorted(out.items())}


def judged_unguided(lm, tokenizer, labels: list[str], prompt: str, samples: int, data: dict, space,
                    teacher_dir: Path) -> dict[str, dict[str, float]]:
    """Per label: the judge's agreement with ``samples`` texts written at ``lambda`` 0 after the filled
    prompt, without (``plain``) and with ``start_new_word``, and the share starting inside the word."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from dfkd_ray.config import SteeredConfig
    from dfkd_ray.generation.hf import SteeredGenerator
    from dfkd_ray.generation.steering import GenerationRequest
    from dfkd_ray.models.teacher import Teacher

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    judge = LogisticRegression(max_iter=2000, C=10.0).fit(vectorizer.fit_transform(data["train_texts"]),
                                                         data["train_labels"])
    test_accuracy = float((judge.predict(vectorizer.transform(data["test_texts"])) == data["test_labels"]).mean())
    teacher = Teacher.from_pretrained("any", teacher_dir, num_blocks=1)
    out: dict[str, dict[str, float]] = {"judge test accuracy": {"all": round(test_accuracy, 4)}}
    for flag in (False, True):
        config = SteeredConfig(control_strength=0.0, top_m=50, top_k=50, top_p=0.9, temperature=0.75,
                               max_new_tokens=64, min_new_tokens=16, batch_size=samples, start_new_word=flag)
        gen = SteeredGenerator(lm, tokenizer, {"any": teacher}, config)
        for label in labels:
            reqs = [GenerationRequest("any", 0, seed=5000 + i, prompt=prompt.replace("{label}", label),
                                      control_strength=0.0) for i in range(samples)]
            texts = [r.text for r in gen.generate(reqs)]
            agree = float((judge.predict(vectorizer.transform(texts)) == space.global_id(label)).mean())
            key = "start_new_word" if flag else "plain"
            out.setdefault(label, {})[key] = round(agree, 4)
            out[label][f"{key} inside word"] = round(sum(t[:1].isalnum() for t in texts) / samples, 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", type=Path, required=True, help="a local causal-LM directory")
    p.add_argument("--spec", type=Path, required=True, help="benchmark spec whose label names fill the prompt")
    p.add_argument("--data", type=Path, default=Path("."), help="the spec's data directory (for a names_file)")
    p.add_argument("--prompt", default="Category: {label}")
    p.add_argument("--transfer-set", type=Path, default=None, help="a transfer set's Parquet: rows starting inside a word")
    p.add_argument("--judge-samples", type=int, default=0, help="texts a label at lambda 0, scored by a judge")
    p.add_argument("--teacher", type=Path, default=None, help="with --judge-samples: any local classifier directory")
    p.add_argument("--out", type=Path, default=Path("prompt_words.json"))
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    labels = label_names(load_spec(args.spec), args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.lm)
    lm = AutoModelForCausalLM.from_pretrained(args.lm, dtype=torch.float32).eval()
    rows = first_token_table(lm, tokenizer, labels, args.prompt)
    print(f"prompt {args.prompt!r}, LM {args.lm}")
    print("| label | P(first token continues the word) | most likely first token |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['p_continue']:.2f} | `{r['top_token']}` |")
    inside = transfer_set_starts(args.transfer_set) if args.transfer_set else {}
    if inside:
        print(f"\nrows of {args.transfer_set} whose text starts inside the prompt's last word")
        print("| label | rows | inside a word | first words of three |")
        print("|---|---|---|---|")
        for label, r in inside.items():
            print(f"| {label} | {r['rows']} | {r['inside_word']:.1%} | {' / '.join(r['examples'])} |")
    judged = {}
    if args.judge_samples:
        if args.teacher is None:
            p.error("--judge-samples needs --teacher (any local classifier directory) and --data")
        spec = load_spec(args.spec)
        space = label_space(spec)
        judged = judged_unguided(lm, tokenizer, labels, args.prompt, args.judge_samples,
                                 read_data(spec, args.data, space), space, args.teacher)
        print(f"\njudge (TF-IDF + logistic regression on the train rows; test accuracy "
              f"{judged['judge test accuracy']['all']:.4f}) on {args.judge_samples} texts a label at lambda 0")
        print("| label | judge agreement: plain / start_new_word | starting inside the word: plain / start_new_word |")
        print("|---|---|---|")
        for label in labels:
            j = judged[label]
            print(f"| {label} | {j['plain']:.2f} / {j['start_new_word']:.2f} | "
                  f"{j['plain inside word']:.2f} / {j['start_new_word inside word']:.2f} |")
    args.out.write_text(json.dumps({"lm": str(args.lm), "spec": str(args.spec), "prompt": args.prompt,
                                    "labels": rows, "transfer_set": inside, "judged": judged}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
