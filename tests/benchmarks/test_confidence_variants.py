"""``benchmarks/confidence_variants.py`` on hand-made features: the one-class rules change only a split
with a one-class teacher, and bad rule or transform names are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import confidence_variants  # noqa: E402

from dfkd_ray.labels import UnionLabelSpace  # noqa: E402


def features(directory: Path, teachers: dict[str, list[str]], seed: int = 0) -> Path:
    """Features of the shape ``amalgamation.py --save-features`` writes (one block): every teacher's rows
    are Gaussians around a per-class centre, wide enough to overlap; the test and dev rows drawn the same way."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    space = UnionLabelSpace.from_teachers(teachers)
    names, H = list(teachers), 8
    centre = {c: 3 * torch.randn(H, generator=g) for c in space.names}
    rows = [(k, i, space.teacher_to_global[n][i]) for k, n in enumerate(names) for i in range(len(teachers[n]))
            for _ in range(30)]

    def draw(labels):
        return torch.stack([centre[space.names[y]] + 3 * torch.randn(H, generator=g) for y in labels])  # overlapping

    split_labels = {s: [y for _, _, y in rows] for s in ("transfer", "test", "dev")}
    x = {s: draw(ls) for s, ls in split_labels.items()}
    meta = {"transfer_label": torch.tensor(split_labels["transfer"]),
            "transfer_teacher": torch.tensor([k for k, _, _ in rows]),
            "transfer_class": torch.tensor([i for _, i, _ in rows]),
            "transfer_heldout": torch.ones(len(rows), dtype=torch.bool),
            "test_label": torch.tensor(split_labels["test"]), "dev_label": torch.tensor(split_labels["dev"])}
    for n in names:
        for s in ("transfer", "test", "dev"):
            meta[f"{n}.{s}_logits"] = torch.randn(len(rows), len(teachers[n]), generator=g)
        save_file({s: x[s].half() for s in x}, str(directory / f"{n}-block1.safetensors"))
    save_file(meta, str(directory / "meta.safetensors"), metadata={"label_space": json.dumps(space.to_dict())})
    return directory


def run(tmp_path: Path, teachers: dict, *flags: str) -> list[dict]:
    out = tmp_path / "variants.json"
    confidence_variants.main(["--features", str(features(tmp_path, teachers)), "--out", str(out), "--centers",
                              "quantile:0.995", "--repeats", "1", "--seeds", "0", *flags])
    return json.loads(out.read_text())["variants"]


def test_the_one_class_rules_differ_only_where_a_teacher_has_one_class(tmp_path):
    two = run(tmp_path, {"a": ["x", "y"], "b": ["z", "w"]}, "--one-class", "elimination,own")
    assert [v["one_class_confidence"] for v in two] == ["elimination", "own"]
    assert two[0]["runs"] == two[1]["runs"]
    (tmp_path / "solo").mkdir()
    solo = run(tmp_path / "solo", {"a": ["x", "y"], "b": ["z"]}, "--one-class", "elimination,own")
    assert solo[0]["runs"] != solo[1]["runs"]
    assert all(0.0 <= v[s]["accuracy_mean"] <= 1.0 for v in solo for s in ("dev", "test"))


@pytest.mark.parametrize("flag, value", [("--one-class", "elim"), ("--transforms", "softmax")])
def test_unknown_rules_and_transforms_are_refused_by_name(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        run(tmp_path, {"a": ["x", "y"], "b": ["z"]}, flag, value)
    assert f"{flag} takes" in capsys.readouterr().err
