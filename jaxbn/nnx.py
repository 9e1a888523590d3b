"""``jaxbn.nnx.BatchNorm``: a drop-in replacement for :class:`flax.nnx.BatchNorm`.

The module is a thin shell: it holds flax's attributes (``scale``, ``bias`` as
:class:`flax.nnx.Param`; ``mean``, ``var`` as :class:`flax.nnx.BatchStat`) and hands the
arithmetic to the core (:func:`jaxbn.batch_norm` or a variant). ``nnx.state`` of a model
has the same structure with either module, so checkpoints are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers

from jaxbn import _modules, core

__all__ = ["BatchNorm", "BatchNormAct"]

Dtype = Any
Initializer = Any

# flax's defaults, created once (the same objects flax.nnx.BatchNorm uses).
_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()

_NO_MODE = (
    "No `use_running_average` argument was provided to BatchNorm. Pass it to the "
    "constructor (BatchNorm(..., use_running_average=True/False)), to the call "
    "(bn(x, use_running_average=True/False)), or set it with model.train() / model.eval() "
    "or nnx.view(model, use_running_average=True/False)."
)


class BatchNorm(nnx.Module):
    """Batch Normalization, a drop-in for :class:`flax.nnx.BatchNorm`.

    Every constructor and call argument of ``flax.nnx.BatchNorm`` is accepted with the same
    meaning and default, and the module has the same attributes, so ``model.train()``,
    ``model.eval()``, ``nnx.view`` and ``nnx.state`` behave as with flax's module and
    checkpoints are interchangeable. The computation is :func:`jaxbn.batch_norm` (or a
    variant).

    Differences from flax, all deliberate (the README's drop-in section lists them):

    * ``use_fast_variance`` defaults to ``False``, the stable two-pass variance, as in
      :class:`jaxbn.linen.BatchNorm`; pass ``use_fast_variance=True`` for flax's numerics.
    * The running statistics are used in float32 whatever ``dtype`` is: flax passes them
      through ``promote_dtype``, so with ``dtype=jnp.bfloat16`` its inference normalizes with
      a bfloat16-rounded mean (e.g. activations around 30 with spread 0.1 come out shifted
      by up to 0.2 standard deviations); here the arithmetic runs in float32 and only the
      output is cast. ``promote_dtype`` still decides the dtype of the input, ``scale`` and
      ``bias`` that enter the core, and the output dtype.
    * With a ``mask``, statistics are synchronized exactly over ``axis_name`` whatever the
      valid counts per device, and a feature with no valid element outputs ``bias`` and
      keeps its running statistics (flax: NaN).

    As in flax, one value per feature in training is allowed (variance 0, output ``bias``:
    ``nnx.tabulate(model, jnp.ones((1, n)))`` and ensembles vmapped over single examples
    work), and complex inputs are normalized (complex mean, real variance; the running mean
    keeps the dtype of the ``mean`` BatchStat, so a float32 one stores the real part, as
    flax's does: make it complex to keep the whole mean).

    Extras: ``momentum=None`` is PyTorch's cumulative moving average, which needs the number
    of updates so far; the module then has one more :class:`flax.nnx.BatchStat`, ``count``
    (int32 scalar), which exists only when ``momentum is None``.
    ``unbiased_running_var=True`` stores ``n / (n - 1)`` times the batch variance in the
    running variance, as PyTorch does. ``num_features`` may also be a tuple, the feature
    shape when ``axis`` is a tuple.

    Args:
      num_features: number of features ``C`` (the size of ``x`` along ``axis``).
      use_running_average: if True, normalize with the running statistics; may be
        overridden at call time, or set by ``train()``/``eval()``.
      axis: feature axis (or tuple of axes) of the input.
      momentum: decay of the running averages, ``new = momentum * old + (1 - momentum) *
        batch`` (PyTorch's 0.1 is 0.9 here), or ``None`` for the cumulative average.
      epsilon: added to the variance.
      dtype: output (and compute) dtype; default: promoted from the input and variables.
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: whether to add a learned bias (beta).
      use_scale: whether to multiply by a learned scale (gamma).
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: mapped axis (``vmap``, ``pmap``, ``shard_map`` and their nnx versions) to
        synchronize the batch statistics over; not needed under plain ``jit`` with sharded
        inputs.
      axis_index_groups: groups of indices of ``axis_name`` that synchronize separately.
      use_fast_variance: use ``E[x^2] - E[x]^2`` (flax's default) instead of the stable
        two-pass variance; see above.
      promote_dtype: flax's dtype promotion hook, called with ``(x, mean, var, scale,
        bias)`` and ``dtype=``; its promoted ``x``, ``scale`` and ``bias`` are used (the
        running statistics stay float32).
      rngs: random number generators for the initializers.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.
      unbiased_running_var: store ``n / (n - 1)`` times the batch variance, PyTorch's rule.
      renorm: train with :func:`jaxbn.batch_renorm` instead of plain BatchNorm.
      renorm_r_max: ``r_max`` of :func:`jaxbn.batch_renorm`.
      renorm_d_max: ``d_max`` of :func:`jaxbn.batch_renorm`.
      virtual_batch_size: train with :func:`jaxbn.ghost_batch_norm`, virtual batches of
        this many examples along axis 0.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import BatchNorm
    >>> bn = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (16, 3)) * 2 + 5
    >>> y = bn(x)  # training mode by default: batch statistics, running stats updated
    >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool((bn.mean[...] > 0.4).all())
    (True, True)
    >>> bn.eval()
    >>> y_eval = bn(x)  # running statistics, nothing updated
    >>> sorted(nnx.state(bn).keys())
    ['bias', 'mean', 'scale', 'var']
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        unbiased_running_var: bool = False,
        renorm: bool = False,
        renorm_r_max: float = 3.0,
        renorm_d_max: float = 5.0,
        virtual_batch_size: int | None = None,
    ):
        _, stats = core.init(num_features, affine=False)
        assert stats is not None
        feature_shape = stats.mean.shape
        self.mean = nnx.BatchStat(stats.mean)
        self.var = nnx.BatchStat(stats.var)
        if momentum is None:
            self.count = nnx.BatchStat(stats.count)

        # Same order of rng draws as flax, so models initialize identically.
        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            key = rngs.params()
            self.scale = nnx.Param(scale_init(key, feature_shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            key = rngs.params()
            self.bias = nnx.Param(bias_init(key, feature_shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.renorm = renorm
        self.renorm_r_max = renorm_r_max
        self.renorm_d_max = renorm_d_max
        self.virtual_batch_size = virtual_batch_size

    def __call__(self, x: jax.typing.ArrayLike, use_running_average: bool | None = None, *,
                 mask: jax.typing.ArrayLike | None = None) -> jax.Array:
        """Applies the layer: batch statistics in training, running ones in evaluation.

        Args:
          x: the array to normalize, features along ``axis``.
          use_running_average: if True, use the running statistics; takes precedence over
            the attribute of the same name.
          mask: optional array broadcastable to ``x`` (converted to bool); ``False``
            elements take no part in the statistics.

        Returns:
          The normalized input, of the shape of ``x``.

        Raises:
          ValueError: for ``momentum=None`` in training without a ``count`` statistic, and
            for whatever :func:`jaxbn.batch_norm` rejects (but one value per feature,
            which is allowed here as in flax).
        """
        return self._forward(x, use_running_average, mask, _modules.apply)

    def _forward(self, x: jax.typing.ArrayLike, use_running_average: bool | None,
                 mask: jax.typing.ArrayLike | None, run: Callable[..., Any]) -> jax.Array:
        """One call: the attributes in, ``run``'s arithmetic, the statistics updated.

        ``run`` is :func:`jaxbn._modules.apply` or a partial application of
        :func:`jaxbn._modules.apply_act`.
        """
        use_running_average = first_from(
            use_running_average, self.use_running_average, error_msg=_NO_MODE
        )
        training = not bool(use_running_average)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # flax's promotion hook decides the compute dtype of x, scale and bias; its promoted
        # running statistics are dropped on purpose (they would round to half precision).
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        count = getattr(self, "count", None)
        if training and self.momentum is None and count is None:
            raise _modules.count_missing(
                "a `count` BatchStat",
                "the module was built with a float momentum; set "
                "bn.count = nnx.BatchStat(jnp.array(n, jnp.int32))")
        stats = core.BatchStats(
            self.mean[...],
            self.var[...],
            count[...] if count is not None else jnp.zeros((), jnp.int32),
        )
        y, new_stats = run(self, x, _modules.params(scale, bias), stats, training=training,
                           mask=mask, dtype=out_dtype)
        if training:
            mean = new_stats.mean
            if jnp.iscomplexobj(mean) and not jnp.iscomplexobj(self.mean[...]):
                mean = mean.real  # a real BatchStat keeps the real part, as flax.nnx's does
            self.mean[...] = mean
            self.var[...] = new_stats.var
            if count is not None:
                count[...] = new_stats.count
        out: jax.Array = y
        return out

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored batch statistics will be used instead
            of computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average



class BatchNormAct(BatchNorm):
    """BatchNorm, residual add and activation in one layer: :func:`jaxbn.batch_norm_act`.

    ``bn(x, residual)`` computes ``activation(BatchNorm(...)(x) + residual)`` with the
    memory-saving derivative rule of :mod:`jaxbn.fused`. It takes every argument of
    :class:`BatchNorm` and has the same attributes (``scale``, ``bias``, ``mean``,
    ``var``), so ``nnx.state`` of a model is the same with a ``BatchNorm`` followed by
    ``nnx.relu`` in its place, and checkpoints are interchangeable. With ``renorm`` or
    ``virtual_batch_size`` the chain runs unfused (same result, no memory saving).
    :func:`jaxbn.precise_nnx.precise_batch_stats` treats it as a BatchNorm, and
    :func:`jaxbn.fold` folds its statistics as a BatchNorm's: inference is
    ``activation(x * a + b + residual)``.

    Args:
      num_features: number of features ``C``.
      activation: ``"relu"``, ``"leaky_relu"``, ``"identity"`` or an elementwise callable
        (see :func:`jaxbn.batch_norm_act` for what each keeps for the backward pass).
      negative_slope: ``"leaky_relu"``'s slope for negative inputs.
      **kwargs: every other argument of :class:`BatchNorm` (``rngs`` included).

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import BatchNormAct
    >>> bn = BatchNormAct(16, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    >>> y = bn(x, x)  # relu(bn(x) + x), running statistics updated
    >>> bool((y >= 0).all()), sorted(nnx.state(bn).keys())
    (True, ['bias', 'mean', 'scale', 'var'])
    """

    def __init__(self, num_features: int | Sequence[int], *,
                 activation: str | Callable[[jax.Array], jax.Array] = "relu",
                 negative_slope: float = 0.01, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope

    def __call__(  # type: ignore[override]
        self, x: jax.typing.ArrayLike, residual: jax.typing.ArrayLike | None = None,
        use_running_average: bool | None = None, *, mask: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """``activation(normalized x + residual)`` with batch or running statistics.

        Args:
          x: the array to normalize, features along ``axis``.
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
        return self._forward(x, use_running_average, mask, run)
