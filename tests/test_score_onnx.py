"""ONNX Runtime backend: the exported model scores real conversations as torch does (fp32), int8 keeps the
ranking, exports are made once and checked, and a missing onnxruntime is a one-line error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, \
    LlamaForSequenceClassification

from curation import onnx_scoring
from curation.hashing import stable_hash
from curation.score import DEFAULT_EMBEDDING_MODEL, ScoreConfig, resolve_model_path, score_records
from curation.stage import records_frame

pytest.importorskip("onnxruntime")
CHAT_TEMPLATE = "[CLS]{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokenizer(token_types: bool = True):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_EMBEDDING_MODEL))
    tokenizer.chat_template = CHAT_TEMPLATE
    if not token_types:  # a decoder takes no token type ids
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


@pytest.fixture(scope="module")
def encoder_model(tmp_path_factory) -> Path:
    """A tiny random BERT reward model (text pairs, token type ids), 1 label; weights drawn wider than BERT's
    default (std 0.2, not 0.02) so scores spread out (std ~0.7 on these rows) instead of all being about equal."""
    folder = tmp_path_factory.mktemp("onnx_bert")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        num_labels=1, vocab_size=tokenizer.vocab_size, max_position_embeddings=512, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder_model(tmp_path_factory) -> Path:
    """A tiny random Llama reward model (chat template, causal mask, last-token pooling), 2 labels."""
    folder = tmp_path_factory.mktemp("onnx_llama")
    tokenizer = _tokenizer(token_types=False)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=tokenizer.vocab_size, max_position_embeddings=512,
                         num_labels=2, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def real_frame(shared_data) -> pl.DataFrame:
    """60 real AlpacaEval answers from two models (short to far over 512 tokens) and a real multi-turn chat."""
    rows = []
    for model in ("gpt4_0613", "Meta-Llama-3-8B-Instruct"):
        with gzip.open(shared_data / "alpaca_eval" / "outputs" / f"{model}.json.gz") as handle:
            records = json.load(handle)[:30]
        rows += [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                 for r in records]
    chat = json.loads((shared_data / "fastchat" / "dummy_conversation.json").read_text())[2]
    roles = {"human": "user", "gpt": "assistant"}
    rows.append([{"role": roles[t["from"]], "content": t["value"]} for t in chat["conversations"]])
    return records_frame([{"id": f"r{i}", "messages": m, "source": "test", "source_file": "test",
                           "source_record": str(i), "source_sha256": "0" * 64, "format": "test", "kind": "conversation",
                           "content_hash": stable_hash(json.dumps(m))} for i, m in enumerate(rows)])


def _scores(frame: pl.DataFrame, **settings) -> np.ndarray:
    scored, _ = score_records(frame, ScoreConfig(batch_size=8, **settings))
    return scored["score"].to_numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731 - no ties in float scores
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


@pytest.mark.parametrize("input", ["text_pair", "chat_template"])
def test_onnx_fp32_matches_torch_and_int8_keeps_the_ranking(encoder_model, real_frame, tmp_path, input):
    torch_scores = _scores(real_frame, model=str(encoder_model), input=input)
    onnx_scores = _scores(real_frame, model=str(encoder_model), input=input, backend="onnx", cache_dir=str(tmp_path))
    assert np.isfinite(torch_scores).all() and torch_scores.std() > 0.1  # the scores are not all alike
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=0, atol=1e-4)
    int8 = _scores(real_frame, model=str(encoder_model), input=input, backend="onnx", quantize="int8",
                   cache_dir=str(tmp_path))
    assert not np.allclose(int8, torch_scores, rtol=0, atol=1e-6)  # really quantized
    assert _spearman(int8, torch_scores) >= 0.95


def test_decoder_reward_model_exports_with_its_pooling(decoder_model, real_frame):
    torch_scores = _scores(real_frame, model=str(decoder_model), max_length=256)
    onnx_scores = _scores(real_frame, model=str(decoder_model), max_length=256, backend="onnx")
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=0, atol=1e-4)
    second_label = _scores(real_frame.head(8), model=str(decoder_model), max_length=256, backend="onnx", label_index=0)
    assert not np.allclose(second_label, onnx_scores[:8])


def test_export_is_made_once_per_model_and_hashes_differ(encoder_model, real_frame, tmp_path, monkeypatch):
    exports = []
    original = torch.onnx.export

    def counting(*args, **kwargs):
        exports.append(kwargs.get("dynamo"))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", counting)
    frame = real_frame.head(10)
    hashes = set()
    for settings in ({"max_length": 128}, {"max_length": 256}, {"max_length": 256, "quantize": "int8"}):
        scored, info = score_records(frame, ScoreConfig(model=str(encoder_model), backend="onnx", cache_dir=str(tmp_path),
                                                        **settings))
        assert info.counts["computed"] == 10 and info.settings["backend"] == "onnx"
        hashes.add(info.model_hash)
    _, torch_info = score_records(frame, ScoreConfig(model=str(encoder_model), max_length=128, cache_dir=str(tmp_path)))
    hashes.add(torch_info.model_hash)
    assert len(hashes) == 4  # backend and quantization are part of the model hash
    assert exports == [False]  # one export, reused for other settings and for the int8 variant
    exported = {p.relative_to(tmp_path / "onnx").parent.name for p in (tmp_path / "onnx").rglob("*.onnx")}
    assert len(exported) == 2 and {f"{name}-int8" for name in exported} & exported


def test_threads_set_onnx_runtime_intra_op_threads(encoder_model, tmp_path):
    config = ScoreConfig(model=str(encoder_model), backend="onnx", threads=2, cache_dir=str(tmp_path))
    score_records(records_frame([]), config)  # nothing to score: nothing exported
    assert not (tmp_path / "onnx").exists()
    from curation.score import _RewardModel

    scorer = _RewardModel(encoder_model, config)
    scorer._load()
    path = next((tmp_path / "onnx").rglob("model.onnx"))
    session = onnx_scoring.OnnxClassifier(path, threads=2).session
    assert session.get_session_options().intra_op_num_threads == 2
    assert onnx_scoring.OnnxClassifier(path, threads=None).session.get_session_options().intra_op_num_threads == 0


def test_an_export_that_does_not_reproduce_torch_is_refused(encoder_model, tmp_path):
    """Every export is run against torch on a batch of another shape and padding than the traced one."""
    model = BertForSequenceClassification.from_pretrained(encoder_model).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    onnx_scoring._export(model, names, tmp_path / "model.onnx")  # passes its own check
    with torch.no_grad():
        model.classifier.bias += 0.5  # the graph no longer matches the model
    with pytest.raises(ValueError, match="backend: torch") as error:
        onnx_scoring._check(model, names, tmp_path / "model.onnx")
    assert "\n" not in str(error.value)


def test_config_rules_and_missing_onnxruntime(encoder_model, monkeypatch):
    with pytest.raises(ValidationError, match="backend: onnx"):
        ScoreConfig(model="x", quantize="int8")
    with pytest.raises(ValidationError, match="bfloat16"):
        ScoreConfig(model="x", backend="onnx", dtype="bfloat16")
    with pytest.raises(ValidationError, match="reward_model"):
        ScoreConfig(model="x", kind="embedding_similarity", backend="onnx")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install") as error:
        score_records(records_frame([]), ScoreConfig(model=str(encoder_model), backend="onnx"))
    assert "\n" not in str(error.value) and "onnxruntime" in str(error.value)
