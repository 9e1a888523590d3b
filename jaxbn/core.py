"""Batch Normalization as pure functions over explicit parameter and statistics pytrees.

The state types and the algorithm's public functions live here; :mod:`jaxbn.variants` and
the Flax modules in :mod:`jaxbn.linen` and :mod:`jaxbn.nnx` are built from this module's
building blocks: :func:`validate`, :func:`moments`, :func:`batch_normalize`,
:func:`normalize`, :func:`unbiased`, :func:`update_stats` and :func:`fold`. Their private
parts, one concern each: the argument checks (``jaxbn._checks``), the reductions
(``jaxbn._reductions``), XLA:CPU's devices (``jaxbn._xla_cpu``), the explicit-sharding
path (``jaxbn._sharding``) and the derivative rule (``jaxbn._autodiff``).

Numerical decisions, in one place:

* Statistics are computed and kept in float32 (or wider) whatever the input dtype; the
  output has ``dtype`` or else ``x.dtype``. Complex inputs are normalized as flax does:
  the mean is complex, the variance ``E|x - mean|^2`` is real.
* The default variance is the corrected two-pass estimate: sums of the deviations from a
  shift close to the mean and of their squares, so no large terms cancel when
  ``|mean| >> std``. The shift is the mean of a small leading slice of each device's input
  (with a mask: the exact masked mean, a first pass). ``fast_variance=True`` keeps
  ``E[x^2] - E[x]^2`` (flax's default), clipped at zero.
* Performance (XLA:CPU): for inputs of 2 MiB and more (at float32) and for every
  half-precision input, each reduction reads the input straight from its buffer and,
  without a mask, no full-size temporary is materialized in the forward or the backward
  pass: an optimization barrier gives each reduction its own copy of its operands
  (``jaxbn._xla_cpu._private`` explains why), in programs lowered for the CPU only (a
  program lowered for a GPU or TPU holds none). Half-precision channels-last inputs whose
  feature count is not a multiple of 16 are processed as a wider view that lays several
  rows side by side (``_widen``); float32 keeps its layout, but for inputs of 512 KiB to
  2 MiB the statistics' sums take the same view (``_sums_fold``; float rounding apart,
  the same statistics).
* Derivatives (:func:`batch_normalize`): a ``jax.custom_jvp`` whose tangent is linear in
  the input tangents and needs only ``x`` and per-feature vectors, and is recomputed from
  them (``jax.checkpoint``) when JAX transposes it for reverse mode. So forward mode
  (``jvp``, ``jacfwd``, ``linearize``), reverse mode and any composition (Hessians) work,
  and the backward pass keeps only ``x`` and per-feature statistics.
* Across devices, each device reduces its own valid elements to ``(count, mean, M2)`` and a
  single gather (a ``psum`` of one slot per device, so the result is device-invariant; an
  ``all_gather`` within ``axis_index_groups``) brings every device's triple to every device,
  where they are merged exactly (Chan et al.'s pairwise update), weighting each device by
  its valid count. That is one collective in the forward pass; the backward pass needs one
  ``psum`` of two per-feature sums. Under ``jit`` with a batch sharded over *explicit* mesh
  axes (``jax.make_mesh``'s default) the same algorithm runs in a ``jax.shard_map`` over
  those axes, so every batch size and sharding gives the one-device result with these
  collectives and no others.
* Masked-out elements never enter a sum, so NaN or garbage there cannot leak into the
  statistics. A feature with no valid element has mean 0 and variance 0 in
  :func:`moments`; :func:`batch_normalize` takes its normalized value as 0, so its output
  is ``bias`` (finite, unlike flax's NaN, which would poison the gradients of every
  layer below even where a loss masks the value out), and :func:`update_stats` keeps its
  running statistics.
"""

from __future__ import annotations

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
Groups: TypeAlias = Sequence[Sequence[int]]

__all__ = [
    "BatchNormParams", "BatchStats", "Moments", "Renorm", "Validated",
    "init", "batch_norm", "batch_normalize", "moments", "normalize", "unbiased",
    "update_stats", "fold", "feature_axes", "validate",
]


class BatchNormParams(NamedTuple):
    """Learnable affine parameters ``gamma`` (scale) and ``beta`` (bias)."""

    scale: Array  # feature_shape, param_dtype; initialized to 1
    bias: Array  # feature_shape, param_dtype; initialized to 0


class BatchStats(NamedTuple):
    """Running statistics used at inference time."""

    mean: Array  # feature_shape, float32 or wider, as var (complex once updated so); 0
    var: Array  # feature_shape, float32 (or param_dtype if wider); initialized to 1
    # count shadows tuple.count (a method); the public name says what the field holds.
    count: Array  # type: ignore[assignment]  # (), int32; updates so far, saturating at 2**31-1


class Moments(NamedTuple):
    """Per-feature statistics of one batch (over every device in the named axis)."""

    mean: Array  # feature_shape, float32 (complex64 for complex inputs)
    var: Array  # feature_shape, float32; biased (divided by count)
    # count shadows tuple.count (a method), as in BatchStats.
    count: Array  # type: ignore[assignment]  # feature_shape, float32; valid elements per feature


class Renorm(NamedTuple):
    """Batch Renormalization's reference statistics and bounds (see :func:`batch_normalize`)."""

    mean: Array  # feature_shape; the running mean the correction d is relative to
    var: Array  # feature_shape; the running variance the correction r is relative to
    r_max: float | Array  # bound (>= 1) of r; may be traced (then unchecked)
    d_max: float | Array  # bound (>= 0) of d; may be traced (then unchecked)


class Validated(NamedTuple):
    """What :func:`validate` returns: the checked input, its feature axes and the mask."""

    x: Array  # the input as an array
    feature_axes: tuple[int, ...]  # sorted, non-negative
    mask: Array | None  # boolean, broadcastable to x


# The private modules take the aliases and state types above from here, so they are
# imported once those are defined.
from jaxbn._autodiff import _train_normalize, _TrainConfig  # noqa: E402
from jaxbn._checks import (  # noqa: E402
    _as_shape,
    _as_stats_dtype,
    _bshape,
    _check_axis_name,
    _check_dtype,
    _check_epsilon,
    _check_feature_shape,
    _check_input,
    _check_mask,
    _check_momentum,
    _check_params,
    _check_same_shape,
    _check_stats,
    _renorm_bounds,
    feature_axes,
    validate,
)
from jaxbn._reductions import _moments  # noqa: E402
from jaxbn._sharding import _explicit, _join, _on_explicit  # noqa: E402
from jaxbn._xla_cpu import _wide_view, _widen  # noqa: E402

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
      num_features: number of features ``C`` (an int, NumPy integers included), or the
        feature shape when normalizing over several feature axes (``axis`` a tuple in
        :func:`batch_norm`).
      affine: whether the layer has a learnable ``scale`` and ``bias``.
      track_running_stats: whether the layer keeps running statistics for inference.
      param_dtype: dtype of ``scale`` and ``bias``. The statistics are float32, or
        ``param_dtype`` where that is wider (float64 under ``jax_enable_x64``): at least as
        wide as the parameters, so that inference at float64 is not held to float32.

    Returns:
      ``(params, stats)``: a :class:`BatchNormParams` (scale 1, bias 0) or ``None``, and a
      :class:`BatchStats` (mean 0, var 1, count 0) or ``None``.

    Raises:
      TypeError: if ``num_features`` is not an int or a sequence of ints.
      ValueError: if a feature count is not positive or ``param_dtype`` is not floating.

    Example:

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
    sdt = jnp.promote_types(param_dtype, jnp.float32)
    stats = (
        BatchStats(jnp.zeros(shape, sdt), jnp.ones(shape, sdt), jnp.zeros((), jnp.int32))
        if track_running_stats
        else None
    )
    return params, stats


# ----------------------------------------------------------------------------------------
# Building blocks.


def moments(
    x: ArrayLike,
    *,
    axis: Axis = -1,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Groups | None = None,
    fast_variance: bool = False,
) -> Moments:
    """Masked, cross-device synchronized per-feature mean and (biased) variance.

    With ``axis_name`` the result is that of the union of the valid elements of every
    device in the named axis (or in this device's group of ``axis_index_groups``), exactly
    as if one device held the whole batch, with one collective. Must be called under a
    transformation that binds ``axis_name`` (``vmap``, ``pmap`` or ``shard_map``); under
    ``jit`` with a batch sharded over mesh axes none is needed. Complex inputs have a
    complex mean and the real variance ``E|x - mean|^2``.

    Args:
      x: input of any rank, floating point or complex.
      axis: feature axis or axes; every other axis is reduced.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements are ignored.
      axis_name: optional mapped axis name to synchronize over.
      axis_index_groups: optional partition of the axis' indices into groups that
        synchronize separately.
      fast_variance: use ``E[x^2] - E[x]^2`` (one pass, loses precision when
        ``|mean| >> std``) instead of the default corrected two-pass variance.

    Returns:
      :class:`Moments` with float32 (or wider) ``mean``, ``var`` and ``count``, each of the
      feature shape. Where ``count`` is 0 (an empty batch, or every element masked),
      mean and variance are 0.

    Raises:
      ValueError: for a non-floating ``x``, a bad ``axis`` or ``mask``, or an unbound
        ``axis_name``.

    Example:

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
    mask = None if mask is None else jnp.asarray(mask)
    _check_mask(mask, x.shape)
    groups = _check_axis_name(axis_name, axis_index_groups)
    plan = _explicit(x, feats)
    if plan is not None:
        name = _join(axis_name, groups, plan.sync)
        return _on_explicit(
            plan, feats,
            lambda x, mask, _, sync: (None, _moments(x, feats, mask, name, None,
                                                     fast_variance)),
            x, mask, (), x_out=False)[1]
    return _moments(x, feats, mask, axis_name, groups, fast_variance)


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

    Given statistics are constants here (plain autodiff); for a batch's own statistics,
    differentiated through, use :func:`batch_normalize`. The statistics are taken in their
    own dtype, at least float32 and at least ``x``'s (weakly typed ones, built from Python
    floats, included), and the arithmetic runs in the promoted dtype of ``x`` and the
    statistics (float32 for half-precision inputs); the result is cast to ``dtype`` or else
    ``x.dtype``.

    Args:
      x: input.
      mean: per-feature mean, of the feature shape.
      var: per-feature variance, of the feature shape.
      params: optional affine parameters; ``None`` means scale 1 and bias 0.
      axis: feature axis or axes of ``x``.
      epsilon: added to the variance; a number > 0.
      dtype: output dtype (default: ``x.dtype``).

    Returns:
      The normalized array, of the shape of ``x``.

    Raises:
      TypeError: for ``params`` of the wrong type or a non-number ``epsilon``.
      ValueError: for shapes that do not match the features, or ``epsilon <= 0``.

    Example:

    >>> import jax.numpy as jnp
    >>> normalize(jnp.array([[0.0], [2.0]]), jnp.array([1.0]), jnp.array([1.0]), epsilon=1e-12)
    Array([[-1.],
           [ 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_dtype(dtype, x.dtype)
    _check_params(params)
    eps = _check_epsilon(epsilon, x.dtype)
    feats = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    bshape = _bshape(x.ndim, feats, fshape)
    mean, var = _as_stats_dtype(mean, var, x.dtype)
    _check_feature_shape("mean", mean, fshape, axis)
    _check_feature_shape("var", var, fshape, axis)
    mul = lax.rsqrt(var + eps)
    if params is not None:
        _check_feature_shape("params.scale", params.scale, fshape, axis)
        _check_feature_shape("params.bias", params.bias, fshape, axis)
        mul = mul * params.scale
    y = (x - mean.reshape(bshape)) * mul.reshape(bshape)
    if params is not None:
        y = y + params.bias.reshape(bshape)
    return y.astype(dtype or x.dtype)


def unbiased(batch: Moments) -> Moments:
    """Bessel's correction: the variance times ``n / (n - 1)`` where ``n > 1``.

    Args:
      batch: moments with the biased variance (from :func:`moments`).

    Returns:
      The same moments with the unbiased variance estimate (unchanged where ``n <= 1``).

    Example:

    >>> import jax.numpy as jnp
    >>> unbiased(Moments(jnp.zeros(2), jnp.array([2.0, 2.0]), jnp.array([4.0, 1.0]))).var
    Array([2.6666667, 2.       ], dtype=float32)
    """
    n = batch.count
    var = jnp.where(n > 1, batch.var * n / jnp.maximum(n - 1, 1), batch.var)
    return batch._replace(var=var)


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
    global valid count per feature, :func:`unbiased`) before it enters the average, as
    PyTorch does. Features with no valid element keep their statistics; ``count`` grows by
    one unless no feature had any valid element, and stays at its dtype's maximum once
    there (it does not wrap around). The result is differentiable; the layers
    (:func:`batch_norm` and the variants) stop its gradient.

    Args:
      stats: current running statistics.
      batch: this batch's moments (from :func:`moments`).
      momentum: decay of the exponential moving average (a number in [0, 1]), or
        ``None``.
      unbiased_running_var: store the unbiased variance estimate.

    Returns:
      The updated :class:`BatchStats`, in the dtypes of ``stats`` (a real running mean
      becomes complex when the batch mean is).

    Raises:
      TypeError: for ``stats`` of the wrong type or a non-number ``momentum``.
      ValueError: for ``momentum`` outside [0, 1] or moments of another feature shape.

    Example:

    >>> import jax.numpy as jnp
    >>> s = update_stats(BatchStats(jnp.zeros(1), jnp.ones(1), jnp.array(0)),
    ...                  Moments(jnp.array([2.0]), jnp.array([4.0]), jnp.array([8.0])),
    ...                  momentum=0.9)
    >>> s.mean, s.var, s.count
    (Array([0.2], dtype=float32), Array([1.3], dtype=float32), Array(1, dtype=int32))
    """
    if stats is None:
        raise TypeError("stats must be a BatchStats, got NoneType; build it with "
                        "BatchStats(mean, var, count) or jaxbn.init.")
    _check_stats(stats)
    if not isinstance(batch, Moments):
        raise TypeError(f"batch must be the Moments of a batch, got {type(batch).__name__}.")
    decay = _check_momentum(momentum)
    for field in ("mean", "var", "count"):
        _check_same_shape(f"batch.{field}", getattr(batch, field), "stats.mean", stats.mean)
    if unbiased_running_var:
        batch = unbiased(batch)
    valid = batch.count > 0
    mean_dtype = jnp.result_type(stats.mean)
    if jnp.iscomplexobj(batch.mean) and not jnp.issubdtype(mean_dtype, jnp.complexfloating):
        mean_dtype = jnp.promote_types(mean_dtype, jnp.complex64)
    if decay is None:
        # In the statistics' dtype before adding 1: at the integer maximum, count + 1
        # would wrap to a negative weight.
        w = 1.0 / (jnp.asarray(stats.count).astype(jnp.result_type(stats.var)) + 1)
        new_mean = (1 - w) * stats.mean + w * batch.mean
        new_var = (1 - w) * stats.var + w * batch.var
    else:
        new_mean = decay * stats.mean + (1 - decay) * batch.mean
        new_var = decay * stats.var + (1 - decay) * batch.var
    return BatchStats(
        jnp.where(valid, new_mean, stats.mean).astype(mean_dtype),
        jnp.where(valid, new_var, stats.var).astype(jnp.result_type(stats.var)),
        _count_up(stats.count, jnp.any(valid)),
    )


def _count_up(count: ArrayLike, grew: Array) -> Array:
    """``count + 1`` where ``grew``, saturating at the integer dtype's maximum.

    A count carried over from a long-running model (``from_torch`` accepts PyTorch's int64
    ``num_batches_tracked`` up to int32's maximum) must not wrap to a negative number; at
    the maximum, the cumulative average's weight of a new batch is ``1 / 2**31`` anyway.
    """
    count = jnp.asarray(count)
    room = count < np.iinfo(count.dtype).max
    new: Array = count + (grew & room).astype(count.dtype)
    return new


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
      epsilon: the layer's epsilon, a number > 0.

    Returns:
      ``(a, b)`` of the feature shape, float32 (or wider), with
      ``a = scale / sqrt(var + epsilon)`` and ``b = bias - mean * a``.

    Raises:
      TypeError: for ``params`` of the wrong type or a non-number ``epsilon``.
      ValueError: for ``stats=None``, arrays of different shapes, or ``epsilon <= 0``.

    Example:

    >>> import jax.numpy as jnp
    >>> a, b = fold(None, BatchStats(jnp.array([1.0]), jnp.array([4.0]), jnp.array(3)),
    ...             epsilon=1e-12)
    >>> a, b
    (Array([0.5], dtype=float32), Array([-0.5], dtype=float32))
    """
    _check_params(params)
    if stats is None or not all(hasattr(stats, f) for f in ("mean", "var")):
        raise ValueError(
            f"fold needs running statistics with a mean and a var (a BatchStats), got "
            f"{type(stats).__name__}; a layer without running statistics normalizes each "
            f"batch by its own statistics, which no fixed affine map reproduces."
        )
    eps = _check_epsilon(epsilon)
    _check_same_shape("stats.var", stats.var, "stats.mean", stats.mean)
    if params is not None:
        _check_same_shape("params.scale", params.scale, "stats.mean", stats.mean)
        _check_same_shape("params.bias", params.bias, "stats.mean", stats.mean)
    a = lax.rsqrt(jnp.asarray(stats.var) + eps)
    if params is not None:
        a = a * params.scale
    b = -stats.mean * a
    if params is not None:
        b = b + params.bias
    return a, b


def batch_normalize(
    x: ArrayLike,
    params: BatchNormParams | None,
    *,
    axis: Axis = -1,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Groups | None = None,
    fast_variance: bool = False,
    dtype: DTypeLike | None = None,
    renorm: Renorm | None = None,
) -> tuple[Array, Moments]:
    """Normalizes ``x`` with its own batch statistics, differentiable through them.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with the (masked, synced)
    :func:`moments` of ``x``, the training-mode computation of every layer here. Unlike
    :func:`normalize` on those moments, the derivatives include how the statistics depend
    on ``x``, in both modes and to any order; the backward pass keeps only ``x`` and
    per-feature vectors. Batch Renormalization (``renorm``) replaces ``scale`` and ``bias``
    by ``scale * r`` and ``bias + scale * d`` with
    ``r = clip(sqrt(var + eps) / sqrt(renorm.var + eps), 1 / r_max, r_max)`` and
    ``d = clip((mean - renorm.mean) / sqrt(renorm.var + eps), -d_max, d_max)``, both without
    gradient. A feature with no valid element is normalized to 0 (its output is ``bias``).
    Any number of values per feature is accepted (one value: variance 0, output ``bias``).

    Args:
      x: input of any rank, floating point or complex.
      params: :class:`BatchNormParams` of the feature shape, or ``None``.
      axis: feature axis or axes.
      epsilon: added to the variance; a number > 0.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements take no part
        in the statistics (they are still normalized).
      axis_name: mapped axis to synchronize the statistics over.
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately.
      fast_variance: use ``E[x^2] - E[x]^2`` (see :func:`moments`).
      dtype: output dtype (default ``x.dtype``).
      renorm: Batch Renormalization's reference statistics and bounds, or ``None``.

    Returns:
      ``(y, moments)``: the output and the batch's :class:`Moments` (which carry no
      gradient).

    Raises:
      TypeError: for arguments of the wrong Python type.
      ValueError: for arguments :func:`validate` rejects (but one value per feature), and
        ``renorm`` with a complex input.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, m = batch_normalize(x, None, epsilon=1e-12)
    >>> y[:, 0], m.mean
    (Array([-1.,  1.], dtype=float32), Array([2.], dtype=float32))
    >>> f = lambda x: batch_normalize(x, None)[0][0, 0]
    >>> bool(jnp.allclose(jax.jvp(f, (x,), (jnp.ones_like(x),))[1], 0.0, atol=1e-6))
    True
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_params(params)
    eps = _check_epsilon(epsilon, x.dtype)
    _check_dtype(dtype, x.dtype)
    feats = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    if params is not None:
        _check_feature_shape("params.scale", params.scale, fshape, axis)
        _check_feature_shape("params.bias", params.bias, fshape, axis)
    mask = None if mask is None else jnp.asarray(mask)
    _check_mask(mask, x.shape)
    groups = _check_axis_name(axis_name, axis_index_groups)
    ref = None
    if renorm is not None:
        if not isinstance(renorm, Renorm):
            raise TypeError(f"renorm must be a Renorm or None, got {type(renorm).__name__}.")
        if jnp.iscomplexobj(x):
            raise ValueError("Batch Renormalization supports real inputs only, got a "
                             f"complex input ({x.dtype}).")
        _check_feature_shape("renorm.mean", renorm.mean, fshape, axis)
        _check_feature_shape("renorm.var", renorm.var, fshape, axis)
        ref = (jnp.asarray(renorm.mean), jnp.asarray(renorm.var),
               *_renorm_bounds(renorm.r_max, renorm.d_max))
    scale, bias = (None, None) if params is None else params

    def run(x: Array, mask: Array | None, pf: Any, sync: tuple[str, ...]
            ) -> tuple[Array, Moments]:
        fold = _widen(x, feats, mask)
        xv = _wide_view(x, fold)
        cfg = _TrainConfig((xv.ndim - 1,) if fold > 1 else feats,
                           _join(axis_name, groups, sync), groups, bool(fast_variance),
                           jnp.dtype(dtype or x.dtype), fold)
        scale, bias, ref_stats = pf
        ref_all = None if ref is None else (*ref_stats, *ref[2:])
        y, m = _train_normalize(cfg, xv, scale, bias, eps, ref_all, mask)
        return y.reshape(x.shape), m

    plan = _explicit(x, feats)
    per_feature = (scale, bias, None if ref is None else ref[:2])
    if plan is not None:
        return _on_explicit(plan, feats, run, x, mask, per_feature, x_out=True)
    return run(x, mask, per_feature, ())



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
    axis_index_groups: Groups | None = None,
    mask: ArrayLike | None = None,
    fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, BatchStats | None]:
    """Batch Normalization, ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.

    In training (or without running statistics) ``mean`` and ``var`` are the batch's
    (biased) statistics over every axis but ``axis``, synchronized over ``axis_name`` when
    given; in inference they are the running statistics.

    Args:
      x: input of any rank with a floating (or complex) dtype.
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
        ``shard_map``). Not needed under plain ``jit`` with sharded inputs (auto or explicit
        mesh axes).
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately; a
        partition of the axis into groups of equal size.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements take no part in
        the statistics (they are still normalized). A feature with no valid element
        outputs ``bias`` and keeps its running statistics. NaN or Inf in masked elements
        (padding) does not reach the gradients of the valid ones, ``scale`` or ``bias``.
      fast_variance: use flax's one-pass ``E[x^2] - E[x]^2``, which loses all precision when
        ``|mean| >> std``; the default two-pass variance is accurate at the same number of
        collectives.
      dtype: output dtype (default ``x.dtype``).

    Returns:
      ``(y, new_stats)``: the output, and the updated statistics (training), ``stats``
      unchanged (inference) or ``None`` (when ``stats is None``). The running statistics
      carry no gradient.

    Raises:
      TypeError: for arguments of the wrong Python type: ``params``/``stats`` that are not
        the state types (or are swapped), a ``momentum``/``epsilon`` that is not a real
        scalar (a string, a vector).
      ValueError: at trace time, for a non-floating ``x``, an axis out of range, parameters
        or statistics whose shape or dtype does not fit, a mask that does not broadcast,
        ``momentum`` outside [0, 1], ``epsilon`` not > 0 in float32, an unbound
        ``axis_name``, ``axis_index_groups`` that do not partition it, or training with a
        single value per feature and no ``axis_name`` (PyTorch's "Expected more than 1
        value per channel"; the Flax modules accept it, as flax does). A symbolic batch
        dimension (``jax.export``) is not checked: one value per feature then gives
        variance 0.

    Hyperparameters (``momentum``, ``epsilon``) may be traced, e.g. ``jit`` arguments that
    sweep them without recompiling: a traced value has no value at trace time, so it is
    used as given, unchecked (a traced ``momentum`` of 1.5 moves the running statistics
    away from the data; a traced ``epsilon`` of -1 gives NaN or infinities). Numbers and
    concrete scalar arrays are checked.

    Example:

    A jitted training step and an inference call.

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
    x, _, mask = validate(x, params, stats, training=training, axis=axis, momentum=momentum,
                          epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                          axis_index_groups=axis_index_groups, mask=mask)
    if not training and stats is not None:
        return normalize(x, stats.mean, stats.var, params, axis=axis, epsilon=epsilon,
                         dtype=dtype), stats
    y, m = batch_normalize(x, params, axis=axis, epsilon=epsilon, mask=mask,
                           axis_name=axis_name, axis_index_groups=axis_index_groups,
                           fast_variance=fast_variance, dtype=dtype)
    if stats is None or not training:
        return y, stats
    new_stats = update_stats(stats, m, momentum=momentum,
                             unbiased_running_var=unbiased_running_var)
    return y, jax.tree.map(lax.stop_gradient, new_stats)
