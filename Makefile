# One-command set-up: both targets create .venv/ on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint tiny-model clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hermes-bot run

test: $(STAMP)
	$(VENV)/bin/ruff check bot tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check bot tests bench

tiny-model: $(STAMP)
	$(VENV)/bin/hermes-bot dev tiny-model data/tiny-model

clean:
	rm -rf $(VENV) .pytest_cache
