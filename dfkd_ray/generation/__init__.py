"""Generation engines: teacher-steered decoding (StrataNet section 4.2) with Hugging Face transformers.

Imports are lazy: ``dfkd_ray.generation.hf`` imports transformers, ``token_map`` only torch, numpy
and (when built) tokenizers; the reweighting math both use lives in :mod:`dfkd_ray.math.decoding`.
"""
