# One virtual environment for every target; created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= demo
STAMP := $(VENV)/.medclip-installed

.PHONY: test test-fast lint pretrain bench clean-venv

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the package metadata changes.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[train,dev,dicom,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check medclip tests bench

# Everything (CI runs this).
test: lint
	$(VENV)/bin/pytest -q --durations=30 tests

# The unit tier, for the edit-test loop: the `integration` tests are left out.
test-fast: lint
	$(VENV)/bin/pytest -q -m "not integration" tests

pretrain: $(STAMP)
	$(VENV)/bin/medclip pretrain --config pretrain/$(RECIPE).yaml

# Every bench (bench/_*.py are their shared helpers, not benches).
bench: $(STAMP)
	@set -e; for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)
