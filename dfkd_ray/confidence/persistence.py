"""Confidence statistics on disk: safetensors (the tensors) plus a JSON sidecar (method, sizes, fit facts).

One directory holds every teacher of a job: ``<teacher>.safetensors``, ``<teacher>.json`` and
``index.json`` (the teacher order). Never pickled.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import torch

from dfkd_ray.config import AmalgamationConfig
from dfkd_ray.confidence.estimator import ConfidenceEstimator

FORMAT_VERSION = 1
METHODS = typing.get_args(AmalgamationConfig.model_fields["confidence"].annotation)
TRANSFORMS = typing.get_args(AmalgamationConfig.model_fields["confidence_transform"].annotation)


def save_estimator(estimator: ConfidenceEstimator, directory: str | Path, name: str) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json``; returns the JSON file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    e = estimator
    header = {"format_version": FORMAT_VERSION, "method": e.method, "transform": e.transform,
              "num_blocks": e.num_blocks, "num_classes": e.num_classes, "hidden_size": e.hidden_size, "meta": e.meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in e.tensors.items()}
    save_file(tensors, str(directory / f"{name}.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
    (directory / f"{name}.json").write_text(json.dumps(header, indent=2))
    return directory / f"{name}.json"


def load_estimator(directory: str | Path, name: str, device: torch.device | str = "cpu") -> ConfidenceEstimator:
    """Read what :func:`save_estimator` wrote."""
    from safetensors.torch import load_file

    directory = Path(directory)
    header_file, tensor_file = directory / f"{name}.json", directory / f"{name}.safetensors"
    for f in (header_file, tensor_file):
        if not f.is_file():
            raise FileNotFoundError(f"confidence statistics {f} are missing; fit them first")
    header = json.loads(header_file.read_text())
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{header_file}: format_version {header.get('format_version')} is not {FORMAT_VERSION}")
    if header["method"] not in METHODS or header["transform"] not in TRANSFORMS:
        raise ValueError(f"{header_file}: unknown method {header['method']!r} or transform {header['transform']!r}")
    tensors = load_file(str(tensor_file), device=str(device))
    needed = {"calib_scores", "calib_center", "calib_scale"}
    if header["method"] != "msp":
        needed |= {"means", "present", "precision", "bg_mean", "bg_precision"}
    if needed - set(tensors):
        raise ValueError(f"{tensor_file} lacks tensors {sorted(needed - set(tensors))}")
    return ConfidenceEstimator(header["method"], header["transform"], int(header["num_blocks"]),
                               int(header["num_classes"]), int(header["hidden_size"]), tensors, header.get("meta", {}))


def save_estimators(directory: str | Path, estimators: dict[str, ConfidenceEstimator]) -> Path:
    """All teachers' statistics in one directory, plus ``index.json``; returns the index."""
    directory = Path(directory)
    for name, est in estimators.items():
        save_estimator(est, directory, name)
    index = directory / "index.json"
    index.write_text(json.dumps({"teachers": list(estimators)}, indent=2))
    return index


def load_estimators(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, ConfidenceEstimator]:
    """Read what :func:`save_estimators` wrote, in the saved teacher order."""
    index = Path(directory) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing; fit the confidence statistics first")
    names = json.loads(index.read_text())["teachers"]
    return {name: load_estimator(directory, name, device) for name in names}
