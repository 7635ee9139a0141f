"""Whole-build timing: per-stage seconds and counts for a recipe.

    python benchmarks/build.py            # recipes/shared.yaml (every shared file)
    python benchmarks/build.py --quick    # recipes/demo.yaml (under a minute)

Prints a table, then one JSON object with the figures as the very last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                   "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(key, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="build the demo recipe instead of the shared one")
    parser.add_argument("--recipe", type=Path, help="any recipe (overrides --quick)")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    args = parser.parse_args()
    recipe = args.recipe or ROOT / "recipes" / ("demo.yaml" if args.quick else "shared.yaml")
    out = args.out or Path(tempfile.mkdtemp(prefix="curation-bench-"))

    from flows.build import build_dataset

    started = time.perf_counter()
    manifest = build_dataset(recipe=str(recipe), out=str(out), quiet=True)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    seconds = manifest["times"]["stage_seconds"]
    print(f"recipe: {recipe.name}   out: {out}")
    print(f"{'stage':<10} {'seconds':>9} {'in':>9} {'out':>9} {'dropped':>9}  top reasons")
    for stage, counts in manifest["stages"].items():
        reasons = sorted(counts["dropped_by_reason"].items(), key=lambda kv: -kv[1])[:4]
        print(f"{stage:<10} {seconds.get(stage, 0):>9.2f} {counts['in']:>9} {counts['out']:>9} {counts['dropped']:>9}  "
              + ", ".join(f"{k}={v}" for k, v in reasons))
    print(f"{'write':<10} {seconds.get('write', 0):>9.2f}")
    counts = manifest["counts"]
    select = manifest["stages"]["select"]
    print(f"input_records={counts['input_records']} kept={counts['kept']} rejected={counts['rejected']} "
          f"quarantined={counts['quarantined']} sft={select['sft_rows']} preference={select['preference_pairs']} "
          f"prompts={select['prompt_rows']}")
    print(f"wall {wall:.1f}s (flow {manifest['times']['total_seconds']:.1f}s), peak RSS {peak_mb:.0f} MB")
    print(json.dumps({
        "recipe": recipe.name, "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_mb),
        "stage_seconds": seconds, **counts, "sft_rows": select["sft_rows"],
        "preference_pairs": select["preference_pairs"], "prompt_rows": select["prompt_rows"],
    }))


if __name__ == "__main__":
    main()
