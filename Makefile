# Two entry points: `make demo` (sample-data audit) and `make test` (`make check`, then the suite).
# Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test check benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipdq demo

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy clipdq flows

test: $(STAMP) check
	scripts/install-chromium.sh
	$(VENV)/bin/python -m pytest

benchmark: $(STAMP)
	$(VENV)/bin/python benchmarks/sample_quality.py

clean:
	rm -rf $(VENV) reports sample_data/images sample_data/*.parquet sample_data/spec.yaml sample_data/model
