"""`curate audit` on the capped shared build: the raw record read back byte for byte, the full
decision trail, duplicates linked both ways, the reverse lookup, the CLI views and the errors."""

import gzip
import json
import random
import shutil
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.audit import AuditError, audit_id, audit_record, read_raw_record
from curation.cli import main

SAMPLE = 100


def _lineage(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "lineage").glob("*.parquet")))


def _read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / name).glob("*.parquet")))


def _decompressed(path: str) -> bytes:
    data = Path(path).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


_DECODER = json.JSONDecoder(strict=False)


def _skip(text: str, pos: int, chars: str = " \t\r\n") -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _array_element(text: str, pos: int, index: int) -> str:
    """The exact text of element ``index`` of the JSON array starting at ``pos`` (a walk of our own)."""
    pos = _skip(text, pos)
    assert text[pos] == "["
    pos += 1
    for number in range(index + 1):
        pos = _skip(text, pos)
        _, end = _DECODER.raw_decode(text, pos)
        if number == index:
            return text[pos:end]
        pos = _skip(text, end)
        assert text[pos] == ","
        pos += 1
    raise AssertionError("unreachable")


def _members_array(text: str, key: str) -> int:
    """Position of the array value of top-level member ``key`` of a JSON object."""
    pos = _skip(text, 0)
    assert text[pos] == "{"
    pos += 1
    while True:
        pos = _skip(text, pos)
        name, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        assert text[pos] == ":"
        pos = _skip(text, pos + 1)
        if name == key:
            return pos
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos, " \t\r\n,")


def independent_raw(source_file: str, source_record: str) -> bytes:
    """The record as stored, found without the reader's offsets: the N-th line of a JSONL file,
    the N-th element of a JSON array, the N-th prompt of a sampling report."""
    label, number = source_record.split(":")[:2]
    number = int(number)
    data = _decompressed(source_file)
    if label == "line":
        line = data.split(b"\n")[number - 1].rstrip(b"\r")
        return line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
    text = data.decode("utf-8").lstrip("\ufeff")
    if label == "index":
        element = _array_element(text, 0, number)
    elif label == "prompt":
        element = _array_element(text, _members_array(text, "prompts"), number)
    else:
        raise AssertionError(f"no independent reader for {label}")
    assert json.loads(element) == (json.loads(text)[number] if label == "index"
                                   else json.loads(text)["prompts"][number])
    return element.encode("utf-8")


@pytest.fixture(scope="module")
def sample(capped_build):
    out, _ = capped_build
    lineage = _lineage(out)
    kept = lineage.filter(pl.col("stage").is_null())
    rejected = lineage.filter(pl.col("stage").is_not_null())
    rng = random.Random(6)
    pick = lambda frame: rng.sample(frame["id"].to_list(), min(SAMPLE, frame.height))  # noqa: E731
    return lineage, pick(kept), pick(rejected)


def _check_trail(report: dict, row: dict, order: list[str]) -> None:
    stages = [entry["stage"] for entry in report["stages"]]
    assert stages == ["ingest", *order]
    by_stage = {entry["stage"]: entry for entry in report["stages"]}
    dropped = row["stage"] or row["funnel_stage"]
    reached = order if dropped is None else order[:order.index(dropped) + 1]
    for stage in reached:  # every stage the row went through says what it decided
        assert by_stage[stage]["decision"] not in ("not reached",), (stage, report["id"])
    if row["stage"] is None:
        # a row kept only in a preference pair was set aside by its funnel stage, select included
        assert by_stage["select"]["decision"] == ("set aside" if row["funnel_stage"] == "select" else "kept")
        assert by_stage["select"]["values"]["outputs"] == row["outputs"]
        assert not any(e["decision"] == "rejected" for e in report["stages"])
    else:
        entry = by_stage[row["stage"]]
        assert (entry["decision"], entry["reason"], entry["detail"]) == ("rejected", row["reason"], row["detail"])
        assert [e["stage"] for e in report["stages"] if e["decision"] == "rejected"] == [row["stage"]]
        assert report["disposition"]["stage"] == row["stage"]
        after = order[order.index(row["stage"]) + 1:]
        assert all(by_stage[s]["decision"] in ("not reached", "scored") for s in after)
    if row["funnel_stage"] is not None:
        entry = by_stage[row["funnel_stage"]]
        assert (entry["decision"], entry["reason"]) == ("set aside", row["funnel_reason"])
    assert by_stage["filter"]["values"]["language"] == row["language"]
    assert by_stage["dedup"]["values"]["content_hash"] == row["content_hash"]
    assert by_stage["score"]["values"]["score"] == row["score"]


def test_audit_reads_back_the_raw_record_and_the_full_trail(capped_build, sample):
    out, manifest = capped_build
    lineage, kept_ids, rejected_ids = sample
    assert len(kept_ids) == SAMPLE and len(rejected_ids) == SAMPLE
    rows = {r["id"]: r for r in lineage.filter(pl.col("id").is_in(kept_ids + rejected_ids)).iter_rows(named=True)}
    order = ["normalize", "filter", "dedup", "semantic_dedup", "score", "select"]
    preference = _read(out, "preference")
    started = time.perf_counter()
    for row_id in kept_ids + rejected_ids:
        row = rows[row_id]
        report = audit_id(out, row_id)
        assert report["id"] == row_id and report["warnings"] == []
        assert report["status"] == ("kept" if row["stage"] is None else "rejected")
        assert report["source_check"]["matches"] is True
        assert {k: report["origin"][k] for k in ("source_file", "source_record", "source_offset", "source_sha256")} \
            == {k: row[k] for k in ("source_file", "source_record", "source_offset", "source_sha256")}
        assert report["raw_record"].encode("utf-8") == independent_raw(row["source_file"], row["source_record"])
        _check_trail(report, row, order)
        assert [o["output"] for o in report["outputs"]] == row["outputs"]
        pairs = preference.filter((pl.col("chosen_id") == row_id) | (pl.col("rejected_id") == row_id))
        assert len(report["preference_pairs"]) == pairs.height
        for pair in report["preference_pairs"]:
            chosen, other = (row_id, pair["other_id"]) if pair["role"] == "chosen" else (pair["other_id"], row_id)
            match = pairs.filter((pl.col("chosen_id") == chosen) & (pl.col("rejected_id") == other))
            assert match["pair_source"].to_list() == [pair["pair_source"]]
    per_audit = (time.perf_counter() - started) / (len(kept_ids) + len(rejected_ids))
    assert per_audit < 1.0, f"{per_audit:.2f} s per audit"


def test_duplicates_link_both_ways(capped_build, sample):
    out, _ = capped_build
    lineage, _, rejected_ids = sample
    copies = lineage.filter(pl.col("stage") == "dedup")
    assert copies.height > 0
    # the sampled dropped duplicates, plus one of each dedup reason
    chosen = pl.concat([copies.filter(pl.col("id").is_in(rejected_ids)).head(20),
                        copies.filter(pl.col("reason").is_first_distinct())]).unique("id")
    assert set(chosen["reason"]) == {"exact_duplicate", "near_duplicate"}
    for copy in chosen.iter_rows(named=True):
        report = audit_id(out, copy["id"])
        assert report["duplicates"]["duplicate_of"]["id"] == copy["duplicate_of"] == copy["dup_cluster"]
        assert report["duplicates"]["duplicate_of"]["how"]["reason"] == copy["reason"]
        keeper = audit_id(out, copy["duplicate_of"])
        absorbed = {a["id"]: a for a in keeper["duplicates"]["absorbed"]}
        assert absorbed[copy["id"]]["how"]["reason"] == copy["reason"]
        assert absorbed[copy["id"]]["status"] == "rejected"
        assert keeper["duplicates"]["duplicate_of"] is None
        if copy["reason"] == "exact_duplicate":
            assert keeper["duplicates"]["content_hash"] == report["duplicates"]["content_hash"]


def test_reverse_lookup_finds_every_row_of_a_record(capped_build, sample, tmp_path):
    out, _ = capped_build
    lineage, kept_ids, rejected_ids = sample
    position = pl.col("source_record").str.extract(r"^([a-z]+:\d+)", 1)
    lineage = lineage.with_columns(_position=position)
    # one record of each format, plus a few sampled rows
    rows = pl.concat([lineage.filter(pl.col("format").is_first_distinct()),
                      lineage.filter(pl.col("id").is_in(kept_ids[:5] + rejected_ids[:5]))])
    for row in rows.iter_rows(named=True):
        label, number = row["_position"].split(":")
        same = lineage.filter((pl.col("source_file") == row["source_file"]) & (pl.col("_position") == row["_position"]))
        report = audit_record(out, row["source_file"], number)
        assert report["record"] == row["_position"]
        assert sorted(r["id"] for r in report["rows"]) == sorted(same["id"].to_list())
        assert report["raw_record"].encode("utf-8") == independent_raw(row["source_file"], row["source_record"])
        by_id = {r["id"]: r for r in report["rows"]}
        assert by_id[row["id"]]["status"] == ("kept" if row["stage"] is None else "rejected")
        assert audit_record(out, row["source_file"], row["_position"])["rows"] == report["rows"]

    # a different path to the same file: a symlink, and a relative path
    row = rows.row(0, named=True)
    link = tmp_path / "link.data"
    link.symlink_to(row["source_file"])
    number = row["_position"].split(":")[1]
    assert {r["id"] for r in audit_record(out, link, number)["rows"]} >= {row["id"]}
    relative = Path(shutil.os.path.relpath(row["source_file"], Path.cwd()))
    assert {r["id"] for r in audit_record(out, relative, number)["rows"]} >= {row["id"]}


def test_oasst_tree_and_hh_pair_records_yield_several_rows(capped_build):
    out, manifest = capped_build
    tree = next(f["path"] for f in manifest["inputs"] if f["path"].endswith("en_30_tree.jsonl"))
    rows = audit_record(out, tree, "line:1")["rows"]
    assert len(rows) > 2 and all(r["origin"]["source_record"].startswith("line:1:msg:") for r in rows)
    hh = next(f["path"] for f in manifest["inputs"] if f["path"].endswith("harmless_base_1500.jsonl.gz"))
    pair = audit_record(out, hh, 3)
    assert sorted(r["origin"]["source_record"] for r in pair["rows"]) == ["line:3:chosen", "line:3:rejected"]
    assert json.loads(pair["raw_record"]).keys() == {"chosen", "rejected"}


def test_cli_text_and_json_views(capped_build, sample, capsys):
    out, _ = capped_build
    lineage, kept_ids, rejected_ids = sample
    kept = lineage.filter(pl.col("id") == kept_ids[0]).row(0, named=True)
    rejected = lineage.filter(pl.col("id") == rejected_ids[0]).row(0, named=True)

    assert main(["audit", str(out), "--id", kept["id"], "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(audit_id(out, kept["id"])))

    assert main(["audit", str(out), "--id", kept["id"]]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"row {kept['id']}  KEPT in {', '.join(kept['outputs'])}")
    for stage in ("ingest", "normalize", "filter", "dedup", "score", "select"):
        assert f"\n  {stage} " in text
    assert "unchanged since the build" in text and "\nraw record\n" in text
    assert json.loads(independent_raw(kept["source_file"], kept["source_record"]))  # the record shown is JSON
    raw_first_line = independent_raw(kept["source_file"], kept["source_record"]).decode().splitlines()[0]
    assert "  " + raw_first_line[:200] in text

    assert main(["audit", str(out), "--id", rejected["id"]]) == 0
    text = capsys.readouterr().out
    assert f"REJECTED by {rejected['stage']} ({rejected['reason']})" in text
    assert f"{rejected['stage']:<15} rejected     {rejected['reason']}" in text

    number = rejected["source_record"].split(":")[1]
    assert main(["audit", str(out), "--source", rejected["source_file"], "--record", number]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"record {':'.join(rejected['source_record'].split(':')[:2])} of {rejected['source_file']}")
    assert f"row {rejected['id']}  REJECTED" in text
    assert main(["audit", str(out), "--source", rejected["source_file"], "--record", number, "--json"]) == 0
    assert rejected["id"] in {r["id"] for r in json.loads(capsys.readouterr().out)["rows"]}


def test_errors_are_one_line_and_exit_1(capped_build, tmp_path, capsys):
    out, manifest = capped_build
    path = manifest["inputs"][0]["path"]
    cases = [
        (["--id", "0123456789abcdef01234567"], "no row with id 0123456789abcdef01234567"),
        (["--source", path, "--record", "99999"], "no record 99999 of"),
        (["--source", path, "--record", "line:0"], "no line:0 of"),
        (["--source", str(tmp_path / "elsewhere.json"), "--record", "1"], "is not an input of the build"),
        (["--source", path, "--record", "twelve"], "--record 'twelve'"),
    ]
    for args, message in cases:
        assert main(["audit", str(out), *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert "capped at max_records" in str(pytest.raises(AuditError, audit_record, out, path, 99999).value)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(out / "manifest.json", old / "manifest.json")
    assert main(["audit", str(old), "--id", "x"]) == 1
    assert "has no lineage/" in capsys.readouterr().err
    assert main(["audit", str(out)]) == 2
    assert main(["audit", str(out), "--id", "x", "--source", path, "--record", "1"]) == 2


def test_changed_or_missing_source_file_is_reported(capped_build, tmp_path):
    out, manifest = capped_build
    copy = tmp_path / "build"
    shutil.copytree(out, copy)
    lineage = _lineage(copy)
    row = lineage.filter(pl.col("format") == "hh_rlhf").row(0, named=True)
    moved = tmp_path / "harmless.jsonl.gz"
    shutil.copy(row["source_file"], moved)
    lineage = lineage.with_columns(pl.col("source_file").replace(row["source_file"], str(moved)))
    for part in (copy / "lineage").glob("*.parquet"):
        part.unlink()
    lineage.write_parquet(copy / "lineage" / "part-00000.parquet")

    fine = audit_id(copy, row["id"])
    assert fine["warnings"] == [] and fine["raw_record"].encode() == independent_raw(str(moved), row["source_record"])
    with open(moved, "ab") as handle:  # a second gzip member: the records before it are unchanged
        handle.write(gzip.compress(b'{"chosen": "x", "rejected": "y"}\n'))
    changed = audit_id(copy, row["id"])
    assert changed["source_check"]["matches"] is False
    assert "changed since the build" in changed["warnings"][0]
    assert changed["raw_record"] == fine["raw_record"]
    moved.unlink()
    missing = audit_id(copy, row["id"])
    assert missing["raw_record"] is None and "missing" in missing["warnings"][0]


def test_parquet_rows_are_read_back_by_row_number(tmp_path):
    """Parquet inputs have no byte offsets: the row is found by its number and shown as JSON."""
    from curation.ingest import SourceConfig, ingest

    table = pa.table({"q": [f"question {i}" for i in range(30)], "a": [f"answer {i}" for i in range(30)],
                      "extra": list(range(30))})
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path, row_group_size=7)
    source = SourceConfig(name="pq", path=str(path), columns={"prompt": "q", "response": "a"})
    records = ingest([source], tmp_path).records
    row = records.filter(pl.col("source_record") == "row:17").row(0, named=True)
    assert row["source_offset"] is None
    raw, kind = read_raw_record(row["source_file"], row["source_record"], None, None)
    assert kind == "parquet_row"
    assert json.loads(raw) == {"q": "question 17", "a": "answer 17", "extra": 17}
    with pytest.raises(AuditError, match="fewer than row 99"):
        read_raw_record(path, "row:99", None, None)
