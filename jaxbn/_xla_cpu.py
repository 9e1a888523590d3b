"""The XLA:CPU-specific devices of the reductions, in one place.

None of this changes a result's value; each is there because XLA:CPU measured faster with
it:

* optimization barriers (:func:`_private`, :func:`_barrier`) that give each reduction its
  own copies of its operands, so that it reads the input straight from its buffer;
* the streaming threshold (:data:`_STREAM_BYTES`, :func:`_streams`, :func:`_private_terms`)
  that says which inputs take that path;
* the wide view of half-precision channels-last inputs (:data:`_LANES`, :func:`_widen`,
  :func:`_wide_view`, :func:`_fold`, :func:`_tile`), which lays several rows side by side.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._sharding import _varying_axes
from jaxbn.core import Array, AxisName

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
