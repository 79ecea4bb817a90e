"""Transfer sources behind one interface, selected by ``transfer.source``.

The registry maps names to ``"module:Class"`` strings, imported only when selected, so choosing
``corpus`` never imports a generation engine (and ``steered`` with ``engine: vllm`` is the only
path that imports vLLM).
"""

from __future__ import annotations

import importlib

from dfkd_ray.transfer.sources.base import TransferSource

SOURCES: dict[str, str] = {
    "random_words": "dfkd_ray.transfer.sources.random_words:RandomWordsSource",
    "corpus": "dfkd_ray.transfer.sources.corpus:CorpusSource",
    "steered": "dfkd_ray.transfer.sources.steered:SteeredSource",
}


def get_source_class(name: str) -> type[TransferSource]:
    if name not in SOURCES:
        raise KeyError(f"unknown transfer source {name!r}; known: {sorted(SOURCES)}")
    module, cls = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["SOURCES", "TransferSource", "get_source_class"]
