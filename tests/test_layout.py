"""The import rules of docs/development.md, read from the source with ``ast``.

Three layers: the library (``jaxbn/``), the program (``train/``), and what checks and
measures them (``benchmarks/``, ``tests/``). A layer imports only the ones below it, and
inside the library the core (``jaxbn/core.py`` and its private modules) needs nothing
but JAX, NumPy and the standard library. Each test lists every import that breaks its rule,
with file and line.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The core: the public functions and the private modules they are split into.
CORE = {"jaxbn.core", "jaxbn._checks", "jaxbn._reductions", "jaxbn._xla_cpu",
        "jaxbn._sharding", "jaxbn._autodiff"}
# The only library modules that may import a framework other than JAX, by framework.
FLAX = {"jaxbn.linen", "jaxbn.nnx", "jaxbn.precise_linen", "jaxbn.precise_nnx"}
TORCH = {"jaxbn.interop"}
FRAMEWORKS = {
    "flax": FLAX,
    "torch": TORCH,
    "equinox": {"jaxbn.equinox", "jaxbn.precise_equinox"},
    "haiku": {"jaxbn.haiku", "jaxbn.precise_haiku"},
}
REPO = {"jaxbn", "train", "benchmarks", "tests"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``source``, nested ones included.

    Relative imports are resolved against ``module``; ``from a import b`` yields ``a.b``
    too, since ``b`` may be a submodule.
    """
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _allowed(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or ``None`` if it may."""
    top = imported.split(".")[0]
    layer = importer.split(".")[0]
    if layer == "jaxbn":
        if top in REPO - {"jaxbn"}:
            return f"the library never imports {top}/"
        if importer in CORE:
            if top == "jaxbn" and imported != "jaxbn" and not any(
                    imported == m or imported.startswith(f"{m}.") for m in CORE):
                return "the core imports only itself from jaxbn"
            if top not in {"jax", "jaxlib", "numpy", "jaxbn"} | sys.stdlib_module_names:
                return "the core imports only jax, numpy and the standard library"
        if top in FRAMEWORKS and importer not in FRAMEWORKS[top]:
            return f"only {', '.join(sorted(FRAMEWORKS[top]))} import {top}"
    if layer == "train" and top in {"benchmarks", "tests"}:
        return f"the program never imports {top}/"
    if layer == "benchmarks" and top == "tests":
        return "benchmarks never import tests/"
    return None


def violations(files: dict[str, tuple[str, bool]]) -> list[str]:
    """``file:line: module imports name (rule)`` for each import that breaks a rule.

    ``files`` maps a module name to its ``(source, is_package)``.
    """
    out: dict[tuple[str, int, str], str] = {}
    for module, (source, is_package) in sorted(files.items()):
        for line, name in imports(module, source, is_package):
            why = _allowed(module, name)
            if why is not None:  # one report per statement and rule
                out.setdefault((module, line, why), f"{module}:{line}: imports {name} ({why})")
    return list(out.values())


def _tree(*dirs: str) -> dict[str, tuple[str, bool]]:
    return {_module_name(p): (p.read_text(), p.name == "__init__.py")
            for d in dirs for p in sorted((ROOT / d).rglob("*.py"))}


@pytest.mark.parametrize("layer", ["jaxbn", "train", "benchmarks"])
def test_each_layer_imports_only_the_layers_below_it(layer):
    files = _tree(layer)
    assert files, f"no Python files under {layer}/"
    assert violations(files) == []


def test_the_core_modules_exist():
    # The rule above is about nothing if the core's modules are renamed: keep CORE current.
    assert {m for m in _tree("jaxbn") if m in CORE} == CORE


@pytest.mark.parametrize("module, source, rule", [
    ("jaxbn.core", "import flax.linen as nn", "the core imports only jax"),
    ("jaxbn._reductions", "def f():\n    import optax", "the core imports only jax"),
    ("jaxbn._checks", "from jaxbn import variants", "the core imports only itself"),
    ("jaxbn._checks", "from . import linen", "the core imports only itself"),
    ("jaxbn.variants", "from train import lenet", "the library never imports train/"),
    ("jaxbn.precise", "import flax", "only jaxbn.linen"),
    ("jaxbn.linen", "import torch", "only jaxbn.interop"),
    ("jaxbn.precise", "import equinox as eqx", "only jaxbn.equinox"),
    ("jaxbn.equinox", "import haiku as hk", "only jaxbn.haiku"),
    ("train.lenet", "from benchmarks import harness", "the program never imports"),
    ("train.lenet", "import tests.reference", "the program never imports tests/"),
    ("benchmarks.bn", "from tests import synthetic", "benchmarks never import tests/"),
])
def test_a_broken_rule_is_reported(module, source, rule):
    found = violations({module: (source, False)})
    assert len(found) == 1 and rule in found[0], found


def test_allowed_imports_are_not_reported():
    files = {
        "jaxbn.core": ("import math\nimport jax\nfrom jaxbn._checks import validate", False),
        "jaxbn._checks": ("import numpy as np\nfrom jaxbn import core", False),
        "jaxbn.nnx": ("from flax import nnx\nfrom jaxbn import _modules, core", False),
        "jaxbn.interop": ("import torch", False),
        "jaxbn.equinox": ("import equinox as eqx\nfrom jaxbn import _sharding", False),
        "jaxbn.precise_haiku": ("import haiku as hk\nfrom jaxbn.haiku import BatchNorm", False),
        "train": ("from . import lenet", True),
        "train.lenet": ("import optax\nimport jaxbn\nfrom train import config", False),
        "benchmarks.lenet": ("from train import lenet", False),
        "tests.test_x": ("from benchmarks import bn\nfrom tests import reference", False),
    }
    assert violations(files) == []
