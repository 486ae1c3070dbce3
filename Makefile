# The two set-up commands of the README: `make install` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test]"
	$(VENV)/bin/python -m paddlemix.kernels build
	touch $@

.PHONY: install test
install: $(STAMP)
	$(VENV)/bin/python examples/clip/run_pretrain_dist.py configs/train/demo.json

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
