"""lineage/: one row per parsed input record, stage values kept on rows dropped later, and a
disposition that agrees with every other output (checked by the build's conservation too)."""

import json
import shutil

import polars as pl
import pytest

from curation.accounting import ConservationError, check_outputs
from curation.hashing import file_sha256
from curation.lineage import build_lineage
from curation.select import Selection, _schema_frame
from curation.stage import records_frame, rejections
from schemas import LINEAGE_SCHEMA, PREFERENCE_SCHEMA, PROMPT_SCHEMA, SFT_SCHEMA


def _read(out, name: str) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / name).glob("*.parquet")))


def _memberships(out) -> pl.DataFrame:
    """(id, outputs) recomputed from the output files."""
    pref = _read(out, "preference")
    found = pl.concat([
        _read(out, "sft").select("id", pl.lit("sft").alias("output")),
        pref.select(pl.col("chosen_id").alias("id"), pl.lit("preference").alias("output")),
        pref.select(pl.col("rejected_id").alias("id"), pl.lit("preference").alias("output")),
        _read(out, "prompts").select("id", pl.lit("prompts").alias("output")),
    ]).unique()
    rank = pl.col("output").replace_strict(["sft", "preference", "prompts"], [0, 1, 2])
    return found.group_by("id").agg(pl.col("output").sort_by(rank).alias("expected"))


def test_one_row_per_parsed_record(capped_build):
    out, manifest = capped_build
    lineage = _read(out, "lineage")
    counts = manifest["counts"]
    parsed = sum(f["rows"] for f in manifest["inputs"])
    assert lineage.height == counts["input_records"] - counts["quarantined"] == parsed
    assert lineage["id"].n_unique() == lineage.height
    assert lineage.select("source_file", "source_record").n_unique() == lineage.height
    assert lineage.schema == pl.from_arrow(LINEAGE_SCHEMA.empty_table()).schema
    per_file = lineage.group_by("source_file").len()
    assert dict(per_file.iter_rows()) == {f["path"]: f["rows"] for f in manifest["inputs"] if f["rows"]}
    listed = manifest["outputs"]["lineage"]
    assert sum(f["rows"] for f in listed) == lineage.height
    assert all(file_sha256(out / f["path"]) == f["sha256"] for f in listed)
    assert manifest["conservation"]["lineage_rows"] == lineage.height
    kept = lineage.filter(pl.col("stage").is_null())
    assert kept.height == counts["kept"] and lineage.height - kept.height == counts["rejected"]


def test_disposition_agrees_with_the_outputs(capped_build):
    out, manifest = capped_build
    lineage = _read(out, "lineage")
    rejected = _read(out, "rejected")
    joined = rejected.join(lineage, on="id", how="left", suffix="_l")
    assert joined.height == rejected.height
    for column in ("stage", "reason", "detail", "duplicate_of", "score", "source_record"):
        assert joined[column].equals(joined[f"{column}_l"], null_equal=True), column
    check = lineage.join(_memberships(out), on="id", how="left").with_columns(pl.col("expected").fill_null([]))
    assert check["outputs"].equals(check["expected"])
    assert ((check["outputs"].list.len() > 0) == check["stage"].is_null()).all()
    # a row dropped from the funnel yet kept is kept only as a side of a preference pair
    recovered = lineage.filter(pl.col("funnel_stage").is_not_null())
    assert recovered.height == manifest["stages"]["select"]["recovered_by_preference"] > 0
    assert recovered["stage"].null_count() == recovered.height
    assert (recovered["outputs"] == ["preference"]).all()
    # values in the outputs are the lineage's values
    sft = _read(out, "sft").join(lineage, on="id", suffix="_l")
    for column in ("score", "language", "prompt_id", "scorer"):
        assert sft[column].equals(sft[f"{column}_l"], null_equal=True), column


def test_stage_values_are_kept_on_rows_dropped_later(capped_build):
    out, manifest = capped_build
    lineage = _read(out, "lineage")
    duplicates = lineage.filter(pl.col("stage") == "dedup")
    assert duplicates.height > 0
    for column in ("content_hash", "prompt_id", "n_turns", "prompt_chars", "answer_chars", "dup_cluster"):
        assert duplicates[column].null_count() == 0, column
    assert duplicates["language"].null_count() < duplicates.height
    assert (duplicates["dup_cluster"] == duplicates["duplicate_of"]).all()
    keepers = duplicates.join(lineage, left_on="duplicate_of", right_on="id", suffix="_keeper")
    assert keepers.height == duplicates.height
    assert (keepers["dup_cluster_keeper"] == keepers["duplicate_of"]).all(), "a keeper names its own cluster"
    exact = keepers.filter(pl.col("reason") == "exact_duplicate")
    assert (exact["content_hash"] == exact["content_hash_keeper"]).all()
    assert exact["language"].equals(exact["language_keeper"], null_equal=True)

    not_selected = lineage.filter(pl.col("stage") == "select")
    assert not_selected.height > 0 and not_selected["score"].null_count() == 0
    assert set(not_selected["scorer"]) == {manifest["recipe"]["score"]["name"]}
    filtered = lineage.filter(pl.col("stage") == "filter")
    assert filtered.height > 0 and filtered["content_hash"].null_count() == 0
    # language identification runs last in the filter, on rows every other rule kept
    assert filtered.filter(pl.col("reason") != "language")["language"].null_count() == \
        filtered.filter(pl.col("reason") != "language").height


def test_demo_lineage_covers_normalize_language_semantic_and_quarantine(demo_build):
    lineage = _read(demo_build, "lineage")
    manifest = json.loads((demo_build / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["quarantined"] > 0
    assert lineage.height == counts["input_records"] - counts["quarantined"]
    normalized = lineage.filter(pl.col("stage") == "normalize")
    assert normalized.height > 0
    assert normalized.select("content_hash", "n_turns", "language", "score").null_count().sum_horizontal().item() \
        == 4 * normalized.height
    language = lineage.filter(pl.col("reason") == "language")
    assert language.height > 0
    assert language["language"].null_count() == 0 and not language["language"].is_in(["en"]).any()
    for row in language.iter_rows(named=True):
        assert f"detected '{row['language']}'" in row["detail"]
    semantic = lineage.filter(pl.col("stage") == "semantic_dedup")
    assert semantic.height > 0
    assert (semantic["dup_cluster"] == semantic["duplicate_of"]).all()
    assert semantic["language"].null_count() < semantic.height and semantic["content_hash"].null_count() == 0
    quarantine = _read(demo_build, "quarantine").filter(pl.col("line").is_not_null())
    positions = lineage.select("source_file", pl.col("source_record").str.extract(r"^[a-z]+:(\d+)", 1)
                               .cast(pl.Int64).alias("line"))
    assert quarantine.join(positions, on=["source_file", "line"], how="semi").is_empty()


def test_conservation_catches_a_lineage_that_disagrees(capped_build, tmp_path):
    out, manifest = capped_build
    for name, damage, message in [
        ("missing_row", lambda f: f.slice(1), "lineage has"),
        ("kept_marked_rejected", lambda f: f.with_columns(
            pl.when(pl.int_range(pl.len()) == pl.col("stage").is_null().arg_max())
            .then(pl.lit("filter")).otherwise(pl.col("stage")).alias("stage")), "either in an output"),
    ]:
        copy = tmp_path / name
        shutil.copytree(out, copy)
        parts = sorted((copy / "lineage").glob("*.parquet"))
        lineage = damage(pl.read_parquet(parts))
        for part in parts:
            part.unlink()
        lineage.write_parquet(copy / "lineage" / "part-00000.parquet")
        with pytest.raises(ConservationError, match=message):
            check_outputs(copy, manifest)


def test_a_semantic_duplicate_of_a_dedup_keeper_points_at_the_semantic_keeper():
    """Row a absorbs its exact copy b in dedup, then is dropped as a paraphrase of c: b stays in
    a's cluster, a joins c's."""
    rows = [{"id": i, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": i}],
             "source": "s", "source_file": "/f", "source_record": f"line:{n}", "source_sha256": "0" * 64,
             "format": "alpaca", "kind": "conversation"} for n, i in enumerate("abc", start=1)]
    records = records_frame(rows)
    normalized = records.with_columns(content_hash=pl.Series(["h1", "h1", "h2"]), n_turns=pl.lit(2, pl.Int32))
    deduped = normalized.filter(pl.col("id") != "b").with_columns(
        dup_cluster=pl.when(pl.col("id") == "a").then(pl.lit("a")))
    semantic = deduped.filter(pl.col("id") == "c").with_columns(dup_cluster=pl.lit("c"))
    dropped = [rejections(records.filter(pl.col("id") == "b"), "dedup", "exact_duplicate", duplicate_of=pl.lit("a")),
               rejections(records.filter(pl.col("id") == "a"), "semantic_dedup", "semantic_duplicate",
                          duplicate_of=pl.lit("c"))]
    sft = semantic.with_columns(n_candidates=pl.lit(1, pl.Int32)).select(SFT_SCHEMA.names)
    selection = Selection(sft=sft.cast(_schema_frame(SFT_SCHEMA).schema), preference=_schema_frame(PREFERENCE_SCHEMA),
                          prompts=_schema_frame(PROMPT_SCHEMA), rejected=dropped[0].clear(), stats={})
    lineage = build_lineage(records, [normalized, deduped, semantic], dropped, selection).sort("id")
    assert lineage["dup_cluster"].to_list() == ["c", "a", "c"]
    assert lineage["stage"].to_list() == ["semantic_dedup", "dedup", None]
    assert lineage["outputs"].to_list() == [[], [], ["sft"]]
    assert lineage["content_hash"].to_list() == ["h1", "h1", "h2"] and lineage["n_turns"].to_list() == [2, 2, 2]
