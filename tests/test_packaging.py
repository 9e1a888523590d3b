"""Packaging facts that hold in the checkout (the installed wheel: scripts/check_wheel.sh)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_comes_from_the_package_metadata():
    assert jaxbn.__version__ == PYPROJECT["project"]["version"]


def test_import_needs_neither_flax_nor_torch():
    code = ("import sys, jaxbn; print(sorted(m for m in ('flax', 'torch', 'optax', "
            "'equinox', 'haiku') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["[]"]

