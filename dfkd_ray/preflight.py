"""What a job checks before Ray starts: the directories and files its config points at, the
machine, and the output directory.

:func:`preflight` takes a schema-valid :class:`~dfkd_ray.config.JobConfig`, builds the demo task
when ``demo:`` is set, and checks: each teacher directory (``config.json`` with real, distinct
``id2label`` names, tokenizer files, ``trust_remote_code`` when its config has ``auto_map``), the
student and LM directories, the corpus file, the eval
file (format, columns, label names), the ``prompt_tuned`` source's LM, commander and corpus
(:func:`prompt_tuned_checks`), vLLM and a GPU for ``transfer.steered.engine: vllm`` (unless
the job was submitted to a cluster: ``RAY_ADDRESS`` set), for ``transfer.source: embedding_guessing``
that the teachers share one input-embedding space the student can hold
(:func:`embedding_guessing_problems`), that a local Ray's train workers and generation actors fit
this machine's CPUs and GPUs, fractional GPU shares packed as Ray places them
(:func:`resource_plan_problems`), a sweep's ``tune`` section (:func:`tune_problems`), and that
``output.dir`` can be written and holds no other job's results. Every problem comes in one
:class:`~dfkd_ray.config.ConfigError`,
each at its field path. It returns the config with every path absolute (against
:func:`relative_path_base`) and each teacher's ``labels`` filled: the one place a job reads them.

:func:`check_config` is the schema and the preflight together, every problem of both at once;
job scripts run it through :func:`parse_job_args`. Engine layer: torch is
imported only for the eval file, the vLLM check, the ``prompt_tuned`` LM's tokenizer and the
embedding-guessing checks, never Ray.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

import yaml

from dfkd_ray.config import (ConfigError, EvalConfig, JobConfig, TeacherConfig, read_config, salvage_config,
                             validate_config)
from dfkd_ray.labels import LabelSpaceError, UnionLabelSpace, normalize_label, read_teacher_labels

JOB_MARKER = "dfkd_job.json"
"""File in ``output.dir`` recording which job owns the directory."""

LOCK_FILE = "dfkd_job.lock"
"""File in ``output.dir`` while a job runs there: its host, pid and start time (one job at a time)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
"""A teacher directory holds at least one of these (its tokenizer, saved with ``save_pretrained``)."""

EVAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

HOME_VARIABLE = "DFKD_RAY_HOME"
"""Environment variable: the directory relative config paths are under when a job runs in Ray's
copy of a submitted working directory (:func:`relative_path_base`)."""

DEFAULT_HOME = "~/dfkd-ray"
""":data:`HOME_VARIABLE`'s default (``~``: the home of the user who started Ray)."""


def in_ray_working_dir_copy(path: str | Path) -> bool:
    """Whether ``path`` lies in the copy of a working directory that Ray unpacks for a job, task or
    actor (``ray job submit --working-dir``): ``.../runtime_resources/working_dir_files/_ray_pkg_<hash>/``."""
    parts = Path(path).parts
    return any(a == "working_dir_files" and b.startswith("_ray_pkg_") for a, b in zip(parts, parts[1:]))


def relative_path_base() -> Path:
    """The directory relative paths in a job's config are relative to: the current directory, except
    in Ray's copy of a submitted working directory (:func:`in_ray_working_dir_copy`), where it is
    ``$DFKD_RAY_HOME`` (default ``~/dfkd-ray``).

    Ray deletes that copy with its session and leaves git-ignored files (``.cache/``, ``runs/``) out
    of it: an ``output.dir`` there would be lost, and a ``demo`` task built there would be built again
    by every new session. Raises :class:`~dfkd_ray.config.ConfigError` when ``DFKD_RAY_HOME`` is not
    an absolute path.
    """
    cwd = Path.cwd()
    if not in_ray_working_dir_copy(cwd):
        return cwd
    home = Path(os.environ.get(HOME_VARIABLE) or DEFAULT_HOME).expanduser()
    if not home.is_absolute():
        raise ConfigError([(HOME_VARIABLE, f"must be an absolute path, got {str(home)!r}: relative config paths of "
                                           "a submitted job are resolved against it")], "the environment")
    return home


def preflight(cfg: JobConfig) -> JobConfig:
    """``cfg`` with every path absolute and teachers' ``labels`` filled; raises one
    :class:`~dfkd_ray.config.ConfigError` listing every problem found."""
    cfg, problems = _inspect(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def check_config(data: dict, *, source: str = "config") -> JobConfig:
    """:func:`~dfkd_ray.config.validate_config`, then :func:`preflight`, reporting every problem of
    both in one :class:`~dfkd_ray.config.ConfigError`: when the schema fails, the preflight still
    checks the fields that validated (:func:`~dfkd_ray.config.salvage_config`)."""
    try:
        cfg = validate_config(data, source=source)
    except ConfigError as e:
        _, found = _inspect(salvage_config(data))
        reported = {path for path, _ in e.problems}
        raise ConfigError(e.problems + [p for p in found if p[0] not in reported], source) from None
    cfg, problems = _inspect(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _inspect(cfg: JobConfig) -> tuple[JobConfig, list[tuple[str, str]]]:
    """The preflight's config and problems. ``cfg`` may be salvaged from an invalid config: a
    field that failed validation is None, and the checks that need it are skipped."""
    cfg = cfg.absolute(relative_path_base())
    if cfg.demo is not None:
        from dfkd_ray.synthetic import build_synthetic_task, synthetic_task_built

        if not synthetic_task_built(cfg.demo):
            from transformers.utils import logging as hf_logging

            print(f"building the demo task (teachers, LM, corpus) under {cfg.demo}, once", flush=True)
            hf_logging.disable_progress_bar()  # one bar per saved model says nothing more than this line
        build_synthetic_task(cfg.demo)  # cached: a no-op once built
        if getattr(cfg.transfer, "source", None) == "embedding_guessing":
            from dfkd_ray.synthetic import build_shared_embedding_teacher

            build_shared_embedding_teacher(cfg.demo)  # teacher gamma, in alpha's embedding space (cached)
    teachers, problems, known = _read_teachers(list(cfg.teachers or []))
    for field, path in (("student.path", cfg.student.path), ("transfer.steered.lm_path", cfg.transfer.steered.lm_path)):
        if path is not None:
            try:
                read_model_config(path)
            except ValueError as e:
                problems.append((field, str(e)))
    if cfg.transfer.corpus.path is not None:
        problem = _file_problem(cfg.transfer.corpus.path, "corpus file",
                                "; give a text file with one document per line")
        if problem:
            problems.append(("transfer.corpus.path", problem))
        elif cfg.transfer.source == "corpus" and known is not None and None not in _corpus_settings(cfg):
            from dfkd_ray.transfer.sources.corpus import corpus_problems

            problems += corpus_problems(cfg, known)
        if not problem and getattr(cfg.train, "corpus_share", 0) and known is not None and None not in _corpus_settings(cfg):
            from dfkd_ray.transfer.sources.corpus import corpus_share_problems

            problems += corpus_share_problems(cfg, known)
    if cfg.transfer.source == "prompt_tuned":
        found, notes = prompt_tuned_checks(cfg)
        problems += found
        for note in notes:
            print(f"note: {note}", flush=True)
    for note in one_class_teacher_notes(known or {}):
        print(f"note: {note}", flush=True)
    if cfg.transfer.steered.engine == "vllm" and not os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` (RAY_ADDRESS set) the head node may lack vLLM and GPUs by design:
        # the generation actors check there.
        problem = vllm_engine_problem()
        if problem:
            problems.append(("transfer.steered.engine", problem))
    if getattr(cfg.train, "compile", "none") != "none" and not os.environ.get("RAY_ADDRESS"):
        problem = compile_problem(cfg.train.compile, cfg.ray.use_gpu)  # a cluster's workers are checked by torch
        if problem:
            problems.append(("train.compile", problem))
    if cfg.transfer.class_weights and known is not None:
        names = sorted({n for labels in known.values() for n in labels})
        normalized = {normalize_label(n) for n in names}
        unknown = [k for k in cfg.transfer.class_weights if normalize_label(k) not in normalized]
        if unknown:
            problems.append(("transfer.class_weights", f"names labels no teacher has: {unknown}; known: {names}"))
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        # A local Ray: this machine is the whole cluster. A cluster (which may autoscale) is checked
        # when the job joins it, as a warning.
        cores = os.cpu_count() or 1
        problems += resource_plan_problems(
            cfg, local_resources(cfg),
            where=f"this machine ({cores} cores, each booked for at most {LOCAL_PROCESSES_PER_CORE} processes)")
    if getattr(cfg.transfer, "source", None) == "embedding_guessing" and known is not None:
        problems += embedding_guessing_problems(cfg.model_copy(update={"teachers": teachers}))
    if known is not None:
        problems += heldout_problems(cfg.model_copy(update={"teachers": teachers}))
    problem = _eval_problem(cfg.eval, known)
    if problem:
        problems.append(("eval.path", problem))
    problems += tune_problems(cfg, known)
    if cfg.output.dir is not None and cfg.name is not None:
        problem = _output_dir_problem(cfg.output.dir, cfg.name)
        if problem:
            problems.append(("output.dir", problem))
    return cfg.model_copy(update={"teachers": teachers}), problems


def one_class_teacher_notes(teacher_labels: dict[str, list[str]]) -> list[str]:
    """What a teacher of one class cannot do, said before any work: its softmax is 1 on every text."""
    return [f"teacher {name!r} has one class ({labels[0]!r}): its softmax is 1 on every text, so its probabilities "
            "carry nothing. Steered generation and prompt tuning cannot steer toward its class (its rows are the LM's "
            "unsteered text after the prompt), and vanilla KD and "
            f"MSP confidence cannot tell when a text is {labels[0]!r}; only the confidence stage can (amalgamation.method "
            "stratanet: its own statistics times what the teachers of several classes leave unclaimed, "
            "amalgamation.one_class_confidence). train.corpus_share=0.5 also helped on the benchmark with such a "
            "teacher (docs/confidence.md, docs/amalgamation.md)"
            for name, labels in teacher_labels.items() if labels is not None and len(labels) == 1]


def _corpus_settings(cfg: JobConfig) -> tuple:
    """The settings the corpus check reads (None where a salvaged config's field failed validation)."""
    c, t = cfg.transfer.corpus, cfg.transfer
    return c.min_words, c.max_words, c.encoding, t.samples_per_class, t.class_weights, t.dedup


def prompt_tuned_checks(cfg: JobConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """The ``prompt_tuned`` source's problems with its files, and notes for the user.

    Problems: an LM directory that is not a decoder-only model with a tokenizer, a commander the
    LM's tokenizer turns into no token, a prompt plus rewrite longer than the LM's context, and a
    corpus file that is not text in its encoding or has no document. Note: a commander the LM's
    tokenizer splits into several pieces (allowed: the hybrid prompt starts with all of them).
    Skips what a salvaged config's failed fields would need.
    """
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    c, corpus = cfg.transfer.prompt_tuned, cfg.transfer.corpus
    if c is None:
        return problems, notes
    if c.lm_path is not None:
        try:
            lm_config = read_model_config(c.lm_path)
        except ValueError as e:
            problems.append(("transfer.prompt_tuned.lm_path", str(e)))
        else:
            problems += _prompt_lm_problems(c, lm_config, notes)
    if corpus is not None and corpus.path is not None and not _file_problem(corpus.path, "corpus file") \
            and None not in (corpus.min_words, corpus.max_words, corpus.encoding):
        from dfkd_ray.transfer.sources.corpus import CorpusEncodingError, read_documents

        try:
            docs = read_documents(corpus.path, min_words=corpus.min_words, max_words=corpus.max_words,
                                  encoding=corpus.encoding)
        except CorpusEncodingError as e:
            problems.append(("transfer.corpus.encoding", str(e)))
        else:
            if not docs:
                problems.append(("transfer.corpus.path", f"{corpus.path} has no line with >= {corpus.min_words} words "
                                                         "(transfer.corpus.min_words): the prompt_tuned source "
                                                         "rewrites its documents; give a text file with one "
                                                         "document per line"))
    return problems, notes


def _prompt_lm_problems(c, lm_config: dict, notes: list[str]) -> list[tuple[str, str]]:
    """The LM directory's problems for ``transfer.prompt_tuned`` (its config, tokenizer, commander and
    context); the note on a commander in pieces goes to ``notes``."""
    field = "transfer.prompt_tuned.lm_path"
    if lm_config.get("is_encoder_decoder"):
        return [(field, f"{c.lm_path} holds an encoder-decoder model ({', '.join(lm_config.get('architectures') or [])})"
                        "; the prompt_tuned source rewrites with a decoder-only causal LM: point it at one (e.g. a "
                        "GPT-2 or LLaMA-style directory)")]
    if not any((Path(c.lm_path) / f).is_file() for f in TOKENIZER_FILES):
        return [(field, f"{str(c.lm_path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the LM's "
                        "tokenizer there too (`tokenizer.save_pretrained(DIR)`)")]
    if None in (c.commander, c.num_soft_tokens, c.max_source_tokens, c.max_new_tokens):
        return []
    from transformers import AutoTokenizer

    from dfkd_ray.generation.prompt_tuning import commander_pieces

    tokenizer = AutoTokenizer.from_pretrained(c.lm_path)
    pieces = commander_pieces(tokenizer, c.commander)
    if not pieces:
        return [("transfer.prompt_tuned.commander", f"{c.commander!r} gives no token of the LM's tokenizer; give a "
                                                    "word such as 'summarize'")]
    if len(pieces) > 1:
        notes.append(f"transfer.prompt_tuned.commander {c.commander!r} is {len(pieces)} pieces of the LM's tokenizer "
                     f"({tokenizer.convert_ids_to_tokens(pieces)}); the hybrid prompt starts with all of them")
    context = int(lm_config.get("max_position_embeddings") or lm_config.get("n_positions") or 0)
    need = 1 + c.max_source_tokens + len(pieces) + c.num_soft_tokens + c.max_new_tokens
    if context and need > context:
        return [("transfer.prompt_tuned.max_source_tokens",
                 f"a prompt of up to {need - c.max_new_tokens} tokens (BOS, max_source_tokens {c.max_source_tokens}, "
                 f"{len(pieces)} commander, num_soft_tokens {c.num_soft_tokens}) plus max_new_tokens "
                 f"{c.max_new_tokens} is {need} tokens, more than the LM's context ({context}); lower "
                 "transfer.prompt_tuned.max_source_tokens or max_new_tokens")]
    return []


def _read_teachers(teachers: list[TeacherConfig]) -> tuple[list[TeacherConfig], list[tuple[str, str]],
                                                            dict[str, list[str]] | None]:
    """The teachers with ``labels`` filled, the problems found, and ``{name: labels}`` of all
    teachers (None unless every one was read under a distinct name: checks against an incomplete
    set would flag real labels)."""
    problems, read = [], 0
    for i, t in enumerate(teachers):
        if t.path is None:
            continue
        labels, problem = _read_teacher(t)
        if problem:
            problems.append((f"teachers[{i}].path", problem))
        elif "auto_map" in read_model_config(t.path) and not t.trust_remote_code:
            problems.append((f"teachers[{i}].trust_remote_code",
                             f"{t.path / 'config.json'} has auto_map: the model loads only with the directory's own "
                             f"code; set teachers[{i}].trust_remote_code=true if you trust it, or save the teacher "
                             "as a standard transformers architecture"))
        elif t.labels is not None and t.labels != labels:
            problems.append((f"teachers[{i}].labels", f"{t.labels} differ from id2label in {t.path / 'config.json'}, "
                                                      f"{labels}; remove teachers[{i}].labels or make them equal"))
        else:
            teachers[i] = t.model_copy(update={"labels": labels})
            read += 1
    known = {t.name: t.labels for t in teachers}
    if not teachers or read < len(teachers) or len(known) < len(teachers) or None in known:
        known = None
    return teachers, problems, known


def _read_teacher(t: TeacherConfig) -> tuple[list[str] | None, str]:
    """A teacher directory's labels, or the problem with the directory."""
    problem = _model_dir_problem(t.path)
    if problem:
        return None, problem
    try:
        labels = read_teacher_labels(t.path)
    except LabelSpaceError as e:
        return None, str(e)
    if not any((t.path / f).is_file() for f in TOKENIZER_FILES):
        return None, (f"{str(t.path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the teacher's "
                      "tokenizer there too (`tokenizer.save_pretrained(DIR)`)")
    return labels, ""


def _model_dir_problem(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        return (f"directory {str(path)!r} does not exist; point it at a local Hugging Face model directory "
                "(download hub models first, e.g. `hf download NAME --local-dir DIR`)")
    if not path.is_dir():
        return f"{str(path)!r} is a file, not a model directory; point it at the directory that holds config.json"
    if not (path / "config.json").is_file():
        return (f"{str(path)!r} has no config.json; it is not a Hugging Face model directory "
                "(save one with `model.save_pretrained(DIR)`)")
    return ""


def read_model_config(path: str | Path) -> dict:
    """The ``config.json`` of a Hugging Face model directory; raises ValueError saying what is wrong."""
    problem = _model_dir_problem(Path(path))
    if problem:
        raise ValueError(problem)
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-save the model") from e


def _file_problem(path: Path, what: str, hint: str = "") -> str:
    if not path.exists():
        return f"{what} {str(path)!r} does not exist{hint}"
    if not path.is_file():
        return f"{what} {str(path)!r} is a folder, not a file{hint}"
    return ""


def _eval_problem(ev: EvalConfig, teacher_labels: dict[str, list[str]] | None) -> str:
    """The eval file's problem: missing, a folder, an unknown format, or (read now, so a bad file
    fails before any generation) missing columns, empty texts or labels that no teacher has."""
    if ev.path is None:
        return ""
    problem = _file_problem(ev.path, "eval file")
    if problem:
        return problem
    if not str(ev.path).endswith(EVAL_SUFFIXES):
        return f"eval file {str(ev.path)!r} must be .csv, .tsv, .jsonl or .parquet"
    if teacher_labels is None or None in (ev.text_column, ev.label_column, ev.label_map):
        return ""
    from dfkd_ray.evaluation import EvalDataError, load_labelled

    try:
        load_labelled(ev.path, text_column=ev.text_column, label_column=ev.label_column, label_map=ev.label_map,
                      label_space=UnionLabelSpace.from_teachers(teacher_labels))
    except (EvalDataError, LabelSpaceError) as e:
        return str(e)
    return ""


def tune_problems(cfg: JobConfig, teacher_labels: dict[str, list[str]] | None) -> list[tuple[str, str]]:
    """The checks of a sweep's ``tune`` section (``jobs/tune.py``) that need the whole config or the
    machine: every value of the search space validates in the config (each grid value, both ends of
    a range), the development file ``tune.dev.path`` is readable with labels the teachers have, and,
    on a local Ray, ``tune.max_concurrent_trials`` trials fit this machine at once. Nothing to check
    without a search space."""
    t = cfg.tune
    if t is None or not t.search_space or None in (cfg.name, cfg.transfer, cfg.output, cfg.ray, cfg.train):
        return []  # salvaged from an invalid config: the failed field is reported
    from dfkd_ray.tuning.space import concurrency_problems, search_space_problems

    problems = search_space_problems(cfg)
    if t.dev.path is not None:
        problem = _eval_problem(t.dev, teacher_labels)
        if problem:
            problems.append(("tune.dev.path", "development file: " + problem))
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        cores = os.cpu_count() or 1
        problems += concurrency_problems(cfg, local_resources(cfg), f"this machine ({cores} cores, each booked for at "
                                                                    f"most {LOCAL_PROCESSES_PER_CORE} processes)")
    return problems


EMBEDDING_SPACE_TOLERANCE = 0.5
"""Largest relative distance ``||P_k - P_1|| / ||P_1||`` between the parameters ``P_k`` of a teacher's
embedding layer and the first teacher's (all of them flattened, Frobenius norm) for
``transfer.source: embedding_guessing`` to take them as one input-embedding space. Fine-tuning moves
an encoder's embedding layer little, so teachers fine-tuned from one encoder stay far below it;
embedding layers of one tokenizer initialised apart lie above it (docs/embedding-guessing.md)."""


def _meta_classifier(path: Path, trust_remote_code: bool):
    """A model directory's sequence classifier built on the meta device (its shapes; no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)


def _embedding_layer_shapes(path: Path, trust_remote_code: bool) -> dict[str, tuple]:
    """The parameter shapes of a model directory's embedding layer (raises ValueError without one)."""
    from dfkd_ray.models.embedding_student import embedding_layer

    return {k: tuple(v.shape) for k, v in embedding_layer(_meta_classifier(path, trust_remote_code)).state_dict().items()}


def _shape_difference(ours: dict[str, tuple], theirs: dict[str, tuple]) -> str:
    keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return ", ".join(f"{k}: {ours.get(k)} vs {theirs.get(k)}" for k in keys[:4])


def embedding_guessing_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """Why ``transfer.source: embedding_guessing`` cannot run on these model directories ([] when it can).

    AS-DFD crafts pseudo-embeddings in the output space of an embedding layer that every teacher's
    transformer layers read and that the student shares (the first teacher's), so: the teachers must
    share one input-embedding space (the same tokenizer vocabulary, embedding layers of one shape within
    :data:`EMBEDDING_SPACE_TOLERANCE` of each other); the first one's tokenizer needs the tokens placed at
    both ends of a pseudo-sample; every model needs ``transfer.embedding_guessing.length`` positions; the
    student's embedding layer must hold the teacher's. The teachers' directories
    were checked before (labels, tokenizer files).
    """
    from transformers import AutoConfig, AutoTokenizer

    from dfkd_ray.models.embedding_student import boundary_token_ids

    problems: list[tuple[str, str]] = []
    teachers = list(cfg.teachers)
    first = teachers[0]
    fix = ("use teachers fine-tuned from one encoder (one tokenizer, one embedding layer), or a text source "
           "(transfer.source: steered, corpus or random_words)")
    tokenizers = [AutoTokenizer.from_pretrained(t.path, trust_remote_code=t.trust_remote_code) for t in teachers]
    layers: list[dict | None] = []
    for i, t in enumerate(teachers):
        try:
            layers.append(_embedding_layer_shapes(t.path, t.trust_remote_code))
        except ValueError as e:
            layers.append(None)
            problems.append((f"teachers[{i}].path", f"transfer.source embedding_guessing: {e}"))
    if None in boundary_token_ids(tokenizers[0]):
        problems.append(("teachers[0].path", f"teacher {first.name!r}'s tokenizer has no [CLS]/[SEP] (or BOS/EOS) "
                                             "tokens to place at both ends of a pseudo-sample (AS-DFD's alignment "
                                             "constraints); put a teacher with such a tokenizer first"))
    vocab = tokenizers[0].get_vocab()
    same = [0] if layers[0] is not None else []
    for i, (t, tok, layer) in enumerate(zip(teachers, tokenizers, layers)):
        if i == 0 or layer is None or layers[0] is None:
            continue
        why = ""
        if tok.get_vocab() != vocab:
            other = tok.get_vocab()
            why = (f"its tokenizer differs from teacher {first.name!r}'s ({len(other)} tokens, "
                   f"{len(set(other) - set(vocab))} of them not in {first.name!r}'s {len(vocab)}, or numbered otherwise)")
        elif layer != layers[0]:
            why = f"its embedding layer has other shapes ({_shape_difference(layer, layers[0])})"
        if why:
            problems.append((f"teachers[{i}].path", (
                f"transfer.source embedding_guessing: teacher {t.name!r} reads another input-embedding space than "
                f"teacher {first.name!r}: {why}. Pseudo-embeddings are crafted in one space that every teacher "
                f"reads, and the student shares one embedding layer; {fix}")))
        else:
            same.append(i)
    if len(same) > 1:
        distances = _embedding_layer_distances([teachers[i] for i in same])
        for i, distance in zip(same[1:], distances):
            if distance > EMBEDDING_SPACE_TOLERANCE:
                problems.append((f"teachers[{i}].path", (
                    f"transfer.source embedding_guessing: teacher {teachers[i].name!r} has the tokenizer and the "
                    f"embedding-layer shapes of teacher {first.name!r} but other weights there (relative distance "
                    f"{distance:.2f}; teachers fine-tuned from one encoder stay below {EMBEDDING_SPACE_TOLERANCE}), "
                    f"so a pseudo-embedding means something else to each; {fix}")))
    length = getattr(cfg.transfer.embedding_guessing, "length", None)
    models = [(f"teacher {t.name!r}", t.path, t.trust_remote_code) for t in teachers]
    if cfg.student.path is not None:
        models.append(("the student", cfg.student.path, False))
    for who, path, trust in models:
        positions = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust), "max_position_embeddings", None)
        if length is not None and positions is not None and length > positions:
            problems.append(("transfer.embedding_guessing.length",
                             f"{length} positions exceed {who}'s {positions}; lower it to <= {positions}"))
    if cfg.student.path is not None and layers[0] is not None:
        try:
            student_layer = _embedding_layer_shapes(cfg.student.path, False)
        except ValueError as e:
            student_layer, why = None, str(e)
        else:
            why = _shape_difference(student_layer, layers[0]) if student_layer != layers[0] else ""
        if why:
            problems.append(("student.path", (
                f"transfer.source embedding_guessing: the student reads pseudo-embeddings in place of its embedding "
                f"layer's output and shares teacher {first.name!r}'s embedding layer (AS-DFD Algorithm 1), and its "
                f"own cannot hold it ({why}); give a student of the teacher's architecture, vocabulary and width "
                "(e.g. the teacher's own directory, with student.layers or student.num_layers)")))
    return problems


def heldout_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """With ``amalgamation.method: stratanet``, teachers whose held-out requests are too few to fit their
    confidence statistics, whatever the source: the held-out requests are known before anything is
    generated (:func:`~dfkd_ray.transfer.requests.is_heldout`), and the rows a set holds are at most
    those (a rejected request that is given up holds none)."""
    a = cfg.amalgamation
    if a.method != "stratanet" or None in (cfg.transfer.samples_per_class, cfg.transfer.heldout_fraction,
                                           a.calibration_folds):
        return []
    from dfkd_ray.train.embedding_guessing import crafting_requests

    need = max(8, a.calibration_folds + 2)
    held = crafting_requests(cfg, heldout=True)
    few = {t.name: n for t in cfg.teachers if (n := sum(r.teacher == t.name for r in held)) < need}
    if not few:
        return []
    return [("transfer.heldout_fraction", (
        f"held-out requests per teacher {few} are too few to fit the confidence statistics of "
        f"amalgamation.method stratanet (need >= {need} with amalgamation.calibration_folds "
        f"{a.calibration_folds}); raise transfer.heldout_fraction or transfer.samples_per_class, lower "
        "amalgamation.calibration_folds, or use amalgamation.method: vanilla"))]


def _embedding_layer_distances(teachers: list[TeacherConfig]) -> list[float]:
    """``||P_k - P_1|| / ||P_1||`` of every teacher's embedding-layer parameters after the first's."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from dfkd_ray.models.embedding_student import embedding_layer

    hf_logging.disable_progress_bar()  # a bar per loaded teacher says nothing the check does not

    def flat(t: TeacherConfig) -> torch.Tensor:
        model = AutoModelForSequenceClassification.from_pretrained(t.path, dtype=torch.float32,
                                                                   trust_remote_code=t.trust_remote_code)
        return torch.cat([p.detach().flatten() for p in embedding_layer(model).parameters()])

    reference = flat(teachers[0])
    return [float((flat(t) - reference).norm() / reference.norm().clamp_min(1e-12)) for t in teachers[1:]]


LOCAL_PROCESSES_PER_CORE = 2
"""A local Ray books each CPU core for at most this many of a job's processes: small CPU models
spend much of their time waiting (the smoke preset streams with 2 train workers and 2 generator
actors on 2 cores), while a plan far beyond the cores starts processes that make no progress."""


def local_resources(cfg: JobConfig) -> dict[str, float]:
    """What a local Ray on this machine can book: :data:`LOCAL_PROCESSES_PER_CORE` per CPU core, and
    the GPUs; torch is imported (for its GPU count) only when the plan asks for GPUs."""
    r = cfg.ray
    gpus = 0
    if r.use_gpu or (r.gpus_per_generation_actor or 0) > 0:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(LOCAL_PROCESSES_PER_CORE * (os.cpu_count() or 1)), "GPU": float(gpus)}


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}{'' if n == 1 else 's'}"


RAY_RESOURCE_UNITS = 10_000
"""Ray books resources in units of 1/10,000 (its finest fractional share)."""


def gpus_held(processes: int, gpus_each: float) -> int:
    """Whole GPUs that ``processes`` processes asking ``gpus_each`` GPUs each take under Ray: a share
    below 1 is placed on one GPU, never split across two (three actors of 0.6 GPU need three GPUs,
    not two), so ``1 // gpus_each`` of them fit a GPU; a share of 1 or more is whole GPUs."""
    if gpus_each >= 1:
        return processes * int(gpus_each)
    per_gpu = RAY_RESOURCE_UNITS // round(gpus_each * RAY_RESOURCE_UNITS)
    return -(-processes // per_gpu)


def _plan_part(processes: int, what: str, ask: float, kind: str) -> str:
    """``4 generation actors x 0.25 GPUs (at most 4 a GPU)``: one stage's share of a resource plan."""
    part = f"{processes} {what} x {_count(ask, kind)}"
    if kind == "GPU" and ask < 1:
        part += f" (at most {RAY_RESOURCE_UNITS // round(ask * RAY_RESOURCE_UNITS)} a GPU)"
    return part


def resource_plan_problems(cfg: JobConfig, have: dict[str, float], where: str = "this machine") -> list[tuple[str, str]]:
    """Why the job's train workers and generation actors cannot all start on ``have`` (CPU and GPU
    counts, e.g. ``ray.cluster_resources()``), one problem per ``ray.*`` field to change; [] when they
    can. The stages take turns (generation, then training), except with
    ``train.stream_from_generation``, which runs both at once. GPUs are counted as Ray places them
    (:func:`gpus_held`: fractional shares pack into whole GPUs). Ray would otherwise start what fits
    and wait for the rest forever."""
    r = cfg.ray
    stream = cfg.train.stream_from_generation
    if None in (*r.model_dump(exclude={"address"}).values(), stream):  # salvaged from an invalid config: its field is reported
        return []
    asks = {"train": {"CPU": r.cpus_per_train_worker, "GPU": 1.0 if r.use_gpu else 0.0},
            "generation": {"CPU": r.cpus_per_generation_actor, "GPU": r.gpus_per_generation_actor}}
    counts = {"train": (r.num_train_workers, "train workers"), "generation": (r.num_generation_actors, "generation actors")}
    fields = {("train", "CPU"): "ray.num_train_workers", ("train", "GPU"): "ray.num_train_workers",
              ("generation", "CPU"): "ray.num_generation_actors", ("generation", "GPU"): "ray.gpus_per_generation_actor"}
    fixes = {"ray.num_train_workers": "lower ray.num_train_workers (or ray.cpus_per_train_worker, ray.use_gpu)",
             "ray.num_generation_actors": "lower ray.num_generation_actors (or ray.cpus_per_generation_actor)",
             "ray.gpus_per_generation_actor": "lower ray.num_generation_actors or ray.gpus_per_generation_actor "
                                              "(a share that divides a GPU evenly, e.g. 0.5 or 0.25, wastes none)"}
    found: dict[str, list[str]] = {}
    for kind in ("CPU", "GPU"):
        parts = {stage: (counts[stage][0], counts[stage][1], asks[stage][kind]) for stage in asks
                 if asks[stage][kind] > 0}
        held = {stage: gpus_held(n, ask) if kind == "GPU" else n * ask for stage, (n, _, ask) in parts.items()}
        groups = [list(parts)] if stream else [[stage] for stage in parts]
        for group in groups:
            need = sum(held[s] for s in group)
            if need <= have.get(kind, 0):
                continue
            plan = " and ".join(_plan_part(*parts[s], kind) for s in group)
            at_once = " at once (train.stream_from_generation)" if len(group) > 1 else ""
            field = fields[max(group, key=lambda s: held[s]), kind]
            found.setdefault(field, []).append(f"the plan needs {plan}{at_once} = {_count(need, kind)}; {where} has "
                                               f"{_count(have.get(kind, 0), kind)}")
    return [(field, "; ".join(msgs) + f": {fixes[field]}" + (", or set train.stream_from_generation=false"
                                                            if stream else ""))
            for field, msgs in found.items()]


VLLM_INSTALL = "pip install -e '.[vllm]' from the repository root"
"""How to install the ``vllm`` extra: the package is installed from its repository, not from PyPI."""


def vllm_engine_problem() -> str:
    """Why ``transfer.steered.engine: vllm`` cannot run on this machine, or '' when it can (vLLM
    importable and a CUDA GPU visible). Cheap: vLLM is looked up, not imported; torch is imported
    only when vLLM is there, to ask for CUDA."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return ("transfer.steered.engine=vllm needs vLLM, which is not installed here: on a GPU node run "
                f"{VLLM_INSTALL} (vLLM's wheels are CUDA builds), or set transfer.steered.engine=hf")
    import torch

    if not torch.cuda.is_available():
        return ("transfer.steered.engine=vllm needs a CUDA GPU and none is visible here: run on a GPU node with "
                f"vLLM installed ({VLLM_INSTALL}), or set transfer.steered.engine=hf")
    return ""


def compile_problem(mode: str, use_gpu: bool) -> str:
    """Why ``train.compile`` cannot compile on this machine, or '' when it can: torch.compile builds
    C code, the launchers of its Triton kernels on a GPU (a C compiler: ``$CC``, ``cc``, ``gcc``,
    ``clang``) and its CPU kernels themselves (a C++ compiler: ``$CXX``, ``g++``, ``clang++``, ``c++``)."""
    import shutil

    need = [("C", "CC", ("cc", "gcc", "clang"))] + ([] if use_gpu else [("C++", "CXX", ("g++", "clang++", "c++"))])
    for language, variable, names in need:
        given = os.environ.get(variable)
        if not (shutil.which(given) if given else any(shutil.which(n) for n in names)):
            where = f"${variable} ({given}) is not on PATH" if given else f"none of {', '.join(names)} is on PATH"
            return (f"train.compile={mode} needs a {language} compiler to build the compiled step's kernels and "
                    f"{where}: install one (e.g. gcc) or set train.compile=none")
    return ""


def _output_dir_problem(out: Path, name: str) -> str:
    """Why job ``name`` cannot write to ``out``: a file, another job's results, or not writable; '' when it can."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        return f"{str(out)!r} is a file; output.dir must be a directory (one per job)"
    marker = out / JOB_MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            owner = "<unreadable>"
        if owner != name:
            return (f"{str(out)!r} holds the results of job {owner!r}; give job {name!r} its own output.dir "
                    "(nothing there was touched)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return f"{str(out)!r} cannot be made: {str(existing)!r} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{str(out)!r} cannot be written: {str(existing)!r} is not writable"
    holder = _lock_holder(out / LOCK_FILE)
    if holder is not None and not holder["stale"]:
        return _locked_message(out / LOCK_FILE, holder)
    return ""


def _lock_holder(lock: Path) -> dict | None:
    """The lock's holder, with ``stale`` (its process is gone from this host); None when there is no
    lock or this process holds it."""
    try:
        holder = json.loads(lock.read_text())
        host, pid = str(holder["host"]), int(holder["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {"host": "<unknown>", "pid": "<unknown>", "stale": False}
    if host != socket.gethostname():
        return {**holder, "stale": False}  # another node: its process cannot be checked from here
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:  # exists, owned by another user
        alive = True
    return {**holder, "stale": not alive}


def _locked_message(lock: Path, holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
    return (f"another job is running in {str(lock.parent)!r}: {holder['host']} pid {holder['pid']}, since {since}; "
            f"wait for it to end, give this job another output.dir, or, if no job runs there any more, delete {lock}")


def _take_lock(out: Path) -> None:
    """Create ``out``'s lock file (``O_EXCL``: one job at a time), or keep this process's own; take over
    a stale one (its process gone from this host) with a printed note; released when this process exits."""
    lock = out / LOCK_FILE
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None:
                if lock.exists():
                    return  # this process holds it
                continue  # released meanwhile
            if not holder["stale"]:
                raise ConfigError([("output.dir", _locked_message(lock, holder))]) from None
            print(f"output.dir: the lock of {holder['host']} pid {holder['pid']} is stale (that process is gone); "
                  f"taken over: {lock}", flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": round(time.time(), 3)}, f)
        atexit.register(_release_lock, lock, os.getpid())
        return


def _release_lock(lock: Path, pid: int) -> None:
    try:
        if json.loads(lock.read_text()).get("pid") == pid and pid == os.getpid():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def claim_output_dir(cfg: JobConfig) -> Path:
    """Create ``output.dir``, lock it for this process (:data:`LOCK_FILE`, released when the process
    exits), record that this job owns it (idempotent for the same job) and save the config there as
    ``config.yaml``; raises ConfigError when another job owns it, another run holds its lock, or it
    cannot be written."""
    out = cfg.output.dir
    problem = _output_dir_problem(out, cfg.name)
    if problem:
        raise ConfigError([("output.dir", problem)])
    out.mkdir(parents=True, exist_ok=True)
    _take_lock(out)
    marker = out / JOB_MARKER
    if not marker.is_file():
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": cfg.name}, indent=2))
        os.replace(tmp, marker)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out


def parse_job_args(description: str, argv: list[str] | None = None) -> JobConfig:
    """The command line every job script takes: ``--config YAML`` and ``section.key=value`` overrides.

    Loads the config and runs the preflight (:func:`check_config`); a problem in either prints every
    problem (field path and fix) and exits with status 2, before Ray starts. In Ray's copy of a
    submitted working directory it first says where relative paths point.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML under jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        base = relative_path_base()
        if base != Path.cwd():
            print(f"This job runs in Ray's temporary copy of its working directory: relative paths in the config "
                  f"are under {base} (${HOME_VARIABLE}).", flush=True)
        return check_config(read_config(args.config, args.overrides), source=args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
