"""Score cache: a score is a function of (model, content), so no content is scored twice across builds.

Layout under the cache folder::

    <model hash>/model.json                  what the hash covers (files and settings), for people
    <model hash>/scores-<time>-<uuid>.parquet   shards: content_hash (String), score (Float64, NaN = unscorable)
    onnx/<export hash>[-int8]/model.onnx     ONNX Runtime exports (curation/onnx_scoring.py)

The model hash covers the sha256 of every file the load reads (``scorer_files``) and every
setting that changes the numbers; batch size and thread count do not (they move scores by
float rounding only). Writers never touch an existing file: each write is a new, uniquely
named shard written to a temporary file and renamed into place, so concurrent builds can
share a cache and a reader never sees half a shard. Shards are never merged or deleted by the
pipeline; delete a model-hash folder to drop its scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Bump when the scorers' inputs change for the same files and settings (e.g. the truncation policy of
# RewardEncoder), so old cached scores stop matching.
CACHE_FORMAT = 1
CACHE_ENV = "CURATION_CACHE"
_SHARD_GLOB = "scores-*.parquet"


def model_hash(files: dict[str, str], settings: dict) -> str:
    """sha256 over the loaded files' digests and the settings that change scores (JSON, sorted keys)."""
    payload = json.dumps({"format": CACHE_FORMAT, "files": files, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def resolve_cache_dir(value: str | None, base_dir: Path | None = None) -> Path | None:
    """The cache folder a recipe asks for: '~' and $VARS expanded, relative paths against ``base_dir``
    (the recipe's folder); when unset, ``$CURATION_CACHE/scores`` if that variable is set, else no cache."""
    if value is None:
        root = os.environ.get(CACHE_ENV)
        return Path(root).expanduser() / "scores" if root else None
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


class ScoreCache:
    """Cached scores of one model hash."""

    def __init__(self, root: str | Path, key: str, description: dict | None = None):
        self.root = Path(root)
        self.key = key
        self.folder = self.root / key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"score cache {self.root} cannot be created ({error.strerror}); "
                             f"set score.cache_dir to a writable folder or remove it") from None
        if description is not None and not (self.folder / "model.json").is_file():
            _write_atomic(self.folder / "model.json", json.dumps(description, indent=2, sort_keys=True).encode(),
                          suffix=".json")

    def lookup(self, content_hashes: pl.Series) -> pl.DataFrame:
        """(content_hash, score) of the given contents found in the cache; NaN = cached as unscorable.

        An unreadable shard (damaged by hand, a full disk) is skipped with a warning: its
        contents are simply scored again.
        """
        wanted = pl.DataFrame({"content_hash": content_hashes.cast(pl.String)}).unique()
        found = []
        for shard in sorted(self.folder.glob(_SHARD_GLOB)):
            try:
                table = pl.read_parquet(shard, columns=["content_hash", "score"])
            except Exception as error:  # noqa: BLE001 - any unreadable shard means the same: score again
                log.warning("score cache: skipping unreadable shard %s (%s)", shard, error)
                continue
            found.append(table.cast({"content_hash": pl.String, "score": pl.Float64})
                         .join(wanted, on="content_hash", how="semi"))
        if not found:
            return pl.DataFrame(schema={"content_hash": pl.String, "score": pl.Float64})
        return pl.concat(found).unique(subset="content_hash", keep="first", maintain_order=True)

    def store(self, content_hashes: list[str] | pl.Series, scores: np.ndarray) -> Path | None:
        """Append one new shard (NaN scores included: unscorable content is not retried)."""
        if len(content_hashes) == 0:
            return None
        table = pa.table({"content_hash": pa.array(list(content_hashes), type=pa.string()),
                          "score": pa.array(np.asarray(scores, dtype=np.float64), type=pa.float64())})
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = self.folder / f"scores-{stamp}-{uuid.uuid4().hex}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        _write_atomic(path, sink.getvalue().to_pybytes(), suffix=".parquet")
        return path


def _write_atomic(path: Path, data: bytes, suffix: str) -> None:
    """Temp file in the same folder (not matching the shard glob), fsync, rename into place."""
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
