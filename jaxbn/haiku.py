"""``jaxbn.haiku.BatchNorm``: a drop-in replacement for :class:`haiku.BatchNorm`.

A subclass of haiku's module that keeps its constructor, parameters (``scale``,
``offset``) and state (the ``ExponentialMovingAverage`` submodules ``mean_ema`` and
``var_ema``, with their ``counter``, ``hidden`` and zero-debiased ``average``), so that
``hk.transform_with_state`` params and state load into either class; only the statistics
change: :func:`jaxbn.moments`'s stable two-pass variance, merged exactly over
``cross_replica_axis``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _modules, core

__all__ = ["BatchNorm", "batch_moments", "reduction_axes"]


def reduction_axes(ndim: int, channel_index: int, axis: Sequence[int] | None
                   ) -> tuple[int, ...]:
    """The axes haiku's BatchNorm reduces over, non-negative and sorted.

    Args:
      ndim: the input's rank.
      channel_index: haiku's channel index (from ``data_format``), possibly negative.
      axis: the module's ``axis``, or ``None`` for every axis but the channel axis.

    Returns:
      The reduction axes.

    Raises:
      ValueError: if an axis is out of range for the input.

    Example:

    >>> reduction_axes(4, -1, None), reduction_axes(4, 1, None), reduction_axes(3, -1, [0, -2])
    ((0, 1, 2), (0, 2, 3), (0, 1))
    """
    if axis is None:
        return tuple(i for i in range(ndim) if i != channel_index % ndim)
    for a in axis:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"BatchNorm axis {a} is out of range for an input of rank {ndim}: expected "
                f"reduction axes in [{-ndim}, {ndim - 1}]."
            )
    return tuple(sorted({a % ndim for a in axis}))


class BatchNorm(hk.BatchNorm):
    """Batch Normalization, a drop-in for :class:`haiku.BatchNorm`.

    The constructor is haiku's (this class inherits it): ``BatchNorm(create_scale,
    create_offset, decay_rate, eps=1e-5, scale_init=None, offset_init=None, axis=None,
    cross_replica_axis=None, cross_replica_axis_index_groups=None,
    data_format="channels_last", name=None)``, and so are the call, the parameter and state
    names, shapes and dtypes, and the state's values: the batch statistics feed the same
    ``mean_ema`` / ``var_ema`` moving averages (decay ``decay_rate``, zero-debiased) in the
    input's dtype. Training and ``test_local_stats`` normalize with the batch statistics,
    differentiated through them; evaluation with the averages.

    Differences, all in the numerics: the variance is the stable two-pass one (haiku's is
    ``E[x^2] - E[x]^2``, which loses every digit when ``|mean| >> std``); the statistics
    and the normalization run in float32 for half-precision inputs (the output and the
    averages keep the input's dtype); over ``cross_replica_axis`` the members' moments are
    merged exactly (Chan et al.), under ``pmap``, ``vmap`` and ``shard_map`` alike; and
    negative entries of ``axis`` count from the end (haiku's parameter shape ignores them).

    Example:

    >>> import jax, jax.numpy as jnp, haiku as hk
    >>> from jaxbn.haiku import BatchNorm
    >>> f = hk.transform_with_state(
    ...     lambda x, train: BatchNorm(True, True, decay_rate=0.9)(x, is_training=train))
    >>> x = jax.random.normal(jax.random.key(0), (16, 3)) * 2 + 5
    >>> params, state = f.init(None, x, train=True)
    >>> sorted(state)
    ['batch_norm/~/mean_ema', 'batch_norm/~/var_ema']
    >>> y, state = f.apply(params, state, None, x, train=True)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
    True
    >>> y_eval, _ = f.apply(params, state, None, x, train=False)
    """

    def __call__(
        self,
        inputs: jax.Array,
        is_training: bool,
        test_local_stats: bool = False,
        scale: jax.Array | None = None,
        offset: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``inputs`` with batch or moving-average statistics.

        Args:
          inputs: an array of rank >= 1; the channel axis comes from ``data_format``.
          is_training: use the batch statistics and update the moving averages.
          test_local_stats: use the batch statistics when ``is_training=False``.
          scale: a scale broadcastable to ``inputs``, only if ``create_scale=False``.
          offset: an offset broadcastable to ``inputs``, only if ``create_offset=False``.

        Returns:
          The normalized array, of the shape of ``inputs``.

        Raises:
          ValueError: for ``scale``/``offset`` given with ``create_scale``/
            ``create_offset``, and for ``axis`` entries out of range.
        """
        if self.create_scale and scale is not None:
            raise ValueError("Cannot pass `scale` at call time if `create_scale=True`.")
        if self.create_offset and offset is not None:
            raise ValueError("Cannot pass `offset` at call time if `create_offset=True`.")
        x = jnp.asarray(inputs)
        # haiku's statistics have jnp.mean's dtype: the input's, or the default float dtype
        # for integer inputs; the moving averages are kept in it.
        stat_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.result_type(float)
        red = reduction_axes(x.ndim, self.channel_index, self.axis)
        keep = tuple(1 if i in red else n for i, n in enumerate(x.shape))
        if is_training or test_local_stats:
            mean, var = self._batch_moments(x.astype(stat_dtype), red, keep)
        else:  # the averages, in float32 or wider (haiku: in the input's dtype)
            wide = jnp.float32 if jnp.dtype(stat_dtype).itemsize < 4 else stat_dtype
            mean = self.mean_ema.average.astype(wide)
            var = self.var_ema.average.astype(wide)
        if is_training:
            self.mean_ema(mean.astype(stat_dtype))
            self.var_ema(var.astype(stat_dtype))
        if self.create_scale:
            scale = hk.get_parameter("scale", keep, x.dtype, self.scale_init)
        elif scale is None:
            scale = jnp.ones([], x.dtype)
        if self.create_offset:
            offset = hk.get_parameter("offset", keep, x.dtype, self.offset_init)
        elif offset is None:
            offset = jnp.zeros([], x.dtype)
        out_dtype = jnp.result_type(stat_dtype, scale, offset)
        # Explicit casts: the arithmetic runs in the statistics' dtype, also under strict
        # dtype promotion with half-precision inputs.
        sdt = mean.dtype
        inv = lax.rsqrt(var + lax.convert_element_type(self.eps, sdt))
        y = (x.astype(sdt) - mean) * (inv * jnp.asarray(scale).astype(sdt)) + jnp.asarray(
            offset).astype(sdt)
        return y.astype(out_dtype)

    def _batch_moments(self, x: jax.Array, red: tuple[int, ...], keep: tuple[int, ...]
                       ) -> tuple[jax.Array, jax.Array]:
        """The batch mean and variance (float32 or wider) in the shape ``keep``."""
        m = batch_moments(self, x, red)
        return m.mean.reshape(keep), m.var.reshape(keep)


def batch_moments(module: Any, x: jax.Array, red: tuple[int, ...]) -> core.Moments:
    """A haiku BatchNorm's batch moments of ``x``: over ``red`` and ``cross_replica_axis``.

    Args:
      module: a :class:`haiku.BatchNorm` (or this module), for ``cross_replica_axis`` and
        ``cross_replica_axis_index_groups``.
      x: a floating-point input.
      red: the reduction axes (:func:`reduction_axes`).

    Returns:
      :class:`jaxbn.Moments` of the shape of the non-reduced axes (``(1,)`` if none).

    Example:

    >>> import types, jax.numpy as jnp
    >>> m = types.SimpleNamespace(cross_replica_axis=None, cross_replica_axis_index_groups=None)
    >>> batch_moments(m, jnp.array([[1.0, 2.0], [3.0, 6.0]]), (0,)).var
    Array([1., 4.], dtype=float32)
    """
    feats = tuple(i for i in range(x.ndim) if i not in red)
    if not feats:  # every axis reduced: one feature, on an axis of its own
        x, feats = x[..., None], (x.ndim,)
    names = module.cross_replica_axis
    if isinstance(names, list | tuple):
        names = tuple(names)
    return _modules.synced_moments(x, axis=feats, axis_name=names or None,
                                   axis_index_groups=module.cross_replica_axis_index_groups)
