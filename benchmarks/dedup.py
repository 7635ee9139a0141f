"""Near-duplicate detection speed and quality: our numpy MinHash LSH against a datasketch pipeline.

    python benchmarks/dedup.py            # every shared AlpacaEval output (~54k conversations)
    python benchmarks/dedup.py --quick    # the outputs for 150 prompts (~10k conversations, under a minute)

Each document is one whole conversation, ``"user: <instruction>\\nassistant: <output>"``
(near dedup's ``field="text"``: classic document-level dedup). Both pipelines use 5-word
shingles of the lowercased ``\\w+`` words, 128 permutations and Jaccard threshold 0.8.

- datasketch: what a typical user writes: per document a Python set of shingles,
  ``MinHash(num_perm=128)`` + ``update_batch`` of the encoded shingles, then
  ``MinHashLSH(threshold=0.8, num_perm=128)`` insert and query; the candidates are its pairs.
  A tuned variant (one template MinHash copied per document, an insertion session) is
  timed too, for reference.
- ours: ``sketch`` (shingles + signatures) + ``candidate_pairs`` (LSH banding, verification
  by estimated Jaccard, exact Jaccard for pairs near the threshold) + connected components,
  numpy backend.

Quality: every output for 90 random prompts (~6k documents; near duplicates of a
conversation share its prompt) gets exact Jaccard of its string shingles for all pairs by a
sparse incidence product; true pairs have Jaccard >= 0.8. Precision and recall are of each
pipeline's pairs with both ends in that sample, against the truth built with the pipeline's
own words: the stage's (Rust regex ``\w``) for ours, Python's ``re`` for datasketch (they
differ only on combining marks, e.g. emoji variation selectors; ours against the Python-re
truth is reported too). Ours is timed three times (median): a single ~1 s run on 2 shared
cores is at the mercy of other processes, while the ~20 s datasketch run averages them out.
Prints a table, then one JSON object as the very last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from datasketch import MinHash, MinHashLSH
from scipy.sparse import csr_matrix

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curation.dedup import NearDedupConfig, cluster_keepers, candidate_pairs, sketch  # noqa: E402

OUTPUTS = ROOT.parent / "shared" / "data" / "alpaca_eval" / "outputs"
THRESHOLD, NUM_PERM, SHINGLE_WORDS = 0.8, 128, 5
QUICK_PROMPTS, SAMPLE_PROMPTS = 150, 90


def load(quick: bool) -> tuple[list[str], list[int]]:
    """Conversation texts and the AlpacaEval prompt index of each."""
    texts, prompt = [], []
    for path in sorted(OUTPUTS.glob("*.json.gz")):
        with gzip.open(path) as handle:
            for i, record in enumerate(json.load(handle)):
                if quick and i >= QUICK_PROMPTS:
                    break
                texts.append(f"user: {record['instruction']}\nassistant: {record['output'] or ''}")
                prompt.append(i)
    return texts, prompt


def shingles(text: str, words: list[str] | None = None) -> set[str]:
    """Word 5-gram shingles as a datasketch user writes them (Python's re), or of given words."""
    if words is None:
        words = re.findall(r"\w+", text.lower())
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words) if words else text.lower().strip()}
    return {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def datasketch_pipeline(texts: list[str], tuned: bool) -> set[tuple[int, int]]:
    template = MinHash(num_perm=NUM_PERM)
    sketches = []
    for text in texts:
        sketch = template.copy() if tuned else MinHash(num_perm=NUM_PERM)
        sketch.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles(text)])
        sketches.append(sketch)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    if tuned:
        with lsh.insertion_session() as session:
            for i, sketch in enumerate(sketches):
                session.insert(i, sketch, check_duplication=False)
    else:
        for i, sketch in enumerate(sketches):
            lsh.insert(i, sketch)
    pairs = set()
    for i, sketch in enumerate(sketches):
        pairs.update((i, j) for j in lsh.query(sketch) if j > i)
    return pairs


def our_pipeline(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verified pairs (left, right) and each document's cluster keeper."""
    config = NearDedupConfig(field="text", threshold=THRESHOLD, num_perm=NUM_PERM, shingle_words=SHINGLE_WORDS,
                             backend="numpy")
    sketches = sketch(pl.Series(texts, dtype=pl.String), config)
    left, right, _ = candidate_pairs(sketches.signatures, config, (sketches.hashes, sketches.offsets))
    keeper = cluster_keepers(len(texts), left, right, np.arange(len(texts)))
    return left, right, keeper


def exact_pairs(texts: list[str], members: np.ndarray, stage_words: bool) -> set[tuple[int, int]]:
    """Pairs of ``members`` (global indices) with exact Jaccard >= THRESHOLD of their string shingles.

    Words are the stage's (the Rust regex ``\\w``, which also takes combining marks such as
    emoji variation selectors) or Python's ``re`` ``\\w`` (letters, digits, underscore).
    """
    chosen = [texts[i] for i in members]
    words = (pl.Series(chosen, dtype=pl.String).str.to_lowercase().str.extract_all(r"\w+").to_list()
             if stage_words else [None] * len(chosen))
    vocab: dict[str, int] = {}
    rows, cols, sizes = [], [], []
    for row, (text, text_words) in enumerate(zip(chosen, words)):
        doc = shingles(text, text_words)
        sizes.append(len(doc))
        for shingle in doc:
            rows.append(row)
            cols.append(vocab.setdefault(shingle, len(vocab)))
    incidence = csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(members), len(vocab)))
    overlap = (incidence @ incidence.T).tocoo()
    size = np.array(sizes)
    upper = overlap.row < overlap.col
    i, j, inter = overlap.row[upper], overlap.col[upper], overlap.data[upper]
    close = inter / (size[i] + size[j] - inter) >= THRESHOLD
    return set(zip(members[i[close]].tolist(), members[j[close]].tolist()))


def quality(found: set[tuple[int, int]], truth: set[tuple[int, int]], sample: set[int]) -> tuple[float, float, int]:
    inside = {p for p in found if p[0] in sample and p[1] in sample}
    hits = len(inside & truth)
    return hits / max(len(inside), 1), hits / max(len(truth), 1), len(inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only the outputs for the first {QUICK_PROMPTS} prompts")
    parser.add_argument("--no-tuned", action="store_true", help="skip timing the tuned datasketch variant")
    args = parser.parse_args()

    texts, prompt = load(args.quick)
    n = len(texts)
    prompts = sorted(set(prompt))
    chosen = set(random.Random(7).sample(prompts, min(SAMPLE_PROMPTS, len(prompts))))
    members = np.array([i for i, p in enumerate(prompt) if p in chosen])
    sample = set(members.tolist())

    timings = {}
    runs = []
    for _ in range(3):  # median of three: one short run is at the mercy of other processes on 2 cores
        started = time.perf_counter()
        left, right, keeper = our_pipeline(texts)
        runs.append(time.perf_counter() - started)
    timings["ours"] = float(np.median(runs))
    started = time.perf_counter()
    ds_pairs = datasketch_pipeline(texts, tuned=False)
    timings["datasketch"] = time.perf_counter() - started
    if not args.no_tuned:
        started = time.perf_counter()
        tuned_pairs = datasketch_pipeline(texts, tuned=True)
        timings["datasketch_tuned"] = time.perf_counter() - started
        assert tuned_pairs == ds_pairs  # same sketches, same index: only the speed differs

    started = time.perf_counter()
    truth = exact_pairs(texts, members, stage_words=True)
    truth_seconds = time.perf_counter() - started
    truth_re = exact_pairs(texts, members, stage_words=False)
    ours = set(zip(left.tolist(), right.tolist()))
    precision, recall, ours_in_sample = quality(ours, truth, sample)
    re_precision, re_recall, _ = quality(ours, truth_re, sample)
    ds_precision, ds_recall, ds_in_sample = quality(ds_pairs, truth_re, sample)
    cluster_recall = sum(keeper[a] == keeper[b] for a, b in truth) / max(len(truth), 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rate = {name: n / seconds for name, seconds in timings.items()}
    print(f"documents: {n} AlpacaEval conversations ({len(prompts)} prompts x {len(list(OUTPUTS.glob('*.json.gz')))} "
          f"models); sample for quality: {len(members)} documents of {len(chosen)} prompts, "
          f"{len(truth)} true pairs (exact Jaccard >= {THRESHOLD}, {truth_seconds:.1f}s; {len(truth_re)} with Python re "
          f"words)")
    print("precision/recall against exact Jaccard with the tokenisation each pipeline uses: the stage's words for "
          "ours, Python re for datasketch")
    print(f"{'pipeline':<24} {'seconds':>8} {'docs/s':>9} {'pairs':>8} {'in sample':>10} {'precision':>10} {'recall':>7}")
    print(f"{'datasketch (typical)':<24} {timings['datasketch']:>8.2f} {rate['datasketch']:>9.0f} {len(ds_pairs):>8} "
          f"{ds_in_sample:>10} {ds_precision:>10.3f} {ds_recall:>7.3f}")
    if "datasketch_tuned" in timings:
        print(f"{'datasketch (tuned)':<24} {timings['datasketch_tuned']:>8.2f} {rate['datasketch_tuned']:>9.0f} "
              f"{len(tuned_pairs):>8} {ds_in_sample:>10} {ds_precision:>10.3f} {ds_recall:>7.3f}")
    print(f"{'ours (numpy)':<24} {timings['ours']:>8.2f} {rate['ours']:>9.0f} {len(ours):>8} "
          f"{ours_in_sample:>10} {precision:>10.3f} {recall:>7.3f}")
    speedup = timings["datasketch"] / timings["ours"]
    print(f"speedup vs datasketch: {speedup:.1f}x"
          + (f" (vs tuned: {timings['datasketch_tuned'] / timings['ours']:.1f}x)" if "datasketch_tuned" in timings else "")
          + f"; ours against Python-re truth: precision {re_precision:.3f} recall {re_recall:.3f}; true pairs in one "
          f"of our clusters: {cluster_recall:.3f}; ours runs {', '.join(f'{r:.2f}' for r in runs)}s; "
          f"peak RSS {peak_mb:.0f} MB")
    print(json.dumps({
        "docs": n, "quick": args.quick, "speedup_vs_datasketch": round(speedup, 2),
        "speedup_vs_datasketch_tuned": round(timings["datasketch_tuned"] / timings["ours"], 2)
        if "datasketch_tuned" in timings else None,
        "precision": round(precision, 4), "recall": round(recall, 4), "cluster_recall": round(cluster_recall, 4),
        "precision_python_re_truth": round(re_precision, 4), "recall_python_re_truth": round(re_recall, 4),
        "datasketch_precision": round(ds_precision, 4), "datasketch_recall": round(ds_recall, 4),
        "datasketch_docs_per_s": round(rate["datasketch"]), "ours_docs_per_s": round(rate["ours"]),
        "datasketch_tuned_docs_per_s": round(rate["datasketch_tuned"]) if "datasketch_tuned" in rate else None,
        "sample_docs": len(members), "true_pairs": len(truth), "ours_pairs": len(ours),
        "datasketch_pairs": len(ds_pairs), "peak_rss_mb": round(peak_mb),
    }))


if __name__ == "__main__":
    main()
