"""Confidence statistics on disk: safetensors + JSON round trip, the per-job directory, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.confidence import fit_estimator, load_estimator, load_estimators, save_estimator, save_estimators

H, C = 8, 3


def blocks(m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (m,), generator=g)
    z = torch.randn(m, 2, H, generator=g) + 3.0 * y[:, None, None]  # (M, N=2, H)
    return z, y


@pytest.mark.parametrize("transform", ["ecdf", "contrast"])
@pytest.mark.parametrize("method", ["rmd", "md", "msp"])
def test_save_load_round_trip(tmp_path, method, transform):
    z, y = blocks(120)
    logits = torch.randn(120, C)
    others = blocks(40, seed=3)[0] + 2.0  # the other teachers' rows (contrast)
    est = fit_estimator(z, logits, y, AmalgamationConfig(confidence=method, confidence_transform=transform), seed=4,
                        background_states=others, background_logits=torch.randn(40, C))
    save_estimator(est, tmp_path, "alpha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.json", "alpha.safetensors"]
    header = json.loads((tmp_path / "alpha.json").read_text())
    assert header["method"] == method and header["transform"] == transform and header["meta"]["seed"] == 4
    back = load_estimator(tmp_path, "alpha")
    assert (back.method, back.transform, back.num_blocks, back.num_classes, back.hidden_size) == \
           (est.method, est.transform, est.num_blocks, est.num_classes, est.hidden_size)
    assert back.meta == est.meta
    assert back.tensors.keys() == est.tensors.keys()
    for k, v in est.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    x, _ = blocks(30, seed=9)
    xl = torch.randn(30, C)
    assert torch.equal(back.confidence(x, xl), est.confidence(x, xl))


def test_save_and_load_all_teachers(tmp_path):
    z, y = blocks(80)
    ests = {"b": fit_estimator(z, torch.randn(80, C), y, AmalgamationConfig(confidence_transform="logistic"), seed=0),
            "a": fit_estimator(z, torch.randn(80, C), y, AmalgamationConfig(confidence="msp", confidence_transform="ecdf"),
                               seed=0)}
    save_estimators(tmp_path, ests)
    back = load_estimators(tmp_path)
    assert list(back) == ["b", "a"] and back["a"].method == "msp"
    with pytest.raises(FileNotFoundError, match="fit"):
        load_estimators(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_estimator(tmp_path, "c")


def test_unreadable_statistics_are_refused(tmp_path):
    z, y = blocks(40)
    save_estimator(fit_estimator(z, torch.randn(40, C), y, AmalgamationConfig(confidence_transform="logistic"), seed=0),
                   tmp_path, "a")
    header = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_estimator(tmp_path, "a")
    (tmp_path / "a.json").write_text(json.dumps({**header, "method": "energy"}))
    with pytest.raises(ValueError, match="unknown method"):
        load_estimator(tmp_path, "a")
