"""The rows of the amalgamation benchmark: a registry, row name -> its transfer set and amalgamation.

A row is one student: trained on one **transfer set** with one ``amalgamation`` section, scored on
the benchmark's test set. Transfer sets are registered by name; each is made once per call and
shared by every row that names it.

- :data:`TRANSFER_SETS`: transfer-set name -> a function ``(settings) -> dict`` that gives the
  ``transfer`` fields of that set (``source`` and what differs in the source's own section; merged
  into the fields every set shares, :func:`harness.setup.job_config`). ``settings`` is the call's
  :class:`~harness.setup.Settings` (command line, benchmark spec, work directory).
- :data:`ROWS`: row name -> :class:`Row` (its transfer set, ``amalgamation`` fields, and its role
  in the table: ``baseline`` rows are what StrataNet must beat, ``method`` is StrataNet itself).

**Adding a row for a new transfer source** is one block here (``prompt_tuned`` below is one)::

    @transfer_set("prompt_tuned")
    def _prompt_tuned(settings) -> dict:
        return {"source": "prompt_tuned", "prompt_tuned": {"lm_path": str(settings.args.lm)}}

    ROWS["vanilla_prompt_tuned"] = Row("prompt_tuned", VANILLA, "baseline")
    ROWS["stratanet_prompt_tuned"] = Row("prompt_tuned", STRATANET, "diagnostic")

The new rows are then valid in ``--rows`` and in a spec's ``rows:`` list, get the transfer
diagnostics and (StrataNet rows) the confidence diagnostics, ``--save-transfer`` /
``--transfer-from`` keep their set as ``<set name>.parquet``, and ``--report`` counts a
``baseline`` row as a vanilla row to beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

Role = Literal["method", "baseline", "ablation", "diagnostic"]

VANILLA = {"method": "vanilla"}
STRATANET = {"method": "stratanet", "confidence": "rmd", "fusion": "st"}


@dataclass(frozen=True)
class Row:
    """One table row: the transfer set it trains on, its ``amalgamation`` fields, its role, and
    ``train`` fields where it trains differently from the other rows."""

    transfer_set: str
    amalgamation: dict
    role: Role
    train: dict = field(default_factory=dict)


TRANSFER_SETS: dict[str, Callable[[object], dict]] = {}


def transfer_set(name: str) -> Callable:
    """Register ``function(settings) -> transfer fields`` as the transfer set ``name``."""
    def register(function: Callable[[object], dict]) -> Callable[[object], dict]:
        TRANSFER_SETS[name] = function
        return function
    return register


@transfer_set("random_words")
def _random_words(settings) -> dict:
    return {"source": "random_words"}


@transfer_set("corpus")
def _corpus(settings) -> dict:
    """The general-domain text file of ``--corpus``."""
    return {"source": "corpus"}


@transfer_set("steered")
def _steered(settings) -> dict:
    return {"source": "steered", "min_confidence": settings.args.min_confidence}


@transfer_set("real")
def _real(settings) -> dict:
    """The benchmark's own train texts without their labels (the teachers label them, as for
    ``corpus``): a ceiling for what better generated text can give."""
    return {"source": "corpus", "corpus": {"path": str(settings.real_text_file)}}


@transfer_set("prompt_tuned")
def _prompt_tuned(settings) -> dict:
    """DFKD-T3: the ``--lm`` LM rewrites ``--corpus`` documents through hybrid prompts tuned per teacher
    and class; every rewrite is kept (the paper filters none), as long as a steered text may be."""
    args = settings.args
    from harness.setup import length_fields, parse_fields

    tiny = {"tuning_steps": 2, "tuning_batch_size": 4, "max_source_tokens": 16} if args.tiny else {}
    return {"source": "prompt_tuned",
            "prompt_tuned": {"lm_path": str(args.lm), **length_fields(args), "batch_size": args.gen_batch, **tiny,
                             **parse_fields(args.prompt_tuned, "--prompt-tuned")}}


ROWS: dict[str, Row] = {
    "vanilla_random": Row("random_words", VANILLA, "baseline"),
    "vanilla_corpus": Row("corpus", VANILLA, "baseline"),
    "vanilla_steered": Row("steered", VANILLA, "baseline"),
    "stratanet": Row("steered", STRATANET, "method"),
    "stratanet_msp": Row("steered", {**STRATANET, "confidence": "msp"}, "ablation"),
    "stratanet_nost": Row("steered", {**STRATANET, "fusion": "no_st"}, "ablation"),
    "stratanet_trained_st": Row("steered", {**STRATANET, "train_fusion": True}, "ablation"),
    # no confidence in the KD target: each row's target from the teacher it was made for (kd_source_weight 1)
    "stratanet_source": Row("steered", {**STRATANET, "kd_source_weight": 1.0}, "ablation"),
    # a one-class teacher's confidence from its own statistics instead of by elimination (no effect without one)
    "stratanet_own_one_class": Row("steered", {**STRATANET, "one_class_confidence": "own"}, "ablation"),
    # the student also trains on general-domain documents (train.corpus_share of its rows), labelled by the KD target
    "stratanet_mix25": Row("steered", STRATANET, "ablation", {"corpus_share": 0.25}),
    "stratanet_mix50": Row("steered", STRATANET, "ablation", {"corpus_share": 0.5}),
    "stratanet_random": Row("random_words", STRATANET, "diagnostic"),
    "stratanet_corpus": Row("corpus", STRATANET, "diagnostic"),
    "vanilla_real": Row("real", VANILLA, "diagnostic"),
    "stratanet_real": Row("real", STRATANET, "diagnostic"),
    "vanilla_prompt_tuned": Row("prompt_tuned", VANILLA, "baseline"),
    "stratanet_prompt_tuned": Row("prompt_tuned", STRATANET, "diagnostic"),
}
