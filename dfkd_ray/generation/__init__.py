"""Generation engines: teacher-steered decoding (StrataNet section 4.2, Eq. 1).

- :mod:`~dfkd_ray.generation.steering`: what both engines share -- requests, rows, results, the LM's
  token roles, the teacher term, and :func:`~dfkd_ray.generation.steering.steer_step`, the one step
  of Eq. 1 (its math in :mod:`dfkd_ray.math.decoding`);
- :mod:`~dfkd_ray.generation.hf`: the Hugging Face transformers decoding loop
  (:mod:`~dfkd_ray.generation.streams`: its CUDA-stream helpers);
- :mod:`~dfkd_ray.generation.vllm`: a vLLM logits processor around the same step
  (:mod:`~dfkd_ray.generation.vllm_rows`: vLLM's batch protocol as plain Python);
- :mod:`~dfkd_ray.generation.token_map`: the teacher's ids of each candidate text, incrementally.

Imports are lazy: transformers is imported when a model or tokenizer is built, vLLM only when the
processor class or the vLLM generator is asked for.
"""
