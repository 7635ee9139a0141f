"""Reads a finished build's Parquet output plus the manifest that vouches for it (provenance for the adapter)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curation.hashing import file_sha256


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


def split_indices(n: int, eval_fraction: float, seed: int, max_eval: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation: the same rows go to eval for the same seed and input order."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction)) if n > 1 else 0
    if eval_fraction > 0 and n > 1:
        n_eval = max(1, min(n_eval, n - 1))
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


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
    frame, manifest, files = read_output(build_dir, "sft", ["id", "messages"])
    messages = frame["messages"].to_list()
    usable = [m for m in messages if m and len(m) >= 2 and m[-1]["role"] == "assistant" and m[-1]["content"]]
    if not usable:
        raise ValueError(f"{build_dir}/sft has no conversation ending in an assistant answer; nothing to train on")
    rows = [{"prompt": m[:-1], "completion": [m[-1]]} for m in usable]
    return _split(rows, manifest, files, len(messages) - len(usable), eval_fraction, seed, max_eval, max_train)


def load_preference_data(build_dir: str | Path, eval_fraction: float = 0.1, seed: int = 0,
                         max_eval: int | None = None, max_train: int | None = None,
                         pair_sources: list[str] | None = None) -> TrainData:
    """Rows of ``build_dir/preference`` in TRL's explicit-prompt layout: prompt, chosen and rejected message lists.

    ``pair_sources`` keeps only 'native' (human or judge rankings) or 'score' (scorer margin) pairs.
    """
    frame, manifest, files = read_output(build_dir, "preference",
                                         ["chosen_id", "rejected_id", "prompt", "chosen", "rejected", "pair_source"])
    frame = frame.sort("chosen_id", "rejected_id")
    if pair_sources is not None:
        frame = frame.filter(pl.col("pair_source").is_in(pair_sources))
    answer = lambda c: pl.col(c).list.last().struct.field("content").fill_null("")  # noqa: E731
    usable = frame.filter(answer("chosen").str.len_chars() > 0, answer("rejected").str.len_chars() > 0,
                          pl.col("prompt").list.len() > 0)
    if usable.is_empty():
        raise ValueError(f"{build_dir}/preference has no pair with a prompt and two answers; nothing to train on")
    rows = usable.select("prompt", "chosen", "rejected").to_dicts()
    return _split(rows, manifest, files, frame.height - usable.height, eval_fraction, seed, max_eval, max_train)


def _split(rows: list[dict], manifest: dict, files: list[dict], skipped: int, eval_fraction: float, seed: int,
           max_eval: int | None, max_train: int | None) -> TrainData:
    train_idx, eval_idx = split_indices(len(rows), eval_fraction, seed, max_eval)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    return TrainData(train=[rows[i] for i in train_idx], eval=[rows[i] for i in eval_idx],
                     run_id=str(manifest.get("run_id", "")), files=files, skipped=skipped)
