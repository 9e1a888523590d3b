"""``jaxbn.equinox.BatchNorm``: a drop-in replacement for :class:`equinox.nn.BatchNorm`.

A subclass of equinox's layer that keeps its constructor, fields and state (so
``eqx.nn.make_with_state``, ``eqx.nn.State``, ``eqx.nn.inference_mode`` and files written by
``eqx.tree_serialise_leaves`` work with either class) and replaces only the call: the
statistics are :func:`jaxbn.moments`'s (the stable two-pass variance, float32 under half
precision), merged exactly over ``axis_name``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _modules, _sharding, core

__all__ = ["BatchNorm"]


def axis_names(axis_name: Hashable | Sequence[Hashable]) -> Any:
    """equinox's ``axis_name`` (a name, or a sequence of names) as a core axis name.

    Args:
      axis_name: a hashable name, or a list or tuple of names.

    Returns:
      The name, or a tuple of names.

    Raises:
      NameError: if a name is not bound by an enclosing ``vmap``/``pmap``/``shard_map``,
        as equinox raises.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> jax.vmap(lambda x: x + len(axis_names(["a"])), axis_name="a")(jnp.zeros(2))
    Array([1., 1.], dtype=float32)
    """
    names = tuple(axis_name) if isinstance(axis_name, list | tuple) else axis_name
    try:
        lax.axis_size(names)
    except NameError:
        raise NameError(
            f"BatchNorm's axis_name {axis_name!r} is not bound here: call the layer "
            f"per example under a transformation that names that axis, e.g. "
            f"jax.vmap(bn, axis_name={axis_name!r}, in_axes=(0, None), out_axes=(0, None))"
            f"(x, state)."
        ) from None
    return names


def _like(m: core.Moments, ref: jax.Array) -> core.Moments:
    # The state's dtype (float64 under x64), so that strict dtype promotion accepts the mix.
    return core.Moments(m.mean.astype(ref.dtype), m.var.astype(ref.dtype), m.count)


def _astype(v: jax.Array, dtype: Any) -> jax.Array:
    return v if v.dtype == dtype else v.astype(dtype)  # astype would drop a weak type


def _set(state: eqx.nn.State, index: eqx.nn.StateIndex[Any], value: Any) -> eqx.nn.State:
    """``state.set`` with ``value`` cast to the old value's dtype and shard_map axes.

    ``State.set`` demands an identical type; under ``pmap``/``shard_map`` a state passed in
    unmapped may be typed as varying over the mapped axes while statistics summed over
    them are not.
    """
    old = state.get(index)
    value = jax.tree.map(lambda v, o: _sharding._vary_like(_astype(jnp.asarray(v), o.dtype), o),
                         value, old)
    return state.set(index, value)


class BatchNorm(eqx.nn.BatchNorm):
    """Batch Normalization, a drop-in for :class:`equinox.nn.BatchNorm`.

    The constructor, fields, state layout and initial state are equinox's (this class
    inherits them): ``BatchNorm(input_size, axis_name, eps=1e-5, channelwise_affine=True,
    momentum=0.99, inference=False, dtype=None, mode=...)`` with ``mode`` ``"ema"`` or
    ``"batch"`` (unspecified: ``"ema"`` with equinox's warning). The layer is called per
    example, ``y, state = bn(x, state)`` with ``x`` of shape ``(input_size, *spatial)``,
    under ``jax.vmap``/``pmap``/``shard_map`` binding ``axis_name`` (a name or a sequence of
    names); the statistics are reduced over the spatial dimensions and every example of
    the named axes.

    The semantics are equinox's:

    * ``mode="batch"``: training normalizes with the batch mean and (biased) variance and
      updates ``hidden = momentum * hidden + (1 - momentum) * batch`` (starting at 0 and
      1) and a step counter; inference normalizes with ``hidden / (1 - momentum**counter)``
      (``hidden`` itself before the first step).
    * ``mode="ema"``: training normalizes with, and stores, ``(1 - momentum) * batch +
      momentum * running`` (the batch statistics on the first call), differentiated
      through the batch part; inference uses the stored statistics.

    Differences, all in the numerics: the batch statistics are :func:`jaxbn.moments` of
    each example (float32 or wider for half-precision inputs, the stable two-pass
    variance), merged exactly over the named axes with two sums (Chan et al.; equinox's
    variance is two-pass too, so the two agree to float32 rounding); the new state
    carries no gradient in ``"batch"`` mode (equinox's does, but no loss reads it); and
    the state is written back in its own dtype. Under ``shard_map`` with the per-example
    ``vmap`` inside, pass ``check_vma=False``: jax's check of varying axes rejects a
    ``psum`` over a ``vmap`` axis there (equinox's layer fails the same way).

    Example:

    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from jaxbn.equinox import BatchNorm
    >>> bn, state = eqx.nn.make_with_state(BatchNorm)(3, "batch", mode="batch")
    >>> x = jax.random.normal(jax.random.key(0), (8, 3, 5)) * 2 + 1
    >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> y, state = train(x, state)
    >>> bool(jnp.allclose(y.mean((0, 2)), 0, atol=1e-5))
    True
    >>> evaluate = jax.vmap(eqx.nn.inference_mode(bn), axis_name="batch",
    ...                     in_axes=(0, None), out_axes=(0, None))
    >>> y_eval, _ = evaluate(x, state)
    """

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes one example ``x`` of shape ``(input_size, *spatial)``.

        Args:
          x: one example, channels first.
          state: an :class:`equinox.nn.State` holding this layer's statistics.
          key: ignored (equinox's layer interface).
          inference: overrides the ``inference`` field when not ``None``.

        Returns:
          ``(y, new_state)``, ``y`` of the shape of ``x``.

        Raises:
          NameError: if ``axis_name`` is not bound (as equinox).
          ValueError: if ``x`` does not have ``input_size`` channels first.
        """
        del key
        with jax.named_scope("jaxbn.equinox.BatchNorm"):
            return self._apply(jnp.asarray(x), state,
                               self.inference if inference is None else inference)

    def _apply(self, x: jax.Array, state: eqx.nn.State, inference: bool
               ) -> tuple[jax.Array, eqx.nn.State]:
        names = axis_names(self.axis_name)
        if x.ndim < 1 or x.shape[0] != self.input_size:
            raise ValueError(
                f"BatchNorm({self.input_size}, ...) expects one example of shape "
                f"({self.input_size}, *spatial) (channels first, the batch mapped by "
                f"vmap), got shape {x.shape}."
            )
        params = _modules.params(self.weight, self.bias)
        ref = self.weight if self.channelwise_affine else None
        out_dtype = x.dtype if ref is None else jnp.result_type(x.dtype, ref.dtype)
        batch = None if inference else _modules.synced_moments(x, axis=0, axis_name=names)
        stats = self._ema if self.mode == "ema" else self._batch
        mean, var, state = stats(batch, state)
        return core.normalize(x, mean, var, params, axis=0, epsilon=self.eps,
                              dtype=out_dtype), state

    def _ema(self, batch: core.Moments | None, state: eqx.nn.State
             ) -> tuple[jax.Array, jax.Array, eqx.nn.State]:
        """mode="ema": the statistics to normalize with, and the new state."""
        first_index, index = self.ema_first_time_index, self.ema_state_index
        assert first_index is not None and index is not None
        running_mean, running_var = state.get(index)
        if batch is None:
            return running_mean, running_var, state
        first = state.get(first_index)
        state = _set(state, first_index, jnp.zeros_like(first))
        m = _like(batch, running_mean)
        # Differentiated through the batch part, as in equinox.
        mean = jnp.where(first, m.mean,
                         (1 - self.momentum) * m.mean + self.momentum * running_mean)
        var = jnp.where(first, m.var,
                        (1 - self.momentum) * m.var + self.momentum * running_var)
        return mean, var, _set(state, index, (mean, var))

    def _batch(self, batch: core.Moments | None, state: eqx.nn.State
               ) -> tuple[jax.Array, jax.Array, eqx.nn.State]:
        """mode="batch": the statistics to normalize with, and the new state."""
        counter_index, index = self.batch_counter, self.batch_state_index
        assert counter_index is not None and index is not None
        counter = state.get(counter_index)
        hidden_mean, hidden_var = state.get(index)
        if batch is None:
            debias = jnp.where(counter == 0, 1, 1 - self.momentum**counter)
            return hidden_mean / debias, hidden_var / debias, state
        m = jax.tree.map(lax.stop_gradient, _like(batch, hidden_mean))
        new_mean = hidden_mean * self.momentum + m.mean * (1 - self.momentum)
        new_var = hidden_var * self.momentum + m.var * (1 - self.momentum)
        state = _set(state, counter_index, counter + 1)
        state = _set(state, index, (new_mean, new_var))
        return batch.mean, batch.var, state
