"""What every training mode shares: trainer arguments, device and precision, Ctrl-C checkpoints, resume, and the
metrics + model card that tie the weights to the dataset build they were trained on."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from curation.train.config import TrainConfig
from curation.train.data import TrainData

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved and the same command with ``--resume`` continues from it."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(f"training interrupted; {where}; rerun the same command with --resume to continue")


def use_bf16(config: TrainConfig) -> bool:
    import torch

    if config.precision == "float32":
        return False
    cuda = torch.cuda.is_available()
    if config.precision == "bfloat16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("precision bfloat16: this GPU does not support bfloat16; use precision: float32")
        return True
    return cuda and torch.cuda.is_bf16_supported()


def check_qlora(config: TrainConfig) -> None:
    import importlib.util

    import torch

    if not config.qlora:
        return
    if not torch.cuda.is_available():
        raise ValueError("qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU train plain LoRA with qlora: false")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("qlora needs the bitsandbytes package; pip install bitsandbytes")


def trainer_args(config: TrainConfig, out_dir: Path) -> dict:
    """Keyword arguments shared by SFTConfig, DPOConfig and RewardConfig."""
    import torch

    return dict(
        output_dir=str(out_dir / CHECKPOINTS), num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length, seed=config.seed,
        data_seed=config.seed, logging_steps=config.logging_steps, logging_first_step=True,
        use_cpu=not torch.cuda.is_available(), bf16=use_bf16(config), fp16=False,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        save_total_limit=2, eval_strategy="no", report_to=[], dataloader_num_workers=0,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def prepare_model(model, config: TrainConfig, init_adapter: str | Path | None, is_trainable: bool = True):
    """Wrap the base in an existing adapter to keep training it (stacking), or leave it for the trainer's LoRA."""
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if init_adapter is None:
        return model
    from peft import PeftModel

    if not (Path(init_adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--init-adapter {init_adapter}: no adapter_config.json there; pass a folder written by "
                         f"`curate train`")
    return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=is_trainable)


def _checkpoints(out_dir: Path) -> list[Path]:
    folder = out_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def start_run(out_dir: Path, fingerprint: dict, resume: bool) -> tuple[Path | None, dict]:
    """(checkpoint to resume from, state saved by the first attempt). Refuses to resume with other options or data,
    and refuses to silently train over an interrupted run."""
    run_file = out_dir / CHECKPOINTS / RUN_FILE
    checkpoints = _checkpoints(out_dir)
    if resume:
        if not checkpoints or not run_file.is_file():
            raise ValueError(f"--resume: no checkpoint in {out_dir / CHECKPOINTS}; start without --resume")
        saved = json.loads(run_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in fingerprint if saved.get("fingerprint", {}).get(k) != fingerprint[k])
        if changed:
            raise ValueError(f"--resume: the checkpoint in {out_dir} was trained with different {', '.join(changed)}; "
                             f"rerun with the original options or choose a new --out")
        return checkpoints[-1], saved
    if checkpoints:
        raise ValueError(f"{out_dir} holds checkpoints of an unfinished run; add --resume to continue it or choose "
                         f"a new --out")
    run_file.parent.mkdir(parents=True, exist_ok=True)
    saved = {"fingerprint": fingerprint}
    run_file.write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return None, saved


def remember(out_dir: Path, saved: dict, **values) -> None:
    saved.update(values)
    (out_dir / CHECKPOINTS / RUN_FILE).write_text(json.dumps(saved, indent=2), encoding="utf-8")


class _StopOnInterrupt:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.requested:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ncurate: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once)", file=sys.stderr)


@contextmanager
def _sigint(handler):
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(trainer, out_dir: Path, checkpoint: Path | None):
    """``trainer.train()`` that turns Ctrl-C into a saved checkpoint and a ``TrainingInterrupted``."""
    stop = _StopOnInterrupt()
    trainer.add_callback(stop.callback())
    with _sigint(stop.handler):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.requested:
        found = _checkpoints(out_dir)
        raise TrainingInterrupted(found[-1] if found else None)
    return result


def finish_checkpoints(out_dir: Path) -> None:
    """A finished run needs no checkpoints; removing them lets a new run use the folder."""
    import shutil

    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)


def base_record(base: str | Path | None) -> dict:
    from curation.train.models import base_location, base_reference

    where, extra = base_location(base)
    return {"ref": base_reference(base), "model": where, **extra}


def write_outputs(out_dir: Path, mode: str, base: str | Path | None, data_dir: str | Path, output: str,
                  data: TrainData, config: TrainConfig, trainer, result, started: float, init_adapter=None,
                  **figures) -> dict:
    """training_metrics.json (provenance: build run id and the sha256 of every Parquet file read) and README.md."""
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics = {
        "mode": mode,
        "base": base_record(base),
        "init_adapter": str(Path(init_adapter).resolve()) if init_adapter else None,
        "dataset": {"dir": str(Path(data_dir).resolve()), "output": output, **data.provenance()},
        "config": config.model_dump(),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": round(result.metrics.get("train_runtime", float("nan")), 3),
        "losses": losses,
        **figures,
        "seconds": round(time.perf_counter() - started, 3),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    if not all(math.isfinite(x) for x in losses):
        metrics["warning"] = "non-finite loss logged; lower the learning rate"
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(model_card(metrics), encoding="utf-8")
    return metrics


_DESCRIPTIONS = {
    "sft": ("LoRA SFT adapter", "peft LoRA + TRL SFTTrainer, loss on the final assistant answer only",
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_folder)"),
    "dpo": ("LoRA DPO adapter", "peft LoRA + TRL DPOTrainer (sigmoid loss; reference = the model before training)",
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_folder)"),
    "reward": ("Reward model", "TRL RewardTrainer, pairwise loss -log sigmoid(r_chosen - r_rejected)",
               "the scoring stage: `score: {kind: reward_model, model: <this folder>}`"),
}


def model_card(metrics: dict) -> str:
    ds, cfg, base, mode = metrics["dataset"], metrics["config"], metrics["base"], metrics["mode"]
    title, how, load = _DESCRIPTIONS[mode]
    base_name = base["ref"] + (f" ({base['gguf_file']})" if "gguf_file" in base else "")
    shas = "\n".join(f"  - `{f['path']}` sha256 `{f['sha256']}` ({f['rows']} rows)" for f in ds["files"])
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    adapter = ("full fine-tune (all weights)" if mode == "reward" and cfg["full_finetune"] else
               f"LoRA r={cfg['lora_rank']}, alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']}, "
               f"targets={cfg['target_modules']}")
    lines = [f"- Eval loss: before {fmt(metrics.get('eval_loss_base'))} -> after {fmt(metrics.get('eval_loss'))}"]
    if mode == "dpo":
        lines.append(f"- Eval reward accuracy (chosen over rejected): {fmt(metrics.get('eval_reward_accuracy'))}")
    if mode == "reward":
        lines.append(f"- Held-out pairwise accuracy: {fmt(metrics.get('eval_accuracy'))} "
                     f"(longer answer wins: {fmt(metrics.get('eval_accuracy_longer'))}) on "
                     f"{metrics.get('eval_pairs')} pairs")
        for source, row in (metrics.get("eval_by_source") or {}).items():
            lines.append(f"  - {source}: {row['accuracy']:.4f} (longer wins {row['accuracy_longer']:.4f}) "
                         f"on {row['pairs']} pairs")
    init = f"\n- Started from adapter: `{metrics['init_adapter']}`" if metrics.get("init_adapter") else ""
    return f"""---
library_name: {"transformers" if mode == "reward" and cfg["full_finetune"] else "peft"}
base_model: {base['ref']}
tags: [{"lora, " if not (mode == "reward" and cfg["full_finetune"]) else ""}{mode}, trl, curation]
---

# {title}

- Base model: {base_name}{init}
- Trained with: `curate train {mode}` ({how})
- Dataset: curated build run `{ds['run_id']}`, output `{ds['output']}` ({ds['train_examples']} train / {ds['eval_examples']} eval examples)
{shas}
- Weights: {adapter}
- Steps: {metrics['steps']}, learning rate {cfg['learning_rate']}, batch {cfg['batch_size']} x accum {cfg['grad_accum']}, max length {cfg['max_length']}, seed {cfg['seed']}
{chr(10).join(lines)}; train loss {fmt(metrics.get('train_loss'))}

Full metrics and provenance: `training_metrics.json`. Load with {load}.
"""
