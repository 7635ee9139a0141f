"""`curate diff`: the demo build against itself, without lineage, and against a build with one added file."""

import gzip
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from curation.cli import main
from curation.diff import _explain, compare_inputs, compare_recipes, diff_builds, key_stage
from curation.ingest import SourceConfig
from curation.readers import read_file
from curation.verify import verify_build

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXTRA = "claude-2.1.json.gz"   # AlpacaEval answers of a model the demo sample does not have
EXTRA_RECORDS = 10


def test_build_against_itself_and_without_lineage(demo_build, tmp_path):
    assert diff_builds(demo_build, demo_build).rows.is_empty()
    # The same build with lineage/ taken away: statuses re-derived from the outputs agree with lineage.
    bare = tmp_path / "bare"
    shutil.copytree(demo_build, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    assert manifest["outputs"].pop("lineage")
    shutil.rmtree(bare / "lineage")
    (bare / "manifest.json").write_text(json.dumps(manifest))
    diff = diff_builds(demo_build, bare)
    assert not diff.b.lineage and diff.a.lineage
    assert diff.rows.is_empty() and diff.counts["unchanged"] == diff.counts["rows_a"] == diff.counts["rows_b"]
    statuses = diff.b.rows.join(diff.a.rows, on="id", suffix="_lineage")
    assert statuses.height == diff.a.rows.height
    assert (statuses["status"] == statuses["status_lineage"]).all()
    assert statuses["source_file"].null_count() > 0  # rows kept only in preference/ have no file without lineage


def test_recipe_keys_and_the_stage_they_act_at(demo_build):
    recipe = json.loads((demo_build / "manifest.json").read_text())["recipe"]
    changed = json.loads(json.dumps(recipe))
    changed["filters"]["length"] = {**changed["filters"].get("length", {}), "min_words": 3}
    changed["sources"] = changed["sources"][::-1]                     # order of sources is no change
    changed["sources"].append({"name": "extra", "path": "x.jsonl"})  # one key for a whole new source
    changed["select"]["preference"]["min_margin"] = 2.0
    changed["description"] = "edited"
    found = {d["key"]: d["stage"] for d in compare_recipes(recipe, changed)}
    assert found == {"filters.length.min_words": "filter", "sources.extra": "ingest",
                     "select.preference.min_margin": "select", "description": None}
    assert key_stage("sources.hh_harmless.filters.truncation.enabled") == "filter"
    assert key_stage("score.model") == "score" and key_stage("score.model", "dedup") == "dedup"


def test_moved_inputs_are_matched_by_source_and_name():
    a = {"inputs": [{"path": "/old/data/a.jsonl", "source": "s", "sha256": "1"},
                    {"path": "/old/data/b.jsonl", "source": "s", "sha256": "2"},
                    {"path": "/old/data/c.jsonl", "source": "s", "sha256": "3"}]}
    b = {"inputs": [{"path": "/new/data/a.jsonl", "source": "s", "sha256": "1"},
                    {"path": "/new/data/b.jsonl", "source": "s", "sha256": "9"},
                    {"path": "/new/data/d.jsonl", "source": "s", "sha256": "4"}]}
    states = {(f["path_a"], f["path_b"]): f["state"] for f in compare_inputs(a, b)}
    assert states == {("/old/data/a.jsonl", "/new/data/a.jsonl"): "unchanged",
                      ("/old/data/b.jsonl", "/new/data/b.jsonl"): "changed",
                      ("/old/data/c.jsonl", None): "removed", (None, "/new/data/d.jsonl"): "added"}


def test_causes_only_come_from_stages_the_row_reached():
    """A select-only recipe change cannot explain a row dropped by the filter in one build."""
    s = pl.String
    joined = pl.DataFrame({
        "id": ["r1", "r2", "r3"], "source_a": ["x"] * 3, "source_b": ["x"] * 3,
        "source_file_a": ["/f"] * 3, "source_file_b": ["/f"] * 3,
        "prompt_id_a": ["p1", "p2", "p3"], "prompt_id_b": ["p1", "p2", "p3"],
        "status_a": ["filter:refusal", "kept:sft", "kept:sft"], "status_b": ["kept:sft", "select:not_best", "kept:sft"],
        "stage_a": ["filter", "kept", "kept"], "stage_b": ["kept", "select", "kept"],
        "competitor_a": [None, None, None], "competitor_b": [None, None, None],
        "text_a": [1, 2, 3], "text_b": [1, 2, 4]},
        schema_overrides={"competitor_a": s, "competitor_b": s, "text_a": pl.UInt64, "text_b": pl.UInt64})
    files = [{"source": "x", "path_a": "/f", "path_b": "/f", "state": "unchanged"}]
    config = [{"key": "select.preference.min_margin", "a": 0.1, "b": 1.0, "stage": "select"}]
    rows = _explain(joined, files, config, [], code_changed=False)
    assert dict(zip(rows["id"], rows["change"])) == {"r1": "status", "r2": "status", "r3": "text"}
    assert dict(zip(rows["id"], rows["cause"])) == {"r1": "unexplained", "r2": "config", "r3": "unexplained"}
    normalize = [{"key": "normalize.whitespace", "a": True, "b": False, "stage": "normalize"}]
    rows = _explain(joined, files, normalize, [], code_changed=True)
    assert dict(zip(rows["id"], rows["cause"])) == {"r1": "config", "r2": "config", "r3": "config"}


@pytest.fixture(scope="module")
def build_with_added_file(demo_build, shared_data, tmp_path_factory):
    """The demo recipe again, over the same files plus one AlpacaEval outputs file (an excerpt of shared data).

    The recipe is copied unchanged beside a data folder of links to the originals, so every
    existing input keeps its path and sha256 and only the added file differs.
    """
    root = tmp_path_factory.mktemp("added")
    (root / "recipes").mkdir()
    shutil.copyfile(PROJECT_ROOT / "recipes" / "demo.yaml", root / "recipes" / "demo.yaml")
    sample = root / "data" / "sample"
    sample.mkdir(parents=True)
    (root / "data" / "reward_model").symlink_to(PROJECT_ROOT / "data" / "reward_model")
    for entry in (PROJECT_ROOT / "data" / "sample").iterdir():
        if entry.name != "alpaca_eval_outputs":
            (sample / entry.name).symlink_to(entry)
    outputs = sample / "alpaca_eval_outputs"
    outputs.mkdir()
    for entry in (PROJECT_ROOT / "data" / "sample" / "alpaca_eval_outputs").iterdir():
        (outputs / entry.name).symlink_to(entry)
    with gzip.open(shared_data / "alpaca_eval" / "outputs" / EXTRA, "rt") as handle:
        records = json.load(handle)[:EXTRA_RECORDS]  # the same prompts the sample answers: they compete
    with gzip.open(outputs / EXTRA, "wt") as handle:
        json.dump(records, handle)
    out = root / "out"
    assert main(["build", str(root / "recipes" / "demo.yaml"), "--out", str(out), "--quiet"]) == 0
    return out, outputs / EXTRA


def test_diff_of_an_added_file_reports_exactly_its_rows(demo_build, build_with_added_file, capsys):
    out, extra = build_with_added_file
    assert verify_build(out).ok
    source = SourceConfig(name="alpaca_eval_outputs", path=str(extra.parent), include="*.json.gz")
    expected = {row["id"] for batch in read_file(extra, source, EXTRA) for row in batch.rows}
    assert len(expected) == EXTRA_RECORDS

    diff = diff_builds(demo_build, out)
    assert [(f["state"], f["path_b"], f["rows_b"], f["rows_in_diff"]) for f in diff.files] == [
        ("added", str(extra.resolve()), EXTRA_RECORDS, EXTRA_RECORDS)]
    assert diff.config == [] and diff.models == [] and diff.code is None
    added = diff.rows.filter(pl.col("change") == "added")
    assert set(added["id"]) == expected
    assert set(added["cause"]) == {"input added"} and set(added["source_file"]) == {str(extra.resolve())}
    assert diff.counts["removed"] == 0 and diff.counts["changed_text"] == 0
    # The new answers compete for the same prompts: rows that lost (or won) their place to them
    # changed status, and every one of them is tied to the added file.
    changed = diff.rows.filter(pl.col("change") == "status")
    assert set(changed["cause"]) <= {"competition"}
    assert diff.counts["rows_b"] == diff.counts["rows_a"] + EXTRA_RECORDS

    assert main(["diff", str(demo_build), str(out), "--rows", "2"]) == 0
    text = capsys.readouterr().out
    assert f"input added: {extra.resolve()} (source alpaca_eval_outputs, - -> {EXTRA_RECORDS} rows" in text
    assert "config: unchanged" in text and "models: unchanged" in text
    assert main(["diff", str(demo_build), str(out), "--json", "--rows", "all"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in report["rows"]["added"]} == expected
    assert report["counts"]["added"] == EXTRA_RECORDS
