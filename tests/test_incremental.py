"""Incremental builds through the real flow on real AlpacaEval files: a warm rebuild computes nothing and writes
what a cold build writes; a new file costs only its own records; the dedup index rejects new rows that duplicate
rows an earlier build kept, and changes nothing when the input still holds those rows.

The recipe has no scorer (scores are cached by curation/score_cache.py, tested in tests/test_score_cache.py), so the
builds take seconds.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curation.cli import main
from curation.dedup import EARLIER
from curation.ingest import ingest
from curation.normalize import input_key
from curation.recipe import load_recipe

MODELS = ("claude-2.1", "gemma-2b-it", "minotaur-13b")
NEW = "vicuna-7b"  # the model whose answers arrive later
RECORDS = 40
TABLES = ("sft", "preference", "prompts", "rejected", "quarantine", "lineage")


@pytest.fixture(autouse=True)
def no_ambient_cache(monkeypatch):
    monkeypatch.delenv("CURATION_CACHE", raising=False)


def _copy(shared: Path, data: Path, model: str, name: str | None = None, edit=None) -> None:
    """The first RECORDS of the model's outputs and annotations files (outputs only when renamed)."""
    kinds = ("outputs",) if name else ("outputs", "annotations")
    for kind in kinds:
        with gzip.open(shared / "alpaca_eval" / kind / f"{model}.json.gz") as handle:
            records = json.load(handle)[:RECORDS]
        if edit is not None:
            records = edit(records)
        (data / kind).mkdir(parents=True, exist_ok=True)
        with gzip.open(data / kind / f"{name or model}.json.gz", "wt", encoding="utf-8") as out:
            json.dump(records, out)


def _remove(data: Path, model: str) -> None:
    for kind in ("outputs", "annotations"):
        (data / kind / f"{model}.json.gz").unlink()


def _recipe(folder: Path, shared: Path, **dedup) -> Path:
    data = folder / "data"
    recipe = {
        "name": "incremental-test",
        "sources": [
            {"name": "alpaca_eval_outputs", "path": str(data / "outputs"), "include": "*.json.gz",
             "use_for": ["sft", "preference"]},
            {"name": "alpaca_eval_judgements", "path": str(data / "annotations"), "include": "*.json.gz",
             "use_for": ["preference"]},
            {"name": "mt_bench", "path": str(shared / "fastchat" / "mt_bench_question.jsonl"), "use_for": ["prompts"]},
        ],
        "filters": {"language": {"allow": ["en"]}},
        "dedup": {"exact": True, "near": {"threshold": 0.8, "field": "conversation"}, **dedup},
        "select": {"preference": {"native": True, "from_scores": False}},
    }
    path = folder / f"recipe{'-' + '-'.join(dedup) if dedup else ''}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _build(recipe: Path, out: Path, cache: Path | None) -> dict:
    args = ["build", str(recipe), "--out", str(out), "--quiet"] + (["--cache", str(cache)] if cache else [])
    assert main(args) == 0
    return json.loads((out / "manifest.json").read_text())


def _tables(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(sorted((out / name).glob("*.parquet"))) for name in TABLES}


def _assert_same_outputs(first: Path, second: Path) -> None:
    a, b = _tables(first), _tables(second)
    for name in TABLES:
        assert a[name].equals(b[name]), name


def _cache(manifest: dict, stage: str, name: str) -> dict:
    return manifest["stages"][stage]["cache"][name]


def test_a_warm_rebuild_computes_nothing_and_writes_what_a_cold_build_writes(shared_data, tmp_path):
    for model in (*MODELS, NEW):
        _copy(shared_data, tmp_path / "data", model)
    recipe = _recipe(tmp_path, shared_data)
    plain = _build(recipe, tmp_path / "plain", None)
    assert all("cache" not in counts for counts in plain["stages"].values())
    cold = _build(recipe, tmp_path / "cold", tmp_path / "cache")
    warm = _build(recipe, tmp_path / "warm", tmp_path / "cache")
    for stage, name in (("normalize", "normalize"), ("filter", "filter"), ("dedup", "minhash")):
        first, again = _cache(cold, stage, name), _cache(warm, stage, name)
        assert first["hits"] == 0 and first["computed"] > 0, name
        assert again["computed"] == 0 and again["hits"] == first["computed"], name
    index_cold, index_warm = _cache(cold, "dedup", "dedup_index"), _cache(warm, "dedup", "dedup_index")
    assert index_cold["computed"] == cold["stages"]["dedup"]["out"]  # every kept row is indexed once
    assert index_warm == {**index_cold, "hits": 0, "computed": 0}  # nothing new to index; no row's input is gone
    assert cold["stages"]["filter"]["dropped_by_reason"] and cold["stages"]["dedup"]["dropped_by_reason"]
    _assert_same_outputs(tmp_path / "plain", tmp_path / "cold")
    _assert_same_outputs(tmp_path / "plain", tmp_path / "warm")


def test_a_new_file_costs_only_its_own_records(shared_data, tmp_path):
    data = tmp_path / "data"
    for model in MODELS:
        _copy(shared_data, data, model)
    recipe = _recipe(tmp_path, shared_data)
    parsed, base = load_recipe(recipe)
    before = set(input_key(ingest(list(parsed.sources), base).records).to_list())
    first = _build(recipe, tmp_path / "first", tmp_path / "cache")
    _copy(shared_data, data, NEW)
    after = set(input_key(ingest(list(parsed.sources), base).records).to_list())
    grown = _build(recipe, tmp_path / "grown", tmp_path / "cache")

    assert grown["counts"]["input_records"] - first["counts"]["input_records"] == 3 * RECORDS  # answers + judged pairs
    normalized = _cache(grown, "normalize", "normalize")
    assert normalized == {**normalized, "computed": len(after - before), "hits": len(after & before)}
    assert 0 < len(after - before) < 3 * RECORDS  # the judged pairs repeat the new answers and the reference's
    judged = _cache(grown, "filter", "filter")
    assert 0 < judged["computed"] <= normalized["computed"]
    assert 0 < _cache(grown, "dedup", "minhash")["computed"] <= 2 * normalized["computed"]  # prompt and answer texts

    scratch = _build(recipe, tmp_path / "scratch", tmp_path / "fresh-cache")
    assert _cache(scratch, "normalize", "normalize")["hits"] == 0
    _assert_same_outputs(tmp_path / "grown", tmp_path / "scratch")


def test_the_dedup_index_rejects_new_copies_of_rows_an_earlier_build_kept(shared_data, tmp_path):
    data = tmp_path / "data"
    for model in (*MODELS, NEW):
        _copy(shared_data, data, model)
    recipe = _recipe(tmp_path, shared_data)
    no_index = _recipe(tmp_path, shared_data, against_earlier_builds=False)
    _build(recipe, tmp_path / "a", tmp_path / "cache")
    lineage = _tables(tmp_path / "a")["lineage"]
    # rows of the new model's two files that dedup kept in build (a): what the index holds of them (a row the
    # funnel dropped but a preference pair uses is in an output, with the stage that dropped it as funnel_stage)
    dropped_by = pl.coalesce("stage", "funnel_stage")
    kept_all = lineage.filter(pl.col("source_file").str.ends_with(f"/{NEW}.json.gz"),
                              ~dropped_by.is_in(["normalize", "filter", "dedup"]).fill_null(False))
    kept = kept_all.filter(pl.col("source_file").str.contains("/outputs/"))
    assert kept.height > RECORDS // 2

    # The new model's files are withdrawn, and its answers come back under another name, the longest kept one edited.
    kept_index = set(kept["source_record"].str.extract(r"(\d+)$").cast(pl.Int64).to_list())
    with gzip.open(shared_data / "alpaca_eval" / "outputs" / f"{NEW}.json.gz") as handle:
        answers = [r["output"] for r in json.load(handle)[:RECORDS]]
    longest = max(kept_index, key=lambda i: len(answers[i]))

    def edit(records: list[dict]) -> list[dict]:
        records[longest] = dict(records[longest], output=records[longest]["output"] + " I hope this helps!")
        return records
    _remove(data, NEW)
    _copy(shared_data, data, NEW, name=f"{NEW}-reupload", edit=edit)
    withdrawn = _build(recipe, tmp_path / "b", tmp_path / "cache")
    _build(no_index, tmp_path / "b-no-index", tmp_path / "cache-no-index")

    index = _cache(withdrawn, "dedup", "dedup_index")
    assert index["hits"] == kept_all.height  # the withdrawn files' kept rows take part as anchors
    # lineage, not rejected/: a dropped row that a preference pair uses is in an output, its reason in funnel_reason
    rejected = _tables(tmp_path / "b")["lineage"].filter(pl.coalesce("reason", "funnel_reason") == EARLIER).select(
        "id", "source_file", "source_record", pl.col("dup_cluster").alias("duplicate_of"),
        pl.coalesce("detail", "funnel_detail").alias("detail"))
    assert rejected.height == withdrawn["stages"]["dedup"]["dropped_by_reason"][EARLIER]
    assert set(rejected["duplicate_of"]) <= set(kept_all["id"])
    reupload = kept.select("id", "source_record").join(rejected, left_on="id", right_on="duplicate_of", suffix="_copy")
    assert reupload["source_file"].str.ends_with(f"{NEW}-reupload.json.gz").all()
    assert reupload.height == kept.height  # every kept answer came back, and each copy points at its original
    assert reupload["source_record"].equals(reupload["source_record_copy"])
    how = reupload["detail"]
    assert (how.str.starts_with("same content_hash as ") | how.str.starts_with("jaccard≈")).all()
    edited = reupload.filter(pl.col("source_record").str.extract(r"(\d+)$").cast(pl.Int64) == longest)
    assert edited["detail"].str.starts_with("jaccard≈").all() and edited.height == 1
    assert rejected["detail"].str.contains("was kept by an earlier build and is not in this build's input").all()
    # without the index the copies are new rows like any other
    plain = _tables(tmp_path / "b-no-index")["lineage"]
    assert EARLIER not in set(plain["reason"]) | set(plain["funnel_reason"])
    copies = plain.filter(pl.col("id").is_in(reupload["id_copy"].implode()))
    assert copies.height == kept.height
    assert copies.filter(pl.coalesce("stage", "funnel_stage") == "dedup").is_empty()

    # The withdrawn files come back: the input holds every indexed row again, so the index changes nothing.
    _copy(shared_data, data, NEW)
    restored = _build(recipe, tmp_path / "c", tmp_path / "cache")
    assert _cache(restored, "dedup", "dedup_index")["hits"] == 0
    _build(no_index, tmp_path / "c-no-index", tmp_path / "cache-no-index")
    _assert_same_outputs(tmp_path / "c", tmp_path / "c-no-index")


def test_rows_an_earlier_build_kept_that_a_stricter_filter_now_drops_are_not_anchors(shared_data, tmp_path):
    """Only rows whose input is gone are anchors: a row still in the input but now dropped by the filter
    must not knock out its copies, so the rebuild equals a build without the index."""
    data = tmp_path / "data"
    for model in (*MODELS, NEW):
        _copy(shared_data, data, model)
    recipe = _recipe(tmp_path, shared_data)
    _build(recipe, tmp_path / "a", tmp_path / "cache")

    def stricter(path: Path) -> Path:
        spec = yaml.safe_load(path.read_text())
        spec["filters"]["length"] = {"min_answer_words": 60}
        strict = path.with_name(path.stem + "-strict.yaml")
        strict.write_text(yaml.safe_dump(spec, sort_keys=False))
        return strict
    strict = _build(stricter(recipe), tmp_path / "b", tmp_path / "cache")
    assert strict["stages"]["filter"]["dropped_by_reason"]  # the stricter rule drops rows build (a) kept
    assert _cache(strict, "dedup", "dedup_index")["hits"] == 0
    _build(stricter(_recipe(tmp_path, shared_data, against_earlier_builds=False)), tmp_path / "b-no-index", None)
    _assert_same_outputs(tmp_path / "b", tmp_path / "b-no-index")
