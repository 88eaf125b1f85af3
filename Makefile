# Two entry points for a fresh machine (see README.md):
#   make run   set up .venv and run the pipeline (`dvc repro`) on the bundled default data set
#   make test  set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DVC runs each stage's command through a shell: put the venv's `colam` first on its PATH, and
# anchor MLflow's default store to this folder (queued `dvc exp` runs work in a temporary copy).
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
WITH_VENV := PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)"

.PHONY: setup run run-fashion-mnist test docs clean

setup: $(VENV)/.installed

# Reinstall when the dependencies change; -c pins every package to the tested version.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/python -m pipelines.plots .dvc/plots/offline.html
	touch $@

run: setup
	@# A copy without git history (an archive) has no repository for DVC to live in.
	@git rev-parse --git-dir >/dev/null 2>&1 || $(BIN)/dvc config --local core.no_scm true
	$(WITH_VENV) $(BIN)/dvc repro
	$(WITH_VENV) $(BIN)/dvc plots show --out runs/plots >/dev/null
	@echo
	@cat runs/summary/table.md
	@echo
	@echo "comparison table:  runs/summary/table.md (and summary.json, metrics.json)"
	@echo "plots:             runs/summary/accuracy_vs_temperature.png, runs/plots/index.html (offline)"
	@echo "COLAM run:         runs/main/stage_*/ (checkpoints, soft labels), runs/main/eval/metrics.json"
	@echo "analyses:          runs/analysis/{curves,expected_accuracy,geometry,soft_labels,grid}/ (PNG, table.md, results.json)"
	@echo "MLflow UI:         $(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)"
	@echo "                   then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (model training)"
	@echo "champion model:    models:/NAME@champion, NAME = params.yaml tracking.register (best validation accuracy)"

# The same pipeline on Fashion-MNIST, as a DVC experiment in the workspace: the run settings of
# configs/fashion_mnist.yaml laid over params.yaml, the pipeline's own below. The data come from
# Debian's dataset-fashion-mnist, or FASHION_MNIST_SOURCE=download (torchvision's mirrors).
FASHION_MNIST_SOURCE ?= /usr/share/datasets/fashion-mnist
FASHION_MNIST_PIPELINE := -S raw_data.source=$(FASHION_MNIST_SOURCE) -S 'compare.temperatures=[0.5,1.0,2.0]' \
	-S 'analysis.grid.epochs_per_stage=[5,10]' -S 'analysis.grid.peers=[10,all]' \
	-S tracking.experiment=colam-fashion-mnist

run-fashion-mnist: setup
	$(WITH_VENV) $(BIN)/dvc exp run $$($(BIN)/python -m pipelines.params dvc-sets configs/fashion_mnist.yaml) \
		$(FASHION_MNIST_PIPELINE)

test: setup
	$(BIN)/python -m pytest -q

# The docs site (mkdocs.yml, docs/) into site/; --strict turns a broken link or reference into an error.
# NO_MKDOCS_2_WARNING: mkdocs-material prints a banner about MkDocs 2 on every build otherwise.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf runs data/prepared dvc_plots .pytest_cache
