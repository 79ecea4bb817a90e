"""A benchmark's dataset spec (``benchmarks/specs/<name>.yaml``): the data, the labels, the teachers.

Everything that makes one amalgamation benchmark differ from another lives in its spec; the harness
(``benchmarks/amalgamation.py``) holds no dataset names, files or label tables. A spec gives:

- ``name``: the benchmark's name in reports and job names;
- ``labels``: the label ``column``, the label names in id order (``names``, or ``names_file``: one
  name a line, relative to ``--data``) and ``first_id``, the column's value for the first name;
- ``train`` / ``test`` / ``dev``: lists of data files relative to ``--data``. ``.csv`` (comma, with
  quoting) or ``.tsv`` (tab, no quoting), optionally ``.xz`` / ``.gz`` / ``.bz2`` compressed, each with
  a header row. The model input is the file's ``text_columns`` joined by ``join`` (the spec's
  ``text_columns`` unless the file gives its own). ``dev`` rows are what settings are chosen on (the
  test set only reports); a dev file may be a train file too (then the teachers trained on it);
- ``teachers``: teacher name -> its ``classes`` (label names) and optionally the depth of the base
  encoder it is fine-tuned from (``num_layers``, evenly spaced, or ``layers``, as for the student);
  together the teachers must cover every label;
- ``student``: ``num_layers`` or ``layers`` of the base encoder kept by every amalgamation row's student;
- ``rows``: the table rows a plain run makes (:data:`harness.rows.ROWS`), and ``samples_per_class``:
  transfer texts per (teacher, class).

:func:`load_spec` reads and checks a spec without touching the data, so a bad spec fails at once
with every problem and its field path (:class:`SpecError`).
"""

from __future__ import annotations

import difflib
from pathlib import Path, PurePosixPath
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dfkd_ray.config.schema import section_type

from harness.rows import ROWS

SEPARATORS = {".csv": ",", ".tsv": "\t"}
COMPRESSIONS = ("", ".xz", ".gz", ".bz2")


class SpecError(ValueError):
    """Every problem of a spec, each as ``(field path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str):
        self.problems, self.source = problems, source
        super().__init__("\n".join([f"{len(problems)} problem(s) in benchmark spec {source}:"]
                                   + [f"  - {where}: {message}" for where, message in problems]))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def data_suffixes(path: str) -> tuple[str, str]:
    """``("train.csv.xz")`` -> ``(".csv", ".xz")``: the table format and the compression."""
    suffixes = PurePosixPath(path).suffixes
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS[1:] else ""
    table = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not compression else "")
    return table, compression


class DataFile(_Strict):
    """One data file of a split."""

    path: str = Field(description="relative to --data: .csv or .tsv, optionally .xz/.gz/.bz2 compressed")
    text_columns: Optional[list[str]] = Field(None, min_length=1, description="joined into the model input; "
                                                                              "default: the spec's text_columns")

    @field_validator("path")
    @classmethod
    def _relative_table(cls, path: str) -> str:
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise ValueError(f"{path!r} must be relative to --data, without '..' (e.g. test.csv)")
        table, compression = data_suffixes(path)
        if table not in SEPARATORS:
            raise ValueError(f"{path!r} is neither .csv nor .tsv (optionally {'/'.join(COMPRESSIONS[1:])} compressed)")
        return path


class LabelsSpec(_Strict):
    """The label column and the label names in id order."""

    column: str = Field("label", description="the column that holds the label id")
    names: Optional[list[str]] = Field(None, min_length=2, description="label names in id order")
    names_file: Optional[str] = Field(None, description="or: a file of label names, one a line, relative to --data")
    first_id: int = Field(0, description="the column's value for the first name (1 for 1-based ids)")


class TeacherSpec(_Strict):
    """One teacher: the classes it is fine-tuned on, and which layers of the base encoder it keeps."""

    classes: list[str] = Field(min_length=1, description="label names this teacher knows")
    num_layers: Optional[int] = Field(None, ge=1, description="keep this many base-encoder layers, evenly spaced")
    layers: Optional[list[int]] = Field(None, min_length=1, description="or: keep these base-encoder layers")


class StudentSpec(_Strict):
    """The student of every amalgamation row: which layers of the base encoder it keeps."""

    num_layers: Optional[int] = Field(None, ge=1, description="keep this many layers, evenly spaced")
    layers: Optional[list[int]] = Field(None, min_length=1, description="or: keep these layers")


class BenchmarkSpec(_Strict):
    """A benchmark: data files, labels, teachers, student depth, rows (see the module docstring)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="the benchmark's name in reports")
    labels: LabelsSpec
    text_columns: list[str] = Field(["text"], min_length=1, description="default text columns of every file")
    join: str = Field(" ", description="what joins the text columns")
    train: list[DataFile] = Field(min_length=1, description="rows the teachers and the supervised row train on")
    test: list[DataFile] = Field(min_length=1, description="rows every row is scored on")
    dev: list[DataFile] = Field(min_length=1, description="development rows: settings are chosen on these")
    teachers: dict[str, TeacherSpec] = Field(min_length=1, description="teacher name -> its classes and depth")
    student: StudentSpec
    rows: list[str] = Field(min_length=1, description="the rows a plain run makes, in table order")
    samples_per_class: int = Field(ge=1, description="transfer texts per (teacher, class)")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "<root>"


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The spec section that holds the last field of ``loc`` (list indices and teacher names stepped over)."""
    model: Optional[type[BaseModel]] = BenchmarkSpec
    for part in loc[:-1]:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            model = section_type(model.model_fields[part].annotation)
    return model


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in error.errors():
        where, message = _loc(e["loc"]), e["msg"]
        if e["type"] == "extra_forbidden":
            model = _model_at(e["loc"])
            known = sorted(model.model_fields) if model else []
            near = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            message = (f"unknown key{f'; did you mean {near[0]!r}?' if near else ''} "
                       f"(valid here: {', '.join(known)})")
        elif e["type"] == "missing":
            message = "required, missing"
        problems.append((where, message))
    return problems


def class_problems(spec: BenchmarkSpec, names: list[str]) -> list[tuple[str, str]]:
    """The teachers' classes against the label names: each a known name, none twice in a teacher,
    every name known by some teacher."""
    problems = []
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        problems.append(("labels.names", f"names {twice} appear more than once"))
    for teacher, t in spec.teachers.items():
        for i, c in enumerate(t.classes):
            if c not in names:
                near = ([n for n in names if n.lower() == c.lower()]
                        or difflib.get_close_matches(c, names, n=1))
                problems.append((f"teachers.{teacher}.classes[{i}]", f"{c!r} is not a label name"
                                 + (f"; did you mean {near[0]!r}?" if near else f" (names: {', '.join(names)})")))
        twice = sorted({c for c in t.classes if t.classes.count(c) > 1})
        if twice:
            problems.append((f"teachers.{teacher}.classes", f"{twice} listed more than once"))
    known = {c for t in spec.teachers.values() for c in t.classes}
    missing = [n for n in names if n not in known]
    if missing:
        problems.append(("teachers", f"no teacher knows {missing}: add them to a teacher's classes "
                                     "(the student's labels are the union of the teachers')"))
    return problems


def _cross_field_problems(spec: BenchmarkSpec) -> list[tuple[str, str]]:
    from dfkd_ray.config import StudentConfig, TeacherConfig

    problems = []
    if (spec.labels.names is None) == (spec.labels.names_file is None):
        problems.append(("labels", "give either names (a list) or names_file (a file of names), not both or neither"))
    elif spec.labels.names is not None:
        problems += class_problems(spec, spec.labels.names)
    for teacher, t in spec.teachers.items():
        try:  # the job's own rules for a teacher's name
            TeacherConfig(name=teacher, path=Path("."))
        except ValidationError as e:
            problems.append((f"teachers.{teacher}", f"not a valid teacher name: {e.errors()[0]['msg']}"))
        if t.num_layers is not None and t.layers is not None:
            problems.append((f"teachers.{teacher}", "set either layers or num_layers, not both"))
    try:  # the job's own rules for the student's layers
        StudentConfig(**spec.student.model_dump(exclude_none=True))
    except ValidationError as e:
        problems += [(f"student.{_loc(err['loc'])}".rstrip("."), err["msg"]) for err in e.errors()]
    unknown = [r for r in spec.rows if r not in ROWS]
    if unknown:
        problems.append(("rows", f"unknown row(s) {unknown}; choose from {list(ROWS)}"))
    twice = sorted({r for r in spec.rows if spec.rows.count(r) > 1})
    if twice:
        problems.append(("rows", f"{twice} listed more than once"))
    return problems


def parse_spec(data: object, source: str) -> BenchmarkSpec:
    """A spec from its parsed YAML; :class:`SpecError` lists every problem."""
    if not isinstance(data, dict):
        raise SpecError([("<root>", f"a spec is a mapping of fields, got {type(data).__name__}")], source)
    try:
        spec = BenchmarkSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_problems(e), source) from None
    problems = _cross_field_problems(spec)
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: Path) -> BenchmarkSpec:
    """Read and check a spec file (no data is read)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([("--spec", f"{str(path)!r} does not exist (the specs are in benchmarks/specs/)")], str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError([("<yaml>", f"not valid YAML: {e}")], str(path)) from None
    return parse_spec(data, str(path))


def label_names(spec: BenchmarkSpec, data_dir: Path) -> list[str]:
    """The label names in id order: the spec's ``names``, or its ``names_file`` read and checked."""
    if spec.labels.names is not None:
        return list(spec.labels.names)
    path = data_dir / spec.labels.names_file
    if not path.is_file():
        raise SpecError([("labels.names_file", f"{str(path)!r} does not exist: check --data")], spec.name)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    problems = class_problems(spec, names)
    if problems:
        raise SpecError([(w.replace("labels.names", "labels.names_file"), f"{m} (names from {path})")
                         for w, m in problems], spec.name)
    return names
