"""The reductions: per-device sums, their shift, and the merge across devices.

:func:`_moments` is :func:`jaxbn.core.moments` on checked arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._checks import _is_static, _real_dtype, _reduction_axes, _stats_dtype
from jaxbn._xla_cpu import _fold, _private, _streams, _sums_fold, _tile, _wide_view
from jaxbn.core import Array, AxisName, Moments

# The shift is the mean of at least this many values per feature (if present) and of at
# least 1 / _SHIFT_FRACTION of them: then it lies within sqrt(_SHIFT_FRACTION) standard
# deviations of the mean whatever the data, so the shifted sums lose at most a factor
# 1 + _SHIFT_FRACTION in relative accuracy (and about nothing for unordered batches).
_SHIFT_SAMPLES = 64
_SHIFT_FRACTION = 256


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
    if mask is None and red and not _is_static(x.shape):
        # A symbolic batch may be empty, and its size decides the shift's slice: the masked
        # sums (exact mean first, then deviations) need neither.
        mask = jnp.ones((1,) * x.ndim, bool)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape) if not red else mask
    if not red or (_is_static(x.shape) and math.prod(x.shape[a] for a in red) == 0):
        return _trivial_sums(x, red, mask, fast_variance, fshape)
    if mask is None:
        k = _sums_fold(x, red, fold)
        if k > 1:
            return _local_sums(_wide_view(x, k), (0, 1), None, fast_variance, k)
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
