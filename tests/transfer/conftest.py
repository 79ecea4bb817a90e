"""Fixtures of the transfer-set tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_row():
    """Factory ``(i, **fields) -> row``: a valid transfer-set row (sample ``t/0/<i>``) with ``fields`` changed."""

    def _row(i: int, **kw) -> dict:
        row = {"sample_id": f"t/0/{i}", "text": f"text {i}", "label": 0, "label_name": "a", "teacher": "t",
               "teacher_class": 0, "source": "corpus", "source_params": "{}", "confidence": 0.5, "num_tokens": 2,
               "seed": i, "heldout": False}
        row.update(kw)
        return row

    return _row
