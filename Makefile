# Two entry points: `make demo` (sample-data audit) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipdq demo

test: $(STAMP)
	scripts/install-chromium.sh
	$(VENV)/bin/python -m pytest

benchmark: $(STAMP)
	$(VENV)/bin/python benchmarks/sample_quality.py

clean:
	rm -rf $(VENV) reports sample_data/images sample_data/*.parquet sample_data/spec.yaml sample_data/model
