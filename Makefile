# Set-up and the two commands the README names: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch, installed before the package so pip never picks a CUDA build for CI.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test setup

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/distsave demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
