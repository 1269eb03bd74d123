# Two commands matter: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use: torch is pinned and installed first so that a CPU machine never pulls
# the multi-GB CUDA wheels, then this package with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED := $(abspath ../shared)

# Offline tokenizer files, when the shared folder is beside the repo (CI, this workplace).
ifneq ($(wildcard $(SHARED)/tiktoken_cache),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED)/tiktoken_cache
endif

.PHONY: install demo demo-rl test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# llama-cpp-python for the GGUF tests, tried once: where it cannot be built, those tests skip with the reason
$(BIN)/.llama: $(BIN)/.installed
	@echo "make: installing llama-cpp-python (the first time it compiles llama.cpp from source, which takes many minutes; pip caches the result)"
	$(BIN)/python -m pip install -q -e ".[dev,llama]" || echo "make: llama-cpp-python could not be built: the tests that run GGUF files in llama.cpp will skip"
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# Post-training on a task with a checkable answer: fine-tune, then GRPO, DPO, a reward model and PPO, each
# measured on the same held-out questions.
demo-rl: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo_rl.sh

# One pytest-xdist worker per core, a test file per worker at a time: many tests wait on child processes, servers
# or compilers, and module fixtures stay built once per file.
test: install $(BIN)/.llama
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) runs
