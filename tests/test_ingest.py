"""Ingest: every shared file end to end, the manifest, ids, caps and source resolution."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import polars as pl
import pydantic
import pytest

from curation.hashing import file_sha256
from curation.ingest import IngestResult, SourceConfig, ingest
from schemas import QUARANTINE_SCHEMA, RECORD_SCHEMA, STAGE_FIELDS

SHARED_SOURCES = {
    "alpaca_eval_outputs": "alpaca_eval/outputs",
    "alpaca_eval_annotations": "alpaca_eval/annotations",
    "oasst": "oasst",
    "hh_rlhf": "hh_rlhf",
    "alpaca_seed": "alpaca",
    "gpteacher": "gpteacher",
    "fastchat": "fastchat",
}


def shared_sources() -> list[SourceConfig]:
    return [SourceConfig(name=name, path=path) for name, path in SHARED_SOURCES.items()]


@pytest.fixture(scope="module")
def everything(shared_data) -> tuple[IngestResult, float]:
    start = time.perf_counter()
    result = ingest(shared_sources(), shared_data)
    return result, time.perf_counter() - start


def raw_count(path: Path) -> int:
    """Records in a shared file, counted independently of the readers."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data.lstrip()[:1] == b"[":
        return len(json.loads(data))
    if data.lstrip()[:1] == b"{" and not data.lstrip().startswith(b"{\""):  # a pretty-printed report
        return len(json.loads(data)["prompts"])
    return sum(1 for line in data.splitlines() if line.strip())


def test_all_shared_data_ingests_without_quarantine(everything, shared_data):
    result, seconds = everything
    print(f"\ningested all shared data: {result.records.height} rows, {result.quarantine.height} quarantined, "
          f"{len(result.files)} files in {seconds:.1f}s")
    assert result.quarantine.is_empty()
    assert len(result.files) == 67 + 37 + 4 + 1 + 1 + 3 + 3
    for info in result.files:
        assert info.rows > 0 and info.quarantined == 0 and not info.capped, info
        assert info.raw_records == raw_count(Path(info.path)), info.path
    by_format = dict(result.records.group_by("format").len().iter_rows())
    assert by_format == {
        "alpaca_eval_outputs": sum(f.raw_records for f in result.files if f.source == "alpaca_eval_outputs"),
        "alpaca_eval_annotations": 2 * sum(f.raw_records for f in result.files
                                           if f.source == "alpaca_eval_annotations"),
        "oasst_tree": 192, "oasst_sampling": 3 * 700, "hh_rlhf": 3000, "self_instruct_seed": 175,
        "alpaca": 1923 + 7673 + 4535, "sharegpt": 500, "question_prompts": 160,
    }
    assert {f.raw_records for f in result.files if f.format.startswith("alpaca_eval")} <= {802, 803, 804, 805}
    assert sum(f.raw_records == 805 for f in result.files if f.format == "alpaca_eval_outputs") == 62
    assert seconds < 60


def test_records_follow_the_schema(everything):
    records = everything[0].records
    assert records.columns == RECORD_SCHEMA.names
    assert records.to_arrow().schema.remove_metadata().equals(
        pl.from_arrow(RECORD_SCHEMA.empty_table()).to_arrow().schema.remove_metadata())
    for field in ["prompt_id", *(f.name for f in STAGE_FIELDS)]:
        assert records[field].null_count() == records.height, field
    for field in ["id", "messages", "source", "source_file", "source_record", "source_sha256", "format", "kind"]:
        assert records[field].null_count() == 0, field
    roles = records.select(pl.col("messages").list.eval(pl.element().struct.field("role")).explode().unique())
    assert set(roles["messages"].to_list()) == {"user", "assistant"}  # no system prompts in the shared data
    assert set(records["kind"].unique()) == {"conversation", "prompt"}
    assert records.filter(pl.col("kind") == "prompt")["format"].unique().to_list() == ["question_prompts"]
    assert everything[0].quarantine.columns == QUARANTINE_SCHEMA.names


def test_ids_unique_and_stable(everything, shared_data):
    first = everything[0].records
    assert first["id"].n_unique() == first.height
    again = ingest(shared_sources(), shared_data)
    assert again.records.equals(first)


def test_manifest_entries(everything, shared_data):
    info = next(f for f in everything[0].files if f.path.endswith("harmless_base_1500.jsonl.gz"))
    path = shared_data / "hh_rlhf/harmless_base_1500.jsonl.gz"
    assert (info.source, info.format, info.raw_records, info.rows, info.quarantined, info.capped) == \
        ("hh_rlhf", "hh_rlhf", 1500, 3000, 0, False)
    assert info.sha256 == file_sha256(path) and info.bytes == path.stat().st_size
    rows = everything[0].records.filter(pl.col("source_file") == str(path.resolve()))
    assert rows["source_sha256"].unique().to_list() == [info.sha256]


def test_same_file_name_in_two_folders_gets_distinct_ids(shared_data, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        shutil.copy(shared_data / "fastchat/vicuna_bench_question.jsonl", tmp_path / "data" / folder / "q.jsonl")
    (tmp_path / "data" / ".hidden").mkdir()
    (tmp_path / "data" / ".hidden" / "q.jsonl").write_text("not read")
    result = ingest([SourceConfig(name="q", path="data"),
                     SourceConfig(name="g", path=str(tmp_path / "data" / "*" / "q.jsonl"))], tmp_path)
    assert result.quarantine.is_empty()
    assert [Path(f.path).parent.name for f in result.files] == ["a", "b", "a", "b"]
    assert result.records.height == 4 * 80 and result.records["id"].n_unique() == 4 * 80
    assert result.records["source_record"].n_unique() == 80


def test_max_records_caps_the_source(shared_data, tmp_path):
    for name in ("one.jsonl", "two.jsonl"):
        shutil.copy(shared_data / "fastchat/mt_bench_question.jsonl", tmp_path / name)
    result = ingest([SourceConfig(name="mt", path=".", include="*.jsonl", max_records=100),
                     SourceConfig(name="hh", path=str(shared_data / "hh_rlhf"), max_records=5)], tmp_path)
    one, two, hh = result.files
    assert (one.raw_records, one.capped, two.raw_records, two.capped) == (80, False, 20, True)
    assert (hh.raw_records, hh.rows, hh.capped) == (5, 10, True)
    assert result.records.height == 100 + 10

    capped_out = ingest([SourceConfig(name="mt", path=".", include="*.jsonl", max_records=80)], tmp_path)
    assert [(f.raw_records, f.capped) for f in capped_out.files] == [(80, False), (0, True)]


def test_generator_override_and_progress(shared_data):
    seen: list[int] = []
    result = ingest([SourceConfig(name="gt", path=str(shared_data / "gpteacher/roleplay-simple-deduped-roleplay-"
                                                                    "instruct.json.gz"), generator="gpt-4")],
                    Path("/"), batch_size=500, progress=seen.append)
    assert result.records["generator"].unique().to_list() == ["gpt-4"]
    assert seen == sorted(seen) and seen[-1] == result.records.height == 1923 and len(seen) >= 3


def test_quarantine_is_collected_with_schema(fixtures, tmp_path):
    shutil.copy(fixtures / "readers_broken.jsonl", tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    result = ingest([SourceConfig(name="bad", path=".", format="alpaca")], tmp_path)
    assert result.records.height == 3
    assert result.quarantine.height == 5 + 1
    assert result.quarantine.to_arrow().schema.remove_metadata().equals(
        pl.from_arrow(QUARANTINE_SCHEMA.empty_table()).to_arrow().schema.remove_metadata())
    assert [(f.rows, f.quarantined) for f in result.files] == [(3, 5), (0, 1)]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="unknown format 'csv'"):
        SourceConfig(name="x", path="y", format="csv")
    with pytest.raises(pydantic.ValidationError, match="unknown column key"):
        SourceConfig(name="x", path="y", columns={"answer": "a"})
    with pytest.raises(pydantic.ValidationError):
        SourceConfig(name="x", path="y", shuffle=True)
    with pytest.raises(FileNotFoundError, match="source x: .* does not exist"):
        ingest([SourceConfig(name="x", path="missing.jsonl")], tmp_path)
    with pytest.raises(FileNotFoundError, match="no files match"):
        ingest([SourceConfig(name="x", path=".", include="*.parquet")], tmp_path)
    (tmp_path / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ValueError, match="source names must be unique"):
        ingest([SourceConfig(name="x", path="a.jsonl"), SourceConfig(name="x", path="a.jsonl")], tmp_path)
