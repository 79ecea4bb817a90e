"""Reading a job's config: YAML, dotted ``section.key=value`` overrides, and pydantic's errors as
one :class:`ConfigError` listing every problem with its field path (and, for an unknown key, the
nearest valid name).

Loading reads the YAML file and nothing else: checks of the filesystem and of the machine are the
preflight's (:mod:`dfkd_ray.preflight`), which job scripts run through ``parse_job_args`` there.
"""

from __future__ import annotations

import difflib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import core_schema

from dfkd_ray.config.schema import JobConfig, section_type


class ConfigError(ValueError):
    """Every problem found in a config, each as ``(field path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = [f"{len(problems)} problem(s) in {source}:"] + [f"  - {p}: {m}" for p, m in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickled as its constructor's arguments: Ray sends it from a worker to the driver
        return type(self), (self.problems, self.source)


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # a dict key's own error (tune.search_space.<key>)
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _valid_keys(loc: tuple) -> list[str]:
    """The field names of the section at ``loc`` (list indices and dict keys are stepped over)."""
    model: Optional[type[BaseModel]] = JobConfig
    for part in loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            model = section_type(model.model_fields[part].annotation)
    return sorted(model.model_fields) if model is not None else []


_PYDANTIC_ERRORS = set(typing.get_args(core_schema.ErrorType)) - {"value_error", "assertion_error"}
"""pydantic's own error kinds, whose messages do not show the offending value; ours do."""


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind, msg = e["type"], e["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            valid = _valid_keys(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            msg = (f"unknown key {str(loc[-1])!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                   + (f" Valid keys: {', '.join(valid)}" if valid else ""))
        elif kind == "missing":
            msg = "required field is missing; add it"
        elif kind in ("literal_error", "enum"):
            msg = f"{msg}, got {e.get('input')!r}"
        elif kind in _PYDANTIC_ERRORS and isinstance(e.get("input"), (str, int, float, bool)) and "got" not in msg:
            msg = f"{msg} (got {e['input']!r})"
        problems.append((_format_loc(loc), msg))
    return problems


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b.c=value'`` -> (['a','b','c'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([(text, "override must look like section.key=value")], "overrides")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([(key, "empty key segment in override")], "overrides")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([(key, f"value {raw!r} is not valid YAML: {e}")], "overrides") from e
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with ``section.key=value`` overrides applied (``teachers.0.path=...`` indexes lists)."""
    data = json.loads(json.dumps(data, default=str))  # deep copy, plain types
    for text in overrides:
        parts, value = _parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError([(".".join(parts[:i + 1]), f"no list element {part} (the list has {len(node)})")],
                                      "overrides")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError([(".".join(parts[:i + 1]), "is a value, not a section")], "overrides")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError([(".".join(parts), f"no list element {last} (the list has {len(node)})")], "overrides")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _expand_paths(data: Any) -> Any:
    """``~`` and ``$VARS`` expanded in ``path``/``dir``/``lm_path`` values. Relative paths stay
    relative: the preflight resolves them (:func:`dfkd_ray.preflight.relative_path_base`)."""
    if isinstance(data, dict):
        return {k: os.path.expandvars(os.path.expanduser(v)) if isinstance(v, str) and k in ("path", "dir", "lm_path")
                else _expand_paths(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_paths(v) for v in data]
    return data


def validate_config(data: dict, *, source: str = "config") -> JobConfig:
    """Validate a plain dict against the schema; raise :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([("<root>", f"a config must be a mapping of sections, got {type(data).__name__}")], source)
    try:
        return JobConfig.model_validate(_expand_paths(data))
    except ValidationError as e:
        raise ConfigError(_problems(e), source) from None


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A YAML config file with ``section.key=value`` overrides applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("--config", f"file {str(path)!r} does not exist")], str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([("<yaml>", f"not valid YAML: {e}")], str(path)) from None
    return apply_overrides(data, list(overrides))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML config, apply ``section.key=value`` overrides and validate the schema, every problem at once."""
    return validate_config(read_config(path, overrides), source=str(path))


def salvage_config(data: dict) -> JobConfig:
    """The parts of an invalid config that validate, so the preflight can report its problems
    together with the schema's: a section keeps those of its fields that validate on their own,
    any other field is None. Rules between fields are not applied: the result is for reporting
    problems only, never for running a job."""
    return _salvage(JobConfig, _expand_paths(data))


def _salvage(model: type[BaseModel], raw: Any) -> BaseModel:
    if isinstance(raw, dict):
        try:
            return model.model_validate(raw)
        except ValidationError:
            pass
    raw = raw if isinstance(raw, dict) else {}
    values = {}
    for name, field in model.model_fields.items():
        if name in raw:
            try:
                values[name] = TypeAdapter(Annotated[field.annotation, field]).validate_python(raw[name])
                continue
            except ValidationError:
                pass
        elif not field.is_required():
            values[name] = field.get_default(call_default_factory=True)
            continue
        # Failed or missing: a section keeps what of it validates, anything else is None.
        value, section, kind = raw.get(name), section_type(field.annotation), typing.get_origin(field.annotation)
        if section is None or kind is dict:
            values[name] = None
        elif kind is list:
            values[name] = [_salvage(section, v) for v in value] if isinstance(value, list) else None
        else:
            values[name] = _salvage(section, value)
    return model.model_construct(**values)

