"""Tolerances that follow from the computation, not from the machine the tests ran on.

Two float32 implementations of the same training step agree only up to rounding, and how much
rounding a program collects depends on how XLA vectorizes its sums: another CPU (SSE4.2,
AVX2, AVX-512) adds the same terms in another order. A fixed absolute floor such as 1e-7 on
values of scale 0.6 (one float32 ulp there is 6e-8) fails on the next machine.

So a parity test runs the reference library's computation a third time, in float64, and asks
of jaxbn's float32 result what the reference library's own float32 result achieves: per leaf,
``max|ours - exact| <= factor * max|ref - exact| + ulps * eps32 * max|exact|``. The first term
lets jaxbn's summation order and backward pass round differently (by a small factor, not by
orders of magnitude); the second is a few float32 ulps of the leaf's largest value, for a leaf
whose reference happens to round exactly. Both sides are judged against the same float64
values, so the bound holds on any CPU whose float32 rounding is IEEE's.
"""

from __future__ import annotations

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one ulp at 1.0
#: jaxbn may round at most this many times more than the reference library.
FACTOR = 4.0
#: ... plus this many float32 ulps of the leaf's largest magnitude.
ULPS = 4.0
#: The reference's float32 result must be this close (relative to the leaf's scale) to the
#: float64 run, or the float64 run is not the same computation and the check would be void.
REFEREE_RTOL = 1e-4
#: A leaf's scale is at least this fraction of the tree's largest magnitude. A leaf that is
#: zero in exact arithmetic (a conv bias's gradient ahead of BN) holds only the rounding noise
#: of the terms that cancel in it; without the floor its bound would compare two noises to a
#: factor of 4 (in the CNN tests such noise is 2e-9 to 3e-8 at a tree scale of ~0.2).
ZERO_LEAF = 1e-2


def float64(tree):
    """``tree`` with its floating-point leaves as float64 NumPy arrays (others unchanged)."""

    def cast(a):
        a = np.asarray(a)
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree.map(cast, tree)


def assert_as_accurate_as_reference(ours, ref, exact, *, factor=FACTOR, ulps=ULPS, what=""):
    """Asserts that each leaf of ``ours`` is within ``factor`` times the reference's error.

    Args:
      ours: jaxbn's float32 result (a pytree).
      ref: the reference library's float32 result, same structure.
      exact: the reference library's computation in float64, same structure.
      factor: how many times the reference's own float32 error jaxbn's may reach.
      ulps: float32 ulps of the leaf's largest ``exact`` magnitude, added to the bound.
      what: a label for the failure message.
    """
    assert jax.tree.structure(ours) == jax.tree.structure(ref) == jax.tree.structure(exact)
    flat, _ = jax.tree_util.tree_flatten_with_path(exact)
    tree_scale = max((_max_abs(e) for _, e in flat), default=0.0)
    for (path, e), o, r in zip(flat, jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        name = f"{what}{jax.tree_util.keystr(path)}"
        o, r = np.asarray(o), np.asarray(r)
        assert o.shape == r.shape == np.shape(e) and o.dtype == r.dtype, (name, o.shape, r.shape)
        e = np.asarray(e, np.float64)
        scale = max(_max_abs(e), ZERO_LEAF * tree_scale)
        err_ref = _max_abs(r.astype(np.float64) - e)
        err_ours = _max_abs(o.astype(np.float64) - e)
        assert err_ref <= REFEREE_RTOL * scale, (
            f"{name}: the float64 run is not the reference's computation (the reference's "
            f"float32 result is {err_ref:.3g} away from it at scale {scale:.3g})")
        bound = factor * err_ref + ulps * EPS32 * scale
        assert err_ours <= bound, (
            f"{name}: jaxbn's float32 error against float64 is {err_ours:.3g}, expected at most "
            f"{bound:.3g} ({factor:g} x the reference's {err_ref:.3g} + {ulps:g} ulps of "
            f"{scale:.3g})")


def _max_abs(a) -> float:
    return float(np.max(np.abs(a), initial=0.0))


def atol_for(values, ulps: float = 8.0) -> float:
    """An absolute tolerance of ``ulps`` float32 ulps of the largest magnitude in ``values``.

    For two float32 computations of the same sums in different orders: an element's rounding
    error follows the size of the terms summed into it (bounded by the largest value of the
    result for the sums here), not the element's own size, which may be near zero.
    """
    return ulps * EPS32 * _max_abs(np.asarray(values, np.float64))
