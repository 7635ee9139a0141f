"""Reward model training on a build's ``preference`` output: a one-logit sequence classifier (LoRA + head, or every
weight) with the pairwise loss -log sigmoid(r_chosen - r_rejected).

Pairs are tokenised by the scoring stage's own ``RewardEncoder`` (same input kind, truncation and special tokens),
and ``reward_scoring.json`` records that encoding, so the saved folder scores in the pipeline unchanged:
``score: {kind: reward_model, model: <folder>}``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curation.score import REWARD_SETTINGS_FILE, RewardEncoder, ScoreConfig, answer_text, score_conversations
from curation.train import runner
from curation.train.config import TrainConfig
from curation.train.data import TrainData, load_preference_data
from curation.train.dpo import _PAIRS
from curation.train.models import load_base
from curation.train.sft import lora_config


@dataclass
class PairCollator:
    """Chosen rows then rejected rows, right-padded; token type ids too for encoders that use them (BERT pairs)."""

    pad_token_id: int
    token_types: bool

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        types = [e["chosen_type_ids"] for e in examples] + [e["rejected_type_ids"] for e in examples]
        width = max(len(r) for r in rows)
        batch = {
            "input_ids": torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        }
        if self.token_types:
            batch["token_type_ids"] = torch.tensor([t + [0] * (width - len(t)) for t in types])
        return batch


def reward_input(tokenizer, config: TrainConfig) -> str:
    if config.reward_input != "auto":
        return config.reward_input
    return "chat_template" if tokenizer.chat_template else "text_pair"


def encode_pairs(rows: list[dict], encoder: RewardEncoder) -> list[dict]:
    """Tokenised pairs; a pair the chat template rejects is dropped."""
    chosen = encoder.encode([r["prompt"] + r["chosen"] for r in rows])
    rejected = encoder.encode([r["prompt"] + r["rejected"] for r in rows])
    return [{"chosen_ids": c[0], "chosen_type_ids": c[1], "rejected_ids": r[0], "rejected_type_ids": r[1]}
            for c, r in zip(chosen, rejected) if c is not None and r is not None]


def build_reward_trainer(data: TrainData, base: str | Path | None, out_dir: Path, config: TrainConfig,
                         init_adapter: str | Path | None = None):
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    runner.check_qlora(config)
    if config.full_finetune and (config.qlora or init_adapter is not None):
        raise ValueError("full_finetune trains every weight; it cannot start from an adapter or a 4-bit base")
    set_seed(config.seed)
    model, tokenizer = load_base(base, "reward", quantize_4bit=config.qlora)
    model = runner.prepare_model(model, config, init_adapter)
    encoder = RewardEncoder(tokenizer, reward_input(tokenizer, config), config.max_length, str(base),
                            length_hint=config.reward_length_hint)
    train = encode_pairs(data.train, encoder)
    if not train:
        raise ValueError("no preference pair could be encoded for reward training; check the chat template")
    evaluation = encode_pairs(data.eval, encoder)
    args = RewardConfig(**runner.trainer_args(config, out_dir), remove_unused_columns=False)
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
        data_collator=PairCollator(tokenizer.pad_token_id, encoder.token_types),
        peft_config=lora_config(config, "SEQ_CLS") if init_adapter is None and not config.full_finetune else None,
    )
    return trainer, encoder


def pairwise_accuracy(folder: Path, rows: list[dict]) -> dict:
    """Held-out accuracy of the saved model as the scoring stage loads it, next to 'the longer answer wins', overall
    and per source (ties count half)."""
    if not rows:
        return {"eval_pairs": 0, "eval_accuracy": None, "eval_accuracy_longer": None, "eval_by_source": {}}
    config = ScoreConfig(kind="reward_model", model=str(folder))
    chosen = score_conversations([r["prompt"] + r["chosen"] for r in rows], config)
    rejected = score_conversations([r["prompt"] + r["rejected"] for r in rows], config)
    model_wins = (chosen > rejected) + 0.5 * (chosen == rejected)
    length = lambda side: np.array([len(answer_text(r[side])) for r in rows])  # noqa: E731
    longer_wins = (length("chosen") > length("rejected")) + 0.5 * (length("chosen") == length("rejected"))
    sources = np.array([r.get("source") or "" for r in rows])
    by_source = {s: {"pairs": int((sources == s).sum()), "accuracy": float(model_wins[sources == s].mean()),
                     "accuracy_longer": float(longer_wins[sources == s].mean())} for s in sorted(set(sources))}
    return {"eval_pairs": len(rows), "eval_accuracy": float(model_wins.mean()),
            "eval_accuracy_longer": float(longer_wins.mean()), "eval_by_source": by_source}


def train_reward(data_dir: str | Path, base: str | Path | None, out_dir: str | Path,
                 config: TrainConfig | None = None, init_adapter: str | Path | None = None,
                 resume: bool = False) -> dict:
    """Train a reward model on ``data_dir/preference``; the folder it writes is a scoring-stage model."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_preference_data(data_dir, config.eval_fraction, config.seed, config.max_eval_examples,
                                config.max_train_examples, _PAIRS[config.pairs], config.source_weights)
    fingerprint = {"mode": "reward", "config": config.model_dump(), "dataset": data.provenance(),
                   "base": runner.base_record(base)["ref"], "init_adapter": str(init_adapter)}
    checkpoint, saved = runner.start_run(out_dir, fingerprint, resume)
    started = time.perf_counter()
    trainer, encoder = build_reward_trainer(data, base, out_dir, config, init_adapter)
    if "eval_before" not in saved:
        before = trainer.evaluate() if data.eval and config.eval_before else {}
        runner.remember(out_dir, saved, eval_before=before)
    result = runner.run(trainer, out_dir, checkpoint)
    after = trainer.evaluate() if data.eval else {}
    trainer.model.save_pretrained(out_dir)  # LoRA: adapter + head (modules_to_save); full: model.safetensors
    trainer.processing_class.save_pretrained(out_dir)
    settings = {"input": encoder.input, "max_length": config.max_length, "label_index": 0,
                "length_hint": encoder.length_hint}
    (out_dir / REWARD_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    figures = dict(eval_loss_base=saved["eval_before"].get("eval_loss"),
                   eval_loss=after.get("eval_loss"), encoding=settings)
    write = lambda **more: runner.write_outputs(  # noqa: E731
        out_dir, "reward", base, data_dir, "preference", data, config, trainer, result, started, init_adapter, **figures, **more)
    write()  # the record of the base lets the scoring stage load the folder for the held-out check
    metrics = write(**pairwise_accuracy(out_dir, data.eval))
    runner.finish_checkpoints(out_dir)
    return metrics
