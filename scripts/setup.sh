#!/usr/bin/env bash
# The one set-up of this repository, shared by `make run`, `make test` and CI: a virtual environment ($VENV, default
# .venv) with CPU torch installed first (an unpinned torch would pull a multi-GB CUDA build), then lra-peft in
# editable mode with every extra (recipes, 8/4-bit, plots, tests). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" scripts/versions.py
