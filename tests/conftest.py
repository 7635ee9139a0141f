import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect runs in ephemeral mode against a throwaway home, so tests never touch ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="curation-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Prefect snapshots its settings (API URL included) from the environment, and binds its console log
# handler to the sys.stderr of the moment, when prefect.main is first imported. Import it here, with the
# settings above and the process's real stderr (pytest's fd capture still catches what it writes), so
# neither comes from a test's monkeypatched environment or from a capture buffer that gets closed: a
# capsys buffer when a test ends, or pytest's own when Prefect logs its shutdown at exit.
sys.stderr, _session_stderr = sys.__stderr__, sys.stderr
try:
    import prefect.main  # noqa: E402,F401
finally:
    sys.stderr = _session_stderr

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; tests read real data from ../shared/data beside the project")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> Path:
    """The bundled demo recipe built once through the real flow (read-only for tests: copy before changing)."""
    from curation.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["build", str(PROJECT_ROOT / "recipes" / "demo.yaml"), "--out", str(out), "--quiet"]) == 0
    return out


SHARED_CAP = 12  # records read per shared file by `capped_build`


def shared_capped_recipe(out_dir: Path) -> Path:
    """recipes/shared.yaml with one source per shared file, each capped at SHARED_CAP records."""
    shipped = yaml.safe_load((PROJECT_ROOT / "recipes" / "shared.yaml").read_text())
    shipped_dir = (PROJECT_ROOT / "recipes").resolve()
    sources = []
    for source in shipped["sources"]:
        root = (shipped_dir / source["path"]).resolve()
        files = sorted(root.glob(source.get("include", "*"))) if root.is_dir() else [root]
        for path in files:
            per_file = {k: v for k, v in source.items() if k not in ("name", "path", "include")}
            sources.append({**per_file, "name": f"{source['name']}/{path.name}", "path": str(path),
                            "max_records": SHARED_CAP})
    recipe = {**shipped, "name": "shared-capped", "sources": sources}
    if recipe["score"]["model"].startswith("."):  # a model folder beside the shipped recipe
        recipe["score"] = {**recipe["score"], "model": str((shipped_dir / recipe["score"]["model"]).resolve())}
    path = out_dir / "shared_capped.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def capped_build(shared_data, tmp_path_factory) -> tuple[Path, dict]:
    """Every shared file through the whole flow, SHARED_CAP records each: (output folder, manifest).
    Built once per session; read-only for tests (copy before changing)."""
    from curation.cli import main

    tmp = tmp_path_factory.mktemp("shared")
    recipe = shared_capped_recipe(tmp)
    out = tmp / "out"
    assert main(["build", str(recipe), "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: trains in seconds, offline."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curation.train import default_base

    gguf = default_base()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
