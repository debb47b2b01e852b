# The README's two commands: `make experiment` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

# Numerics-sensitive tests (equivalences, symmetries, encoders, the zoo): CI runs them again with
# OMP_NUM_THREADS=1 and with older-CPU kernels (.ci/run).
NUMERICS_TESTS := tests/test_zoo_training.py tests/test_zoo_families.py tests/test_symmetry.py \
    tests/test_weight_to_graph.py tests/test_gnn_encoder.py tests/test_edge_kernels.py tests/test_merging.py \
    tests/test_ddp.py tests/test_probes.py tests/test_reconstruction.py

.PHONY: install install-extra experiment test test-numerics clean

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

test-numerics: install
	$(PY) -m pytest -q $(NUMERICS_TESTS) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
