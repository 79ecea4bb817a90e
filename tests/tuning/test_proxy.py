"""The data-free proxy and the trial scorer, on a stand-in student (no model, no Ray)."""

from __future__ import annotations

import torch

from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.tuning.proxy import Probe, TrialScorer, probe_config, proxy_scores
from dfkd_ray.tuning.space import generation_fingerprint


class TableStudent:
    """Answers each text with the probabilities in ``table`` (over its own ``labels`` order)."""

    def __init__(self, labels, table):
        self.labels, self.table = labels, table

    def predict(self, texts, batch_size=64):
        p = torch.tensor([self.table[t] for t in texts])
        return p, p.argmax(-1)


SPACE = UnionLabelSpace.from_teachers({"alpha": ["sports", "cooking"], "beta": ["space", "finance"]})


def test_proxy_is_class_balanced_agreement_with_the_steered_class():
    names = list(SPACE.names)
    # The student lists its outputs in another order than the union: scores must follow the names.
    order = names[::-1]
    onehot = lambda name, p=0.7: [p if n == name else (1 - p) / 3 for n in order]  # noqa: E731
    probe = Probe(texts=[f"t{i}" for i in range(7)],
                  labels=[SPACE.global_id(n) for n in
                          ["sports", "sports", "sports", "sports", "cooking", "cooking", "space"]])
    said = {"t0": "sports", "t1": "sports", "t2": "sports", "t3": "cooking",  # 3 of 4 sports rows right
            "t4": "cooking", "t5": "finance",                               # 1 of 2 cooking rows right
            "t6": "finance"}                                                # the space row wrong
    student = TableStudent(order, {t: onehot(n) for t, n in said.items()})
    scores = proxy_scores(student, probe, SPACE)
    assert abs(scores["proxy"] - (0.75 + 0.5 + 0.0) / 3) < 1e-6  # classes count alike, whatever their size
    p_true = {"sports": (0.7 * 3 + 0.1) / 4, "cooking": (0.7 + 0.1) / 2, "space": 0.1}
    assert abs(scores["proxy_soft"] - sum(p_true.values()) / 3) < 1e-5


def test_trial_scorer_reports_proxy_dev_and_eval(sweep_dict, tmp_path):
    for name, rows in (("dev.csv", [("a", "sports"), ("b", "space")]), ("eval.csv", [("a", "cooking"), ("b", "space")])):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    sweep_dict["eval"] = {"path": str(tmp_path / "eval.csv")}
    sweep_dict["tune"]["dev"] = {"path": str(tmp_path / "dev.csv")}
    from dfkd_ray.config import validate_config

    cfg = validate_config(sweep_dict)
    names = list(SPACE.names)
    student = TableStudent(names, {"a": [0.9 if n == "sports" else 0.1 / 3 for n in names],
                                   "b": [0.9 if n == "space" else 0.1 / 3 for n in names]})
    scores = TrialScorer(cfg, None)(student)
    assert scores == {"dev_accuracy": 1.0, "eval_accuracy": 0.5}  # no probe set: no proxy


def test_probe_set_is_apart_from_every_trial_set(sweep_config):
    probe = probe_config(sweep_config)
    assert probe.transfer.source == "steered" and probe.transfer.heldout_fraction == 0.0
    assert probe.transfer.samples_per_class == sweep_config.tune.proxy_samples_per_class
    assert probe.seed != sweep_config.seed
    assert probe.transfer.steered == sweep_config.transfer.steered  # the sweep's own generation settings
    assert generation_fingerprint(probe) != generation_fingerprint(sweep_config)
