"""DPO, reward training, Ctrl-C + resume, stacking (init adapter, merge) and generation on the demo build, with tiny
random models built from configs (real tokenizers, offline)."""

import json
import math
import signal

import polars as pl
import pytest
import torch

from curation.cli import main
from curation.score import ScoreConfig, score_records
from curation.train import TrainConfig, load_preference_data, train_dpo, train_reward, train_sft
from curation.train import sft as sft_module
from curation.train.runner import TrainingInterrupted

FAST = dict(max_length=128, batch_size=4, logging_steps=1, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
            eval_fraction=0.1, max_eval_examples=8, save_steps=0)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with all-MiniLM-L6-v2's tokenizer: no chat template, so text pairs with token types."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from curation.score import DEFAULT_EMBEDDING_MODEL, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_EMBEDDING_MODEL))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _manifest(build) -> dict:
    return json.loads((build / "manifest.json").read_text())


def test_preference_data_is_the_builds_pairs(demo_build):
    data = load_preference_data(demo_build, eval_fraction=0.2, seed=1)
    frame = pl.read_parquet(sorted((demo_build / "preference").glob("*.parquet")))
    assert len(data.train) + len(data.eval) + data.skipped == frame.height
    row = data.train[0]
    assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
    assert row["prompt"][-1]["role"] == "user" and row["chosen"] != row["rejected"]
    native = load_preference_data(demo_build, eval_fraction=0.0, pair_sources=["native"])
    assert 0 < len(native.train) < len(data.train) + len(data.eval)


def test_source_weights_repeat_or_subsample_training_pairs_only(demo_build):
    plain = load_preference_data(demo_build, eval_fraction=0.2, seed=1)
    weighted = load_preference_data(demo_build, eval_fraction=0.2, seed=1,
                                    source_weights={"hh_harmless": 3, "alpaca_eval_judgements": 0.5})
    count = lambda rows, source: sum(r["source"] == source for r in rows)  # noqa: E731
    assert count(weighted.train, "hh_harmless") == 3 * count(plain.train, "hh_harmless") > 0
    judged = count(plain.train, "alpaca_eval_judgements")
    assert 0.2 * judged < count(weighted.train, "alpaca_eval_judgements") < 0.8 * judged
    assert count(weighted.train, "oasst") == count(plain.train, "oasst")
    assert weighted.eval == plain.eval
    with pytest.raises(ValueError, match="not a source"):
        load_preference_data(demo_build, source_weights={"hh": 2})


def test_dpo_trains_an_adapter_against_the_initial_model(demo_build, tiny_base, tmp_path):
    out = tmp_path / "dpo"
    metrics = train_dpo(demo_build, tiny_base, out, TrainConfig(max_steps=4, learning_rate=5e-3, **FAST))
    # Before training the policy is the reference: every implicit reward is 0 and the DPO loss is ln 2.
    assert metrics["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["eval_loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert len(metrics["losses"]) >= 4 and all(math.isfinite(x) for x in metrics["losses"])
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    assert not (out / "checkpoints").exists()
    assert metrics["dataset"]["output"] == "preference"
    assert [f["sha256"] for f in metrics["dataset"]["files"]] == [
        f["sha256"] for f in _manifest(demo_build)["outputs"]["preference"]]
    assert "curate train dpo" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["lora_chat_template", "full_text_pair"])
def test_reward_model_learns_pairs_and_scores_in_the_pipeline_unchanged(kind, demo_build, tiny_base, tiny_bert,
                                                                       tmp_path):
    base, extra = (tiny_base, {}) if kind == "lora_chat_template" else (tiny_bert, {"full_finetune": True})
    # Train and evaluate on the same 16 pairs: a working pairwise loss must fit them.
    config = TrainConfig(**{**FAST, "eval_fraction": 0.0, "max_length": 96}, max_steps=40, learning_rate=1e-2,
                         max_train_examples=16, **extra)
    out = tmp_path / "reward"
    metrics = train_reward(demo_build, base, out, config)
    expected_input = "chat_template" if kind == "lora_chat_template" else "text_pair"
    assert json.loads((out / "reward_scoring.json").read_text())["input"] == expected_input
    assert metrics["encoding"]["input"] == expected_input
    assert (out / ("adapter_model.safetensors" if kind == "lora_chat_template" else "model.safetensors")).is_file()
    losses = metrics["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5

    # The scoring stage loads the folder as it is and ranks the pairs it was trained on.
    data = load_preference_data(demo_build, eval_fraction=0.0, max_train=16)
    conversations = [r["prompt"] + r["chosen"] for r in data.train] + [r["prompt"] + r["rejected"] for r in data.train]
    frame = pl.DataFrame({"kind": ["conversation"] * len(conversations), "messages": conversations,
                          "content_hash": [f"h{i}" for i in range(len(conversations))],
                          "score": pl.Series([None] * len(conversations), dtype=pl.Float64),
                          "scorer": pl.Series([None] * len(conversations), dtype=pl.String)})
    scored, info = score_records(frame, ScoreConfig(kind="reward_model", model=str(out), batch_size=8))
    scores = scored["score"].to_numpy()
    chosen, rejected = scores[:16], scores[16:]
    assert (chosen > rejected).mean() >= 0.9
    if kind == "lora_chat_template":
        assert "adapter_model.safetensors" in info.files and any(k.startswith("base/") for k in info.files)


def test_reward_heldout_accuracy_is_reported_next_to_longer_wins(demo_build, tiny_bert, tmp_path):
    metrics = train_reward(demo_build, tiny_bert, tmp_path / "r", TrainConfig(**{**FAST, "eval_fraction": 0.3},
                                                                            max_steps=2))
    assert metrics["eval_pairs"] == 8
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_accuracy_longer"] <= 1
    card = (tmp_path / "r" / "README.md").read_text()
    assert "longer answer wins" in card and metrics["dataset"]["run_id"] in card


class _CtrlCAt:
    """Presses Ctrl-C (a real SIGINT to this process) at the end of a given optimizer step."""

    def __init__(self, step):
        from transformers import TrainerCallback

        class Press(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    signal.raise_signal(signal.SIGINT)

        self.callback = Press()


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(demo_build, tiny_base, tmp_path, monkeypatch):
    config = TrainConfig(max_steps=6, learning_rate=5e-3, max_train_examples=24, **FAST)
    straight = train_sft(demo_build, tiny_base, tmp_path / "straight", config)

    build = sft_module.build_sft_trainer

    def interrupted(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(_CtrlCAt(3).callback)
        return trainer

    out = tmp_path / "adapter"
    monkeypatch.setattr(sft_module, "build_sft_trainer", interrupted)
    with pytest.raises(TrainingInterrupted, match="--resume") as error:
        train_sft(demo_build, tiny_base, out, config)
    assert error.value.checkpoint.name == "checkpoint-3" and error.value.checkpoint.is_dir()
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(sft_module, "build_sft_trainer", build)

    with pytest.raises(ValueError, match="add --resume"):
        train_sft(demo_build, tiny_base, out, config)
    with pytest.raises(ValueError, match="different config"):
        train_sft(demo_build, tiny_base, out, config.model_copy(update={"learning_rate": 1e-3}), resume=True)
    resumed = train_sft(demo_build, tiny_base, out, config, resume=True)
    assert resumed["steps"] == 6 and not (out / "checkpoints").exists()
    assert resumed["eval_loss_base"] == straight["eval_loss_base"]
    # Steps 4-6 after the resume are the steps 4-6 of an uninterrupted run.
    assert resumed["losses"][-3:] == pytest.approx(straight["losses"][-3:], rel=1e-4)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-4)


def _logits(model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits


def test_init_adapter_merge_and_generate(demo_build, tiny_base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = TrainConfig(max_steps=3, learning_rate=1e-2, max_train_examples=12, **FAST)
    first, other = tmp_path / "first", tmp_path / "other"
    train_sft(demo_build, tiny_base, first, config)
    train_sft(demo_build, tiny_base, other, config.model_copy(update={"seed": 7}))

    # Stacking by continued training: DPO starts from the SFT adapter, whose copy is the DPO reference.
    stacked = tmp_path / "stacked"
    metrics = train_dpo(demo_build, tiny_base, stacked, config, init_adapter=first)
    assert metrics["init_adapter"] == str(first.resolve())
    assert metrics["eval_loss_base"] == pytest.approx(math.log(2), abs=1e-4)
    assert "Started from adapter" in (stacked / "README.md").read_text()
    with pytest.raises(ValueError, match="already contains"):
        main_merge = __import__("curation.train.adapters", fromlist=["merge_adapters"]).merge_adapters
        main_merge([first, stacked], tmp_path / "double")

    # Stacking by merging two independent adapters: the same weights as merging them one after the other by hand.
    merged = tmp_path / "merged"
    assert main(["adapters", "merge", str(first), str(other), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    record = json.loads((merged / "merge.json").read_text())
    assert [a["dataset_run_id"] for a in record["adapters"]] == [_manifest(demo_build)["run_id"]] * 2
    tokenizer = AutoTokenizer.from_pretrained(merged)
    by_hand = AutoModelForCausalLM.from_pretrained(tiny_base)
    for adapter in (first, other):
        by_hand = PeftModel.from_pretrained(by_hand, adapter).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(tiny_base)
    loaded = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.allclose(_logits(loaded, tokenizer), _logits(by_hand, tokenizer), atol=1e-5)
    assert not torch.allclose(_logits(loaded, tokenizer), _logits(plain, tokenizer), atol=1e-3)

    # A quick look at what the adapter says, from a text file and from the build's own prompts.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\nName a fruit.\n")
    capsys.readouterr()
    assert main(["generate", str(first), "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["prompt"][0]["content"] for line in lines] == ["Say hello.", "Name a fruit."]
    assert all(isinstance(line["response"], str) for line in lines)
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(merged), "--prompts", str(demo_build / "prompts"), "--limit", "3",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3


def test_train_commands_for_every_mode(demo_build, tiny_base, tiny_bert, tmp_path, capsys):
    common = ["--data", str(demo_build), "--max-steps", "1", "--max-length", "64", "--batch-size", "2",
              "--save-steps", "0", "--max-eval-examples", "2"]
    for mode, base in (("dpo", tiny_base), ("reward", tiny_bert)):
        out = tmp_path / mode
        assert main(["train", mode, "--base", str(base), "--out", str(out), *common, "--beta", "0.2"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["out"] == str(out.resolve()) and summary["steps"] == 1
        assert json.loads((out / "training_metrics.json").read_text())["config"]["beta"] == 0.2
    assert main(["train", "reward", "--base", str(tiny_bert), "--out", str(tmp_path / "x"), *common,
                 "--pairs", "sometimes"]) == 1
    assert "pairs" in capsys.readouterr().err


def test_length_hint_opens_the_answer_and_survives_truncation(tiny_bert):
    from transformers import AutoTokenizer

    from curation.score import RewardEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    long_answer = "word " * 400
    conversation = [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": long_answer}]
    plain = RewardEncoder(tokenizer, "text_pair", 32).encode([conversation])[0][0]
    hinted = RewardEncoder(tokenizer, "text_pair", 32, length_hint=True).encode([conversation])[0][0]
    assert len(plain) == len(hinted) == 32  # both truncated to the window
    assert "[ 400 words ]" in tokenizer.decode(hinted) and "words ]" not in tokenizer.decode(plain)
