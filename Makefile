# meshgate: every target creates .venv first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= src/meshgate/demo/seed.yaml

.PHONY: demo test fuzz lint fmt bench check clean

# The lock pins setuptools (75.8: bdist_wheel built in, as the editable build
# needs), so meshgate is built with it, in the venv, at the first try; pip
# checks pyproject's build requirement rather than failing on an old one.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
		--check-build-dependencies -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshgate demo

test: $(STAMP)
	$(PY) -m pytest -q

# The fuzz harnesses of tests/fuzz at length: MESHGATE_FUZZ_EXAMPLES random
# examples per test (`make test` runs them briefly, derandomized), with no
# per-test timeout. See docs/fuzzing.md.
MESHGATE_FUZZ_EXAMPLES ?= 10000
fuzz: $(STAMP)
	MESHGATE_FUZZ_EXAMPLES=$(MESHGATE_FUZZ_EXAMPLES) $(PY) -m pytest -q -o timeout=0 tests/fuzz

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy --strict src/

fmt: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

check: $(STAMP)
	$(VENV)/bin/meshgate check -c $(CONFIG)

bench: $(STAMP)
	$(PY) bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
