"""Readers: every input format to canonical rows, streaming, with bad input quarantined.

``read_file`` opens one file, detects its format by content (unless the source sets
``format:``), streams its raw records and yields batches of RECORD_SCHEMA row dicts plus
QUARANTINE_SCHEMA entries. Each raw record yields rows or one quarantine entry, never
both and never neither.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from curation.hashing import file_sha256, row_id
from curation.readers.alpaca_eval import alpaca_eval_annotations, alpaca_eval_outputs
from curation.readers.chat import openai_messages, sharegpt
from curation.readers.common import Context, RecordError
from curation.readers.detect import classify, detect_format
from curation.readers.hh import hh_rlhf
from curation.readers.instruct import alpaca, dolly, iter_parquet, mapped, parquet_raw, self_instruct_seed
from curation.readers.jsonstream import (PARQUET_MAGIC, SURROGATE_ESCAPE, ContainerError, RawRecord,
                                         is_blank_stream, is_empty_array, iter_json_records, sniff)
from curation.readers.oasst import iter_sampling, oasst_sampling, oasst_tree
from curation.readers.prompts import question_prompts

if TYPE_CHECKING:
    from curation.ingest import SourceConfig

__all__ = ["FORMATS", "Format", "ReadBatch", "classify", "detect_format", "read_file"]


@dataclass(frozen=True)
class Format:
    """A reader: how raw records are found in the file, and how one becomes rows."""

    name: str
    convert: Callable[[Any, str, Context], list[dict]]
    records: Callable[[Path, Context, int], Iterator[RawRecord]]


def _json_records(path: Path, ctx: Context, batch_size: int) -> Iterator[RawRecord]:
    return iter_json_records(path)


def _sampling_records(path: Path, ctx: Context, batch_size: int) -> Iterator[RawRecord]:
    return iter_sampling(path, ctx)


def _parquet_records(path: Path, ctx: Context, batch_size: int) -> Iterator[RawRecord]:
    return iter_parquet(path, ctx, batch_size)


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("sharegpt", sharegpt, _json_records),
    Format("openai_messages", openai_messages, _json_records),
    Format("alpaca", alpaca, _json_records),
    Format("dolly", dolly, _json_records),
    Format("self_instruct_seed", self_instruct_seed, _json_records),
    Format("oasst_tree", oasst_tree, _json_records),
    Format("oasst_sampling", oasst_sampling, _sampling_records),
    Format("hh_rlhf", hh_rlhf, _json_records),
    Format("alpaca_eval_outputs", alpaca_eval_outputs, _json_records),
    Format("alpaca_eval_annotations", alpaca_eval_annotations, _json_records),
    Format("question_prompts", question_prompts, _json_records),
    Format("parquet", mapped, _parquet_records),
    # Generic JSON / JSONL read through the source's `columns` mapping.
    Format("json", mapped, _json_records),
]}

# Errors that mean the file itself cannot be read further (a corrupt gzip stream, a bad Parquet footer).
FILE_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, pa.ArrowException)


@dataclass
class ReadBatch:
    rows: list[dict]
    quarantine: list[dict]
    raw_records: int
    capped: bool = False       # the read stopped at the source's max_records with records left in the file
    format: str | None = None  # the reader used (None when the format could not be detected)


@dataclass
class _Sink:
    """Collects one file's rows and quarantine entries and cuts them into batches."""

    source: str
    source_file: str
    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    raw_records: int = 0
    format: str | None = None

    def quarantined(self, error: str, line: int | None = None, offset: int | None = None,
                    raw: bytes | None = b"") -> None:
        self.quarantine.append({"source": self.source, "source_file": self.source_file, "line": line,
                                "offset": offset, "error": " ".join(error.split()), "raw": raw})

    def batch(self, capped: bool = False) -> ReadBatch:
        out = ReadBatch(self.rows, self.quarantine, self.raw_records, capped, self.format)
        self.rows, self.quarantine, self.raw_records = [], [], 0
        return out


def resolve_format(path: Path, source: SourceConfig) -> str | None:
    """The source's explicit format, else parquet/json when it maps columns, else detected."""
    if source.format != "auto":
        return source.format
    if source.columns:
        return "parquet" if sniff(path, 4) == PARQUET_MAGIC else "json"
    return detect_format(path)


def _check_text(parts: list[dict]) -> None:
    """Arrow strings must be valid UTF-8: a lone surrogate escape (\\udXXX) in JSON cannot be stored."""
    for p in parts:
        for text in [p["suffix"], p["generator"] or ""] + [m["content"] for m in p["messages"]]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RecordError("text holds an unpaired surrogate escape (\\udXXX), which is not valid "
                                  "Unicode; fix the escape in the source file") from None


def read_file(path: Path, source: SourceConfig, file_key: str, batch_size: int = 5000, *,
              sha256: str | None = None, limit: int | None = None) -> Iterator[ReadBatch]:
    """Stream ``path`` as batches of rows and quarantine entries.

    ``file_key`` names the file inside its source (it goes into the row ids). ``limit``
    stops after that many raw records; the last batch then says ``capped`` when records
    were left unread.
    """
    path = Path(path)
    resolved = str(path.resolve())
    sink = _Sink(source.name, resolved)
    try:
        sha = sha256 or file_sha256(path)
        if is_blank_stream(path) or is_empty_array(path):
            sink.quarantined("empty file: no records", raw=b"")
            yield sink.batch()
            return
        name = resolve_format(path, source)
    except FILE_ERRORS as exc:
        sink.quarantined(f"cannot read {path.name}: {exc}; check that the file is complete", raw=b"")
        yield sink.batch()
        return
    if name is None:
        sink.quarantined(f"could not detect the format of {resolved}; set `format:` for source "
                         f"{source.name} in the recipe", offset=0, raw=_head(path))
        yield sink.batch()
        return

    fmt = FORMATS[name]
    sink.format = name
    ctx = Context(file_key=file_key, columns=dict(source.columns))
    base = {"source": source.name, "source_file": resolved, "source_sha256": sha, "format": name}
    override = source.generator
    capped = False
    read = 0
    records = fmt.records(path, ctx, batch_size)
    try:
        for record in records:
            if limit is not None and read >= limit:
                capped = True
                break
            read += 1
            sink.raw_records += 1
            _convert(record, fmt, ctx, source.name, file_key, base, override, sink)
            if len(sink.rows) + len(sink.quarantine) >= batch_size:
                yield sink.batch()
    except ContainerError as exc:
        sink.quarantined(str(exc), line=exc.number, offset=exc.offset, raw=exc.raw)
    except FILE_ERRORS as exc:
        sink.quarantined(f"file is corrupt or truncated after {read} records ({type(exc).__name__}: {exc}); "
                         "the records before it were kept", raw=b"")
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
    if read == 0 and not sink.quarantine and not capped:
        sink.quarantined(f"no records: the file holds no {name} record", raw=b"")
    yield sink.batch(capped)


def _convert(record: RawRecord, fmt: Format, ctx: Context, source: str, file_key: str, base: dict,
             override: str | None, sink: _Sink) -> None:
    if record.error is not None:
        sink.quarantined(record.error, record.number, record.offset, record.raw)
        return
    position = record.position
    try:
        parts = fmt.convert(record.value, position, ctx)
        if not parts:
            raise RecordError("no conversation in the record")
        for p in parts:
            if not p["messages"]:
                raise RecordError("no messages in the conversation")
        if record.raw is not None and SURROGATE_ESCAPE.search(record.raw):
            _check_text(parts)
    except RecordError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a reader bug must not lose the file; the entry names it
        error = f"unexpected {type(exc).__name__} while reading the record: {exc}"
    else:
        for p in parts:
            messages = p["messages"]
            source_record = position + p["suffix"]
            sink.rows.append({
                "id": row_id(source, file_key, source_record),
                "messages": messages,
                "generator": override or p["generator"],
                "source_record": source_record,
                "source_offset": record.offset,
                "source_length": record.length,
                "kind": "conversation" if messages[-1]["role"] == "assistant" else "prompt",
                "rank_group": p["rank_group"],
                "rank": p["rank"],
                "source_flags": p["source_flags"],
                **base,
            })
        return
    raw = record.raw if record.raw is not None else parquet_raw(record.value)
    sink.quarantined(error, record.number, record.offset, raw)


def _head(path: Path, size: int = 1024) -> bytes:
    try:
        return sniff(path, size)
    except FILE_ERRORS:
        return b""
