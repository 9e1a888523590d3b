"""Argument checking, and the shape and dtype conventions the checks establish.

Everything here runs at trace time on static shapes and values, and raises ``TypeError`` or
``ValueError`` naming what was expected and what was got. :func:`validate` and
:func:`feature_axes` are public, re-exported by :mod:`jaxbn.core`, whose type aliases and
state types this module uses.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer

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
    Validated,
)

Shape: TypeAlias = tuple[int, ...]
Hyper: TypeAlias = float | Array  # a Python number, or a scalar array (traced or not)


# ----------------------------------------------------------------------------------------
# Axes and shapes.


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


def _is_static(shape: Sequence[Any]) -> bool:
    """Whether every dimension is a known int (not symbolic, as in ``jax.export``)."""
    return all(isinstance(d, int | np.integer) for d in shape)


def _per_feature(shape: Shape, feats: tuple[int, ...]) -> int:
    return math.prod(shape[a] for a in _reduction_axes(len(shape), feats))


# ----------------------------------------------------------------------------------------
# Arrays, dtypes and hyperparameters.


def _is_inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating))


def _check_input(x: Array) -> None:
    if x.ndim == 0:
        raise ValueError(
            "expected an input of rank >= 1 (a batch with a feature axis), got a scalar "
            "(shape ()); add the batch and feature axes, e.g. x.reshape(1, 1)."
        )
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


def _stats_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    return jnp.promote_types(dtype, jnp.float32)


def _as_stats_dtype(mean: ArrayLike, var: ArrayLike, x_dtype: Any) -> tuple[Array, Array]:
    """Running statistics in their own dtype, at least float32 and at least ``x``'s.

    Statistics built from Python floats (``jnp.full((C,), 0.5)``) are weakly typed, and
    would otherwise take a half-precision input's dtype in the arithmetic: a mean of 1000.3
    becomes 1000 in bfloat16.
    """
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    sdt = _stats_dtype(x_dtype)
    return (mean.astype(jnp.promote_types(mean.dtype, sdt)),
            var.astype(jnp.promote_types(var.dtype, _real_dtype(sdt))))


def _real_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The real dtype of a statistics dtype (float32 or wider, so one NumPy knows)."""
    return np.finfo(dtype).dtype


def _renorm_bounds(r_max: Any, d_max: Any) -> tuple[Hyper, Hyper]:
    r = _hyper("r_max", r_max)
    d = _hyper("d_max", d_max)
    if isinstance(r, float) and not r >= 1.0:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}.")
    if isinstance(d, float) and not d >= 0.0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}.")
    return r, d


# ----------------------------------------------------------------------------------------
# Named axes.


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


# ----------------------------------------------------------------------------------------
# The state types, and every check of one call.


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
    # With a symbolic batch dimension (jax.export) the count is unknown until the call;
    # there, as in the Flax modules, one value per feature gives variance 0.
    if (use_batch and axis_name is None and _is_static(x.shape)
            and _per_feature(x.shape, feats) <= 1):
        raise ValueError(
            f"expected more than 1 value per feature when using batch statistics, got input "
            f"shape {x.shape} with features along axis {axis!r}; use a larger batch, or "
            f"training=False with running statistics."
        )
    return Validated(x, feats, mask)
