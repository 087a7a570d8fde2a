# Two commands from a fresh clone (GNU Make):
#   make run    set up .venv, then the main job: the NER recipe (CoNLL-2003) with LRA at its defaults
#   make test   set up .venv, then ruff and the test suite
# Set-up (scripts/setup.sh) runs again only when pyproject.toml or the script changed. VENV=... picks another venv.
VENV ?= .venv
PYTHON ?= python3
OUTPUT_DIR ?= outputs/ner

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup run test

setup: $(VENV)/.lra-peft-installed

$(VENV)/.lra-peft-installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) PYTHON=$(PYTHON) scripts/setup.sh
	touch $@

run: setup
	$(VENV)/bin/accelerate launch recipes/ner.py --output_dir $(OUTPUT_DIR)

test: setup
	$(VENV)/bin/python scripts/versions.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q tests
