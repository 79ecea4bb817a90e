"""dfkd-ray: data-free knowledge distillation and amalgamation of text classifiers on Ray.

Importing the package is cheap: it imports neither ``ray``, ``vllm`` nor ``transformers``.
The layers, imports pointing one way:

- ``dfkd_ray.math``: pure PyTorch (reweighting, confidence, amalgamation layers, losses).
- ``dfkd_ray.models``, ``dfkd_ray.transfer``: engines and models (transformers, pyarrow; vLLM lazily).
- ``dfkd_ray.orchestration``: the only code that imports ``ray``.

``dfkd_ray.config`` and ``dfkd_ray.labels`` need neither torch nor Ray.
"""

__version__ = "0.1.0"
