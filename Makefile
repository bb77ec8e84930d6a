# tunefile — the two commands the README starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TUNEFILE := $(VENV)/bin/tunefile

.PHONY: install demo test test-gpu lint golden schema bench clean

# torch goes in first, pinned: on the project's machines this takes a CPU wheel from local disk,
# where an unpinned resolve by another package could fetch a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

# A virtual environment with tunefile installed in editable mode, with the runtime, the chat page and dev tools.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[train,ui,dev]'
	# DeepSpeed builds against the installed torch (hence no build isolation); its ops compile just in
	# time where they are used, so it installs on the CPU and tests parse its config there.
	$(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.15'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: a tiny random model, examples/demo.yml compiled for the
# detected hardware, about a minute of LoRA training on a small chat set, then the adapter answering.
demo: install
	rm -rf demo-out
	$(TUNEFILE) tiny-model demo-out/tiny-model
	$(TUNEFILE) explain examples/demo.yml
	$(TUNEFILE) train examples/demo.yml
	$(TUNEFILE) verify demo-out/outputs/bundle
	@echo
	@echo "The adapter is in demo-out/outputs/ (adapter_model.safetensors); the bundle that ran is demo-out/outputs/bundle/."
	@echo "Asking it (tunefile inference examples/demo.yml --prompt 'Say red.'):"
	@$(TUNEFILE) inference examples/demo.yml --prompt 'Say red.' --max-new-tokens 8 2>/dev/null
	@echo "More: tunefile inference examples/demo.yml (prompts from stdin), --gradio (a chat page), merge-lora examples/demo.yml."

# CPU tests; tests marked `gpu` run on a GPU machine with `make test-gpu`.
test: install
	$(PY) -m pytest -q -m "not gpu"
	$(VENV)/bin/ruff check compiler runtime tests bench

test-gpu: install
	$(PY) -m pytest -q -m gpu

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
