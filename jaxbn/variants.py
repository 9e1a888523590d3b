"""BatchNorm variants for small batches: Batch Renormalization and Ghost BatchNorm.

Both follow the conventions of :func:`jaxbn.batch_norm` (same keywords, same state types,
same synchronization and mask semantics, same derivatives in both modes) and are built
from the core's building blocks: :func:`jaxbn.core.validate`,
:func:`jaxbn.core.batch_normalize`, :func:`jaxbn.core.unbiased` and
:func:`jaxbn.update_stats`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import core
from jaxbn.core import (
    Array,
    ArrayLike,
    Axis,
    AxisName,
    BatchNormParams,
    BatchStats,
    DTypeLike,
    Groups,
    Moments,
    batch_norm,
    normalize,
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
    axis_index_groups: Groups | None = None,
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
    :func:`jaxbn.batch_norm` with the running statistics. Real inputs only.

    The arguments not listed below are :func:`jaxbn.batch_norm`'s, with the same meaning.

    Args:
      stats: running statistics (required: the corrections are relative to them).
      r_max: bound (>= 1) of the scale correction ``r``.
      d_max: bound (>= 0) of the shift correction ``d``, in running standard deviations.
        Like ``momentum`` and ``epsilon``, the bounds may be traced and are then unchecked.

    Returns:
      ``(y, new_stats)`` as :func:`jaxbn.batch_norm`.

    Raises:
      TypeError: as :func:`jaxbn.batch_norm`, and for a non-number ``r_max``/``d_max``.
      ValueError: as :func:`jaxbn.batch_norm` (one value per feature included), and for
        ``stats=None``, ``r_max < 1``, ``d_max < 0`` or a complex input.

    Example:

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
    renorm = core.Renorm(stats.mean, stats.var, r_max, d_max)
    x, _, mask = core.validate(x, params, stats, training=training, axis=axis,
                               momentum=momentum, epsilon=epsilon, dtype=dtype,
                               axis_name=axis_name, axis_index_groups=axis_index_groups,
                               mask=mask)
    if not training:
        return normalize(x, stats.mean, stats.var, params, axis=axis, epsilon=epsilon,
                         dtype=dtype), stats
    y, m = core.batch_normalize(x, params, axis=axis, epsilon=epsilon, mask=mask,
                                axis_name=axis_name, axis_index_groups=axis_index_groups,
                                fast_variance=fast_variance, dtype=dtype, renorm=renorm)
    new_stats = core.update_stats(stats, m, momentum=momentum,
                                  unbiased_running_var=unbiased_running_var)
    return y, jax.tree.map(lax.stop_gradient, new_stats)


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
    axis_index_groups: Groups | None = None,
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

    The arguments not listed below are :func:`jaxbn.batch_norm`'s, with the same meaning.

    Args:
      virtual_batch_size: examples per virtual batch; must divide the batch size.
      batch_axis: the axis that holds the examples (not a feature axis).

    Returns:
      ``(y, new_stats)`` as :func:`jaxbn.batch_norm`.

    Raises:
      TypeError: as :func:`jaxbn.batch_norm`, and for a non-integer ``virtual_batch_size``.
      ValueError: as :func:`jaxbn.batch_norm`, and when ``virtual_batch_size`` does not
        divide the batch, a virtual batch has one value per feature, or ``batch_axis`` is
        a feature axis.

    Example:

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> y, _ = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4)
    >>> y_first, _ = jaxbn.batch_norm(x[:4], None, None, training=True)
    >>> bool(jnp.allclose(y[:4], y_first, atol=1e-6))
    True
    """
    x, feats, mask = core.validate(x, params, stats, training=training, axis=axis,
                                   momentum=momentum, epsilon=epsilon, dtype=dtype,
                                   axis_name=axis_name, axis_index_groups=axis_index_groups,
                                   mask=mask)
    if not training and stats is not None:
        return batch_norm(x, params, stats, training=False, axis=axis, momentum=momentum,
                          epsilon=epsilon, dtype=dtype)
    b = _int("batch_axis", batch_axis)
    if not -x.ndim <= b < x.ndim or b % x.ndim in feats:
        raise ValueError(
            f"batch_axis must be a non-feature axis of the rank-{x.ndim} input, got "
            f"batch_axis={batch_axis} with feature axes {feats}."
        )
    b %= x.ndim
    v = _int("virtual_batch_size", virtual_batch_size)
    if v < 1 or x.shape[b] % v:
        raise ValueError(
            f"virtual_batch_size must be a positive divisor of the batch size "
            f"{x.shape[b]} (axis {b}), got {virtual_batch_size!r}."
        )
    groups = x.shape[b] // v
    # Split the batch axis into (groups, v) and treat `groups` as one more feature axis:
    # the core's synced, masked normalization then gives per-virtual-batch statistics.
    split = x.shape[:b] + (groups, v) + x.shape[b + 1:]
    gfeats = tuple(sorted((b,) + tuple(a + 1 if a > b else a for a in feats)))
    if math.prod(n for a, n in enumerate(split) if a not in gfeats) <= 1 and axis_name is None:
        raise ValueError(
            f"expected more than 1 value per feature in each virtual batch, got input shape "
            f"{x.shape} with virtual_batch_size={v}; use a larger virtual batch."
        )
    g = gfeats.index(b)
    gparams = None if params is None else jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.expand_dims(p, g), (groups, *p.shape)), params)
    xg, restore = _splittable(x, b, groups)
    ms = None if mask is None else _splittable(jnp.broadcast_to(mask, x.shape), b, groups)[0]
    y, m = core.batch_normalize(xg.reshape(split), gparams, axis=gfeats, epsilon=epsilon,
                                mask=None if ms is None else ms.reshape(split),
                                axis_name=axis_name, axis_index_groups=axis_index_groups,
                                fast_variance=fast_variance, dtype=dtype)
    y = restore(y.reshape(x.shape))
    if stats is None or not training:
        return y, stats
    # Put the virtual-batch axis of the statistics first.
    m = jax.tree.map(lambda s: jnp.moveaxis(s, g, 0), m)
    if unbiased_running_var:
        m = core.unbiased(m)
    # A virtual batch with no valid element takes no part in the average.
    has = (m.count > 0).astype(m.var.dtype)
    k = jnp.maximum(has.sum(0), 1)
    avg = Moments((m.mean * has).sum(0) / k, (m.var * has).sum(0) / k, m.count.sum(0))
    new_stats = core.update_stats(stats, avg, momentum=momentum, unbiased_running_var=False)
    return y, jax.tree.map(lax.stop_gradient, new_stats)


def _splittable(x: Array, b: int, groups: int) -> tuple[Array, Callable[[Array], Array]]:
    """``x``, resharded if need be so that axis ``b`` can be split into ``groups`` blocks.

    Under ``jit`` with axis ``b`` sharded over explicit mesh axes, splitting it keeps the
    sharding on the blocks, which needs ``groups`` to be a multiple of the number of shards.
    Otherwise (a virtual batch spans devices, or devices hold parts of several) axis ``b``
    is gathered first, one all-gather of ``x``, and the result is sharded back.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    spec = tuple(getattr(sharding, "spec", ()))
    entry = spec[b] if b < len(spec) else None
    if mesh is None or entry is None:
        return x, lambda y: y
    names = entry if isinstance(entry, tuple) else (entry,)
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    explicit = [n for n in names if types.get(n) == AxisType.Explicit]
    if not explicit or groups % math.prod(mesh.shape[n] for n in explicit) == 0:
        return x, lambda y: y
    gathered = P(*(None if a == b else e for a, e in enumerate(spec)))
    return (jax.sharding.reshard(x, NamedSharding(mesh, gathered)),
            lambda y: jax.sharding.reshard(y, sharding))


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.") from None


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

    Example:

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
