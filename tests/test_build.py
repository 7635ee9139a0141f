"""End to end: the demo recipe through the Prefect flow, then the outputs as a user reads them."""

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from curation.accounting import ConservationError, check_outputs
from curation.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / name).glob("*.parquet")))


def test_outputs_and_manifest(demo_build):
    for name in ("sft", "preference", "prompts", "rejected", "quarantine"):
        assert list((demo_build / name).glob("part-*.parquet")), name
    manifest = json.loads((demo_build / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input_records"] == counts["kept"] + counts["rejected"] + counts["quarantined"]
    assert manifest["conservation"]["ok"] is True
    assert manifest["recipe"]["name"] == "demo"
    assert all(len(f["sha256"]) == 64 for f in manifest["inputs"])
    assert manifest["models"][0]["name"] == "curation-rm-minilm"
    assert manifest["models"][0]["files"], "model file hashes are recorded"
    for stage in ("ingest", "normalize", "filter", "dedup", "score", "select"):
        assert {"in", "out", "dropped", "dropped_by_reason"} <= set(manifest["stages"][stage])
    assert not list(demo_build.rglob("*.tmp")), "no temporary files are left behind"


def test_every_source_with_usable_records_contributes(demo_build):
    sft, pref, prompts = _read(demo_build, "sft"), _read(demo_build, "preference"), _read(demo_build, "prompts")
    contributing = set(sft["source"]) | set(pref["source"]) | set(prompts["source"])
    manifest = json.loads((demo_build / "manifest.json").read_text())
    expected = {f["source"] for f in manifest["inputs"] if f["rows"] > 0}
    assert expected <= contributing
    assert sft.height > 0 and pref.height > 0 and prompts.height == 10
    assert set(pref["pair_source"]) == {"native", "score"}


def test_quarantine_holds_broken_records_with_file_line_and_bytes(demo_build):
    quarantine = _read(demo_build, "quarantine")
    broken = quarantine.filter(pl.col("source") == "chat_jsonl").sort("line")
    assert broken["line"].to_list() == [3, 4, 5, 6]
    assert broken.filter(pl.col("line") == 6)["raw"][0].startswith(b'{"messages": [{"role": "user", "content": "caf\xe9')
    assert quarantine.filter(pl.col("source") == "empty_export")["error"].str.contains("empty").all()


def test_rejections_carry_stage_reason_and_real_defects(demo_build):
    rejected = _read(demo_build, "rejected")
    assert rejected["stage"].null_count() == 0 and rejected["reason"].null_count() == 0
    reasons = dict(zip(*rejected.group_by("reason").len().to_dict(as_series=False).values()))
    assert reasons.get("empty_answer", 0) >= 3  # gemma-2b-it x2 and a zero-width-space answer in the sample
    assert "exact_duplicate" in reasons  # identical answers across models and the identity Q&A
    ai = rejected.filter(pl.col("source_record").str.contains("index:4") & (pl.col("source") == "sharegpt"))
    assert ai["reason"].to_list() in (["ai_disclaimer"], ["refusal"])
    french = rejected.filter((pl.col("source") == "sharegpt") & pl.col("source_record").str.contains("index:5"))
    assert french["reason"].to_list() == ["language"]
    dups = rejected.filter(pl.col("duplicate_of").is_not_null())
    assert dups.height > 0


def test_outputs_load_with_datasets(demo_build):
    datasets = pytest.importorskip("datasets")
    sft = datasets.load_dataset("parquet", data_files={"train": str(demo_build / "sft" / "*.parquet")}, split="train")
    assert sft.num_rows > 0
    assert {"role", "content"} == set(sft[0]["messages"][0])
    pref = datasets.load_dataset("parquet", data_files={"train": str(demo_build / "preference" / "*.parquet")},
                                 split="train")
    assert {"prompt", "chosen", "rejected"} <= set(pref.column_names)


def test_conservation_check_catches_a_deleted_row(demo_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_build, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    part = sorted((copy / "rejected").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(1), part)
    with pytest.raises(ConservationError, match="conservation failed"):
        check_outputs(copy, manifest)


def test_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nsources:\n  - name: a\n    path: a.jsonl\n    formt: alpaca\n")
    assert main(["build", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sources[0].formt: unknown key" in err


def test_reward_aware_dedup_keeps_the_best_scored_copy(tmp_path):
    """With dedup.keep: score the build scores before dedup; every dropped duplicate scored no
    higher than the row it duplicated."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["dedup"]["keep"] = "score"
    for source in recipe["sources"]:
        source["path"] = str((ROOT / "recipes" / source["path"]).resolve())
    recipe["score"]["model"] = str((ROOT / "recipes" / recipe["score"]["model"]).resolve())
    path = tmp_path / "score_keep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["build", str(path), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["score"]["before_dedup"] is True
    rejected = _read(out, "rejected")
    near = rejected.filter(pl.col("reason") == "near_duplicate")
    assert near.height > 0 and near["score"].null_count() == 0
    kept_scores = pl.concat([
        _read(out, "sft").select("id", "score"),
        _read(out, "preference").select(pl.col("chosen_id").alias("id"), pl.col("chosen_score").alias("score")),
        _read(out, "preference").select(pl.col("rejected_id").alias("id"), pl.col("rejected_score").alias("score")),
        rejected.select("id", "score"),
    ]).unique("id")
    pairs = near.join(kept_scores.rename({"id": "duplicate_of", "score": "kept_score"}), on="duplicate_of")
    assert pairs.height == near.height
    assert (pairs["kept_score"] >= pairs["score"]).all()
