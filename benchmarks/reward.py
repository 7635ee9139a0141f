"""Reward-model benchmark: held-out pairwise accuracy, best-of-n on AlpacaEval, and fast-path scoring speed.

    python benchmarks/reward.py                          # the embedded model (data/reward_model) on out/shared
    python benchmarks/reward.py --quick                  # capped subsets, under a minute
    python benchmarks/reward.py --model DIR_OR_ALIAS     # any scoring-stage model: folder, package alias, cached hub id
    python benchmarks/reward.py --data DIR               # another finished build

Every score comes from the pipeline's own scoring path (``curation.score.score_conversations``
with a ``ScoreConfig`` that leaves input, max_length and label_index to the model's defaults).

Held-out prompts: the model folder's ``training_metrics.json`` gives ``config.eval_fraction`` and
``config.seed``; ``curation.train.data.heldout_mask`` over a prompt_id gives the prompts that
training held out, i.e. never trained on, whatever build it trained on. A model without that
file (a hub model) is measured on every prompt, and the output says ``"heldout": false``.

1. Pairwise accuracy per source (oasst_trees, hh_harmless, alpaca_eval_judgements): native pairs
   (human or judge rankings) of the ``--data`` build's ``preference`` output whose prompt was held
   out. Accuracy = mean of [score(prompt + chosen) > score(prompt + rejected)], a tie (or an
   unscorable side) counting 0.5. ``len_acc_*`` = the same with the final answer's character
   length as the score ("longer answer wins").
2. Best-of-n on the AlpacaEval annotations (``../shared/data/alpaca_eval/annotations``): for each
   of the 805 instructions, 37 models' answers, each judged by GPT-4-turbo against the reference
   ``gpt4_1106_preview``. An answer's win = 1 if ``preference`` > 1.5 (the model's answer won),
   0.5 if exactly 1.5, 0 otherwise (AlpacaEval's discrete win rate). One answer per prompt is picked
   by the scorer (highest score; answers the pipeline rejects as empty are never picked), at random
   (expected value: the mean win over a prompt's answers), by length (most characters) and by each
   single model; the win rate of a selection is its mean win over prompts. ``oracle`` picks the best
   answer per prompt; the reference's own row is a self-comparison fixed at 1.5, so ``oracle`` gets
   0.5 on prompts no model wins, and ``oracle_no_reference`` (best non-reference answer) does not.
   The scorer is measured only on held-out prompts (prompt_id computed by running the pipeline's
   normalise stage over the instruction), and the ``bestofn_*`` keys are all on those prompts, so
   every selection is compared on the same prompts; ``bestofn_best_single`` is the best model on
   that subset (chosen in hindsight). The ``all_*`` keys are on all 805 prompts: random 0.141,
   longest 0.572, best single (FuseChat-Gemma-2-9B-Instruct) 0.717, oracle_no_reference 0.886, the
   issue's 0.15 / 0.57 / 0.72 / 0.89 (checked by tests/test_benchmark_reward.py).
3. Speed: the same conversations (a seeded sample of the held-out ones; 1000, or 200 with --quick)
   scored by (a) a plain transformers loop: AutoModelForSequenceClassification (an adapter folder
   merged by ``load_adapted(merge=True)``) and its tokenizer called directly, batches of 32 in input
   order padded to the longest, fp32, the tokenizer's own truncation to the same max_length; and
   (b) ``score_conversations``. Timings leave out loading the model (for (b): the time of a
   one-conversation call, subtracted; both load times are reported). ``speedup_vs_plain`` =
   time(a) / time(b); ``spearman_vs_plain`` = Spearman correlation of the two score vectors (the
   fast path truncates long inputs differently: prompt tail + answer head, so
   ``spearman_untruncated`` gives it on the conversations neither path truncates);
   ``pairs_per_s`` = conversations scored per second by the fast path / 2, a pair being two
   conversations (one prompt with two answers).

Prints a table, then one JSON object as the very last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from curation.hashing import hash_column  # noqa: E402
from curation.normalize import NormalizeConfig, normalize  # noqa: E402
from curation.score import (ScoreConfig, answer_text, model_folder, prompt_text, reward_settings,  # noqa: E402
                            score_conversations)
from curation.stage import records_frame  # noqa: E402
from curation.train.data import heldout_mask, read_output  # noqa: E402

DEFAULT_MODEL = ROOT / "data" / "reward_model"
ANNOTATIONS = ROOT.parent / "shared" / "data" / "alpaca_eval" / "annotations"
REFERENCE = "gpt4_1106_preview"
SOURCES = {"oasst": "oasst_trees", "hh": "hh_harmless", "alpaca_eval": "alpaca_eval_judgements"}
PLAIN_BATCH = 32
SEED = 0


# ---------------------------------------------------------------- AlpacaEval annotations (no model)

def load_annotations(folder: Path = ANNOTATIONS) -> pl.DataFrame:
    """One row per judged answer: instruction, model, output, chars, win (1 / 0.5 / 0 against the reference)."""
    frames = []
    for path in sorted(folder.glob("*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            records = json.load(handle)
        frames.append(pl.DataFrame(
            {"instruction": [r["instruction"] for r in records], "model": [r["generator_2"] for r in records],
             "output": [r["output_2"] or "" for r in records],
             "preference": [r["preference"] for r in records]},
            schema={"instruction": pl.String, "model": pl.String, "output": pl.String, "preference": pl.Float64}))
    if not frames:
        raise SystemExit(f"no annotation files (*.json.gz) in {folder}; point --annotations at alpaca_eval/annotations")
    preference = pl.col("preference")
    return pl.concat(frames).filter(preference.is_not_null() & preference.is_not_nan()).with_columns(
        chars=pl.col("output").str.len_chars(),
        win=pl.when(preference > 1.5).then(1.0).when(preference < 1.5).then(0.0).otherwise(0.5),
    )


def bestofn(frame: pl.DataFrame, score: str | None = None) -> dict:
    """Win rates of each selection over the prompts in ``frame`` (columns instruction, model, chars, win[, score])."""
    win = pl.col("win")
    picks = {
        "random": win.mean(),
        "longest": win.sort_by("chars", "model", descending=[True, False]).first(),
        "oracle": win.max(),
        "oracle_no_reference": win.filter(pl.col("model") != REFERENCE).max(),
    }
    if score is not None:  # unscorable answers (null score) are never picked while another one has a score
        picks["scorer"] = win.sort_by(score, "model", descending=[True, False], nulls_last=True).first()
    per_prompt = frame.group_by("instruction").agg(**picks)
    singles = frame.group_by("model").agg(win.mean(), pl.len().alias("prompts")).sort(
        "win", "model", descending=[True, False])
    out = {name: float(per_prompt[name].mean()) for name in picks}
    out.update(prompts=per_prompt.height, best_single=float(singles["win"][0]), best_single_name=singles["model"][0])
    return out


def normalised_conversations(instructions: list[str], answers: list[str]) -> pl.DataFrame:
    """The pipeline's normalise stage over (instruction, answer) rows: row, messages, prompt_id; rows it rejects
    (an empty answer) are missing."""
    rows = [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "source": "alpaca_eval_judgements", "source_file": "annotations", "source_record": f"index:{i}",
             "source_sha256": "", "format": "alpaca_eval_annotations", "kind": "conversation"}
            for i, (q, a) in enumerate(zip(instructions, answers))]
    kept = normalize(records_frame(rows), NormalizeConfig()).kept
    return kept.select(pl.col("id").cast(pl.Int64).alias("row"), "messages", "prompt_id")


def prompt_ids(instructions: list[str]) -> list[str]:
    """prompt_id of each instruction exactly as the pipeline computes it (the answer does not enter the hash)."""
    kept = normalised_conversations(instructions, ["x"] * len(instructions)).sort("row")
    if kept.height != len(instructions):
        raise SystemExit("the normalise stage rejected an AlpacaEval instruction; its prompt_id is undefined")
    return kept["prompt_id"].to_list()


# ---------------------------------------------------------------- model, held-out split and scoring

def held_out_split(folder: Path) -> tuple[float, int] | None:
    """(eval_fraction, seed) the model's training held out, or None when the folder does not say."""
    path = folder / "training_metrics.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8")).get("config") or {}
    if not config.get("eval_fraction"):
        return None
    return float(config["eval_fraction"]), int(config.get("seed", 0))


def held_out(ids: pl.Series, split: tuple[float, int] | None) -> pl.Series:
    if split is None:
        return pl.Series([True] * len(ids))
    return pl.Series(heldout_mask(ids.to_list(), *split))


def conversation_key(messages: pl.Expr) -> pl.Expr:
    """Stable key of a conversation (role and content of every message), so each distinct one is scored once."""
    serialised = messages.list.eval(pl.concat_str(pl.element().struct.field("role"), pl.lit("\x1f"),
                                                  pl.element().struct.field("content").fill_null(""))).list.join("\x1e")
    return serialised.map_batches(hash_column, return_dtype=pl.String)


def score_unique(conversations: pl.DataFrame, config: ScoreConfig, folder: Path) -> tuple[pl.DataFrame, float]:
    """(key -> score for each distinct conversation, seconds); NaN scores become null."""
    unique = conversations.unique(subset="key", keep="first", maintain_order=True)
    started = time.perf_counter()
    scores = score_conversations(unique["messages"].to_list(), config, folder=folder)
    seconds = time.perf_counter() - started
    return pl.DataFrame({"key": unique["key"], "score": pl.Series(scores, dtype=pl.Float64).fill_nan(None)}), seconds


def plain_scores(folder: Path, conversations: list[list[dict]], config: ScoreConfig) -> tuple[np.ndarray, float, float]:
    """The baseline loop a user would write: fp32, batches of 32 in input order padded to the longest.

    Returns (scores, seconds loading the model, seconds scoring)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    settings = reward_settings(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if (folder / "adapter_config.json").is_file():
        from curation.train.models import load_adapted

        model, _ = load_adapted(folder, merge=True)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True,
                                                                   trust_remote_code=False)
    model = model.float().eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    kind = config.input or settings.get("input") or ("chat_template" if tokenizer.chat_template else "text_pair")
    max_length = config.max_length or settings.get("max_length") or 512
    label = config.label_index if config.label_index is not None else settings.get(
        "label_index", {1: 0, 2: 1}.get(model.config.num_labels, 0))
    if settings.get("length_hint"):  # part of the model's input definition, as in training
        from curation.score import with_length_hint

        conversations = [with_length_hint(m) for m in conversations]
    out = []
    loaded = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(conversations), PLAIN_BATCH):
            batch = conversations[start:start + PLAIN_BATCH]
            if kind == "text_pair":
                inputs = tokenizer([prompt_text(m) for m in batch], [answer_text(m) for m in batch], truncation=True,
                                   max_length=max_length, padding="longest", return_tensors="pt")
            else:
                texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch]
                inputs = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length,
                                   padding="longest", return_tensors="pt")
            out.append(model(**inputs).logits[:, label].float().numpy())
    return np.concatenate(out).astype(np.float64), loaded - started, time.perf_counter() - loaded


def fits(folder: Path, conversations: list[list[dict]], config: ScoreConfig) -> np.ndarray:
    """True where the fast path's encoding needs no truncation (both paths then see the same tokens)."""
    from transformers import AutoTokenizer

    from curation.score import RewardEncoder

    settings = reward_settings(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    kind = config.input or settings.get("input") or ("chat_template" if tokenizer.chat_template else "text_pair")
    max_length = config.max_length or settings.get("max_length") or 512
    full = RewardEncoder(tokenizer, kind, 1 << 30, config.model,
                         length_hint=bool(settings.get("length_hint"))).encode(conversations)
    return np.array([e is not None and len(e[0]) <= max_length for e in full])


# ---------------------------------------------------------------- the benchmark

def pair_accuracy(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per source: pairs, scorer accuracy, longer-answer accuracy (ties and unscorable sides count 0.5)."""
    def wins(chosen: pl.Expr, rejected: pl.Expr) -> pl.Expr:
        return pl.when(chosen > rejected).then(1.0).when(chosen < rejected).then(0.0).otherwise(0.5)

    length = lambda side: pl.col(side).list.last().struct.field("content").fill_null("").str.len_chars()  # noqa: E731
    return pairs.group_by("source").agg(
        pairs=pl.len(), acc=wins(pl.col("chosen_score"), pl.col("rejected_score")).mean(),
        len_acc=wins(length("chosen"), length("rejected")).mean(),
        unscored=(pl.col("chosen_score").is_null() | pl.col("rejected_score").is_null()).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="capped subsets (under a minute)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder, package:<module> or cached hub id")
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "shared", help="a finished build")
    parser.add_argument("--annotations", type=Path, default=ANNOTATIONS)
    parser.add_argument("--kind", default="reward_model", choices=["reward_model", "embedding_similarity"],
                        help="embedding_similarity measures the interim scorer (no speed comparison)")
    parser.add_argument("--dtype", help="passed to ScoreConfig (float32 | bfloat16)")
    parser.add_argument("--backend", help="passed to ScoreConfig (torch | onnx)")
    parser.add_argument("--quantize", help="passed to ScoreConfig (none | int8, with --backend onnx)")
    parser.add_argument("--max-length", type=int, help="tokens per input for both paths (default: the model's)")
    parser.add_argument("--max-pairs", type=int, help="held-out pairs per source (default: all; 50 with --quick)")
    parser.add_argument("--max-prompts", type=int, help="held-out AlpacaEval prompts for best-of-n "
                                                        "(default: all; 8 with --quick)")
    parser.add_argument("--speed-conversations", type=int, help="conversations in the speed test (1000; 200 --quick)")
    args = parser.parse_args()
    max_pairs = args.max_pairs or (50 if args.quick else None)
    max_prompts = args.max_prompts or (8 if args.quick else None)
    n_speed = args.speed_conversations or (200 if args.quick else 1000)
    started = time.perf_counter()

    if args.model == str(DEFAULT_MODEL) and not DEFAULT_MODEL.is_dir():
        raise SystemExit(f"no embedded reward model at {DEFAULT_MODEL} yet; pass --model FOLDER")
    try:
        folder = model_folder(args.model)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    options = {"dtype": args.dtype, "backend": args.backend, "quantize": args.quantize, "max_length": args.max_length}
    unknown = [k for k, v in options.items() if v is not None and k not in ScoreConfig.model_fields]
    if unknown:
        raise SystemExit(f"ScoreConfig has no field {', '.join(unknown)} in this version; drop --{unknown[0]}")
    try:
        config = ScoreConfig(kind=args.kind, model=args.model, **{k: v for k, v in options.items() if v is not None})
    except ValidationError as error:
        raise SystemExit(f"scoring options: {'; '.join(e['msg'] for e in error.errors())}") from None
    split = held_out_split(folder)
    figures: dict = {"model": args.model, "kind": args.kind, "data": str(args.data), "quick": args.quick,
                     "options": {k: v for k, v in options.items() if v is not None}, "heldout": split is not None}
    if split is None:
        print(f"note: {folder} has no training_metrics.json with an eval_fraction: measuring on ALL prompts "
              f"(the model may have trained on some of them)", file=sys.stderr)
    else:
        figures.update(eval_fraction=split[0], seed=split[1])

    # 1. held-out native pairs per source
    pairs, _, _ = read_output(args.data, "preference", ["chosen_id", "rejected_id", "prompt", "chosen", "rejected",
                                                        "pair_source", "prompt_id", "source"])
    pairs = pairs.filter(pl.col("pair_source") == "native", pl.col("source").is_in(list(SOURCES.values())))
    build_ids = set(pairs.filter(pl.col("source") == SOURCES["alpaca_eval"])["prompt_id"].drop_nulls().to_list())
    pairs = pairs.filter(held_out(pairs.select(pl.coalesce("prompt_id", "chosen_id")).to_series(), split))
    if max_pairs and pairs.height:
        pairs = pl.concat([g.sample(min(max_pairs, g.height), seed=SEED)
                           for _, g in pairs.group_by("source", maintain_order=True)])
    pairs = pairs.with_columns(chosen_key=conversation_key(pl.concat_list("prompt", "chosen")),
                               rejected_key=conversation_key(pl.concat_list("prompt", "rejected")))

    # 2. AlpacaEval answers of held-out prompts, normalised as the pipeline would
    annotations = load_annotations(args.annotations)
    instructions = annotations["instruction"].unique(maintain_order=True)
    ids = pl.DataFrame({"instruction": instructions, "prompt_id": prompt_ids(instructions.to_list())})
    matched = len(build_ids & set(ids["prompt_id"].to_list()))
    if build_ids and matched < len(build_ids):
        print(f"warning: only {matched} of {len(build_ids)} AlpacaEval prompt_ids of the build match the "
              f"annotations' computed ids", file=sys.stderr)
    figures["alpaca_prompt_ids_matched"] = f"{matched}/{len(build_ids)}"
    heldout_ids = ids.filter(held_out(ids["prompt_id"], split))
    if max_prompts:
        heldout_ids = heldout_ids.sample(min(max_prompts, heldout_ids.height), seed=SEED)
    candidates = annotations.join(heldout_ids, on="instruction", how="semi").with_row_index("row")
    normalised = normalised_conversations(candidates["instruction"].to_list(), candidates["output"].to_list())
    normalised = normalised.with_columns(key=conversation_key(pl.col("messages")))

    # score every distinct conversation once
    conversations = pl.concat([
        pairs.select(pl.col("chosen_key").alias("key"), pl.concat_list("prompt", "chosen").alias("messages")),
        pairs.select(pl.col("rejected_key").alias("key"), pl.concat_list("prompt", "rejected").alias("messages")),
        normalised.select("key", "messages"),
    ])
    scores, score_seconds = score_unique(conversations, config, folder)
    pairs = (pairs.join(scores.rename({"key": "chosen_key", "score": "chosen_score"}), on="chosen_key", how="left")
             .join(scores.rename({"key": "rejected_key", "score": "rejected_score"}), on="rejected_key", how="left"))
    accuracy = pair_accuracy(pairs)
    for short, source in SOURCES.items():
        row = accuracy.filter(pl.col("source") == source)
        figures[f"acc_{short}"] = round(row["acc"][0], 4) if row.height else None
        figures[f"len_acc_{short}"] = round(row["len_acc"][0], 4) if row.height else None
        figures[f"pairs_{short}"] = int(row["pairs"][0]) if row.height else 0
    figures["unscored_pair_sides"] = int(accuracy["unscored"].sum())

    candidates = candidates.join(normalised.join(scores, on="key").select("row", "score"), on="row", how="left")
    on_subset = bestofn(candidates, "score")
    on_all = bestofn(annotations)
    figures.update(
        bestofn_winrate=round(on_subset["scorer"], 4), bestofn_random=round(on_subset["random"], 4),
        bestofn_longest=round(on_subset["longest"], 4), bestofn_best_single=round(on_subset["best_single"], 4),
        bestofn_best_single_name=on_subset["best_single_name"], bestofn_oracle=round(on_subset["oracle"], 4),
        bestofn_oracle_no_reference=round(on_subset["oracle_no_reference"], 4), bestofn_prompts=on_subset["prompts"],
        bestofn_answers_scored=int(candidates["score"].is_not_null().sum()), bestofn_answers=candidates.height,
        all_random=round(on_all["random"], 4), all_longest=round(on_all["longest"], 4),
        all_best_single=round(on_all["best_single"], 4), all_best_single_name=on_all["best_single_name"],
        all_oracle=round(on_all["oracle"], 4), all_oracle_no_reference=round(on_all["oracle_no_reference"], 4),
        all_prompts=on_all["prompts"], scored_conversations=scores.height, score_seconds=round(score_seconds, 2))

    # 3. speed: plain loop vs fast path on the same held-out conversations
    figures.update(speedup_vs_plain=None, spearman_vs_plain=None, pairs_per_s=None)
    if config.kind == "reward_model":
        figures.update(speed(folder, conversations, config, n_speed))
    figures["total_seconds"] = round(time.perf_counter() - started, 1)
    print_table(figures)
    print(json.dumps(figures))


def speed(folder: Path, conversations: pl.DataFrame, config: ScoreConfig, n: int) -> dict:
    pool = conversations.unique(subset="key", keep="first", maintain_order=True)
    sample = pool.sample(min(n, pool.height), seed=SEED, shuffle=True)["messages"].to_list()
    plain, plain_load, plain_seconds = plain_scores(folder, sample, config)
    tic = time.perf_counter()
    score_conversations(sample[:1], config, folder=folder)  # the load, timed to leave it out below
    fast_load = time.perf_counter() - tic
    tic = time.perf_counter()
    fast = score_conversations(sample, config, folder=folder)
    fast_seconds = time.perf_counter() - tic - fast_load
    from scipy.stats import spearmanr

    usable = np.isfinite(fast)
    untruncated = usable & fits(folder, sample, config)
    return dict(
        speedup_vs_plain=round(plain_seconds / fast_seconds, 2),
        spearman_vs_plain=round(float(spearmanr(plain[usable], fast[usable]).statistic), 4),
        spearman_untruncated=(round(float(spearmanr(plain[untruncated], fast[untruncated]).statistic), 4)
                              if untruncated.sum() > 2 else None),
        untruncated_share=round(float(untruncated.mean()), 3),
        pairs_per_s=round(len(sample) / fast_seconds / 2, 2), speed_conversations=len(sample),
        plain_seconds=round(plain_seconds, 2), fast_seconds=round(fast_seconds, 2),
        plain_load_seconds=round(plain_load, 2), fast_load_seconds=round(fast_load, 2))


def print_table(f: dict) -> None:
    fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    where = (f"held-out prompts (eval_fraction {f.get('eval_fraction')}, seed {f.get('seed')})" if f["heldout"]
             else "ALL prompts (no training_metrics.json: the model may have trained on some)")
    print(f"model {f['model']} on {f['data']}, {where}")
    print(f"\n{'pairwise accuracy':<26}{'pairs':>7}{'scorer':>9}{'longer':>9}")
    for short in SOURCES:
        print(f"{short:<26}{f[f'pairs_{short}']:>7}{fmt(f[f'acc_{short}']):>9}{fmt(f[f'len_acc_{short}']):>9}")
    print(f"\n{'best-of-n GPT-4 win rate':<26}{'held-out':>10}{'all 805':>10}")
    print(f"{'  prompts':<26}{f['bestofn_prompts']:>10}{f['all_prompts']:>10}")
    print(f"{'scorer':<26}{fmt(f['bestofn_winrate']):>10}{'-':>10}")
    for name in ("random", "longest", "best_single", "oracle", "oracle_no_reference"):
        print(f"{name:<26}{fmt(f[f'bestofn_{name}']):>10}{fmt(f[f'all_{name}']):>10}")
    print(f"  best single: {f['bestofn_best_single_name']} (held-out), {f['all_best_single_name']} (all)")
    if f["speedup_vs_plain"] is None:
        print(f"\nno speed comparison for kind {f['kind']}")
    else:
        print(f"\nspeed on {f['speed_conversations']} conversations: plain loop {f['plain_seconds']} s, "
              f"fast path {f['fast_seconds']} s -> {f['speedup_vs_plain']}x, {f['pairs_per_s']} pairs/s; "
              f"spearman {f['spearman_vs_plain']} (untruncated {fmt(f['spearman_untruncated'])}, "
              f"{f['untruncated_share']:.0%} of inputs)")
    print(f"total {f['total_seconds']} s")


if __name__ == "__main__":
    main()
