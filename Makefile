# reshift: `make demo` and `make test` work on a fresh machine with only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install system-tools demo test test-fast bench fuzz ops-table lint clean

# System tools the test suite uses (tests/system_tools.py names them): Debian packages, installed
# when `make` runs as root with apt-get; otherwise the tests that need them skip and say why.
SYSTEM_PACKAGES := gcc-aarch64-linux-gnu
SYSTEM_PACKAGE_TOOLS := aarch64-linux-gnu-gcc

# torch 2.13.0 first: it is the CPU wheel on these machines; any other version pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-tools:
	@missing=""; for t in $(SYSTEM_PACKAGE_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages for:$$missing ($(SYSTEM_PACKAGES))"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES)) >/dev/null \
	    || echo "warning: apt-get could not install $(SYSTEM_PACKAGES); the tests that need$$missing will skip"; \
	else \
	  echo "note:$$missing not found and not installable here (needs root and apt-get); the tests that need it will skip"; \
	fi

demo: install
	$(BIN)/python examples/quickstart.py

# Two pytest workers, one per core: most test time is single-threaded TVM/LLVM compilation. Files
# stay whole on one worker (--dist loadfile), so module-scoped compiled models are built once.
TEST_WORKERS ?= 2
test: install system-tools
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not edge"

bench: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/agreement.py
	$(BIN)/python benchmarks/e2e.py --quick

# ONNX mutation fuzzing (issue #14): 2,000 cases over four seed models; fails on a raw exception or hang.
fuzz: install
	$(BIN)/python benchmarks/fuzz_onnx.py --cases 2000

ops-table: install
	$(BIN)/python -c "from pathlib import Path; from reshift.ir.op_table import splice_into; p = Path('README.md'); p.write_text(splice_into(p.read_text()))"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# Emulated arm64 edge device (examples/edge/README.md): qemu-user + TVM RPC on 127.0.0.1.
EDGE_PORT ?= 9090
.PHONY: edge-tools edge-device edge-stop test-edge

EDGE_TOOLS := debootstrap qemu-aarch64-static aarch64-linux-gnu-gcc dpkg-deb

# Installs debootstrap, qemu-user-static and the aarch64 cross compiler when missing (as root).
edge-tools:
	@missing=""; for t in $(EDGE_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages for:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      debootstrap qemu-user-static gcc-aarch64-linux-gnu dpkg; \
	  else \
	    echo "missing:$$missing; run as root or: sudo apt-get install debootstrap qemu-user-static gcc-aarch64-linux-gnu"; \
	    exit 1; \
	  fi; \
	fi

edge-device: install edge-tools
	$(BIN)/python examples/edge/device.py start --port $(EDGE_PORT)

edge-stop:
	$(BIN)/python examples/edge/device.py stop --all

# tornado and psutil: the TVM RPC tracker (two devices under one key) needs them; not runtime deps.
test-edge: install edge-tools
	$(BIN)/python -m pip install -q tornado psutil
	$(BIN)/python -m pytest -q -m edge tests/test_edge.py
