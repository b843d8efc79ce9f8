# genserve: the two commands a fresh machine needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Installed first and on its own: the project accepts torch>=2.4 (the CUDA image installs a CUDA wheel),
# but a fresh `make test` must keep the CPU build this pin resolves to here, not the newest (CUDA) release.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup serve test mutation bench-ar bench-diffusion clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(PY) -m service $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

$(VENV)/.mutation-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,mutation]'
	touch $@

# mutmut over the engine-core modules with their unit tests -> docs/mutation.md (not in CI: about 15 min on 2 cores)
mutation: $(VENV)/.mutation-installed
	$(PY) tools/mutation/run.py $(ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench-ar: $(VENV)/.bench-installed
	$(PY) -m loadtest.benchmarks.bench_ar $(ARGS)

bench-diffusion: $(VENV)/.bench-installed
	$(PY) -m loadtest.benchmarks.bench_diffusion $(ARGS)

clean:
	rm -rf $(VENV) .bench build *.egg-info mutants
