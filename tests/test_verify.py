"""`curate verify` on copies of the demo build: clean passes, every kind of tampering is caught."""

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.hashing import file_sha256
from curation.verify import verify_build


@pytest.fixture
def build(demo_build, tmp_path):
    """A private copy of the demo build (the session fixture itself is never modified)."""
    out = tmp_path / "build"
    shutil.copytree(demo_build, out)
    return out


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _save_manifest(out, manifest):
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _relist(out, rel):
    """Make the manifest agree with a rewritten file, as a careless tool would."""
    manifest = _manifest(out)
    for entries in manifest["outputs"].values():
        for entry in entries:
            if entry["path"] == rel:
                entry["sha256"] = file_sha256(out / rel)
                entry["rows"] = pq.read_metadata(out / rel).num_rows
    _save_manifest(out, manifest)


def _local_inputs(out, tmp_path, n=2):
    """Point the build's first inputs at private copies (manifest and lineage), so a test may change them."""
    manifest = _manifest(out)
    moved = {}
    for i, entry in enumerate(manifest["inputs"][:n]):
        copy = tmp_path / "inputs" / f"{i}-{entry['path'].rsplit('/', 1)[-1]}"
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(entry["path"], copy)
        moved[entry["path"]] = str(copy)
        entry["path"] = str(copy)
    _save_manifest(out, manifest)
    for entry in manifest["outputs"].get("lineage", []):
        lineage = pl.read_parquet(out / entry["path"])
        lineage.with_columns(pl.col("source_file").replace(moved)).write_parquet(out / entry["path"])
        _relist(out, entry["path"])
    return [Path(p) for p in moved.values()]


def test_clean_build_verifies(build, capsys):
    result = verify_build(build)
    assert result.ok, result.summary()
    manifest = _manifest(build)
    assert result.files == sum(len(v) for v in manifest["outputs"].values())
    assert result.inputs_unchanged == len(manifest["inputs"])
    assert result.lineage == ("lineage" in manifest["outputs"])
    c = manifest["counts"]
    keys = ("input_records", "kept", "rejected", "quarantined")
    assert result.conservation == {"ok": True, **{k: c[k] for k in keys}}
    assert main(["verify", str(build)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"verified: {result.files} files,") and "conservation ok" in line
    assert line.endswith(f"{len(manifest['inputs'])} inputs unchanged")


def test_modified_output_file(build, capsys):
    rel = "sft/part-00000.parquet"
    frame = pl.read_parquet(build / rel)
    edited = frame.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("edited by hand"))
                                .otherwise(pl.col("generator")).alias("generator"))
    edited.write_parquet(build / rel)  # same rows, valid Parquet, different bytes
    result = verify_build(build)
    assert [(p.check, p.path) for p in result.problems] == [("output", rel)]
    assert "sha256 differs from the manifest" in result.problems[0].message
    assert main(["verify", str(build)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == f"{rel}: sha256 differs from the manifest (modified after the build); rebuild or restore it"


def test_deleted_row_is_caught_even_when_the_manifest_is_updated(build):
    rel = "rejected/part-00000.parquet"
    table = pq.read_table(build / rel)
    pq.write_table(table.slice(1), build / rel)
    result = verify_build(build)
    checks = [p.check for p in result.problems]
    assert checks[0] == "output" and "conservation" in checks
    assert f"holds {table.num_rows - 1} rows, the manifest says {table.num_rows}" in result.problems[0].message
    # A tool that re-lists the file does not fool verify: the accounting is re-derived from the rows.
    _relist(build, rel)
    result = verify_build(build)
    messages = {p.check: " | ".join(q.message for q in result.problems if q.check == p.check) for p in result.problems}
    assert "output" not in messages
    assert "1 rows the readers produced are in no output" in messages["conservation"]
    assert "counts differ from the files on disk" in messages["conservation"]
    if result.lineage:
        assert "1 rows disagree with the outputs on kept vs rejected" in messages["lineage"]


def test_changed_and_missing_inputs(build, tmp_path, capsys):
    changed, missing = _local_inputs(build, tmp_path)
    assert verify_build(build).ok  # private copies, same bytes
    with open(changed, "ab") as handle:
        handle.write(b"\n")
    missing.unlink()
    result = verify_build(build)
    assert [(p.check, p.path) for p in result.problems] == [("input", str(changed)), ("input", str(missing))]
    assert "sha256 differs" in result.problems[0].message and "missing" in result.problems[1].message
    assert result.inputs_unchanged == result.inputs - 2
    assert verify_build(build, check_inputs=False).ok
    assert main(["verify", str(build), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and [p["check"] for p in report["problems"]] == ["input", "input"]
    assert report["problems"][0]["line"].startswith(f"{changed}: input file changed since the build")


def test_stray_and_missing_outputs_are_all_listed(build, capsys):
    shutil.copyfile(build / "sft" / "part-00000.parquet", build / "sft" / "part-00001.parquet")
    (build / "prompts" / "part-00000.parquet").unlink()
    assert main(["verify", str(build), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    found = {(p["check"], p["path"]) for p in problems}
    assert ("output", "prompts/part-00000.parquet") in found
    assert ("stray", "sft/part-00001.parquet") in found
    assert ("conservation", "outputs") in found  # the prompt rows are gone from every output
    assert main(["verify", str(build)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("prompts/part-00000.parquet: missing") and f"(+{len(problems) - 1} more problems" in err


def test_lineage_must_hold_every_read_row(build):
    manifest = _manifest(build)
    assert "lineage" in manifest["outputs"], "every build writes lineage/ (issue 6 contract)"
    rel = manifest["outputs"]["lineage"][0]["path"]
    table = pq.read_table(build / rel)
    pq.write_table(table.slice(1), build / rel)
    _relist(build, rel)
    result = verify_build(build)
    assert [p.check for p in result.problems] == ["lineage"]
    message = result.problems[0].message
    assert f"{table.num_rows - 1} rows, but the readers produced {table.num_rows}" in message
    assert "input files have a different number of lineage rows" in message


def test_not_a_build(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
