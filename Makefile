# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtualenv (.venv) on first use and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv test demo clean docs bench

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The whole suite, kernel tests included (they skip with a reason where the
# machine cannot mount overlays; on CI, as root, they run).
test: $(STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Builds a small damaged layer set from fixtures/demo.spec, checks it (-n),
# repairs it (-y), re-checks it clean, and undoes the repair.
demo: $(STAMP)
	$(PY) -m ovlfsck.demo demo

# Regenerates docs/problems.md from the problem catalog.
docs: $(STAMP)
	$(PY) -m ovlfsck problems --markdown > docs/problems.md

# Generates ~200,000-entry layer sets on a loop ext4 and times `check -n` against a
# one-pass Python floor (warm, cold, peak RSS, syscalls/entry). Needs root. See docs/performance.md.
bench: $(STAMP)
	$(PY) tests/bench/run.py --entries 200000 --json bench-result.json

clean:
	rm -rf $(VENV) build *.egg-info demo .pytest_cache
