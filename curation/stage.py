"""What every stage returns, and small helpers shared by stages.

A stage is a typed config plus a pure function ``run(records, config) -> StageResult``
over a Polars frame with the ``schemas.RECORD_SCHEMA`` columns. Stages never drop a
row silently: a row is either in ``kept`` or in ``rejected`` with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from schemas import RECORD_SCHEMA, conform

REJECTION_COLUMNS = {
    "id": pl.String,
    "stage": pl.String,
    "reason": pl.String,
    "detail": pl.String,
    "duplicate_of": pl.String,
}


@dataclass
class StageResult:
    kept: pl.DataFrame
    rejected: pl.DataFrame  # REJECTION_COLUMNS
    # id plus the stage columns the stage computed for rows it then rejected (e.g. the language of a
    # row rejected for its language), so the lineage keeps them; None when there are none
    values: pl.DataFrame | None = None

    @property
    def reasons(self) -> dict[str, int]:
        if self.rejected.is_empty():
            return {}
        counts = self.rejected.group_by("reason").len().sort("reason")
        return dict(zip(counts["reason"].to_list(), counts["len"].to_list()))


def empty_rejections() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTION_COLUMNS)


def rejections(frame: pl.DataFrame, stage: str, reason: str | pl.Expr,
               detail: str | pl.Expr | None = None, duplicate_of: pl.Expr | None = None) -> pl.DataFrame:
    """Rejection rows for every row of ``frame`` (which must have an ``id`` column)."""
    as_expr = lambda v: v if isinstance(v, pl.Expr) else pl.lit(v, dtype=pl.String)  # noqa: E731
    return frame.select(
        pl.col("id"),
        pl.lit(stage, dtype=pl.String).alias("stage"),
        as_expr(reason).cast(pl.String).alias("reason"),
        as_expr(detail).cast(pl.String).alias("detail"),
        (duplicate_of if duplicate_of is not None else pl.lit(None, dtype=pl.String)).cast(pl.String).alias("duplicate_of"),
    )


def records_frame(table: pa.Table | list[dict] | None = None) -> pl.DataFrame:
    """A Polars frame with exactly the RECORD_SCHEMA columns (missing stage columns null)."""
    if table is None:
        table = RECORD_SCHEMA.empty_table()
    elif isinstance(table, list):
        table = pa.Table.from_pylist(table, schema=RECORD_SCHEMA) if table else RECORD_SCHEMA.empty_table()
    return pl.from_arrow(conform(table, RECORD_SCHEMA))


def to_records_table(frame: pl.DataFrame) -> pa.Table:
    return conform(frame.to_arrow(), RECORD_SCHEMA)
