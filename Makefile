# The two commands of the README: `make quickstart` (the main job) and `make test` (the test suite).
# Both create .venv and install the project on first use (scripts/install.sh picks the torch build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.orion-installed

.PHONY: quickstart demo test test-all lint bench install browser clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

browser:
	bash scripts/install-browser.sh

quickstart: $(STAMP)
	$(VENV)/bin/orion quickstart --preset tiny --out runs/quickstart-tiny

demo: $(STAMP)
	$(VENV)/bin/orion demo --preset micro --out runs/demo

# `make test` is what CI runs (.ci/run): every CPU test, however long. `make test-all` adds the tests
# marked `gpu` (they skip without CUDA); that is the only difference. There is no `slow` marker: a
# test marked slow would silently drop out of CI, so a long test is made shorter instead.
test: $(STAMP) browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -m "not gpu"

test-all: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache test-artifacts
