"""Precise BatchNorm statistics: the population mean and variance under fixed weights.

The running averages a BatchNorm layer keeps during training average batch statistics of
weights that kept changing, and weight the last few hundred steps most; at test time the
layer should instead use the statistics of its inputs under the final weights. PreciseBN
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021) recomputes them: run the
training-mode forward over ``N`` samples with the weights fixed, and pool every layer's
per-batch moments. This module does that exactly and with one batch in memory:

* Each batch's :class:`~jaxbn.Moments` (count, mean, biased variance per feature) are pooled
  with Chan et al.'s rule: the mean is count-weighted and the variance is the pooled one,
  ``M2 = sum_b n_b var_b + sum_b n_b (mean_b - mean)^2`` -- not the average of per-batch
  variances, which misses the spread of the batch means (PyTorch's ``swa_utils.update_bn``
  and fvcore's ``update_bn_stats`` average them).
* The pooled sums are kept around a shift (the first batch's mean) with compensated
  (two-sum) additions, so that the result does not drift with the number of batches: it is
  as accurate as the moments of one batch holding all ``N`` samples, even when
  ``|mean| >> std``.
* Across devices and processes, per-device (or per-process) results are merged by the same
  rule, weighting each by its count.

:func:`precise_batch_stats` is the functional entry point: it takes and returns explicit
:class:`~jaxbn.BatchStats`. Flax models have their own entry points that find the layers
themselves: :func:`jaxbn.precise_linen.precise_batch_stats` (variables in, new
``batch_stats`` out) and :func:`jaxbn.precise_nnx.precise_batch_stats` (updates an nnx
module in place). The building blocks -- :class:`Population`, :func:`population`,
:func:`accumulate`, :func:`finalize` -- serve custom loops.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import PyTreeDef

from jaxbn.core import Array, AxisName, BatchStats, Moments

__all__ = [
    "Population",
    "accumulate",
    "finalize",
    "population",
    "precise_batch_stats",
]

Batch = Any
Batches = Iterable[Batch] | Array | np.ndarray | Mapping[str, Any]
# A batch's tree structure, and the shape and dtype of each of its leaves.
_Signature: TypeAlias = tuple[PyTreeDef, tuple[tuple[tuple[int, ...], np.dtype[Any]], ...]]
_R = TypeVar("_R")


class Population(NamedTuple):
    """Exactly pooled moments of every batch seen so far, for one layer.

    The sums run over every valid element ``x`` seen so far; each is kept as a compensated
    pair ``hi + lo`` (stacked on a leading axis of size 2) so that rounding errors do not
    grow with the number of batches.
    """

    # count shadows tuple.count (a method), as in BatchStats.
    count: Array  # type: ignore[assignment]  # (2, *feature_shape), float32: valid elements
    shift: Array  # feature_shape, float32: mean of the first batch with a valid element
    sum_dev: Array  # (2, *feature_shape), float32: sum of (x - shift)
    sum_dev_sq: Array  # (2, *feature_shape), float32: sum of (x - shift)^2
    batches: Array  # (), int32: number of batch moments pooled that had a valid element


def population(feature_shape: int | Sequence[int], dtype: Any = jnp.float32) -> Population:
    """An empty :class:`Population` (nothing seen yet) of the given feature shape.

    Args:
      feature_shape: number of features, or the feature shape.
      dtype: floating dtype of the sums (at least float32 is advised).

    Returns:
      A :class:`Population` with zero counts and sums.

    >>> population(3).count.shape
    (2, 3)
    """
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    zeros = jnp.zeros(shape, dtype)
    pair = jnp.zeros((2, *shape), dtype)
    return Population(pair, zeros, pair, pair, jnp.zeros((), jnp.int32))


def _add(pair: Array, v: Array) -> Array:
    """``pair + v`` for a compensated pair ``(hi, lo)``: Knuth's two-sum, error kept in lo."""
    hi, lo = pair[0], pair[1]
    s = hi + v
    b = s - hi
    return jnp.stack([s, lo + ((hi - (s - b)) + (v - b))])


def accumulate(pop: Population, moments: Moments) -> Population:
    """Pools one batch's moments into the population (Chan et al.'s exact rule).

    With ``c`` the shift, a batch of ``n`` valid elements, mean ``m`` and biased variance
    ``v`` per feature adds ``n`` to the count, ``n (m - c)`` to ``sum_dev`` and
    ``n v + n (m - c)^2`` to ``sum_dev_sq``: exactly the sums over its elements of
    ``x - c`` and ``(x - c)^2``. Features without a valid element are unchanged.

    Args:
      pop: the population so far.
      moments: one batch's moments (from :func:`jaxbn.moments`), of the same feature shape.

    Returns:
      The updated :class:`Population`.

    Raises:
      ValueError: if the feature shapes differ.

    >>> import jax.numpy as jnp, jaxbn
    >>> pop = population(1)
    >>> for batch in (jnp.array([[1.0], [3.0]]), jnp.array([[10.0], [12.0], [14.0]])):
    ...     pop = accumulate(pop, jaxbn.moments(batch))
    >>> stats = finalize(pop, jaxbn.init(1)[1])
    >>> stats.mean, stats.var  # of [1, 3, 10, 12, 14], not the average of 1 and 8/3
    (Array([8.], dtype=float32), Array([26.], dtype=float32))
    """
    if tuple(jnp.shape(moments.mean)) != tuple(pop.shift.shape):
        raise ValueError(
            f"moments of feature shape {tuple(jnp.shape(moments.mean))} cannot be pooled into "
            f"a population of feature shape {tuple(pop.shift.shape)}."
        )
    dt = pop.shift.dtype
    mean, var, n = (jnp.asarray(a).astype(dt) for a in moments)
    # The shift is the first batch's mean (per feature, the first batch where the feature
    # has a valid element): close to the population mean, so the sums do not cancel.
    shift = jnp.where(pop.count[0] > 0, pop.shift, mean)
    d = mean - shift
    nd = n * d
    return Population(
        count=_add(pop.count, n),
        shift=shift,
        sum_dev=_add(pop.sum_dev, nd),
        sum_dev_sq=_add(pop.sum_dev_sq, n * var + nd * d),
        batches=pop.batches + jnp.any(n > 0).astype(jnp.int32),
    )


def _triple(pop: Population) -> tuple[Array, Array, Array]:
    """``(count, mean, M2)`` of a population, M2 the sum of squared deviations from the mean."""
    n = pop.count[0] + pop.count[1]
    s1 = pop.sum_dev[0] + pop.sum_dev[1]
    s2 = pop.sum_dev_sq[0] + pop.sum_dev_sq[1]
    safe = jnp.maximum(n, 1)
    return n, pop.shift + s1 / safe, jnp.maximum(s2 - s1 * (s1 / safe), 0)


def _from_triple(n: Array, mean: Array, m2: Array, batches: Array) -> Population:
    zero = jnp.zeros_like(n)
    return Population(jnp.stack([n, zero]), mean, jnp.stack([zero, zero]),
                      jnp.stack([m2, zero]), batches.astype(jnp.int32))


def _chan(ns: Array, means: Array, m2s: Array) -> tuple[Array, Array, Array]:
    """Chan et al.'s merge of ``(count, mean, M2)`` triples stacked along axis 0."""
    total = jnp.sum(ns, axis=0)
    safe = jnp.maximum(total, 1)
    mean = jnp.sum(ns * means, axis=0) / safe
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * jnp.square(means - mean), axis=0)
    return total, mean, m2


def _merge_stacked(pop: Population) -> Population:
    """One population from populations stacked along a leading axis (devices, processes)."""
    n, mean, m2 = jax.vmap(_triple)(pop)
    return _from_triple(*_chan(n, mean, m2), jnp.sum(pop.batches, axis=0))


def finalize(
    pop: Population, stats: BatchStats, *, unbiased_running_var: bool = False
) -> BatchStats:
    """The population statistics as new running statistics.

    ``mean`` is the mean of every valid element seen, ``var`` their variance, ``M2 / N``, or
    ``M2 / (N - 1)`` with ``unbiased_running_var`` (``N`` the element count per feature), and
    ``count`` the number of batch moments pooled, as a cumulative average over those batches
    would leave it (PyTorch's ``update_bn`` leaves ``num_batches_tracked`` so). Features
    never seen keep the values of ``stats``, and ``count`` stays if nothing was seen.

    Args:
      pop: the pooled population.
      stats: the layer's current statistics (their dtypes are kept).
      unbiased_running_var: store the unbiased variance, as the layer's option of the
        same name does.

    Returns:
      New :class:`~jaxbn.BatchStats`.
    """
    n, mean, m2 = _triple(pop)
    var = m2 / jnp.where(unbiased_running_var & (n > 1), n - 1, jnp.maximum(n, 1))
    seen = n > 0
    return BatchStats(
        jnp.where(seen, mean, stats.mean).astype(jnp.asarray(stats.mean).dtype),
        jnp.where(seen, var, stats.var).astype(jnp.asarray(stats.var).dtype),
        jnp.where(pop.batches > 0, pop.batches, stats.count).astype(
            jnp.asarray(stats.count).dtype),
    )


# ------------------------------------------------------------------------------------------
# Merging over a named axis and over processes.


def _names(axis_name: AxisName) -> tuple[AxisName, ...]:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _varying(a: Array) -> frozenset[AxisName]:
    return frozenset(getattr(getattr(jax.typeof(a), "mat", None), "varying", ()) or ())


def _per_device(a: Array, axis_name: AxisName) -> tuple[AxisName, ...]:
    """The names of ``axis_name`` over which ``a`` may hold different values per device.

    Inside ``shard_map`` (with its type checks on, the default) the array's type says
    whether it varies over each axis: values already synchronized (a ``psum``'s result,
    :func:`jaxbn.moments` with that ``axis_name``) do not. Under ``vmap`` and ``pmap`` types
    carry no such information and every name is returned.
    """
    names = _names(axis_name)
    mapped = _varying(lax.axis_index(names))
    return tuple(n for n in names if n not in mapped or n in _varying(a))


def _merge_moments(moments: Moments, axis_name: AxisName) -> Moments:
    """The moments of the union of every device's elements along ``axis_name``.

    Each device's ``(count, mean, M2)`` reaches every device in one collective (a ``psum``
    of one slot per device, so the result is device-invariant) and is merged by Chan et
    al.'s rule, weighting each device by its count.

    Args:
      moments: this device's moments.
      axis_name: the mapped axis name (or tuple of names) to merge over.

    Returns:
      The merged :class:`~jaxbn.Moments`, equal on every device.
    """
    mean, var, n = (jnp.asarray(a) for a in moments)
    triple = jnp.stack([n, mean, var * n])
    slots = jnp.zeros((lax.axis_size(axis_name), *triple.shape), triple.dtype)
    g = lax.psum(slots.at[lax.axis_index(axis_name)].set(triple), axis_name)
    total, mean, m2 = _chan(g[:, 0], g[:, 1], g[:, 2])
    return Moments(mean, m2 / jnp.maximum(total, 1), total)


def _merge_unsynced(m: Moments, axis_name: AxisName | None,
                    layer_axis_name: AxisName | None) -> Moments:
    """A layer's moments merged over the names of ``axis_name`` it does not sync over."""
    if axis_name is None:
        return m
    synced = () if layer_axis_name is None else _names(layer_axis_name)
    rest = tuple(n for n in _names(axis_name) if n not in synced)
    return _merge_moments(m, rest if len(rest) > 1 else rest[0]) if rest else m


def _merge_processes(pops: list[Population]) -> list[Population]:
    """Merges every process's populations (one cross-process all-gather)."""
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather([jax.device_get(p) for p in pops])
    return [_merge_stacked(jax.tree.map(jnp.asarray, p)) for p in gathered]


def _sync_processes(pops: list[Population], sync: bool | None) -> list[Population]:
    leaves = jax.tree.leaves(pops)
    if sync is False or jax.process_count() == 1:
        return pops
    traced = any(isinstance(a, jax.core.Tracer) for a in leaves)
    local = all(getattr(a, "is_fully_addressable", True) for a in leaves)
    if sync is None:
        return pops if traced or not local else _merge_processes(pops)
    if traced:
        raise ValueError(
            "sync_processes=True needs concrete results, but precise_batch_stats is being "
            "traced (called inside jit, vmap or shard_map); call it outside, or pass "
            "sync_processes=None."
        )
    if not local:
        raise ValueError(
            "sync_processes=True, but the statistics are already global arrays spanning "
            "every process (the batches were global arrays); merging them again would count "
            "each sample once per process. Pass sync_processes=None."
        )
    return _merge_processes(pops)


# ------------------------------------------------------------------------------------------
# The driver shared by the functional API and the Flax entry points.


class _Collector:
    """What a front end runs per batch: ``collect(consts, batch) -> (moments, aux)``.

    ``moments`` is a list, one entry per layer, of tuples of :class:`~jaxbn.Moments` (one
    per call of the layer in the forward pass), already merged over ``axis_name``; ``aux``
    is any pytree, returned from the last batch. Subclasses are hashable dataclasses, so
    that the compiled step is reused when the same collector is used again.
    """

    def __call__(self, consts: Any, batch: Batch) -> tuple[list[tuple[Moments, ...]], Any]:
        raise NotImplementedError


def _pool(collect: _Collector, pops: list[Population], consts: Any, batch: Batch
          ) -> tuple[list[Population], Any]:
    per_layer, aux = collect(consts, batch)
    pops = [functools.reduce(accumulate, ms, p) for p, ms in zip(pops, per_layer, strict=True)]
    return pops, aux


def _on_mesh(f: Callable[..., _R], mesh: Any, batch_spec: P) -> Callable[..., _R]:
    if mesh is None:
        return f
    return jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), batch_spec), out_specs=P())


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step(collect: _Collector, mesh: Any, axis_name: Any, pops: list[Population], consts: Any,
          batch: Batch) -> tuple[list[Population], Any]:
    return _on_mesh(functools.partial(_pool, collect), mesh, P(axis_name))(pops, consts, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _scan(collect: _Collector, mesh: Any, axis_name: Any, pops: list[Population], consts: Any,
          stacked: Any) -> tuple[list[Population], Any]:
    def run(pops: list[Population], consts: Any, stacked: Any
            ) -> tuple[list[Population], Any]:
        pops, aux = lax.scan(lambda p, b: _pool(collect, p, consts, b), pops, stacked)
        return pops, jax.tree.map(lambda a: a[-1], aux)

    return _on_mesh(run, mesh, P(None, axis_name))(pops, consts, stacked)


def _is_stacked(batches: Any) -> bool:
    return isinstance(batches, jax.Array | np.ndarray | Mapping)


def _signature(batch: Batch) -> _Signature:
    leaves, tree = jax.tree.flatten(batch)
    return tree, tuple((np.shape(a), jnp.result_type(a)) for a in leaves)


def _describe(sig: _Signature) -> str:
    tree, leaves = sig
    shapes = ", ".join(f"{jnp.dtype(d).name}{list(s)}" for s, d in leaves)
    return f"{shapes} (structure {tree})"


def _put(tree: Any, mesh: Any, spec: P) -> Any:
    """Places every leaf on ``mesh`` with ``spec`` (process-local data in multi-process runs)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, spec)

    def put(a: Any) -> Any:
        if isinstance(a, jax.Array) and (jax.process_count() == 1 or not a.is_fully_addressable):
            return jax.device_put(a, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree.map(put, tree)


def _run(
    collect: _Collector,
    consts: Any,
    templates: list[BatchStats],
    batches: Batches,
    *,
    axis_name: AxisName | None,
    mesh: Any,
    sync_processes: bool | None,
) -> tuple[list[Population], Any]:
    """Pools every layer's moments over ``batches``; returns the populations and ``aux``.

    The forward pass is compiled once (a jitted step per batch of an iterable, or one
    ``lax.scan`` over a stacked array); each layer's population starts empty with the
    feature shape of its template.
    """
    if mesh is not None and axis_name is None:
        raise ValueError(
            "mesh was given without axis_name; name the mesh axis (or axes) the batch is "
            "split over, e.g. axis_name='batch'."
        )
    pops = [population(jnp.shape(t.mean), jnp.promote_types(jnp.asarray(t.mean).dtype,
                                                              jnp.float32))
            for t in templates]
    names = None if axis_name is None else (
        axis_name if isinstance(axis_name, str) else tuple(axis_name))
    pops, consts = _put(pops, mesh, P()), _put(consts, mesh, P())
    if _is_stacked(batches):
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(batches)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"a stacked array of batches needs one leading axis of the same size (the "
                f"number of batches) on every leaf, got shapes "
                f"{[np.shape(a) for a in jax.tree.leaves(batches)]}."
            )
        if sizes == {0}:
            raise ValueError("batches is empty: expected at least one batch, got 0.")
        stacked = _put(batches, mesh, P(None, names))
        pops, aux = _scan(collect, mesh, names, pops, consts, stacked)
    else:
        first = None
        aux = None
        for i, batch in enumerate(batches):
            sig = _signature(batch)
            if first is None:
                first = sig
            elif sig != first:
                hint = ("; a tuple is read as a sequence of batches: pass stacked arrays as "
                        "one array or a dict of arrays" if isinstance(batches, tuple) else "")
                raise ValueError(
                    f"every batch must have the same shapes and dtypes (the forward pass is "
                    f"compiled once): batch 0 has {_describe(first)}, batch {i} has "
                    f"{_describe(sig)}; drop or pad the incomplete last batch{hint}."
                )
            pops, aux = _step(collect, mesh, names, pops, consts, _put(batch, mesh, P(names)))
        if first is None:
            raise ValueError("batches is empty: expected at least one batch, got none.")
    return _sync_processes(pops, sync_processes), aux


def _finalize_all(pops: list[Population], templates: list[BatchStats], unbiased: list[Any],
                  mesh: Any) -> list[BatchStats | None]:
    """:func:`finalize` per layer (``None`` where ``unbiased`` is: the layer never ran)."""
    if mesh is not None:  # the results are arrays on the mesh: bring the rest there too
        templates, unbiased = _put((templates, unbiased), mesh, P())
    return [None if u is None else finalize(p, t, unbiased_running_var=u)
            for p, t, u in zip(pops, templates, unbiased, strict=True)]


# ------------------------------------------------------------------------------------------
# The functional API.


def _is_stats(x: Any) -> bool:
    return isinstance(x, BatchStats)


@dataclasses.dataclass(frozen=True)
class _Functional(_Collector):
    moments_fn: Callable[[Batch], Any]
    treedef: Any
    axis_name: Any

    def __call__(self, consts: Any, batch: Batch) -> tuple[list[tuple[Moments, ...]], None]:
        del consts
        out = self.moments_fn(batch)
        try:
            per_layer = self.treedef.flatten_up_to(out)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"moments_fn must return a pytree shaped like stats, with Moments (or a tuple "
                f"of Moments, one per call of the layer) where stats has BatchStats; "
                f"expected structure {self.treedef}, got {jax.tree.structure(out)}."
            ) from e
        result: list[tuple[Moments, ...]] = []
        for i, m in enumerate(per_layer):
            ms = (m,) if isinstance(m, Moments) else () if m is None else \
                tuple(m) if isinstance(m, tuple | list) else (m,)
            if not all(isinstance(x, Moments) for x in ms):
                raise ValueError(
                    f"moments_fn must return Moments for every BatchStats of stats (e.g. "
                    f"jaxbn.moments(x), or a tuple of them); layer {i} got {_describe_value(m)}."
                )
            if self.axis_name is not None:
                ms = tuple(_merge_if_per_device(x, self.axis_name) for x in ms)
            result.append(ms)
        return result, None


def _describe_value(v: Any) -> str:
    """What a value is, in a few words: its type, or shape and dtype for an array."""
    if isinstance(v, Moments):
        return "Moments"
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"an array of shape {tuple(v.shape)} and dtype {v.dtype}"
    if isinstance(v, tuple | list):
        items = ", ".join(_describe_value(x) for x in v[:3]) + (", ..." if len(v) > 3 else "")
        return f"a {type(v).__name__} of {len(v)} ({items})"
    return type(v).__name__


def _merge_if_per_device(m: Moments, axis_name: AxisName) -> Moments:
    names = _per_device(m.mean, axis_name)
    if not names:
        return m
    return _merge_moments(m, names if len(names) > 1 else names[0])


def precise_batch_stats(
    moments_fn: Callable[[Batch], Any],
    stats: Any,
    batches: Batches,
    *,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    mesh: jax.sharding.Mesh | None = None,
    sync_processes: bool | None = None,
) -> Any:
    """Recomputes running statistics as the exact population statistics over ``batches``.

    ``moments_fn(batch)`` is the model's training-mode forward pass with fixed weights,
    returning each BatchNorm layer's batch :class:`~jaxbn.Moments` -- the statistics that
    layer normalizes with, e.g. from :func:`jaxbn.moments` on its input -- in a pytree
    shaped like ``stats`` (``Moments`` where ``stats`` has ``BatchStats``; a tuple of
    ``Moments`` for a layer called several times). Every layer's moments are pooled exactly
    over all batches (see :func:`accumulate`) and become its new statistics (see
    :func:`finalize`). The forward pass is compiled once and runs once per batch; only one
    batch is in memory at a time. Passing the same ``moments_fn`` object again reuses the
    compiled step.

    Args:
      moments_fn: ``batch -> pytree of Moments``, traced once.
      stats: a pytree of :class:`~jaxbn.BatchStats` (``None`` entries are skipped).
      batches: an iterable of batches of one shape (arrays or pytrees of arrays; numpy or
        jax), or one stacked array -- a ``jax.Array``, ``np.ndarray`` or a dict of them --
        whose leading axis indexes the batches, run with ``lax.scan``. The stacked form
        may be traced (called inside ``jit``, ``vmap`` or ``shard_map``).
      unbiased_running_var: store ``M2 / (N - 1)`` instead of ``M2 / N``, as the layer
        option of the same name does.
      axis_name: a mapped axis (or tuple of axes) the batches are split over: each device's
        moments are merged over it, unless they are already synchronized over it (inside
        ``shard_map`` this is read from the moments' types; under ``vmap`` or ``pmap`` the
        moments are taken as per-device). Must be bound by an enclosing transformation, or
        by ``mesh``.
      mesh: a :class:`jax.sharding.Mesh` over which to run the forward pass with
        ``shard_map``, every batch split along its leading axis over ``axis_name`` (its
        size must divide evenly) and everything else replicated.
      sync_processes: in a multi-process run (``jax.process_count() > 1``), whether to
        merge every process's statistics with a cross-process all-gather. ``None`` (the
        default) merges when the results are process-local arrays (each process iterated
        over its own local batches) and not when they are already global (the batches
        were global arrays, e.g. with ``mesh``). Pass ``False`` when every process saw the
        same data.

    Returns:
      ``stats`` with every ``BatchStats`` replaced by the population statistics (count: the
      number of batch moments pooled).

    Raises:
      ValueError: for a ``stats`` without ``BatchStats``, empty ``batches``, batches of
        different shapes, or moments that do not match ``stats``.

    Example, a two-layer model written with the core functions:

    >>> import jax, jax.numpy as jnp, numpy as np, jaxbn
    >>> w = jax.random.normal(jax.random.key(0), (3, 4))
    >>> (p1, s1), (p2, s2) = jaxbn.init(3), jaxbn.init(4)
    >>> def moments_fn(x):                       # the training-mode forward pass
    ...     m1 = jaxbn.moments(x)
    ...     h = jax.nn.relu(jaxbn.normalize(x, m1.mean, m1.var, p1)) @ w
    ...     return {"bn1": m1, "bn2": jaxbn.moments(h)}
    >>> data = np.random.default_rng(0).normal(2.0, 3.0, (8, 16, 3)).astype(np.float32)
    >>> stats = precise_batch_stats(moments_fn, {"bn1": s1, "bn2": s2}, list(data))
    >>> everything = data.reshape(-1, 3).astype(np.float64)   # one batch of all 128 rows
    >>> bool(np.allclose(stats["bn1"].mean, everything.mean(0), rtol=1e-6))
    True
    >>> bool(np.allclose(stats["bn1"].var, everything.var(0), rtol=1e-6))
    True
    >>> int(stats["bn1"].count)                  # the number of batches pooled
    8
    """
    leaves, treedef = jax.tree.flatten(stats, is_leaf=_is_stats)
    if not leaves or not all(_is_stats(s) for s in leaves):
        raise ValueError(
            f"stats must be a pytree of BatchStats (one per BatchNorm layer), got "
            f"{jax.tree.structure(stats, is_leaf=_is_stats)} with leaves of types "
            f"{sorted({type(s).__name__ for s in leaves})}; a model without BatchNorm has "
            f"no statistics to recompute."
        )
    collect = _Functional(moments_fn, treedef, None if axis_name is None else (
        axis_name if isinstance(axis_name, str) else tuple(axis_name)))
    pops, _ = _run(collect, None, leaves, batches, axis_name=axis_name, mesh=mesh,
                   sync_processes=sync_processes)
    new = _finalize_all(pops, leaves, [bool(unbiased_running_var)] * len(pops), mesh)
    return jax.tree.unflatten(treedef, new)
