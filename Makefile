# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS ?= dev,text,distributed

.PHONY: demo test install bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed: check constraints.txt" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compactai profile --example digits

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check compactai tests benchmarks
	$(VENV)/bin/mypy compactai

clean:
	rm -rf $(VENV) build *.egg-info
