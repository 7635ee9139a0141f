"""Ingest stage: read every file of every recipe source into one canonical table.

Rows come out with RECORD_SCHEMA columns (origin filled, stage columns null); anything
unreadable goes to the quarantine table with the raw bytes and a one-line reason; the
``files`` list is the manifest entry of each input (hash, size, counts, whether capped).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from curation.hashing import file_sha256
from curation.readers import FORMATS, read_file
from curation.readers.instruct import CANONICAL_COLUMNS
from curation.stage import records_frame
from schemas import ORIGIN_FIELDS, QUARANTINE_SCHEMA

GLOB_CHARS = set("*?[")
# The columns readers fill; prompt_id and the stage columns are added as nulls by records_frame.
READER_SCHEMA = pa.schema([field for field in ORIGIN_FIELDS if field.name != "prompt_id"])


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="recipe source name; goes into the `source` column and the row ids")
    path: str = Field(description="a file, a directory (read recursively) or a glob; relative to the recipe")
    format: str = Field("auto", description="'auto' (detect from content) or a reader name: "
                                            + ", ".join(FORMATS))
    include: str = Field("*", description="glob for file names when `path` is a directory, e.g. '*.json.gz'")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "for parquet / generic json: canonical key -> column in the file; keys are "
        + ", ".join(CANONICAL_COLUMNS)))
    max_records: int | None = Field(None, ge=0, description=(
        "read at most this many raw records (lines, array elements, trees, Parquet rows) from this "
        "source; records beyond it are never read"))
    generator: str | None = Field(None, description="model name to put in `generator` for every row of this source")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != "auto" and value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; use 'auto' or one of: {', '.join(FORMATS)}")
        return value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CANONICAL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown column key(s) {unknown}; map some of: {', '.join(CANONICAL_COLUMNS)}")
        return value


@dataclass
class InputFile:
    """One input file as read: its identity and what came out of it."""

    path: str
    source: str
    format: str
    sha256: str
    bytes: int
    raw_records: int    # raw units read (lines / array elements / trees / Parquet rows)
    rows: int           # canonical rows emitted
    quarantined: int    # quarantine entries
    capped: bool        # stopped early because of max_records


@dataclass
class IngestResult:
    records: pl.DataFrame      # RECORD_SCHEMA columns
    quarantine: pl.DataFrame   # QUARANTINE_SCHEMA columns
    files: list[InputFile]


def _visible(relative: Path) -> bool:
    return not any(part.startswith(".") for part in relative.parts)


def source_files(source: SourceConfig, base_dir: Path) -> list[tuple[Path, str]]:
    """(path, file_key) of every file of a source, sorted by file_key.

    The file_key is the path relative to the source directory (or to the glob's fixed
    prefix), so two files with the same name in different folders get different ids;
    for a single file it is the file name. Hidden files and folders are skipped.
    """
    raw = Path(os.path.expanduser(source.path))
    path = raw if raw.is_absolute() else Path(base_dir) / raw
    if path.is_file():
        return [(path, path.name)]
    if path.is_dir():
        found = [(p, p.relative_to(path)) for p in path.rglob(source.include) if p.is_file()]
    elif GLOB_CHARS & set(str(raw)):
        parts = path.parts
        fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
        root = Path(*parts[:fixed])
        found = [(Path(p), Path(p).relative_to(root)) for p in glob.glob(str(path), recursive=True)
                 if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"source {source.name}: {path} does not exist; fix `path` in the recipe")
    files = sorted(((p, rel.as_posix()) for p, rel in found if _visible(rel)), key=lambda item: item[1])
    if not files:
        raise FileNotFoundError(f"source {source.name}: no files match {path} (include {source.include!r}); "
                                "fix `path` or `include` in the recipe")
    return files


def _rows_table(rows: list[dict]) -> pa.Table:
    """Row dicts to Arrow column by column (ten times faster than from_pylist on nested rows)."""
    return pa.Table.from_pydict({field.name: [row[field.name] for row in rows] for field in READER_SCHEMA},
                                schema=READER_SCHEMA)


def ingest(sources: list[SourceConfig], base_dir: Path, batch_size: int = 5000,
           progress: Callable[[int], None] | None = None) -> IngestResult:
    """Read all sources; ``progress(n)`` gets the running total of rows after every batch."""
    names = [s.name for s in sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"source names must be unique (they go into the row ids): {duplicated} repeated")

    tables: list[pa.Table] = []
    quarantine: list[dict] = []
    files: list[InputFile] = []
    total_rows = 0
    for source in sources:
        remaining = source.max_records
        for path, file_key in source_files(source, base_dir):
            info = InputFile(path=str(path.resolve()), source=source.name, format=source.format,
                             sha256=file_sha256(path), bytes=path.stat().st_size,
                             raw_records=0, rows=0, quarantined=0, capped=False)
            files.append(info)
            if remaining == 0:
                info.capped = True  # the cap was used up by earlier files: this one is not read
                continue
            for batch in read_file(path, source, file_key, batch_size, sha256=info.sha256, limit=remaining):
                if batch.rows:
                    tables.append(_rows_table(batch.rows))
                info.format = batch.format or info.format
                quarantine.extend(batch.quarantine)
                info.raw_records += batch.raw_records
                info.rows += len(batch.rows)
                info.quarantined += len(batch.quarantine)
                info.capped = info.capped or batch.capped
                total_rows += len(batch.rows)
                if progress is not None:
                    progress(total_rows)
            if remaining is not None:
                remaining -= info.raw_records
    records = records_frame(pa.concat_tables(tables) if tables else None)
    quarantine_frame = pl.from_arrow(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    return IngestResult(records=records, quarantine=quarantine_frame, files=files)
