# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use and install olmstead into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo lint

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

demo: $(VENV)/.installed
	$(BIN)/olmstead demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,homeserver,postgres]'
	touch $@
