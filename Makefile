# The two set-up commands of the README. Each works on a fresh machine: it builds .venv from
# requirements.txt first (once), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The embedded default: the 2-D score-FPE demo (offline, a few minutes on 2 CPU cores).
demo: $(VENV)/installed
	$(PY) demo.py --workdir demo_out

test: $(VENV)/installed
	$(PY) -m pytest
