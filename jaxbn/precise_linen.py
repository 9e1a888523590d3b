"""PreciseBN for Flax linen models: population statistics of every BatchNorm layer.

Works with :class:`jaxbn.linen.BatchNorm` and :class:`flax.linen.BatchNorm` (and their
subclasses) anywhere in a model: both keep ``batch_stats/mean`` and ``batch_stats/var``, so
the result replaces the model's ``batch_stats`` as it is. See :mod:`jaxbn.precise` for the
pooling itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict, freeze, unfreeze
from flax.linen.module import InterceptorContext
from flax.nnx import traversals  # traverse_util's flatten_dict and unflatten_dict, annotated

from jaxbn import core, precise
from jaxbn.linen import BatchNorm

__all__ = ["precise_batch_stats"]

#: BatchNorm classes whose calls are intercepted.
LAYERS = (nn.BatchNorm, BatchNorm)
#: The collection the intercepted layers sow their batch moments into.
COLLECTION = "precise_batch_stats"


def _layer_moments(module: nn.BatchNorm | BatchNorm, args: tuple[Any, ...],
                   kwargs: dict[str, Any], orig: Callable[..., Any],
                   axis_name: Any) -> core.Moments | None:
    """The batch moments a BatchNorm call normalizes with; None if it uses running ones."""
    sig = inspect.signature(orig)
    bound = sig.bind(*args, **kwargs)
    ura = module.use_running_average
    if ura is None:
        ura = bound.arguments.get("use_running_average")
    if ura is None or ura:
        return None  # frozen (or flax raises its own error for a missing mode)
    mask = bound.arguments.get("mask")
    m = core.moments(
        bound.arguments[next(iter(sig.parameters))], axis=module.axis,
        mask=None if mask is None else jnp.asarray(mask, dtype=bool),
        axis_name=module.axis_name, axis_index_groups=module.axis_index_groups,
        fast_variance=module.use_fast_variance,
    )
    return precise._merge_unsynced(m, axis_name, module.axis_name)


@dataclasses.dataclass(frozen=True)
class _Linen(precise._Collector):
    apply_fn: Callable[..., Any]
    paths: tuple[tuple[str, ...], ...]
    axis_name: Any

    def __call__(self, variables: Mapping[str, Any], batch: precise.Batch
                 ) -> tuple[list[tuple[core.Moments, ...]], list[Any]]:
        def intercept(next_fun: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any], context: InterceptorContext) -> Any:
            module = context.module
            if (context.method_name == "__call__" and isinstance(module, LAYERS)
                    and not module.is_initializing()):
                m = _layer_moments(module, args, kwargs, context.orig_method, self.axis_name)
                unbiased = jnp.asarray(getattr(module, "unbiased_running_var", False))
                if m is not None and not module.sow(COLLECTION, "moments", (m, unbiased)):
                    raise ValueError(
                        "apply_fn must pass its `mutable` argument on to Module.apply "
                        "(precise_batch_stats calls apply_fn(variables, batch, mutable=True))."
                    )
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(intercept):
            out = self.apply_fn(variables, batch, mutable=True)
        state = out[1] if isinstance(out, tuple) and len(out) == 2 else {}
        sown = traversals.flatten_mapping(unfreeze(state.get(COLLECTION, {})))
        if not sown:
            raise ValueError(
                "no BatchNorm layer (flax.linen.BatchNorm, jaxbn.linen.BatchNorm or a "
                "subclass) ran in training mode during apply_fn: apply_fn must run the model "
                "in training mode, e.g. functools.partial(model.apply, train=True), and be "
                "Module.apply-like (return (output, mutated variables) when called with "
                "mutable=True); a model without BatchNorm has no statistics to recompute."
            )
        index = {p: i for i, p in enumerate(self.paths)}
        per_layer: list[tuple[core.Moments, ...]] = [() for _ in self.paths]
        flags: list[Any] = [None] * len(self.paths)
        for key, calls in sown.items():
            path = key[:-1]
            if path not in index:
                raise ValueError(
                    f"the BatchNorm at {'/'.join(path)} has no batch_stats in variables "
                    f"(found: {['/'.join(p) for p in self.paths]})."
                )
            per_layer[index[path]] = tuple(m for m, _ in calls)
            flags[index[path]] = calls[0][1]
        return per_layer, flags


def precise_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: precise.Batches,
    *,
    axis_name: core.AxisName | None = None,
    mesh: jax.sharding.Mesh | None = None,
    sync_processes: bool | None = None,
) -> Any:
    """Recomputes a linen model's ``batch_stats`` as exact population statistics.

    Runs ``apply_fn(variables, batch, mutable=True)`` -- the model's training-mode forward
    pass with fixed weights -- over ``batches``, with every call of a
    :class:`flax.linen.BatchNorm` or :class:`jaxbn.linen.BatchNorm` intercepted
    (:func:`flax.linen.intercept_methods`): the moments of the layer's input that the layer
    normalizes with (its ``axis``, ``axis_name``, ``axis_index_groups``, ``mask`` and
    ``use_fast_variance``) are recorded, and the layer then runs as usual, so downstream
    layers see training-mode inputs. Each layer's moments are pooled exactly over all
    batches (:func:`jaxbn.precise.accumulate`). A layer that runs with
    ``use_running_average=True`` (frozen) and a layer that does not run keep their
    statistics. The stored variance is unbiased where the
    layer has ``unbiased_running_var=True`` (jaxbn's option) and biased otherwise, as flax
    stores it; ``batch_stats/count`` (jaxbn's ``momentum=None``) becomes the number of
    batch moments pooled. The forward pass is compiled once; passing the same ``apply_fn``
    object again (e.g. ``model.apply``) reuses the compiled step.

    Args:
      apply_fn: ``Module.apply``-like: ``apply_fn(variables, batch, mutable=True)`` must
        run the model in training mode and return ``(output, mutated variables)``, e.g.
        ``functools.partial(model.apply, train=True)``. Bind ``rngs`` too if the model
        needs them in training mode (dropout).
      variables: the model's variables, with ``params`` and ``batch_stats``.
      batches: an iterable of same-shaped batches, or a stacked array (or dict of arrays)
        whose leading axis indexes the batches; see :func:`jaxbn.precise_batch_stats`.
      axis_name: a mesh or mapped axis the batches are split over; the moments of layers
        that do not synchronize over it themselves are merged over it. Bound by ``mesh``
        or by an enclosing transformation.
      mesh: run the forward pass with ``shard_map`` over this mesh, every batch split along
        its leading axis over ``axis_name`` (as a data-parallel training step does).
      sync_processes: see :func:`jaxbn.precise_batch_stats`.

    Returns:
      New ``batch_stats``, shaped as ``variables["batch_stats"]``: the statistics of every
      layer that ran replaced, every other entry unchanged.

    Raises:
      ValueError: for variables without ``batch_stats``, a forward pass in which no
        BatchNorm layer ran in training mode, empty ``batches``, or batches of different
        shapes.

    Example:

    >>> import functools, jax, jax.numpy as jnp, numpy as np
    >>> import flax.linen as nn
    >>> from jaxbn.linen import BatchNorm
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x, train: bool):
    ...         x = nn.Dense(8)(x)
    ...         x = BatchNorm(use_running_average=not train, momentum=0.9)(x)
    ...         return nn.Dense(2)(nn.relu(x))
    >>> model = MLP()
    >>> data = np.random.default_rng(0).normal(size=(16, 32, 4)).astype(np.float32)
    >>> variables = model.init(jax.random.key(0), data[0], train=False)
    >>> # ... training ...
    >>> batch_stats = precise_batch_stats(functools.partial(model.apply, train=True),
    ...                                   variables, list(data))
    >>> variables = {**variables, "batch_stats": batch_stats}
    >>> logits = model.apply(variables, data[0], train=False)
    """
    batch_stats = variables.get("batch_stats") if isinstance(variables, Mapping) else None
    flat = traversals.flatten_mapping(unfreeze(batch_stats)) if batch_stats else {}
    paths = tuple(sorted(k[:-1] for k in flat if k[-1] == "mean" and k[:-1] + ("var",) in flat))
    if not paths:
        raise ValueError(
            f"variables have no batch_stats with BatchNorm statistics (mean and var), got "
            f"collections {sorted(variables) if isinstance(variables, Mapping) else variables}"
            f"; a model without BatchNorm has no statistics to recompute."
        )
    templates = [
        core.BatchStats(flat[p + ("mean",)], flat[p + ("var",)],
                        flat.get(p + ("count",), jnp.zeros((), jnp.int32)))
        for p in paths
    ]
    names = None if axis_name is None else (
        axis_name if isinstance(axis_name, str) else tuple(axis_name))
    collect = _Linen(apply_fn, paths, names)
    pops, flags = precise._run(collect, variables, templates, batches, axis_name=axis_name,
                              mesh=mesh, sync_processes=sync_processes)
    new = dict(flat)
    for path, stats in zip(paths, precise._finalize_all(pops, templates, flags, mesh),
                           strict=True):
        if stats is None:  # the layer did not run: its statistics stay
            continue
        new[path + ("mean",)] = stats.mean
        new[path + ("var",)] = stats.var
        if path + ("count",) in flat:
            new[path + ("count",)] = stats.count
    out = traversals.unflatten_mapping(new)
    return freeze(out) if isinstance(batch_stats, FrozenDict) else out
