"""Per-record lineage: one row per parsed input record, with what every stage made of it.

Stages pass only their survivors on, so a row dropped by dedup is not in any later frame.
The lineage is assembled once at the end of a build from the frames the build already
holds: the ingested rows give the origin; each stage's survivors (and the values a stage
computed for rows it rejected, ``StageResult.values``) give the stage columns, a later
frame's non-null value winning; the rejections give the disposition. A dropped duplicate's
``dup_cluster`` is the row it duplicated. Everything is joins: no Python per row.
"""

from __future__ import annotations

import polars as pl

from curation.select import Selection
from curation.stage import empty_rejections
from schemas import LINEAGE_SCHEMA, STAGE_FIELDS

OUTPUT_NAMES = ("sft", "preference", "prompts")
STAGE_COLUMNS = ["prompt_id"] + [f.name for f in STAGE_FIELDS]
ORIGIN_COLUMNS = ["id", "source", "source_file", "source_record", "source_offset", "source_length", "source_sha256",
                  "format", "kind", "generator", "rank_group", "rank", "source_flags"]
# funnel stages whose rejections set dup_cluster to the row kept instead
DEDUP_STAGES = ("dedup", "semantic_dedup")


def output_membership(selection: Selection) -> pl.DataFrame:
    """(id, outputs): the outputs each kept row appears in, in OUTPUT_NAMES order."""
    found = pl.concat([
        selection.sft.select("id", pl.lit("sft").alias("output")),
        selection.preference.select(pl.col("chosen_id").alias("id"), pl.lit("preference").alias("output")),
        selection.preference.select(pl.col("rejected_id").alias("id"), pl.lit("preference").alias("output")),
        selection.prompts.select("id", pl.lit("prompts").alias("output")),
    ]).unique()
    order = pl.col("output").replace_strict(list(OUTPUT_NAMES), list(range(len(OUTPUT_NAMES))))
    return found.group_by("id").agg(pl.col("output").sort_by(order).alias("outputs"))


def build_lineage(records: pl.DataFrame, stage_values: list[pl.DataFrame], stage_rejections: list[pl.DataFrame],
                  selection: Selection) -> pl.DataFrame:
    """The LINEAGE_SCHEMA table of one build.

    ``records``: the ingested rows (origin columns). ``stage_values``: frames of ``id`` plus some
    of STAGE_COLUMNS, in funnel order (a later frame's non-null value wins). ``stage_rejections``:
    every stage's REJECTION_COLUMNS frame, as given to ``accounting.settle``.
    """
    lineage = records.select(ORIGIN_COLUMNS).with_columns(
        [pl.lit(None, dtype=records.schema.get(c, pl.String)).alias(c) for c in STAGE_COLUMNS])
    rejections = pl.concat([empty_rejections(), *stage_rejections])
    duplicates = rejections.filter(pl.col("stage").is_in(DEDUP_STAGES) & pl.col("duplicate_of").is_not_null())
    # Last: a row kept by dedup (dup_cluster = itself) and then dropped by semantic dedup takes the
    # semantic keeper; no later survivor frame holds a dropped duplicate, so nothing overrides it.
    frames = [*stage_values, duplicates.select("id", pl.col("duplicate_of").alias("dup_cluster"))]
    for frame in frames:
        columns = [c for c in frame.columns if c in STAGE_COLUMNS]
        if not columns or frame.is_empty():
            continue
        lineage = (lineage.join(frame.select("id", *columns).unique("id", keep="last"), on="id", how="left",
                                suffix="_new")
                   .with_columns([pl.coalesce(f"{c}_new", c).alias(c) for c in columns])
                   .drop([f"{c}_new" for c in columns]))

    membership = output_membership(selection)
    lineage = lineage.join(membership, on="id", how="left").with_columns(
        pl.col("outputs").fill_null(pl.lit([], dtype=pl.List(pl.String))))
    kept = pl.col("outputs").list.len() > 0
    disposition = rejections.select("id", "stage", "reason", "detail", "duplicate_of")
    lineage = lineage.join(disposition, on="id", how="left").with_columns(
        pl.when(kept).then(pl.col("stage")).alias("funnel_stage"),
        pl.when(kept).then(pl.col("reason")).alias("funnel_reason"),
        pl.when(kept).then(pl.col("detail")).alias("funnel_detail"),
        *[pl.when(~kept).then(pl.col(c)).alias(c) for c in ("stage", "reason", "detail", "duplicate_of")],
    )
    return lineage.select(LINEAGE_SCHEMA.names)

