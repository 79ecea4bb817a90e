"""Evaluation on a labelled file (label mapping, clear errors, scores, report) and the exported student's
round trip through ``pipeline("text-classification")`` and ``AutoModelForSequenceClassification``."""

from __future__ import annotations

import csv
import json
import math
import re

import pandas as pd
import pytest
import torch

from dfkd_ray.evaluation import (EvalDataError, ExportedStudent, auroc, ensemble_predictions, evaluate_predictions,
                                 evaluate_student, evaluate_teachers, kd_target_scores, load_labelled, plot_confusion,
                                 run_evaluation, teacher_logits, write_eval_report)
from dfkd_ray.labels import UnionLabelSpace

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

NAMES = ["sports", "cooking", "space", "finance"]
SPACE = UnionLabelSpace.from_teachers({"alpha": ["sports", "cooking"], "beta": ["space", "finance"]})
PNG = b"\x89PNG\r\n\x1a\n"


def write_csv(path, rows, header=("text", "label")):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# reading and label mapping


def test_label_names_are_normalised_to_union_ids(tmp_path):
    f = write_csv(tmp_path / "e.csv", [("a goal", "SPORTS"), ("soup", " Cooking "), ("orbit", "space"),
                                       ("NA", "Finance")])  # the text 'NA' is a text, not a missing value
    texts, labels = load_labelled(f, label_space=SPACE)
    assert texts == ["a goal", "soup", "orbit", "NA"] and labels == [0, 1, 2, 3]
    assert load_labelled(f, label_space=NAMES) == (texts, labels)  # names in id order work as well


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tsv", "json"])
def test_label_map_from_raw_values_in_every_format(tmp_path, fmt):
    df = pd.DataFrame({"body": ["goal", "soup", "orbit", "bond", "oven"], "y": [1, 2, 3, 4, 2]})
    path = tmp_path / f"e.{fmt}"
    if fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "json":
        df.to_json(path, orient="records")  # one JSON array
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, sep="\t", index=False)
    label_map = {"1": "Sports", "2": "cooking", "3": "SPACE", "4": "finance"}
    texts, labels = load_labelled(path, text_column="body", label_column="y", label_map=label_map, label_space=SPACE)
    assert texts == ["goal", "soup", "orbit", "bond", "oven"] and labels == [0, 1, 2, 3, 1]


def test_label_map_is_partial_and_float_labels_match_integer_keys(tmp_path):
    path = tmp_path / "e.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1.0, 2.0, 3.0]}).to_parquet(path)  # floats, as after a NaN
    assert load_labelled(path, label_map={"1": "space", "2": "finance", "3": "sports"}, label_space=SPACE)[1] == [2, 3, 0]
    f = write_csv(tmp_path / "p.csv", [("x", "7"), ("y", "cooking")])
    assert load_labelled(f, label_map={"7": "space"}, label_space=SPACE)[1] == [2, 1]  # unmapped: a name


def test_missing_columns_name_the_field_and_list_the_columns(tmp_path):
    f = write_csv(tmp_path / "e.csv", [("goal", "sports")], header=("description", "label"))
    with pytest.raises(EvalDataError) as e:
        load_labelled(f, label_space=SPACE)
    msg = str(e.value)
    assert "eval.text_column" in msg and "'text'" in msg and "['description', 'label']" in msg and str(f) in msg
    assert "eval.label_column" not in msg
    with pytest.raises(EvalDataError, match=r"no column 'y' \(eval.label_column\).*eval.text_column and eval.label_column"):
        load_labelled(f, text_column="body", label_column="y", label_space=SPACE)


def test_unknown_labels_listed_with_counts_and_the_union_labels(tmp_path):
    rows = [("t", "sports")] + [("t", "politics")] * 3 + [("t", "weather")] + [("t", f"x{i}") for i in range(12)]
    f = write_csv(tmp_path / "e.csv", rows)
    with pytest.raises(EvalDataError) as e:
        load_labelled(f, label_space=SPACE)
    msg = str(e.value)
    assert "'politics' x3" in msg and "'weather' x1" in msg and "and 4 more" in msg  # 14 unknown values, 10 shown
    assert "16 of 17 rows" in msg and str(NAMES) in msg and "eval.label_column" in msg and "eval.label_map" in msg
    with pytest.raises(EvalDataError, match=r"'1' \(mapped to 'sprots'\) x1.*fix those names in eval.label_map"):
        load_labelled(write_csv(tmp_path / "m.csv", [("t", "1")]), label_map={"1": "sprots"}, label_space=SPACE)


def test_empty_files_and_missing_values(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(EvalDataError, match=r"\(eval.path\) is empty"):
        load_labelled(empty, label_space=SPACE)
    header_only = write_csv(tmp_path / "h.csv", [])
    with pytest.raises(EvalDataError, match="is empty"):
        load_labelled(header_only, label_space=SPACE)
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text("")
    with pytest.raises(EvalDataError, match="is empty"):
        load_labelled(jsonl, label_space=SPACE)
    nulls = write_csv(tmp_path / "n.csv", [("goal", "sports"), ("", "space"), ("   ", "finance")])
    with pytest.raises(EvalDataError, match=r"2 of 3 rows have a missing or empty text in column 'text' "
                                            r"\(eval.text_column\), data rows 2, 3"):
        load_labelled(nulls, label_space=SPACE)
    jsonl.write_text('{"text": "goal", "label": "sports"}\n{"text": null, "label": "space"}\n')
    with pytest.raises(EvalDataError, match=r"eval.text_column.*rows 2 "):
        load_labelled(jsonl, label_space=SPACE)
    no_label = write_csv(tmp_path / "l.csv", [("goal", "sports"), ("soup", "")])
    with pytest.raises(EvalDataError, match=r"no label in column 'label' \(eval.label_column\), data rows 2 "):
        load_labelled(no_label, label_space=SPACE)
    with pytest.raises(EvalDataError, match=r"eval.path.*does not exist"):
        load_labelled(tmp_path / "nope.csv", label_space=SPACE)
    with pytest.raises(EvalDataError, match="unknown format"):
        load_labelled(write_csv(tmp_path / "e.txt", [("a", "sports")]), label_space=SPACE)


# --------------------------------------------------------------------------------------------
# scores


def test_metrics_equal_a_hand_computation():
    y = [0, 0, 1, 1, 2]
    p = [0, 1, 1, 1, 0]
    m = evaluate_predictions(y, p, NAMES)
    assert m["rows"] == 5 and m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # rows: true, cols: predicted
    pc = m["per_class"]
    assert list(pc) == NAMES  # every union label, even one absent from the file
    assert pc["sports"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["cooking"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pc["space"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert pc["finance"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # labels in the file or predicted
    json.dumps(m)  # plain types only
    with pytest.raises(ValueError, match="must lie in"):
        evaluate_predictions([0, 4], [0, 0], NAMES)


def test_ensemble_takes_the_max_logit_per_union_label():
    space = UnionLabelSpace.from_teachers({"a": ["x", "y"], "b": ["Y", "z"]})  # 'y' is shared
    logits = {"a": torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.0, 0.5]]),
              "b": torch.tensor([[1.5, 0.0], [4.0, 1.0], [0.4, 0.3]])}
    assert ensemble_predictions(logits, space).tolist() == [0, 1, 1]


class FakeStudent:
    """Outputs in another order than the union space: predictions must be mapped by name."""

    labels = ["Finance", "space", "cooking", "SPORTS"]

    def predict(self, texts, batch_size=64):
        ids = torch.tensor([{"g": 3, "s": 2, "o": 1, "f": 0}[t[0]] for t in texts])
        return torch.nn.functional.one_hot(ids, 4).float(), ids


def test_student_outputs_are_mapped_to_union_ids_by_name():
    m = evaluate_student(FakeStudent(), ["goal", "soup", "orbit", "fund", "fish"], [0, 1, 2, 3, 3], SPACE, batch_size=2)
    assert m["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]]

    class Stranger(FakeStudent):
        labels = ["sports", "cooking", "space", "weather"]

    with pytest.raises(EvalDataError, match="'weather'.*not in the union label space"):
        evaluate_student(Stranger(), ["goal"], [0], SPACE)


def test_teachers_on_the_synthetic_eval_file(synthetic_task, teachers):
    space = UnionLabelSpace.from_teachers({n: t.labels for n, t in teachers.items()})
    texts, labels = load_labelled(synthetic_task.eval_file, label_space=space)
    res = evaluate_teachers(teachers, texts, labels, space, batch_size=64)
    for name, t in res["teachers"].items():
        assert t["own_rows"] == 100 and t["own_accuracy"] >= 0.9, (name, t["own_accuracy"])
        assert t["own_labels"] == [space.names[g] for g in space.teacher_to_global[name]]
        # scored over the union labels, a teacher cannot be right on the other teacher's rows
        assert t["accuracy"] == pytest.approx(t["own_accuracy"] * 100 / len(labels))
        assert t["per_class"][t["own_labels"][0]]["recall"] >= 0.9
    # The ensemble rule, recomputed by hand. The fixture teachers are confidently wrong outside their own
    # topics (beta's logits on sports/cooking texts exceed alpha's), so the max-logit ensemble is far
    # below the teachers on their own rows: that gap is what confidence estimation is for.
    z = teacher_logits(teachers, texts)
    alpha = torch.stack([z["alpha"][:, 0], z["alpha"][:, 1], torch.full((len(texts),), -1e9),
                         torch.full((len(texts),), -1e9)], 1)
    beta = torch.stack([torch.full((len(texts),), -1e9), torch.full((len(texts),), -1e9), z["beta"][:, 0],
                        z["beta"][:, 1]], 1)
    by_hand = torch.maximum(alpha, beta).argmax(-1)
    assert res["ensemble"]["accuracy"] == pytest.approx((by_hand == torch.tensor(labels)).float().mean().item())
    assert res["ensemble"]["rows"] == 200 and "max" in res["ensemble"]["rule"]


def test_confusion_png(tmp_path):
    path = plot_confusion([[3, 1], [0, 4]], ["a", "b"], tmp_path / "sub" / "c.png", "title")
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="shape"):
        plot_confusion([[1, 2]], ["a", "b"], tmp_path / "x.png")


def test_report_files_and_summary(tmp_path):
    m = evaluate_predictions([0, 1, 2, 3], [0, 1, 2, 2], NAMES)
    t = dict(m, own_accuracy=1.0, own_rows=2, own_labels=NAMES[:2])
    report = write_eval_report({"labels": NAMES, "rows": 4, "student": m, "teachers": {"alpha": t}, "ensemble": m},
                               tmp_path / "eval")
    assert report.summary == (f"eval: student acc 0.750 (macro-F1 0.67) | alpha 0.75 (own 1.00) | ensemble 0.75 "
                              f"on 4 rows ({tmp_path / 'eval'})")
    assert set(report.files) == {"json", "confusion_student", "confusion_alpha", "confusion_ensemble"}
    assert all(p.read_bytes()[:8] == PNG for k, p in report.files.items() if k != "json")
    saved = json.loads(report.files["json"].read_text())
    assert saved["summary"] == report.summary and saved["student"]["confusion"] == m["confusion"]


# --------------------------------------------------------------------------------------------
# confidence diagnostics


def test_auroc_matches_sklearn_and_counts_ties_half():
    from sklearn.metrics import roc_auc_score

    a, b = torch.randn(50), torch.randn(60) + 0.5
    expected = roc_auc_score([0] * 50 + [1] * 60, torch.cat([a, b]).numpy())
    assert auroc(a, b) == pytest.approx(expected)
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])) == pytest.approx(0.875)  # 3 of 4 greater, 1 tie
    assert math.isnan(auroc(torch.tensor([]), b))


def test_kd_target_scores_score_the_confidence_weighted_union_target():
    """Two teachers over disjoint halves of four labels: the target is ``union_target`` with
    ``kd_teacher_weights``; gamma 0 mixes uniformly, a large gamma follows the more confident teacher."""
    from dfkd_ray.math.amalgamation import kd_teacher_weights
    from dfkd_ray.math.losses import union_target

    index = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    logits = [torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]]),  # teacher 0: labels 0, 1
              torch.tensor([[0.0, 1.0], [4.0, 0.0], [0.0, 2.5]])]  # teacher 1: labels 2, 3
    labels = torch.tensor([0, 2, 3])
    conf = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # (M, K); row 2 trusts the wrong teacher
    s = kd_target_scores(logits, index, labels, conf, powers=(0.0, 1.0, 64.0), num_labels=4, temperature=1.0)
    assert s["selects_own"] == pytest.approx(2 / 3)
    assert set(s["accuracy_by_power"]) == {"0.0", "1.0", "64.0"}
    for power in (0.0, 1.0, 64.0):
        p_t = union_target(logits, index, kd_teacher_weights(conf, power), 4, 1.0)
        assert s["accuracy_by_power"][str(power)] == pytest.approx(float((p_t.argmax(-1) == labels).float().mean()))
    assert s["accuracy_by_power"]["64.0"] == pytest.approx(2 / 3)  # the most confident teacher's argmax
    assert s["accuracy_by_power"]["0.0"] == pytest.approx(1.0)  # the uniform mix gets row 2 right


# --------------------------------------------------------------------------------------------
# the exported student


@pytest.fixture(scope="module")
def exported(synthetic_task, tmp_path_factory):
    from dfkd_ray.config import StudentConfig
    from dfkd_ray.models.student import Student

    student = Student.from_config(StudentConfig(path=synthetic_task.student, num_layers=2, max_length=48),
                                  labels=NAMES, amalg_dim=16)
    directory = student.save_pretrained(tmp_path_factory.mktemp("export") / "student")
    return student.eval(), directory


def test_export_round_trips_through_pipeline_and_auto_model(exported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    student, directory = exported
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    assert model.config.id2label == dict(enumerate(NAMES)) and model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(directory).model_max_length == 48  # the student's max_length
    clf = pipeline("text-classification", model=str(directory), tokenizer=str(directory), device=-1)
    texts = ["goal match team coach", "the rocket reached orbit", "simmer the sauce"]
    out = clf(texts)
    probs, ids = student.predict(texts)
    assert [o["label"] for o in out] == [NAMES[i] for i in ids.tolist()]
    assert [o["score"] for o in out] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    all_scores = clf(texts[:1], top_k=None)[0]
    assert sorted(s["label"] for s in all_scores) == sorted(NAMES)
    long = " ".join(["goal team"] * 200)  # 400+ tokens, beyond the model's 128 positions
    assert clf(long, truncation=True)[0]["label"] in NAMES


def test_exported_student_scores_like_the_student(exported, synthetic_task):
    student, directory = exported
    texts, labels = load_labelled(synthetic_task.eval_file, label_space=SPACE)
    loaded = ExportedStudent(directory)
    assert loaded.labels == NAMES and loaded.max_length == 48
    assert evaluate_student(loaded, texts, labels, SPACE, 32) == evaluate_student(student, texts, labels, SPACE, 32)


def test_run_evaluation_writes_the_report(job_dict, exported, teachers, tmp_path):
    from dfkd_ray.config import validate_config

    cfg = validate_config(job_dict)
    _, directory = exported
    res = run_evaluation(cfg, directory, teachers=teachers, out_dir=tmp_path / "eval")
    assert re.fullmatch(r"eval: student acc \d\.\d{3} \(macro-F1 \d\.\d\d\) \| alpha \d\.\d\d \(own \d\.\d\d\) \| "
                        r"beta \d\.\d\d \(own \d\.\d\d\) \| ensemble \d\.\d\d on 200 rows \(.*eval\)", res["summary"])
    assert res["rows"] == 200 and res["label_counts"] == {n: 50 for n in NAMES}
    for key in ("json", "confusion_student", "confusion_alpha", "confusion_beta", "confusion_ensemble"):
        assert (tmp_path / "eval").joinpath(res["files"][key].split("/")[-1]).is_file()
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"] == res["summary"]
    teachers_only = run_evaluation(cfg, None, teachers=teachers, out_dir=tmp_path / "t")
    assert "student" not in teachers_only and "confusion_student" not in teachers_only["files"]
    with pytest.raises(EvalDataError, match="eval.path is not set"):
        run_evaluation(validate_config({**job_dict, "eval": {}}), directory, teachers=teachers)
