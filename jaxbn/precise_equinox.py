"""PreciseBN for equinox models: population statistics of every BatchNorm layer.

Works with :class:`jaxbn.equinox.BatchNorm` and :class:`equinox.nn.BatchNorm` (and their
subclasses) anywhere in a model, in either ``mode``. See :mod:`jaxbn.precise` for the
pooling itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import _modules, core, precise
from jaxbn.equinox import axis_names

__all__ = ["precise_batch_stats"]


class _Recorder(eqx.nn.StatefulLayer):
    """A BatchNorm layer that also writes the moments it normalizes with into the state."""

    layer: eqx.nn.BatchNorm
    index: eqx.nn.StateIndex[core.Moments]

    def __init__(self, layer: eqx.nn.BatchNorm) -> None:
        self.layer = layer
        zeros = jnp.zeros((layer.input_size,), jnp.float32)
        self.index = eqx.nn.StateIndex(core.Moments(zeros, zeros, zeros))

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, key: Any = None,
                 inference: bool | None = None) -> tuple[jax.Array, eqx.nn.State]:
        frozen = self.layer.inference if inference is None else inference
        if not frozen:
            m = _modules.synced_moments(jnp.asarray(x), axis=0,
                                        axis_name=axis_names(self.layer.axis_name))
            state = state.set(self.index, core.Moments(
                *(jnp.asarray(v, jnp.float32) for v in m)))
        return self.layer(x, state, key=key, inference=inference)


def _is_bn(node: Any) -> bool:
    return isinstance(node, eqx.nn.BatchNorm)


@dataclasses.dataclass(frozen=True)
class _Equinox(precise._Collector):
    forward: Callable[..., Any]
    treedef: Any  # of the recording model
    static: tuple[Any, ...]  # its leaves that are not arrays (None where they are)
    keys: tuple[Any, ...]  # the recorders' keys in the state

    def __call__(self, consts: Any, batch: precise.Batch
                 ) -> tuple[list[tuple[core.Moments, ...]], None]:
        arrays, state = consts
        it = iter(arrays)
        model = jax.tree.unflatten(self.treedef, [next(it) if s is None else s
                                                  for s in self.static])
        out = self.forward(model, state, batch)
        if not (isinstance(out, tuple) and len(out) == 2
                and isinstance(out[1], eqx.nn.State)):
            raise ValueError(
                f"forward(model, state, batch) must return (output, new_state) with an "
                f"eqx.nn.State, as a stateful equinox model does; got {type(out).__name__}."
            )
        values, keys = out[1].tree_flatten()
        entries = dict(zip(keys, values, strict=True))
        return [(core.Moments(*entries[k]),) for k in self.keys], None


def _with_recorders(state: eqx.nn.State, recorders: list[_Recorder]) -> eqx.nn.State:
    """``state`` plus one zero-initialized entry per recorder."""
    values, keys = state.tree_flatten()
    extra_values, extra_keys = eqx.nn.State([r.index for r in recorders]).tree_flatten()
    new: eqx.nn.State = eqx.nn.State.tree_unflatten(keys + extra_keys, values + extra_values)
    return new


def _store(state: eqx.nn.State, layer: eqx.nn.BatchNorm, stats: core.BatchStats
           ) -> eqx.nn.State:
    """Writes population statistics where ``layer`` keeps its own (see below)."""
    if layer.mode == "ema":
        index, flag = layer.ema_state_index, layer.ema_first_time_index
    else:
        index, flag = layer.batch_state_index, layer.batch_counter
    assert index is not None and flag is not None
    mean, var = state.get(index)
    state = state.set(index, (stats.mean.astype(mean.dtype), stats.var.astype(var.dtype)))
    # "ema": no longer the first step; "batch": counter 0, no debiasing at inference.
    return state.set(flag, jnp.zeros_like(state.get(flag)))


def precise_batch_stats(
    forward: Callable[..., Any],
    model: Any,
    state: eqx.nn.State,
    batches: precise.Batches,
) -> eqx.nn.State:
    """Recomputes the statistics of every BatchNorm layer of an equinox model exactly.

    Runs ``forward(model, state, batch)`` -- the training-mode forward pass with fixed
    weights, e.g. ``jax.vmap(model, axis_name="batch", in_axes=(0, None),
    out_axes=(0, None))(batch, state)`` -- over ``batches``, with every
    :class:`equinox.nn.BatchNorm` (:class:`jaxbn.equinox.BatchNorm` included) wrapped so
    that it records the exact moments of its input over its ``axis_name`` (the statistics
    it normalizes with) while it runs as usual. Each layer's moments are pooled exactly over
    all batches (:func:`jaxbn.precise.accumulate`) and stored as its statistics:

    * ``mode="batch"``: ``(mean, var)`` in the hidden statistics and the step counter set
      to 0, so that inference uses them as they are (equinox divides by
      ``1 - momentum**counter`` only after a training step);
    * ``mode="ema"``: ``(mean, var)`` in the running statistics, no longer "first time".

    The variance is the biased one, as equinox keeps it. Layers that do not run in training
    mode keep their statistics. The forward pass is compiled once; to spread each batch
    over devices, pass sharded batches (``jit`` partitions the ``vmap``).

    Args:
      forward: ``(model, state, batch) -> (output, new_state)`` in training mode.
      model: the model (as from :func:`equinox.nn.make_with_state`).
      state: its :class:`equinox.nn.State`.
      batches: an iterable of same-shaped batches, or a stacked array (or dict of arrays)
        whose leading axis indexes the batches; see :func:`jaxbn.precise_batch_stats`.

    Returns:
      A new :class:`equinox.nn.State` with the statistics of every layer that ran
      replaced, every other entry unchanged.

    Raises:
      ValueError: for a model without BatchNorm layers, a ``forward`` that does not return
        ``(output, state)``, empty ``batches`` or batches of different shapes.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, equinox as eqx
    >>> from jaxbn.equinox import BatchNorm
    >>> model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
    ...     eqx.nn.Linear(4, 8, key=jax.random.key(0)), BatchNorm(8, "batch", mode="batch")])
    >>> def forward(model, state, x):
    ...     return jax.vmap(model, axis_name="batch", in_axes=(0, None),
    ...                     out_axes=(0, None))(x, state)
    >>> data = np.random.default_rng(0).normal(size=(10, 32, 4)).astype(np.float32)
    >>> state = precise_batch_stats(forward, model, state, data)
    >>> mean, var = state.get(model[1].batch_state_index)
    >>> mean.shape
    (8,)
    """
    layers = [n for n in jax.tree.leaves(model, is_leaf=_is_bn) if _is_bn(n)]
    if not layers:
        raise ValueError(
            "the model has no equinox.nn.BatchNorm (or jaxbn.equinox.BatchNorm) layer; a "
            "model without BatchNorm has no statistics to recompute."
        )
    recording = jax.tree.map(lambda n: _Recorder(n) if _is_bn(n) else n, model,
                             is_leaf=_is_bn)
    recorders = [n for n in jax.tree.leaves(recording, is_leaf=lambda n: isinstance(
        n, _Recorder)) if isinstance(n, _Recorder)]
    leaves, treedef = jax.tree.flatten(recording)
    static = tuple(None if eqx.is_array(v) else v for v in leaves)
    arrays = [v for v in leaves if eqx.is_array(v)]
    full = _with_recorders(_copy(state), recorders)
    keys = full.tree_flatten()[1][-len(recorders):]
    collect = _Equinox(forward, treedef, static, keys)
    consts = (arrays, full)
    templates = [core.BatchStats(jnp.zeros(r.layer.input_size), jnp.ones(r.layer.input_size),
                                 jnp.zeros((), jnp.int32)) for r in recorders]
    pops, _ = precise._run(collect, consts, templates, batches, axis_name=None, mesh=None,
                           sync_processes=None)
    new = _copy(state)
    for layer, pop, template in zip(layers, pops, templates, strict=True):
        if int(pop.batches) == 0:  # the layer never ran in training mode
            continue
        new = _store(new, layer, precise.finalize(pop, template))
    return new


def _copy(state: eqx.nn.State) -> eqx.nn.State:
    # State.set invalidates the State it is called on; the caller's stays usable.
    leaves, treedef = jax.tree.flatten(state)
    return jax.tree.unflatten(treedef, leaves)  # type: ignore[no-any-return]
