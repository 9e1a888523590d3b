"""jaxbn: Batch Normalization for JAX as pure functions over explicit state.

The Flax modules (:mod:`jaxbn.linen`, :mod:`jaxbn.nnx`), the equinox and haiku modules
(:mod:`jaxbn.equinox`, :mod:`jaxbn.haiku`) and the PyTorch interop (:mod:`jaxbn.interop`)
are submodules loaded on first use, so ``import jaxbn`` needs none of those frameworks.

Example:

>>> import jax.numpy as jnp, jaxbn
>>> params, stats = jaxbn.init(2)
>>> y, stats = jaxbn.batch_norm(jnp.array([[0.0, 1.0], [2.0, 3.0]]), params, stats,
...                             training=True, epsilon=1e-12)
>>> y
Array([[-1., -1.],
       [ 1.,  1.]], dtype=float32)
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from types import ModuleType
from typing import TYPE_CHECKING

from jaxbn import _serialization  # noqa: F401  (registers the state types with jax.export)
from jaxbn.core import (
    BatchNormParams,
    BatchStats,
    Moments,
    batch_norm,
    feature_axes,
    fold,
    init,
    moments,
    normalize,
    update_stats,
)
from jaxbn.fused import batch_norm_act
from jaxbn.precise import precise_batch_stats
from jaxbn.variants import batch_renorm, ghost_batch_norm

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from jaxbn import equinox as equinox
    from jaxbn import haiku as haiku
    from jaxbn import interop as interop
    from jaxbn import linen as linen
    from jaxbn import nnx as nnx

try:  # the version lives in pyproject.toml only; installed metadata carries it here
    __version__: str = _metadata.version("jaxbn")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BatchNormParams",
    "BatchStats",
    "Moments",
    "batch_norm",
    "batch_norm_act",
    "batch_renorm",
    "feature_axes",
    "fold",
    "ghost_batch_norm",
    "init",
    "moments",
    "normalize",
    "precise_batch_stats",
    "update_stats",
]

_LAZY = ("equinox", "haiku", "interop", "linen", "nnx")


def __getattr__(name: str) -> ModuleType:
    """Imports the framework submodules (``linen``, ``nnx``, ``equinox``, ``haiku``) and
    ``interop`` on first use."""
    if name in _LAZY:
        return importlib.import_module(f"jaxbn.{name}")
    raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
