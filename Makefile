# Two commands: `make demo` (set up + run the engine on its embedded default) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench chaos clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/stream-app demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# two test processes (pytest-xdist), a module's tests in one of them: each starts its own
# brokers and Redis; most of a test's time is waiting on real processes
PYTEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadscope --durations=25

chaos: setup
	$(BIN)/python bench/chaos.py --seconds 300 --broker embedded
	$(BIN)/python bench/chaos.py --seconds 300 --broker kafka

bench: setup
	$(BIN)/python bench/throughput.py --profile
	$(BIN)/python bench/pipeline_cost.py
	$(BIN)/python bench/producer.py
	$(BIN)/python bench/scaleout.py
	$(BIN)/python bench/memory.py --label "make bench"
	$(BIN)/python bench/clustering.py
	$(BIN)/python bench/triggers.py

clean:
	rm -rf $(VENV) .stream-app .pytest_cache .mypy_cache .ruff_cache .hypothesis
