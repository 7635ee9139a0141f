"""Training options for every mode (sft, dpo, reward), loadable from YAML with command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_rank: int = Field(16, ge=1, description="LoRA rank r")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha (effective scale alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA branch")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names to adapt, or 'all-linear' for every linear layer except the head")
    epochs: float = Field(1.0, gt=0, description="passes over the training split (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate (linear decay)")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of steps spent warming up")
    batch_size: int = Field(4, ge=1, description="examples per device step")
    grad_accum: int = Field(1, ge=1, description="device steps per optimizer step")
    max_length: int = Field(512, ge=8, description="tokens per example; longer ones are truncated from the end")
    seed: int = Field(0, description="seed for the eval split, LoRA init and data order")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of examples held out for eval loss")
    max_eval_examples: int | None = Field(None, ge=1, description="cap on held-out examples (eval time grows with it)")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training examples after the split")
    logging_steps: int = Field(10, ge=1, description="log the loss every this many optimizer steps")
    eval_before: bool = Field(True, description="also measure the base model's eval loss before training")
    save_steps: int = Field(100, ge=0, description="save a resumable checkpoint every this many optimizer steps "
                                                  "(0: only when interrupted); the last 2 are kept")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on a CUDA GPU that supports it, float32 on CPU")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: much less memory for ~30% more time; "
                           "turn on for large models or long sequences")
    qlora: bool = Field(False, description="load the base in 4-bit NF4 (bitsandbytes) and train LoRA on top; CUDA only")
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference (initial) model")
    pairs: Literal["all", "native", "score"] = Field(
        "all", description="dpo/reward: which preference pairs to use: native (human or judge rankings, "
                           "directly or through a shared anchor answer), score (scorer margin) or all")
    source_weights: dict[str, float] = Field(
        default_factory=dict, description="dpo/reward: times each training pair of a source is used per epoch "
                                          "(e.g. {hh_harmless: 3, alpaca_eval_judgements: 0.5}); a key "
                                          "'source:pair_source' weighs one kind of pair of a source; held-out "
                                          "pairs are never reweighted")
    reward_length_hint: bool = Field(
        False, description="reward: open each answer with its word count ('[212 words] ...') so a short window still "
                           "sees how long the whole answer is; recorded for the scoring stage")
    full_finetune: bool = Field(False, description="reward: train every weight instead of a LoRA adapter plus head")
    reward_input: Literal["auto", "chat_template", "text_pair"] = Field(
        "auto", description="reward: how a conversation is encoded (auto: the chat template when the tokenizer has "
                            "one, else a prompt/answer text pair); the scoring stage uses the same encoding")


def load_train_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Options from a YAML file (if given), then command-line style overrides on top."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training config {path} not found; pass the path of a YAML file of TrainConfig fields")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"training config {path}: expected a mapping of option: value at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        where = f"{path}: " if path is not None else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"training config {where}{problems}") from None
