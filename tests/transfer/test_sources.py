"""The baseline transfer sources (corpus, random words) and the teachers that label their rows."""

from __future__ import annotations

import json

import pytest

from dfkd_ray.config import validate_config
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.transfer.store import read_transfer_table
from dfkd_ray.transfer.writer import write_transfer_set


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
