"""Write a build's files atomically: a reader never sees a half-written file.

Each file is written to a temporary name in the same folder and renamed into place
(``os.replace`` is atomic on one filesystem). The manifest is written last, so a folder
with a manifest is a finished build; shards left over from an earlier build in the same
folder are removed only after the new ones are in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from curation.hashing import file_sha256
from schemas import OUTPUT_SCHEMAS, conform


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shard_rows: int = Field(50_000, ge=1, description="rows per Parquet shard")
    compression: str = Field("zstd", description="Parquet compression codec")


def output_paths(out_dir: str | Path, manifest: dict, name: str) -> list[Path]:
    """The Parquet shards of one output as the manifest lists them (in the order written)."""
    return [Path(out_dir) / entry["path"] for entry in manifest.get("outputs", {}).get(name, [])]


def _temp_path(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json_atomic(obj, path: Path) -> None:
    write_bytes_atomic((json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode(), path)


def write_parquet_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        pq.write_table(table, temp, compression=compression)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_dataset(frame: pl.DataFrame, out_dir: Path, name: str, config: OutputConfig) -> list[dict]:
    """Write ``frame`` as ``out_dir/name/part-NNNNN.parquet`` with the ``name`` output schema."""
    schema = OUTPUT_SCHEMAS[name]
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    table = conform(frame.to_arrow(), schema)
    shards = max(1, -(-table.num_rows // config.shard_rows))
    written = []
    for index in range(shards):
        path = folder / f"part-{index:05d}.parquet"
        write_parquet_atomic(table.slice(index * config.shard_rows, config.shard_rows), path, config.compression)
        written.append(path)
    for stale in folder.glob("*.parquet"):
        if stale not in written:
            stale.unlink()
    return [{"path": str(p.relative_to(out_dir)), "rows": pq.read_metadata(p).num_rows, "sha256": file_sha256(p)}
            for p in written]
