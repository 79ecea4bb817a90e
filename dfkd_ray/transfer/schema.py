"""The transfer-set schema: one row per generated (or selected) text.

=================  =========  ==================================================================
column             type       meaning
=================  =========  ==================================================================
sample_id          string     ``"<teacher>/<class>/<index>"``: unique, stable across reruns
text               string     the transfer text
label              int32      global label id in the union label space
label_name         string     global label name
teacher            string     the teacher the row was made for (source teacher)
teacher_class      int32      that teacher's own class id: the request's target for targeted
                              sources (steered, prompt_tuned), the teacher's
                              prediction for untargeted ones (corpus, random_words)
source             string     transfer source name (``transfer.source``)
source_params      string     JSON of the source's parameters for this row
confidence         float32    the teacher's probability for ``teacher_class`` on ``text``
num_tokens         int32      tokens of ``text`` under the teacher's tokenizer (no special tokens)
seed               int64      the request's seed
heldout            bool       reserved for fitting confidence statistics, not for training
=================  =========  ==================================================================

``confidence`` is what the teacher believes, not evidence that the text is of the class: a
steered generator can find text that fools a teacher. Never report it as quality.
"""

from __future__ import annotations

import pyarrow as pa

# Column order as in the table above; every column is required.
TRANSFER_SCHEMA = pa.schema([pa.field(name, kind, nullable=False) for name, kind in [
    ("sample_id", pa.string()), ("text", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
    ("teacher", pa.string()), ("teacher_class", pa.int32()), ("source", pa.string()),
    ("source_params", pa.string()), ("confidence", pa.float32()), ("num_tokens", pa.int32()),
    ("seed", pa.int64()), ("heldout", pa.bool_())]])


class SchemaError(ValueError):
    """Rows that do not fit :data:`TRANSFER_SCHEMA`."""


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with exactly the schema's columns) -> a table, checked for types and ranges."""
    names = set(TRANSFER_SCHEMA.names)
    for i, row in enumerate(rows):
        if set(row) != names:
            missing, extra = sorted(names - set(row)), sorted(set(row) - names)
            raise SchemaError(f"row {i}: missing columns {missing}, unexpected columns {extra}")
    try:
        table = pa.Table.from_pylist(rows, schema=TRANSFER_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise SchemaError(f"rows do not fit the transfer-set schema: {e}") from e
    validate_table(table)
    return table


def validate_table(table: pa.Table) -> None:
    """Schema equality, no nulls, confidence in [0, 1], non-negative ids, unique sample ids."""
    if not table.schema.equals(TRANSFER_SCHEMA, check_metadata=False):
        raise SchemaError(f"schema differs from the transfer-set schema:\n{table.schema}\nexpected:\n{TRANSFER_SCHEMA}")
    for name in table.column_names:
        if table.column(name).null_count:
            raise SchemaError(f"column {name!r} has nulls")
    import pyarrow.compute as pc

    if len(table):
        conf = table.column("confidence")
        if pc.min(conf).as_py() < 0 or pc.max(conf).as_py() > 1:
            raise SchemaError("confidence must lie in [0, 1]")
        for col in ("label", "teacher_class", "num_tokens"):
            if pc.min(table.column(col)).as_py() < 0:
                raise SchemaError(f"column {col!r} has negative values")
        if pc.count_distinct(table.column("sample_id")).as_py() != len(table):
            raise SchemaError("sample_id values are not unique")
