"""Generation engines: teacher-steered decoding (StrataNet section 4.2) with Hugging Face transformers
(``hf``) or vLLM (``vllm_engine``, a logits processor around the same step).

Imports are lazy: ``dfkd_ray.generation.hf`` imports transformers when it builds a model,
``token_map`` only torch, numpy and (when built) tokenizers, ``vllm_engine`` imports vLLM only when
its processor class or generator is asked for, ``vllm_rows`` is plain Python; the reweighting math
lives in :mod:`dfkd_ray.math.decoding` and the one Eq. 1 step both engines run in
:func:`dfkd_ray.generation.hf.steer_candidates`.
"""
