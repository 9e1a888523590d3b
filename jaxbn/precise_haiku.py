"""PreciseBN for haiku models: population statistics of every BatchNorm layer.

Works with :class:`jaxbn.haiku.BatchNorm` and :class:`haiku.BatchNorm` (and their
subclasses) anywhere in a model: both keep their averages in the ``mean_ema`` and
``var_ema`` state of haiku's ``ExponentialMovingAverage``. See :mod:`jaxbn.precise` for the
pooling itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxbn import core, precise
from jaxbn.haiku import batch_moments, reduction_axes

__all__ = ["precise_batch_stats"]

_SIGNATURE = inspect.signature(hk.BatchNorm.__call__)


def _layer_moments(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   axis_name: Any) -> core.Moments | None:
    """The batch moments a training-mode call normalizes with; None for other calls."""
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    if not bound.arguments["is_training"]:
        return None
    x = jnp.asarray(bound.arguments["inputs"])
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    m = batch_moments(module, x, reduction_axes(x.ndim, module.channel_index, module.axis))
    names = module.cross_replica_axis
    synced = tuple(names) if isinstance(names, list | tuple) else names
    return precise._merge_unsynced(m, axis_name, synced or None)


def _record(apply_fn: Callable[..., Any], params: Any, state: Any, batch: Any,
            axis_name: Any) -> dict[str, list[tuple[core.Moments, Any]]]:
    """Runs ``apply_fn`` with every BatchNorm call intercepted; moments per layer name."""
    recorded: dict[str, list[tuple[core.Moments, Any]]] = {}

    def intercept(next_f: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(module, hk.BatchNorm):
            m = _layer_moments(module, args, kwargs, axis_name)
            if m is not None:
                recorded.setdefault(module.module_name, []).append(
                    (m, module.mean_ema.decay))
        return next_f(*args, **kwargs)

    with hk.intercept_methods(intercept):
        apply_fn(params, state, batch)
    return recorded


@dataclasses.dataclass(frozen=True)
class _Haiku(precise._Collector):
    apply_fn: Callable[..., Any]
    names: tuple[str, ...]
    axis_name: Any

    def __call__(self, consts: Any, batch: precise.Batch
                 ) -> tuple[list[tuple[core.Moments, ...]], None]:
        params, state = consts
        recorded = _record(self.apply_fn, params, state, batch, self.axis_name)
        return [tuple(m for m, _ in recorded.get(n, ())) for n in self.names], None


def precise_batch_stats(
    apply_fn: Callable[..., Any],
    params: Any,
    state: Mapping[str, Any],
    batches: precise.Batches,
    *,
    axis_name: core.AxisName | None = None,
    mesh: jax.sharding.Mesh | None = None,
    sync_processes: bool | None = None,
) -> dict[str, Any]:
    """Recomputes the moving averages of every BatchNorm layer of a haiku model exactly.

    Runs ``apply_fn(params, state, batch)`` -- the training-mode forward pass with fixed
    weights, e.g. ``lambda p, s, x: f.apply(p, s, None, x, is_training=True)`` for
    ``f = hk.transform_with_state(...)`` -- over ``batches``, with every call of a
    :class:`haiku.BatchNorm` (:class:`jaxbn.haiku.BatchNorm` included) intercepted
    (:func:`haiku.intercept_methods`): the exact moments of its input over its axes and
    ``cross_replica_axis`` are recorded. Each layer's moments are pooled exactly over all
    batches (:func:`jaxbn.precise.accumulate`) and become the ``average`` of its
    ``mean_ema`` and (biased variance) ``var_ema``, with ``hidden`` set to
    ``average * (1 - decay**counter)`` so that haiku's zero-debiasing still holds.
    Layers that do not run with ``is_training=True`` keep their state. ``apply_fn`` must
    not map over the batch itself (no ``vmap`` inside): split batches over devices with
    ``axis_name`` and ``mesh``.

    Args:
      apply_fn: ``(params, state, batch) -> (output, state)`` in training mode.
      params: the model's parameters.
      state: its state (from ``init`` or training).
      batches: an iterable of same-shaped batches, or a stacked array (or dict of arrays)
        whose leading axis indexes the batches; see :func:`jaxbn.precise_batch_stats`.
      axis_name: a mesh axis the batches are split over (with ``mesh``): the moments of
        layers that do not synchronize over it themselves are merged over it.
      mesh: run the forward pass with ``shard_map`` over this mesh, every batch split
        along its leading axis over ``axis_name``.
      sync_processes: see :func:`jaxbn.precise_batch_stats`.

    Returns:
      The new state: a dict of the same layout, the moving averages of every layer that
      ran replaced.

    Raises:
      ValueError: for a forward pass in which no BatchNorm ran in training mode, a layer
        without its ``mean_ema``/``var_ema`` state, empty ``batches`` or batches of
        different shapes.

    Example:

    >>> import jax, numpy as np, haiku as hk
    >>> from jaxbn.haiku import BatchNorm
    >>> f = hk.transform_with_state(lambda x, train: BatchNorm(True, True, 0.9)(
    ...     hk.Linear(8)(x), is_training=train))
    >>> data = np.random.default_rng(0).normal(size=(10, 32, 4)).astype(np.float32)
    >>> params, state = f.init(jax.random.key(0), data[0], train=True)
    >>> state = precise_batch_stats(
    ...     lambda p, s, x: f.apply(p, s, None, x, train=True), params, state, data)
    >>> state["batch_norm/~/mean_ema"]["average"].shape
    (1, 8)
    """
    if mesh is not None and axis_name is None:
        raise ValueError(
            "mesh was given without axis_name; name the mesh axis (or axes) the batch is "
            "split over, e.g. axis_name='batch'."
        )
    names, decays = _layers(apply_fn, params, state, _first(batches), mesh, axis_name)
    for n in names:
        for ema in ("mean_ema", "var_ema"):
            if f"{n}/~/{ema}" not in state:
                raise ValueError(
                    f"the BatchNorm {n!r} has no state {n}/~/{ema!r} (found: "
                    f"{sorted(state)}); pass the state from the model's init or training.")
    templates = [core.BatchStats(
        jnp.ravel(state[f"{n}/~/mean_ema"]["average"]),
        jnp.ravel(state[f"{n}/~/var_ema"]["average"]), jnp.zeros((), jnp.int32))
        for n in names]
    collect = _Haiku(apply_fn, names, None if axis_name is None else (
        axis_name if isinstance(axis_name, str) else tuple(axis_name)))
    pops, _ = precise._run(collect, (params, dict(state)), templates, batches,
                           axis_name=axis_name, mesh=mesh, sync_processes=sync_processes)
    new = {k: dict(v) for k, v in state.items()}
    for n, decay, stats in zip(names, decays, precise._finalize_all(
            pops, templates, [False] * len(names), mesh), strict=True):
        assert stats is not None
        for ema, value in (("mean_ema", stats.mean), ("var_ema", stats.var)):
            entry = new[f"{n}/~/{ema}"]
            average = value.reshape(entry["average"].shape).astype(entry["average"].dtype)
            entry["average"] = average
            entry["hidden"] = (average * (1 - decay ** entry["counter"])).astype(
                entry["hidden"].dtype)
    return new


def _first(batches: precise.Batches) -> Any:
    if precise._is_stacked(batches):
        return jax.tree.map(lambda a: a[0], batches)
    if isinstance(batches, list | tuple) and batches:
        return batches[0]
    raise ValueError(
        "precise_haiku.precise_batch_stats needs a list (or tuple) of batches or a stacked "
        f"array of them, got {type(batches).__name__}."
    )


def _layers(apply_fn: Callable[..., Any], params: Any, state: Any, batch: Any, mesh: Any,
            axis_name: Any) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The names and decays of the BatchNorm layers that run in training mode (traced
    once, without computing anything)."""
    decays: dict[str, float] = {}

    def trace(p: Any, s: Any, b: Any) -> jax.Array:
        for name, calls in _record(apply_fn, p, s, b, None).items():
            decays[name] = float(calls[0][1])
        return jnp.zeros(())

    if mesh is not None:
        spec = P(axis_name if isinstance(axis_name, str) else tuple(axis_name))
        trace = jax.shard_map(trace, mesh=mesh, in_specs=(P(), P(), spec), out_specs=P())
    jax.eval_shape(trace, params, state, batch)
    if not decays:
        raise ValueError(
            "no BatchNorm layer (haiku.BatchNorm, jaxbn.haiku.BatchNorm or a subclass) ran "
            "with is_training=True during apply_fn: apply_fn must run the model in training "
            "mode, e.g. lambda p, s, x: f.apply(p, s, None, x, is_training=True)."
        )
    names = tuple(sorted(decays))
    return names, tuple(decays[n] for n in names)
