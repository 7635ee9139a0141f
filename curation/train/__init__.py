"""Bundled trainer: turns a build's curated Parquet into a LoRA adapter (SFT, DPO) or a reward model."""

from curation.train.config import TrainConfig, load_train_config
from curation.train.data import TrainData, load_preference_data, load_sft_data
from curation.train.dpo import train_dpo
from curation.train.models import DEFAULT_BASE_DESCRIPTION, default_base, load_adapted, load_base
from curation.train.reward import train_reward
from curation.train.sft import train_sft

TRAINERS = {"sft": train_sft, "dpo": train_dpo, "reward": train_reward}

__all__ = ["TrainConfig", "load_train_config", "TrainData", "load_sft_data", "load_preference_data",
           "DEFAULT_BASE_DESCRIPTION", "default_base", "load_adapted", "load_base", "train_sft", "train_dpo",
           "train_reward", "TRAINERS"]
