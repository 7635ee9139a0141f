"""Dedup stage: drop exact duplicates (same ``content_hash``) and near duplicates (MinHash LSH).

Near dedup: MinHash signatures of word-shingle sets, LSH banding for candidate pairs, each
candidate verified by its estimated Jaccard (exact Jaccard when the estimate is close to the
threshold), connected components as clusters. The default ``numpy`` backend does all of it
vectorised over all rows; ``datasketch`` is the per-row reference with identical signatures.

Duplicates waste training compute and over-weight whatever they say, so each cluster of
copies keeps one row and rejects the others with ``duplicate_of`` pointing at the row that
was kept. Which row is kept is decided by one total order over rows (see ``keep_order``),
so exact and near clusters agree and every rejection points straight at the kept row.

Across builds (with a record cache, curation/record_cache.py): each text's signature is computed
once, and the rows each build keeps go into a persisted index per recipe. Indexed rows whose input
is gone (an earlier delivery, a withdrawn file) take part in the next build as anchors that always
win and are never output: exact and near copies of them are rejected as
``duplicate_of_earlier_build``. While the input still holds every indexed row, the index changes
nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Literal

import numpy as np
import polars as pl
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from curation.hashing import hash_column
from curation.record_cache import KEY, RecordCache, RecordCaches
from curation.stage import StageResult, empty_rejections, rejections

STAGE = "dedup"
EARLIER = "duplicate_of_earlier_build"  # reason of a row duplicating a row kept by an earlier build
SIGNATURE_STAGE = "minhash"  # record cache of MinHash signatures, keyed by text
INDEX_STAGE = "dedup_index"  # persisted index of the rows earlier builds kept, keyed by id
# Bump when the code changes a text's signature for the same settings, or what the index holds.
SIGNATURE_VERSION = 1
INDEX_VERSION = 1
_SCHEME = "affine32"  # datasketch permutation scheme, pinned so signatures do not change with library defaults

# Odd 64-bit multiplier (golden ratio) used to fold word hashes into n-gram hashes.
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
# LSH banding weights (false positive, false negative). Every candidate is verified, so a
# false positive costs one vector compare while a false negative is a duplicate kept:
# favour recall. At threshold 0.8 / 128 permutations this picks 18 bands of 7 rows, making
# a pair with Jaccard 0.8 a candidate 98.6% of the time and one at 0.85 99.9% (datasketch's
# default (0.5, 0.5) gives 9 x 13: 40% and 69%).
_LSH_WEIGHTS = (0.01, 0.99)
_VERIFY_CHUNK = 200_000  # candidate pairs compared per numpy step (bounds memory)
# An LSH bucket (rows with identical values in one band) of at most this many rows yields all
# its pairs; a larger one links every member to its first (lowest-index) member only, so a
# bucket of k copies costs k - 1 pairs instead of k(k-1)/2. See ``candidate_pairs``.
_BUCKET_ALL_PAIRS = 64
# MurmurHash3 32-bit finalizer, datasketch's pre-mix of input hashes for the affine32 scheme.
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_SIGNATURE_BATCH = 4096  # rows hashed per step of the numpy backend
_BAND_MULTIPLIER = np.uint64(0xFF51AFD7ED558CCD)


class NearDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="run near-duplicate detection after exact dedup")
    threshold: float = Field(0.8, gt=0.0, lt=1.0,
                             description="Jaccard similarity of shingle sets at or above which two rows are near duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: finer Jaccard estimates, slower)")
    shingle_words: int = Field(5, ge=1, le=50, description="words per shingle (word n-grams)")
    field: Literal["conversation", "text", "prompt", "answer"] = Field(
        "conversation",
        description="'conversation': prompt AND final answer each at or above the threshold (different answers to "
                    "one long prompt are not duplicates); 'text': the whole conversation as one text; 'prompt' or "
                    "'answer' alone")
    seed: int = Field(1, ge=0, description="MinHash permutation seed; results are identical for a fixed seed")
    exact_margin: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="candidate pairs whose estimated Jaccard is within this of the threshold are decided on their exact "
                    "Jaccard (of the shingle hash sets) instead; 0 decides on the estimate alone")
    backend: Literal["numpy", "datasketch"] = Field(
        "numpy", description="'numpy': signatures and LSH banding vectorised over all rows at once; 'datasketch': "
                             "the reference path, one datasketch MinHash and LSH query per row (same signatures, slower)")

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
    against_earlier_builds: bool = Field(
        True, description="with a cache: keep an index of the rows each build kept, and reject rows duplicating "
                          "(exactly or near) an indexed row whose input is gone, as 'duplicate_of_earlier_build'")


def deduplicate(records: pl.DataFrame, config: DedupConfig, cache: RecordCaches | None = None,
                dataset: str = "", input_ids: pl.Series | None = None) -> StageResult:
    """Exact dedup on ``content_hash`` (within each ``kind``), then near dedup of conversations.

    Prompt rows take part in exact dedup only. Kept rows of a cluster with more than one
    member get ``dup_cluster`` = id of the kept row; singletons get null.

    With ``cache``, MinHash signatures are cached by text, and (``against_earlier_builds``) the
    persisted index filed under ``dataset`` (the recipe's name; ``index_kept`` adds each finished
    build's kept rows) is read: index rows whose input is gone take part as anchors that always
    win, and rows duplicating them are rejected as ``duplicate_of_earlier_build``.
    ``input_ids``: every id of this build's input (default: ``records``' ids); an indexed row still in
    the input is never an anchor, even when an earlier stage now drops it (e.g. a stricter filter).
    """
    if records.is_empty():
        return StageResult(records.with_columns(pl.lit(None, dtype=pl.String).alias("dup_cluster")), empty_rejections())

    index = _open_index(cache, config, dataset) if cache is not None and config.against_earlier_builds else None
    anchors = pl.DataFrame(schema={KEY: pl.String, "kind": pl.String, "content_hash": pl.String})
    if index is not None:
        known = index.entries(keep="last")
        present = records["id"] if input_ids is None else input_ids
        anchors = known.join(present.rename(KEY).to_frame(), on=KEY, how="anti").sort(KEY)
        index.hits += anchors.height  # the index's "hits": rows of earlier builds taking part

    frame = records.with_row_index("_row").with_columns(keep_order(records, config))
    n, m = frame.height, anchors.height
    total = n + m
    # Rows 0..n-1 are this build's, n..n+m-1 the anchors, more preferred than any row (negative _pref).
    pref = np.concatenate([frame["_pref"].to_numpy(), np.arange(-m, 0)])
    kinds = pl.concat([frame["kind"], anchors["kind"]])

    # Exact: every row points at the most preferred row with the same (kind, content_hash).
    if config.exact:
        keyed = pl.concat([frame.select(pl.col("_row").cast(pl.Int64), "kind", "content_hash", "_pref"),
                           anchors.select(pl.int_range(n, total, dtype=pl.Int64).alias("_row"), "kind", "content_hash",
                                          pl.int_range(-m, 0, dtype=pl.Int64).alias("_pref"))])
        exact_rep = keyed.select(
            pl.when(pl.col("content_hash").is_null()).then(pl.col("_row"))
            .otherwise(pl.col("_row").sort_by("_pref").first().over(["kind", "content_hash"]))
        ).to_series().to_numpy()
    else:
        exact_rep = np.arange(total)

    # Near: cluster the exact survivors that are conversations; rep maps each to its cluster's keeper.
    rep = exact_rep.copy()
    jaccard = np.full(total, np.nan)  # Jaccard of a near-dropped row with its keeper
    survivors = np.flatnonzero((exact_rep == np.arange(total)) & (kinds == "conversation").to_numpy())
    if config.near.enabled and survivors.size > 1:
        field = config.near.field
        signatures = None
        if cache is not None:
            signatures = cache.open(SIGNATURE_STAGE, _signature_settings(config.near),
                                    values={"signature": pl.Array(pl.UInt32, config.near.num_perm)})

        def texts_of(which: str) -> pl.Series:
            """The survivors' texts: this build's from their messages, the anchors' as the index keeps them."""
            current = dedup_texts(frame[survivors[survivors < n]], which)
            if not m:
                return current
            earlier = anchors[f"{which}_text"].gather(survivors[survivors >= n] - n).fill_null("")
            return pl.concat([current, earlier.rename(current.name)])

        sketches = _sketch(texts_of("answer" if field == "conversation" else field), config.near, signatures)
        if field == "conversation":
            # Similar answers are duplicates only when they answer a similar prompt.
            prompts = _sketch(texts_of("prompt"), config.near, signatures)
            left, right, _ = candidate_pairs(sketches.signatures, config.near, sketches.shingles,
                                             within=prompts.signatures)
            close = similarity(prompts.signatures, prompts.shingles, left, right,
                               config.near) >= config.near.threshold
            left, right = left[close], right[close]
        else:
            left, right, _ = candidate_pairs(sketches.signatures, config.near, sketches.shingles)
        local_rep = cluster_keepers(len(survivors), left, right, pref[survivors])
        near_rep = survivors[local_rep]
        moved = np.flatnonzero(local_rep != np.arange(len(survivors)))
        jaccard[survivors[moved]] = sketches.shingles.jaccard(moved, local_rep[moved])
        rep[survivors] = near_rep
        rep = rep[exact_rep]  # exact copies follow their representative to the final keeper

    ids = pl.concat([frame["id"], anchors[KEY]])
    ours = rep[:n]
    kept_mask = ours == np.arange(n)
    in_cluster = np.bincount(rep, minlength=total)[ours] > 1
    kept = records.with_columns(
        pl.when(pl.Series(in_cluster)).then(ids.gather(ours)).otherwise(None).cast(pl.String).alias("dup_cluster")
    ).filter(pl.Series(kept_mask))

    dropped = np.flatnonzero(~kept_mask)
    if dropped.size == 0:
        return StageResult(kept, empty_rejections())
    info = pl.DataFrame({
        "id": ids.gather(dropped),
        "_exact": exact_rep[dropped] != dropped,
        "_exact_of": ids.gather(exact_rep[dropped]),
        "_kept": ids.gather(rep[dropped]),
        "_jaccard": jaccard[exact_rep[dropped]],
        "_earlier": rep[dropped] >= n,
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
    detail = pl.when(pl.col("_earlier")).then(pl.format("{}; {} was kept by an earlier build and is not in this "
                                                        "build's input", detail, pl.col("_kept"))).otherwise(detail)
    rejected = rejections(
        info, STAGE,
        reason=pl.when(pl.col("_earlier")).then(pl.lit(EARLIER))
        .when(pl.col("_exact")).then(pl.lit("exact_duplicate")).otherwise(pl.lit("near_duplicate")),
        detail=detail, duplicate_of=pl.col("_kept"),
    )
    return StageResult(kept, rejected)


def _near_fields(config: DedupConfig) -> list[str]:
    """The texts near dedup compares, for the index to keep."""
    if not config.near.enabled:
        return []
    return ["answer", "prompt"] if config.near.field == "conversation" else [config.near.field]


def _open_index(cache: RecordCaches, config: DedupConfig, dataset: str) -> RecordCache:
    """The persisted index of rows kept by earlier builds: id -> kind, content_hash and the compared texts.

    Texts rather than signatures: anchors then go through the same (cached) signatures and exact
    Jaccard checks as this build's rows, so an anchor is judged as if it were in the input.
    """
    fields = _near_fields(config)
    values = {"kind": pl.String, "content_hash": pl.String, **{f"{f}_text": pl.String for f in fields}}
    return cache.open(INDEX_STAGE, {"version": INDEX_VERSION, "dataset": dataset, "near_fields": fields}, values=values)


def index_kept(kept: pl.DataFrame, config: DedupConfig, cache: RecordCaches, dataset: str) -> int:
    """Add the rows dedup kept to the persisted index (those it does not hold yet with the same kind and
    content); returns how many. Called once the build has passed conservation, so a failed build never
    turns its rows into anchors for the next one."""
    if not config.against_earlier_builds or kept.is_empty():
        return 0
    index = _open_index(cache, config, dataset)
    known = index.entries(keep="last")
    new = kept.join(known.select(pl.col(KEY).alias("id"), "kind", "content_hash"), on=["id", "kind", "content_hash"],
                    how="anti", nulls_equal=True)
    is_conversation = pl.col("kind") == "conversation"
    texts = {f"{f}_text": pl.when(is_conversation).then(dedup_texts(new, f)) for f in _near_fields(config)}
    index.store(new.select(pl.col("id").alias(KEY), "kind", "content_hash", **texts))
    return new.height


def _signature_settings(config: NearDedupConfig) -> dict:
    """What a text's MinHash signature depends on (the text itself is the cache key)."""
    return {"version": SIGNATURE_VERSION, "num_perm": config.num_perm, "shingle_words": config.shingle_words,
            "seed": config.seed, "scheme": _SCHEME, "backend": config.backend}


@dataclass(frozen=True)
class _Sketched:
    signatures: np.ndarray
    shingles: Shingles


def _sketch(texts: pl.Series, config: NearDedupConfig, cache: RecordCache | None) -> _Sketched:
    """Signatures of ``texts``; with ``cache``, each distinct text is sketched once across builds and the
    shingle hashes are computed later, only for the texts an exact Jaccard needs."""
    if cache is None:
        sketches = sketch(texts, config)
        return _Sketched(sketches.signatures, Shingles(texts, config.shingle_words, sketches.hashes, sketches.offsets))
    keys = hash_column(texts).rename(KEY)
    distinct = pl.DataFrame({KEY: keys, "text": texts}).unique(KEY, keep="first", maintain_order=True)
    found = cache.lookup(distinct[KEY])
    missing = distinct.join(found, on=KEY, how="anti", maintain_order="left")
    if missing.height:
        computed = pl.DataFrame({KEY: missing[KEY],
                                 "signature": pl.Series(sketch(missing["text"], config).signatures)})
        cache.store(computed)
        found = pl.concat([found, computed])
    signatures = keys.to_frame().join(found, on=KEY, how="left", maintain_order="left")["signature"].to_numpy()
    return _Sketched(np.ascontiguousarray(signatures, dtype=np.uint32).reshape(len(texts), config.num_perm),
                     Shingles(texts, config.shingle_words))


class Shingles:
    """Shingle hash sets of texts, for exact Jaccard. Without precomputed ``hashes``/``offsets``
    (as ``Sketches`` holds them), only the texts a comparison involves are shingled, when asked."""

    def __init__(self, texts: pl.Series, shingle_words: int, hashes: np.ndarray | None = None,
                 offsets: np.ndarray | None = None):
        self.texts, self.shingle_words, self.hashes, self.offsets = texts, shingle_words, hashes, offsets

    def jaccard(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        if self.hashes is not None:
            return exact_jaccard(self.hashes, self.offsets, left, right)
        if left.size == 0:
            return np.empty(0, dtype=np.float64)
        docs, inverse = np.unique(np.concatenate([left, right]), return_inverse=True)
        hashes, offsets = shingle_hashes(self.texts.gather(docs), self.shingle_words)
        return exact_jaccard(hashes, offsets, inverse[:left.size], inverse[left.size:])


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

    Words are runs of ``\\w`` characters of the lowercased text (Unicode letters, marks,
    digits and connector punctuation, as polars' regex defines them; Python's ``re`` leaves
    out marks such as emoji variation selectors). A text of fewer than
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
    # A private categorical numbers the distinct words 0..k-1 (faster than unique + replace).
    vocabulary = pl.Categorical(pl.Categories.random())
    coded = flat.cast(vocabulary)  # keep alive while reading the categories: they are freed with it
    word_hash = _word_hashes(vocabulary.categories.to_series())
    codes = coded.to_physical().to_numpy()
    if codes.size == 0 or int(codes.max()) < word_hash.size:
        h = word_hash[codes]
    else:  # the categories could not be read back (a polars change): look the words up instead
        distinct = flat.unique()
        h = flat.replace_strict(distinct, pl.Series(_word_hashes(distinct)), return_dtype=pl.UInt64).to_numpy()

    total = h.size
    gram = h.copy()
    for k in range(1, n):
        gram *= _NGRAM_MULTIPLIER
        gram[: total - k] ^= h[k:]
    ends = np.cumsum(lengths)
    valid = np.arange(total) <= np.repeat(ends - n, lengths)
    gram32 = _fold32(gram[valid])
    per_text = np.maximum(lengths - n + 1, 0)

    short = np.flatnonzero(lengths < n)
    if short.size == 0:
        return gram32, np.concatenate([[0], np.cumsum(per_text)])

    # Short texts: one shingle of the whole text, hashed as a string, placed at the text's slot.
    short_text = pl.DataFrame({"joined": words.gather(short).list.join(" "), "text": lowered.gather(short)}).select(
        pl.when(pl.col("joined").fill_null("") == "").then(pl.col("text").str.strip_chars())
        .otherwise(pl.col("joined")).fill_null("")
    ).to_series()
    short_hash = _fold32(_word_hashes(short_text))
    is_long = np.ones(len(lengths), dtype=bool)
    is_long[short] = False
    per_text[short] = 1
    offsets = np.concatenate([[0], np.cumsum(per_text)])
    out = np.empty(offsets[-1], dtype=np.uint32)
    out[np.repeat(is_long, per_text)] = gram32
    out[offsets[short]] = short_hash
    return out, offsets


@dataclass(frozen=True)
class Sketches:
    """MinHash signatures of texts and the shingle hashes they were built from."""

    signatures: np.ndarray  # (texts, num_perm) uint32
    hashes: np.ndarray  # flat uint32 shingle hashes; text i has hashes[offsets[i]:offsets[i + 1]]
    offsets: np.ndarray


def sketch(texts: pl.Series, config: NearDedupConfig) -> Sketches:
    """Shingle hashes and MinHash signatures (num_perm uint32 values per text).

    Both backends give identical signatures: datasketch's affine32 scheme (MurmurHash3
    finalizer on the input hash, then ``a*h + b`` mod 2^32 with ``a`` odd, parameters drawn
    from ``np.random.RandomState(seed)``), so either can stand in for the other.
    """
    if config.backend == "numpy":
        # Batches of rows bound memory (one batch's work arrays per thread) and use every
        # core: polars and numpy release the GIL for the heavy steps.
        batches = [texts.slice(start, _SIGNATURE_BATCH) for start in range(0, len(texts), _SIGNATURE_BATCH)]
        if len(batches) <= 1:
            return _batch_sketch(texts, config)
        with ThreadPoolExecutor(_workers()) as pool:
            parts = list(pool.map(lambda batch: _batch_sketch(batch, config), batches))
        shift = np.cumsum([0] + [part.hashes.size for part in parts[:-1]])
        return Sketches(np.concatenate([part.signatures for part in parts]),
                        np.concatenate([part.hashes for part in parts]),
                        np.concatenate([[0]] + [part.offsets[1:] + s for part, s in zip(parts, shift)]))
    hashes, offsets = shingle_hashes(texts, config.shingle_words)
    template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_identity, scheme=_SCHEME)
    signatures = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    for i in range(len(texts)):
        minhash = template.copy()
        minhash.update_batch(hashes[offsets[i]: offsets[i + 1]].tolist())
        signatures[i] = minhash.hashvalues
    return Sketches(signatures, hashes, offsets)


def minhash_signatures(texts: pl.Series, config: NearDedupConfig) -> np.ndarray:
    """MinHash signature (num_perm uint32 values) of each text's shingle set, one row per text."""
    return sketch(texts, config).signatures


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) uint32 parameters datasketch's affine32 MinHash draws for ``seed``."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _batch_sketch(texts: pl.Series, config: NearDedupConfig) -> Sketches:
    """One batch: per permutation, one pass over the batch's flat shingle hashes and a
    ``minimum.reduceat`` at the text offsets (one shingle-sized buffer)."""
    hashes, offsets = shingle_hashes(texts, config.shingle_words)
    n = offsets.size - 1
    signatures = np.empty((config.num_perm, n), dtype=np.uint32)
    if n == 0:
        return Sketches(signatures.T.copy(), hashes, offsets)
    s1, m1, s2, m2, s3 = _FMIX32
    mixed = hashes.astype(np.uint32, copy=True)
    mixed ^= mixed >> s1
    mixed *= m1
    mixed ^= mixed >> s2
    mixed *= m2
    mixed ^= mixed >> s3
    a, b = permutations(config.num_perm, config.seed)
    starts = offsets[:-1]  # shingle_hashes gives every text at least one shingle
    buffer = np.empty(mixed.size, dtype=np.uint32)
    for k in range(config.num_perm):
        np.multiply(mixed, a[k], out=buffer)
        np.add(buffer, b[k], out=buffer)
        np.minimum.reduceat(buffer, starts, out=signatures[k])
    return Sketches(np.ascontiguousarray(signatures.T), hashes, offsets)


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def candidate_pairs(signatures: np.ndarray, config: NearDedupConfig,
                    shingles: tuple[np.ndarray, np.ndarray] | Shingles | None = None,
                    within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (left < right, sorted) that share an LSH band and whose Jaccard >= threshold, with it.

    The Jaccard is the signatures' estimate, except that with ``shingles`` (hashes, offsets
    as in ``Sketches``, or a ``Shingles``) a pair whose estimate is within ``exact_margin``
    of the threshold gets its exact Jaccard: at 128 permutations the estimate's standard
    error near 0.8 is 0.035, so deciding on it alone misjudges many pairs close to the threshold.

    Banding is datasketch's (same bands and rows for the config). The numpy backend groups
    equal band keys by sorting. A bucket larger than ``_BUCKET_ALL_PAIRS`` rows does not yield
    all k(k-1)/2 pairs: it is split by the bands of ``within`` (signatures of a second text
    that must be similar too: conversation mode's prompts) when given, and each remaining big
    bucket pairs its members with its first member only. Clusters are connected components,
    so a member that verifies against the first member lands in the same cluster as with all
    pairs; a big bucket means many rows identical in a whole band, in practice copies of one
    text, so little is lost (see the tests for a measurement).
    """
    if config.backend == "numpy":
        left, right = _numpy_band_pairs(signatures, *_bands(config.threshold, config.num_perm), within)
    else:
        left, right = _datasketch_band_pairs(signatures, config)
    jaccard = similarity(signatures, shingles, left, right, config)
    close = jaccard >= config.threshold
    return left[close], right[close], jaccard[close]


def similarity(signatures: np.ndarray, shingles: tuple[np.ndarray, np.ndarray] | Shingles | None,
               left: np.ndarray, right: np.ndarray, config: NearDedupConfig) -> np.ndarray:
    """Estimated Jaccard of each pair, exact for those within ``exact_margin`` of the threshold
    when the shingles are given."""
    jaccard = _estimated_jaccard(signatures, left, right)
    if shingles is not None and config.exact_margin > 0:
        unsure = np.flatnonzero(np.abs(jaccard - config.threshold) < config.exact_margin)
        exact = shingles.jaccard if isinstance(shingles, Shingles) else partial(exact_jaccard, *shingles)
        jaccard[unsure] = exact(left[unsure], right[unsure])
    return jaccard


def exact_jaccard(hashes: np.ndarray, offsets: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Jaccard of the shingle hash sets of each pair (left[i], right[i]).

    One sparse 0/1 row per text involved, the 32-bit hash as column: the intersection of a
    pair is the row-wise product of its two rows.
    """
    if left.size == 0:
        return np.empty(0, dtype=np.float64)
    docs, inverse = np.unique(np.concatenate([left, right]), return_inverse=True)
    counts = offsets[docs + 1] - offsets[docs]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    positions = np.arange(indptr[-1]) - np.repeat(indptr[:-1] - offsets[docs], counts)
    matrix = csr_matrix((np.ones(indptr[-1], dtype=np.float32), hashes[positions].astype(np.int64), indptr),
                        shape=(docs.size, 1 << 32))
    matrix.sum_duplicates()
    matrix.data[:] = 1
    sizes = np.diff(matrix.indptr)
    a, b = inverse[:left.size], inverse[left.size:]
    intersection = np.asarray(matrix[a].multiply(matrix[b]).sum(axis=1)).ravel()
    return intersection / (sizes[a] + sizes[b] - intersection)


def _numpy_band_pairs(signatures: np.ndarray, bands: int, rows: int,
                      within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = signatures.shape[0]
    found = []
    everyone = np.arange(n, dtype=np.int64)
    for band in range(bands):
        big, big_key = _bucket_pairs(_band_key(signatures, band, rows, np.uint64(band)), everyone, found)
        if big.size == 0:
            continue
        if within is None:
            _star(big, big_key, found)
            continue
        # Conversation mode: split each big bucket by the prompts' bands, so identical short
        # answers ("Thank you!") to different prompts do not all hang off one first member.
        for other in range(bands):
            big2, big2_key = _bucket_pairs(_band_key(within[big], other, rows, big_key), big, found)
            _star(big2, big2_key, found)
    if not found:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    pairs = np.concatenate(found, axis=1)
    low, high = np.minimum(pairs[0], pairs[1]), np.maximum(pairs[0], pairs[1])
    code = np.unique(low * n + high)
    return code // n, code % n


def _band_key(signatures: np.ndarray, band: int, rows: int, start: np.ndarray | np.uint64) -> np.ndarray:
    """One 64-bit key per row for its values in ``band`` (multiply-xor from ``start``). A rare
    collision only adds a candidate that verification then rejects."""
    key = np.zeros(signatures.shape[0], dtype=np.uint64) ^ start
    for column in signatures[:, band * rows:(band + 1) * rows].T:
        key = (key ^ column.astype(np.uint64)) * _BAND_MULTIPLIER
        key ^= key >> np.uint64(29)
    return key


def _bucket_pairs(key: np.ndarray, ids: np.ndarray, found: list) -> tuple[np.ndarray, np.ndarray]:
    """Append all pairs of ids sharing a key, for buckets of at most _BUCKET_ALL_PAIRS; return
    the members of bigger buckets (by bucket, lowest id first) and their keys."""
    order = np.argsort(key, kind="stable")  # ids are ascending: equal keys keep the lowest id first
    sorted_key = key[order]
    m = key.size
    new_group = np.ones(m, dtype=bool)
    new_group[1:] = sorted_key[1:] != sorted_key[:-1]
    group = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    size = np.diff(np.append(group_start, m))[group]
    position = np.arange(m) - group_start[group]
    # All pairs of a small bucket, as offsets d = 1..size-1 from each member.
    members = np.flatnonzero((size > 1) & (size <= _BUCKET_ALL_PAIRS))
    for d in range(1, int(size[members].max(initial=1))):
        members = members[position[members] + d < size[members]]
        if members.size == 0:
            break
        found.append(np.stack([ids[order[members]], ids[order[members + d]]]))
    big = np.flatnonzero(size > _BUCKET_ALL_PAIRS)
    return ids[order[big]], sorted_key[big]


def _star(members: np.ndarray, key: np.ndarray, found: list) -> None:
    """Pair every member of a big bucket (grouped, first member first) with its first member."""
    if members.size == 0:
        return
    first = np.ones(members.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    found.append(np.stack([members[np.flatnonzero(first)[np.cumsum(first) - 1]], members])[:, ~first])


def _datasketch_band_pairs(signatures: np.ndarray, config: NearDedupConfig) -> tuple[np.ndarray, np.ndarray]:
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
    return left_arr[order], right_arr[order]


def _lsh_index(config: NearDedupConfig) -> MinHashLSH:
    try:
        return MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, weights=_LSH_WEIGHTS)
    except ValueError as error:
        raise ValueError(f"near dedup cannot split num_perm={config.num_perm} into LSH bands for threshold="
                         f"{config.threshold} ({error}); raise num_perm or lower the threshold") from None


@lru_cache(maxsize=64)
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) exactly as datasketch's MinHashLSH picks them for our weights."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    return lsh.b, lsh.r


def cluster_keepers(n: int, left: np.ndarray, right: np.ndarray, pref: np.ndarray) -> np.ndarray:
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


def _word_hashes(words: pl.Series) -> np.ndarray:
    return np.array([xxhash.xxh64_intdigest(w.encode("utf-8", "surrogatepass")) for w in words.to_list()],
                    dtype=np.uint64)


def _fold32(values: np.ndarray) -> np.ndarray:
    return ((values >> np.uint64(32)) ^ values).astype(np.uint32)


def _identity(value: int) -> int:
    return value
