# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUIM_RAW ?= ../shared/data/suim-sample
DEMO_DATA ?= runs/data/demo
DEMO_OUT ?= runs/demo
# Offline machines cannot fetch DINO weights: the demo defaults to an announced random-weight
# run. `make demo DEMO_WEIGHTS=pretrained` fetches the official ViT-S/16; a file path works too.
DEMO_WEIGHTS ?= random

.PHONY: demo test test-all clean

# The demo needs only pip; the tests also build the CRF extra (pydensecrf2, a C++ compiler).
$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,crf,demo]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/python scripts/demo_data.py $(DEMO_DATA) --suim $(SUIM_RAW)
	$(BIN)/datus predict --config configs/demo.yaml --data.root $(DEMO_DATA) --output_dir $(DEMO_OUT) --model.weights $(DEMO_WEIGHTS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.test
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf runs .pytest_cache
