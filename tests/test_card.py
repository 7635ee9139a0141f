"""The dataset card: Hugging Face metadata that `huggingface_hub` parses and `datasets` loads from, and
numbers that add up to the manifest's."""

import json
import shutil
from pathlib import Path

import polars as pl

from curation.card import card_text, front_matter, license_metadata, size_category, source_summary
from curation.cli import main


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_card_parses_with_huggingface_hub(demo_build):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(demo_build / "README.md")
    data = card.data
    manifest = _manifest(demo_build)
    assert data.pretty_name == "demo"
    # the demo mixes apache-2.0, mit and cc-by-nc-4.0 sources
    assert (data.license, data.license_name) == ("other", "mixed")
    assert "cc-by-nc-4.0: self_instruct_seeds" in data.license_details
    assert data.language == ["en"]
    assert data.size_categories == ["n<1K"]
    assert data.task_categories == ["text-generation"]
    assert {"sft", "preference", "dpo"} <= set(data.tags)
    configs = {c["config_name"]: c for c in data.configs}
    assert list(configs) == ["sft", "preference", "prompts"]
    assert configs["sft"]["default"] is True
    for name, config in configs.items():
        assert config["data_files"] == [{"split": "train", "path": f"{name}/*.parquet"}]
    # the body: run id, every source, the models with their hashes, the recipe
    assert manifest["run_id"] in card.text
    for source in manifest["recipe"]["sources"]:
        assert f"| {source['name']} |" in card.text
    assert manifest["models"][0]["model_hash"] in card.text
    assert "semantic-dedup" in card.text and "```yaml\nname: demo\n" in card.text


def test_source_table_adds_up_to_the_manifest(demo_build):
    manifest = _manifest(demo_build)
    summary = source_summary(demo_build, manifest)
    counts, select = manifest["counts"], manifest["stages"]["select"]
    totals = summary.select(pl.exclude("source", "license").sum()).row(0, named=True)
    assert totals["records_in"] == counts["input_records"]
    assert totals["kept"] == counts["kept"]
    assert totals["rejected"] == counts["rejected"] and totals["quarantined"] == counts["quarantined"]
    assert totals["sft_rows"] == select["sft_rows"] and totals["preference_pairs"] == select["preference_pairs"]
    assert totals["files"] == len(manifest["inputs"])
    row = summary.filter(pl.col("source") == "empty_export").row(0, named=True)
    assert (row["records_in"], row["quarantined"], row["kept"], row["license"]) == (1, 1, 0, None)
    # the card shows the same row
    assert "| empty_export | 1 | 1 | 0 | 0 | 0 | 0 | not stated |" in card_text(demo_build, manifest)


def test_datasets_loads_every_config(demo_build, tmp_path):
    from datasets import load_dataset

    manifest = _manifest(demo_build)
    for name, column in (("sft", "messages"), ("preference", "chosen"), ("prompts", "prompt")):
        dataset = load_dataset(str(demo_build), name, split="train", cache_dir=str(tmp_path))
        assert dataset.num_rows == sum(f["rows"] for f in manifest["outputs"][name]) > 0, name
        assert column in dataset.column_names
    first = load_dataset(str(demo_build), "sft", split="train", cache_dir=str(tmp_path))[0]
    assert first["messages"][-1]["role"] == "assistant" and first["source"]


def test_license_follows_the_sources_that_kept_rows(demo_build):
    manifest = _manifest(demo_build)
    summary = source_summary(demo_build, manifest)
    # one license everywhere (ids are lowercased: recipes often write "Apache-2.0")
    same = summary.with_columns(pl.lit("Apache-2.0").alias("license"))
    assert license_metadata(same) == {"license": "apache-2.0"}
    # a source that kept nothing does not count: empty_export has no license and no kept row
    mit = summary.with_columns(pl.when(pl.col("kept") > 0).then(pl.lit("mit")).alias("license"))
    assert license_metadata(mit) == {"license": "mit"}
    assert license_metadata(summary.with_columns(pl.lit(None, dtype=pl.String).alias("license"))) == {
        "license": "unknown"}
    mixed = license_metadata(summary)
    assert mixed["license"] == "other" and "mit: hh_harmless, gpteacher_codegen" in mixed["license_details"]
    # through the card: every source relicensed in the manifest gives a single license
    relicensed = json.loads(json.dumps(manifest))
    for source in relicensed["recipe"]["sources"]:
        source["license"] = "MIT"
    meta = front_matter(demo_build, relicensed)
    assert meta["license"] == "mit" and "license_name" not in meta


def test_size_categories():
    assert [size_category(n) for n in (0, 999, 1_000, 99_999, 100_000, 5_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_curate_report_rewrites_card_and_report(demo_build, tmp_path, capsys):
    out = tmp_path / "build"
    shutil.copytree(demo_build, out)
    manifest_bytes = (out / "manifest.json").read_bytes()
    (out / "README.md").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_bytes"] == (out / "report.html").stat().st_size
    text = (out / "README.md").read_text()
    assert f'load_dataset("{out.resolve()}", "sft", split="train")' in text
    assert (out / "manifest.json").read_bytes() == manifest_bytes, "the card and report never touch the manifest"

    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "manifest.json not found" in capsys.readouterr().err
