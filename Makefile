# tunefile — the two commands the README starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TUNEFILE := $(VENV)/bin/tunefile

.PHONY: install demo test lint golden schema docs bench clean

# A virtual environment with tunefile installed in editable mode (compiler only: no torch).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: validate, explain and compile examples/demo.yml, then verify it.
demo: install
	$(TUNEFILE) validate examples/demo.yml
	$(TUNEFILE) explain examples/demo.yml
	$(TUNEFILE) compile examples/demo.yml --output demo-out/bundle --force
	$(TUNEFILE) verify demo-out/bundle
	@echo "Read the bundle: demo-out/bundle/README.md, launch.sh, job.sbatch, config.yaml"

test: install
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check compiler runtime tests bench

lint: install
	$(VENV)/bin/ruff check compiler runtime tests bench

# Rewrite golden/ after an intended change; review the diff before committing.
golden: install
	$(PY) -m pytest -q tests/test_golden.py --update-golden

# Regenerate the checked-in JSON Schema and the README's config reference.
schema: install
	$(TUNEFILE) schema --output schemas/tunefile.schema.json
	$(TUNEFILE) schema --readme README.md

bench: install
	$(PY) bench/compile_speed.py

clean:
	rm -rf demo-out .pytest_cache
