# The two set-up commands of the README. Each works on a fresh machine: it builds .venv from
# requirements.txt first (once), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

# pip's per-package lines are the progress display: the build takes minutes (about 3 with pip's cache warm).
$(VENV)/installed: requirements.txt
	@echo "Building $(VENV) from requirements.txt, once (about 3 min with pip's download cache warm, longer cold)."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@
	@echo "Built $(VENV). Run Python from it: $(PY) main.py ..., or 'source $(VENV)/bin/activate' first."

# The embedded default: the 2-D score-FPE demo (offline, a few minutes on 2 CPU cores).
demo: $(VENV)/installed
	$(PY) demo.py --workdir demo_out

test: $(VENV)/installed
	$(PY) -m pytest
