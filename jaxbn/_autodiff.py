"""Training-mode normalization with derivatives through the statistics.

A ``jax.custom_jvp`` (:func:`_train_normalize`) whose tangent (:func:`_train_tangent`) is
linear in the input tangents and needs only ``x`` and per-feature vectors; it is
recomputed from them (``jax.checkpoint``) when JAX transposes it for reverse mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero, zero_from_primal

from jaxbn._checks import Hyper, _bshape, _reduction_axes
from jaxbn._reductions import _moments, _sync_sum
from jaxbn._sharding import _vary_like
from jaxbn._xla_cpu import _fold, _private, _private_terms, _streams, _tile
from jaxbn.core import Array, AxisName, Moments


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
    # keeps no full-size residual but x itself (x - mean, xhat are never saved). Without
    # prevent_cse's optimization barrier, which no program lowered for a GPU or TPU should
    # carry: XLA:CPU compiled the same fusions either way.
    tangent = jax.checkpoint(functools.partial(_train_tangent, cfg), prevent_cse=False)
    y_dot = tangent(x, parts.moments.mean, parts.inv, w, (wn, wn * parts.inv), mask,
                    x_dot, k1, k0)
    return out, (y_dot, m_dot)



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
        k0, k1 = _centring_coefficients(cfg, xb, bc(mb), t_all, mask, wn, fsum, k1, k0)
    k0, k1 = _vary_like((k0, k1), x)
    terms: list[Array] = []
    if t_all is not None:
        terms.append(t_all * bc(_vary_like(w, x)))
    if k1 is not None:
        dev_c = xc.astype(sdt) - bc(mc)
        if mask is not None:
            # Transposed, k1's cotangent sums g * xhat over every element, masked ones too
            # (their outputs are normalized as well). Non-finite padding would make that sum
            # NaN even where the loss drops those outputs (g = 0): it contributes nothing.
            dev_c = jnp.where(mask | jnp.isfinite(dev_c), dev_c, jnp.zeros((), dev_c.dtype))
        terms.append(dev_c * bc(inv * k1))
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


def _centring_coefficients(cfg: _TrainConfig, xb: Array, mean_b: Array, t: Array,
                           mask: Array | None, wn: tuple[Array, Array],
                           fsum: Callable[[Array], Array], k1: Array | None,
                           k0: Array | None) -> tuple[Array, Array]:
    """``k0``, ``k1`` plus the two per-feature terms of the tangent that ``x_dot`` brings.

    ``-w/n * sum(x_dot)`` and ``-w*inv/n * Re(sum(conj(x - mean) * x_dot))`` over the valid
    elements (synced over ``cfg.axis_name``), ``t`` being ``x_dot`` in the statistics' dtype
    and ``mean_b`` the mean broadcast against ``xb``.
    """
    sdt = mean_b.dtype
    # Centred, not standardized: inv multiplies the per-feature sums instead, so that
    # each full-size pass (here and transposed) reads x and one per-feature vector.
    dev_b = xb.astype(sdt) - mean_b
    if mask is not None:
        # Transposed, prod's cotangent is zero where masked, times dev_b: a NaN or Inf
        # there (padding) would turn 0 into NaN. Where-ing dev_b keeps it out.
        dev_b = jnp.where(mask, dev_b, jnp.zeros((), dev_b.dtype))
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
    return k0, k1
