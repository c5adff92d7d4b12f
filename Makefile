# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use and install olmstead into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# matrix-js-sdk with its Rust crypto, a peer the tests drive with Node (pinned by its lock)
JSPEER := tests/jspeer

.PHONY: test demo lint bench jspeer

test: $(VENV)/.installed $(JSPEER)/node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

demo: $(VENV)/.installed
	$(BIN)/olmstead demo

# the README's performance table (full sizes; the big stores are built once, then reused)
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

$(VENV)/.installed: pyproject.toml | $(JSPEER)/node_modules/.installed
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,homeserver,postgres]'
	touch $@

jspeer: $(JSPEER)/node_modules/.installed

$(JSPEER)/node_modules/.installed: $(JSPEER)/package.json $(JSPEER)/package-lock.json
	cd $(JSPEER) && npm ci --no-audit --no-fund --loglevel=error
	touch $@
