"""jaxbn: Batch Normalization for JAX as pure functions over explicit state.

>>> import jax.numpy as jnp, jaxbn
>>> params, stats = jaxbn.init(2)
>>> y, stats = jaxbn.batch_norm(jnp.array([[0.0, 1.0], [2.0, 3.0]]), params, stats,
...                             training=True)
>>> y.round(6)  # (x - mean) / sqrt(var + 1e-5): the epsilon shows in the 6th digit
Array([[-0.999995, -0.999995],
       [ 0.999995,  0.999995]], dtype=float32)
"""

from importlib import metadata as _metadata

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
from jaxbn.precise import precise_batch_stats
from jaxbn.variants import batch_renorm, ghost_batch_norm

try:  # the version lives in pyproject.toml only; installed metadata carries it here
    __version__: str = _metadata.version("jaxbn")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BatchNormParams",
    "BatchStats",
    "Moments",
    "batch_norm",
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
