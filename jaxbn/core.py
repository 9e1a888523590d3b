"""Batch Normalization as pure functions over explicit parameter and statistics pytrees.

The whole algorithm lives here; the Flax modules in :mod:`jaxbn.linen` and :mod:`jaxbn.nnx`
are thin shells around :func:`batch_norm`.

Numerical decisions, in one place:

* Statistics are computed and kept in float32 (or wider) whatever the input dtype; the
  output has ``dtype`` or else ``x.dtype``.
* The default variance is the corrected two-pass estimate: sums of the deviations from a
  shift close to the mean and of their squares, so no large terms cancel when
  ``|mean| >> std``. The shift is the mean of a small leading slice of the input (with a
  mask: the exact masked mean, a first pass). ``fast_variance=True`` keeps
  ``E[x^2] - E[x]^2`` (flax's default), clipped at zero.
* Performance (XLA:CPU): for inputs of 2 MiB and more (at float32) and for every
  half-precision input, each reduction reads the input straight from its buffer and,
  without a mask, no full-size temporary is materialized in the forward or the backward
  pass (see :func:`_private`). The backward pass keeps only ``x`` and per-feature
  statistics.
* Across devices, each device reduces its own valid elements to ``(count, mean, M2)`` and a
  single gather (a ``psum`` of one slot per device, so the result is device-invariant; an
  ``all_gather`` within ``axis_index_groups``) brings every device's triple to every device,
  where they are merged
  exactly (Chan et al.'s pairwise update), weighting each device by its valid count. That is
  one collective in the forward pass; the backward pass (see :func:`batch_norm`) needs one
  ``psum``.
* Masked-out elements never enter a sum, so NaN or garbage there cannot leak into the
  statistics; a batch with no valid element yields mean 0, variance 0 (finite output) and
  leaves the running statistics unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
DTypeLike: TypeAlias = jax.typing.DTypeLike
Axis: TypeAlias = int | Sequence[int]
AxisName: TypeAlias = Any  # a hashable axis name, or a tuple of them
Shape: TypeAlias = tuple[int, ...]

__all__ = [
    "BatchNormParams",
    "BatchStats",
    "Moments",
    "init",
    "batch_norm",
    "moments",
    "normalize",
    "update_stats",
    "fold",
    "feature_axes",
]


class BatchNormParams(NamedTuple):
    """Learnable affine parameters ``gamma`` (scale) and ``beta`` (bias)."""

    scale: Array  # feature_shape, param_dtype; initialized to 1
    bias: Array  # feature_shape, param_dtype; initialized to 0


class BatchStats(NamedTuple):
    """Running statistics used at inference time."""

    mean: Array  # feature_shape, float32; initialized to 0
    var: Array  # feature_shape, float32; initialized to 1
    count: Array  # (), int32; number of updates so far (PyTorch's num_batches_tracked)


class Moments(NamedTuple):
    """Per-feature statistics of one batch (over every device in the named axis)."""

    mean: Array  # feature_shape, float32
    var: Array  # feature_shape, float32; biased (divided by count)
    count: Array  # feature_shape, float32; number of valid elements per feature


# ----------------------------------------------------------------------------------------
# Validation helpers: everything here runs at trace time on static shapes and values.


def _as_shape(num_features: int | Sequence[int]) -> Shape:
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(
            f"num_features must be a positive int or a tuple of positive ints, "
            f"got {num_features!r}."
        )
    return shape


def feature_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Returns the sorted, non-negative feature axes of a rank-``ndim`` input.

    Args:
      ndim: rank of the input.
      axis: an int or a sequence of ints, negative values counting from the end.

    Returns:
      The feature axes as a sorted tuple of distinct non-negative ints.

    Raises:
      ValueError: if an axis is out of range or repeated.

    >>> feature_axes(4, -1), feature_axes(4, 1), feature_axes(5, (1, -1))
    ((3,), (1,), (1, 4))
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one feature axis, got an empty tuple.")
    out = []
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a!r} is out of range for an input of rank {ndim}: expected an int in "
                f"[{-ndim}, {ndim - 1}]."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} names the same axis twice (rank {ndim}).")
    return tuple(sorted(out))


def _reduction_axes(ndim: int, feats: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in feats)


def _bshape(ndim: int, feats: tuple[int, ...], shape: Sequence[int]) -> Shape:
    """The shape that broadcasts a feature-shaped array against the input."""
    out = [1] * ndim
    for a, n in zip(feats, shape, strict=True):
        out[a] = n
    return tuple(out)


def _check_input(x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"batch_norm expects a floating-point input, got dtype {x.dtype}; "
            f"cast it first, e.g. x.astype(jnp.float32)."
        )


def _check_mask(mask: Array | None, shape: Shape) -> None:
    if mask is None:
        return
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a boolean array, got dtype {mask.dtype}.")
    try:
        ok = jnp.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the input shape {tuple(shape)}."
        )


def _check_feature_shape(name: str, arr: ArrayLike, expected: Shape, axis: Axis) -> None:
    got = tuple(jnp.shape(arr))
    if got != expected:
        raise ValueError(
            f"{name} has shape {got} but the input has {expected} features along axis "
            f"{axis!r}; expected {name} of shape {expected} (check num_features and axis)."
        )


def _is_concrete(v: Any) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _check_hyper(momentum: float | None, epsilon: float) -> None:
    if momentum is not None and _is_concrete(momentum) and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (flax convention: new = momentum * old + "
            f"(1 - momentum) * batch; PyTorch's momentum m is 1 - m here), got {momentum!r}."
        )
    if _is_concrete(epsilon) and not float(epsilon) > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}.")


def _check_dtype(dtype: DTypeLike | None) -> None:
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}.")


def _check_axis_name(axis_name: AxisName | None, axis_index_groups: Any) -> None:
    if axis_index_groups is not None and axis_name is None:
        raise ValueError(
            "axis_index_groups was given without axis_name; name the mapped axis "
            "(axis_name=...) whose devices the groups partition."
        )


def _validate(x, params, stats, *, training, axis, momentum, epsilon, dtype, axis_name,
              axis_index_groups, mask) -> tuple[Array, tuple[int, ...], Array | None]:
    """Every trace-time check of a BatchNorm call; returns ``(x, feature_axes, mask)``."""
    x = jnp.asarray(x)
    _check_input(x)
    if not isinstance(training, bool | jnp.bool_):
        raise ValueError(
            f"training must be a static Python bool, got {type(training).__name__}; pass it "
            f"as a static argument (e.g. functools.partial or jit's static_argnames)."
        )
    _check_hyper(momentum, epsilon)
    _check_dtype(dtype)
    _check_axis_name(axis_name, axis_index_groups)
    feats = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    if params is not None:
        _check_feature_shape("params.scale", params.scale, fshape, axis)
        _check_feature_shape("params.bias", params.bias, fshape, axis)
    if stats is not None:
        _check_feature_shape("stats.mean", stats.mean, fshape, axis)
        _check_feature_shape("stats.var", stats.var, fshape, axis)
    mask = None if mask is None else jnp.asarray(mask)
    _check_mask(mask, x.shape)
    return x, feats, mask


def _stats_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------
# State construction.


def init(
    num_features: int | Sequence[int],
    *,
    affine: bool = True,
    track_running_stats: bool = True,
    param_dtype: DTypeLike = jnp.float32,
) -> tuple[BatchNormParams | None, BatchStats | None]:
    """Creates the parameters and running statistics of one BatchNorm layer.

    Args:
      num_features: number of features ``C``, or the feature shape when normalizing over
        several feature axes (``axis`` a tuple in :func:`batch_norm`).
      affine: whether the layer has a learnable ``scale`` and ``bias``.
      track_running_stats: whether the layer keeps running statistics for inference.
      param_dtype: dtype of ``scale`` and ``bias``. Statistics are always float32.

    Returns:
      ``(params, stats)``: a :class:`BatchNormParams` (scale 1, bias 0) or ``None``, and a
      :class:`BatchStats` (mean 0, var 1, count 0) or ``None``.

    >>> params, stats = init(3)
    >>> params.scale, stats.var, stats.count
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32), Array(0, dtype=int32))
    >>> init(3, affine=False, track_running_stats=False)
    (None, None)
    """
    shape = _as_shape(num_features)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise ValueError(f"param_dtype must be a floating-point dtype, got {param_dtype!r}.")
    params = (
        BatchNormParams(jnp.ones(shape, param_dtype), jnp.zeros(shape, param_dtype))
        if affine
        else None
    )
    stats = (
        BatchStats(
            jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.zeros((), jnp.int32)
        )
        if track_running_stats
        else None
    )
    return params, stats


# ----------------------------------------------------------------------------------------
# Building blocks.


# The shift is the mean of at least this many values per feature (if present) and of at
# least 1 / _SHIFT_FRACTION of them: then it lies within sqrt(_SHIFT_FRACTION) standard
# deviations of the mean whatever the data, so the shifted sums lose at most a factor
# 1 + _SHIFT_FRACTION in relative accuracy (and about nothing for unordered batches).
_SHIFT_SAMPLES = 64
_SHIFT_FRACTION = 256


# Inputs of at least this many bytes (at float32) take the streaming path of _private;
# smaller float32 inputs fit in a core's cache, where XLA's own plan (shared elementwise
# results materialized once, then plain reductions over them) measured faster.
_STREAM_BYTES = 2 << 20


def _streams(x: Array) -> bool:
    """Whether the reductions over ``x`` should each read ``x`` itself (see _private)."""
    return (x.dtype.itemsize < 4 or x.size * max(x.dtype.itemsize, 4) >= _STREAM_BYTES)


def _private(*arrays: Any, stream: bool = True) -> tuple[Any, ...]:
    """The same arrays (or pytrees of them) under new identities, for one reduction alone.

    XLA:CPU runs reductions as custom fusions that absorb their elementwise producers
    (converts, broadcasts, subtractions) only when each producer has that reduction as its
    sole user; a producer shared with another reduction or with the output (after common
    subexpression elimination, ``convert(x)`` or ``broadcast(mean)`` always is) is instead
    materialized as a full-size temporary, which costs a write, page faults and a re-read.
    An optimization barrier gives each reduction its own copies of its operands (no data
    is copied), so that every reduction reads ``x`` straight from its buffer. Other backends
    get the arrays unchanged: XLA:GPU fuses sibling reductions of a shared operand into one
    kernel, which distinct identities would prevent. So do small float32 inputs
    (``stream=False``, from :func:`_streams`): there a cache-resident shared temporary is
    cheaper than recomputing it in every reduction. Half-precision inputs always stream:
    their shared temporaries are float32 conversions, twice the input's size.
    """
    if not stream:
        return arrays
    leaves, tree = jax.tree.flatten(arrays)
    leaves = lax.platform_dependent(*leaves, cpu=_barrier, default=lambda *a: a)
    return jax.tree.unflatten(tree, leaves)


def _barrier(*arrays: Array) -> tuple[Array, ...]:
    # One barrier per set of shard_map varying axes, so that no array changes type.
    groups: dict[frozenset, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(_varying_axes(a), []).append(i)
    out: list[Any] = [None] * len(arrays)
    for idx in groups.values():
        for i, a in zip(idx, lax.optimization_barrier(tuple(arrays[i] for i in idx)),
                        strict=True):
            out[i] = a
    return tuple(out)


def _shift(x: Array, red: tuple[int, ...], sdt: Any) -> Array:
    """A per-feature value close to the mean: the mean of a small leading slice of ``x``.

    Takes the first ``k`` indices along the first reduction axis, ``k`` the fewest that
    give ``max(_SHIFT_SAMPLES, n / _SHIFT_FRACTION)`` values per feature (or the whole
    axis), so it costs a sliver of one pass. A shift within a few standard deviations of the
    mean keeps the shifted sums free of cancellation; the exact mean is recovered from them.
    """
    rest = math.prod(x.shape[a] for a in red[1:])
    n = rest * x.shape[red[0]]
    samples = max(_SHIFT_SAMPLES, -(-n // _SHIFT_FRACTION))
    k = min(x.shape[red[0]], max(1, -(-samples // max(rest, 1))))
    head = lax.slice_in_dim(x, 0, k, axis=red[0])
    return jnp.mean(head.astype(sdt), axis=red)


def _local_sums(
    x: Array, red: tuple[int, ...], mask: Array | None, fast_variance: bool
) -> tuple[Array, Array, Array]:
    """Per-device ``(count, a, b)``: ``(n, sum x, sum x^2)`` if fast else ``(n, mean, M2)``."""
    sdt = _stats_dtype(x.dtype)
    fshape = tuple(s for a, s in enumerate(x.shape) if a not in red)
    if mask is None:
        n = jnp.full(fshape, math.prod(x.shape[a] for a in red), sdt)
        if fast_variance:
            xa, xb = _private(x, x, stream=_streams(x))
            return (n, jnp.sum(xa.astype(sdt), axis=red),
                    jnp.sum(jnp.square(xb.astype(sdt)), axis=red))
        # Corrected two-pass variance around a shift taken from a slice of x (Chan, Golub &
        # LeVeque 1983): sums of the deviations from the shift and of their squares, then
        # mean = shift + sd / n and M2 = sdd - sd^2 / n, with no large terms cancelling when
        # |mean| >> std. The two sums read x once each and share no temporary.
        shift = lax.stop_gradient(_shift(x, red, sdt))
        xa, sa, xb, sb = _private(x, shift, x, shift, stream=_streams(x))
        sd = jnp.sum(xa.astype(sdt) - jnp.expand_dims(sa, red), axis=red)
        sdd = jnp.sum(jnp.square(xb.astype(sdt) - jnp.expand_dims(sb, red)), axis=red)
        mean = shift + sd / n
        m2 = jnp.maximum(sdd - sd * sd / n, 0)
        return n, mean, m2

    # Masked: every sum gets its own x and (unbroadcast) mask. XLA:CPU's reduction fusions
    # do not absorb the select, so each masked sum still materializes its input once.
    def msums(c: Array | None, *fs) -> list[Array]:
        ops = (x, mask) if c is None else (x, mask, c)
        copies = _private(*(ops * len(fs)), stream=_streams(x))
        out = []
        for i, f in enumerate(fs):
            xp, kp, *cp = copies[i * len(ops):(i + 1) * len(ops)]
            v = f(xp.astype(sdt) if c is None else xp.astype(sdt) - jnp.expand_dims(cp[0], red))
            out.append(jnp.sum(jnp.where(kp, v, jnp.zeros((), sdt)), axis=red))
        return out

    km, = _private(mask, stream=_streams(x))
    n = jnp.sum(jnp.broadcast_to(km, x.shape), axis=red, dtype=sdt)
    if fast_variance:
        return n, *msums(None, lambda v: v, jnp.square)
    safe_n = jnp.maximum(n, 1)
    # With a mask the shift must come from valid elements only (masked-out ones may hold
    # anything): pass 1 is the exact masked mean. Pass 2: deviations from it and their
    # squares; the correction term removes the shift's own rounding error.
    shift = lax.stop_gradient(msums(None, lambda v: v)[0] / safe_n)
    sd, sdd = msums(shift, lambda v: v, jnp.square)
    mean = shift + sd / safe_n
    m2 = jnp.maximum(sdd - sd * sd / safe_n, 0)
    return n, mean, m2


def moments(
    x: ArrayLike,
    *,
    axis: Axis = -1,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    fast_variance: bool = False,
) -> Moments:
    """Masked, cross-device synchronized per-feature mean and (biased) variance.

    With ``axis_name`` the result is that of the union of the valid elements of every
    device in the named axis (or in this device's group of ``axis_index_groups``), exactly
    as if one device held the whole batch, with one collective. Must be called under a
    transformation that binds ``axis_name`` (``vmap``, ``pmap`` or ``shard_map``).

    Args:
      x: input of any rank, floating point.
      axis: feature axis or axes; every other axis is reduced.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements are ignored.
      axis_name: optional mapped axis name to synchronize over.
      axis_index_groups: optional partition of the axis' indices into groups that
        synchronize separately.
      fast_variance: use ``E[x^2] - E[x]^2`` (one pass, loses precision when
        ``|mean| >> std``) instead of the default corrected two-pass variance.

    Returns:
      :class:`Moments` with float32 (or wider) ``mean``, ``var`` and ``count``, each of the
      feature shape. Where ``count`` is 0, mean and variance are 0.

    >>> import jax.numpy as jnp
    >>> m = moments(jnp.array([[1.0, 10.0], [3.0, 10.0]]), axis=-1)
    >>> m.mean
    Array([ 2., 10.], dtype=float32)
    >>> m.var, m.count
    (Array([1., 0.], dtype=float32), Array([2., 2.], dtype=float32))
    """
    x = jnp.asarray(x)
    _check_input(x)
    feats = feature_axes(x.ndim, axis)
    red = _reduction_axes(x.ndim, feats)
    mask = None if mask is None else jnp.asarray(mask)
    _check_mask(mask, x.shape)
    _check_axis_name(axis_name, axis_index_groups)
    n, a, b = _local_sums(x, red, mask, fast_variance)
    if fast_variance:
        if axis_name is not None:
            n, a, b = lax.psum((n, a, b), axis_name, axis_index_groups=axis_index_groups)
        safe_n = jnp.maximum(n, 1)
        mean = a / safe_n
        var = jnp.maximum(b / safe_n - mean * mean, 0)
        return Moments(mean, var, n)
    if axis_name is None:
        return Moments(a, b / jnp.maximum(n, 1), n)
    triple = jnp.stack([n, a, b])
    if axis_index_groups is None:
        # An all_gather written as one psum: each device fills its own slot. Unlike
        # all_gather, psum's result is device-invariant, so shard_map can return the
        # statistics replicated (out_specs=P()) with its replication check on.
        slots = jnp.zeros((lax.axis_size(axis_name), *triple.shape), triple.dtype)
        g = lax.psum(slots.at[lax.axis_index(axis_name)].set(triple), axis_name)
    else:
        g = lax.all_gather(triple, axis_name, axis_index_groups=axis_index_groups)
    # Chan et al.'s exact merge of every device's (count, mean, M2).
    ns, means, m2s = g[:, 0], g[:, 1], g[:, 2]
    total = jnp.sum(ns, axis=0)
    safe_total = jnp.maximum(total, 1)
    mean = jnp.sum(ns * means, axis=0) / safe_total
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * jnp.square(means - mean), axis=0)
    return Moments(mean, m2 / safe_total, total)


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    params: BatchNormParams | None = None,
    *,
    axis: Axis = -1,
    epsilon: float = 1e-5,
    dtype: DTypeLike | None = None,
) -> Array:
    """Applies ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` per feature.

    The arithmetic runs in the promoted dtype of ``x`` and the statistics (float32 for
    half-precision inputs); the result is cast to ``dtype`` or else ``x.dtype``.

    Args:
      x: input.
      mean: per-feature mean, of the feature shape.
      var: per-feature variance, of the feature shape.
      params: optional affine parameters; ``None`` means scale 1 and bias 0.
      axis: feature axis or axes of ``x``.
      epsilon: added to the variance.
      dtype: output dtype (default: ``x.dtype``).

    Returns:
      The normalized array, of the shape of ``x``.

    >>> import jax.numpy as jnp
    >>> normalize(jnp.array([[0.0], [2.0]]), jnp.array([1.0]), jnp.array([1.0]), epsilon=1e-12)
    Array([[-1.],
           [ 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_dtype(dtype)
    feats = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    bshape = _bshape(x.ndim, feats, fshape)
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    _check_feature_shape("mean", mean, fshape, axis)
    _check_feature_shape("var", var, fshape, axis)
    mul = lax.rsqrt(var + epsilon)
    if params is not None:
        _check_feature_shape("params.scale", params.scale, fshape, axis)
        _check_feature_shape("params.bias", params.bias, fshape, axis)
        mul = mul * params.scale
    y = (x - mean.reshape(bshape)) * mul.reshape(bshape)
    if params is not None:
        y = y + params.bias.reshape(bshape)
    return y.astype(dtype or x.dtype)


def update_stats(
    stats: BatchStats,
    batch: Moments,
    *,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
) -> BatchStats:
    """Folds one batch's moments into the running statistics.

    ``new = momentum * old + (1 - momentum) * batch`` (flax's convention; PyTorch's
    ``momentum=m`` is ``momentum=1 - m`` here). ``momentum=None`` is PyTorch's cumulative
    moving average, ``new = old + (batch - old) / (count + 1)``. With
    ``unbiased_running_var`` the batch variance is scaled by ``n / (n - 1)`` (``n`` the
    global valid count per feature) before it enters the average, as PyTorch does.
    Features with no valid element keep their statistics; ``count`` grows by one unless no
    feature had any valid element.

    Args:
      stats: current running statistics.
      batch: this batch's moments (from :func:`moments`).
      momentum: decay of the exponential moving average, or ``None``.
      unbiased_running_var: store the unbiased variance estimate.

    Returns:
      The updated :class:`BatchStats`, in the dtypes of ``stats``.

    >>> import jax.numpy as jnp
    >>> s = update_stats(BatchStats(jnp.zeros(1), jnp.ones(1), jnp.array(0)),
    ...                  Moments(jnp.array([2.0]), jnp.array([4.0]), jnp.array([8.0])),
    ...                  momentum=0.9)
    >>> s.mean, s.var, s.count
    (Array([0.2], dtype=float32), Array([1.3], dtype=float32), Array(1, dtype=int32))
    """
    _check_hyper(momentum, 1.0)
    n = batch.count
    var = batch.var
    if unbiased_running_var:
        var = jnp.where(n > 1, var * n / jnp.maximum(n - 1, 1), var)
    valid = n > 0
    if momentum is None:
        w = 1.0 / (stats.count + 1).astype(stats.mean.dtype)
        new_mean = (1 - w) * stats.mean + w * batch.mean
        new_var = (1 - w) * stats.var + w * var
    else:
        new_mean = momentum * stats.mean + (1 - momentum) * batch.mean
        new_var = momentum * stats.var + (1 - momentum) * var
    return BatchStats(
        jnp.where(valid, new_mean, stats.mean).astype(stats.mean.dtype),
        jnp.where(valid, new_var, stats.var).astype(stats.var.dtype),
        stats.count + jnp.any(valid).astype(stats.count.dtype),
    )


def fold(
    params: BatchNormParams | None,
    stats: BatchStats | Moments,
    *,
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds inference-time BatchNorm into a per-feature affine map ``y = x * a + b``.

    Args:
      params: affine parameters, or ``None`` for scale 1 and bias 0.
      stats: the running statistics (or any object with ``mean`` and ``var``).
      epsilon: the layer's epsilon.

    Returns:
      ``(a, b)`` of the feature shape, float32 (or wider), with
      ``a = scale / sqrt(var + epsilon)`` and ``b = bias - mean * a``.

    >>> import jax.numpy as jnp
    >>> a, b = fold(None, BatchStats(jnp.array([1.0]), jnp.array([4.0]), jnp.array(3)),
    ...             epsilon=1e-12)
    >>> a, b
    (Array([0.5], dtype=float32), Array([-0.5], dtype=float32))
    """
    _check_hyper(None, epsilon)
    a = lax.rsqrt(jnp.asarray(stats.var) + epsilon)
    if params is not None:
        a = a * params.scale
    b = -stats.mean * a
    if params is not None:
        b = b + params.bias
    return a, b


# ----------------------------------------------------------------------------------------
# The layer.


def batch_norm(
    x: ArrayLike,
    params: BatchNormParams | None,
    stats: BatchStats | None,
    *,
    training: bool,
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
    """Batch Normalization, ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.

    In training (or without running statistics) ``mean`` and ``var`` are the batch's
    (biased) statistics over every axis but ``axis``, synchronized over ``axis_name`` when
    given; in inference they are the running statistics.

    Args:
      x: input of any rank with a floating dtype.
      params: :class:`BatchNormParams` of the feature shape, or ``None`` (no affine).
      stats: :class:`BatchStats`, or ``None`` (no running statistics, as PyTorch's
        ``track_running_stats=False``: batch statistics are used in inference too).
      training: static Python bool; use batch statistics and update the running ones.
      axis: feature axis or tuple of axes: ``-1`` for channels-last (flax), ``1`` for
        PyTorch's ``(N, C, ...)`` layouts.
      momentum: running-average decay in flax's convention (``new = momentum * old +
        (1 - momentum) * batch``; PyTorch's 0.1 is 0.9 here), or ``None`` for PyTorch's
        cumulative moving average.
      epsilon: added to the variance, > 0.
      unbiased_running_var: keep ``n / (n - 1) * batch_var`` in the running variance, as
        PyTorch does (``n`` the global valid count per feature).
      axis_name: mapped axis to synchronize statistics over (bound by ``vmap``, ``pmap`` or
        ``shard_map``). Not needed under plain ``jit`` with sharded inputs.
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements take no part in
        the statistics (they are still normalized).
      fast_variance: use flax's one-pass ``E[x^2] - E[x]^2``, which loses all precision when
        ``|mean| >> std``; the default two-pass variance is accurate at the same number of
        collectives.
      dtype: output dtype (default ``x.dtype``).

    Returns:
      ``(y, new_stats)``: the output, and the updated statistics (training), ``stats``
      unchanged (inference) or ``None`` (when ``stats is None``). The running statistics
      carry no gradient.

    Raises:
      ValueError: at trace time, for a non-floating ``x``, an axis out of range, parameters
        or statistics whose shape does not match the input's features, a mask that does not
        broadcast, ``momentum`` outside [0, 1], ``epsilon <= 0``, or training with a single
        value per feature and no ``axis_name``.

    Example, a jitted training step and an inference call:

    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> params, stats = jaxbn.init(4)
    >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3 + 1
    >>> step = jax.jit(lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True))
    >>> y, stats = step(x, params, stats)
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1, atol=1e-3))
    (True, True)
    >>> int(stats.count)
    1
    >>> y_eval, _ = jaxbn.batch_norm(x, params, stats, training=False)
    """
    x, feats, mask = _validate(x, params, stats, training=training, axis=axis,
                               momentum=momentum, epsilon=epsilon, dtype=dtype,
                               axis_name=axis_name, axis_index_groups=axis_index_groups,
                               mask=mask)
    training = bool(training)

    use_batch = training or stats is None
    if not use_batch:
        return normalize(x, stats.mean, stats.var, params, axis=axis, epsilon=epsilon,
                         dtype=dtype), stats

    per_feature = math.prod(x.shape[a] for a in _reduction_axes(x.ndim, feats))
    if per_feature <= 1 and axis_name is None:
        raise ValueError(
            f"expected more than 1 value per feature when using batch statistics, got input "
            f"shape {x.shape} with features along axis {axis!r}; use a larger batch, or "
            f"training=False with running statistics."
        )
    if not _is_concrete(epsilon):
        raise ValueError(
            "epsilon must be a static Python float when using batch statistics, got a traced "
            "value; close over it or mark it static (jit's static_argnames)."
        )
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    cfg = _TrainConfig(feats, float(epsilon), axis_name, groups, bool(fast_variance),
                       jnp.dtype(dtype or x.dtype))
    scale, bias = (None, None) if params is None else params
    y, m = _train_normalize(cfg, x, scale, bias, mask)
    if stats is None or not training:
        return y, stats
    new_stats = update_stats(stats, m, momentum=momentum,
                             unbiased_running_var=unbiased_running_var)
    return y, new_stats


# ----------------------------------------------------------------------------------------
# Training-mode normalization with a memory-saving backward pass.


class _TrainConfig(NamedTuple):
    feats: tuple[int, ...]
    epsilon: float
    axis_name: AxisName | None
    groups: tuple[tuple[int, ...], ...] | None
    fast_variance: bool
    dtype: Any


def _varying_axes(a: Array) -> frozenset:
    """The shard_map axes along which ``a`` varies (empty outside shard_map)."""
    mat = getattr(jax.typeof(a), "mat", None)
    return frozenset(getattr(mat, "varying", ()))


def _names(axis_name: AxisName) -> tuple:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _sync_sum(v: Any, axis_name: AxisName, groups: Any) -> Any:
    """``psum`` over the axis (or within each group, as one all_gather then a local sum)."""
    if groups is None:
        return lax.psum(v, axis_name)
    return jax.tree.map(lambda g: g.sum(0),
                        lax.all_gather(v, axis_name, axis_index_groups=groups))


def _train_forward(cfg: _TrainConfig, x, scale, bias, mask):
    m = moments(x, axis=cfg.feats, mask=mask, axis_name=cfg.axis_name,
                axis_index_groups=cfg.groups, fast_variance=cfg.fast_variance)
    params = None if scale is None else BatchNormParams(
        scale, jnp.zeros_like(scale) if bias is None else bias)
    # The output's operands are private too, so that a reduction consuming y (a loss, the
    # next layer's statistics) can absorb its computation.
    xy, mean_y, var_y, params = _private(x, m.mean, m.var, params, stream=_streams(x))
    y = normalize(xy, mean_y, var_y, params, axis=cfg.feats, epsilon=cfg.epsilon,
                  dtype=cfg.dtype)
    if scale is None and bias is not None:
        y = (y + bias.reshape(_bshape(x.ndim, cfg.feats, bias.shape))).astype(cfg.dtype)
    inv = lax.rsqrt(m.var + cfg.epsilon)
    return (y, m), (x, scale, bias, mask, m.mean, inv, m.count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_normalize(cfg: _TrainConfig, x, scale, bias, mask):
    """``(y, moments)`` of training-mode BN; the moments carry no gradient."""
    return _train_forward(cfg, x, scale, bias, mask)[0]


def _train_normalize_bwd(cfg: _TrainConfig, res, cts):
    # Only x and per-feature mean / inverse std were saved. With g the output cotangent and
    # xhat = (x - mean) * inv, every output depends on the statistics, so
    #   dx = scale * inv * (g - keep * (sum(g) + xhat * sum(g * xhat)) / n)
    # with the sums over all elements of all devices and n the global valid count;
    # d scale = sum(g * xhat), d bias = sum(g). One psum carries both sums.
    x, scale, bias, mask, mean, inv, n = res
    g = cts[0]
    red = _reduction_axes(x.ndim, cfg.feats)
    bshape = _bshape(x.ndim, cfg.feats, mean.shape)
    sdt = _stats_dtype(x.dtype)
    # Each sum reads g (and x) straight from their buffers (see _private). The sums run over
    # every element, masked-out ones included: those are normalized too, so their outputs
    # depend on the statistics; the mask only restricts which x the statistics depend on.
    stream = _streams(x)
    ga, gb, xb, mb = _private(g, g, x, mean, stream=stream)
    sum_g = jnp.sum(ga.astype(sdt), axis=red)
    sum_gd = jnp.sum(gb.astype(sdt) * (xb.astype(sdt) - mb.reshape(bshape)), axis=red)
    local = (sum_g, sum_gd * inv)
    # Parameters replicated over shard_map axes along which x varies (P() specs) need the
    # sums over those axes as their cotangent, synced BN or not; take them from the
    # statistics' collective when the axes coincide.
    ref = scale if scale is not None else bias
    extra = tuple(sorted(_varying_axes(x) - (_varying_axes(ref) if ref is not None
                                              else frozenset()), key=str))
    total = local
    if cfg.axis_name is not None:
        total = _sync_sum(local, cfg.axis_name, cfg.groups)
    if not extra:
        param_cts = local
    elif cfg.axis_name is not None and cfg.groups is None and set(extra) == set(
        _names(cfg.axis_name)
    ):
        param_cts = total
    else:
        param_cts = lax.psum(local, extra)
    sg, sgx = total
    w = inv if scale is None else inv * scale.astype(sdt)
    safe_n = jnp.maximum(n, 1)
    # dx = w * g - w * sum(g) / n - (x - mean) * (w * inv * sum(g * xhat) / n), per feature.
    c0 = (w * sg / safe_n).reshape(bshape)
    c1 = (w * inv * sgx / safe_n).reshape(bshape)
    gx, xx, mx = _private(g, x, mean, stream=stream)  # so g's other consumers can fuse it
    corr = c0 + (xx.astype(sdt) - mx.reshape(bshape)) * c1
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    dx = (gx.astype(sdt) * w.reshape(bshape) - corr).astype(x.dtype)
    dscale = None if scale is None else param_cts[1].astype(scale.dtype)
    dbias = None if bias is None else param_cts[0].astype(bias.dtype)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return dx, dscale, dbias, dmask


_train_normalize.defvjp(_train_forward, _train_normalize_bwd)

