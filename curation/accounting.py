"""Conservation: every input record is kept, rejected with a reason, or quarantined.

The unit of account is the row a reader extracted (one conversation; an OASST tree or an
HH pair yields several) plus each quarantined raw record. A row is *kept* when it appears
in any output (SFT, preference as either side, prompts); otherwise it is *rejected* with
the reason of the stage where it left the funnel. ``settle`` decides that once, in memory;
``check_outputs`` re-derives it from the files on disk at the end of every build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curation.select import Selection
from curation.stage import empty_rejections
from schemas import REJECTED_SCHEMA


class ConservationError(RuntimeError):
    """The outputs do not account for every input record exactly once."""


@dataclass
class Settlement:
    rejected: pl.DataFrame            # REJECTED_SCHEMA
    kept_ids: pl.Series
    recovered_by_preference: int      # funnel drop-outs kept as one side of a preference pair
    counts: dict = field(default_factory=dict)


def kept_ids(selection: Selection) -> pl.Series:
    return pl.concat([
        selection.sft["id"], selection.preference["chosen_id"], selection.preference["rejected_id"],
        selection.prompts["id"],
    ]).unique().rename("id")


def settle(ingested: pl.DataFrame, stage_rejections: list[pl.DataFrame], selection: Selection,
           quarantined: int, scores: pl.DataFrame | None = None) -> Settlement:
    """Final disposition of every ingested row. ``ingested`` needs the origin columns and messages;
    ``scores`` (id, score) puts the score of rows that were scored before they were dropped."""
    kept = kept_ids(selection)
    all_rejections = pl.concat([empty_rejections(), *stage_rejections])
    duplicated = all_rejections.filter(pl.col("id").is_duplicated())
    if duplicated.height:
        first = duplicated.row(0, named=True)
        raise ConservationError(f"row {first['id']} was rejected twice (stage {first['stage']}); a stage "
                                "passed on a row it also rejected")
    recovered = all_rejections.filter(pl.col("id").is_in(kept.implode())).height
    final = all_rejections.filter(~pl.col("id").is_in(kept.implode()))
    if scores is None:
        scores = pl.DataFrame(schema={"id": pl.String, "score": pl.Float64})
    rejected = final.join(
        ingested.select("id", "source", "source_file", "source_record", "messages"), on="id", how="left"
    ).join(scores.select("id", "score").unique("id"), on="id", how="left").select(REJECTED_SCHEMA.names)
    counts = {
        "input_records": ingested.height + quarantined,
        "kept": kept.len(),
        "rejected": rejected.height,
        "quarantined": quarantined,
    }
    unaccounted = ingested.join(rejected.select("id"), on="id", how="anti").join(
        kept.to_frame(), on="id", how="anti")
    if unaccounted.height:
        first = unaccounted.row(0, named=True)
        raise ConservationError(f"{unaccounted.height} rows were neither kept nor rejected, e.g. "
                                f"{first['source_record']} of {first['source_file']}")
    unknown = kept.to_frame().join(ingested.select("id"), on="id", how="anti")
    if unknown.height:
        raise ConservationError(f"{unknown.height} output rows have ids that no reader produced")
    return Settlement(rejected=rejected, kept_ids=kept, recovered_by_preference=recovered, counts=counts)


def _read_ids(paths: list[Path], columns: list[str]) -> pl.Series:
    if not paths:
        return pl.Series("id", [], dtype=pl.String)
    frame = pl.read_parquet(paths, columns=columns)
    return pl.concat([frame[c].rename("id") for c in columns])


def check_outputs(out_dir: Path, manifest: dict) -> dict:
    """Re-derive the accounting from the files on disk; raise ConservationError on any mismatch."""
    out_dir = Path(out_dir)
    parts = lambda name: sorted((out_dir / name).glob("*.parquet"))  # noqa: E731
    kept = pl.concat([
        _read_ids(parts("sft"), ["id"]),
        _read_ids(parts("preference"), ["chosen_id", "rejected_id"]),
        _read_ids(parts("prompts"), ["id"]),
    ]).unique()
    rejected = _read_ids(parts("rejected"), ["id"])
    quarantined = pl.read_parquet(parts("quarantine")).height if parts("quarantine") else 0

    expected_rows = sum(f["rows"] for f in manifest["inputs"])
    expected_quarantine = sum(f["quarantined"] for f in manifest["inputs"])
    problems = []
    if rejected.is_duplicated().any():
        problems.append(f"{int(rejected.is_duplicated().sum())} rejected rows appear twice")
    both = kept.to_frame().join(rejected.to_frame(), on="id", how="semi").height
    if both:
        problems.append(f"{both} rows are both kept and rejected")
    if kept.len() + rejected.n_unique() != expected_rows:
        problems.append(f"kept {kept.len()} + rejected {rejected.n_unique()} != {expected_rows} rows read")
    if quarantined != expected_quarantine:
        problems.append(f"quarantine holds {quarantined} records, inputs report {expected_quarantine}")
    counts = manifest.get("counts", {})
    if counts and (counts.get("kept"), counts.get("rejected"), counts.get("quarantined")) != (
            kept.len(), rejected.n_unique(), quarantined):
        problems.append("manifest counts differ from the files on disk")
    lineage_rows = None
    if parts("lineage"):
        lineage = pl.read_parquet(parts("lineage"), columns=["id", "stage", "outputs"])
        lineage_rows = lineage.height
        problems += _lineage_problems(lineage, kept, rejected, expected_rows)
    if problems:
        raise ConservationError("conservation failed: " + "; ".join(problems))
    result = {"ok": True, "input_records": expected_rows + expected_quarantine, "kept": kept.len(),
              "rejected": rejected.n_unique(), "quarantined": quarantined}
    if lineage_rows is not None:
        result["lineage_rows"] = lineage_rows
    return result


def _lineage_problems(lineage: pl.DataFrame, kept: pl.Series, rejected: pl.Series, expected_rows: int) -> list[str]:
    """The lineage has one row per parsed record and agrees with the outputs on every row's fate."""
    problems = []
    if lineage.height != expected_rows:
        problems.append(f"lineage has {lineage.height} rows, inputs report {expected_rows} records parsed")
    if lineage["id"].is_duplicated().any():
        problems.append(f"{int(lineage['id'].is_duplicated().sum())} lineage ids appear twice")
    in_outputs = pl.col("outputs").list.len() > 0
    if lineage.filter(in_outputs == pl.col("stage").is_not_null()).height:
        problems.append("lineage rows must be either in an output or dropped by a stage, not both or neither")
    says_kept = lineage.filter(pl.col("stage").is_null())["id"]
    says_rejected = lineage.filter(pl.col("stage").is_not_null())["id"]
    if says_kept.len() != kept.len() or not says_kept.is_in(kept.implode()).all():
        problems.append("lineage disagrees with the outputs on which rows are kept")
    if says_rejected.len() != rejected.n_unique() or not says_rejected.is_in(rejected.implode()).all():
        problems.append("lineage disagrees with rejected/ on which rows are rejected")
    return problems
