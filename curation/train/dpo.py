"""LoRA DPO on a build's ``preference`` output; the reference is the model before training (adapter disabled, or a
frozen copy of the ``--init-adapter``), so no second model is held in memory."""

from __future__ import annotations

import time
from pathlib import Path

from curation.train import runner
from curation.train.config import TrainConfig
from curation.train.data import TrainData, load_preference_data
from curation.train.models import load_base
from curation.train.sft import lora_config

_PAIRS = {"all": None, "native": ["native", "anchored"], "score": ["score"]}  # anchored: native, via an anchor


def _pairs_only(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def build_dpo_trainer(data: TrainData, base: str | Path | None, out_dir: Path, config: TrainConfig,
                      init_adapter: str | Path | None = None):
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    runner.check_qlora(config)
    set_seed(config.seed)
    model, tokenizer = load_base(base, quantize_4bit=config.qlora)
    model = runner.prepare_model(model, config, init_adapter)
    args = DPOConfig(**runner.trainer_args(config, out_dir), beta=config.beta)
    return DPOTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(_pairs_only(data.train)),
        eval_dataset=Dataset.from_list(_pairs_only(data.eval)) if data.eval else None,
        peft_config=lora_config(config) if init_adapter is None else None,
    )


def train_dpo(data_dir: str | Path, base: str | Path | None, out_dir: str | Path,
              config: TrainConfig | None = None, init_adapter: str | Path | None = None,
              resume: bool = False) -> dict:
    """Train a LoRA adapter with DPO on ``data_dir/preference``; save it with metrics and a model card."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_preference_data(data_dir, config.eval_fraction, config.seed, config.max_eval_examples,
                                config.max_train_examples, _PAIRS[config.pairs], config.source_weights)
    fingerprint = {"mode": "dpo", "config": config.model_dump(), "dataset": data.provenance(),
                   "base": runner.base_record(base)["ref"], "init_adapter": str(init_adapter)}
    checkpoint, saved = runner.start_run(out_dir, fingerprint, resume)
    started = time.perf_counter()
    trainer = build_dpo_trainer(data, base, out_dir, config, init_adapter)
    if "eval_before" not in saved:
        before = trainer.evaluate() if data.eval and config.eval_before else {}
        runner.remember(out_dir, saved, eval_before=before)
    result = runner.run(trainer, out_dir, checkpoint)
    after = trainer.evaluate() if data.eval else {}
    trainer.model.save_pretrained(out_dir, selected_adapters=["default"])  # not TRL's frozen "ref" copy
    trainer.processing_class.save_pretrained(out_dir)
    before = saved["eval_before"]
    metrics = runner.write_outputs(
        out_dir, "dpo", base, data_dir, "preference", data, config, trainer, result, started, init_adapter,
        eval_loss_base=before.get("eval_loss"), eval_loss=after.get("eval_loss"),
        eval_reward_accuracy_base=before.get("eval_rewards/accuracies"),
        eval_reward_accuracy=after.get("eval_rewards/accuracies"), eval_reward_margin=after.get("eval_rewards/margins"))
    runner.finish_checkpoints(out_dir)
    return metrics
