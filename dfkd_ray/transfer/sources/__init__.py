"""Transfer sources behind one interface, selected by ``transfer.source``.

The registry maps names to ``"module:Class"`` strings, imported only when selected, so choosing
``corpus`` never imports a generation engine (and ``steered`` with ``engine: vllm`` is the only
path that imports vLLM).
"""

from __future__ import annotations

import importlib

from dfkd_ray.config import JobConfig
from dfkd_ray.labels import UnionLabelSpace
from dfkd_ray.models.teacher import load_teachers
from dfkd_ray.transfer.sources.base import TransferSource

SOURCES: dict[str, str] = {
    "random_words": "dfkd_ray.transfer.sources.random_words:RandomWordsSource",
    "corpus": "dfkd_ray.transfer.sources.corpus:CorpusSource",
    "steered": "dfkd_ray.transfer.sources.steered:SteeredSource",
    "prompt_tuned": "dfkd_ray.transfer.sources.prompt_tuned:PromptTunedSource",
}


def get_source_class(name: str) -> type[TransferSource]:
    if name not in SOURCES:
        raise KeyError(f"unknown transfer source {name!r}; known: {sorted(SOURCES)}")
    module, cls = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_source(cfg: JobConfig, label_space: UnionLabelSpace, *, device: str = "cpu") -> TransferSource:
    """The job's transfer source (``transfer.source``) with the job's teachers on ``device``; a source
    that builds its engine first (:meth:`TransferSource.builds_engine_first`) loads them itself."""
    source_class = get_source_class(cfg.transfer.source)
    if source_class.builds_engine_first(cfg):
        return source_class(cfg, None, label_space)
    return source_class(cfg, load_teachers(cfg.teachers, device=device), label_space)


__all__ = ["SOURCES", "TransferSource", "build_source", "get_source_class"]
