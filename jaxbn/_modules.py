"""What :mod:`jaxbn.linen` and :mod:`jaxbn.nnx` share: the arithmetic of one call.

Both modules hold their variables the flax way and hand everything else to
:func:`apply`, which picks the core function for the module's options. No flax import
here: the modules pass themselves in, read through the :class:`Options` protocol.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks, core, fused, variants

__all__ = ["Options", "act_runner", "apply", "apply_act", "count_missing", "params",
           "synced_moments"]


class Options(Protocol):
    """The module attributes :func:`apply` reads (both modules' flax-named options).

    Read-only here, so that each module may declare them with narrower types.
    """

    @property
    def axis(self) -> core.Axis: ...
    @property
    def momentum(self) -> float | None: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def axis_name(self) -> core.AxisName | None: ...
    @property
    def axis_index_groups(self) -> Any: ...
    @property
    def use_fast_variance(self) -> bool: ...
    @property
    def unbiased_running_var(self) -> bool: ...
    @property
    def renorm(self) -> bool: ...
    @property
    def renorm_r_max(self) -> float: ...
    @property
    def renorm_d_max(self) -> float: ...
    @property
    def virtual_batch_size(self) -> int | None: ...


def params(scale: jax.Array | None, bias: jax.Array | None) -> core.BatchNormParams | None:
    """The core's affine parameters; a missing half is a constant (it gets no gradient).

    Args:
      scale: the module's scale, or ``None`` (``use_scale=False``).
      bias: the module's bias, or ``None`` (``use_bias=False``).

    Returns:
      :class:`jaxbn.BatchNormParams`, or ``None`` when both are missing.

    Example:

    >>> import jax.numpy as jnp
    >>> params(None, jnp.zeros(2)).scale
    Array([1., 1.], dtype=float32)
    """
    if scale is None and bias is None:
        return None
    ref = scale if scale is not None else bias
    assert ref is not None
    return core.BatchNormParams(
        jnp.ones_like(ref) if scale is None else scale,
        jnp.zeros_like(ref) if bias is None else bias,
    )


def count_missing(where: str, fix: str) -> ValueError:
    """The error for ``momentum=None`` without the number of updates so far.

    Args:
      where: where the count was expected, e.g. ``"'batch_stats/count'"``.
      fix: how to add it.

    Returns:
      The ``ValueError`` to raise.

    Example:

    >>> 'momentum=None' in str(count_missing("'batch_stats/count'", "add it"))
    True
    """
    return ValueError(
        f"momentum=None (cumulative moving average) needs the number of updates so far in "
        f"{where} (an int32 scalar), got none; {fix} with n the number of batches already "
        f"averaged, or use a float momentum."
    )


def synced_moments(
    x: jax.Array,
    *,
    axis: core.Axis,
    axis_name: core.AxisName | None,
    axis_index_groups: Any = None,
) -> core.Moments:
    """:func:`jaxbn.moments` of equal-sized members of ``axis_name``, cheap under ``vmap``.

    Every member holds an input of the same shape (no mask), so each holds the same count
    ``n`` and the exact merge of the members' moments (Chan et al.'s rule, as in
    :func:`jaxbn.moments`) is two sums: ``mean = sum_i mean_i / k`` and
    ``M2 = sum_i (n var_i + n |mean_i - mean|^2)`` over the ``k`` members. The
    one-collective gather of :func:`jaxbn.moments` holds one slot per member on every
    member, which under ``vmap`` (equinox's per-example layers, haiku's
    ``cross_replica_axis`` under ``vmap``) is ``batch**2`` times the statistics; these sums
    hold one. Differentiable (plain autodiff).

    Args:
      x: the local input.
      axis: feature axis or axes.
      axis_name: the mapped axis (or tuple of axes) to merge over, or ``None``.
      axis_index_groups: groups of ``axis_name`` that merge separately (``pmap`` only).

    Returns:
      The merged :class:`jaxbn.Moments`, equal on every member.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.0], [3.0], [8.0]])
    >>> m = jax.vmap(lambda e: synced_moments(e, axis=0, axis_name="b"),
    ...              axis_name="b", out_axes=None)(x)
    >>> m.mean, m.var, m.count
    (Array([4.], dtype=float32), Array([8.666667], dtype=float32), Array([3.], dtype=float32))
    """
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        # Widened here, explicitly, so that strict dtype promotion accepts half precision
        # (XLA fuses the conversion into the reductions).
        x = x.astype(jnp.float32)
    local = core.moments(x, axis=axis)
    if axis_name is None:
        return local
    groups = _checks._check_axis_name(axis_name, axis_index_groups)
    k = len(groups[0]) if groups is not None else lax.axis_size(axis_name)

    def psum(v: jax.Array) -> jax.Array:
        if groups is not None or not isinstance(axis_name, tuple):
            summed: jax.Array = lax.psum(v, axis_name, axis_index_groups=groups)
            return summed
        # One name at a time: one psum over a shard_map axis and a vmap axis together
        # fails jax's varying-axes check (vmap nested in shard_map, equinox's pattern).
        for name in axis_name:
            v = lax.psum(v, name)
        return v

    mean = psum(local.mean) / k
    dev = local.mean - mean
    total = local.count * k
    m2 = psum(local.count * (local.var + jnp.real(dev * jnp.conj(dev))))
    return core.Moments(mean, m2 / jnp.maximum(total, 1), total)


def _one_value_per_feature(x: jax.Array, axis: core.Axis) -> bool:
    feats = core.feature_axes(x.ndim, axis)
    return math.prod(n for a, n in enumerate(x.shape) if a not in feats) <= 1


def apply(
    module: Options,
    x: jax.typing.ArrayLike,
    params: core.BatchNormParams | None,
    stats: core.BatchStats,
    *,
    training: bool,
    mask: jax.typing.ArrayLike | None,
    dtype: Any,
    initializing: bool = False,
) -> tuple[jax.Array, core.BatchStats]:
    """One BatchNorm call with the module's options; returns ``(y, new_stats)``.

    Follows flax where it differs from the functional :func:`jaxbn.batch_norm`: training
    with one value per feature (no ``axis_name``) is allowed — variance 0, output
    ``bias``, running statistics updated — and during initialization (``initializing``)
    the statistics are neither synchronized nor updated.

    Args:
      module: the module, for its options.
      x: the input.
      params: the affine parameters, or ``None``.
      stats: the running statistics.
      training: use batch statistics and update the running ones.
      mask: optional mask, converted to bool.
      dtype: the output dtype.
      initializing: linen's ``init``: no synchronization, ``stats`` returned unchanged.

    Returns:
      The output and the running statistics to store.

    Example:

    >>> import types, jax.numpy as jnp, jaxbn
    >>> opts = types.SimpleNamespace(
    ...     axis=-1, momentum=0.9, epsilon=1e-5, axis_name=None, axis_index_groups=None,
    ...     use_fast_variance=False, unbiased_running_var=False, renorm=False,
    ...     renorm_r_max=3.0, renorm_d_max=5.0, virtual_batch_size=None)
    >>> y, s = apply(opts, jnp.array([[4.0, 5.0]]), *jaxbn.init(2), training=True, mask=None,
    ...              dtype=jnp.float32)
    >>> y, s.mean
    (Array([[0., 0.]], dtype=float32), Array([0.4, 0.5], dtype=float32))
    """
    x = jnp.asarray(x)
    mask = None if mask is None else jnp.asarray(mask, dtype=bool)
    common: dict[str, Any] = dict(axis=module.axis, epsilon=module.epsilon, mask=mask,
                                  fast_variance=module.use_fast_variance, dtype=dtype)
    if training and (initializing or (module.axis_name is None
                                      and _one_value_per_feature(x, module.axis))):
        renorm = None
        if module.renorm and not initializing:
            renorm = core.Renorm(stats.mean, stats.var, module.renorm_r_max,
                                 module.renorm_d_max)
        y, m = core.batch_normalize(x, params, renorm=renorm, **common)
        if initializing:
            return y, stats
        new = core.update_stats(stats, m, momentum=module.momentum,
                                unbiased_running_var=module.unbiased_running_var)
        return y, jax.tree.map(lax.stop_gradient, new)
    normalize = variants.select(renorm=module.renorm, r_max=module.renorm_r_max,
                                d_max=module.renorm_d_max,
                                virtual_batch_size=module.virtual_batch_size)
    y, new_stats = normalize(x, params, stats, training=training, momentum=module.momentum,
                             unbiased_running_var=module.unbiased_running_var,
                             axis_name=module.axis_name,
                             axis_index_groups=module.axis_index_groups, **common)
    assert new_stats is not None
    return y, new_stats


def apply_act(
    module: Options,
    x: jax.typing.ArrayLike,
    residual: jax.typing.ArrayLike | None,
    params: core.BatchNormParams | None,
    stats: core.BatchStats,
    *,
    activation: Any,
    negative_slope: float,
    training: bool,
    mask: jax.typing.ArrayLike | None,
    dtype: Any,
    initializing: bool = False,
) -> tuple[jax.Array, core.BatchStats]:
    """:func:`apply` followed by ``activation(y + residual)``, fused where the core can.

    Plain BatchNorm runs as :func:`jaxbn.batch_norm_act` (one derivative rule, the memory
    saving); Batch Renormalization and Ghost BatchNorm run unfused, as :func:`apply` and
    the activation one after the other, with the same result.

    Args:
      module: the module, for its options.
      x: the input.
      residual: added before the activation, or ``None``.
      params: the affine parameters, or ``None``.
      stats: the running statistics.
      activation: as :func:`jaxbn.batch_norm_act` takes it.
      negative_slope: leaky ReLU's slope.
      training: use batch statistics and update the running ones.
      mask: optional mask, converted to bool.
      dtype: the dtype of the normalized values.
      initializing: linen's ``init``: no synchronization, ``stats`` returned unchanged.

    Returns:
      The activated output and the running statistics to store.

    Example:

    >>> import types, jax.numpy as jnp, jaxbn
    >>> opts = types.SimpleNamespace(
    ...     axis=-1, momentum=0.9, epsilon=1e-12, axis_name=None, axis_index_groups=None,
    ...     use_fast_variance=False, unbiased_running_var=False, renorm=False,
    ...     renorm_r_max=3.0, renorm_d_max=5.0, virtual_batch_size=None)
    >>> y, s = apply_act(opts, jnp.array([[4.0], [6.0]]), jnp.array([[-1.0], [1.0]]),
    ...                  *jaxbn.init(1), activation="relu", negative_slope=0.01,
    ...                  training=True, mask=None, dtype=jnp.float32)
    >>> y[:, 0], s.mean
    (Array([0., 2.], dtype=float32), Array([0.5], dtype=float32))
    """
    x = jnp.asarray(x)
    act = fused._activation(activation, negative_slope)
    r = fused._check_residual(residual, x)
    mask = None if mask is None else jnp.asarray(mask, dtype=bool)
    if module.renorm or module.virtual_batch_size is not None or not training:
        y, new_stats = apply(module, x, params, stats, training=training, mask=mask,
                             dtype=dtype, initializing=initializing)
        return fused._finish(act, y, r), new_stats
    common: dict[str, Any] = dict(
        activation=activation, negative_slope=negative_slope, residual=r, axis=module.axis,
        epsilon=module.epsilon, mask=mask, fast_variance=module.use_fast_variance,
        dtype=dtype)
    if initializing or (module.axis_name is None and _one_value_per_feature(x, module.axis)):
        out, m = fused.batch_normalize_act(x, params, **common)
        if initializing:
            return out, stats
        new = core.update_stats(stats, m, momentum=module.momentum,
                                unbiased_running_var=module.unbiased_running_var)
        return out, jax.tree.map(lax.stop_gradient, new)
    out, fresh = fused.batch_norm_act(
        x, params, stats, training=True, momentum=module.momentum,
        unbiased_running_var=module.unbiased_running_var, axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups, **common)
    assert fresh is not None
    return out, fresh


def act_runner(residual: Any) -> Any:
    """What a ``BatchNormAct`` module's ``__call__`` runs: :func:`apply_act` with ``residual``
    and the module's ``activation`` and ``negative_slope``.

    Raises:
      TypeError: for a bool ``residual`` (``use_running_average`` passed in its place).
    """
    if isinstance(residual, bool):
        raise TypeError(
            "residual must be an array or None, got a bool; pass use_running_average by "
            "keyword (BatchNormAct's second argument is the residual).")

    def run(module: Any, x: jax.Array, params: Any, stats: core.BatchStats,
            **kw: Any) -> tuple[jax.Array, core.BatchStats]:
        return apply_act(module, x, residual, params, stats, activation=module.activation,
                         negative_slope=module.negative_slope, **kw)

    return run
