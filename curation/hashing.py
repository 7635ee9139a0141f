"""Stable hashes: ids and content keys must not change between runs, machines or versions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import numpy as np
import xxhash


def stable_hash(text: str) -> str:
    """128-bit xxh3 as 32 hex chars: fast, and stable across processes (unlike hash())."""
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


def hash_column(values: pl.Series) -> pl.Series:
    """Vectorised-enough stable hash of a String column (C hashing, one call per value)."""
    digest = xxhash.xxh3_128_hexdigest
    return pl.Series(values.name, [None if v is None else digest(v.encode("utf-8", "surrogatepass"))
                                   for v in values.to_list()], dtype=pl.String)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            sha.update(block)
    return sha.hexdigest()


def row_id(source: str, file_name: str, source_record: str) -> str:
    """Stable id of a row: same source, file name and position give the same id on every run."""
    return stable_hash(f"{source}\x1f{file_name}\x1f{source_record}")[:24]


def unit_hash(keys: list[str], seed: int = 0) -> np.ndarray:
    """A stable number in [0, 1) per key and seed: the same key always lands in the same split, whatever else is
    in the data and in whatever order."""
    digest = xxhash.xxh3_64_intdigest
    values = np.fromiter((digest(f"{seed}\x1f{k}".encode("utf-8", "surrogatepass")) for k in keys), dtype=np.uint64,
                         count=len(keys))
    return (values >> np.uint64(11)).astype(np.float64) / float(1 << 53)
