"""jaxbn: Batch Normalization for JAX as pure functions over explicit state.

>>> import jax.numpy as jnp, jaxbn
>>> params, stats = jaxbn.init(2)
>>> y, stats = jaxbn.batch_norm(jnp.array([[0.0, 1.0], [2.0, 3.0]]), params, stats,
...                             training=True)
>>> y
Array([[-0.999995, -0.999995],
       [ 0.999995,  0.999995]], dtype=float32)
"""

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

__version__ = "0.1.0"

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
