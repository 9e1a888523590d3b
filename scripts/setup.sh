#!/usr/bin/env bash
# Creates .venv and installs jaxbn (editable) with the extras for training, tests, PyTorch
# interop, the equinox and haiku modules, the documentation and the type check.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if command -v apt-get >/dev/null; then
      as_root apt-get update -q && as_root apt-get install -y -q python3-venv
    fi
    "$PY" -m venv .venv
  fi
fi
stamp=.venv/.jaxbn-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[train,test,torch,equinox,haiku,docs,typecheck]"
  touch "$stamp"
fi
