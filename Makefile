# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench system-packages

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Debian packages the tests use, as package:command: kcat (a third-party Kafka client), and
# chromium with its chromedriver (the dashboard's browser test). Best effort: without apt (or
# root) the tests that need them are skipped and say why.
SYSTEM_PACKAGES := kcat:kcat chromium:chromium chromium-driver:chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-packages:
	@missing=""; for pc in $(SYSTEM_PACKAGES); do command -v $${pc#*:} >/dev/null || missing="$$missing $${pc%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    ($(SUDO) apt-get install -y -q $$missing >/dev/null 2>&1 || \
	     ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q $$missing >/dev/null 2>&1)) || \
	    echo "could not install$$missing with apt-get: the tests that need them will be skipped"; \
	  else echo "no apt-get: install$$missing for the interop and browser tests"; fi; fi

# torch first, pinned: a bare `torch` requirement with no torch installed pulls the CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/labloop demo --report demo_report.json --plot demo_trajectory.png

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check schemas models streams consumers tests
	$(BIN)/mypy schemas models streams consumers

clean:
	rm -rf .labloop demo_report.json demo_trajectory.png .pytest_cache
