"""Batch Normalization as pure functions over explicit parameter and statistics pytrees.

The whole algorithm lives here; :mod:`jaxbn.variants` and the Flax modules in
:mod:`jaxbn.linen` and :mod:`jaxbn.nnx` are built from this module's building blocks:
:func:`validate`, :func:`moments`, :func:`batch_normalize`, :func:`normalize`,
:func:`unbiased`, :func:`update_stats` and :func:`fold`.

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
  pass: an optimization barrier gives each reduction its own copy of its operands (the
  private helper ``_private`` explains why). Half-precision channels-last inputs whose
  feature count is not a multiple of 16 are processed as a wider view that lays several
  rows side by side (``_widen``); float32 keeps its layout and its summation order.
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

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer
from jax.custom_derivatives import SymbolicZero, zero_from_primal
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
DTypeLike: TypeAlias = jax.typing.DTypeLike
Axis: TypeAlias = int | Sequence[int]
AxisName: TypeAlias = Any  # a hashable axis name, or a tuple of them
Groups: TypeAlias = Sequence[Sequence[int]]
Shape: TypeAlias = tuple[int, ...]
_R = TypeVar("_R")

__all__ = [
    "BatchNormParams",
    "BatchStats",
    "Moments",
    "Renorm",
    "Validated",
    "init",
    "batch_norm",
    "batch_normalize",
    "moments",
    "normalize",
    "unbiased",
    "update_stats",
    "fold",
    "feature_axes",
    "validate",
]


class BatchNormParams(NamedTuple):
    """Learnable affine parameters ``gamma`` (scale) and ``beta`` (bias)."""

    scale: Array  # feature_shape, param_dtype; initialized to 1
    bias: Array  # feature_shape, param_dtype; initialized to 0


class BatchStats(NamedTuple):
    """Running statistics used at inference time."""

    mean: Array  # feature_shape, float32 (complex64 once updated with complex inputs); 0
    var: Array  # feature_shape, float32; initialized to 1
    # count shadows tuple.count (a method); the public name says what the field holds.
    count: Array  # type: ignore[assignment]  # (), int32; updates so far (num_batches_tracked)


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


# ----------------------------------------------------------------------------------------
# Validation: everything here runs at trace time on static shapes and values.


def _index(name: str, value: Any) -> int:
    """``value`` as a Python int; accepts NumPy integers, rejects bools, floats and arrays."""
    if isinstance(value, bool | np.bool_ | jax.Array | np.ndarray):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.") from None


def _as_shape(num_features: int | Sequence[int]) -> Shape:
    if isinstance(num_features, Sequence) and not isinstance(num_features, str):
        shape = tuple(_index("num_features", n) for n in num_features)
    else:
        shape = (_index("num_features", num_features),)
    if not shape or not all(n > 0 for n in shape):
        raise ValueError(
            f"num_features must be a positive int or a tuple of positive ints, "
            f"got {num_features!r}."
        )
    return shape


def feature_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Returns the sorted, non-negative feature axes of a rank-``ndim`` input.

    Args:
      ndim: rank of the input.
      axis: an int or a sequence of ints (NumPy integers too), negative values counting
        from the end.

    Returns:
      The feature axes as a sorted tuple of distinct non-negative ints.

    Raises:
      TypeError: if an axis is not an integer.
      ValueError: if an axis is out of range or repeated.

    Example:

    >>> feature_axes(4, -1), feature_axes(4, 1), feature_axes(5, (1, -1))
    ((3,), (1,), (1, 4))
    """
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        axes = tuple(_index("axis", a) for a in axis)
    else:
        axes = (_index("axis", axis),)
    if not axes:
        raise ValueError("axis must name at least one feature axis, got an empty tuple.")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
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


def _is_inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating))


def _check_input(x: Array) -> None:
    if not _is_inexact(x.dtype):
        raise ValueError(
            f"batch_norm expects a floating-point (or complex) input, got dtype {x.dtype}; "
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


def _check_same_shape(name: str, arr: ArrayLike, ref_name: str, ref: ArrayLike) -> None:
    if jnp.shape(arr) != jnp.shape(ref):
        raise ValueError(
            f"{name} has shape {jnp.shape(arr)} but {ref_name} has shape {jnp.shape(ref)}; "
            f"expected both of one feature shape (from the same layer)."
        )


Hyper: TypeAlias = float | Array  # a Python number, or a scalar array (traced or not)


def _hyper(name: str, value: Any) -> Hyper:
    """A scalar hyperparameter: a Python float if concrete, else the traced scalar.

    Numbers and concrete scalar arrays become Python floats and are range-checked by the
    callers. A traced scalar (e.g. a ``jit`` argument, to sweep a hyperparameter without
    recompiling) has no value at trace time: it is returned as is and used unchecked.
    """
    if isinstance(value, Tracer):
        if jnp.shape(value) != () or not (jnp.issubdtype(value.dtype, jnp.floating)
                                          or jnp.issubdtype(value.dtype, jnp.integer)):
            raise TypeError(f"{name} must be a real scalar, got a traced {value.aval}.")
        return value
    if isinstance(value, jax.Array | np.ndarray | np.generic) and not isinstance(
        value, np.bool_
    ):
        if np.shape(value) != () or not (np.issubdtype(value.dtype, np.floating)
                                         or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(
                f"{name} must be a real scalar, got an array of shape {np.shape(value)} "
                f"and dtype {value.dtype}."
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number, got {type(value).__name__} {value!r}; pass e.g. a "
            f"Python float."
        )
    return float(value)


def _check_momentum(momentum: Any) -> Hyper | None:
    if momentum is None:
        return None
    m = _hyper("momentum", momentum)
    if isinstance(m, float) and not 0.0 <= m <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (flax convention: new = momentum * old + "
            f"(1 - momentum) * batch; PyTorch's momentum m is 1 - m here), got {momentum!r}."
        )
    return m


def _check_epsilon(epsilon: Any, dtype: Any = jnp.float32) -> Hyper:
    eps = _hyper("epsilon", epsilon)
    if not isinstance(eps, float):
        return eps
    if not eps > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}.")
    rdt = _real_dtype(_stats_dtype(dtype))
    if not np.asarray(eps, rdt) > 0:
        raise ValueError(
            f"epsilon must be > 0 in the statistics' dtype {np.dtype(rdt).name}, got "
            f"{epsilon!r}, which rounds to 0 there; use at least "
            f"{float(np.finfo(rdt).smallest_normal):.3g}."
        )
    return eps


def _check_dtype(dtype: DTypeLike | None, x_dtype: Any) -> None:
    if dtype is None:
        return
    if not _is_inexact(dtype):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}.")
    if jnp.issubdtype(x_dtype, jnp.complexfloating) and not jnp.issubdtype(
        dtype, jnp.complexfloating
    ):
        raise ValueError(
            f"dtype {jnp.dtype(dtype).name} would drop the imaginary part of the complex "
            f"input ({jnp.dtype(x_dtype).name}); expected a complex dtype or None."
        )


def _check_params(params: Any) -> None:
    if params is None or isinstance(params, BatchNormParams):
        return
    hint = (" (params and stats swapped? the order is batch_norm(x, params, stats))"
            if isinstance(params, BatchStats | Moments) else
            "; build it with BatchNormParams(scale, bias) or jaxbn.init")
    raise TypeError(f"params must be a BatchNormParams or None, got "
                    f"{type(params).__name__}{hint}.")


def _check_stats(stats: Any, name: str = "stats") -> None:
    if stats is None:
        return
    if not isinstance(stats, BatchStats):
        hint = (" (params and stats swapped? the order is batch_norm(x, params, stats))"
                if isinstance(stats, BatchNormParams) else
                "; build it with BatchStats(mean, var, count) or jaxbn.init")
        raise TypeError(f"{name} must be a BatchStats or None, got "
                        f"{type(stats).__name__}{hint}.")
    for field in ("mean", "var"):
        dt = jnp.result_type(getattr(stats, field))
        ok = _is_inexact(dt) if field == "mean" else jnp.issubdtype(dt, jnp.floating)
        if not ok:
            raise ValueError(
                f"{name}.{field} must be a floating-point array, got dtype {dt}; integer "
                f"statistics would truncate the running average (use jaxbn.init)."
            )
    count = stats.count
    if jnp.shape(count) != () or not jnp.issubdtype(jnp.result_type(count), jnp.integer):
        raise ValueError(
            f"{name}.count must be an integer scalar (shape ()), got shape "
            f"{jnp.shape(count)} and dtype {jnp.result_type(count)}."
        )


def _names(axis_name: AxisName) -> tuple[AxisName, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _check_axis_name(axis_name: AxisName | None, axis_index_groups: Any) -> Any:
    """Checks that ``axis_name`` is bound and the groups partition it; returns the groups."""
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                "axis_index_groups was given without axis_name; name the mapped axis "
                "(axis_name=...) whose devices the groups partition."
            )
        return None
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound here: call batch_norm under a "
            f"transformation that names that axis (jax.vmap/pmap(..., axis_name=...) or "
            f"jax.shard_map over a mesh with that axis), or pass axis_name=None (under jit "
            f"with a sharded batch none is needed)."
        ) from None
    if axis_index_groups is None:
        return None
    try:
        groups = tuple(tuple(_index("axis_index_groups", i) for i in g)
                       for g in axis_index_groups)
    except TypeError as e:
        raise TypeError(
            f"axis_index_groups must be a sequence of sequences of ints, got "
            f"{axis_index_groups!r}."
        ) from e
    flat = sorted(i for g in groups for i in g)
    if (not groups or flat != list(range(size)) or len({len(g) for g in groups}) != 1):
        raise ValueError(
            f"axis_index_groups must partition the {size} indices of axis {axis_name!r} "
            f"into groups of equal size (each index in exactly one group), got "
            f"{axis_index_groups!r}."
        )
    return groups


def _per_feature(shape: Shape, feats: tuple[int, ...]) -> int:
    return math.prod(shape[a] for a in _reduction_axes(len(shape), feats))


def validate(
    x: ArrayLike,
    params: BatchNormParams | None,
    stats: BatchStats | None,
    *,
    training: bool,
    axis: Axis = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    dtype: DTypeLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Groups | None = None,
    mask: ArrayLike | None = None,
) -> Validated:
    """Every trace-time check of a BatchNorm call, with :func:`batch_norm`'s arguments.

    Args:
      x: the input.
      params: :class:`BatchNormParams` or ``None``.
      stats: :class:`BatchStats` or ``None``.
      training: static Python bool.
      axis: feature axis or axes.
      momentum: running-average decay, a number in [0, 1], or ``None``.
      epsilon: a number > 0 (also after rounding to the statistics' dtype).
      dtype: output dtype or ``None``.
      axis_name: mapped axis name, which must be bound here when batch statistics are used,
        or ``None``.
      axis_index_groups: a partition of ``axis_name``'s indices into equal groups, or
        ``None``.
      mask: boolean array broadcastable to ``x``, or ``None``.

    Returns:
      A :class:`Validated` ``(x, feature_axes, mask)``, with ``x`` and ``mask`` as arrays.

    Raises:
      TypeError: for arguments of the wrong Python type (``params`` or ``stats`` not the
        state types, or swapped; a non-number or array hyperparameter).
      ValueError: for everything :func:`batch_norm` lists.

    Example:

    >>> import jax.numpy as jnp
    >>> validate(jnp.ones((4, 3)), None, None, training=True).feature_axes
    (1,)
    """
    x = jnp.asarray(x)
    _check_input(x)
    if not isinstance(training, bool | np.bool_):
        raise ValueError(
            f"training must be a static Python bool, got {type(training).__name__}; pass it "
            f"as a static argument (e.g. functools.partial or jit's static_argnames)."
        )
    _check_params(params)
    _check_stats(stats)
    _check_momentum(momentum)
    _check_epsilon(epsilon, x.dtype)
    _check_dtype(dtype, x.dtype)
    use_batch = training or stats is None
    if use_batch:
        _check_axis_name(axis_name, axis_index_groups)  # unused (may be unbound) otherwise
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
    if use_batch and axis_name is None and _per_feature(x.shape, feats) <= 1:
        raise ValueError(
            f"expected more than 1 value per feature when using batch statistics, got input "
            f"shape {x.shape} with features along axis {axis!r}; use a larger batch, or "
            f"training=False with running statistics."
        )
    return Validated(x, feats, mask)


def _stats_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The real dtype of a statistics dtype (float32 or wider, so one NumPy knows)."""
    return np.finfo(dtype).dtype


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
      param_dtype: dtype of ``scale`` and ``bias``. Statistics are always float32.

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
    stats = (
        BatchStats(
            jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.zeros((), jnp.int32)
        )
        if track_running_stats
        else None
    )
    return params, stats


# ----------------------------------------------------------------------------------------
# Helpers of the reductions.


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
    return x.dtype.itemsize < 4 or x.size * max(x.dtype.itemsize, 4) >= _STREAM_BYTES


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
    if not leaves:
        return arrays
    leaves = lax.platform_dependent(*leaves, cpu=_barrier, default=lambda *a: a)
    out: tuple[Any, ...] = jax.tree.unflatten(tree, leaves)
    return out


def _barrier(*arrays: Array) -> tuple[Array, ...]:
    # One barrier per set of shard_map varying axes, so that no array changes type.
    groups: dict[frozenset[AxisName], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(_varying_axes(a), []).append(i)
    out: list[Any] = [None] * len(arrays)
    for idx in groups.values():
        for i, a in zip(idx, lax.optimization_barrier(tuple(arrays[i] for i in idx)),
                        strict=True):
            out[i] = a
    return tuple(out)


def _varying_axes(a: Any) -> frozenset[AxisName]:
    """The shard_map axes along which ``a`` varies (empty outside shard_map)."""
    mat = getattr(jax.typeof(a), "mat", None)
    return frozenset(getattr(mat, "varying", ()))


def _vary_like(tree: Any, ref: Array) -> Any:
    """``tree``'s arrays cast to vary along ``ref``'s shard_map axes (a no-op elsewhere).

    Per-feature values meet full-size ones in the tangent; casting them first keeps the
    cast (whose transpose is a ``psum``) on per-feature vectors, never on a broadcast.
    """
    want = _varying_axes(ref)

    def cast(v: Any) -> Any:
        missing = tuple(sorted(want - _varying_axes(v), key=str))
        return lax.pcast(v, missing, to="varying") if missing else v

    return jax.tree.map(cast, tree)


def _abs2(v: Array) -> Array:
    """``|v|^2``, real for complex ``v``."""
    if jnp.iscomplexobj(v):
        return jnp.square(v.real) + jnp.square(v.imag)
    return jnp.square(v)


def _sync_sum(v: Any, axis_name: AxisName, groups: Any) -> Any:
    """``psum`` over the axis (or within each group, as one all_gather then a local sum)."""
    if groups is None:
        return lax.psum(v, axis_name)
    return jax.tree.map(lambda g: g.sum(0),
                        lax.all_gather(v, axis_name, axis_index_groups=groups))


# The feature count per row of an input's widened view is made a multiple of this (see
# _widen): the number of float32 lanes in a 512-bit vector register.
_LANES = 16


def _widen(x: Array, feats: tuple[int, ...], mask: Array | None) -> int:
    """How many rows of channels-last ``x`` to lay side by side: the fold of its view.

    XLA:CPU runs each reduction and elementwise pass as loops over the array's dimensions,
    the innermost over the features; with a few features per row (20 or 50, as in a small
    CNN) that loop is short, and half-precision inputs pay for it most: every element is
    converted to float32 and back. Viewing ``(N, *S, C)`` as ``(N, prod(S) / k, k * C)`` (a
    free reshape that leaves the batch axis, the one that may be sharded, alone) makes the
    passes over ``k`` rows at once; per-feature vectors are tiled ``k`` times to meet the
    view, and its per-column sums folded back. That measured up to a fifth faster for
    bfloat16 with 20 features. Float32 inputs keep their own layout, so that their sums
    are added in the same order as plain reductions' and their results stay those of
    flax's layer to the last bits (the view would speed them up too, by about as much).

    Returns the smallest ``k`` that divides ``prod(S)`` and makes ``k * C`` a multiple of
    :data:`_LANES`, or 1 (no view): for float32 or wider, features that already fill whole
    vectors, other layouts, masks, and inputs with nothing to reduce.
    """
    if (x.dtype.itemsize >= 4 or mask is not None or feats != (x.ndim - 1,) or x.ndim < 3
            or x.size == 0):
        return 1
    c = x.shape[-1]
    if c % _LANES == 0:
        return 1
    rows = math.prod(x.shape[1:-1])
    for k in range(2, rows + 1):
        if rows % k == 0 and (k * c) % _LANES == 0:
            return k
    return 1


def _wide_view(x: Array, fold: int) -> Array:
    """``x`` as ``(N, prod(S) / fold, fold * C)``; itself when ``fold`` is 1."""
    if fold == 1:
        return x
    return x.reshape(x.shape[0], -1, fold * x.shape[-1])


def _fold(v: Array, fold: int) -> Array:
    """Per-column sums of a widened view, ``(fold * C,)``, as per-feature sums ``(C,)``."""
    return v if fold == 1 else v.reshape(fold, -1).sum(0)


def _tile(v: Array, fold: int) -> Array:
    """A per-feature vector ``(C,)`` repeated for each of the view's ``fold`` rows."""
    return v if fold == 1 else jnp.tile(v, fold)


def _shift(x: Array, red: tuple[int, ...], sdt: Any, fold: int = 1) -> Array:
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
    return _fold(jnp.mean(head.astype(sdt), axis=red), fold) / fold


def _local_sums(
    x: Array, red: tuple[int, ...], mask: Array | None, fast_variance: bool, fold: int = 1
) -> tuple[Array, Array, Array]:
    """Per-device ``(count, a, b)``: ``(n, sum x, sum |x|^2)`` if fast else ``(n, mean, M2)``.

    ``fold > 1``: ``x`` is a widened view (see :func:`_widen`; no mask), whose last axis
    holds ``fold`` rows of features side by side.
    """
    sdt = _stats_dtype(x.dtype)
    rdt = _real_dtype(sdt)
    fshape = tuple(s for a, s in enumerate(x.shape) if a not in red)
    if fold > 1:
        fshape = (fshape[-1] // fold,)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape) if not red else mask
    if not red or math.prod(x.shape[a] for a in red) == 0:
        return _trivial_sums(x, red, mask, fast_variance, fshape)
    if mask is None:
        n = jnp.full(fshape, math.prod(x.shape[a] for a in red) * fold, rdt)
        if fast_variance:
            xa, xb = _private(x, x, stream=_streams(x))
            return (n, _fold(jnp.sum(xa.astype(sdt), axis=red), fold),
                    _fold(jnp.sum(_abs2(xb.astype(sdt)), axis=red), fold))
        # Corrected two-pass variance around a shift taken from a slice of x (Chan, Golub &
        # LeVeque 1983): sums of the deviations from the shift and of their squares, then
        # mean = shift + sd / n and M2 = sdd - |sd|^2 / n, with no large terms cancelling
        # when |mean| >> std. The two sums read x once each and share no temporary.
        shift = lax.stop_gradient(_shift(x, red, sdt, fold))
        xa, sa, xb, sb = _private(x, shift, x, shift, stream=_streams(x))
        sd = _fold(jnp.sum(xa.astype(sdt) - jnp.expand_dims(_tile(sa, fold), red), axis=red),
                   fold)
        sdd = _fold(jnp.sum(_abs2(xb.astype(sdt) - jnp.expand_dims(_tile(sb, fold), red)),
                            axis=red), fold)
        mean = shift + sd / n
        m2 = jnp.maximum(sdd - _abs2(sd) / n, 0)
        return n, mean, m2
    return _masked_sums(x, red, mask, fast_variance)


def _trivial_sums(x: Array, red: tuple[int, ...], mask: Array | None, fast_variance: bool,
                  fshape: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """:func:`_local_sums` with nothing to reduce.

    Each element is its own batch (count 1, variance 0), or there is no element at all
    (count 0, and mean and variance 0 by convention).
    """
    sdt = _stats_dtype(x.dtype)
    rdt = _real_dtype(sdt)
    if red:
        return jnp.zeros(fshape, rdt), jnp.zeros(fshape, sdt), jnp.zeros(fshape, rdt)
    keep = jnp.ones(fshape, bool) if mask is None else jnp.broadcast_to(mask, fshape)
    xs = jnp.where(keep, x.astype(sdt), 0)
    n = keep.astype(rdt)
    if fast_variance:
        return n, xs, _abs2(xs)
    return n, xs, jnp.zeros(fshape, rdt)


def _masked_sums(x: Array, red: tuple[int, ...], mask: Array, fast_variance: bool
                 ) -> tuple[Array, Array, Array]:
    """:func:`_local_sums` with a mask (the same ``(n, a, b)``), over a non-empty batch."""
    sdt = _stats_dtype(x.dtype)
    rdt = _real_dtype(sdt)
    # Masked: every sum gets its own x and (unbroadcast) mask. XLA:CPU's reduction fusions
    # do not absorb the select, so each masked sum still materializes its input once.
    def msums(c: Array | None, *fs: Callable[[Array], Array]) -> list[Array]:
        ops = (x, mask) if c is None else (x, mask, c)
        copies = _private(*(ops * len(fs)), stream=_streams(x))
        out = []
        for i, f in enumerate(fs):
            xp, kp, *cp = copies[i * len(ops):(i + 1) * len(ops)]
            v = xp.astype(sdt) if c is None else xp.astype(sdt) - jnp.expand_dims(cp[0], red)
            fv = f(v)
            out.append(jnp.sum(jnp.where(kp, fv, jnp.zeros((), fv.dtype)), axis=red))
        return out

    km, = _private(mask, stream=_streams(x))
    n = jnp.sum(jnp.broadcast_to(km, x.shape), axis=red, dtype=rdt)
    if fast_variance:
        s1, s2 = msums(None, lambda v: v, _abs2)
        return n, s1, s2
    safe_n = jnp.maximum(n, 1)
    # With a mask the shift must come from valid elements only (masked-out ones may hold
    # anything): pass 1 is the exact masked mean. Pass 2: deviations from it and their
    # squares; the correction term removes the shift's own rounding error.
    shift = lax.stop_gradient(msums(None, lambda v: v)[0] / safe_n)
    sd, sdd = msums(shift, lambda v: v, _abs2)
    mean = shift + sd / safe_n
    m2 = jnp.maximum(sdd - _abs2(sd) / safe_n, 0)
    return n, mean, m2


def _moments(
    x: Array, feats: tuple[int, ...], mask: Array | None, axis_name: AxisName | None,
    groups: Any, fast_variance: bool, fold: int = 1,
) -> Moments:
    """:func:`moments` on checked arguments, under any transformation that binds the axis.

    ``fold > 1``: ``x`` is a widened view (:func:`_widen`); the moments are per feature.
    """
    n, a, b = _local_sums(x, _reduction_axes(x.ndim, feats), mask, fast_variance, fold)
    if fast_variance:
        if axis_name is not None:
            n, a, b = _sync_sum((n, a, b), axis_name, groups)
        safe_n = jnp.maximum(n, 1)
        mean = a / safe_n
        var = jnp.maximum(b / safe_n - _abs2(mean), 0)
        return Moments(mean, var, n)
    if axis_name is None:
        return Moments(a, b / jnp.maximum(n, 1), n)
    cplx = jnp.iscomplexobj(a)
    triple = jnp.stack([n, a.real, a.imag, b] if cplx else [n, a, b])
    if groups is None:
        # An all_gather written as one psum: each device fills its own slot. Unlike
        # all_gather, psum's result is device-invariant, so shard_map can return the
        # statistics replicated (out_specs=P()) with its replication check on.
        slots = jnp.zeros((lax.axis_size(axis_name), *triple.shape), triple.dtype)
        g = lax.psum(slots.at[lax.axis_index(axis_name)].set(triple), axis_name)
    else:
        g = lax.all_gather(triple, axis_name, axis_index_groups=groups)
    # Chan et al.'s exact merge of every device's (count, mean, M2).
    ns, m2s = g[:, 0], g[:, -1]
    means = lax.complex(g[:, 1], g[:, 2]) if cplx else g[:, 1]
    total = jnp.sum(ns, axis=0)
    safe_total = jnp.maximum(total, 1)
    mean = jnp.sum(ns * means, axis=0) / safe_total
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * _abs2(means - mean), axis=0)
    return Moments(mean, m2 / safe_total, total)


# ----------------------------------------------------------------------------------------
# Explicit mesh axes: the algorithm runs per device in a shard_map over them.


class _Explicit(NamedTuple):
    mesh: Any  # the (abstract) mesh of x's sharding
    dims: tuple[tuple[str, ...], ...]  # explicit mesh axes sharding each dim of x
    sync: tuple[str, ...]  # those on the reduction dims: the statistics sync over them


def _explicit(x: Array, feats: tuple[int, ...]) -> _Explicit | None:
    """How ``x`` is sharded over explicit mesh axes, if any of its reduction dims is."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or not getattr(mesh, "axis_names", ()):
        return None
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t == AxisType.Explicit}
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    dims = tuple(tuple(n for n in (() if s is None else _names(s)) if n in explicit)
                 for s in spec)
    sync = tuple(n for a in _reduction_axes(x.ndim, feats) for n in dims[a])
    return _Explicit(mesh, dims, sync) if sync else None


def _on_explicit(plan: _Explicit, feats: tuple[int, ...],
                 fn: Callable[[Array, Array | None, Any, tuple[str, ...]], _R], x: Array,
                 mask: Array | None, per_feature: Any, x_out: bool) -> _R:
    """Runs ``fn(x, mask, per_feature, sync_axes)`` per device over ``plan``'s mesh axes.

    ``fn`` returns ``(full, features)``: an array shaped like ``x`` (when ``x_out``) or
    ``None``, and a pytree of feature-shaped arrays. Feature-shaped inputs are resharded
    to ``x``'s sharding of its feature dims first (a no-op when they already match).
    """
    spec_x = P(*(d or None for d in plan.dims))
    spec_f = P(*(plan.dims[a] or None for a in feats))
    names = {n for d in plan.dims for n in d}

    def place(v: Any, spec: P) -> Any:
        if getattr(getattr(jax.typeof(v), "sharding", None), "spec", None) == spec:
            return v
        return jax.sharding.reshard(v, NamedSharding(plan.mesh, spec))

    per_feature = jax.tree.map(lambda v: place(v, spec_f), per_feature)
    spec_m = None
    if mask is not None:
        mask = jnp.broadcast_to(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
        spec_m = P(*(d or None if mask.shape[a] == x.shape[a] else None
                     for a, d in enumerate(plan.dims)))
        mask = place(mask, spec_m)
    out_specs = (spec_x if x_out else None, spec_f)
    def per_device(x: Array, mask: Array | None, pf: Any) -> _R:
        return fn(x, mask, pf, plan.sync)

    run = jax.shard_map(
        per_device, mesh=plan.mesh,
        in_specs=(spec_x, spec_m, jax.tree.map(lambda _: spec_f, per_feature)),
        out_specs=out_specs, axis_names=names)
    return run(place(x, spec_x), mask, per_feature)


def _join(axis_name: AxisName | None, groups: Any, sync: tuple[str, ...]) -> AxisName | None:
    if not sync:
        return axis_name
    if groups is not None:
        raise ValueError(
            f"axis_index_groups cannot be combined with a batch sharded over explicit mesh "
            f"axes {sync}; shard the batch over auto axes, or group with shard_map."
        )
    return (*(() if axis_name is None else _names(axis_name)), *sync)


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
    differentiated through, use :func:`batch_normalize`. The arithmetic runs in the
    promoted dtype of ``x`` and the statistics (float32 for half-precision inputs); the
    result is cast to ``dtype`` or else ``x.dtype``.

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
    mean, var = jnp.asarray(mean), jnp.asarray(var)
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
    one unless no feature had any valid element. The result is differentiable; the layers
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
        w = 1.0 / (stats.count + 1).astype(jnp.result_type(stats.var))
        new_mean = (1 - w) * stats.mean + w * batch.mean
        new_var = (1 - w) * stats.var + w * batch.var
    else:
        new_mean = decay * stats.mean + (1 - decay) * batch.mean
        new_var = decay * stats.var + (1 - decay) * batch.var
    return BatchStats(
        jnp.where(valid, new_mean, stats.mean).astype(mean_dtype),
        jnp.where(valid, new_var, stats.var).astype(jnp.result_type(stats.var)),
        stats.count + jnp.any(valid).astype(jnp.result_type(stats.count)),
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


def _renorm_bounds(r_max: Any, d_max: Any) -> tuple[Hyper, Hyper]:
    r = _hyper("r_max", r_max)
    d = _hyper("d_max", d_max)
    if isinstance(r, float) and not r >= 1.0:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}.")
    if isinstance(d, float) and not d >= 0.0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}.")
    return r, d


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
        outputs ``bias`` and keeps its running statistics.
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
        value per channel"; the Flax modules accept it, as flax does).

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


# ----------------------------------------------------------------------------------------
# Training-mode normalization with derivatives through the statistics.


class _TrainConfig(NamedTuple):
    feats: tuple[int, ...]
    axis_name: AxisName | None
    groups: tuple[tuple[int, ...], ...] | None
    fast_variance: bool
    dtype: Any  # of the output
    fold: int  # > 1: x is a widened view of fold rows (see _widen); feats is its last axis


# Batch Renormalization's reference: running mean and variance, r_max and d_max.
_Ref: TypeAlias = tuple[Array, Array, Hyper, Hyper]


class _Parts(NamedTuple):
    """The forward pass's per-feature results, which the tangent needs."""

    y: Array
    moments: Moments
    inv: Array  # rsqrt(var + eps); 0 for features without a valid element
    mul: Array | None  # multiplier of xhat in y (scale, times r with renorm); None: 1
    r: Array | None  # renorm's corrections, without gradient
    d: Array | None


def _train_parts(cfg: _TrainConfig, x: Array, scale: Array | None, bias: Array | None,
                 eps: Hyper, ref: _Ref | None, mask: Array | None) -> _Parts:
    # No stop_gradient on the moments here: differentiating the tangent rule itself (a
    # Hessian) must see how they depend on x. Their own tangent is zero (the rule's).
    m = _moments(x, cfg.feats, mask, cfg.axis_name, cfg.groups, cfg.fast_variance, cfg.fold)
    valid = m.count > 0
    inv = jnp.where(valid, lax.rsqrt(m.var + eps), 0)
    mul, add, r, d = scale, bias, None, None
    if ref is not None:
        ref_mean, ref_var, r_max, d_max = ref
        sigma = jnp.sqrt(ref_var + eps)
        r = jnp.clip(jnp.sqrt(m.var + eps) / sigma, 1.0 / r_max, r_max)
        d = jnp.where(valid, jnp.clip((m.mean - ref_mean) / sigma, -d_max, d_max), 0)
        r, d = lax.stop_gradient(r), lax.stop_gradient(d)
        mul = r if scale is None else scale * r
        shift = d if scale is None else scale * d
        add = shift if bias is None else bias + shift
    bshape = _bshape(x.ndim, cfg.feats, tuple(x.shape[a] for a in cfg.feats))
    w = inv if mul is None else inv * mul
    # The output's operands are private too, so that a reduction consuming y (a loss, the
    # next layer's statistics) can absorb its computation.
    xy, mean_y, w_y, add_y = _private(x, m.mean, w, add, stream=_streams(x))

    def bc(v: Array) -> Array:
        return _tile(v, cfg.fold).reshape(bshape)

    y = (xy - bc(mean_y)) * bc(w_y)
    if add_y is not None:
        y = y + bc(add_y)
    return _Parts(y.astype(cfg.dtype), m, inv, mul, r, d)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_normalize(cfg: _TrainConfig, x: Array, scale: Array | None, bias: Array | None,
                     eps: Hyper, ref: _Ref | None, mask: Array | None
                     ) -> tuple[Array, Moments]:
    """``(y, moments)`` of training-mode BN; the moments carry no gradient."""
    parts = _train_parts(cfg, x, scale, bias, eps, ref, mask)
    return parts.y, parts.moments


def _live(t: Any) -> bool:
    return t is not None and not isinstance(t, SymbolicZero)


@functools.partial(_train_normalize.defjvp, symbolic_zeros=True)
def _train_normalize_jvp(
    cfg: _TrainConfig,
    primals: tuple[Array, Array | None, Array | None, Hyper, _Ref | None, Array | None],
    tangents: tuple[Any, ...],  # arrays, or SymbolicZero where an input has no tangent
) -> tuple[tuple[Array, Moments], tuple[Array, Moments]]:
    x, scale, bias, eps, ref, mask = primals
    x_dot, scale_dot, bias_dot, eps_dot = tangents[:4]
    parts = _train_parts(cfg, x, scale, bias, eps, ref, mask)
    out = (parts.y, parts.moments)
    m_dot = zero_from_primal(parts.moments, symbolic_zeros=True)
    # Per-feature tangents of the affine: y gains xhat * k1 + k0. (renorm's r and d, and the
    # reference statistics, carry no gradient.)
    k1 = k0 = None
    if _live(scale_dot):
        k1 = scale_dot if parts.r is None else scale_dot * parts.r
        k0 = None if parts.d is None else scale_dot * parts.d
    if _live(bias_dot):
        k0 = bias_dot if k0 is None else k0 + bias_dot
    if _live(eps_dot):
        # d inv / d eps = -inv^3 / 2, so y gains xhat * mul * (-inv^2 / 2) * eps_dot.
        k = -0.5 * jnp.square(parts.inv) * eps_dot
        k = k if parts.mul is None else k * parts.mul
        k1 = k if k1 is None else k1 + k
    x_dot = x_dot if _live(x_dot) else None
    if x_dot is None and k1 is None and k0 is None:
        return out, (zero_from_primal(parts.y, symbolic_zeros=True), m_dot)
    w = parts.inv if parts.mul is None else parts.inv * parts.mul
    wn = w / jnp.maximum(parts.moments.count, 1)
    # Recomputed from x and per-feature vectors when JAX transposes it, so reverse mode
    # keeps no full-size residual but x itself (x - mean, xhat are never saved).
    tangent = jax.checkpoint(functools.partial(_train_tangent, cfg))
    y_dot = tangent(x, parts.moments.mean, parts.inv, w, (wn, wn * parts.inv), mask,
                    x_dot, k1, k0)
    return out, (y_dot, m_dot)


def _private_terms(x: Array) -> bool:
    return _streams(x) and x.dtype.itemsize < 4


def _train_tangent(cfg: _TrainConfig, x: Array, mean: Array, inv: Array, w: Array,
                   wn: tuple[Array, Array], mask: Array | None, x_dot: Array | None,
                   k1: Array | None, k0: Array | None) -> Array:
    """The tangent of y: linear in ``x_dot``, ``k1``, ``k0``; x and per-feature otherwise.

    With xhat = (x - mean) * inv and w = inv * scale (times r with renorm),
    ``y_dot = w * (x_dot - sum(x_dot) / n - xhat * Re(sum(conj(xhat) * x_dot)) / n)
    + xhat * k1 + k0``, the sums over the valid elements of every device (n their count;
    ``wn`` is ``(w / n, w * inv / n)``, computed once in the forward pass). Its transpose
    is the memory-saving backward pass: two per-feature sums of the cotangent (one
    ``psum`` for both when synced, which also gives replicated parameters their global
    gradient), then one elementwise pass.
    """
    red = _reduction_axes(x.ndim, cfg.feats)
    bshape = _bshape(x.ndim, cfg.feats, tuple(x.shape[a] for a in cfg.feats))
    sdt = mean.dtype

    def bc(v: Array) -> Array:
        return _tile(v, cfg.fold).reshape(bshape)

    def fsum(v: Array) -> Array:
        return _fold(jnp.sum(v, axis=red), cfg.fold)

    stream = _streams(x)
    # Barriers only on x and the statistics (see _private), never on tangents: a barrier's
    # transpose is a barrier, which would make the backward pass materialize each term.
    # Distinct copies for the two passes over x: two barriers of the same (x, mean) would be
    # merged by XLA's CSE, and x - mean then materialized once for both.
    xb, mb, xc, mc = _private(x, mean, x, mean, stream=stream)
    # One conversion of x_dot, used twice: transposed, dx is summed in float32 and rounded
    # once (two conversions would round each part of dx to x's dtype first).
    t_all = None if x_dot is None else x_dot.astype(sdt)
    if t_all is not None:
        t = t_all
        # Centred, not standardized: inv multiplies the per-feature sums instead, so that
        # each full-size pass (here and transposed) reads x and one per-feature vector.
        dev_b = xb.astype(sdt) - bc(mb)
        prod = jnp.conj(dev_b) * t if jnp.iscomplexobj(dev_b) else dev_b * t
        prod = prod.real if jnp.iscomplexobj(prod) else prod
        if mask is not None:
            t = jnp.where(mask, t, jnp.zeros((), t.dtype))
            prod = jnp.where(mask, prod, jnp.zeros((), prod.dtype))
        sums = (fsum(t), fsum(prod))
        if cfg.axis_name is not None:
            sums = _sync_sum(sums, cfg.axis_name, cfg.groups)
        c0 = -wn[0] * sums[0]
        c1 = -wn[1] * sums[1]
        k0 = c0 if k0 is None else c0 + k0
        k1 = c1 if k1 is None else c1 + k1
    k0, k1 = _vary_like((k0, k1), x)
    terms: list[Array] = []
    if t_all is not None:
        terms.append(t_all * bc(_vary_like(w, x)))
    if k1 is not None:
        terms.append((xc.astype(sdt) - bc(mc)) * bc(inv * k1))
    if k0 is not None:
        terms.append(jnp.broadcast_to(bc(k0), x.shape))
    if len(terms) > 1 and _private_terms(x):
        # Transposed, each term's cotangent is the output cotangent g: the term of k0 sums
        # it, that of k1 sums it times xhat, that of x_dot scales it into dx. Barriers on
        # the terms, taken in the output dtype, become barriers on g there, so that each of
        # the three reads g itself, not a shared float32 conversion of it (which XLA:CPU
        # would materialize). In forward mode the terms are then rounded to the output
        # dtype before they are summed (in float32).
        terms = [t.astype(sdt) for t in _private(*(t.astype(cfg.dtype) for t in terms))]
    return sum(terms[1:], start=terms[0]).astype(cfg.dtype)
