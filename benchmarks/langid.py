"""Language identification engines: speed and accuracy on real labelled text.

    python benchmarks/langid.py            # labelled set + throughput on 4,000 AlpacaEval answers
    python benchmarks/langid.py --quick    # labelled set only (under a minute)

The labelled set is benchmarks/data/langid_set.jsonl (see the README beside it). Texts are cut
to 1,000 characters as the filter stage does. Each engine's model is loaded before timing
(load time reported apart). 'en kept' is the share of English lines the filter's default rule
keeps (not called another language with at least the engine's default min_confidence:
fasttext 0.5, langdetect and lingua 0.9); 'other caught' the share of non-English lines it
would reject. Prints a table, then one JSON object as the very last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from curation.language import DEFAULT_ENGINE, DEFAULT_MIN_CONFIDENCE, ENGINES, detect_languages  # noqa: E402

SET = ROOT / "benchmarks" / "data" / "langid_set.jsonl"
SHARED = ROOT.parent / "shared" / "data"
MAX_CHARS = 1000
SHORT = 100  # characters: shorter lines are the hard case for every engine
MIN_SECONDS = 1.0  # fast engines are timed over repeated passes for a stable figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="labelled set only")
    args = parser.parse_args()
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    texts = [r["text"][:MAX_CHARS] for r in rows]
    labels = [r["lang"] for r in rows]
    answers = [] if args.quick else alpaca_answers(4000)

    figures: dict[str, dict] = {}
    predictions: dict[str, list[str]] = {}
    for engine in ENGINES:
        started = time.perf_counter()
        detect_languages(["Warm up: load the model before timing."], engine)
        load = time.perf_counter() - started
        seconds, (codes, probs) = timed(texts, engine)
        predictions[engine] = codes
        right = [c == lang for c, lang in zip(codes, labels)]
        short = [ok for ok, t in zip(right, texts) if len(t) < SHORT]
        long = [ok for ok, t in zip(right, texts) if len(t) >= SHORT]
        threshold = DEFAULT_MIN_CONFIDENCE[engine]  # what the filter applies for this engine by default
        en = [not (c != "en" and p >= threshold) for c, p, lang in zip(codes, probs, labels) if lang == "en"]
        other = [c != "en" and p >= threshold for c, p, lang in zip(codes, probs, labels) if lang != "en"]
        figures[engine] = {"docs_per_s": round(len(texts) / seconds, 1), "load_s": round(load, 2),
                           "accuracy": round(mean(right), 4), "accuracy_short": round(mean(short), 4),
                           "accuracy_long": round(mean(long), 4), "en_kept": round(mean(en), 4),
                           "other_caught": round(mean(other), 4)}
        if answers:
            seconds, (codes, _) = timed(answers, engine)
            figures[engine]["alpaca_docs_per_s"] = round(len(answers) / seconds, 1)
            figures[engine]["alpaca_en_share"] = round(mean([c == "en" for c in codes]), 4)

    languages = len(set(labels))
    n_short = sum(len(t) < SHORT for t in texts)
    print(f"labelled set: {len(texts)} lines ({n_short} under {SHORT} chars), {languages} languages"
          + (f"; throughput also on {len(answers)} AlpacaEval answers" if answers else ""))
    head = f"{'engine':<11} {'docs/s':>9} {'x ld':>5} {'load s':>7} {'acc':>6} {'short':>6} {'long':>6} {'en kept':>8} {'other caught':>13}"
    print(head + (f" {'alpaca docs/s':>14} {'alpaca en':>10}" if answers else ""))
    for engine, f in figures.items():
        line = (f"{engine:<11} {f['docs_per_s']:>9.0f} {f['docs_per_s'] / figures['langdetect']['docs_per_s']:>5.1f} "
                f"{f['load_s']:>7.2f} {f['accuracy']:>6.3f} "
                f"{f['accuracy_short']:>6.3f} {f['accuracy_long']:>6.3f} {f['en_kept']:>8.3f} {f['other_caught']:>13.3f}")
        if answers:
            line += f" {f['alpaca_docs_per_s']:>14.0f} {f['alpaca_en_share']:>10.3f}"
        print(line + ("   (default)" if engine == DEFAULT_ENGINE else ""))
    base, default = figures["langdetect"], figures[DEFAULT_ENGINE]
    for f in figures.values():
        f["speedup_vs_langdetect"] = round(f["docs_per_s"] / base["docs_per_s"], 1)
    speedup = default["docs_per_s"] / base["docs_per_s"]
    print(f"default engine '{DEFAULT_ENGINE}': {speedup:.0f}x langdetect's speed, accuracy "
          f"{default['accuracy']:.3f} vs {base['accuracy']:.3f}")
    print(json.dumps({"lines": len(texts), "languages": languages, "default_engine": DEFAULT_ENGINE,
                      "speedup_vs_langdetect": round(speedup, 1), "accuracy_langdetect": base["accuracy"],
                      "accuracy_default": default["accuracy"], "engines": figures}))


def timed(texts: list[str], engine: str) -> tuple[float, tuple[list[str], list[float]]]:
    """Seconds per pass over ``texts``: best of repeated passes after an untimed one (lingua loads
    each language's model on first use)."""
    detect_languages(texts, engine)
    passes, total, result = 0, 0.0, None
    best = float("inf")
    while total < MIN_SECONDS or passes == 0:
        started = time.perf_counter()
        result = detect_languages(texts, engine)
        elapsed = time.perf_counter() - started
        best, total, passes = min(best, elapsed), total + elapsed, passes + 1
    return best, result


def alpaca_answers(count: int) -> list[str]:
    """Distinct real answers from several AlpacaEval models (unlabelled, mostly English)."""
    answers: list[str] = []
    for path in sorted((SHARED / "alpaca_eval" / "outputs").glob("*.json.gz"))[::8]:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            answers.extend(r["output"][:MAX_CHARS] for r in json.load(handle) if r["output"].strip())
    return list(dict.fromkeys(answers))[:count]


def mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


if __name__ == "__main__":
    main()
