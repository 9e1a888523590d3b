"""``jaxbn.linen.BatchNorm``: a drop-in replacement for :class:`flax.linen.BatchNorm`.

The module is a thin shell: it declares flax variables under flax's names and hands the
arithmetic to the core (:func:`jaxbn.batch_norm` or a variant). Switching a model is a
one-line import change, and flax checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from flax.linen.module import merge_param
from jax.nn import initializers

from jaxbn import _modules, core

__all__ = ["BatchNorm", "BatchNormAct"]

Dtype = Any
Initializer = Any


class BatchNorm(nn.Module):
    """Batch Normalization, a drop-in for :class:`flax.linen.BatchNorm`.

    Every field and call argument of ``flax.linen.BatchNorm`` is accepted with the same
    meaning, default and variable layout (``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var``), so a model switches by changing its import
    and keeps its checkpoints. The computation is :func:`jaxbn.batch_norm` (or a variant).

    Differences from flax, all deliberate (the README's drop-in section lists them for
    both modules):

    * ``use_fast_variance`` defaults to ``False``: the numerically stable two-pass variance
      instead of flax's ``E[x^2] - E[x]^2``. On well-scaled activations both agree to
      float32 rounding (about 1e-7 relative), while the fast formula loses every
      significant digit when ``|mean| >> std`` (inputs around 1e4 with unit spread give a
      variance of pure rounding noise in float32), at the same number of collectives.
      Pass ``use_fast_variance=True`` for flax's numerics.
    * With a ``mask``, statistics are synchronized exactly over ``axis_name`` even when
      devices hold different numbers of valid elements (flax averages per-device means),
      and a feature with no valid element outputs ``bias`` and keeps its running
      statistics (flax outputs and stores NaN).
    * ``force_float32_reductions=False`` keeps flax's variable dtypes (``param_dtype``
      running statistics) so checkpoints match, but the reductions themselves still run in
      float32: the core never reduces in half precision.

    As in flax, training with one value per feature is allowed (variance 0, output
    ``bias``), complex inputs are normalized (complex mean, real variance), integer inputs
    are promoted, and during initialization the running statistics are not updated and
    ``axis_name`` is not used, so ``init`` needs neither representative data nor a bound
    axis name.

    Extras: ``momentum=None`` is PyTorch's cumulative moving average, which needs the number
    of updates so far; the module then keeps one more variable, ``batch_stats/count``
    (int32 scalar). It exists only when ``momentum is None``, so flax checkpoints stay
    loadable otherwise. ``unbiased_running_var=True`` stores ``n / (n - 1)`` times the batch
    variance in the running variance, as PyTorch does. ``renorm`` and
    ``virtual_batch_size`` select :func:`jaxbn.batch_renorm` and
    :func:`jaxbn.ghost_batch_norm`.

    Attributes:
      use_running_average: if True, normalize with the stored running statistics instead
        of the batch's; may instead be given at call time.
      axis: feature axis (or tuple of axes) of the input.
      momentum: decay of the running averages, ``new = momentum * old + (1 - momentum) *
        batch`` (PyTorch's 0.1 is 0.9 here), or ``None`` for the cumulative average.
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from the input and the parameters).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: whether to add a learned bias (beta).
      use_scale: whether to multiply by a learned scale (gamma).
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: mapped axis (``pmap``, ``shard_map``, ``vmap``) to synchronize the batch
        statistics over; not needed under plain ``jit`` with sharded inputs.
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately.
      use_fast_variance: use ``E[x^2] - E[x]^2`` (flax's default) instead of the stable
        two-pass variance; see above.
      force_float32_reductions: if False, the running statistics are kept in
        ``param_dtype`` as in flax; see above.
      unbiased_running_var: keep the unbiased batch variance in the running variance.
      renorm: use Batch Renormalization (:func:`jaxbn.batch_renorm`) in training.
      renorm_r_max: bound of Batch Renormalization's scale correction ``r``.
      renorm_d_max: bound of Batch Renormalization's shift correction ``d``.
      virtual_batch_size: use Ghost BatchNorm (:func:`jaxbn.ghost_batch_norm`) with
        statistics per virtual batch of this many examples (along axis 0).

    Example:

    A training step and an evaluation step.

    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import BatchNorm
    >>> bn = BatchNorm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3)) * 2 + 5
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False,
    ...                       mutable=['batch_stats'])
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
    True
    >>> variables = {**variables, **updates}
    >>> y_eval = bn.apply(variables, x, use_running_average=True)
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    renorm: bool = False
    renorm_r_max: float = 3.0
    renorm_d_max: float = 5.0
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.typing.ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Normalizes ``x`` with batch or running statistics.

        Args:
          x: the input to normalize.
          use_running_average: if True, use the stored running statistics; overrides the
            field of the same name only when that field is None.
          mask: optional array broadcastable to ``x`` (converted to bool); ``False``
            elements take no part in the statistics.

        Returns:
          The normalized input, of the shape of ``x``.

        Raises:
          ValueError: for ``momentum=None`` in training when ``batch_stats/count`` is
            missing, and for whatever :func:`jaxbn.batch_norm` rejects (but one value per
            feature, which is allowed here as in flax).
        """
        return _call(self, x, use_running_average, mask, _modules.apply)


class BatchNormAct(BatchNorm):
    """BatchNorm, residual add and activation in one layer: :func:`jaxbn.batch_norm_act`.

    ``BatchNormAct(...)(x, residual)`` computes ``activation(BatchNorm(...)(x) +
    residual)`` with the memory-saving derivative rule of :mod:`jaxbn.fused`. It takes
    every field of :class:`BatchNorm` and has the same variables (``params/scale``,
    ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``), so a model's
    ``BatchNorm(name=n)`` followed by ``nn.relu`` and its ``BatchNormAct(name=n)`` share
    checkpoints. With ``renorm`` or ``virtual_batch_size`` the chain runs unfused (same
    result, no memory saving). :func:`jaxbn.precise_linen.precise_batch_stats` treats it
    as a BatchNorm, and :func:`jaxbn.fold` folds its variables as a BatchNorm's:
    inference is ``activation(x * a + b + residual)``.

    Attributes:
      activation: ``"relu"``, ``"leaky_relu"``, ``"identity"`` or an elementwise callable
        (see :func:`jaxbn.batch_norm_act` for what each keeps for the backward pass).
      negative_slope: ``"leaky_relu"``'s slope for negative inputs.

    Example:

    A ResNet block's end, ``relu(bn(h) + x)`` (here ``h`` is ``x`` itself):

    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import BatchNormAct
    >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    >>> bn = BatchNormAct(use_running_average=False, momentum=0.9)
    >>> variables = bn.init(jax.random.key(1), x, x)
    >>> y, updates = bn.apply(variables, x, x, mutable=["batch_stats"])
    >>> bool((y >= 0).all()), jax.tree.map(jnp.shape, variables["params"])
    (True, {'bias': (16,), 'scale': (16,)})
    """

    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    negative_slope: float = 0.01

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        x: jax.typing.ArrayLike,
        residual: jax.typing.ArrayLike | None = None,
        use_running_average: bool | None = None,
        *,
        mask: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """``activation(normalized x + residual)`` with batch or running statistics.

        Args:
          x: the input to normalize.
          residual: an array of the shape of ``x`` added before the activation, or
            ``None``.
          use_running_average: as in :meth:`BatchNorm.__call__`.
          mask: as in :meth:`BatchNorm.__call__`.

        Returns:
          The activated output, of the shape of ``x``.

        Raises:
          TypeError: for a bool ``residual`` (``use_running_average`` passed in its place).
          ValueError: for whatever :class:`BatchNorm` or :func:`jaxbn.batch_norm_act`
            rejects.
        """
        run = _modules.act_runner(residual)
        return _call(self, x, use_running_average, mask, run)


def _call(module: BatchNorm, x: jax.typing.ArrayLike, use_running_average: bool | None,
          mask: jax.typing.ArrayLike | None, run: Callable[..., Any]) -> jax.Array:
    """A BatchNorm call: flax's variables in, ``run``'s arithmetic, updated statistics out.

    A function, not a method (see :func:`_count_variable`). ``run`` is
    :func:`jaxbn._modules.apply` or a partial application of
    :func:`jaxbn._modules.apply_act`.
    """
    use_running_average = merge_param(
        "use_running_average", module.use_running_average, use_running_average
    )
    training = not bool(use_running_average)
    x = jnp.asarray(x)
    feats = core.feature_axes(x.ndim, module.axis)
    feature_shape = tuple(x.shape[a] for a in feats)
    stats_dtype = jnp.float32 if module.force_float32_reductions else module.param_dtype

    ra_mean = module.variable("batch_stats", "mean", jnp.zeros, feature_shape, stats_dtype)
    ra_var = module.variable("batch_stats", "var", jnp.ones, feature_shape, stats_dtype)
    count = _count_variable(module, training)

    scale = (
        module.param("scale", module.scale_init, feature_shape, module.param_dtype)
        if module.use_scale
        else None
    )
    bias = (
        module.param("bias", module.bias_init, feature_shape, module.param_dtype)
        if module.use_bias
        else None
    )
    # flax's output dtype: promoted from the input and the parameters that exist.
    out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=module.dtype)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(out_dtype)  # flax promotes integer inputs too
    stats = core.BatchStats(
        ra_mean.value,
        ra_var.value,
        count.value if count is not None else jnp.zeros((), jnp.int32),
    )
    initializing = module.is_initializing()
    y, new_stats = run(module, x, _modules.params(scale, bias), stats, training=training,
                       mask=mask, dtype=out_dtype, initializing=initializing)
    if training and not initializing:
        ra_mean.value = new_stats.mean
        ra_var.value = new_stats.var
        if count is not None:
            count.value = new_stats.count
    out: jax.Array = y
    return out


def _count_variable(module: BatchNorm, training: bool) -> Any:
    """The ``batch_stats/count`` variable, declared only for ``momentum=None``.

    A function, not a method: linen wraps every method of a module (it would show up in
    ``nn.tabulate`` and ``nn.intercept_methods`` as a call of its own).
    """
    if module.momentum is not None:
        return None
    if module.is_initializing():
        return module.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
    if not training:
        return None
    if not module.has_variable("batch_stats", "count"):
        raise _modules.count_missing(
            "'batch_stats/count'",
            "add it to the variables (e.g. from flax.linen.BatchNorm), e.g. "
            "batch_stats[...]['count'] = jnp.array(n, jnp.int32)")
    return module.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
