"""The transfer-set schema: rows it accepts and rows it refuses."""

from __future__ import annotations

import pytest

from dfkd_ray.transfer.schema import TRANSFER_SCHEMA, SchemaError, rows_to_table


def test_schema_rejects_bad_rows(make_row):
    assert rows_to_table([make_row(0), make_row(1)]).schema.equals(TRANSFER_SCHEMA)
    with pytest.raises(SchemaError, match="missing columns"):
        rows_to_table([{k: v for k, v in make_row(0).items() if k != "text"}])
    with pytest.raises(SchemaError, match=r"confidence must lie in \[0, 1\]"):
        rows_to_table([make_row(0, confidence=1.5)])
    with pytest.raises(SchemaError, match="not unique"):
        rows_to_table([make_row(0), make_row(0)])
    with pytest.raises(SchemaError):
        rows_to_table([make_row(0, label="zero")])
