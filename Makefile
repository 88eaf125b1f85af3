# Two entry points for a fresh machine (see README.md):
#   make run   set up .venv and train COLAM on the bundled default data set
#   make test  set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/digits-colam

.PHONY: setup run test clean

setup: $(VENV)/.installed

# Reinstall when the dependencies change; -c pins every package to the tested version.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

run: setup
	$(BIN)/colam train --config configs/digits.yaml --out $(RUN_DIR)
	@echo "metrics: $(RUN_DIR)/metrics.json   per-epoch log: $(RUN_DIR)/history.csv   soft labels: $(RUN_DIR)/stage_*/soft_labels.npy"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
