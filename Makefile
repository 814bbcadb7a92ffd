# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUIM_RAW ?= ../shared/data/suim-sample
DEMO_DATA ?= runs/data/suim
DEMO_OUT ?= runs/demo
# Offline machines cannot fetch DINO weights: the demo defaults to an announced random-weight
# run. `make demo DEMO_WEIGHTS=pretrained` fetches the official ViT-S/16; a file path works too.
DEMO_WEIGHTS ?= random

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: setup
	@test -d $(SUIM_RAW) || { echo "SUIM not found at $(SUIM_RAW): download SUIM and run 'make demo SUIM_RAW=/path/to/SUIM' (the folder holding train_val/)"; exit 1; }
	$(BIN)/datus prepare suim $(SUIM_RAW) $(DEMO_DATA) --classes coarse --overwrite
	$(BIN)/datus predict --config configs/demo.yaml --data.root $(DEMO_DATA) --output_dir $(DEMO_OUT) --model.weights $(DEMO_WEIGHTS)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf runs .pytest_cache
