"""``jaxbn.linen.BatchNorm``: a drop-in replacement for :class:`flax.linen.BatchNorm`.

The module is a thin shell: it declares flax variables under flax's names and hands the
arithmetic to :func:`jaxbn.core.batch_norm`. Switching a model is a one-line import change,
and flax checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from flax.linen.module import merge_param
from jax.nn import initializers

from jaxbn import core, variants

__all__ = ["BatchNorm"]

Dtype = Any
Initializer = Any


class BatchNorm(nn.Module):
    """Batch Normalization, a drop-in for :class:`flax.linen.BatchNorm`.

    Every field and call argument of ``flax.linen.BatchNorm`` is accepted with the same
    meaning, default and variable layout (``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var``), so a model switches by changing its import
    and keeps its checkpoints. The computation is :func:`jaxbn.core.batch_norm`.

    Differences from flax, all deliberate:

    * ``use_fast_variance`` defaults to ``False``: the variance is the numerically stable
      two-pass estimate instead of flax's ``E[x^2] - E[x]^2``. A drop-in should not change
      numerics silently, but here the change only removes a failure: on well-scaled
      activations both agree to float32 rounding (about 1e-7 relative), while the fast
      formula loses every significant digit when ``|mean| >> std`` (inputs around 1e4 with
      unit spread give a variance that is pure rounding noise in float32) and the stable
      one stays accurate, at the same number of collectives. Pass
      ``use_fast_variance=True`` for flax's numerics.
    * Statistics are synchronized exactly over ``axis_name`` even when masks leave devices
      with different numbers of valid elements (flax averages per-device means).
    * Training with a single value per feature (and no ``axis_name``) raises ``ValueError``
      as PyTorch does, instead of normalizing by a zero variance. Initialization
      (``init``) accepts such inputs, as flax does.
    * A feature with no valid element under ``mask`` keeps its running statistics
      (flax writes NaN).
    * Inputs must be real floating point (flax also accepts complex and integer inputs).
    * ``force_float32_reductions=False`` keeps flax's variable dtypes (``param_dtype``
      running statistics) so checkpoints match, but the reductions themselves still run in
      float32: the core never reduces in half precision.

    Extras: ``momentum=None`` is PyTorch's cumulative moving average, which needs the number
    of updates so far; the module then keeps one more variable, ``batch_stats/count``
    (int32 scalar). It exists only when ``momentum is None``, so flax checkpoints stay
    loadable otherwise. ``unbiased_running_var=True`` stores ``n / (n - 1)`` times the batch
    variance in the running variance, as PyTorch does.

    During initialization the running statistics are not updated and ``axis_name`` is not
    used (as in flax), so ``init`` needs neither representative data nor a bound axis name.

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

    Example, a training step and an evaluation step:

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
            missing, and for whatever :func:`jaxbn.core.batch_norm` rejects.
        """
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        training = not bool(use_running_average)
        x = jnp.asarray(x)
        feats = core.feature_axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[a] for a in feats)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype

        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, stats_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, stats_dtype)
        count = self._count(training)

        scale = (
            self.param("scale", self.scale_init, feature_shape, self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias
            else None
        )
        # flax's output dtype: promoted from the input and the parameters that exist.
        out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        params = _params(scale, bias, feature_shape, self.param_dtype)
        if mask is not None:
            mask = jnp.asarray(mask, dtype=bool)

        if training and self.is_initializing():
            # flax neither updates the statistics nor synchronizes during init; the core's
            # building blocks reproduce that without the training-only batch-size check.
            m = core.moments(x, axis=self.axis, mask=mask, fast_variance=self.use_fast_variance)
            return core.normalize(
                x, m.mean, m.var, params, axis=self.axis, epsilon=self.epsilon, dtype=out_dtype
            )

        stats = core.BatchStats(
            ra_mean.value,
            ra_var.value,
            count.value if count is not None else jnp.zeros((), jnp.int32),
        )
        normalize = variants.select(
            renorm=self.renorm, r_max=self.renorm_r_max, d_max=self.renorm_d_max,
            virtual_batch_size=self.virtual_batch_size,
        )
        y, new_stats = normalize(
            x,
            params,
            stats,
            training=training,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            unbiased_running_var=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            fast_variance=self.use_fast_variance,
            dtype=out_dtype,
        )
        if training:
            ra_mean.value = new_stats.mean
            ra_var.value = new_stats.var
            if count is not None:
                count.value = new_stats.count
        return y

    def _count(self, training: bool) -> Any:
        """The ``batch_stats/count`` variable, declared only for ``momentum=None``."""
        if self.momentum is not None:
            return None
        if self.is_initializing():
            return self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
        if not training:
            return None
        if not self.has_variable("batch_stats", "count"):
            raise ValueError(
                "momentum=None (cumulative moving average) needs the number of updates so "
                "far in 'batch_stats/count' (an int32 scalar), got batch_stats without it "
                "(e.g. variables from flax.linen.BatchNorm); add it, e.g. "
                "batch_stats[...]['count'] = jnp.array(n, jnp.int32) with n the number of "
                "batches already averaged, or use a float momentum."
            )
        return self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)


def _params(
    scale: jax.Array | None, bias: jax.Array | None, shape: tuple[int, ...], dtype: Dtype
) -> core.BatchNormParams | None:
    """The core's affine parameters; a missing half is a constant (it gets no gradient)."""
    if scale is None and bias is None:
        return None
    return core.BatchNormParams(
        jnp.ones(shape, dtype) if scale is None else scale,
        jnp.zeros(shape, dtype) if bias is None else bias,
    )
