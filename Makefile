# The two commands: `make serve` and `make test`. Each bootstraps .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test serve venv data train clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

serve: venv
	$(BIN)/syncavatar serve

# Regenerate the training corpus and retrain (not run by CI; CI uses the shipped weights).
data: venv
	$(BIN)/syncavatar data --out data/corpus --clips 600 --seed 0

train: venv
	$(BIN)/syncavatar train --corpus data/corpus --out runs/ref

clean:
	rm -rf $(VENV) *.egg-info
