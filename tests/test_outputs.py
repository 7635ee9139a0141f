"""Atomic writes: a failed write leaves the previous file intact and no temp files behind."""

import polars as pl
import pyarrow.parquet as pq
import pytest

from curation import outputs
from curation.outputs import OutputConfig, write_dataset


def _quarantine(n):
    return pl.DataFrame({"source": ["s"] * n, "source_file": ["f"] * n, "line": list(range(n)),
                         "offset": [0] * n, "error": ["bad"] * n, "raw": [b"x"] * n})


def test_failed_parquet_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    write_dataset(_quarantine(3), tmp_path, "quarantine", OutputConfig())
    target = tmp_path / "quarantine" / "part-00000.parquet"
    before = target.read_bytes()

    def crash(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(outputs.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(_quarantine(10), tmp_path, "quarantine", OutputConfig())
    assert target.read_bytes() == before
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == ["part-00000.parquet"]


def test_failed_json_write_keeps_old_manifest(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    outputs.write_json_atomic({"run_id": "a"}, path)

    def crash(fd):
        raise OSError("power cut")

    monkeypatch.setattr(outputs.os, "fsync", crash)
    with pytest.raises(OSError):
        outputs.write_json_atomic({"run_id": "b"}, path)
    assert '"a"' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_shards_and_stale_shards_removed(tmp_path):
    written = write_dataset(_quarantine(25), tmp_path, "quarantine", OutputConfig(shard_rows=10))
    assert [w["rows"] for w in written] == [10, 10, 5]
    written = write_dataset(_quarantine(5), tmp_path, "quarantine", OutputConfig(shard_rows=10))
    assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "quarantine" / "part-00000.parquet").num_rows == 5
    assert len(written[0]["sha256"]) == 64


def test_output_schema_is_enforced(tmp_path):
    with pytest.raises(ValueError, match="column 'error' is missing"):
        write_dataset(pl.DataFrame({"source": ["s"], "source_file": ["f"]}), tmp_path, "quarantine", OutputConfig())
