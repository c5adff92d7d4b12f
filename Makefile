# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use and install olmstead into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo lint bench

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

demo: $(VENV)/.installed
	$(BIN)/olmstead demo

# the README's performance table (full sizes; the big stores are built once, then reused)
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,homeserver,postgres]'
	touch $@
