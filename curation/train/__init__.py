"""Bundled LoRA trainer: turns a build's curated Parquet into a trained adapter (SFT now; DPO, reward next)."""

from curation.train.config import TrainConfig, load_train_config
from curation.train.data import TrainData, load_sft_data
from curation.train.models import DEFAULT_BASE_DESCRIPTION, default_base, load_base
from curation.train.sft import train_sft

__all__ = ["TrainConfig", "load_train_config", "TrainData", "load_sft_data", "DEFAULT_BASE_DESCRIPTION",
           "default_base", "load_base", "train_sft"]
