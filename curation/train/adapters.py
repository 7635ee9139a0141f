"""Stacking adapters: merge one or several LoRA adapters into their shared base and save plain safetensors."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from curation.hashing import file_sha256
from curation.score import REWARD_SETTINGS_FILE
from curation.train.models import adapter_info, load_base, load_tokenizer


def merge_adapters(adapters: list[str | Path], out_dir: str | Path, base: str | Path | None = None) -> dict:
    """Apply and merge each adapter in order (W += B_i A_i), so later adapters refine earlier ones."""
    from peft import PeftModel

    if not adapters:
        raise ValueError("name at least one adapter folder to merge")
    infos = [adapter_info(a) for a in adapters]
    resolved = {str(Path(a).resolve()) for a in adapters}
    for adapter in adapters:
        init = _adapter_record(Path(adapter))["init_adapter"]
        if init in resolved:
            raise ValueError(f"{adapter} was trained from {init} and already contains it; merge {adapter} without it")
    tasks = {"reward" if i["mode"] == "reward" else "causal_lm" for i in infos}
    if len(tasks) > 1:
        raise ValueError("cannot merge reward adapters with language-model adapters; merge each kind separately")
    bases = {i["base"] for i in infos}
    if base is None and len(bases) > 1:
        raise ValueError(f"the adapters were trained on different bases ({', '.join(sorted(map(str, bases)))}); "
                         f"pass --base to merge them into one anyway")
    base = base if base is not None else infos[0]["base"]
    task = tasks.pop()
    model, _ = load_base(base, task)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(adapters[0], task).save_pretrained(out_dir)
    if task == "reward" and (Path(adapters[0]) / REWARD_SETTINGS_FILE).is_file():
        shutil.copy(Path(adapters[0]) / REWARD_SETTINGS_FILE, out_dir / REWARD_SETTINGS_FILE)
    record = {
        "base": str(base),
        "task": task,
        "adapters": [_adapter_record(Path(a)) for a in adapters],
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    (out_dir / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(_card(record), encoding="utf-8")
    return record


def _adapter_record(folder: Path) -> dict:
    """Which weights were merged and which dataset build each was trained on."""
    metrics_path = folder / "training_metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    dataset = metrics.get("dataset", {})
    return {"path": str(folder.resolve()), "mode": metrics.get("mode"),
            "adapter_sha256": file_sha256(folder / "adapter_model.safetensors"),
            "init_adapter": metrics.get("init_adapter"),
            "dataset_run_id": dataset.get("run_id"), "dataset_files": dataset.get("files", [])}


def _card(record: dict) -> str:
    rows = "\n".join(f"{i + 1}. `{a['path']}` ({a['mode'] or 'peft'} adapter, sha256 `{a['adapter_sha256']}`, "
                     f"dataset run `{a['dataset_run_id']}`)" for i, a in enumerate(record["adapters"]))
    return f"""---
library_name: transformers
base_model: {record['base']}
tags: [merged-lora, curation]
---

# Merged model

Base `{record['base']}` with these LoRA adapters merged into its weights, in order:

{rows}

Provenance of each adapter (dataset build and the sha256 of its Parquet files): `merge.json`.
"""
