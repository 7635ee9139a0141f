"""Reads a finished build's Parquet output plus the manifest that vouches for it (provenance for the adapter)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curation.hashing import file_sha256, unit_hash


@dataclass
class TrainData:
    """Train/eval rows in TRL conversational prompt/completion layout, and where they came from."""

    train: list[dict]
    eval: list[dict]
    run_id: str
    files: list[dict] = field(default_factory=list)  # {path, rows, sha256} as verified on disk
    skipped: int = 0  # rows with no final assistant answer to learn from

    def provenance(self) -> dict:
        return {"run_id": self.run_id, "files": self.files, "train_examples": len(self.train),
                "eval_examples": len(self.eval), "skipped_rows": self.skipped}


def read_manifest(build_dir: Path) -> dict:
    path = build_dir / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{build_dir} has no manifest.json; pass the output folder of a finished `curate build`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rebuild the dataset") from None


def verified_files(build_dir: Path, manifest: dict, output: str) -> list[dict]:
    """The output's Parquet files, each checked against the sha256 the manifest recorded."""
    listed = (manifest.get("outputs") or {}).get(output)
    if not listed:
        raise ValueError(f"{build_dir}/manifest.json lists no '{output}' output; build a recipe that produces it")
    files = []
    for entry in listed:
        path = build_dir / entry["path"]
        if not path.is_file():
            raise ValueError(f"{path} is listed in the manifest but missing; rebuild the dataset")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ValueError(f"{path} does not match its manifest sha256 (changed after the build); rebuild the dataset")
        files.append({"path": entry["path"], "rows": entry.get("rows"), "sha256": digest})
    return files


def split_indices(keys: list[str], eval_fraction: float, seed: int,
                  max_eval: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows) by a seeded hash of each row's prompt: all answers to one prompt fall on one side,
    and a prompt is held out for a seed whatever else the build holds. Held-out rows beyond ``max_eval`` are left
    out of training too, so the held-out split never depends on the cap."""
    position = unit_hash(keys, seed)
    held_out = position < eval_fraction
    eval_idx = np.flatnonzero(held_out)
    eval_idx = eval_idx[np.argsort(position[eval_idx], kind="stable")][:max_eval]
    return np.flatnonzero(~held_out), np.sort(eval_idx)


def heldout_mask(prompt_ids: list[str], eval_fraction: float, seed: int) -> np.ndarray:
    """True for prompts the trainer holds out for (eval_fraction, seed): they were never trained on."""
    return unit_hash(prompt_ids, seed) < eval_fraction


def read_output(build_dir: str | Path, output: str, columns: list[str]) -> tuple[pl.DataFrame, dict, list[dict]]:
    """(rows sorted by id so the shard layout cannot change the split, manifest, verified files)."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    files = verified_files(build_dir, manifest, output)
    frame = pl.concat([pl.read_parquet(build_dir / f["path"], columns=columns) for f in files])
    return frame.sort(columns[0]), manifest, files


def load_sft_data(build_dir: str | Path, eval_fraction: float = 0.1, seed: int = 0,
                  max_eval: int | None = None, max_train: int | None = None) -> TrainData:
    """Rows of ``build_dir/sft`` as prompt (all messages but the last) / completion (the final assistant answer)."""
    frame, manifest, files = read_output(build_dir, "sft", ["id", "messages", "prompt_id"])
    last = pl.col("messages").list.last()
    usable = frame.filter(pl.col("messages").list.len() >= 2, last.struct.field("role") == "assistant",
                          last.struct.field("content").fill_null("").str.len_chars() > 0)
    if usable.is_empty():
        raise ValueError(f"{build_dir}/sft has no conversation ending in an assistant answer; nothing to train on")
    rows = [{"prompt": m[:-1], "completion": [m[-1]]} for m in usable["messages"].to_list()]
    keys = usable.select(pl.coalesce("prompt_id", "id")).to_series().to_list()
    return _split(rows, keys, manifest, files, frame.height - usable.height, eval_fraction, seed, max_eval, max_train)


def load_preference_data(build_dir: str | Path, eval_fraction: float = 0.1, seed: int = 0,
                         max_eval: int | None = None, max_train: int | None = None,
                         pair_sources: list[str] | None = None,
                         source_weights: dict[str, float] | None = None) -> TrainData:
    """Rows of ``build_dir/preference`` in TRL's explicit-prompt layout: prompt, chosen and rejected message lists.

    ``pair_sources`` keeps only pairs of those ``pair_source`` values ('native', 'anchored', 'score');
    ``source_weights`` repeats (> 1) or subsamples (< 1) the training pairs of a source, by seed; a key
    'source:pair_source' (e.g. 'alpaca_eval_judgements:anchored') weighs only that kind of pair of the source.
    """
    frame, manifest, files = read_output(build_dir, "preference", ["chosen_id", "rejected_id", "prompt", "chosen",
                                                                    "rejected", "pair_source", "prompt_id", "source"])
    known = set(frame["source"].unique().to_list())
    known |= {f"{s}:{k}" for s, k in frame.select("source", "pair_source").unique().iter_rows()}
    unknown = sorted(set(source_weights or {}) - known)
    if unknown:
        raise ValueError(f"source_weights names {', '.join(unknown)}, not a source (or source:pair_source) of "
                         f"{build_dir}/preference; use the recipe's source names")
    frame = frame.sort("chosen_id", "rejected_id")
    if pair_sources is not None:
        frame = frame.filter(pl.col("pair_source").is_in(pair_sources))
    answer = lambda c: pl.col(c).list.last().struct.field("content").fill_null("")  # noqa: E731
    usable = frame.filter(answer("chosen").str.len_chars() > 0, answer("rejected").str.len_chars() > 0,
                          pl.col("prompt").list.len() > 0)
    if usable.is_empty():
        raise ValueError(f"{build_dir}/preference has no pair with a prompt and two answers; nothing to train on")
    rows = usable.select("prompt", "chosen", "rejected", "source", "pair_source").to_dicts()
    keys = usable.select(pl.coalesce("prompt_id", "chosen_id")).to_series().to_list()
    data = _split(rows, keys, manifest, files, frame.height - usable.height, eval_fraction, seed, max_eval, max_train)
    if source_weights:
        data.train = reweight(data.train, source_weights, seed)
    return data


def reweight(rows: list[dict], weights: dict[str, float], seed: int) -> list[dict]:
    """Each row ``floor(w)`` times plus once more with probability ``w - floor(w)``; order shuffled by seed."""
    rng = np.random.default_rng(seed)
    w = np.array([weights.get(f"{r['source']}:{r.get('pair_source')}", weights.get(r["source"], 1.0)) for r in rows])
    copies = np.floor(w).astype(int) + (rng.random(len(rows)) < w - np.floor(w))
    picked = np.repeat(np.arange(len(rows)), copies)
    return [rows[i] for i in rng.permutation(picked)]


def _split(rows: list[dict], keys: list[str], manifest: dict, files: list[dict], skipped: int, eval_fraction: float,
           seed: int, max_eval: int | None, max_train: int | None) -> TrainData:
    train_idx, eval_idx = split_indices(keys, eval_fraction, seed, max_eval)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    return TrainData(train=[rows[i] for i in train_idx], eval=[rows[i] for i in eval_idx],
                     run_id=str(manifest.get("run_id", "")), files=files, skipped=skipped)
