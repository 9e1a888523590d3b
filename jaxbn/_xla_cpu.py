"""The XLA:CPU-specific devices of the reductions, in one place.

None of this changes a result's value beyond float rounding; each is there because XLA:CPU
measured faster with it:

* optimization barriers (:func:`_private`) that give each reduction its own copies of its
  operands, so that it reads the input straight from its buffer;
* the streaming threshold (:data:`_STREAM_BYTES`, :func:`_streams`, :func:`_private_terms`)
  that says which inputs take that path;
* the wide view of half-precision channels-last inputs (:data:`_LANES`, :func:`_widen`,
  :func:`_wide_view`, :func:`_fold`, :func:`_tile`), which lays several rows side by side,
  and the same view for the statistics' sums of small float32 inputs (:func:`_sums_fold`).

The barriers are a primitive of their own (:data:`_cpu_barrier_p`, at the end of this
module) whose lowering emits them in programs lowered for the CPU and nothing in programs
lowered for any other platform: a program for ``cuda`` or ``tpu`` holds no barrier and no
conditional on the platform from here. The wide view is decided at trace time, before the
platform is known; it is a reshape and two small per-feature sums, and applies to
half-precision inputs only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core
from jax.interpreters import ad, batching, mlir

from jaxbn._checks import _is_static
from jaxbn._sharding import _varying_axes
from jaxbn.core import Array, AxisName

# Inputs of at least this many bytes (at float32) take the streaming path of _private;
# smaller float32 inputs fit in a core's cache, where XLA's own plan (shared elementwise
# results materialized once, then plain reductions over them) measured faster.
_STREAM_BYTES = 2 << 20


def _streams(x: Array) -> bool:
    """Whether the reductions over ``x`` should each read ``x`` itself (see _private)."""
    if x.dtype.itemsize < 4 or not _is_static(x.shape):  # symbolic: may be large
        return True
    return x.size * max(x.dtype.itemsize, 4) >= _STREAM_BYTES


def _private(*arrays: Any, stream: bool = True) -> tuple[Any, ...]:
    """The same arrays (or pytrees of them) under new identities, for one reduction alone.

    XLA:CPU runs reductions as custom fusions that absorb their elementwise producers
    (converts, broadcasts, subtractions) only when each producer has that reduction as its
    sole user; a producer shared with another reduction or with the output (after common
    subexpression elimination, ``convert(x)`` or ``broadcast(mean)`` always is) is instead
    materialized as a full-size temporary, which costs a write, page faults and a re-read.
    An optimization barrier gives each reduction its own copies of its operands (no data
    is copied), so that every reduction reads ``x`` straight from its buffer. Only programs
    lowered for the CPU get it (:data:`_cpu_barrier_p`); others get the arrays unchanged:
    XLA:GPU fuses sibling reductions of a shared operand into one kernel, which distinct
    identities would prevent. So do small float32 inputs (``stream=False``, from
    :func:`_streams`): there a cache-resident shared temporary is cheaper than recomputing
    it in every reduction. Half-precision inputs always stream: their shared temporaries
    are float32 conversions, twice the input's size.
    """
    if not stream:
        return arrays
    leaves, tree = jax.tree.flatten(arrays)
    if not leaves:
        return arrays
    out: tuple[Any, ...] = jax.tree.unflatten(tree, _cpu_barrier_p.bind(*leaves))
    return out


def _private_terms(x: Array) -> bool:
    return _streams(x) and x.dtype.itemsize < 4



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
    bfloat16 with 20 features. Float32 inputs keep their own layout in the elementwise
    passes, where the tiled vectors cost about what the view saves (their statistics'
    sums may take the view: :func:`_sums_fold`).

    Returns the smallest ``k`` that divides ``prod(S)`` and makes ``k * C`` a multiple of
    :data:`_LANES`, or 1 (no view): for float32 or wider, features that already fill whole
    vectors, other layouts, masks, and inputs with nothing to reduce.
    """
    if x.dtype.itemsize >= 4:
        return 1
    return _lanes_fold(x, feats, mask)


# Float32 inputs from this many bytes up to _STREAM_BYTES take the wide view for their
# statistics' sums (see _sums_fold); below it the view's few extra small kernels cost more
# than its faster loops save.
_WIDE_SUMS_BYTES = 512 << 10


def _sums_fold(x: Array, red: tuple[int, ...], fold: int) -> int:
    """The fold of the view the statistics' sums of float32 ``x`` take (1: none).

    A cache-resident float32 input with a few features per row spends most of its
    statistics' time in the two reductions' short inner loops, not in memory traffic: over
    the view of :func:`_widen` (fold :func:`_lanes_fold`) they measured faster on an AVX2
    x86-64 CPU, paired with the plain sums in one process: about a quarter off the forward
    pass and a tenth off forward and backward at 128x12x12x20 and 64x12x12x20; slower at
    32x12x12x20 and 128x4x4x50 (under :data:`_WIDE_SUMS_BYTES`). Only the sums: the
    elementwise passes keep the input's layout. The sums are then added in another order
    (float rounding apart, the same statistics). 1 for an input already viewed
    (``fold > 1``), other dtypes, inputs outside ``[_WIDE_SUMS_BYTES, _STREAM_BYTES)``,
    and whatever :func:`_lanes_fold` leaves alone.
    """
    if (fold != 1 or x.dtype != jnp.float32 or not _is_static(x.shape) or _streams(x)
            or x.size * x.dtype.itemsize < _WIDE_SUMS_BYTES):
        return 1
    return _lanes_fold(x, tuple(a for a in range(x.ndim) if a not in red), None)


def _lanes_fold(x: Array, feats: tuple[int, ...], mask: Array | None) -> int:
    """The smallest ``k`` that divides ``prod(S)`` with ``k * C`` a multiple of _LANES.

    1 for features that already fill whole vectors, layouts other than channels-last,
    masks, and inputs with nothing to reduce.
    """
    if (mask is not None or feats != (x.ndim - 1,) or x.ndim < 3 or not _is_static(x.shape)
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


# ----------------------------------------------------------------------------------------
# The barrier primitive: XLA:CPU's optimization barrier, absent from other programs.
#
# Which platform a program is for is known only when it is lowered (jax.jit(f).trace(...)
# .lower(lowering_platforms=...), jax.export), not when it is traced. A primitive whose
# lowering rule for "cpu" emits the barrier and whose rule for every other platform is the
# identity puts the barrier in CPU programs only, with nothing of it (no conditional on the
# platform, unlike lax.platform_dependent) in a program lowered for "cuda" or "tpu". A
# program lowered for several platforms at once (jax.export(..., platforms=("cpu",
# "cuda"))) gets a conditional on the platform, which its compiler resolves.


def _barrier(*arrays: Array) -> tuple[Array, ...]:
    """``lax.optimization_barrier`` over ``arrays``: one per set of shard_map varying axes.

    One barrier per set, because the barrier requires its operands to vary alike.
    """
    groups: dict[frozenset[AxisName], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(_varying_axes(a), []).append(i)
    out: list[Any] = [None] * len(arrays)
    for idx in groups.values():
        for i, a in zip(idx, lax.optimization_barrier(tuple(arrays[i] for i in idx)),
                        strict=True):
            out[i] = a
    return tuple(out)


_cpu_barrier_p = jax_core.Primitive("jaxbn_cpu_barrier")
_cpu_barrier_p.multiple_results = True
# Outside a compiled program there is nothing to keep apart: the identity.
_cpu_barrier_p.def_impl(lambda *arrays: arrays)
_cpu_barrier_p.def_abstract_eval(lambda *avals: avals)
mlir.register_lowering(_cpu_barrier_p, lambda ctx, *arrays: arrays)
mlir.register_lowering(_cpu_barrier_p, mlir.lower_fun(_barrier, multiple_results=True),
                       platform="cpu")


def _cpu_barrier_batch(args: Any, dims: Any) -> tuple[Any, Any]:
    return _cpu_barrier_p.bind(*args), dims


def _cpu_barrier_jvp(primals: Any, tangents: Any) -> tuple[Any, Any]:
    # As lax.optimization_barrier's: the primals behind one barrier, the tangents another.
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return _cpu_barrier_p.bind(*primals), _cpu_barrier_p.bind(*tangents)


def _cpu_barrier_transpose(cts: Any, *primals: Any) -> Any:
    del primals
    return _cpu_barrier_p.bind(*(ad.instantiate_zeros(ct) for ct in cts))


batching.primitive_batchers[_cpu_barrier_p] = _cpu_barrier_batch
ad.primitive_jvps[_cpu_barrier_p] = _cpu_barrier_jvp
ad.primitive_transposes[_cpu_barrier_p] = _cpu_barrier_transpose
