"""BatchNorm fused with its activation and a residual add (In-Place Activated BatchNorm).

:func:`batch_norm_act` computes ``activation(batch_norm(x) + residual)`` with one
derivative rule for the whole chain, so that reverse mode keeps fewer full-size tensors
than the three operations differentiated one by one (Rota Bulò, Porzi & Kontschieder,
"In-Place Activated BatchNorm for Memory-Optimized Training of DNNs", CVPR 2018).

What the backward pass keeps, per layer (besides per-feature vectors):

* ``"identity"`` and ``"leaky_relu"`` with ``negative_slope > 0`` (invertible): the output
  only, and the residual when one is given. The pre-activation is recovered by inverting
  the activation, and the normalized input ``xhat`` by inverting the affine map:
  ``xhat = (z - bias - residual) / scale``. In a network the output is what the next
  layer (a convolution, a pooling) keeps anyway, and the residual is the block's input or
  the shortcut's output, which other layers keep too: the layer adds no full-size tensor.
* ``"relu"`` (and ``"leaky_relu"`` with ``negative_slope <= 0``): the input ``x`` and the
  output. ReLU is not invertible where the output is 0, and there the gradient of ``x``
  still needs ``xhat`` (training-mode BN couples every position through the batch
  statistics: ``dx = w * (g' - mean(g') - xhat * mean(xhat * g'))`` with ``g'`` the
  cotangent after the activation, nonzero terms at every position), so ``x`` is kept; the
  activation's mask comes from the output, which the next layer keeps anyway. Compared
  with ``relu(batch_norm(x) + residual)`` differentiated op by op, this saves ReLU's own
  residual (its mask) where the compiler keeps one; XLA:CPU already derives the mask from
  the kept output, so there the two keep the same tensors.
* any other elementwise function: ``x`` and the residual; the pre-activation is
  recomputed from them in the backward pass and the function differentiated there. This
  saves nothing over the unfused chain but the activation's own residuals.

The scale in the inversion: ``scale`` is replaced by ``sign(scale) * 1e-5`` where its
magnitude is below ``1e-5`` (InPlace-ABN instead trains ``|scale| + eps`` in the forward
pass, which changes the model; here the forward pass is exactly the unfused one). Then
the recovered ``xhat`` has an absolute error of about the output dtype's rounding of
``|bias + residual|`` divided by ``|scale|``, which matters only for scales near 0: with a
scale initialized at 0 (a residual block's last BatchNorm in some recipes) the scale's
gradient is not recoverable from the output, so use ``"relu"`` there, which keeps ``x``.

Derivatives are a ``jax.custom_jvp`` like :func:`jaxbn.core.batch_normalize`'s: the tangent
is linear in the input tangents and computed, under ``jax.checkpoint``, from the kept
tensors and per-feature vectors only, so forward mode, reverse mode (JAX transposes the
tangent) and their compositions work, under ``vmap``, ``shard_map``, ``scan``,
``checkpoint`` and synchronization over named or explicit mesh axes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import zero_from_primal

from jaxbn._autodiff import _live, _train_parts, _TrainConfig
from jaxbn._checks import (
    Hyper,
    _bshape,
    _check_axis_name,
    _check_dtype,
    _check_epsilon,
    _check_feature_shape,
    _check_input,
    _check_mask,
    _check_params,
    _reduction_axes,
    feature_axes,
    validate,
)
from jaxbn._reductions import _sync_sum
from jaxbn._sharding import _explicit, _join, _on_explicit, _vary_like
from jaxbn._xla_cpu import _fold, _private, _streams, _tile, _wide_view, _widen
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
    normalize,
    update_stats,
)

__all__ = ["ACTIVATIONS", "batch_norm_act", "batch_normalize_act"]

#: The activations by name; any other elementwise callable is accepted too.
ACTIVATIONS = ("relu", "leaky_relu", "identity")

#: Smallest magnitude of the scale that the inversion divides by (see the module docstring).
SCALE_FLOOR = 1e-5

Activation = str | Callable[[Array], Array]


class _Act(NamedTuple):
    """A checked activation: static, hashable, and how its backward pass recovers ``z``."""

    kind: str  # "relu", "leaky_relu", "identity" or "function"
    slope: float  # leaky_relu's negative slope (0 otherwise)
    fn: Callable[[Array], Array] | None  # the function of kind "function"

    @property
    def path(self) -> str:
        """What the backward pass keeps: see the module docstring.

        ``"output"``: the output (and the residual); the activation is inverted.
        ``"mask"``: ``x`` and the output, whose sign is ReLU's derivative.
        ``"recompute"``: ``x`` and the residual; the pre-activation is recomputed. A
        leaky ReLU with a slope <= 0 is not invertible, and its output does not tell the
        sign of the pre-activation (slope 0 gives -0.0 for negative inputs).
        """
        if self.kind == "identity" or (self.kind == "leaky_relu" and self.slope > 0):
            return "output"
        return "mask" if self.kind == "relu" else "recompute"

    def __call__(self, z: Array) -> Array:
        if self.kind == "relu":
            return jax.nn.relu(z)
        if self.kind == "leaky_relu":
            return jax.nn.leaky_relu(z, self.slope)
        if self.kind == "identity":
            return z
        assert self.fn is not None
        return self.fn(z)


def _activation(activation: Any, negative_slope: Any) -> _Act:
    if callable(activation) and not isinstance(activation, str):
        return _Act("function", 0.0, activation)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS} or an elementwise callable, got "
            f"{activation!r}.")
    if activation != "leaky_relu":
        return _Act(activation, 0.0, None)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, int | float):
        raise ValueError(
            f"negative_slope must be a Python number (it decides, at trace time, whether the "
            f"activation can be inverted), got {type(negative_slope).__name__}.")
    slope = float(negative_slope)
    if slope != slope or abs(slope) == float("inf"):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}.")
    return _Act("leaky_relu", slope, None)


def _check_residual(residual: ArrayLike | None, x: Array) -> Array | None:
    if residual is None:
        return None
    r = jnp.asarray(residual)
    if r.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of x, {x.shape}, got {r.shape}; add a broadcast "
            f"residual after the layer instead.")
    if not jnp.issubdtype(r.dtype, jnp.inexact):
        raise ValueError(f"residual must be floating point, got dtype {r.dtype}.")
    return r


def _finish(act: _Act, y: Array, residual: Array | None) -> Array:
    """``act(y + residual)``: the unfused chain's arithmetic, operation for operation."""
    return act(y if residual is None else y + residual)


# ----------------------------------------------------------------------------------------
# The layer.


def batch_norm_act(
    x: ArrayLike,
    params: BatchNormParams | None,
    stats: BatchStats | None,
    *,
    training: bool,
    activation: Activation = "relu",
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
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
    """BatchNorm, residual add and activation in one: ``activation(batch_norm(x) + residual)``.

    The values, new statistics and derivatives are those of the unfused
    ``activation(jaxbn.batch_norm(x, ...)[0] + residual)``; in training, reverse mode keeps
    fewer full-size tensors (the module docstring of :mod:`jaxbn.fused` says which): for
    ``"leaky_relu"`` (In-Place ABN) and ``"identity"`` only the output, which the next layer
    keeps anyway, and the residual; for ``"relu"`` the input and the output. Inference
    (``training=False`` with ``stats``) is the plain chain, differentiated op by op.

    Args:
      x: input of any rank with a real floating dtype.
      params: :class:`jaxbn.BatchNormParams` of the feature shape, or ``None``.
      stats: :class:`jaxbn.BatchStats`, or ``None``.
      training: static Python bool, as in :func:`jaxbn.batch_norm`.
      activation: ``"relu"``, ``"leaky_relu"``, ``"identity"``, or an elementwise callable
        (which is differentiated by recomputing its input from ``x`` and ``residual``: no
        memory saved over the unfused chain but the activation's own residuals).
      negative_slope: ``"leaky_relu"``'s slope for negative inputs, a Python number; the
        output keeps its sign (and the layer its memory saving) only when it is > 0.
      residual: optional array of the shape of ``x`` added before the activation (a
        ResNet block's shortcut), or ``None``.
      axis: feature axis or axes.
      momentum: running-average decay (flax's convention), or ``None``.
      epsilon: added to the variance, > 0.
      unbiased_running_var: keep the unbiased batch variance in the running variance.
      axis_name: mapped axis to synchronize the statistics over.
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements take no part
        in the statistics.
      fast_variance: use ``E[x^2] - E[x]^2`` (see :func:`jaxbn.moments`).
      dtype: dtype of the normalized values (default ``x.dtype``); the output has the dtype
        of their sum with ``residual``.

    Returns:
      ``(y, new_stats)`` as :func:`jaxbn.batch_norm` returns them, ``y`` activated.

    Raises:
      TypeError: for arguments of the wrong Python type.
      ValueError: for whatever :func:`jaxbn.batch_norm` rejects, a complex ``x``, an
        unknown ``activation``, a ``negative_slope`` that is not a finite Python number, or
        a ``residual`` of another shape or a non-floating dtype.

    Example:

    >>> import jax.numpy as jnp, jaxbn
    >>> params, stats = jaxbn.init(1)
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, stats = jaxbn.batch_norm_act(x, params, stats, training=True, epsilon=1e-12,
    ...                                 residual=jnp.array([[0.5], [0.5]]))
    >>> y[:, 0]
    Array([0. , 1.5], dtype=float32)
    """
    x, _, mask = validate(x, params, stats, training=training, axis=axis, momentum=momentum,
                          epsilon=epsilon, dtype=dtype, axis_name=axis_name,
                          axis_index_groups=axis_index_groups, mask=mask)
    act = _activation(activation, negative_slope)
    r = _check_residual(residual, x)
    _check_real(x)
    if not training and stats is not None:
        y = normalize(x, stats.mean, stats.var, params, axis=axis, epsilon=epsilon,
                      dtype=dtype)
        return _finish(act, y, r), stats
    out, m = batch_normalize_act(
        x, params, activation=activation, negative_slope=negative_slope, residual=r,
        axis=axis, epsilon=epsilon, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, fast_variance=fast_variance, dtype=dtype)
    if stats is None or not training:
        return out, stats
    new_stats = update_stats(stats, m, momentum=momentum,
                             unbiased_running_var=unbiased_running_var)
    return out, jax.tree.map(lax.stop_gradient, new_stats)


def _check_real(x: Array) -> None:
    if jnp.iscomplexobj(x):
        raise ValueError(f"batch_norm_act supports real inputs only, got {x.dtype}; use "
                         f"jaxbn.batch_norm for complex ones.")


def batch_normalize_act(
    x: ArrayLike,
    params: BatchNormParams | None,
    *,
    activation: Activation = "relu",
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
    axis: Axis = -1,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Groups | None = None,
    fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, Moments]:
    """Training-mode :func:`batch_norm_act` without running statistics.

    The fused counterpart of :func:`jaxbn.core.batch_normalize`: ``activation(y +
    residual)`` with ``y`` normalized by the batch's own (masked, synced) moments, and those
    moments (which carry no gradient). Any number of values per feature is accepted.

    Args:
      x: input of any rank, real floating point.
      params: :class:`jaxbn.BatchNormParams` of the feature shape, or ``None``.
      activation: as in :func:`batch_norm_act`.
      negative_slope: as in :func:`batch_norm_act`.
      residual: as in :func:`batch_norm_act`.
      axis: feature axis or axes.
      epsilon: added to the variance; a number > 0.
      mask: optional boolean array broadcastable to ``x``.
      axis_name: mapped axis to synchronize the statistics over.
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately.
      fast_variance: use ``E[x^2] - E[x]^2``.
      dtype: dtype of the normalized values (default ``x.dtype``).

    Returns:
      ``(out, moments)``.

    Raises:
      TypeError: for arguments of the wrong Python type.
      ValueError: as :func:`batch_norm_act`.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.0], [3.0]])
    >>> out, m = batch_normalize_act(x, None, activation="leaky_relu", negative_slope=0.5,
    ...                              epsilon=1e-12)
    >>> out[:, 0], m.mean
    (Array([-0.5,  1. ], dtype=float32), Array([2.], dtype=float32))
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_real(x)
    _check_params(params)
    eps = _check_epsilon(epsilon, x.dtype)
    _check_dtype(dtype, x.dtype)
    act = _activation(activation, negative_slope)
    r = _check_residual(residual, x)
    feats = feature_axes(x.ndim, axis)
    fshape = tuple(x.shape[a] for a in feats)
    if params is not None:
        _check_feature_shape("params.scale", params.scale, fshape, axis)
        _check_feature_shape("params.bias", params.bias, fshape, axis)
    mask = None if mask is None else jnp.asarray(mask)
    _check_mask(mask, x.shape)
    groups = _check_axis_name(axis_name, axis_index_groups)

    def run(x: Array, r: Array | None, mask: Array | None, pf: Any, sync: tuple[str, ...]
            ) -> tuple[Array, Moments]:
        fold = _widen(x, feats, mask)
        xv = _wide_view(x, fold)
        bn = _TrainConfig((xv.ndim - 1,) if fold > 1 else feats,
                          _join(axis_name, groups, sync), groups, bool(fast_variance),
                          jnp.dtype(dtype or x.dtype), fold)
        rv = None if r is None else _wide_view(r, fold)
        out, m = _fused(_Config(bn, act), xv, *pf, eps, rv, mask)
        return out.reshape(x.shape), m

    per_feature = (None, None) if params is None else tuple(params)
    plan = _explicit(x, feats)
    if plan is not None:
        out: tuple[Array, Moments] = _on_explicit(
            plan, feats, lambda x, m, pf, sync, r: run(x, r, m, pf, sync), x, mask,
            per_feature, x_out=True, like_x=(r,))
        return out
    return run(x, r, mask, per_feature, ())


# ----------------------------------------------------------------------------------------
# The derivative rule.


class _Config(NamedTuple):
    bn: _TrainConfig  # the normalization's (feature axes, sync, dtype of its values, view)
    act: _Act


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(cfg: _Config, x: Array, scale: Array | None, bias: Array | None, eps: Hyper,
           residual: Array | None, mask: Array | None) -> tuple[Array, Moments]:
    """``(act(bn(x) + residual), moments)`` in training mode; the moments carry no gradient."""
    parts = _train_parts(cfg.bn, x, scale, bias, eps, None, mask)
    return _finish(cfg.act, parts.y, residual), parts.moments


@functools.partial(_fused.defjvp, symbolic_zeros=True)
def _fused_jvp(
    cfg: _Config,
    primals: tuple[Array, Array | None, Array | None, Hyper, Array | None, Array | None],
    tangents: tuple[Any, ...],  # arrays, or SymbolicZero where an input has no tangent
) -> tuple[tuple[Array, Moments], tuple[Array, Moments]]:
    x, scale, bias, eps, r, mask = primals
    x_dot, scale_dot, bias_dot, eps_dot, r_dot = tangents[:5]
    parts = _train_parts(cfg.bn, x, scale, bias, eps, None, mask)
    out = _finish(cfg.act, parts.y, r)
    m = parts.moments
    m_dot = zero_from_primal(m, symbolic_zeros=True)
    # Per-feature tangents of the affine map: z gains xhat * k1 + k0.
    k1 = scale_dot if _live(scale_dot) else None
    k0 = bias_dot if _live(bias_dot) else None
    if _live(eps_dot):
        k = -0.5 * jnp.square(parts.inv) * eps_dot  # d inv / d eps = -inv^3 / 2
        k = k if scale is None else k * scale
        k1 = k if k1 is None else k1 + k
    x_dot = x_dot if _live(x_dot) else None
    r_dot = r_dot if _live(r_dot) else None
    if x_dot is None and r_dot is None and k1 is None and k0 is None:
        return (out, m), (zero_from_primal(out, symbolic_zeros=True), m_dot)
    w = parts.inv if scale is None else parts.inv * scale
    valid = m.count > 0
    path = cfg.act.path
    if path == "output":
        # xhat = (z - bias - residual) * c: the inverse of the affine map, c = 1 / scale.
        s = jnp.ones_like(parts.inv) if scale is None else scale.astype(parts.inv.dtype)
        floor = jnp.where(s < 0, -SCALE_FLOOR, SCALE_FLOOR).astype(s.dtype)
        c = jnp.where(valid, 1 / jnp.where(jnp.abs(s) < SCALE_FLOOR, floor, s), 0)
        src, aux, centre = out, r, bias
    else:
        # xhat = (x - mean) * inv, as in the BN core.
        c = parts.inv
        src, aux, centre = x, (out if path == "mask" else r), m.mean
    n = jnp.maximum(m.count, 1)
    # Recomputed from the kept tensors and per-feature vectors when JAX transposes it, so
    # reverse mode keeps src and aux only (see the module docstring).
    tangent = jax.checkpoint(functools.partial(_tangent, cfg))
    y_dot = tangent(src, aux, centre, (m.mean, w, bias, c, w / n, w * c / n), mask,
                    x_dot, r_dot, k1, k0)
    return (out, m), (y_dot.astype(out.dtype), m_dot)


def _invert(act: _Act, y: Array) -> Array:
    """The pre-activation ``z`` of an invertible activation's output ``y``."""
    if act.kind == "identity":
        return y
    # y - |y| is 0 or 2y exactly, so z = y where y >= 0 and y + (1 / slope - 1) * y =
    # y / slope (to one rounding) elsewhere; arithmetic rather than a select, which XLA:CPU
    # materializes as a full-size temporary when a reduction consumes it.
    return y + (y - jnp.abs(y)) * ((1 / act.slope - 1) / 2)


def _tangent(cfg: _Config, src: Array, aux: Array | None, centre: Array | None,
             pf: tuple[Array, ...], mask: Array | None, x_dot: Array | None,
             r_dot: Array | None, k1: Array | None, k0: Array | None) -> Array:
    """The tangent of the output: linear in the tangents, from kept tensors otherwise.

    With ``dev`` the centred input (``x - mean``; on the output path ``z - bias -
    residual``, i.e. ``scale * xhat``) and ``xhat = dev * c`` (``c`` is ``inv``, or
    ``1 / scale`` on the output path), the pre-activation's tangent is
    ``z_dot = w * x_dot + k0 - w * sum(x_dot) / n + dev * c * (k1 - w * c * sum(dev * x_dot)
    / n) + r_dot`` (sums over the valid elements of every device), and the output's is
    ``act'(z) * z_dot``. Transposed, this is the backward pass: the activation's derivative
    applied to the cotangent, two per-feature sums of it (one ``psum`` when synced), one
    elementwise pass.
    """
    mean, w, bias, c, wn0, wn1 = pf
    feats, fold = cfg.bn.feats, cfg.bn.fold
    red = _reduction_axes(src.ndim, feats)
    bshape = _bshape(src.ndim, feats, tuple(src.shape[a] for a in feats))
    sdt = w.dtype
    out_path = cfg.act.path == "output"

    def bc(v: Array) -> Array:
        return _tile(v, fold).reshape(bshape)

    def centred(s: Array, a: Array | None, k: Array | None) -> Array:
        s = s.astype(sdt)
        if not out_path:
            assert k is not None
            return s - bc(k)
        u = _invert(cfg.act, s)
        u = u if k is None else u - bc(k.astype(sdt))
        return u if a is None else u - a.astype(sdt)

    # Distinct copies for the two passes over src (see jaxbn.core._private), so that each
    # reads src from its buffer instead of a shared materialized dev.
    a_dev = aux if out_path else None
    sb, ab, kb, sc, ac, kc = _private(src, a_dev, centre, src, a_dev, centre,
                                      stream=_streams(src))
    t_all = None if x_dot is None else x_dot.astype(sdt)
    if t_all is not None:
        t, prod = t_all, centred(sb, ab, kb) * t_all
        if mask is not None:
            t = jnp.where(mask, t, jnp.zeros((), t.dtype))
            prod = jnp.where(mask, prod, jnp.zeros((), prod.dtype))
        sums = (_fold(jnp.sum(t, axis=red), fold), _fold(jnp.sum(prod, axis=red), fold))
        if cfg.bn.axis_name is not None:
            sums = _sync_sum(sums, cfg.bn.axis_name, cfg.bn.groups)
        c0, c1 = -wn0 * sums[0], -wn1 * sums[1]
        k0 = c0 if k0 is None else c0 + k0
        k1 = c1 if k1 is None else c1 + k1
    k0, k1 = _vary_like((k0, k1), src)
    terms: list[Array] = []
    if t_all is not None:
        terms.append(t_all * bc(_vary_like(w, src)))
    outside: Array | None = None
    if k1 is not None and out_path:
        outside, shift = _scale_terms(sc.astype(sdt), ac,
                                      None if kc is None else bc(kc), bc(c * k1))
        if shift is not None:
            terms.append(shift)
    elif k1 is not None:
        terms.append(centred(sc, ac, kc) * bc(c * k1))
    if k0 is not None:
        terms.append(jnp.broadcast_to(bc(k0), src.shape))
    if r_dot is not None:
        terms.append(r_dot.astype(sdt))
    if not terms:
        assert outside is not None
        return outside
    z_dot = sum(terms[1:], start=terms[0])
    y_dot = _act_tangent(cfg, src, aux, (mean, w, bias), z_dot)
    return y_dot if outside is None else y_dot + outside


def _scale_terms(y: Array, r: Array | None, bias: Array | None, kk: Array
                 ) -> tuple[Array, Array | None]:
    """The output path's ``xhat * k1`` term, split around the activation's derivative.

    ``bias`` and ``kk`` come broadcast to ``y``'s rank.

    ``act'(z) * dev * K = y * K - act'(z) * (bias + residual) * K`` for a positively
    homogeneous activation (``act(z) = act'(z) * z``), with ``K = kk`` broadcast. Returns
    ``(y * K, -(bias + residual) * K)``: the first added after the derivative, the second
    before it. Transposed, K's cotangent is then ``sum(y * g) - sum((bias + residual) *
    g')``, sums of plain products: no function of ``y`` alone is formed, which XLA:CPU
    would compute in the forward pass and keep until the backward pass.
    """
    shift = None if bias is None else jnp.broadcast_to(-bias.astype(kk.dtype) * kk, y.shape)
    if r is not None:
        shift = -r.astype(kk.dtype) * kk if shift is None else shift - r.astype(kk.dtype) * kk
    return y * kk, shift


def _act_tangent(cfg: _Config, src: Array, aux: Array | None,
                 pf: tuple[Array, Array, Array | None], z_dot: Array) -> Array:
    """``act'(z) * z_dot``, with ``z``'s sign (or ``z``) from the kept tensors."""
    act = cfg.act
    zero = jnp.zeros((), z_dot.dtype)
    if act.kind == "identity":
        return z_dot
    if act.path == "output":  # leaky_relu, src the output: same sign as z
        return jnp.where(src >= 0, z_dot, act.slope * z_dot)
    if act.path == "mask":  # relu, aux the output: positive where z is
        assert aux is not None
        return jnp.where(aux > 0, z_dot, zero)
    # Recompute z as the forward pass did, in the normalized values' dtype.
    mean, w, bias = pf
    bshape = _bshape(src.ndim, cfg.bn.feats, tuple(src.shape[a] for a in cfg.bn.feats))

    def bc(v: Array) -> Array:
        return _tile(v, cfg.bn.fold).reshape(bshape)

    y = (src.astype(w.dtype) - bc(mean)) * bc(w)
    if bias is not None:
        y = y + bc(bias)
    z = _finish(_Act("identity", 0.0, None), y.astype(cfg.bn.dtype), aux)
    z_act: Array = jax.jvp(act.__call__, (z.astype(z_dot.dtype),), (z_dot,))[1]
    return z_act
