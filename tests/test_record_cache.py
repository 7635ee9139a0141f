"""Record cache: values round-trip exactly, shards are safe to write concurrently, damaged shards are skipped, a
changed config never hits; and each cached stage gives exactly what it gives without a cache, on real rows."""

from __future__ import annotations

import gzip
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest

from curation.dedup import DedupConfig, NearDedupConfig, dedup_texts, deduplicate, sketch
from curation.filters import FilterConfig, filter_records
from curation.hashing import hash_column, stable_hash
from curation.normalize import NormalizeConfig, normalize
from curation.record_cache import KEY, RecordCache, RecordCaches
from curation.stage import records_frame

# near-copies (the two gpt4_0613), empty answers (gemma-2b-it), AI disclaimers (falcon), repetition and
# non-English answers (phi-2-sft) in the first 120 records
MODELS = ("gpt4_0613", "gpt4_0613_concise", "gemma-2b-it", "falcon-40b-instruct", "phi-2-sft")
SIGNATURE = {"signature": pl.Array(pl.UInt32, 128)}


@pytest.fixture(scope="module")
def answers(shared_data) -> list[dict]:
    """The first 120 real AlpacaEval records of each of MODELS."""
    rows = []
    for model in MODELS:
        with gzip.open(shared_data / "alpaca_eval" / "outputs" / f"{model}.json.gz") as handle:
            rows += [dict(r, model=model, index=i) for i, r in enumerate(json.load(handle)[:120])]
    return rows


@pytest.fixture(scope="module")
def raw(answers, shared_data) -> pl.DataFrame:
    """Rows as the readers give them, before normalisation: the AlpacaEval answers, and FastChat's ShareGPT
    sample (multi-turn, almost all exact and near duplicates by design)."""
    def row(source: str, index: int, messages: list[dict]) -> dict:
        return {"id": stable_hash(f"{source}\x1f{index}")[:24], "source": source, "source_file": f"{source}.json",
                "source_record": f"index:{index}", "source_sha256": "0" * 64, "format": "test", "kind": "conversation",
                "messages": messages}

    rows = [row(r["model"], r["index"], [{"role": "user", "content": r["instruction"]},
                                         {"role": "assistant", "content": r["output"]}]) for r in answers]
    roles = {"human": "user", "gpt": "assistant"}
    chats = json.loads((shared_data / "fastchat" / "dummy_conversation.json").read_text())
    rows += [row("sharegpt", i, [{"role": roles.get(t["from"], t["from"]), "content": t["value"]}
                                 for t in chat["conversations"]]) for i, chat in enumerate(chats)]
    return records_frame(rows)


def _values(answers: list[dict]) -> pl.DataFrame:
    """Real texts with scalar, list and vector values: a language-like pair, a MinHash signature, a unit vector."""
    texts = pl.Series([r["output"] for r in answers[:50]])
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(texts), 8)).astype(np.float32)
    return pl.DataFrame({
        KEY: hash_column(texts), "language": ["en"] * len(texts), "score": np.linspace(0, 1, len(texts)),
        "signature": pl.Series(sketch(texts, NearDedupConfig()).signatures),
        "vector": pl.Series(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).cast(pl.List(pl.Float32)),
    }).unique(KEY, maintain_order=True)


VALUES = {"language": pl.String, "score": pl.Float64, **SIGNATURE, "vector": pl.List(pl.Float32)}


def test_round_trip_of_scalars_lists_and_vectors(answers, tmp_path):
    frame = _values(answers)
    cache = RecordCache(tmp_path, "demo", {"threshold": 0.5}, "m" * 64, values=VALUES)
    assert cache.lookup(frame[KEY]).is_empty() and cache.hits == 0
    cache.store(frame.head(30))
    found = cache.lookup(pl.concat([frame[KEY], pl.Series(["not cached"])]))
    assert cache.hits == 30 and cache.computed == 30
    assert found.schema == pl.Schema({KEY: pl.String, **VALUES})
    assert found.sort(KEY).equals(frame.head(30).sort(KEY))  # bit-exact: floats, uint32 signatures, float32 vectors
    about = json.loads((cache.folder / "stage.json").read_text())
    assert about["stage"] == "demo" and about["config"] == {"threshold": 0.5} and about["model_hash"] == "m" * 64
    assert cache.store(frame.clear()) is None
    with pytest.raises(ValueError, match="without column"):
        cache.store(frame.drop("vector"))


def test_concurrent_writers_never_clash_and_the_oldest_entry_wins(answers, tmp_path):
    frame = _values(answers)
    writers = [RecordCache(tmp_path, "demo", {"threshold": 0.5}, values=VALUES) for _ in range(8)]
    assert len({w.folder for w in writers}) == 1
    # eight builds storing at once, each its own slice plus the first row with a different score
    parts = [pl.concat([frame.slice(6 * i, 6), frame.head(1).with_columns(score=pl.lit(float(i + 10)))])
             for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda pair: pair[0].store(pair[1]), zip(writers, parts)))
    assert len(set(paths)) == 8 and all(p.parent == writers[0].folder for p in paths)
    assert not list(writers[0].folder.glob(".tmp-*")), "temporary files are renamed into place"
    found = writers[0].lookup(frame[KEY])
    assert found.height == 48
    first_key = pl.col(KEY) == frame[KEY][0]
    in_age_order = pl.concat([pl.read_parquet(p) for p in sorted(paths)]).filter(first_key)["score"]
    assert in_age_order.n_unique() > 1  # the key was stored with different values
    assert found.filter(first_key)["score"].item() == in_age_order[0]
    assert writers[0].entries().filter(first_key)["score"].item() == in_age_order[0]
    # a later store of a cached key never changes its value
    writers[0].store(frame.head(1).with_columns(score=pl.lit(99.0)))
    assert writers[0].lookup(frame[KEY].head(1))["score"].item() != 99.0
    assert writers[0].entries(keep="last").filter(first_key)["score"].item() == 99.0


def test_unreadable_or_foreign_shards_are_skipped_with_a_warning(answers, tmp_path, caplog):
    frame = _values(answers)
    cache = RecordCache(tmp_path, "demo", {}, values=VALUES)
    cache.store(frame.head(10))
    (cache.folder / "part-00000000T000000-broken.parquet").write_bytes(b"PAR1 cut off by a full disk")
    frame.head(5).drop("vector").write_parquet(cache.folder / "part-00000000T000001-foreign.parquet")
    (cache.folder / ".tmp-in-progress.parquet").write_bytes(b"half a shard")  # a writer still at work
    with caplog.at_level(logging.WARNING):
        found = cache.lookup(frame[KEY])
    assert found.height == 10 and found.sort(KEY).equals(frame.head(10).sort(KEY))
    assert caplog.text.count("skipping unreadable shard") == 2 and ".tmp-in-progress" not in caplog.text


def test_a_changed_config_model_or_value_type_never_hits(answers, tmp_path):
    frame = _values(answers).select(KEY, "score")
    values = {"score": pl.Float64}
    RecordCache(tmp_path, "demo", {"a": 1, "b": [1, 2]}, "m1", values=values).store(frame)
    same = RecordCache(tmp_path, "demo", {"b": [1, 2], "a": 1}, "m1", values=values)  # key order does not matter
    assert same.lookup(frame[KEY]).height == frame.height
    for other in (RecordCache(tmp_path, "demo", {"a": 2, "b": [1, 2]}, "m1", values=values),
                  RecordCache(tmp_path, "demo", {"a": 1, "b": [1, 2]}, "m2", values=values),
                  RecordCache(tmp_path, "demo", {"a": 1, "b": [1, 2]}, None, values=values),
                  RecordCache(tmp_path, "other", {"a": 1, "b": [1, 2]}, "m1", values=values),
                  RecordCache(tmp_path, "demo", {"a": 1, "b": [1, 2]}, "m1", values={"score": pl.Float32})):
        assert other.folder != same.folder and other.lookup(frame[KEY]).is_empty()


def test_stats_sum_the_caches_of_a_stage(answers, tmp_path):
    frame = _values(answers).select(KEY, "score")
    caches = RecordCaches(tmp_path)
    first = caches.open("demo", {"part": 1}, values={"score": pl.Float64})
    second = caches.open("demo", {"part": 2}, values={"score": pl.Float64})
    first.store(frame.head(10))
    second.store(frame.head(4))
    first.lookup(frame[KEY])
    stats = caches.stats()["demo"]
    assert (stats["hits"], stats["computed"]) == (10, 14) and stats["keys"] == [first.key, second.key]


# ---------------------------------------------------------------- cached stages equal uncached ones


def test_normalize_with_a_cache_equals_normalize_without(raw, tmp_path):
    config = NormalizeConfig()
    plain = normalize(raw, config)
    assert plain.rejected.height >= 2  # gemma-2b-it's empty answers
    for run in ("cold", "warm"):
        caches = RecordCaches(tmp_path)
        cached = normalize(raw, config, caches)
        assert cached.kept.equals(plain.kept) and cached.rejected.equals(plain.rejected), run
        stats = caches.stats()["normalize"]
        distinct = raw.select(pl.struct("kind", "messages").n_unique()).item()
        assert (stats["hits"], stats["computed"]) == ((0, distinct) if run == "cold" else (distinct, 0)), run
    # another config is another cache
    caches = RecordCaches(tmp_path)
    normalize(raw, config.model_copy(update={"html_to_markdown": False}), caches)
    assert caches.stats()["normalize"]["hits"] == 0


def test_filter_with_a_cache_equals_filter_without(raw, tmp_path):
    rows = normalize(raw, NormalizeConfig()).kept
    config = FilterConfig()
    overrides = {"falcon-40b-instruct": FilterConfig.model_validate({"truncation": {"enabled": False}})}
    plain = filter_records(rows, config, overrides)
    assert {"ai_disclaimer", "language", "duplicate_lines"} <= set(plain.reasons)
    assert plain.values.height > 0 and plain.kept["language"].null_count() < rows.height
    for run in ("cold", "warm"):
        caches = RecordCaches(tmp_path)
        cached = filter_records(rows, config, overrides, caches)
        assert cached.kept.equals(plain.kept) and cached.rejected.equals(plain.rejected), run
        assert cached.values.equals(plain.values), run
        stats = caches.stats()["filter"]
        assert len(stats["keys"]) == 2  # the override's config is its own cache
        assert (stats["computed"] == 0) == (run == "warm") and stats["hits"] + stats["computed"] > 0, run
    # a changed rule never reuses a verdict
    caches = RecordCaches(tmp_path)
    stricter = config.model_copy(update={"length": config.length.model_copy(update={"min_answer_words": 400})})
    assert filter_records(rows, stricter, overrides, caches).rejected.height > plain.rejected.height
    assert caches.stats()["filter"]["computed"] > 0


@pytest.mark.parametrize("field", ["conversation", "text"])
def test_dedup_with_a_cache_equals_dedup_without(raw, tmp_path, field):
    rows = normalize(raw, NormalizeConfig()).kept
    copies = rows.filter(pl.col("source") == "gemma-2b-it").with_columns(id=pl.col("id") + "-copy",
                                                                          source=pl.lit("copy"))
    rows = pl.concat([rows, copies])  # what the AlpacaEval annotations do: the same answers again
    config = DedupConfig(near=NearDedupConfig(field=field, threshold=0.7), source_priority=["gpt4_0613_concise"])
    plain = deduplicate(rows, config)
    assert {"exact_duplicate", "near_duplicate"} <= set(plain.reasons)
    for run in ("cold", "warm"):
        caches = RecordCaches(tmp_path)
        cached = deduplicate(rows, config, caches, dataset="test")
        assert cached.kept.equals(plain.kept) and cached.rejected.equals(plain.rejected), run
        signatures = caches.stats()["minhash"]
        assert (signatures["computed"] == 0) == (run == "warm"), run
    texts = dedup_texts(rows, "answer" if field == "conversation" else field)
    assert signatures["hits"] >= texts.n_unique()  # conversation mode: prompts too, in the same cache


def test_semantic_dedup_with_a_cache_equals_semantic_dedup_without(raw, tmp_path):
    """Embeddings are cached by text; unpadded batches make a cached vector equal a fresh one, whatever else
    was embedded with it (padded batches move bfloat16 vectors by up to ~1e-3)."""
    from curation.score import model_folder
    from curation.semantic_dedup import SemanticDedupConfig, embed_distinct, semantic_deduplicate

    rows = normalize(raw, NormalizeConfig()).kept
    rows = pl.concat([rows.filter(pl.col("source") == "sharegpt").head(60),
                      rows.filter(pl.col("source").str.starts_with("gpt4_0613")).head(60)])
    config = SemanticDedupConfig(enabled=True, threshold=0.9)
    plain, info = semantic_deduplicate(rows, config)
    assert plain.reasons.get("semantic_duplicate", 0) > 0
    for run in ("cold", "warm"):
        caches = RecordCaches(tmp_path)
        (cached, cached_info) = semantic_deduplicate(rows, config, cache=caches)
        assert cached.kept.equals(plain.kept) and cached.rejected.equals(plain.rejected) and cached_info == info, run
        stats = caches.stats()["embedding"]
        assert (stats["computed"] == 0) == (run == "warm") and stats["hits"] + stats["computed"] > 0, run

    texts = dedup_texts(rows, "answer")
    folder = model_folder(config.model)
    (alone,), _ = embed_distinct([texts.head(20)], folder, config)
    (among,), _ = embed_distinct([texts], folder, config)
    assert np.array_equal(alone, among[:20])
