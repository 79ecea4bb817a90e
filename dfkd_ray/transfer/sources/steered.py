"""StrataNet section 4.2 'steerable data generator': a base LM steered by the request's teacher.

Each request (teacher, class, seed) becomes one text written with teacher-reweighted top-m decoding
(Eq. 1) by the engine ``transfer.steered.engine`` names: ``hf``,
:class:`~dfkd_ray.generation.hf.SteeredGenerator` (transformers), or ``vllm``,
:class:`~dfkd_ray.generation.vllm.VllmSteeredGenerator` (imported only then). Either engine takes the
``transfer.steered`` section as it was validated. The base class then labels the row with the target
class and records the teacher's confidence in it; that confidence is what the teacher believes, not
evidence of the class (steering can fool a teacher), so never report it as quality.
``source_params`` holds the engine, the decoding parameters, the filled prompt, the LM token count
and why decoding stopped.
"""

from __future__ import annotations

from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.sources.base import TransferSource


class SteeredSource(TransferSource):
    name = "steered"
    targeted = True

    @classmethod
    def builds_engine_first(cls, config) -> bool:
        return config.transfer.steered.engine == "vllm"

    def __init__(self, config, teachers, label_space):
        super().__init__(config, teachers, label_space)
        steered = config.transfer.steered
        if steered.engine == "vllm":
            from dfkd_ray.generation.vllm import VllmSteeredGenerator

            # vllm.LLM first; with teachers=None the generator loads ours after it, on the same device
            self.generator = VllmSteeredGenerator(steered, config.teachers, loaded_teachers=teachers)
            if teachers is None:
                self.teachers = self.generator.teachers
        else:
            from dfkd_ray.generation.hf import SteeredGenerator

            self.generator = SteeredGenerator.from_pretrained(steered, teachers)

    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        from dfkd_ray.generation.steering import GenerationRequest

        results = self.generator.generate(
            [GenerationRequest(teacher=r.teacher, target=r.teacher_class, seed=r.seed) for r in requests])
        return [(res.text, res.params) for res in results]
