"""Record cache: a value computed from one record's content is computed once across builds.

A stage's per-record result (a normalised conversation, a filter verdict, a MinHash signature,
an embedding) is a function of the record's content and of the stage settings that change the
value, so it is cached under a key of both. Layout under the cache root (``<cache root>/records``
in a build)::

    <stage>/<key>/stage.json                      what the key covers (stage, config, model hash), for people
    <stage>/<key>/part-<time>-<uuid>.parquet      shards: ``key`` (String) + the stage's value columns

``<key>`` is the sha256 over (FORMAT, stage, config as JSON with sorted keys, model hash, value
column types): any change to one of them is another folder, so a changed config never hits.
Within a folder, ``key`` is a content hash chosen by the stage (e.g. of the exact text given to
a detector). Writers never touch an existing file: each ``store`` is a new, uniquely named shard
written to a temporary file and renamed into place, so concurrent builds can share a cache and a
reader never sees half a shard. When a key is in several shards the oldest entry wins, so a value
once cached never changes. An unreadable shard is skipped with a warning (its records are simply
computed again). Nothing is merged or deleted by the pipeline; delete a key folder (or the whole
root) to drop what it holds.
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

import polars as pl

log = logging.getLogger(__name__)

# Bump when the layout or the meaning of a key changes for the same stage and config.
FORMAT = 1
KEY = "key"
_SHARD_PREFIX = "part"


def write_atomic(path: Path, data: bytes, suffix: str) -> None:
    """Temp file in the same folder (hidden, so no shard glob matches it), fsync, rename into place."""
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


def write_shard(folder: Path, prefix: str, frame: pl.DataFrame) -> Path:
    """``frame`` as a new, uniquely named Parquet shard ``<prefix>-<UTC time>-<uuid>.parquet`` (names sort by age)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    path = folder / f"{prefix}-{stamp}-{uuid.uuid4().hex}.parquet"
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=folder)
    os.close(handle)
    try:
        frame.write_parquet(temp, compression="zstd")
        with open(temp, "rb+") as out:
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def read_shards(folder: Path, prefix: str, key: str, values: dict[str, pl.DataType],
                wanted: pl.Series | None = None, keep: str = "first", what: str = "cache") -> pl.DataFrame:
    """One row per key (``key`` + ``values`` columns) from every readable shard of ``folder``.

    ``wanted``: only these keys. ``keep``: "first" (the oldest shard's entry) or "last" (the
    newest). A shard that cannot be read or lacks a column is skipped with a warning naming it.
    """
    schema = {key: pl.String, **values}
    wanted_frame = None if wanted is None else pl.DataFrame({key: wanted.cast(pl.String)}).unique()
    found = []
    for shard in sorted(folder.glob(f"{prefix}-*.parquet")):
        try:
            table = pl.read_parquet(shard, columns=list(schema)).cast(schema)
        except Exception as error:  # noqa: BLE001 - any unreadable shard means the same: compute again
            log.warning("%s: skipping unreadable shard %s (%s)", what, shard, error)
            continue
        found.append(table if wanted_frame is None else table.join(wanted_frame, on=key, how="semi"))
    if not found:
        return pl.DataFrame(schema=schema)
    return pl.concat(found).unique(subset=key, keep=keep, maintain_order=True)


def config_key(stage: str, config: dict, model_hash: str | None, values: dict[str, pl.DataType]) -> str:
    """sha256 of everything that changes a stage's cached values."""
    payload = json.dumps({"format": FORMAT, "stage": stage, "config": config, "model_hash": model_hash,
                          "values": {name: str(dtype) for name, dtype in values.items()}}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class RecordCache:
    """Cached values of one stage under one config (and model): ``key`` -> value columns.

    ``values``: the value columns and their Polars types (scalars, lists, ``pl.Array`` vectors).
    ``hits`` and ``computed`` count the keys found by ``lookup`` and written by ``store``.
    """

    def __init__(self, root: str | Path, stage: str, config: dict, model_hash: str | None = None, *,
                 values: dict[str, pl.DataType]):
        self.root, self.stage, self.values = Path(root), stage, dict(values)
        self.key = config_key(stage, config, model_hash, self.values)
        self.folder = self.root / stage / self.key
        self.hits = self.computed = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"record cache {self.root} cannot be created ({error.strerror}); "
                             f"point the cache at a writable folder or build without one") from None
        if not (self.folder / "stage.json").is_file():
            about = {"stage": stage, "format": FORMAT, "config": config, "model_hash": model_hash,
                     "values": {name: str(dtype) for name, dtype in self.values.items()},
                     "created": datetime.now(timezone.utc).isoformat()}
            write_atomic(self.folder / "stage.json", json.dumps(about, indent=2, sort_keys=True).encode(), ".json")

    def lookup(self, keys: pl.Series) -> pl.DataFrame:
        """``key`` + value columns of the given keys found in the cache (one row per key, in no set order)."""
        found = read_shards(self.folder, _SHARD_PREFIX, KEY, self.values, wanted=keys,
                            what=f"record cache {self.stage}")
        self.hits += found.height
        return found

    def entries(self, keep: str = "first") -> pl.DataFrame:
        """Every cached key with its values (``keep="last"``: the newest entry of a key wins)."""
        return read_shards(self.folder, _SHARD_PREFIX, KEY, self.values, keep=keep, what=f"record cache {self.stage}")

    def store(self, frame: pl.DataFrame) -> Path | None:
        """Append ``frame`` (``key`` + every value column) as one new shard; nothing for an empty frame."""
        if frame.is_empty():
            return None
        missing = [c for c in (KEY, *self.values) if c not in frame.columns]
        if missing:
            raise ValueError(f"record cache {self.stage}: cannot store a frame without column(s) {', '.join(missing)}")
        path = write_shard(self.folder, _SHARD_PREFIX, frame.select(KEY, *self.values)
                           .cast({KEY: pl.String, **self.values}))
        self.computed += frame.height
        return path


class RecordCaches:
    """The record caches a build opens under one root, with their counts for the manifest.

    Stages open the caches they need (a stage knows which settings change its values); the
    build reads ``stats()`` afterwards.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.opened: list[RecordCache] = []

    def open(self, stage: str, config: dict, model_hash: str | None = None, *,
             values: dict[str, pl.DataType]) -> RecordCache:
        cache = RecordCache(self.root, stage, config, model_hash, values=values)
        self.opened.append(cache)
        return cache

    def stats(self) -> dict[str, dict]:
        """stage -> {"hits", "computed", "keys"}: keys found and computed, summed over the caches of the stage."""
        out: dict[str, dict] = {}
        for cache in self.opened:
            entry = out.setdefault(cache.stage, {"hits": 0, "computed": 0, "keys": []})
            entry["hits"] += cache.hits
            entry["computed"] += cache.computed
            if cache.key not in entry["keys"]:
                entry["keys"].append(cache.key)
        return out
