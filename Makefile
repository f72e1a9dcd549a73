# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= dev,text,distributed,openvino

.PHONY: demo test install bench lint clean runtime-venvs

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed: check constraints.txt" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in example: the default budget (p90 latency <= 0.5x, size <= 0.25x,
# quality >= 0.99x of the original), anytime-bounded to finish in under 5 minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/compactai profile --example digits
	rm -rf out/demo
	$(VENV)/bin/compactai optimize --example digits --max-minutes 2.5 -o out/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check compactai tests benchmarks
	$(VENV)/bin/mypy compactai

clean:
	rm -rf $(VENV) build *.egg-info

# LiteRT's and ExecuTorch's converters in their own venvs (docs/runtimes.md): their dependency
# trees would change packages of the shared environment
RUNTIME_VENVS ?= /work/venvs
runtime-venvs:
	$(PYTHON) -m venv $(RUNTIME_VENVS)/litert
	$(RUNTIME_VENVS)/litert/bin/pip install -c constraints.txt litert-torch ai-edge-litert
	$(PYTHON) -m venv $(RUNTIME_VENVS)/executorch
	$(RUNTIME_VENVS)/executorch/bin/pip install -c constraints.txt executorch torch==2.13.0
