"""PreciseBN for Flax nnx models: population statistics of every BatchNorm layer, in place.

Works with :class:`jaxbn.nnx.BatchNorm` and :class:`flax.nnx.BatchNorm` (and their
subclasses) anywhere in a model. See :mod:`jaxbn.precise` for the pooling itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import core, precise
from jaxbn.nnx import BatchNorm

__all__ = ["precise_batch_stats"]

#: BatchNorm classes whose calls are recorded.
LAYERS = (nnx.BatchNorm, BatchNorm)
_Layer: TypeAlias = nnx.BatchNorm | BatchNorm

# The recording in progress in this thread: {id(layer): [Moments, ...]} and the axis name.
_ACTIVE = threading.local()


def _record(base: type, layer: _Layer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Records the moments ``layer`` normalizes its input with, then runs ``base.__call__``.

    The call's arguments are bound to ``base.__call__``'s signature, so that layers with
    more arguments (:class:`jaxbn.nnx.BatchNormAct`'s residual) pass them through.
    """
    records, axis_name = _ACTIVE.value
    bound = inspect.signature(base.__call__).bind(layer, *args, **kwargs)
    x = bound.arguments["x"]
    mask = bound.arguments.get("mask")
    if bound.arguments.get("use_running_average"):  # frozen by the forward pass: left alone
        return base.__call__(*bound.args, **bound.kwargs)
    # The layer's own dtype promotion decides what its statistics are computed from.
    scale = layer.scale[...] if layer.scale is not None else None
    bias = layer.bias[...] if layer.bias is not None else None
    xs = layer.promote_dtype((x, layer.mean[...], layer.var[...], scale, bias),
                             dtype=layer.dtype)[0]
    m = core.moments(xs, axis=layer.axis,
                     mask=None if mask is None else jnp.asarray(mask, dtype=bool),
                     axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups,
                     fast_variance=layer.use_fast_variance)
    records[id(layer)].append(precise._merge_unsynced(m, axis_name, layer.axis_name))
    bound.arguments["use_running_average"] = False
    return base.__call__(*bound.args, **bound.kwargs)


@functools.cache
def _recording(base: type) -> type:
    """A subclass of ``base`` whose call records the batch moments, then runs ``base``."""

    def __call__(self: _Layer, *args: Any, **kwargs: Any) -> Any:
        return _record(base, self, args, kwargs)

    return type(f"Recording{base.__name__}", (base,), {"__call__": __call__})


def _call(model: Any, batch: Any) -> Any:
    return model(batch)


@dataclasses.dataclass(frozen=True)
class _Nnx(precise._Collector):
    graphdef: Any
    forward: Callable[[Any, Any], Any]
    paths: tuple[tuple[Any, ...], ...]
    axis_name: Any

    def __call__(self, state: nnx.State[Any, Any], batch: precise.Batch
                 ) -> tuple[list[tuple[core.Moments, ...]], None]:
        # A private copy with Variables of this trace (the state may be closed over from an
        # enclosing one, under lax.scan).
        model = nnx.merge(self.graphdef, state, copy=True)
        modules = dict(nnx.iter_modules(model))
        layers = [modules[p] for p in self.paths]
        for layer in layers:
            object.__setattr__(layer, "__class__", _recording(type(layer)))
        records: dict[int, list[core.Moments]] = {id(layer): [] for layer in layers}
        previous = getattr(_ACTIVE, "value", None)
        _ACTIVE.value = (records, self.axis_name)
        try:
            self.forward(model, batch)
        finally:
            _ACTIVE.value = previous
        per_layer = [tuple(records[id(layer)]) for layer in layers]
        if not any(per_layer):
            raise ValueError(
                "no BatchNorm layer ran with batch statistics during the forward pass: "
                "forward(model, batch) must call the model, and not with "
                "use_running_average=True."
            )
        return per_layer, None


def precise_batch_stats(
    model: nnx.Module,
    batches: precise.Batches,
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    axis_name: core.AxisName | None = None,
    mesh: jax.sharding.Mesh | None = None,
    sync_processes: bool | None = None,
) -> None:
    """Sets an nnx model's BatchNorm statistics to exact population statistics, in place.

    Runs ``forward(model, batch)`` over ``batches`` with fixed weights, on a copy of the
    model inside one compiled step, with every :class:`flax.nnx.BatchNorm` and
    :class:`jaxbn.nnx.BatchNorm` switched to batch statistics (whatever ``train()`` /
    ``eval()`` left; other layers, e.g. dropout, run as the model is set) and recording the
    moments of its input that it normalizes with (after its ``promote_dtype``, with its
    ``axis``, ``axis_name``, ``axis_index_groups``, ``mask`` and ``use_fast_variance``). A
    layer that the forward pass itself calls with ``use_running_average=True`` (frozen)
    normalizes with its running statistics and keeps them.
    Each layer's moments are pooled exactly over all batches
    (:func:`jaxbn.precise.accumulate`), and its ``mean`` and ``var``
    :class:`~flax.nnx.BatchStat` values are then replaced in ``model`` -- as nnx updates
    modules in place (``nnx.update``, ``Optimizer.update``); nothing else in the model
    changes. The variance is unbiased where the layer has ``unbiased_running_var=True``
    (jaxbn's option) and biased otherwise, as flax stores it; a ``count`` statistic
    (jaxbn's ``momentum=None``) becomes the number of batch moments pooled.

    Args:
      model: an nnx module containing BatchNorm layers.
      batches: an iterable of same-shaped batches, or a stacked array (or dict of arrays)
        whose leading axis indexes the batches; see :func:`jaxbn.precise_batch_stats`.
      forward: ``forward(model, batch)`` runs the model on a batch (its output is ignored);
        default ``model(batch)``.
      axis_name: a mesh or mapped axis the batches are split over; the moments of layers
        that do not synchronize over it themselves are merged over it. Bound by ``mesh``
        or by an enclosing transformation.
      mesh: run the forward pass with ``shard_map`` over this mesh, every batch split along
        its leading axis over ``axis_name``.
      sync_processes: see :func:`jaxbn.precise_batch_stats`.

    Raises:
      ValueError: for a model without BatchNorm layers, a forward pass that runs none with
        batch statistics, empty ``batches``, or batches of different shapes.

    Example:

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jaxbn.nnx import BatchNorm
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        BatchNorm(8, momentum=0.9, rngs=nnx.Rngs(0)))
    >>> data = np.random.default_rng(0).normal(size=(16, 32, 4)).astype(np.float32)
    >>> model.eval()                             # e.g. after training
    >>> precise_batch_stats(model, list(data))   # updates model[1].mean and .var
    >>> y = model(data[0])                       # evaluates with the new statistics
    """
    layers = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LAYERS)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer (flax.nnx.BatchNorm, "
            f"jaxbn.nnx.BatchNorm or a subclass): a model without BatchNorm has no "
            f"statistics to recompute."
        )
    templates = [
        core.BatchStats(m.mean[...], m.var[...],
                        m.count[...] if hasattr(m, "count") else jnp.zeros((), jnp.int32))
        for _, m in layers
    ]
    graphdef, state = nnx.split(model)
    names = None if axis_name is None else (
        axis_name if isinstance(axis_name, str) else tuple(axis_name))
    collect = _Nnx(graphdef, forward or _call, tuple(p for p, _ in layers), names)
    pops, _ = precise._run(collect, state, templates, batches, axis_name=axis_name, mesh=mesh,
                          sync_processes=sync_processes)
    unbiased = [getattr(layer, "unbiased_running_var", False) for _, layer in layers]
    new = precise._finalize_all(pops, templates, unbiased, mesh)
    for (_, layer), stats in zip(layers, new, strict=True):
        assert stats is not None  # None only where unbiased is None, which no layer gives
        layer.mean[...] = stats.mean
        layer.var[...] = stats.var
        if hasattr(layer, "count"):
            layer.count[...] = stats.count
