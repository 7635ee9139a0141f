"""LoRA SFT on a build's ``sft`` output: loss on the final assistant answer only, fp32 on CPU."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

from curation.train.config import TrainConfig
from curation.train.data import TrainData, load_sft_data
from curation.train.models import base_location, load_base


def lora_config(config: TrainConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, task_type=task_type)


def sft_args(config: TrainConfig, out_dir: Path):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir / "checkpoints"), num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_ratio,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length, seed=config.seed,
        data_seed=config.seed, logging_steps=config.logging_steps, logging_first_step=True,
        # The prompt/completion layout makes TRL mask every prompt token: loss on the answer only.
        completion_only_loss=True, packing=False,
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
    )


def build_sft_trainer(data: TrainData, base: str | Path | None, out_dir: Path, config: TrainConfig):
    """The configured TRL trainer (exposed so its tokenised data and collator can be inspected)."""
    from datasets import Dataset
    from trl import SFTTrainer
    from transformers import set_seed

    set_seed(config.seed)
    model, tokenizer = load_base(base)
    return SFTTrainer(
        model=model, args=sft_args(config, out_dir), processing_class=tokenizer,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        peft_config=lora_config(config),
    )


def train_sft(data_dir: str | Path, base: str | Path | None, out_dir: str | Path,
              config: TrainConfig | None = None) -> dict:
    """Train a LoRA adapter on ``data_dir/sft``; save adapter, tokenizer, metrics and a model card to ``out_dir``."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_sft_data(data_dir, config.eval_fraction, config.seed, config.max_eval_examples,
                         config.max_train_examples)
    started = time.perf_counter()
    trainer = build_sft_trainer(data, base, out_dir, config)
    eval_loss_base = trainer.evaluate()["eval_loss"] if data.eval and config.eval_before else None
    result = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval else None
    seconds = time.perf_counter() - started
    trainer.model.save_pretrained(out_dir)  # adapter_model.safetensors + adapter_config.json
    trainer.processing_class.save_pretrained(out_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    where, extra = base_location(base)
    metrics = {
        "mode": "sft",
        "base": {"model": where, **extra},
        "dataset": {"dir": str(Path(data_dir).resolve()), "output": "sft", **data.provenance()},
        "config": config.model_dump(),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "losses": losses,
        "eval_loss_base": eval_loss_base,
        "eval_loss": eval_loss,
        "train_tokens_per_epoch": tokens,
        "seconds": round(seconds, 3),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    if not all(math.isfinite(x) for x in losses):
        metrics["warning"] = "non-finite loss logged; lower the learning rate"
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(model_card(metrics), encoding="utf-8")
    return metrics


def model_card(metrics: dict) -> str:
    ds, cfg, base = metrics["dataset"], metrics["config"], metrics["base"]
    base_name = base["model"] + (f" ({base['gguf_file']})" if "gguf_file" in base else "")
    shas = "\n".join(f"  - `{f['path']}` sha256 `{f['sha256']}` ({f['rows']} rows)" for f in ds["files"])
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return f"""---
library_name: peft
base_model: {base['model']}
tags: [lora, sft, trl, curation]
---

# LoRA SFT adapter

- Base model: {base_name}
- Trained with: `curation.train.train_sft` (peft LoRA + TRL SFTTrainer), loss on the final assistant answer only
- Dataset: curated build run `{ds['run_id']}` ({ds['train_examples']} train / {ds['eval_examples']} eval examples)
{shas}
- LoRA: r={cfg['lora_rank']}, alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']}, targets={cfg['target_modules']}
- Steps: {metrics['steps']}, learning rate {cfg['learning_rate']}, batch {cfg['batch_size']} x accum {cfg['grad_accum']}, max length {cfg['max_length']}, seed {cfg['seed']}
- Eval loss: base {fmt(metrics['eval_loss_base'])} -> adapter {fmt(metrics['eval_loss'])}; train loss {fmt(metrics['train_loss'])}

Full metrics and provenance: `training_metrics.json`. Load with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_folder)`.
"""
