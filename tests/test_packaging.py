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



def _requirements() -> list[str]:
    project = PYPROJECT["project"]
    return [*project["dependencies"],
            *(r for reqs in project["optional-dependencies"].values() for r in reqs)]


def test_no_upper_bounds_and_every_lower_bound_is_pinned_for_test_min():
    """pyproject.toml declares lower bounds only, and scripts/min-versions.txt (what
    `make test-min` installs) pins each at exactly that bound: the bounds are the tested
    ones."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in (ROOT / "scripts" / "min-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    bounds = {}
    for text in _requirements():
        req = Requirement(text)
        for spec in req.specifier:
            assert spec.operator == ">=", f"{text}: expected lower bounds only (>=)"
            bounds.setdefault(canonicalize_name(req.name), set()).add(Version(spec.version))
    pinned = {"jax", "numpy", "flax", "optax", "orbax-checkpoint", "torch", "equinox", "dm-haiku"}
    for name in pinned:
        (bound,) = bounds[name]  # one bound per package, wherever it is declared
        assert pins[name] == bound, (name, bound, pins[name])  # 2.13 == 2.13.0
    assert pins["jaxlib"] == pins["jax"]  # jax's compiled half, released together
    assert set(pins) == pinned | {"jaxlib"}
