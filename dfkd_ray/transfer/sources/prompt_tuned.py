"""DFKD-T3 (arXiv 2311.01689) transfer source: a frozen LM rewrites general-domain documents through
tuned hybrid prompts.

Each request (teacher, class, seed) takes a source document from ``transfer.corpus`` the way the
``corpus`` source does (document ``perm[ordinal % n]`` of a seeded permutation; a retry draws one
from its own seed) and gets the LM's rewrite of it under the teacher's tuned prompt for the class
(:class:`~dfkd_ray.generation.prompt_tuning.HybridPromptLM`, the Hugging Face engine). The prompts
come from ``output.dir/prompts/``, tuned before generation starts
(:mod:`dfkd_ray.orchestration.prompts`, or :func:`~dfkd_ray.generation.prompt_tuning.write_prompts`
in one process). The base class labels the row with the target class and records the teacher's
confidence in it -- what the teacher believes, not evidence of the class. ``source_params``: the
commander, the stable level, the source document's id, the digest of the prompt file, the LM, its
token count and why decoding stopped.
"""

from __future__ import annotations

import random

from dfkd_ray.transfer.requests import Request
from dfkd_ray.transfer.sources.base import TransferSource


class PromptTunedSource(TransferSource):
    name = "prompt_tuned"
    targeted = True

    def __init__(self, config, teachers, label_space):
        super().__init__(config, teachers, label_space)
        from dfkd_ray.generation.prompt_tuning import HybridPromptLM, load_prompts
        from dfkd_ray.transfer.sources.corpus import corpus_documents

        self.documents, self.order = corpus_documents(config)
        self.prompts = load_prompts(config)
        device = next(iter(teachers.values())).device
        self.generator = HybridPromptLM.from_pretrained(config.transfer.prompt_tuned, device=device)

    def document(self, request: Request) -> int:
        """The source document of a request: distinct ones while they last, a seeded pick for a retry."""
        n = len(self.documents)
        return self.order[request.ordinal % n] if request.attempt == 0 else random.Random(request.seed).randrange(n)

    def texts(self, requests: list[Request]) -> list[tuple[str, dict]]:
        from dfkd_ray.generation.prompt_tuning import PromptRow

        c = self.config.transfer.prompt_tuned
        docs = [self.document(r) for r in requests]
        rows = [PromptRow(self.prompts[r.teacher].prompts[r.teacher_class],
                          self.generator.source_ids(self.documents[d]), r.seed) for r, d in zip(requests, docs)]
        out = []
        for r, d, rewrite in zip(requests, docs, self.generator.generate(rows)):
            out.append((rewrite.text, {
                "engine": "hf", "lm": self.generator.info.name, "commander": c.commander,
                "stable_level": c.stable_level, "document": d, "prompt_digest": self.prompts[r.teacher].digest,
                "num_soft_tokens": c.num_soft_tokens, "max_new_tokens": c.max_new_tokens,
                "min_new_tokens": c.min_new_tokens, "lm_tokens": len(rewrite.token_ids), "stop": rewrite.stop}))
        return out
