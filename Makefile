# The README's two commands: `make run` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Trains the default config on the embedded synthetic data set; prints validation Dice and mIoU.
run: $(STAMP)
	$(PY) launch.py --config=configs/dice_bce.py --workdir=runs/make_run

# The formatter's check and the linter (settings in pyproject.toml), then the whole suite
# on two workers; the 25 slowest tests are listed at the end (where the suite's time goes).
test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --durations=25 tests

clean:
	rm -rf $(VENV) runs
