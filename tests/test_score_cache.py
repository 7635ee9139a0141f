"""Score cache: a rebuild scores nothing twice; any change to the model files or to a setting that changes the
numbers is a new model hash. A tiny random reward model with the real MiniLM tokenizer, on real AlpacaEval rows."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from curation.hashing import stable_hash
from curation.score import DEFAULT_EMBEDDING_MODEL, ScoreConfig, resolve_model_path, score_records
from curation.score_cache import ScoreCache, model_hash, resolve_cache_dir
from curation.stage import records_frame

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Rejects multi-turn conversations, so one real row is unscorable (NaN), which must be cached too.
TWO_TURN_TEMPLATE = ("{% if messages|length > 2 %}{{ raise_exception('two turns only') }}{% endif %}"
                     "[CLS]{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_model(folder: Path, seed: int) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_EMBEDDING_MODEL))
    tokenizer.chat_template = TWO_TURN_TEMPLATE
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        num_labels=1, vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("cache_rm"), seed=0)


def _row(source: str, record: str, messages: list[dict], kind: str = "conversation") -> dict:
    serial = "\n".join(f"{m['role']}\n{len(m['content'])}\n{m['content']}" for m in messages)
    return {"id": stable_hash(f"{source}\x1f{record}")[:24], "messages": messages, "source": source,
            "source_file": "test", "source_record": record, "source_sha256": "0" * 64, "format": "test",
            "kind": kind, "content_hash": stable_hash(serial)}


@pytest.fixture(scope="module")
def real_frame(shared_data) -> pl.DataFrame:
    """30 real AlpacaEval answers, the same 30 collected again from another source, a real multi-turn chat the
    template rejects, and a benchmark prompt (never scored)."""
    with gzip.open(shared_data / "alpaca_eval" / "outputs" / "gpt4_0613.json.gz") as handle:
        records = json.load(handle)[:30]
    rows = []
    for source in ("alpaca_eval", "copy"):
        rows += [_row(source, f"index:{i}", [{"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["output"]}])
                 for i, r in enumerate(records)]
    chat = json.loads((shared_data / "fastchat" / "dummy_conversation.json").read_text())[2]
    roles = {"human": "user", "gpt": "assistant"}
    rows.append(_row("fastchat", "index:2", [{"role": roles[t["from"]], "content": t["value"]}
                                            for t in chat["conversations"]]))
    question = json.loads((shared_data / "fastchat" / "vicuna_bench_question.jsonl").read_text().splitlines()[0])
    rows.append(_row("vicuna_bench", "line:1", [{"role": "user", "content": question["turns"][0]}], kind="prompt"))
    return records_frame(rows)


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Sequences that went through the model's forward pass (and model loads, as -1)."""
    calls = []
    forward = BertForSequenceClassification.forward

    def counting(self, input_ids=None, **kwargs):
        calls.append(input_ids.shape[0])
        return forward(self, input_ids=input_ids, **kwargs)
    monkeypatch.setattr(BertForSequenceClassification, "forward", counting)
    load = AutoModelForSequenceClassification.from_pretrained.__func__

    def loading(cls, *args, **kwargs):
        calls.append(-1)
        return load(cls, *args, **kwargs)
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(loading))
    return calls


def _score(frame: pl.DataFrame, config: ScoreConfig):
    totals: list[int] = []
    scored, info = score_records(frame, config, on_total=totals.append)
    return scored, info, totals


def test_a_cached_rebuild_scores_nothing_twice(reward_model, real_frame, tmp_path, forward_calls):
    config = ScoreConfig(model=str(reward_model), cache_dir=str(tmp_path / "cache"), batch_size=8)
    distinct = 31  # 30 answers (each twice) + the multi-turn chat
    first, info, totals = _score(real_frame, config)
    assert info.counts == {"distinct": distinct, "cached": 0, "computed": distinct} and totals == [distinct]
    assert sum(n for n in forward_calls if n > 0) == distinct - 1  # the rejected chat never reaches the model
    assert first["score"].null_count() == 2  # the prompt row and the unscorable chat

    forward_calls.clear()
    again, info_again, totals = _score(real_frame, config)
    assert info_again.counts == {"distinct": distinct, "cached": distinct, "computed": 0} and totals == [0]
    assert forward_calls == []  # not even loaded
    assert again.equals(first)
    assert info_again.model_hash == info.model_hash and len(list((tmp_path / "cache" / info.model_hash)
                                                                 .glob("scores-*.parquet"))) == 1

    # only new content is computed; the cache answers for the rest
    extra = real_frame.head(5).with_columns(pl.col("id") + "x",
                                            pl.col("messages").list.eval(pl.struct(
                                                pl.element().struct.field("role"),
                                                pl.element().struct.field("content") + " (edited)")),
                                            pl.col("content_hash") + "-edited")
    forward_calls.clear()
    grown, info_grown, totals = _score(pl.concat([real_frame, extra]), config)
    assert info_grown.counts == {"distinct": distinct + 5, "cached": distinct, "computed": 5} and totals == [5]
    assert sum(n for n in forward_calls if n > 0) == 5
    assert grown.head(real_frame.height).equals(first)

    # batch size and threads do not change the numbers beyond rounding: same hash, nothing recomputed
    _, info_batch, _ = _score(real_frame, config.model_copy(update={"batch_size": 3, "threads": 1}))
    assert info_batch.counts["computed"] == 0

    # the same model files in another folder share the cache
    moved = tmp_path / "moved"
    shutil.copytree(reward_model, moved)
    _, info_moved, _ = _score(real_frame, config.model_copy(update={"model": str(moved)}))
    assert info_moved.model_hash == info.model_hash and info_moved.counts["computed"] == 0


def test_settings_and_weights_change_the_model_hash(reward_model, real_frame, tmp_path):
    config = ScoreConfig(model=str(reward_model), cache_dir=str(tmp_path), batch_size=16)
    base, info, _ = _score(real_frame, config)
    hashes = {info.model_hash}
    explicit_defaults = config.model_copy(update={"max_length": 512, "input": "chat_template"})
    _, same, _ = _score(real_frame, explicit_defaults)  # the resolved settings are hashed, not how they were given
    assert same.model_hash == info.model_hash and same.counts["computed"] == 0
    for update in ({"max_length": 128}, {"input": "text_pair"}, {"dtype": "bfloat16"}, {"label_index": 0}):
        scored, other, _ = _score(real_frame, config.model_copy(update=update))
        assert other.model_hash not in hashes, update
        assert other.counts["computed"] == other.counts["distinct"] == 31, update
        hashes.add(other.model_hash)
        if update != {"label_index": 0}:  # label 0 is the default of a 1-label model: same numbers
            assert not scored["score"].equals(base["score"]), update

    retrained = _tiny_model(tmp_path / "retrained", seed=1)  # same tokenizer and config, other weights
    scored, other, _ = _score(real_frame, config.model_copy(update={"model": str(retrained)}))
    assert other.model_hash not in hashes and other.counts["computed"] == 31
    assert not np.allclose(scored["score"].drop_nulls().to_numpy(), base["score"].drop_nulls().to_numpy())

    settings_file = tmp_path / "retrained" / "reward_scoring.json"  # a loaded file: part of the hash
    settings_file.write_text(json.dumps({"input": "text_pair"}))
    _, with_settings, _ = _score(real_frame, config.model_copy(update={"model": str(retrained)}))
    assert with_settings.model_hash != other.model_hash and with_settings.settings["input"] == "text_pair"


def test_shards_are_unique_and_damaged_ones_are_skipped(tmp_path, caplog):
    key = model_hash({"model.safetensors": "0" * 64}, {"kind": "reward_model"})
    first = ScoreCache(tmp_path, key, {"note": "test"})
    second = ScoreCache(tmp_path, key)  # e.g. a concurrent build
    a = first.store(["h1", "h2"], np.array([1.0, np.nan]))
    b = second.store(["h2", "h3"], np.array([np.nan, 3.0]))
    assert a != b and a.parent == b.parent == tmp_path / key
    assert json.loads((tmp_path / key / "model.json").read_text()) == {"note": "test"}
    assert not list((tmp_path / key).glob(".tmp-*"))  # temp files are renamed into place
    found = first.lookup(pl.Series(["h1", "h2", "h3", "h4"])).sort("content_hash")
    assert found["content_hash"].to_list() == ["h1", "h2", "h3"]
    np.testing.assert_array_equal(found["score"].to_numpy(), [1.0, np.nan, 3.0])

    (tmp_path / key / "scores-broken.parquet").write_bytes(b"PAR1 not really")
    assert first.lookup(pl.Series(["h1", "h3"])).height == 2
    assert "unreadable shard" in caplog.text
    assert first.store([], np.array([])) is None


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("CURATION_CACHE", raising=False)
    assert resolve_cache_dir(None, tmp_path) is None
    monkeypatch.setenv("CURATION_CACHE", str(tmp_path / "root"))
    assert resolve_cache_dir(None, tmp_path) == tmp_path / "root" / "scores"
    assert resolve_cache_dir("cache", tmp_path) == tmp_path / "cache"
    assert resolve_cache_dir("$CURATION_CACHE/mine", tmp_path) == tmp_path / "root" / "mine"
    assert resolve_cache_dir("~/scores", tmp_path) == Path.home() / "scores"


def test_a_cached_rebuild_through_the_flow(tmp_path):
    """The demo recipe with a score cache, built twice: the second build computes no score and writes the same data."""
    from curation.cli import main

    recipe = yaml.safe_load((PROJECT_ROOT / "recipes" / "demo.yaml").read_text())
    for source in recipe["sources"]:
        source["path"] = str((PROJECT_ROOT / "recipes" / source["path"]).resolve())
    if recipe["score"]["model"].startswith("."):
        recipe["score"]["model"] = str((PROJECT_ROOT / "recipes" / recipe["score"]["model"]).resolve())
    recipe["semantic_dedup"]["enabled"] = False  # not what is tested here, and it loads a second model
    recipe["score"]["cache_dir"] = "score-cache"  # relative: resolves against the recipe's folder
    path = tmp_path / "demo_cached.yaml"
    path.write_text(yaml.safe_dump(recipe))
    manifests, sft = [], []
    for run in ("first", "second"):
        assert main(["build", str(path), "--out", str(tmp_path / run), "--quiet"]) == 0
        manifests.append(json.loads((tmp_path / run / "manifest.json").read_text()))
        sft.append(pl.read_parquet(tmp_path / run / "sft" / "*.parquet").sort("id"))
    first, second = (m["stages"]["score"] for m in manifests)
    assert first["cache_dir"] == second["cache_dir"] == str(tmp_path / "score-cache")
    assert first["computed"] == first["distinct_contents"] > 100 and first["cached"] == 0
    assert second["computed"] == 0 and second["cached"] == first["distinct_contents"]
    assert first["model_hash"] == second["model_hash"] == manifests[0]["models"][0]["model_hash"]
    assert "counts" not in manifests[0]["models"][0]
    assert sft[0].select("id", "score").equals(sft[1].select("id", "score")) and sft[0]["score"].null_count() == 0
