"""Rebuild the bundled demo sample in data/sample/ from ../shared/data (deterministic).

The excerpts keep whole records in their original formats; each file's source and license
is listed in data/README.md. Files written by this project (ShareGPT HTML, broken input)
are made here too.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
OUT = HERE / "sample"

# Prompts chosen to show real defects: gemma-2b-it empty answers (62, 85), gpt4_0613 vs
# gpt4_0613_concise identical answers (34, 71), an oasst-sft-llama-33b zero-width answer (152).
ALPACA_EVAL_INDICES = sorted({*range(0, 20), 34, 62, 71, 85, 152})
ALPACA_EVAL_MODELS = ["gpt4_1106_preview", "gpt4_0613", "gpt4_0613_concise", "gemma-2b-it",
                      "oasst-sft-llama-33b", "alpaca-7b_concise", "Meta-Llama-3-8B-Instruct"]


def load_json(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read().splitlines()


def write_json(obj, path: Path, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj, indent=2, ensure_ascii=False).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def write_lines(rows: list[str], path: Path, gz: bool = False) -> None:
    data = ("\n".join(rows) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for model in ALPACA_EVAL_MODELS:
        rows = load_json(SHARED / "alpaca_eval" / "outputs" / f"{model}.json.gz")
        write_json([rows[i] for i in ALPACA_EVAL_INDICES], OUT / "alpaca_eval_outputs" / f"{model}.json.gz", gz=True)
    annotations = load_json(SHARED / "alpaca_eval" / "annotations" / "gemma-2b-it.json.gz")
    write_json([annotations[i] for i in ALPACA_EVAL_INDICES], OUT / "alpaca_eval_annotations" / "gemma-2b-it.json")
    write_lines(lines(SHARED / "hh_rlhf" / "harmless_base_1500.jsonl.gz")[:60], OUT / "hh_harmless_60.jsonl.gz", gz=True)
    write_lines(lines(SHARED / "oasst" / "en_30_tree.jsonl")[:3], OUT / "oasst_3_trees.jsonl")
    write_lines(lines(SHARED / "alpaca" / "seed_tasks.jsonl")[:30], OUT / "seed_tasks_30.jsonl")
    write_lines(lines(SHARED / "fastchat" / "mt_bench_question.jsonl")[:10], OUT / "mt_bench_10.jsonl")
    write_json(load_json(SHARED / "gpteacher" / "codegen-instruct.json.gz")[:100], OUT / "gpteacher_codegen_100.json")
    write_json(load_json(SHARED / "fastchat" / "dummy_conversation.json")[:40], OUT / "sharegpt_identity_40.json")
    print("\n".join(sorted(str(p.relative_to(HERE)) for p in OUT.rglob("*") if p.is_file())))


if __name__ == "__main__":
    main()
