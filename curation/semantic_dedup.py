"""Semantic dedup stage: drop conversations that say the same thing in different words.

MinHash near dedup only sees shared word n-grams, so a paraphrase ("I'm Vicuna, a model
trained by LMSYS" / "My name is Vicuna, and I was trained by LMSYS") survives it. This stage
compares sentence embeddings instead. Embedding costs time (a forward pass per distinct
text), so the stage is off until a recipe enables it.

Past a few thousand rows all-pairs cosine is too slow, so the search is approximate, in the
way of an IVF index: spherical k-means splits the unit vectors into ``clusters`` partitions
and each row is compared exactly (blocked matrix products, bounded memory) only with the
rows of the ``probe`` partitions whose centroids are nearest to it. A duplicate pair is
missed only when neither row has the other's partition among its ``probe`` nearest: pairs
at cosine >= 0.9 sit almost always in the same or a neighbouring partition. On 600 real
AlpacaEval answers (24 partitions) probe=1 finds 98-99% of the brute-force pairs at
cosine >= 0.85/0.9 and probe=2 all of them; tests require >= 95%. Raise ``probe`` for
recall, or set ``clusters: 1`` for exact all-pairs search. Cost is about
probe * n * n / clusters dot products, i.e. probe * n^1.5 with the default sqrt(n) clusters;
similarity blocks are bounded, but the candidate pairs are held in memory (a clique of m
near-identical rows yields m^2 / 2 of them).

Keepers follow ``curation.dedup.keep_order``, the same total order as exact and near dedup,
so all stages agree which copy survives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from curation.dedup import DedupConfig, cluster_keepers, dedup_texts, keep_order
from curation.embeddings import SentenceEmbedder
from curation.hashing import hash_column
from curation.record_cache import KEY, RecordCache, RecordCaches
from curation.score import DEFAULT_EMBEDDING_MODEL, PACKAGE_PREFIX, loaded_files, model_folder
from curation.score_cache import model_hash
from curation.stage import StageResult, empty_rejections, rejections

STAGE = "semantic_dedup"
REASON = "semantic_duplicate"
EMBEDDING_STAGE = "embedding"  # record cache of unit vectors, keyed by text
VECTOR = pl.List(pl.Float32)
# Bump when the code changes a text's vector for the same model and settings.
CACHE_VERSION = 1
_BLOCK = 2048  # rows per side of one similarity block: 2048 x 2048 float32 = 16 MB
_KMEANS_ITERATIONS = 10
_TRAIN_PER_CLUSTER = 256  # k-means training rows per centroid (faiss uses the same cap)
_SEARCH_SLACK = 1e-6  # float32 rounding room when the concatenated vector stands in for both cosines


class SemanticDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="run semantic dedup (embeds every distinct conversation text: costs time)")
    model: str = Field(DEFAULT_EMBEDDING_MODEL,
                       description=f"sentence-transformers model: Hugging Face id, local folder, or "
                                   f"'{PACKAGE_PREFIX}<module>' for a model shipped in an installed package")
    threshold: float = Field(0.95, gt=0.0, le=1.0,
                             description="cosine similarity at or above which two rows are semantic duplicates")
    field: Literal["conversation", "prompt", "answer"] = Field(
        "conversation",
        description="'conversation': prompt AND final answer embeddings each at or above the threshold (different "
                    "answers to one prompt are not duplicates); 'prompt' or 'answer' alone")
    max_length: int = Field(128, ge=8, le=8192,
                            description="tokens embedded per text, capped at the model's limit; longer texts are "
                                        "compared on their opening only (MiniLM was trained on 128)")
    batch_size: int = Field(64, ge=1, le=4096, description="texts per forward pass (texts are batched by length)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="compute precision; bfloat16 autocast is ~2.5x faster on CPU for MiniLM")
    device: str = Field("cpu", description="torch device, e.g. 'cpu' or 'cuda:0'")
    clusters: int | None = Field(None, ge=1, description="k-means partitions for the candidate search; default "
                                                         "round(sqrt(rows)); 1 = exact all-pairs search")
    probe: int = Field(2, ge=1, description="partitions searched per row (its nearest centroids, its own included); "
                                            "more: higher recall, slower")
    seed: int = Field(0, ge=0, description="k-means initialisation seed; results are identical for a fixed seed")
    keep: Literal["score", "rule"] = Field(
        "rule", description="'rule': keep by source priority, rank, answer length, id; 'score': best score first, then the rule")
    source_priority: list[str] = Field(default_factory=list,
                                       description="source names, earlier wins ties under the rule; unlisted sources come after")


def semantic_deduplicate(records: pl.DataFrame, config: SemanticDedupConfig,
                         progress: Callable[[int], None] | None = None,
                         cache: RecordCaches | None = None) -> tuple[StageResult, dict]:
    """Reject conversations whose embeddings are within ``threshold`` of a preferred row's.

    Prompt rows pass through. Kept rows of a semantic cluster with more than one member get
    ``dup_cluster`` = their own id; other rows keep the ``dup_cluster`` they came with.
    ``progress`` is called with the number of distinct texts embedded in each batch. Returns
    the result and, for the manifest, the model, the sha256 of every file loaded and the
    search parameters used (empty when the stage is disabled). With ``cache``, embeddings are
    cached by text, model files, max_length and dtype: a rebuild embeds only new texts.
    """
    if "dup_cluster" not in records.columns:
        records = records.with_columns(pl.lit(None, dtype=pl.String).alias("dup_cluster"))
    if not config.enabled:
        return StageResult(records, empty_rejections()), {}
    folder = model_folder(config.model)
    info = {"model": config.model, "files": loaded_files(folder), "threshold": config.threshold, "field": config.field,
            "probe": config.probe, "seed": config.seed, "clusters": 0, "embedded_texts": 0, "pairs": 0}
    n = records.height
    rows = np.flatnonzero((records["kind"] == "conversation").to_numpy())
    if rows.size < 2:
        return StageResult(records, empty_rejections()), info

    frame = records[rows]
    fields = ["prompt", "answer"] if config.field == "conversation" else [config.field]
    texts = [dedup_texts(frame, f) for f in fields]
    store = None
    if cache is not None:
        store = cache.open(EMBEDDING_STAGE, {"version": CACHE_VERSION, "max_length": config.max_length,
                                             "dtype": config.dtype, "device": config.device.split(":")[0]},
                           model_hash(info["files"], {"kind": "sentence_embedding"}), values={"vector": VECTOR})
    vectors, embedded = embed_distinct(texts, folder, config, progress, store)
    info["embedded_texts"] = embedded
    # Conversation mode searches the concatenation [prompt, answer] / sqrt(2): its cosine is the mean of
    # the two cosines, so every pair with both >= threshold is found, then both are checked.
    search = vectors[0] if len(vectors) == 1 else np.hstack(vectors) / np.float32(np.sqrt(2.0))
    k = config.clusters or max(1, round(np.sqrt(rows.size)))
    info["clusters"] = min(k, rows.size)
    slack = _SEARCH_SLACK if len(vectors) > 1 else 0.0
    left, right = similar_pairs(search, config.threshold - slack, clusters=k, probe=config.probe, seed=config.seed)
    if len(vectors) > 1:
        both = np.ones(left.size, dtype=bool)
        for v in vectors:
            both &= _row_cosine(v, left, right) >= config.threshold
        left, right = left[both], right[both]
    info["pairs"] = int(left.size)

    pref = keep_order(records, DedupConfig(keep=config.keep, source_priority=config.source_priority))["_pref"].to_numpy()
    local = cluster_keepers(rows.size, left, right, pref[rows])
    rep = np.arange(n)
    rep[rows] = rows[local]
    kept_mask = rep == np.arange(n)
    in_cluster = np.bincount(rep, minlength=n)[rep] > 1
    ids = records["id"]
    kept = records.with_columns(
        pl.when(pl.Series(in_cluster)).then(ids.gather(rep)).otherwise(pl.col("dup_cluster"))
        .cast(pl.String).alias("dup_cluster")
    ).filter(pl.Series(kept_mask))

    moved = np.flatnonzero(local != np.arange(rows.size))
    if moved.size == 0:
        return StageResult(kept, empty_rejections()), info
    cosine = np.min([_row_cosine(v, moved, local[moved]) for v in vectors], axis=0)
    dropped = pl.DataFrame({"id": ids.gather(rows[moved]), "_kept": ids.gather(rows[local[moved]]),
                            "_cosine": cosine.astype(np.float64)})
    hundredths = (pl.col("_cosine").clip(-1.0, 1.0) * 100).round().cast(pl.Int64)
    sign = pl.when(hundredths < 0).then(pl.lit("-")).otherwise(pl.lit(""))
    measure = "min(prompt, answer) cosine" if config.field == "conversation" else "cosine"
    detail = pl.concat_str(
        pl.format(f"{measure}≈{{}}{{}}.{{}} with {{}}", sign, hundredths.abs() // 100,
                  (hundredths.abs() % 100).cast(pl.String).str.zfill(2), pl.col("_kept")),
        pl.when(pl.col("_cosine") < config.threshold).then(pl.lit(" (joined through other semantic duplicates)"))
        .otherwise(pl.lit("")),
    )
    return StageResult(kept, rejections(dropped, STAGE, REASON, detail=detail, duplicate_of=pl.col("_kept"))), info


def embed_distinct(texts: list[pl.Series], folder: Path, config: SemanticDedupConfig,
                   progress: Callable[[int], None] | None = None,
                   cache: RecordCache | None = None) -> tuple[list[np.ndarray], int]:
    """Unit embeddings aligned with each series of ``texts``; every distinct text is embedded once
    (with ``cache``: once across builds).

    Returns the vectors and the number of distinct texts.
    """
    combined = pl.concat(texts).rename("text")
    distinct = combined.unique(maintain_order=True)
    which = combined.replace_strict(distinct, pl.int_range(len(distinct), eager=True),
                                    return_dtype=pl.Int64).to_numpy()
    found = np.zeros(len(distinct), dtype=bool)
    if cache is not None:
        keys = hash_column(distinct).rename(KEY)
        hit = keys.to_frame().join(cache.lookup(keys), on=KEY, how="left", maintain_order="left")["vector"]
        found = hit.is_not_null().to_numpy()
    todo = np.flatnonzero(~found)
    computed = None
    if todo.size:
        embedder = SentenceEmbedder(folder, device=config.device, max_length=config.max_length,
                                    batch_size=config.batch_size, dtype=config.dtype)
        computed = embedder.embed(distinct.gather(todo).to_list(), progress or (lambda n: None))
        if cache is not None:
            cache.store(pl.DataFrame({KEY: keys.gather(todo), "vector": pl.Series(computed).cast(VECTOR)}))
    dim = computed.shape[1] if computed is not None else hit.list.len().max()
    unit = np.empty((len(distinct), dim), dtype=np.float32)
    if todo.size:
        unit[todo] = computed
    if found.any():
        unit[found] = hit.filter(pl.Series(found)).explode().to_numpy().reshape(-1, dim)
    out, start = [], 0
    for series in texts:
        out.append(unit[which[start:start + len(series)]])
        start += len(series)
    return out, len(distinct)


def similar_pairs(vectors: np.ndarray, threshold: float, clusters: int, probe: int = 2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (left < right, sorted) of unit vectors with cosine >= ``threshold``, searched per partition.

    Each row is compared with every row of the ``probe`` k-means partitions nearest to it,
    so with ``clusters=1`` (or probe >= clusters) this is exact all-pairs search.
    """
    n = vectors.shape[0]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = max(1, min(clusters, n))
    probe = min(probe, k)
    if k == 1:
        assign = np.zeros(n, dtype=np.int64)
        nearest = np.zeros((n, 1), dtype=np.int64)
    else:
        centroids = spherical_kmeans(vectors, k, seed)
        nearest = _top_centroids(vectors, centroids, probe)
        assign = nearest[:, 0]
    members_of = _inverted_lists(assign, np.arange(n), k)
    queries_of = _inverted_lists(nearest.ravel(), np.repeat(np.arange(n), probe), k)
    lefts, rights = [], []
    for members, queries in zip(members_of, queries_of):
        if members.size == 0:
            continue
        for q in _blocks(queries):
            for m in _blocks(members):
                sims = vectors[q] @ vectors[m].T
                i, j = np.nonzero(sims >= threshold)
                a, b = q[i], m[j]
                keep = a != b
                lefts.append(np.minimum(a[keep], b[keep]))
                rights.append(np.maximum(a[keep], b[keep]))
    if not lefts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    pairs = np.unique(np.stack([np.concatenate(lefts), np.concatenate(rights)], axis=1).astype(np.int64), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int, iterations: int = _KMEANS_ITERATIONS) -> np.ndarray:
    """k unit centroids by Lloyd iterations on cosine, initialised from k distinct rows chosen by ``seed``.

    Fitted on at most ``_TRAIN_PER_CLUSTER`` rows per centroid (a seeded sample): more rows
    barely move the centroids but cost iterations * rows * k dot products.
    """
    rng = np.random.default_rng(seed)
    if vectors.shape[0] > _TRAIN_PER_CLUSTER * k:
        vectors = vectors[np.sort(rng.choice(vectors.shape[0], size=_TRAIN_PER_CLUSTER * k, replace=False))]
    centroids = vectors[np.sort(rng.choice(vectors.shape[0], size=k, replace=False))].copy()
    for _ in range(iterations):
        assign = _top_centroids(vectors, centroids, 1)[:, 0]
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, vectors)
        norms = np.linalg.norm(sums, axis=1)
        filled = norms > 0  # an empty partition keeps its centroid
        updated = centroids.copy()
        updated[filled] = sums[filled] / norms[filled, None]
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _top_centroids(vectors: np.ndarray, centroids: np.ndarray, top: int) -> np.ndarray:
    """Indices of each row's ``top`` nearest centroids, nearest first (ties: lower index)."""
    out = np.empty((vectors.shape[0], top), dtype=np.int64)
    for rows in _blocks(np.arange(vectors.shape[0])):
        sims = vectors[rows] @ centroids.T
        out[rows] = np.argsort(-sims, axis=1, kind="stable")[:, :top]
    return out


def _inverted_lists(keys: np.ndarray, values: np.ndarray, k: int) -> list[np.ndarray]:
    """For each key 0..k-1, the values filed under it, in ascending order."""
    order = np.lexsort((values, keys))
    bounds = np.searchsorted(keys[order], np.arange(k + 1))
    return [values[order[bounds[c]:bounds[c + 1]]] for c in range(k)]


def _blocks(indices: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, indices.size, _BLOCK):
        yield indices[start:start + _BLOCK]


def _row_cosine(vectors: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", vectors[left], vectors[right])
