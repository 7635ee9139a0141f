"""LoRA SFT on a small curated build with a tiny random Llama (real SmolLM2 tokenizer, offline)."""

import gzip
import json
import math
import os

import polars as pl
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from curation.hashing import file_sha256  # noqa: E402
from curation.train import TrainConfig, default_base, load_sft_data, train_sft  # noqa: E402
from curation.train.sft import build_sft_trainer  # noqa: E402


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, shared_data):
    """A curated build as `curate build` writes it: sft/part-00000.parquet + manifest.json."""
    with gzip.open(shared_data / "alpaca_eval/outputs/gpt4_1106_preview.json.gz", "rt", encoding="utf-8") as f:
        records = json.load(f)[:40]
    folder = tmp_path_factory.mktemp("build")
    (folder / "sft").mkdir()
    frame = pl.DataFrame({
        "messages": [[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": r["instruction"]},
                      {"role": "assistant", "content": r["output"]}] for r in records],
        "id": [f"ae{i:03d}" for i in range(len(records))],
        "prompt_id": [f"p{i:03d}" for i in range(len(records))],
    })
    part = folder / "sft/part-00000.parquet"
    frame.write_parquet(part)
    manifest = {"run_id": "20261125T000000Z-test0001",
                "outputs": {"sft": [{"path": "sft/part-00000.parquet", "rows": frame.height,
                                     "sha256": file_sha256(part)}]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_split_is_deterministic_by_prompt_and_checks_manifest(build_dir, tmp_path):
    a = load_sft_data(build_dir, eval_fraction=0.25, seed=3)
    b = load_sft_data(build_dir, eval_fraction=0.25, seed=3)
    c = load_sft_data(build_dir, eval_fraction=0.25, seed=4)
    assert len(a.train) + len(a.eval) == 40 and 4 <= len(a.eval) <= 18
    assert a.eval == b.eval and a.eval != c.eval
    assert not {str(r["prompt"]) for r in a.eval} & {str(r["prompt"]) for r in a.train}
    assert a.train[0]["completion"][0]["role"] == "assistant" and a.train[0]["prompt"][-1]["role"] == "user"
    # A cap on evaluated rows keeps a nested subset and never moves held-out prompts into training.
    capped = load_sft_data(build_dir, eval_fraction=0.25, seed=3, max_eval=2)
    assert len(capped.eval) == 2 and all(r in a.eval for r in capped.eval) and capped.train == a.train
    tampered = tmp_path / "build"
    (tampered / "sft").mkdir(parents=True)
    (tampered / "manifest.json").write_text((build_dir / "manifest.json").read_text())
    pl.read_parquet(build_dir / "sft/part-00000.parquet").head(5).write_parquet(tampered / "sft/part-00000.parquet")
    with pytest.raises(ValueError, match="sha256"):
        load_sft_data(tampered)


def test_loss_mask_covers_only_the_assistant_answer(build_dir, tiny_base, tmp_path):
    data = load_sft_data(build_dir, eval_fraction=0.0, max_train=2)
    trainer = build_sft_trainer(data, tiny_base, tmp_path, TrainConfig(max_length=4096, max_steps=1))
    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt_len = len(tokenizer.apply_chat_template(data.train[0]["prompt"], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"])
    assert all(label == -100 for label in labels[:prompt_len])
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert trained and trained == ids[prompt_len:len(trained) + prompt_len]
    answer = data.train[0]["completion"][0]["content"]
    assert tokenizer.decode(trained).strip().startswith(answer[:40].strip())
    assert "<|im_start|>" not in tokenizer.decode(trained)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in trained  # the model learns to stop


def test_train_sft_saves_adapter_with_provenance(build_dir, tiny_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapter"
    config = TrainConfig(max_steps=12, learning_rate=5e-3, batch_size=4, max_length=128, eval_fraction=0.1,
                         max_train_examples=4, logging_steps=1, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    metrics = train_sft(build_dir, tiny_base, out, config)
    losses = metrics["losses"]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the same 4 examples every step: it must fit them
    assert metrics["eval_loss"] is not None and math.isfinite(metrics["eval_loss"])
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "training_metrics.json"} <= {
        p.name for p in out.iterdir()}
    saved = json.loads((out / "training_metrics.json").read_text())
    manifest = json.loads((build_dir / "manifest.json").read_text())
    assert saved["dataset"]["run_id"] == manifest["run_id"]
    assert [f["sha256"] for f in saved["dataset"]["files"]] == [f["sha256"] for f in manifest["outputs"]["sft"]]
    assert manifest["run_id"] in (out / "README.md").read_text()

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5 or generated[0, -1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_default_gguf_base_trains(build_dir, tmp_path):
    """The offline default (SmolLM2-135M-Instruct GGUF, dequantised to fp32) loads, trains and lowers eval loss."""
    config = TrainConfig(max_steps=2, batch_size=2, max_length=128, max_train_examples=4, max_eval_examples=2,
                         logging_steps=1, learning_rate=5e-4)
    metrics = train_sft(build_dir, None, tmp_path / "adapter", config)
    assert metrics["base"]["gguf_file"] == default_base().name
    assert 0 < metrics["eval_loss_base"] < 6  # a trained model, not random weights (ln 49152 = 10.8)
    assert metrics["eval_loss"] < metrics["eval_loss_base"]


def test_config_loads_from_yaml_and_names_bad_keys(tmp_path):
    from curation.train import load_train_config

    path = tmp_path / "train.yaml"
    path.write_text("lora_rank: 4\ntarget_modules: [q_proj, v_proj]\nlearning_rate: 1.0e-4\n")
    config = load_train_config(path, max_steps=7)
    assert (config.lora_rank, config.target_modules, config.learning_rate, config.max_steps) == (
        4, ["q_proj", "v_proj"], 1e-4, 7)
    path.write_text("lora_rnak: 4\n")
    with pytest.raises(ValueError, match="lora_rnak: Extra inputs are not permitted"):
        load_train_config(path)


def test_curate_train_sft_command(build_dir, tiny_base, tmp_path, capsys):
    """The command line a user runs after `curate build`: flags override the YAML options."""
    from curation.cli import main

    options = tmp_path / "train.yaml"
    options.write_text("lora_rank: 4\nbatch_size: 2\nmax_length: 128\nlogging_steps: 1\n")
    out = tmp_path / "adapter"
    code = main(["train", "sft", "--data", str(build_dir), "--base", str(tiny_base), "--out", str(out),
                 "--config", str(options), "--max-steps", "2", "--lora-rank", "8"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out.resolve())
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["config"]["lora_rank"] == 8 and metrics["config"]["batch_size"] == 2
    assert (out / "adapter_model.safetensors").is_file()
