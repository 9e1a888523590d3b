"""Explicit mesh axes: the algorithm runs per device in a ``jax.shard_map`` over them.

Under ``jit``, a batch sharded over *explicit* mesh axes (``jax.make_mesh``'s default) has
its reduction dims' mesh axes turned into named axes of a ``shard_map``, inside which the
statistics sync over them as over any ``axis_name``; so every batch size and sharding gives
the one-device result. Also the helpers that keep shard_map's varying-axes types
consistent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn._checks import _reduction_axes
from jaxbn.core import Array, AxisName

_R = TypeVar("_R")


def _names(axis_name: AxisName) -> tuple[AxisName, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


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


def _on_explicit(plan: _Explicit, feats: tuple[int, ...], fn: Callable[..., _R], x: Array,
                 mask: Array | None, per_feature: Any, x_out: bool,
                 like_x: tuple[Array | None, ...] = ()) -> _R:
    """Runs ``fn(x, mask, per_feature, sync_axes, *like_x)`` per device over ``plan``'s axes.

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
    def per_device(x: Array, mask: Array | None, pf: Any, *like: Array | None) -> _R:
        return fn(x, mask, pf, plan.sync, *like)

    run = jax.shard_map(
        per_device, mesh=plan.mesh,
        in_specs=(spec_x, spec_m, jax.tree.map(lambda _: spec_f, per_feature),
                  *(None if v is None else spec_x for v in like_x)),
        out_specs=out_specs, axis_names=names)
    return run(place(x, spec_x), mask, per_feature,
               *(None if v is None else place(v, spec_x) for v in like_x))


def _join(axis_name: AxisName | None, groups: Any, sync: tuple[str, ...]) -> AxisName | None:
    if not sync:
        return axis_name
    if groups is not None:
        raise ValueError(
            f"axis_index_groups cannot be combined with a batch sharded over explicit mesh "
            f"axes {sync}; shard the batch over auto axes, or group with shard_map."
        )
    return (*(() if axis_name is None else _names(axis_name)), *sync)
