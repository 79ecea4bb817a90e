"""A sweep's trials as job configs: the config of one trial, which trials share a transfer set, what
one trial takes of the cluster, and the checks of a search space's values (no Ray here).

A trial is the sweep's config with the sampled values of ``tune.search_space`` written over their
dotted keys (:func:`trial_config`): a whole :class:`~dfkd_ray.config.JobConfig`, validated as any
job's is. Trials whose generation settings are equal make equal transfer sets; the set's
fingerprint (:func:`generation_fingerprint`, the hash of everything that decides the set) names the
one directory they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfkd_ray.config import ConfigError, JobConfig, SearchDim, validate_config
from dfkd_ray.config.schema import field_annotation
from dfkd_ray.stages import fingerprint

GENERATION_SECTIONS = ("seed", "teachers", "transfer")
"""Top-level keys whose fields decide a transfer set (:func:`~dfkd_ray.transfer.writer.transfer_description`)."""

TRIAL_ACTOR_CPUS = 0.01
"""CPUs a trial's own process reserves: it waits on its generation, confidence and Train runs, which
reserve their own resources (Ray refuses a trial of 0)."""


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Write ``value`` at dotted ``key`` of a config dict (list elements by index), creating sections."""
    parts = key.split(".")
    node: Any = data
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def trial_config(base: JobConfig, params: dict[str, Any], output_dir: str | Path) -> JobConfig:
    """The job a trial runs: ``base`` with ``params`` (dotted key -> value) written over it, writing to
    ``output_dir``, without a ``tune`` section. Raises :class:`~dfkd_ray.config.ConfigError` naming
    the search-space key of a value the config refuses."""
    data = base.model_dump(mode="json", exclude={"tune"})
    for key, value in params.items():
        set_dotted(data, key, value)
    data["output"]["dir"] = str(output_dir)
    try:
        return validate_config(data, source="a trial's config")
    except ConfigError as e:
        raise ConfigError([(_search_key_of(path, params), message) for path, message in e.problems],
                          "the search space") from None


def _search_key_of(path: str, params: dict[str, Any]) -> str:
    """``tune.search_space.<key>`` for the problem at ``path`` (``teachers[0].max_length`` style) when a
    searched key made it, else ``path``."""
    dotted = path.replace("[", ".").replace("]", "")
    for key in params:
        if dotted == key or dotted.startswith(key + "."):
            return f"tune.search_space.{key}"
    for key in params:  # a rule between fields reported at a neighbour of the searched one
        if dotted.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]:
            return f"tune.search_space.{key}"
    return path


def corner_values(key: str, dim: SearchDim) -> list[Any]:
    """The values of ``dim`` a check tries: every grid value, or both ends of a range (rounded for an
    integer field)."""
    if dim.values is not None:
        return list(dim.values)
    if field_annotation(key) is int:
        return [int(round(dim.low)), int(round(dim.high))]
    return [dim.low, dim.high]


def search_space_problems(cfg: JobConfig) -> list[tuple[str, str]]:
    """The values of ``tune.search_space`` the config refuses (a grid value of the wrong type, a range
    end outside the field's limits, one that breaks a rule with another field), each at
    ``tune.search_space.<key>``; every value is tried alone on ``cfg``."""
    problems: list[tuple[str, str]] = []
    for key, dim in cfg.tune.search_space.items():
        if dim.values is None and field_annotation(key) is int and (dim.low != int(dim.low) or dim.high != int(dim.high)):
            problems.append((f"tune.search_space.{key}", f"{key} is an integer field: give whole numbers as low "
                                                         f"and high (got {dim.low:g} and {dim.high:g})"))
            continue
        for value in corner_values(key, dim):
            try:
                trial_config(cfg, {key: value}, cfg.output.dir)
            except ConfigError as e:
                problems += [(path, f"value {value!r}: {message}") for path, message in e.problems]
                break
    return problems


def searches_generation(cfg: JobConfig) -> bool:
    """Whether the search space varies a field that decides the transfer set."""
    return any(key.split(".")[0] in GENERATION_SECTIONS for key in cfg.tune.search_space)


def generation_fingerprint(cfg: JobConfig) -> str:
    """The fingerprint of ``cfg``'s transfer set: trials with equal ones share that set."""
    from dfkd_ray.transfer.writer import transfer_description

    return fingerprint(transfer_description(cfg, cfg.teacher_labels()))


def most_epochs(cfg: JobConfig) -> float:
    """The most epochs a trial trains (``train.epochs``, or the largest it is searched over)."""
    dim = cfg.tune.search_space.get("train.epochs")
    if dim is None:
        return cfg.train.epochs
    return max(dim.values) if dim.values is not None else dim.high


def trial_resources(cfg: JobConfig) -> dict[str, float]:
    """What one trial holds at most at once: its own process, plus its Train workers, or its
    generation actors when it makes a transfer set (they take turns, as in a job)."""
    r = cfg.ray
    train = {"CPU": r.num_train_workers * r.cpus_per_train_worker, "GPU": float(r.num_train_workers if r.use_gpu else 0)}
    generation = ({"CPU": r.num_generation_actors * r.cpus_per_generation_actor,
                   "GPU": r.num_generation_actors * r.gpus_per_generation_actor}
                  if searches_generation(cfg) else {"CPU": 0.0, "GPU": 0.0})
    return {"CPU": TRIAL_ACTOR_CPUS + max(train["CPU"], generation["CPU"]),
            "GPU": max(train["GPU"], generation["GPU"])}


def concurrency_problems(cfg: JobConfig, have: dict[str, float], where: str) -> list[tuple[str, str]]:
    """Why ``tune.max_concurrent_trials`` trials cannot all run at once on ``have`` (CPU and GPU
    counts); [] when they can. Ray would start what fits and leave the rest waiting for resources
    that never come free."""
    need = trial_resources(cfg)
    n = cfg.tune.max_concurrent_trials
    out = []
    for kind in ("CPU", "GPU"):
        if need[kind] > 0 and n * need[kind] > have.get(kind, 0) + 1e-9:
            fits = int((have.get(kind, 0) + 1e-9) // need[kind])
            out.append(("tune.max_concurrent_trials",
                        f"{n} trials at once need {n * need[kind]:g} {kind} ({need[kind]:g} each: "
                        f"{cfg.ray.num_train_workers} train worker(s)"
                        + (" or the generation actors" if searches_generation(cfg) else "")
                        + f"); {where} has {have.get(kind, 0):g}: set tune.max_concurrent_trials <= {fits}"
                        + (" or give each trial less (ray section)" if fits == 0 else "")))
    return out


def describe_sweep(cfg: JobConfig) -> dict:
    """What decides a sweep's trials: the config with its tune section, less where it writes, how many
    trials run at once and which cluster runs them. A rerun with another description is refused (its
    finished trials would mix with new ones)."""
    data = cfg.model_dump(mode="json", exclude={"output": True, "ray": {"address", "report_poll_interval_s"}})
    data["tune"].pop("max_concurrent_trials")
    return data
