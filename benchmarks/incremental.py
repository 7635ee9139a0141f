"""Incremental-build benchmark: a new model's answers arrive; how long does the rebuild take, and is it right?

    python benchmarks/incremental.py                # the shared recipe (~30 min of CPU: two cold builds)
    python benchmarks/incremental.py --quick        # a capped copy (5 models x 60 records), under a minute
    python benchmarks/incremental.py --keep DIR     # keep the mirror, outputs and caches in DIR
    python benchmarks/incremental.py --no-score     # the recipe without its scorer: every other stage, ~3 min

Method. A temporary mirror of ``../shared/data`` is made of symlinks (``--quick``: of small capped
copies, see below), minus one AlpacaEval model's outputs file and its annotations file (``--model``,
default ``vicuna-7b``, the median-sized model among the 37 with annotations: 805 answers + 805
judged pairs = 2,415 rows, 1.8% of the shared recipe's 133,739). ``recipes/shared.yaml`` is
written into the mirror so its relative source paths resolve there (the reward model path is made
absolute). Then, each build through the flow function ``flows.build.build_dataset`` in this
process (Prefect's ephemeral mode; the time is the flow call's wall clock, so Python start-up and
imports are left out of every build, and build (a) also pays for starting Prefect):

  (a) full build with an empty cache;
  (b) the two files' symlinks put back, built again with the cache (a) filled: only new or changed
      records should be computed (normalise, filter verdicts, MinHash signatures, reward scores),
      and dedup runs against the index of rows (a) kept;
  then the same again: nothing changed, so a no-op (``no_op_seconds``);
  (c) from-scratch build of the same full mirror under another root, with a fresh, empty cache.

Builds (a) and (b) are versioned builds under one root (``out_root``), each into its own
``<run_id>/`` folder, with the root's own cache (``OUT_ROOT/.cache``), as ``curate build
--out-root`` and scheduled deployments run them.

``incremental_over_full`` = time(b) / time(a). ``identical``: every output table of (b) equals
(c)'s (sft, preference, prompts, rejected, quarantine, lineage), each sorted by a stable key
(ids; chosen and rejected ids for preference pairs; file and line for quarantine), every column
compared exactly. No column is expected to differ per run: ids, source paths and hashes depend on
the inputs only, and no output table holds a time or run id. When tables differ, the report
says which columns; scores are compared exactly first, and if they differ the largest absolute
difference is reported, and ``identical_decisions`` says whether any decision differs: the same
rows in each output, the same preference pairs, the same rejections (id, stage, reason,
duplicate_of) and lineage dispositions, ignoring score values and the detail texts quoting them.

Scores and batches: the reward model scores unpadded batches (conversations of one token count,
``curation.embeddings.equal_length_batches``), so a score does not depend on which other
conversations are scored with it, and a score cached in (a) equals the one (c) computes. The
benchmark checks that directly: ``--batch-check`` real AlpacaEval conversations (300; 100 with
--quick) are scored alone and mixed with as many others, and compared exactly (``batch_invariance``).

``--no-score``: the recipe without its scorer (select without scores), to time every other stage
on the whole shared data in a few minutes.

``--quick``: the mirror holds capped copies (the first 60 records) of five models' outputs and
annotations files (the new model's included), OASST trees and MT-bench questions, with the shared
recipe's settings for the sources it keeps.

Prints a table, then one JSON object as the very last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as `curate build` sets it
os.environ.setdefault("DO_NOT_TRACK", "1")

SHARED = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "recipes" / "shared.yaml"
DEFAULT_MODEL = "vicuna-7b"
QUICK_MODELS = ("claude-2.1", "gemma-2b-it", "gpt4_1106_preview", "minotaur-13b")  # plus the new model
QUICK_RECORDS = 60
QUICK_SOURCES = ("alpaca_eval_outputs", "alpaca_eval_judgements", "oasst_trees", "mt_bench")
# Output tables and the key each is sorted by before comparing.
TABLES = {"sft": ["id"], "preference": ["chosen_id", "rejected_id"], "prompts": ["id"], "rejected": ["id"],
          "quarantine": ["source_file", "line", "offset"], "lineage": ["id"]}
SCORE_COLUMNS = {"score", "chosen_score", "rejected_score"}
DETAIL_COLUMNS = {"detail", "funnel_detail"}  # quote scores in select's rejections ("score 1.2 below 3.4 of ...")
SEED = 0


def new_files(model: str) -> list[Path]:
    """The model's outputs and annotations files, relative to the data folder."""
    return [Path("alpaca_eval") / kind / f"{model}.json.gz" for kind in ("outputs", "annotations")]


def full_mirror(work: Path, missing: list[Path], no_score: bool) -> Path:
    """Symlinks to every shared file but ``missing``, and the shared recipe placed so its paths resolve."""
    data = work / "shared" / "data"
    for path in sorted(SHARED.rglob("*")):
        relative = path.relative_to(SHARED)
        if path.is_file() and relative not in missing:
            (data / relative).parent.mkdir(parents=True, exist_ok=True)
            (data / relative).symlink_to(path)
    recipe = yaml.safe_load(RECIPE.read_text())
    return _write_recipe(recipe, work / "main" / "recipes", no_score)


def quick_mirror(work: Path, model: str, missing: list[Path], no_score: bool) -> Path:
    """Capped copies of five models' AlpacaEval files (``missing`` left out), OASST trees and MT-bench."""
    data = work / "shared" / "data"
    for name in (*QUICK_MODELS, model):
        for relative in new_files(name):
            with gzip.open(SHARED / relative) as handle:
                records = json.load(handle)[:QUICK_RECORDS]
            _store(data / relative, records, skip=relative in missing)
    for relative in (Path("oasst") / "en_30_tree.jsonl", Path("fastchat") / "mt_bench_question.jsonl"):
        (data / relative).parent.mkdir(parents=True, exist_ok=True)
        (data / relative).symlink_to(SHARED / relative)
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["name"] = "shared-quick"
    recipe["sources"] = [s for s in recipe["sources"] if s["name"] in QUICK_SOURCES]
    return _write_recipe(recipe, work / "main" / "recipes", no_score)


def _store(path: Path, records: list, skip: bool) -> None:
    """Write a capped copy in place, or, for a file that arrives later, as ``<name>.held`` (no source reads it)
    until ``add_back`` renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".held") if skip else path
    with gzip.open(target, "wt", encoding="utf-8") as out:
        json.dump(records, out)


def _write_recipe(recipe: dict, folder: Path, no_score: bool) -> Path:
    if no_score:
        recipe["score"] = None
        recipe["select"]["preference"]["from_scores"] = False
    elif recipe["score"]["model"].startswith("."):  # a model folder beside the shipped recipe
        recipe["score"]["model"] = str((RECIPE.parent / recipe["score"]["model"]).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECIPE.name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def add_back(work: Path, files: list[Path], quick: bool) -> None:
    data = work / "shared" / "data"
    for relative in files:
        if quick:
            (data / relative.parent / (relative.name + ".held")).rename(data / relative)
        else:
            (data / relative).symlink_to(SHARED / relative)


def build(recipe: Path, out_root: Path, expect: str = "completed") -> tuple[dict, float]:
    """A versioned build into OUT_ROOT/<run_id>/ with the root's own cache (OUT_ROOT/.cache), as
    `curate build --out-root` and scheduled deployments run it."""
    from flows.build import build_dataset

    started = time.perf_counter()
    manifest = build_dataset(recipe=str(recipe), out_root=str(out_root), quiet=True)
    seconds = time.perf_counter() - started
    if manifest.get("status") != expect:
        raise SystemExit(f"build under {out_root}: {manifest.get('status')}, expected {expect} "
                         f"({manifest.get('reason')})")
    return manifest, seconds


def read_table(out: Path, name: str) -> pl.DataFrame:
    files = sorted((out / name).glob("*.parquet"))
    return pl.read_parquet(files) if files else pl.DataFrame()


def compare(first: Path, second: Path) -> dict:
    """Per table: equal as written, equal sorted, the columns that differ, score differences, decisions."""
    result: dict = {"tables": {}, "score_max_abs_diff": 0.0, "identical_decisions": True}
    for name, key in TABLES.items():
        a, b = read_table(first, name), read_table(second, name)
        entry = {"rows": [a.height, b.height], "equal_as_written": a.equals(b)}
        result["tables"][name] = entry
        if a.columns != b.columns or a.height != b.height:
            entry.update(equal_sorted=False, columns_differ=sorted(set(a.columns) ^ set(b.columns)) or ["(rows)"])
            result["identical_decisions"] = False
            continue
        key = [k for k in key if k in a.columns]
        a, b = a.sort(key, nulls_last=True), b.sort(key, nulls_last=True)
        differ = [c for c in a.columns if not a[c].equals(b[c])]
        entry.update(equal_sorted=not differ, columns_differ=differ)
        for column in sorted(SCORE_COLUMNS & set(differ)):
            x, y = a[column].cast(pl.Float64).to_numpy(), b[column].cast(pl.Float64).to_numpy()
            both = np.isfinite(x) & np.isfinite(y)
            both_null = ~np.isfinite(x) & ~np.isfinite(y)
            entry.setdefault("scores_differ", {})[column] = int((x != y).sum() - both_null.sum())
            if both.any():
                result["score_max_abs_diff"] = max(result["score_max_abs_diff"], float(np.abs(x[both] - y[both]).max()))
        if set(differ) - SCORE_COLUMNS - DETAIL_COLUMNS:
            result["identical_decisions"] = False
    result["identical"] = all(t["equal_sorted"] for t in result["tables"].values())
    return result


def batch_invariance(recipe: Path, model: str, n: int) -> dict:
    """Score n real AlpacaEval conversations alone and mixed with n others (the scoring stage's path);
    compare exactly."""
    from curation.recipe import load_recipe
    from curation.score import score_conversations

    parsed, _ = load_recipe(recipe)
    pool = []
    for name in (model, QUICK_MODELS[0]):
        with gzip.open(SHARED / new_files(name)[0]) as handle:
            pool += [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                     for r in json.load(handle)]
    rng = np.random.default_rng(SEED)
    sample = [pool[i] for i in rng.choice(len(pool), size=min(2 * n, len(pool)), replace=False)]
    half = len(sample) // 2
    alone = score_conversations(sample[:half], parsed.score)
    mixed = score_conversations(sample, parsed.score)[:half]
    usable = np.isfinite(alone) & np.isfinite(mixed)
    return {"conversations": half, "differ": int((alone[usable] != mixed[usable]).sum()),
            "max_abs_diff": float(np.abs(alone[usable] - mixed[usable]).max()) if usable.any() else 0.0,
            "dtype": parsed.score.dtype, "batch_size": parsed.score.batch_size}


def stage_cache(manifest: dict) -> dict:
    """Cache hits and computed records per stage (scores: the score cache's counts)."""
    stats = {}
    for stage, counts in manifest["stages"].items():
        if "cache" in counts:
            for name, entry in counts["cache"].items():
                stats[name] = {"hits": entry["hits"], "computed": entry["computed"]}
    score = manifest["stages"].get("score", {})
    if "cached" in score:
        stats["scores"] = {"hits": score["cached"], "computed": score["computed"]}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="capped copies of a few files (under a minute)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the AlpacaEval model whose two files arrive late")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--no-score", action="store_true", help="drop the recipe's scorer (times every other stage)")
    parser.add_argument("--batch-check", type=int, help="conversations scored alone vs mixed (300; 100 with --quick)")
    args = parser.parse_args()
    missing = new_files(args.model)
    if not all((SHARED / f).is_file() for f in missing):
        raise SystemExit(f"model '{args.model}' needs both {missing[0]} and {missing[1]} under {SHARED}; "
                         f"pick one of alpaca_eval/annotations/")
    started = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="curation-incremental-"))
    if args.keep is not None and work.exists():
        raise SystemExit(f"{work} exists; give a new folder to --keep")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))  # a private ephemeral database: no lock contention
    try:
        recipe = (quick_mirror(work, args.model, missing, args.no_score) if args.quick
                  else full_mirror(work, missing, args.no_score))
        full, full_seconds = build(recipe, work / "builds")
        add_back(work, missing, args.quick)
        incremental, incremental_seconds = build(recipe, work / "builds")
        _, no_op_seconds = build(recipe, work / "builds", expect="no-op")
        scratch, scratch_seconds = build(recipe, work / "scratch")
        comparison = compare(Path(incremental["out_dir"]), Path(scratch["out_dir"]))
        batches = (None if args.no_score
                   else batch_invariance(recipe, args.model, args.batch_check or (100 if args.quick else 300)))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    figures = {
        "quick": args.quick, "no_score": args.no_score, "model": args.model,
        "mode": "in-process versioned flow calls (flows.build.build_dataset with out_root)",
        "incremental_over_full": round(incremental_seconds / full_seconds, 4),
        "identical": comparison["identical"], "identical_decisions": comparison["identical_decisions"],
        "full_seconds": round(full_seconds, 2), "incremental_seconds": round(incremental_seconds, 2),
        "scratch_seconds": round(scratch_seconds, 2), "no_op_seconds": round(no_op_seconds, 2),
        "input_records": incremental["counts"]["input_records"],
        "new_records": incremental["counts"]["input_records"] - full["counts"]["input_records"],
        "incremental_stage_seconds": incremental["times"]["stage_seconds"],
        "full_stage_seconds": full["times"]["stage_seconds"],
        "cache_full": stage_cache(full), "cache_incremental": stage_cache(incremental),
        "score_max_abs_diff": comparison["score_max_abs_diff"],
        "tables": comparison["tables"], "batch_invariance": batches,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print_table(figures)
    print(json.dumps(figures))


def print_table(f: dict) -> None:
    print(f"{'quick' if f['quick'] else 'shared recipe'}{' without its scorer' if f['no_score'] else ''}: "
          f"{f['input_records']} input records, "
          f"{f['new_records']} new ({f['model']}'s outputs and annotations); {f['mode']}")
    print(f"\n{'build':<34}{'seconds':>9}")
    for name, key in (("(a) full, empty cache", "full_seconds"), ("(b) + new files, warm cache", "incremental_seconds"),
                      ("    unchanged again: no-op", "no_op_seconds"),
                      ("(c) from scratch, empty cache", "scratch_seconds")):
        print(f"{name:<34}{f[key]:>9.1f}")
    print(f"incremental_over_full {f['incremental_over_full']:.4f}")
    print(f"\n{'stage':<16}{'(a) s':>9}{'(b) s':>9}")
    for stage, seconds in f["full_stage_seconds"].items():
        print(f"{stage:<16}{seconds:>9.2f}{f['incremental_stage_seconds'].get(stage, 0.0):>9.2f}")
    print(f"\n{'cache (b)':<16}{'hits':>9}{'computed':>10}")
    for name, entry in f["cache_incremental"].items():
        print(f"{name:<16}{entry['hits']:>9}{entry['computed']:>10}")
    print(f"\n{'(b) vs (c)':<12}{'rows':>14}  equal (sorted)  differing columns")
    for name, t in f["tables"].items():
        print(f"{name:<12}{str(t['rows']):>14}  {str(t['equal_sorted']):<15} {', '.join(t['columns_differ']) or '-'}")
    print(f"identical {f['identical']}, identical decisions {f['identical_decisions']}, "
          f"largest score difference {f['score_max_abs_diff']:.3g}")
    b = f["batch_invariance"]
    if b is not None:
        print(f"batch invariance ({b['dtype']}, batch {b['batch_size']}): {b['differ']} of {b['conversations']} scores "
              f"change when scored with {b['conversations']} others (largest change {b['max_abs_diff']:.3g})")
    print(f"total {f['total_seconds']} s")


if __name__ == "__main__":
    main()
