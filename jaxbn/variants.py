"""BatchNorm variants for small batches: Batch Renormalization and Ghost BatchNorm.

Both follow the conventions of :func:`jaxbn.batch_norm` (same keywords, same state types,
same synchronization and mask semantics) and are built from the core's building blocks:
:func:`jaxbn.moments`, :func:`jaxbn.normalize` and :func:`jaxbn.update_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn.core import (
    Array,
    ArrayLike,
    Axis,
    AxisName,
    BatchNormParams,
    BatchStats,
    DTypeLike,
    Moments,
    _validate,
    batch_norm,
    moments,
    normalize,
    update_stats,
)

__all__ = ["batch_renorm", "ghost_batch_norm", "select"]


def batch_renorm(
    x: ArrayLike,
    params: BatchNormParams | None,
    stats: BatchStats,
    *,
    training: bool,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: Axis = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
    fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, BatchStats]:
    """Batch Renormalization (Ioffe, 2017).

    In training, with batch statistics ``mu_B, sigma_B`` and running ones ``mu, sigma``
    (``sigma = sqrt(var + epsilon)``)::

        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = ((x - mu_B) / sigma_B * r + d) * scale + bias

    so the output the network learns on is the inference-time output whenever the batch's
    statistics are within the clipping range: small batches no longer shift what the layer
    computes at test time. ``r_max=1, d_max=0`` is plain BatchNorm. Inference is
    :func:`jaxbn.batch_norm` with the running statistics.

    Args:
      x, params, training, axis, momentum, epsilon, unbiased_running_var, axis_name,
      axis_index_groups, mask, fast_variance, dtype: as in :func:`jaxbn.batch_norm`.
      stats: running statistics (required: the corrections are relative to them).
      r_max: bound (>= 1) of the scale correction ``r``.
      d_max: bound (>= 0) of the shift correction ``d``, in running standard deviations.

    Returns:
      ``(y, new_stats)`` as :func:`jaxbn.batch_norm`.

    Raises:
      ValueError: as :func:`jaxbn.batch_norm`, and for ``stats=None``, ``r_max < 1`` or
        ``d_max < 0``.

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> params, stats = jaxbn.init(3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 3)) * 2 + 1
    >>> y, stats = batch_renorm(x, params, stats, training=True, r_max=1.0, d_max=0.0)
    >>> y_bn, _ = jaxbn.batch_norm(x, params, jaxbn.init(3)[1], training=True)
    >>> bool(jnp.allclose(y, y_bn, atol=1e-6))
    True
    """
    if stats is None:
        raise ValueError(
            "batch_renorm needs running statistics (stats), got None; create them with "
            "jaxbn.init(num_features)."
        )
    if not r_max >= 1.0:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}.")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}.")
    common = dict(axis=axis, momentum=momentum, epsilon=epsilon, dtype=dtype)
    if not training:
        return batch_norm(x, params, stats, training=False, **common)
    x, feats, mask = _validate(x, params, stats, training=training, axis_name=axis_name,
                               axis_index_groups=axis_index_groups, mask=mask, **common)
    m = moments(x, axis=axis, mask=mask, axis_name=axis_name,
                axis_index_groups=axis_index_groups, fast_variance=fast_variance)
    sigma_b = jnp.sqrt(m.var + epsilon)
    sigma = jnp.sqrt(stats.var + epsilon)
    r = lax.stop_gradient(jnp.clip(sigma_b / sigma, 1.0 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip((m.mean - stats.mean) / sigma, -d_max, d_max))
    scale = jnp.ones_like(r) if params is None else params.scale
    bias = jnp.zeros_like(d) if params is None else params.bias
    # (x - mu_B) / sigma_B * (r * scale) + (d * scale + bias): plain normalization with
    # corrected affine parameters.
    y = normalize(x, m.mean, m.var, BatchNormParams(scale * r, bias + scale * d), axis=axis,
                  epsilon=epsilon, dtype=dtype)
    new_stats = update_stats(stats, jax.tree.map(lax.stop_gradient, m), momentum=momentum,
                             unbiased_running_var=unbiased_running_var)
    return y, new_stats


def ghost_batch_norm(
    x: ArrayLike,
    params: BatchNormParams | None,
    stats: BatchStats | None,
    *,
    training: bool,
    virtual_batch_size: int,
    batch_axis: int = 0,
    axis: Axis = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
    fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, BatchStats | None]:
    """Ghost BatchNorm (Hoffer et al., 2017): statistics per virtual batch.

    ``batch_axis`` is split into consecutive virtual batches of ``virtual_batch_size``
    examples, each normalized with its own statistics, as if :func:`jaxbn.batch_norm` were
    vmapped over the splits. With ``axis_name`` the ``k``-th virtual batches of all devices
    are merged, so a ghost batch holds ``virtual_batch_size`` examples per device. The running
    statistics move towards the mean of the virtual batches' moments (variances made
    unbiased per virtual batch first when ``unbiased_running_var``). Inference is plain
    :func:`jaxbn.batch_norm`.

    Args:
      x, params, stats, training, axis, momentum, epsilon, unbiased_running_var, axis_name,
      axis_index_groups, mask, fast_variance, dtype: as in :func:`jaxbn.batch_norm`.
      virtual_batch_size: examples per virtual batch; must divide the batch size.
      batch_axis: the axis that holds the examples (not a feature axis).

    Returns:
      ``(y, new_stats)`` as :func:`jaxbn.batch_norm`.

    Raises:
      ValueError: as :func:`jaxbn.batch_norm`, and when ``virtual_batch_size`` does not
        divide the batch or ``batch_axis`` is a feature axis.

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> y, _ = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4)
    >>> y_first, _ = jaxbn.batch_norm(x[:4], None, None, training=True)
    >>> bool(jnp.allclose(y[:4], y_first, atol=1e-6))
    True
    """
    common = dict(axis=axis, momentum=momentum, epsilon=epsilon, dtype=dtype)
    if not training and stats is not None:
        return batch_norm(x, params, stats, training=False, **common)
    x, feats, mask = _validate(x, params, stats, training=training, axis_name=axis_name,
                               axis_index_groups=axis_index_groups, mask=mask, **common)
    if not -x.ndim <= batch_axis < x.ndim or batch_axis % x.ndim in feats:
        raise ValueError(
            f"batch_axis must be a non-feature axis of the rank-{x.ndim} input, got "
            f"batch_axis={batch_axis} with feature axes {feats}."
        )
    b = batch_axis % x.ndim
    v = virtual_batch_size
    if not isinstance(v, int) or v < 1 or x.shape[b] % v:
        raise ValueError(
            f"virtual_batch_size must be a positive divisor of the batch size "
            f"{x.shape[b]} (axis {b}), got {v!r}."
        )
    groups = x.shape[b] // v
    # Split the batch axis into (groups, v) and treat `groups` as one more feature axis:
    # the core's synced, masked moments then give per-virtual-batch statistics.
    split = x.shape[:b] + (groups, v) + x.shape[b + 1 :]
    xs = x.reshape(split)
    gfeats = tuple(sorted((b,) + tuple(a + 1 if a > b else a for a in feats)))
    if xs.size // (x.shape[b] * math.prod(x.shape[a] for a in feats)) * v <= 1 and (
        axis_name is None
    ):
        raise ValueError(
            f"expected more than 1 value per feature in each virtual batch, got input shape "
            f"{x.shape} with virtual_batch_size={v}; use a larger virtual batch."
        )
    ms = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(split)
    m = moments(xs, axis=gfeats, mask=ms, axis_name=axis_name,
                axis_index_groups=axis_index_groups, fast_variance=fast_variance)
    y = normalize(xs, m.mean, m.var, None, axis=gfeats, epsilon=epsilon, dtype=jnp.float32)
    # Put the virtual-batch axis of the statistics first.
    m = jax.tree.map(lambda s: jnp.moveaxis(s, gfeats.index(b), 0), m)
    if params is not None:
        fshape = [1] * x.ndim
        for a in feats:
            fshape[a] = x.shape[a]
        y = y.reshape(x.shape) * params.scale.reshape(fshape) + params.bias.reshape(fshape)
    y = y.reshape(x.shape).astype(dtype or x.dtype)
    if stats is None or not training:
        return y, stats
    m = jax.tree.map(lax.stop_gradient, m)
    n, var = m.count, m.var
    if unbiased_running_var:
        var = jnp.where(n > 1, var * n / jnp.maximum(n - 1, 1), var)
    # A virtual batch with no valid element takes no part in the average.
    has = (n > 0).astype(var.dtype)
    k = jnp.maximum(has.sum(0), 1)
    avg = Moments((m.mean * has).sum(0) / k, (var * has).sum(0) / k, n.sum(0))
    new_stats = update_stats(stats, avg, momentum=momentum, unbiased_running_var=False)
    return y, new_stats


def select(
    *, renorm: bool = False, r_max: float = 3.0, d_max: float = 5.0,
    virtual_batch_size: int | None = None,
) -> Callable[..., tuple[Array, BatchStats | None]]:
    """The normalization function with :func:`jaxbn.batch_norm`'s signature for a choice.

    Used by the Flax modules to map their ``renorm`` / ``virtual_batch_size`` keywords to
    :func:`batch_renorm`, :func:`ghost_batch_norm` or plain :func:`jaxbn.batch_norm`.

    Args:
      renorm: use Batch Renormalization with ``r_max`` and ``d_max``.
      r_max: see :func:`batch_renorm`.
      d_max: see :func:`batch_renorm`.
      virtual_batch_size: use Ghost BatchNorm with virtual batches of this size.

    Returns:
      A function ``(x, params, stats, *, training, **batch_norm_keywords) -> (y, stats)``.

    Raises:
      ValueError: when both variants are asked for.

    >>> select() is batch_norm
    True
    """
    if renorm and virtual_batch_size is not None:
        raise ValueError(
            f"choose one of renorm=True and virtual_batch_size, got both (virtual_batch_size="
            f"{virtual_batch_size})."
        )
    if renorm:
        return partial(batch_renorm, r_max=r_max, d_max=d_max)
    if virtual_batch_size is not None:
        return partial(ghost_batch_norm, virtual_batch_size=virtual_batch_size)
    return batch_norm
