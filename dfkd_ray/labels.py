"""The union label space over all teachers (StrataNet section 3: the student predicts over the union).

Teachers name their classes in ``id2label``. Names are compared after :func:`normalize_label`
(Unicode NFKC, case-folded, runs of whitespace, ``_`` and ``-`` folded to one space), so
``"Sci/Tech"``, ``"sci/tech"`` and ``"Sci/Tech "`` are one global label; the display name is the
spelling of the first teacher that has it. :func:`read_teacher_labels` is the one reader of a
teacher directory's ``id2label``. Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize_label(name: str) -> str:
    """Canonical form used to decide whether two label names are the same label."""
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFKC", str(name)).casefold()).strip()


class LabelSpaceError(ValueError):
    """A teacher's label set cannot be placed into the union label space."""


def ordered_labels(id2label: dict) -> list[str]:
    """``id2label`` (keys may be str or int, as in HF configs) as a list indexed by class id.

    Raises :class:`LabelSpaceError` when ids are not exactly ``0..C-1``.
    """
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as e:
        raise LabelSpaceError(f"id2label keys must be integers, got {sorted(id2label)!r}") from e
    if sorted(by_id) != list(range(len(by_id))):
        raise LabelSpaceError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return [by_id[i] for i in range(len(by_id))]


def label_clashes(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of distinct class names of ONE teacher that normalise to the same label."""
    seen: dict[str, str] = {}
    clashes = []
    for name in names:
        key = normalize_label(name)
        if key in seen:
            clashes.append((seen[key], name))
        else:
            seen[key] = name
    return clashes


def read_teacher_labels(path: str | Path) -> list[str]:
    """A teacher's class names in id order, from ``id2label`` in its directory's ``config.json``.

    Raises :class:`LabelSpaceError` when the file cannot be read, has no ``id2label``, has ids
    other than ``0..C-1``, only placeholder names (``LABEL_0``, ...), or two names that are one
    label after :func:`normalize_label`.
    """
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise LabelSpaceError(f"cannot read {file}: {e}") from e
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if not id2label:
        raise LabelSpaceError(f"{file} has no id2label; a teacher must name its classes: set "
                              "model.config.id2label = {0: 'name', ...} and save_pretrained again")
    try:
        labels = ordered_labels(id2label)
    except LabelSpaceError as e:
        raise LabelSpaceError(f"{file}: {e}") from e
    if all(label.upper().startswith("LABEL_") for label in labels):
        raise LabelSpaceError(f"{file} id2label only has placeholder names {labels}; give the classes their real "
                              "names so teachers' labels can be merged")
    clashes = label_clashes(labels)
    if clashes:
        a, b = clashes[0]
        raise LabelSpaceError(f"labels {a!r} and {b!r} in {file} are the same label after normalisation (case, "
                              "spaces, '_' and '-' are ignored); rename one")
    return labels


@dataclass(frozen=True)
class UnionLabelSpace:
    """Global label ids over the union of the teachers' label sets.

    ``teacher_to_global[t][c]`` is the global id of teacher ``t``'s class ``c``. Global ids follow
    first appearance: teachers in config order, each teacher's classes in id order.
    """

    names: tuple[str, ...]
    teacher_to_global: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_teachers(cls, teacher_labels: dict[str, list[str]]) -> "UnionLabelSpace":
        names: list[str] = []
        index: dict[str, int] = {}
        mapping: dict[str, tuple[int, ...]] = {}
        for teacher, labels in teacher_labels.items():
            clashes = label_clashes(labels)
            if clashes:
                a, b = clashes[0]
                raise LabelSpaceError(
                    f"teacher {teacher!r} has labels {a!r} and {b!r} that are the same label after "
                    "normalisation; rename one in the teacher's config.json id2label"
                )
            ids = []
            for name in labels:
                key = normalize_label(name)
                if key not in index:
                    index[key] = len(names)
                    names.append(name)
                ids.append(index[key])
            mapping[teacher] = tuple(ids)
        return cls(names=tuple(names), teacher_to_global=mapping)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(self.teacher_to_global)

    def global_id(self, name: str) -> int:
        key = normalize_label(name)
        for i, n in enumerate(self.names):
            if normalize_label(n) == key:
                return i
        raise KeyError(f"label {name!r} is not in the union label space {list(self.names)}")

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "teacher_to_global": {k: list(v) for k, v in self.teacher_to_global.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "UnionLabelSpace":
        return cls(names=tuple(d["names"]), teacher_to_global={k: tuple(v) for k, v in d["teacher_to_global"].items()})
