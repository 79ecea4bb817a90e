"""StrataNet section 4.2 'steerable data generator': a base LM steered by the request's teacher.

Each request (teacher, class, seed) becomes one text written by :class:`~dfkd_ray.generation.hf.
SteeredGenerator` with teacher-reweighted top-m decoding (Eq. 1). The base class then labels the
row with the target class and records the teacher's confidence in it; that confidence is what the
teacher believes, not evidence of the class (steering can fool a teacher), so never report it as
quality. ``source_params`` holds the decoding parameters, the filled prompt, the LM token count and
why decoding stopped.
"""

from __future__ import annotations

from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.sources.base import TransferSource


class SteeredSource(TransferSource):
    name = "steered"
    targeted = True

    def __init__(self, config, teachers, label_space):
        super().__init__(config, teachers, label_space)
        from dfkd_ray.generation.hf import SteeredGenerator, SteeredParams

        cfg = config.transfer.steered
        if cfg.engine != "hf":
            raise NotImplementedError(f"transfer.steered.engine={cfg.engine!r} is not implemented yet; use 'hf'")
        if cfg.lm_path is None:
            raise ValueError("transfer.steered.lm_path is not set: give a local causal-LM directory")
        self.params = SteeredParams.from_config(cfg)
        self.generator = SteeredGenerator.from_pretrained(cfg.lm_path, teachers, self.params)

    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        from dfkd_ray.generation.hf import GenerationRequest

        results = self.generator.generate(
            [GenerationRequest(teacher=r.teacher, target=r.teacher_class, seed=r.seed) for r in requests])
        return [(res.text, res.params) for res in results]
