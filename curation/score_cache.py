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
pipeline; delete a model-hash folder to drop its scores. The shard reader and writer are
curation/record_cache.py's, shared with the per-record caches of the other stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from curation.record_cache import read_shards, write_atomic, write_shard

# Bump when the scorers' inputs change for the same files and settings (e.g. the truncation policy of
# RewardEncoder), so old cached scores stop matching.
CACHE_FORMAT = 2  # 2: reward models score in unpadded batches (curation.embeddings.equal_length_batches)
CACHE_ENV = "CURATION_CACHE"
_SHARD_PREFIX = "scores"


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
            write_atomic(self.folder / "model.json", json.dumps(description, indent=2, sort_keys=True).encode(),
                         suffix=".json")

    def lookup(self, content_hashes: pl.Series) -> pl.DataFrame:
        """(content_hash, score) of the given contents found in the cache; NaN = cached as unscorable.

        An unreadable shard (damaged by hand, a full disk) is skipped with a warning: its
        contents are simply scored again.
        """
        return read_shards(self.folder, _SHARD_PREFIX, "content_hash", {"score": pl.Float64}, wanted=content_hashes,
                           what="score cache")

    def store(self, content_hashes: list[str] | pl.Series, scores: np.ndarray) -> Path | None:
        """Append one new shard (NaN scores included: unscorable content is not retried)."""
        if len(content_hashes) == 0:
            return None
        return write_shard(self.folder, _SHARD_PREFIX, pl.DataFrame({
            "content_hash": pl.Series(content_hashes, dtype=pl.String),
            "score": pl.Series(np.asarray(scores, dtype=np.float64), dtype=pl.Float64)}))
