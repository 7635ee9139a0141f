"""A quick look at what a trained adapter (or merged model) says: chat-templated greedy or sampled generation."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Prompts as message lists from .txt (one per line), .jsonl/.json (objects with 'prompt' as text or messages,
    or 'messages'), or a build's prompts Parquet (file or folder)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"no .parquet files in {path}; pass a text, JSONL or Parquet prompts file")
        column = pl.concat([pl.read_parquet(f, columns=["prompt"]) for f in files])["prompt"]
        return [list(p) for p in column.to_list()]
    if not path.is_file():
        raise ValueError(f"prompts file {path} not found; pass a .txt (one prompt per line), .jsonl or .parquet file")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        items = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
        return [_as_messages(item, path, n) for n, item in enumerate(items, 1)]
    return [[{"role": "user", "content": line}] for line in text.splitlines() if line.strip()]


def _as_messages(item, path: Path, n: int) -> list[dict]:
    value = item.get("messages", item.get("prompt")) if isinstance(item, dict) else item
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
        return value
    raise ValueError(f"{path} item {n}: expected a string, or 'prompt'/'messages' as text or a list of "
                     f"{{role, content}}; fix that item")


def load_generator(model_dir: str | Path, base: str | Path | None = None):
    """(model, tokenizer) from an adapter folder (applied to its recorded base) or a plain/merged model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curation.train.models import adapter_info, load_adapted

    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        if adapter_info(model_dir)["mode"] == "reward":
            raise ValueError(f"{model_dir} is a reward model; it scores answers, it does not generate them")
        model, tokenizer = load_adapted(model_dir, base, merge=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge
    return model.eval(), tokenizer


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0,
             batch_size: int = 8, seed: int = 0) -> list[str]:
    import torch
    from transformers import set_seed

    set_seed(seed)
    replies = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start:start + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    **sampling)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        replies.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies
