# Two entry points (see README): `make run` and `make test`. Both create .venv on first use and
# reuse it afterwards; the stamp file is rebuilt only when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data/default

.PHONY: setup run test bench clean

setup: $(STAMP)

# Without a CUDA driver, pin the CPU build of torch first so pip does not pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,production]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/recblr run --data-dir $(DATA_DIR)

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) data/default
