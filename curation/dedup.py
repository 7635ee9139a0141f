"""Dedup stage: drop exact duplicates (same ``content_hash``) and near duplicates (MinHash LSH).

Duplicates waste training compute and over-weight whatever they say, so each cluster of
copies keeps one row and rejects the others with ``duplicate_of`` pointing at the row that
was kept. Which row is kept is decided by one total order over rows (see ``keep_order``),
so exact and near clusters agree and every rejection points straight at the kept row.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation.stage import StageResult, empty_rejections, rejections

STAGE = "dedup"
_SCHEME = "affine32"  # datasketch permutation scheme, pinned so signatures do not change with library defaults

# Odd 64-bit multiplier (golden ratio) used to fold word hashes into n-gram hashes.
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
# LSH banding weights (false positive, false negative). Every candidate is verified by its
# estimated Jaccard, so a false positive costs one vector compare while a false negative is
# a duplicate kept: favour recall. At threshold 0.8 / 128 permutations this picks 16 bands
# of 8 rows, making a pair with Jaccard 0.85 a candidate 99.4% of the time (datasketch's
# default (0.5, 0.5) gives 9 x 13 and only 69%).
_LSH_WEIGHTS = (0.05, 0.95)
_VERIFY_CHUNK = 200_000  # candidate pairs compared per numpy step (bounds memory)


class NearDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="run near-duplicate detection after exact dedup")
    threshold: float = Field(0.8, gt=0.0, lt=1.0,
                             description="estimated Jaccard similarity of shingle sets at or above which two rows are near duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: finer Jaccard estimates, slower)")
    shingle_words: int = Field(5, ge=1, le=50, description="words per shingle (word n-grams)")
    field: Literal["conversation", "text", "prompt", "answer"] = Field(
        "conversation",
        description="'conversation': prompt AND final answer each at or above the threshold (different answers to "
                    "one long prompt are not duplicates); 'text': the whole conversation as one text; 'prompt' or "
                    "'answer' alone")
    seed: int = Field(1, ge=0, description="MinHash permutation seed; results are identical for a fixed seed")

    @model_validator(mode="after")
    def _bandable(self) -> NearDedupConfig:
        _lsh_index(self)
        return self


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="drop rows whose content_hash equals another row's, across sources")
    near: NearDedupConfig = Field(default_factory=NearDedupConfig, description="near-duplicate detection")
    keep: Literal["score", "rule"] = Field(
        "rule", description="'rule': keep by source priority, rank, answer length, id; 'score': best score first, then the rule")
    source_priority: list[str] = Field(default_factory=list,
                                       description="source names, earlier wins ties under the rule; unlisted sources come after")


def deduplicate(records: pl.DataFrame, config: DedupConfig) -> StageResult:
    """Exact dedup on ``content_hash`` (within each ``kind``), then near dedup of conversations.

    Prompt rows take part in exact dedup only. Kept rows of a cluster with more than one
    member get ``dup_cluster`` = id of the kept row; singletons get null.
    """
    if records.is_empty():
        return StageResult(records.with_columns(pl.lit(None, dtype=pl.String).alias("dup_cluster")), empty_rejections())

    frame = records.with_row_index("_row").with_columns(keep_order(records, config))
    n = frame.height
    pref = frame["_pref"].to_numpy()

    # Exact: every row points at the most preferred row with the same (kind, content_hash).
    if config.exact:
        exact_rep = frame.select(
            pl.when(pl.col("content_hash").is_null()).then(pl.col("_row"))
            .otherwise(pl.col("_row").sort_by("_pref").first().over(["kind", "content_hash"]))
        ).to_series().to_numpy()
    else:
        exact_rep = np.arange(n)

    # Near: cluster the exact survivors that are conversations; rep maps each to its cluster's keeper.
    rep = exact_rep.copy()
    similarity = np.full(n, np.nan)  # estimated Jaccard of a near-dropped row with its keeper
    survivors = np.flatnonzero((exact_rep == np.arange(n)) & (frame["kind"] == "conversation").to_numpy())
    if config.near.enabled and survivors.size > 1:
        field = config.near.field
        texts = dedup_texts(frame[survivors], "answer" if field == "conversation" else field)
        signatures = minhash_signatures(texts, config.near)
        left, right, _ = candidate_pairs(signatures, config.near)
        if field == "conversation":
            # Similar answers are duplicates only when they answer a similar prompt.
            prompt_signatures = minhash_signatures(dedup_texts(frame[survivors], "prompt"), config.near)
            close = _estimated_jaccard(prompt_signatures, left, right) >= config.near.threshold
            left, right = left[close], right[close]
        local_rep = _cluster_keepers(len(survivors), left, right, pref[survivors])
        near_rep = survivors[local_rep]
        moved = np.flatnonzero(local_rep != np.arange(len(survivors)))
        similarity[survivors[moved]] = _estimated_jaccard(signatures, moved, local_rep[moved])
        rep[survivors] = near_rep
        rep = rep[exact_rep]  # exact copies follow their representative to the final keeper

    ids = frame["id"]
    kept_mask = rep == np.arange(n)
    in_cluster = np.bincount(rep, minlength=n)[rep] > 1
    kept = records.with_columns(
        pl.when(pl.Series(in_cluster)).then(ids.gather(rep)).otherwise(None).cast(pl.String).alias("dup_cluster")
    ).filter(pl.Series(kept_mask))

    dropped = np.flatnonzero(~kept_mask)
    if dropped.size == 0:
        return StageResult(kept, empty_rejections())
    info = pl.DataFrame({
        "id": ids.gather(dropped),
        "_exact": exact_rep[dropped] != dropped,
        "_exact_of": ids.gather(exact_rep[dropped]),
        "_kept": ids.gather(rep[dropped]),
        "_jaccard": similarity[exact_rep[dropped]],
    })
    threshold = config.near.threshold
    hundredths = (pl.col("_jaccard") * 100).round().cast(pl.Int64)
    jaccard_text = pl.format("jaccard≈{}.{}", hundredths // 100, (hundredths % 100).cast(pl.String).str.zfill(2))
    near_detail = pl.concat_str(
        jaccard_text, pl.lit(" with "), pl.col("_kept"),
        pl.when(pl.col("_jaccard") < threshold).then(pl.lit(" (joined through other near duplicates)")).otherwise(pl.lit("")),
    )
    detail = (
        pl.when(~pl.col("_exact")).then(near_detail)
        .when(pl.col("_exact_of") == pl.col("_kept")).then(pl.format("same content_hash as {}", pl.col("_kept")))
        .otherwise(pl.concat_str(pl.lit("same content_hash as "), pl.col("_exact_of"),
                                 pl.lit(", itself a near duplicate ("), jaccard_text, pl.lit(") of "), pl.col("_kept")))
    )
    rejected = rejections(
        info, STAGE,
        reason=pl.when(pl.col("_exact")).then(pl.lit("exact_duplicate")).otherwise(pl.lit("near_duplicate")),
        detail=detail, duplicate_of=pl.col("_kept"),
    )
    return StageResult(kept, rejected)


def keep_order(records: pl.DataFrame, config: DedupConfig) -> pl.DataFrame:
    """``_pref`` per row (0 = most preferred): the single order that picks every cluster's keeper.

    Rule: the earlier source in ``source_priority`` (unlisted sources after the listed ones;
    the build puts sources that may feed SFT first, so a copy that can still be selected
    wins), then a row with a non-null ``rank`` (ranked by a human or judge: it carries more
    information), then the longer answer (``answer_chars``, computed from the final
    message when null), then the smallest ``id``. With ``keep="score"`` the highest
    ``score`` comes first (null scores last) and the rule breaks ties.
    """
    priority = {name: i for i, name in enumerate(config.source_priority)}
    last = pl.col("messages").list.last()
    answer_chars = pl.col("answer_chars").fill_null(
        pl.when(last.struct.field("role") == "assistant").then(last.struct.field("content").str.len_chars()).otherwise(0)
    ).fill_null(0)
    keys = [
        pl.col("source").replace_strict(priority, default=len(priority), return_dtype=pl.Int64).alias("_source"),
        pl.col("rank").is_null().alias("_unranked"),
        answer_chars.alias("_answer_chars"),
        pl.col("id").alias("_id"),
    ]
    descending = [False, False, True, False]
    if config.keep == "score":
        keys.insert(0, pl.col("score").alias("_score"))
        descending.insert(0, True)
    ordered = (
        records.with_row_index("_row").select("_row", *keys)
        .sort([k.meta.output_name() for k in keys], descending=descending, nulls_last=True, maintain_order=True)
    )
    return ordered.with_row_index("_pref").sort("_row").select(pl.col("_pref").cast(pl.Int64))


def dedup_texts(frame: pl.DataFrame, field: str) -> pl.Series:
    """The text of each row that near dedup compares: 'role: content' lines for text/prompt."""
    messages = pl.col("messages")
    if field == "answer":
        expr = messages.list.last().struct.field("content")
    else:
        if field == "prompt":
            messages = messages.list.slice(0, messages.list.len() - 1)
        line = pl.concat_str(pl.element().struct.field("role"), pl.lit(": "),
                             pl.element().struct.field("content").fill_null(""))
        expr = messages.list.eval(line).list.join("\n")
    return frame.select(expr.fill_null("").alias("text")).to_series()


def shingle_hashes(texts: pl.Series, shingle_words: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each text's word n-gram shingles, flat, with per-text offsets.

    Words are runs of word characters of the lowercased text. A text of fewer than
    ``shingle_words`` words is one shingle: its words joined by spaces, or, with no word
    at all (emoji, punctuation, empty), the stripped lowercased text itself. Hashes are
    computed once per distinct word (xxh64) and folded into n-gram hashes with numpy, so
    they are stable across runs and machines.
    """
    n = shingle_words
    lowered = texts.str.to_lowercase()
    words = lowered.str.extract_all(r"\w+")
    lengths = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = words.explode(empty_as_null=False).drop_nulls()
    distinct = flat.unique()
    word_hash = pl.Series([xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass")) for w in distinct.to_list()],
                          dtype=pl.UInt64)
    h = flat.replace_strict(distinct, word_hash, return_dtype=pl.UInt64).to_numpy()

    total = h.size
    gram = h.copy()
    for k in range(1, n):
        shifted = np.zeros(total, dtype=np.uint64)
        shifted[: total - k] = h[k:]
        gram = (gram * _NGRAM_MULTIPLIER) ^ shifted
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(total) - np.repeat(starts, lengths)
    valid = position <= np.repeat(lengths, lengths) - n
    gram32 = _fold32(gram[valid])
    per_text = np.maximum(lengths - n + 1, 0)

    short = np.flatnonzero(lengths < n)
    if short.size == 0:
        return gram32, np.concatenate([[0], np.cumsum(per_text)])

    # Short texts: one shingle of the whole text, hashed as a string, placed at the text's slot.
    short_text = pl.DataFrame({"joined": words.gather(short).list.join(" "), "text": lowered.gather(short)}).select(
        pl.when(pl.col("joined").fill_null("") == "").then(pl.col("text").str.strip_chars())
        .otherwise(pl.col("joined")).fill_null("")
    ).to_series().to_list()
    short_hash = _fold32(np.array([xxhash.xxh64_intdigest(t.encode("utf-8", "surrogatepass")) for t in short_text],
                                  dtype=np.uint64))
    is_long = np.ones(len(lengths), dtype=bool)
    is_long[short] = False
    per_text[short] = 1
    offsets = np.concatenate([[0], np.cumsum(per_text)])
    out = np.empty(offsets[-1], dtype=np.uint32)
    out[np.repeat(is_long, per_text)] = gram32
    out[offsets[short]] = short_hash
    return out, offsets


def minhash_signatures(texts: pl.Series, config: NearDedupConfig) -> np.ndarray:
    """MinHash signature (num_perm uint32 values) of each text's shingle set, one row per text."""
    hashes, offsets = shingle_hashes(texts, config.shingle_words)
    template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_identity, scheme=_SCHEME)
    signatures = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    for i in range(len(texts)):
        sketch = template.copy()
        sketch.update_batch(hashes[offsets[i]: offsets[i + 1]].tolist())
        signatures[i] = sketch.hashvalues
    return signatures


def candidate_pairs(signatures: np.ndarray, config: NearDedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (left < right) that share an LSH band and whose estimated Jaccard >= threshold."""
    lsh = _lsh_index(config)
    sketches = [LeanMinHash(seed=config.seed, hashvalues=row, scheme=_SCHEME) for row in signatures]
    with lsh.insertion_session() as session:
        for i, sketch in enumerate(sketches):
            session.insert(i, sketch, check_duplication=False)
    left, right = [], []
    for i, sketch in enumerate(sketches):
        for j in lsh.query(sketch):
            if j > i:
                left.append(i)
                right.append(j)
    left_arr = np.array(left, dtype=np.int64)
    right_arr = np.array(right, dtype=np.int64)
    order = np.lexsort((right_arr, left_arr))
    left_arr, right_arr = left_arr[order], right_arr[order]
    jaccard = _estimated_jaccard(signatures, left_arr, right_arr)
    close = jaccard >= config.threshold
    return left_arr[close], right_arr[close], jaccard[close]


def _lsh_index(config: NearDedupConfig) -> MinHashLSH:
    try:
        return MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=_LSH_WEIGHTS)
    except ValueError as error:
        raise ValueError(f"near dedup cannot split num_perm={config.num_perm} into LSH bands for threshold="
                         f"{config.threshold} ({error}); raise num_perm or lower the threshold") from None


def _cluster_keepers(n: int, left: np.ndarray, right: np.ndarray, pref: np.ndarray) -> np.ndarray:
    """For each of n items, the index of the most preferred member of its connected component."""
    if left.size == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(left.size, dtype=np.int8), (left, right)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.lexsort((pref, labels))  # by component, then preference
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keeper_of_label = np.empty(labels.max() + 1, dtype=np.int64)
    keeper_of_label[labels[order][first]] = order[first]
    return keeper_of_label[labels]


def _estimated_jaccard(signatures: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    out = np.empty(left.size, dtype=np.float64)
    for start in range(0, left.size, _VERIFY_CHUNK):
        stop = start + _VERIFY_CHUNK
        out[start:stop] = (signatures[left[start:stop]] == signatures[right[start:stop]]).mean(axis=1)
    return out


def _fold32(values: np.ndarray) -> np.ndarray:
    return ((values >> np.uint64(32)) ^ values).astype(np.uint32)


def _identity(value: int) -> int:
    return value
