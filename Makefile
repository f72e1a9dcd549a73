# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= dev,text,distributed,openvino
# Flower pins protobuf<7, rich<15, typer<0.21 and an older ray, so federated learning gets its own
# venv (build/ is git-ignored) and `make test` runs tests/federated there as well.
FED_VENV ?= build/fed-venv
FED_PY := $(FED_VENV)/bin/python

.PHONY: demo test install install-federated bench bench-peers lint clean runtime-venvs

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	# onnx2torch turns users' ONNX/.pt2 models into prunable nn.Modules. --no-deps: it declares
	# torchvision, whose PyPI wheel does not load against the CPU torch pinned here (and is not needed)
	$(PIP) install -c constraints.txt --no-deps "onnx2torch>=1.5.15"
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed: check constraints.txt" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

$(FED_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(FED_VENV)
	$(FED_PY) -m pip install -q --upgrade pip
	$(FED_PY) -m pip install -q -c constraints.txt -e ".[dev,text,federated]"
	@if $(FED_PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed: check constraints.txt" >&2; exit 1; fi
	touch $@

install-federated: $(FED_VENV)/.installed

# The main job on the built-in example: the default budget (p90 latency <= 0.5x, size <= 0.25x,
# quality >= 0.99x of the original), anytime-bounded to finish in under 5 minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/compactai profile --example digits
	rm -rf out/demo
	$(VENV)/bin/compactai optimize --example digits --max-minutes 2.5 -o out/demo

# Two pytest-xdist workers: much of the suite is single-threaded (CLI subprocesses starting up,
# servers, file I/O), so a second worker uses the core the first leaves idle. Tests marked quiet
# compare latencies within one run and run alone afterwards. Parallel-safe because every server
# binds port 0, work goes to tmp_path, and the shared caches (~/.cache/compactai) are written under
# a lock (digits teacher, NAS latency table) or re-measured when a read finds them half-written
# (round-to.json); each worker builds its own session fixtures. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

test: $(STAMP) $(FED_VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not quiet"
	$(PY) -m pytest -q -m quiet
	$(FED_PY) -m pytest -q -p no:cacheprovider tests/federated

bench: $(STAMP)
	for f in $(filter-out benchmarks/peers.py,$(wildcard benchmarks/[!_]*.py)); do $(PY) $$f || exit 1; done
	$(PY) benchmarks/serve.py --model minilm

# compactai against its peers (BENCHMARKS.md). The peers pin other versions of shared libraries,
# so they get their own venv (build/ is git-ignored); each peer installs separately and one that
# fails is reported in the table with its pip error (build/peers-venv/install-errors/).
PEERS_VENV ?= build/peers-venv
PEERS := optimum-onnx openvino nncf torch-pruning

$(PEERS_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[text]"
	mkdir -p $(PEERS_VENV)/install-errors
	for p in $(PEERS); do $(PEERS_VENV)/bin/python -m pip install -q -c constraints.txt $$p \
	    2> $(PEERS_VENV)/install-errors/$$p.txt && rm -f $(PEERS_VENV)/install-errors/$$p.txt; done; true
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	flock /tmp/compactai-bench.lock nice -n -10 $(PEERS_VENV)/bin/python benchmarks/peers.py

lint: $(STAMP)
	$(VENV)/bin/ruff check compactai tests benchmarks
	$(VENV)/bin/mypy compactai

clean:
	rm -rf $(VENV) build *.egg-info

# LiteRT's and ExecuTorch's converters and runtimes in their own venvs (docs/runtimes.md): their
# dependency trees would change packages of the shared environment. compactai finds them at
# build/litert-venv and build/executorch-venv (or $COMPACTAI_LITERT_PYTHON / $COMPACTAI_EXECUTORCH_PYTHON).
LITERT_VENV ?= build/litert-venv
EXECUTORCH_VENV ?= build/executorch-venv
runtime-venvs:
	$(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/pip install -c constraints.txt litert-torch ai-edge-litert
	$(PYTHON) -m venv $(EXECUTORCH_VENV)
	$(EXECUTORCH_VENV)/bin/pip install -c constraints.txt executorch torch==2.13.0
