"""Every shared file through the whole flow: a few records of each, one source per file.

The full build (`curate build recipes/shared.yaml`) takes minutes; this keeps the same
sources and options but caps every file, so CI checks each real format end to end.
"""

from pathlib import Path

import polars as pl

# `capped_build` (tests/conftest.py, session-scoped): the shared recipe with every file capped.


def test_every_shared_file_is_read_and_accounted_for(capped_build, shared_data):
    out, manifest = capped_build
    files = {Path(f["path"]).name for f in manifest["inputs"]}
    expected = {p.name for p in shared_data.rglob("*") if p.is_file() and p.name != "README.md"}
    assert files == expected
    assert all(f["rows"] > 0 and f["quarantined"] == 0 for f in manifest["inputs"])
    counts = manifest["counts"]
    assert counts["input_records"] == counts["kept"] + counts["rejected"] + counts["quarantined"]
    assert manifest["conservation"]["ok"]


def test_every_kind_of_shared_file_reaches_an_output(capped_build):
    out, manifest = capped_build
    frames = {name: pl.read_parquet(sorted((out / name).glob("*.parquet"))) for name in ("sft", "preference", "prompts")}
    contributing = set(frames["sft"]["source"]) | set(frames["prompts"]["source"])
    pref = frames["preference"]
    ids = set(pref["chosen_id"]) | set(pref["rejected_id"])
    rejected = pl.read_parquet(sorted((out / "rejected").glob("*.parquet")))
    assert not ids & set(rejected["id"])
    contributing |= set(pref["source"])
    families = {s["name"].split("/")[0] for s in manifest["recipe"]["sources"]}
    for family in families:
        assert any(name.startswith(family + "/") for name in contributing), family
    # Non-AlpacaEval-output files each contribute on their own; the 67 model files compete for
    # the same 12 prompts, so only the winners and losers of each prompt are kept. The judge's
    # self-comparison (gpt4_1106_preview against itself: identical answers, preference 1.5 on
    # all 805) carries no preference and its answers duplicate the outputs file, so it is the
    # one file that rightly contributes nothing.
    self_comparison = "alpaca_eval_judgements/gpt4_1106_preview.json.gz"
    for source in manifest["recipe"]["sources"]:
        if not source["name"].startswith("alpaca_eval_outputs/") and source["name"] != self_comparison:
            assert source["name"] in contributing, source["name"]
    assert self_comparison not in contributing
    assert frames["preference"].filter(pl.col("pair_source") == "native")["source"].str.starts_with("hh_harmless").any()
    assert frames["preference"].filter(pl.col("pair_source") == "native")["source"].str.starts_with("oasst_trees").any()
