"""LoRA SFT on a build's ``sft`` output: loss on the final assistant answer only."""

from __future__ import annotations

import time
from pathlib import Path

from curation.train import runner
from curation.train.config import TrainConfig
from curation.train.data import TrainData, load_sft_data
from curation.train.models import load_base


def lora_config(config: TrainConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, task_type=task_type)


def build_sft_trainer(data: TrainData, base: str | Path | None, out_dir: Path, config: TrainConfig,
                      init_adapter: str | Path | None = None):
    """The configured TRL trainer (exposed so its tokenised data and collator can be inspected)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    runner.check_qlora(config)
    set_seed(config.seed)
    model, tokenizer = load_base(base, quantize_4bit=config.qlora)
    model = runner.prepare_model(model, config, init_adapter)
    # The prompt/completion layout makes TRL mask every prompt token: loss on the answer only.
    args = SFTConfig(**runner.trainer_args(config, out_dir), completion_only_loss=True, packing=False)
    return SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        peft_config=lora_config(config) if init_adapter is None else None,
    )


def train_sft(data_dir: str | Path, base: str | Path | None, out_dir: str | Path,
              config: TrainConfig | None = None, init_adapter: str | Path | None = None,
              resume: bool = False) -> dict:
    """Train a LoRA adapter on ``data_dir/sft``; save adapter, tokenizer, metrics and a model card to ``out_dir``."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_sft_data(data_dir, config.eval_fraction, config.seed, config.max_eval_examples,
                         config.max_train_examples)
    fingerprint = {"mode": "sft", "config": config.model_dump(), "dataset": data.provenance(),
                   "base": runner.base_record(base)["ref"], "init_adapter": str(init_adapter)}
    checkpoint, saved = runner.start_run(out_dir, fingerprint, resume)
    started = time.perf_counter()
    trainer = build_sft_trainer(data, base, out_dir, config, init_adapter)
    if "eval_loss_base" not in saved:
        before = trainer.evaluate()["eval_loss"] if data.eval and config.eval_before else None
        runner.remember(out_dir, saved, eval_loss_base=before)
    result = runner.run(trainer, out_dir, checkpoint)
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval else None
    trainer.model.save_pretrained(out_dir)  # adapter_model.safetensors + adapter_config.json
    trainer.processing_class.save_pretrained(out_dir)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    metrics = runner.write_outputs(out_dir, "sft", base, data_dir, "sft", data, config, trainer, result, started,
                                   init_adapter, eval_loss_base=saved["eval_loss_base"], eval_loss=eval_loss,
                                   train_tokens_per_epoch=tokens)
    runner.finish_checkpoints(out_dir)
    return metrics
