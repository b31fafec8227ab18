# The front door: `make demo`, `make test`, `make airflow`, `make bench`, `make stack`, `make load`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test airflow bench stack load clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/pointflow demo

test: install
	$(BIN)/pytest

airflow: install
	$(BIN)/pointflow airflow standalone

bench: install
	$(BIN)/python -m benchmarks

stack: install
	$(BIN)/pointflow stack up

load: install
	$(BIN)/python -m benchmarks.load

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
