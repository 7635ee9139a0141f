"""Streaming JSON primitives with exact byte positions.

Files are never loaded whole: JSONL is read line by line as bytes, and JSON arrays
element by element with ``json.JSONDecoder.raw_decode`` (C speed) over a sliding text
buffer. The text is decoded with ``surrogateescape`` so that invalid UTF-8 survives as
lone surrogates: it is found per element (the element is quarantined, the rest of the
file is kept) and the raw bytes round-trip exactly. Every record carries the byte offset
and length of its raw text in the decompressed stream, so ``data[offset:offset+length]``
is the record as stored.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
BOM = "\ufeff"
CHUNK = 1 << 20
WHITESPACE = re.compile(r"[ \t\n\r]*")
# A JSON \u escape in the surrogate range: the only way a valid UTF-8 record can decode
# to a string with a lone surrogate, which Arrow cannot store.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")

DECODER = json.JSONDecoder(strict=False)  # raw control characters inside strings are kept as they are


@dataclass(slots=True)
class RawRecord:
    """One raw unit of a file: a JSONL line, an array element, a top-level value."""

    label: str              # 'line' (1-based) or 'index' (0-based)
    number: int
    offset: int | None      # byte offset in the decompressed stream (None for Parquet rows)
    length: int | None
    raw: bytes | None       # None for Parquet rows (rebuilt as JSON when quarantined)
    value: Any = None
    error: str | None = None  # set when the raw text is not a valid record

    @property
    def position(self) -> str:
        return f"{self.label}:{self.number}"


class ContainerError(Exception):
    """The file as a whole is not readable in the expected layout (one quarantine entry)."""

    def __init__(self, message: str, number: int | None = None, offset: int | None = None, raw: bytes = b""):
        super().__init__(message)
        self.number, self.offset, self.raw = number, offset, raw


def open_binary(path: Path) -> IO[bytes]:
    """The decompressed byte stream of ``path``; gzip is recognised by its magic bytes, not its name."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def sniff(path: Path, size: int = 4096) -> bytes:
    """The first bytes of the decompressed stream (for detection)."""
    with open_binary(path) as stream:
        return stream.read(size)


def is_blank_stream(path: Path) -> bool:
    """True when the decompressed file holds nothing but whitespace (or a BOM)."""
    with open_binary(path) as stream:
        first = True
        while block := stream.read(1 << 16):
            if first and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            first = False
            if block.strip():
                return False
    return True


def first_char(path: Path) -> str:
    """First non-whitespace character of the decompressed text ('' when blank)."""
    with open_binary(path) as stream:
        head = b""
        while block := stream.read(4096):
            head = (head + block).lstrip()
            if head.startswith(b"\xef\xbb\xbf"):
                head = head[3:].lstrip()
            if head:
                return chr(head[0]) if head[0] < 128 else "?"
    return ""


def byte_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _utf8_error(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 1].hex()
        return f"invalid UTF-8 at byte {exc.start} of the record (0x{bad}); re-encode the file as UTF-8"
    return None


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"invalid JSON (truncated or malformed): {exc.msg} at column {exc.colno}"


# ---------------------------------------------------------------------------- JSONL

def iter_lines(stream: IO[bytes]) -> Iterator[RawRecord]:
    """One record per non-blank line; blank lines are skipped, bad lines carry an error."""
    offset = 0
    for number, line in enumerate(stream, start=1):
        start, size = offset, len(line)
        offset += size
        body = line.rstrip(b"\r\n")
        if number == 1 and body.startswith(b"\xef\xbb\xbf"):
            body, start = body[3:], start + 3
        if not body.strip():
            continue
        record = RawRecord("line", number, start, len(body), body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            record.error = _utf8_error(body)
            yield record
            continue
        try:
            record.value = DECODER.decode(text)
        except json.JSONDecodeError as exc:
            record.error = _json_error(exc)
        except RecursionError:
            record.error = "invalid JSON: nested too deeply"
        yield record


def line_is_complete_json(line: bytes) -> bool:
    try:
        DECODER.decode(line.decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------------- JSON arrays

class TextStream:
    """A sliding decoded-text window over a byte stream that keeps absolute byte offsets."""

    def __init__(self, stream: IO[bytes], chunk: int = CHUNK):
        self.stream = stream
        self.chunk = chunk
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.pos = 0          # index in buf
        self.byte_pos = 0     # absolute byte offset of buf[pos]
        self.eof = False
        self._fill(1)
        if self.buf.startswith(BOM):
            self.pos, self.byte_pos = 1, 3

    def _fill(self, want: int) -> bool:
        """Read until at least ``want`` characters are buffered past pos; False when nothing was added."""
        if self.eof or len(self.buf) - self.pos >= want:
            return False
        if self.pos > (1 << 16) and self.pos > len(self.buf) // 2:
            self.buf, self.pos = self.buf[self.pos:], 0  # drop what was consumed
        added = False
        while not self.eof and len(self.buf) - self.pos < want:
            block = self.stream.read(max(self.chunk, want))
            if not block:
                self.buf += self.decoder.decode(b"", final=True)
                self.eof = True
            else:
                self.buf += self.decoder.decode(block)
            added = True
        return added

    def skip_ws(self) -> None:
        while True:
            end = WHITESPACE.match(self.buf, self.pos).end()
            self.byte_pos += end - self.pos  # whitespace is ASCII: one byte per character
            self.pos = end
            if self.pos < len(self.buf) or not self._fill(1):
                return

    def peek(self) -> str:
        """Next non-whitespace character, '' at end of input."""
        self.skip_ws()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            self.byte_pos += 1
            return True
        return False

    def read_value(self) -> tuple[Any, str]:
        """Decode the next JSON value; returns (value, its text). Raises JSONDecodeError at a real error."""
        value, text = self.decode_next()
        self.byte_pos += byte_len(text)
        return value, text

    def decode_next(self) -> tuple[Any, str]:
        """Like read_value, but the caller advances ``byte_pos`` (it encodes the text anyway)."""
        self.skip_ws()
        while True:
            try:
                value, end = DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                # Maybe the value runs past the buffer: grow it (geometrically) and retry.
                if self._fill(max(self.chunk, 2 * (len(self.buf) - self.pos))):
                    continue
                raise
            if type(value) in (int, float) and len(self.buf) - end < 3 and self._fill(end - self.pos + 3):
                continue  # a number near the buffer edge may go on ("5." + "5e+" + "10") in the next chunk
            text = self.buf[self.pos:end]
            self.pos = end
            return value, text

    def rest(self) -> str:
        """Everything from pos to the end of the input (for quarantining a malformed tail)."""
        while not self.eof:
            self._fill(len(self.buf) - self.pos + self.chunk)
        text = self.buf[self.pos:]
        self.pos = len(self.buf)
        return text


def read_element(stream: TextStream, label: str, number: int) -> RawRecord:
    """Read one value as a RawRecord; invalid UTF-8 inside it becomes the record's error."""
    stream.skip_ws()
    offset = stream.byte_pos
    value, text = stream.decode_next()
    try:
        raw = text.encode("utf-8")
        error = None
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        error, value = _utf8_error(raw), None
    stream.byte_pos += len(raw)
    return RawRecord(label, number, offset, len(raw), raw, value, error)


def tail_error(stream: TextStream, what: str, number: int, exc: Exception) -> ContainerError:
    stream.skip_ws()
    offset = stream.byte_pos
    detail = "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        detail = exc.msg
        if exc.doc is stream.buf and exc.pos >= stream.pos:  # the error is in the current window
            at = offset + byte_len(stream.buf[stream.pos:exc.pos])
            detail += f" byte {at}" if detail.endswith(" at") else f" at byte {at}"
    raw = stream.rest().encode("utf-8", "surrogateescape")
    return ContainerError(f"{what} {number} and everything after it is unreadable (invalid JSON: {detail}); "
                          "the ones before it were kept", number, offset, raw)


def iter_array(stream: TextStream, label: str = "index") -> Iterator[RawRecord]:
    """Elements of the JSON array starting at the stream position.

    Raises ContainerError for a malformed tail (from the failing element to the end, one
    entry) after yielding every element before it.
    """
    if not stream.take("["):
        raise ContainerError("expected a JSON array ('[')", None, stream.byte_pos)
    number = 0
    if stream.take("]"):
        return
    while True:
        try:
            record = read_element(stream, label, number)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise tail_error(stream, "element", number, exc) from None
        yield record
        number += 1
        if stream.take(","):
            continue
        if stream.take("]"):
            return
        error = json.JSONDecodeError("Expecting ',' or ']' after an element", stream.buf, stream.pos)
        raise tail_error(stream, "element", number, error)


def iter_values(stream: TextStream) -> Iterator[RawRecord]:
    """Concatenated top-level JSON values (e.g. one pretty-printed object, or several)."""
    number = 0
    while stream.peek():
        try:
            record = read_element(stream, "index", number)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise tail_error(stream, "value", number, exc) from None
        yield record
        number += 1


def check_end(stream: TextStream) -> None:
    """Raise ContainerError when anything but whitespace follows the document."""
    if stream.peek():
        offset = stream.byte_pos
        raw = stream.rest().encode("utf-8", "surrogateescape")
        raise ContainerError("unexpected data after the end of the JSON document", None, offset, raw)


# ------------------------------------------------------------------------- layouts

def layout(path: Path) -> str | None:
    """'array', 'lines' or 'values' (pretty-printed objects), from the content; None when not JSON.

    A file starting with '[' is one JSON array. Otherwise it is JSONL when one of its first
    two non-blank lines is a complete JSON value (so one truncated first line does not
    turn a JSONL file into a document), else a stream of whole JSON values.
    """
    char = first_char(path)
    if char == "[":
        return "array"
    if char != "{":
        return None
    with open_binary(path) as stream:
        seen = 0
        for line in stream:
            if not line.strip():
                continue
            if line_is_complete_json(line.lstrip(b"\xef\xbb\xbf")):
                return "lines"
            seen += 1
            if seen == 2:
                break
    return "values"


def iter_json_records(path: Path) -> Iterator[RawRecord]:
    """Raw records of a JSON / JSONL file (gzip or not), whatever its layout."""
    kind = layout(path)
    if kind is None:
        raise ContainerError("not JSON: the file does not start with '[' or '{'", None, 0, sniff(path, 200))
    with open_binary(path) as binary:
        if kind == "lines":
            yield from iter_lines(binary)
            return
        stream = TextStream(binary)
        if kind == "array":
            yield from iter_array(stream)
            check_end(stream)
        else:
            yield from iter_values(stream)


def is_empty_array(path: Path) -> bool:
    """True for a file that is just ``[]`` (no records, like an empty file)."""
    if first_char(path) != "[":
        return False
    with open_binary(path) as binary:
        stream = TextStream(binary)
        return stream.take("[") and stream.take("]") and not stream.peek()


def first_json_record(path: Path) -> Any:
    """The first record's value (None when there is none or it is unreadable)."""
    try:
        for record in iter_json_records(path):
            if record.error is None:
                return record.value
    except ContainerError:
        return None
    return None


def sketch_object(stream: TextStream, enough: Callable[[dict], bool] = lambda sketch: False,
                  max_members: int = 256) -> dict | None:
    """Members of the top-level object at the stream position, for detection.

    An array-valued member is stood in for by its first element (a one-element list), and
    reading stops as soon as ``enough(sketch)`` holds, so a report with a huge array is
    recognised without loading it. Returns what was read before any fault.
    """
    if not stream.take("{"):
        return None
    sketch: dict[str, Any] = {}
    try:
        for _ in range(max_members):
            if stream.take("}"):
                break
            key, _text = stream.read_value()
            if not isinstance(key, str) or not stream.take(":"):
                break
            if stream.peek() == "[":
                elements = iter_array(stream)
                first = next(elements, None)
                sketch[key] = [] if first is None else [first.value]
                if enough(sketch):
                    break
                for _skipped in elements:
                    pass
            else:
                sketch[key], _text = stream.read_value()
            if not stream.take(","):
                break
    except (json.JSONDecodeError, RecursionError, ContainerError):
        pass
    return sketch or None
