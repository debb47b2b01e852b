# The README's two commands: `make experiment` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install install-extra experiment test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

install: $(VENV)/.installed

install-extra: install
	$(PY) -m pip install -r requirements-extra.txt

experiment: install
	$(PY) run_experiment.py $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
