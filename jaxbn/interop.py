"""PyTorch interop and inference-time folding.

Two groups of pure functions:

* **PyTorch state.** :func:`from_torch` reads one ``nn.BatchNorm{1,2,3}d`` layer (the module
  or its ``state_dict()``) into ``(params, stats)``; :func:`to_torch` writes them back as a
  ``state_dict`` of NumPy arrays; :func:`torch_kwargs` gives the keyword arguments that make
  :func:`jaxbn.batch_norm` compute what the PyTorch layer computes.
* **Folding.** At inference BatchNorm is a per-channel affine map ``y = x * a + b``
  (:func:`jaxbn.fold`), which can be merged into the weights of a neighbouring linear layer:
  :func:`fold_into_conv` and :func:`fold_into_dense` for a layer *followed* by BN,
  :func:`fold_into_next_conv` and :func:`fold_into_next_dense` for a layer *preceded* by BN.

This module never imports torch: tensors are recognised by their ``detach``/``cpu``/``numpy``
methods, so everything here also works on NumPy arrays where torch is not installed.

Conventions, PyTorch against jaxbn:

==========================  =============================  ===================================
PyTorch                     jaxbn                          note
==========================  =============================  ===================================
``momentum=m``              ``momentum=1 - m``             flax's convention: weight of *old*
``momentum=None``           ``momentum=None``              cumulative average (uses ``count``)
``eps``                     ``epsilon``                    same default, 1e-5
(always)                    ``unbiased_running_var=True``  running var keeps ``n/(n-1)`` var
``(N, C, ...)`` layout      ``axis=1``                     flax's NHWC layout is ``axis=-1``
``weight``, ``bias``        ``params.scale``, ``.bias``    ``None`` when ``affine=False``
``running_mean``, ``_var``  ``stats.mean``, ``.var``       ``None`` without running stats
``num_batches_tracked``     ``stats.count``                int64 there, int32 here
==========================  =============================  ===================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from jaxbn.core import BatchNormParams, BatchStats, fold

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike

__all__ = [
    "TORCH_KEYS",
    "commutes_with_max_pool",
    "fold_into_conv",
    "fold_into_dense",
    "fold_into_next_conv",
    "fold_into_next_dense",
    "from_torch",
    "to_torch",
    "torch_kwargs",
]

#: The ``state_dict`` keys of a PyTorch BatchNorm layer, in PyTorch's order.
TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

_INT32_MAX = int(np.iinfo(np.int32).max)


# ----------------------------------------------------------------------------------------
# PyTorch state.


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """A torch tensor, NumPy array or jax array as a NumPy array (bfloat16 kept exactly)."""
    if all(hasattr(value, m) for m in ("detach", "cpu", "numpy")):  # A torch tensor.
        if getattr(value, "is_meta", False):
            raise ValueError(
                f"{name}: expected a tensor with data, got one on the 'meta' device (a module "
                f"built under torch.device('meta') has no values yet); materialize it first, "
                f"e.g. module.to_empty(device='cpu') then load_state_dict(...)."
            )
        t = value.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            # NumPy has no bfloat16: go through float32, which holds every bfloat16 exactly.
            return np.asarray(t.float().numpy()).astype(jnp.bfloat16)
        return np.asarray(t.numpy())
    try:
        return np.asarray(value)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(
            f"{name}: expected a torch tensor or an array, got {type(value).__name__}."
        ) from e


def _state_dict(state: Any, prefix: str) -> dict[str, Any]:
    """The layer's entries of a ``state_dict`` (or of a module's), without ``prefix``."""
    if not isinstance(state, Mapping):
        if not callable(getattr(state, "state_dict", None)):
            raise ValueError(
                f"from_torch expects a BatchNorm module or its state_dict(), got "
                f"{type(state).__name__}."
            )
        # PyTorch's BatchNorm classes (1d/2d/3d, Sync, Lazy) all derive from _BatchNorm;
        # InstanceNorm shares its state layout but not its computation.
        bases = [c.__name__ for c in type(state).__mro__]
        if "_BatchNorm" not in bases:
            raise ValueError(
                f"from_torch expects a BatchNorm module (nn.BatchNorm1d/2d/3d, SyncBatchNorm), "
                f"got {type(state).__name__}, which normalizes differently."
            )
        state = state.state_dict()
        if not state:  # BatchNorm(affine=False, track_running_stats=False): no state at all
            return {}
    meta = getattr(state, "_metadata", None)
    keys = list(state)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(
                f"no key of the state_dict starts with prefix {prefix!r}; expected keys "
                f"such as {prefix}running_mean, got {keys[:6]}{' ...' if len(keys) > 6 else ''}."
            )
    if not state:
        raise ValueError(
            f"from_torch got an empty state: expected BatchNorm keys (a subset of "
            f"{list(TORCH_KEYS)}), got none; a BatchNorm with neither affine parameters nor "
            f"running statistics has an empty state_dict, so pass the module itself."
        )
    unknown = sorted(set(state) - set(TORCH_KEYS))
    if unknown:
        hint = (" (a whole model's state_dict? pass prefix='...' naming the layer, e.g. "
                "'conv.2.')" if any("." in k for k in unknown) else "")
        raise ValueError(
            f"unexpected BatchNorm state_dict keys {unknown}: expected a subset of "
            f"{list(TORCH_KEYS)}{hint}."
        )
    # A state_dict() records each module's class version: BatchNorm's is 2 (1 before
    # PyTorch 0.4.1, always with running statistics); LayerNorm's and GroupNorm's, 1.
    version = None
    if isinstance(meta, Mapping):
        version = (meta.get(prefix[:-1] if prefix.endswith(".") else prefix) or {}).get("version")
    if version is not None and version < 2 and "running_mean" not in state:
        raise ValueError(
            f"the state at prefix {prefix!r} is not a BatchNorm's: its module has version "
            f"{version} and no running statistics (a LayerNorm or GroupNorm?); expected a "
            f"BatchNorm state_dict (version 2)."
        )
    return dict(state)


def _vector(name: str, value: Any) -> np.ndarray:
    arr = _to_numpy(name, value)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array of shape (C,), got shape {arr.shape}.")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got dtype {arr.dtype}.")
    return arr


def from_torch(
    state: Any, *, prefix: str = ""
) -> tuple[BatchNormParams | None, BatchStats | None]:
    """Converts one PyTorch BatchNorm layer's state into jaxbn's ``(params, stats)``.

    Accepts what PyTorch produces for ``nn.BatchNorm1d``/``2d``/``3d`` (and
    ``SyncBatchNorm``): ``affine=False`` layers have no ``weight``/``bias`` and give
    ``params=None``; ``track_running_stats=False`` layers have no running statistics and give
    ``stats=None``; state saved before PyTorch 0.4.1 has no ``num_batches_tracked`` and gives
    ``count=0``.

    Args:
      state: the module itself, its ``state_dict()``, or any mapping from the keys in
        :data:`TORCH_KEYS` to torch tensors or NumPy arrays.
      prefix: only the keys starting with ``prefix`` are read, with the prefix removed, so a
        whole model's ``state_dict`` can be passed with e.g. ``prefix='conv.2.'``.

    Returns:
      ``(params, stats)``: a :class:`~jaxbn.BatchNormParams` of jax arrays in the tensors'
      dtype (float64 becomes float32 unless ``jax_enable_x64`` is on), or ``None``; and a
      :class:`~jaxbn.BatchStats` with the running mean and variance and an int32 ``count``,
      or ``None``.

    A module is checked to be a BatchNorm (LayerNorm, GroupNorm and InstanceNorm are
    refused). A ``state_dict()`` carries its modules' versions, which tells LayerNorm and
    GroupNorm state apart; InstanceNorm state with running statistics has BatchNorm's very
    layout and version, so only its module can be told apart.

    Raises:
      ValueError: for a module that is not a BatchNorm, a state that is empty or has no key
        under ``prefix``, LayerNorm/GroupNorm state, a tensor on the ``meta`` device (no
        data), an unknown key, ``weight`` without ``bias`` (or the reverse),
        ``running_mean`` without ``running_var`` (or the reverse), ``num_batches_tracked``
        without running statistics, arrays that are not 1-d floating point of one common
        length, or a ``num_batches_tracked`` that is not a non-negative integer scalar that
        fits int32.

    Example:

    >>> import numpy as np
    >>> state = {'weight': np.array([2.0, 1.0], np.float32), 'bias': np.zeros(2, np.float32),
    ...          'running_mean': np.array([0.5, -1.0], np.float32),
    ...          'running_var': np.array([4.0, 1.0], np.float32),
    ...          'num_batches_tracked': np.array(7)}
    >>> params, stats = from_torch(state)
    >>> params.scale, stats.mean, stats.count
    (Array([2., 1.], dtype=float32), Array([ 0.5, -1. ], dtype=float32), Array(7, dtype=int32))
    >>> from_torch({'running_mean': np.zeros(3), 'running_var': np.ones(3)})[0] is None
    True
    """
    sd = _state_dict(state, prefix)
    has = {k: k in sd and sd[k] is not None for k in TORCH_KEYS}
    for a, b in (("weight", "bias"), ("running_mean", "running_var")):
        if has[a] != has[b]:
            there, missing = (a, b) if has[a] else (b, a)
            raise ValueError(
                f"BatchNorm state has {there!r} but not {missing!r}: PyTorch stores both or "
                f"neither (affine / track_running_stats); got keys {sorted(sd)}."
            )
    if has["num_batches_tracked"] and not has["running_mean"]:
        raise ValueError(
            "BatchNorm state has 'num_batches_tracked' but no running statistics: expected "
            f"'running_mean' and 'running_var' beside it; got keys {sorted(sd)}."
        )
    vectors = {k: _vector(prefix + k, sd[k]) for k in TORCH_KEYS[:4] if has[k]}
    lengths = {k: v.shape[0] for k, v in vectors.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"BatchNorm state arrays must all have shape (C,) for one C, got lengths {lengths}."
        )

    params = None
    if has["weight"]:
        params = BatchNormParams(jnp.asarray(vectors["weight"]), jnp.asarray(vectors["bias"]))
    stats = None
    if has["running_mean"]:
        count = 0
        if has["num_batches_tracked"]:
            nbt = _to_numpy(prefix + "num_batches_tracked", sd["num_batches_tracked"])
            if nbt.size != 1 or not jnp.issubdtype(nbt.dtype, jnp.integer):
                raise ValueError(
                    f"{prefix}num_batches_tracked: expected an integer scalar, got shape "
                    f"{nbt.shape} and dtype {nbt.dtype}."
                )
            count = int(nbt.reshape(()))
            if not 0 <= count <= _INT32_MAX:
                raise ValueError(
                    f"{prefix}num_batches_tracked: expected a value in [0, {_INT32_MAX}] "
                    f"(stats.count is int32), got {count}."
                )
        stats = BatchStats(
            jnp.asarray(vectors["running_mean"]),
            jnp.asarray(vectors["running_var"]),
            jnp.asarray(count, jnp.int32),
        )
    return params, stats


def to_torch(
    params: BatchNormParams | None, stats: BatchStats | None, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Converts ``(params, stats)`` into a PyTorch BatchNorm ``state_dict`` of NumPy arrays.

    The inverse of :func:`from_torch`: the arrays keep their dtype and values bit for bit,
    and ``num_batches_tracked`` is an int64 scalar as in PyTorch. Load into a module with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})`` (for
    bfloat16 parameters use ``torch.tensor(v.astype(np.float32)).bfloat16()``).

    Args:
      params: the affine parameters, or ``None`` (an ``affine=False`` layer).
      stats: the running statistics, or ``None`` (a ``track_running_stats=False`` layer).
      prefix: prepended to every key, e.g. ``'conv.2.'`` to build a model's state_dict.

    Returns:
      A dict with ``weight`` and ``bias`` (when ``params`` is given) and ``running_mean``,
      ``running_var`` and ``num_batches_tracked`` (when ``stats`` is given).

    Raises:
      ValueError: if the arrays are not 1-d of one common length.

    Example:

    >>> import jaxbn
    >>> params, stats = jaxbn.init(2)
    >>> state = to_torch(params, stats, prefix='bn.')
    >>> sorted(state)
    ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var', 'bn.weight']
    >>> state['bn.num_batches_tracked']
    array(0)
    """
    out: dict[str, np.ndarray] = {}
    if params is not None:
        out["weight"] = np.array(params.scale)
        out["bias"] = np.array(params.bias)
    if stats is not None:
        out["running_mean"] = np.array(stats.mean)
        out["running_var"] = np.array(stats.var)
        out["num_batches_tracked"] = np.array(stats.count, dtype=np.int64).reshape(())
    shapes = {k: v.shape for k, v in out.items() if k != "num_batches_tracked"}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) > 1:
        raise ValueError(
            f"to_torch expects params and stats arrays of one shape (C,), got shapes {shapes}."
        )
    return {prefix + k: v for k, v in out.items()}


def torch_kwargs(momentum: float | None = 0.1, eps: float = 1e-5) -> dict[str, Any]:
    """Keyword arguments that make :func:`jaxbn.batch_norm` match ``nn.BatchNorm{1,2,3}d``.

    ``jaxbn.batch_norm(x, params, stats, training=t, **torch_kwargs(m, eps))`` on an
    ``(N, C, ...)`` input computes what ``nn.BatchNorm*d(C, eps=eps, momentum=m)`` computes in
    ``train()`` (``t=True``) or ``eval()`` (``t=False``) mode, running statistics included.
    With :func:`from_torch` state, ``affine`` and ``track_running_stats`` follow from
    ``params``/``stats`` being ``None``.

    Args:
      momentum: PyTorch's momentum (weight of the *new* batch), or ``None`` for PyTorch's
        cumulative moving average.
      eps: PyTorch's ``eps``.

    Returns:
      ``{'axis': 1, 'momentum': 1 - momentum (or None), 'unbiased_running_var': True,
      'epsilon': eps}``.

    Raises:
      TypeError: if ``momentum`` or ``eps`` is not a real number (a string, a bool, an
        array that is not a concrete scalar).
      ValueError: if ``momentum`` is outside [0, 1] or ``eps <= 0``.

    Example:

    >>> torch_kwargs()
    {'axis': 1, 'momentum': 0.9, 'unbiased_running_var': True, 'epsilon': 1e-05}
    >>> torch_kwargs(None, eps=1e-3)['momentum'] is None
    True
    """
    m = None if momentum is None else _real_number("momentum", momentum)
    if m is not None and not 0.0 <= m <= 1.0:
        raise ValueError(
            f"momentum: expected PyTorch's momentum in [0, 1] or None, got {momentum!r}."
        )
    e = _real_number("eps", eps)
    if not e > 0.0:
        raise ValueError(f"eps: expected a value > 0, got {eps!r}.")
    return {
        "axis": 1,
        # Rounded so that 0.1 gives 0.9, not 0.9000000000000000222; the float32 maths of
        # the update cannot tell the difference.
        "momentum": None if m is None else round(1.0 - m, 15),
        "unbiased_running_var": True,
        "epsilon": e,
    }


def _real_number(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (or a concrete real scalar array)."""
    if isinstance(value, np.ndarray | np.generic | jax.Array) and not isinstance(
        value, np.bool_ | Tracer
    ) and np.shape(value) == () and (np.issubdtype(value.dtype, np.floating)
                                     or np.issubdtype(value.dtype, np.integer)):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} "
                        f"{value!r}; pass e.g. a Python float.")
    return float(value)


# ----------------------------------------------------------------------------------------
# Folding for inference.


def _check_kernel(fn: str, kernel: Array, axis: int, channels: int, what: str) -> None:
    if kernel.ndim < 2:
        raise ValueError(f"{fn}: expected a kernel of rank >= 2, got shape {kernel.shape}.")
    if kernel.shape[axis] != channels:
        raise ValueError(
            f"{fn}: the BatchNorm has {channels} features but the kernel of shape "
            f"{kernel.shape} has {kernel.shape[axis]} {what}; expected them to be equal."
        )


def _bias_or_zeros(fn: str, bias: ArrayLike | None, kernel: Array) -> Array:
    out = kernel.shape[-1]
    if bias is None:
        return jnp.zeros((out,), kernel.dtype)
    bias = jnp.asarray(bias)
    if bias.shape != (out,):
        raise ValueError(
            f"{fn}: expected a bias of shape ({out},) for a kernel of shape {kernel.shape}, "
            f"got {bias.shape}."
        )
    return bias


def _affine(params: BatchNormParams | None, stats: Any, epsilon: float) -> tuple[Array, Array]:
    if stats is None:
        raise ValueError(
            "cannot fold a BatchNorm without running statistics (stats is None, PyTorch's "
            "track_running_stats=False): it normalizes with each batch's statistics, which "
            "no fixed affine map reproduces."
        )
    return fold(params, stats, epsilon=epsilon)


def commutes_with_max_pool(
    params: BatchNormParams | None, stats: BatchStats, *, epsilon: float = 1e-5
) -> bool:
    """Whether the layer's inference affine ``x * a + b`` commutes with max-pooling.

    ``max(x_i * a + b) = max(x_i) * a + b`` holds for every input exactly when ``a >= 0``
    (in floating point too: rounding is monotone); with ``a < 0`` the max becomes a min.
    So BN after a max-pool can be folded into the convolution before the pool exactly when
    every channel's ``a = scale / sqrt(var + epsilon)`` is non-negative, i.e. every
    ``scale >= 0``.

    Args:
      params: affine parameters, or ``None``.
      stats: running statistics (concrete arrays, not traced).
      epsilon: the layer's epsilon.

    Returns:
      A Python bool.

    Example:

    >>> import jax.numpy as jnp, jaxbn
    >>> params, stats = jaxbn.init(2)
    >>> commutes_with_max_pool(params, stats)
    True
    >>> commutes_with_max_pool(params._replace(scale=jnp.array([1.0, -0.5])), stats)
    False
    """
    a, _ = _affine(params, stats, epsilon)
    if isinstance(a, Tracer):
        raise ValueError(
            "commutes_with_max_pool needs concrete parameters to inspect their signs, got "
            "traced values; call it outside jit."
        )
    return bool(jnp.all(a >= 0))


def fold_into_conv(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: BatchNormParams | None,
    stats: BatchStats,
    *,
    epsilon: float = 1e-5,
    through_max_pool: bool = False,
) -> tuple[Array, Array]:
    """Folds an inference BatchNorm into the convolution that feeds it.

    For ``conv(x) = x * kernel + bias`` (flax layout: kernel ``(..., in, out)``, e.g. HWIO)
    followed by BN over its ``out`` channels, BN's affine ``y = z * a + b``
    (:func:`jaxbn.fold`) is merged into the weights::

        kernel' = kernel * a          (scaling the output-channel axis)
        bias'   = bias * a + b

    so that ``conv'(x) = bn(conv(x))`` up to rounding.

    **Max-pool in between.** The seed's LeNet (and many others) has
    ``conv -> max_pool -> BN``. ``max`` commutes with ``z * a + b`` exactly when ``a >= 0``;
    for ``a < 0`` the max of the scaled values is the scaled *min*. With
    ``through_max_pool=True`` this function checks the signs and folds only when every
    ``a >= 0`` (then ``max_pool(conv'(x)) = bn(max_pool(conv(x)))`` exactly up to rounding),
    and raises ``ValueError`` otherwise. The fallback is then to keep the BN as a separate
    per-channel affine after the pool (``y = pooled * a + b`` with ``jaxbn.fold``), which is
    what :mod:`train.export` does; :func:`commutes_with_max_pool` tells in advance.

    Args:
      kernel: the convolution kernel, output channels last (``(H, W, I, O)``; any rank).
      bias: the convolution bias of shape ``(O,)``, or ``None`` (a bias is created).
      params: the BN's affine parameters, or ``None``.
      stats: the BN's running statistics.
      epsilon: the BN's epsilon.
      through_max_pool: the BN follows a max-pool of the conv's output; check that folding
        across it is exact. Needs concrete (not traced) values.

    Returns:
      ``(kernel', bias')`` in the dtypes of ``kernel`` (``bias'`` in the bias' dtype).

    Raises:
      ValueError: if the shapes disagree, ``stats`` is ``None``, or ``through_max_pool`` and
        some channel has ``a < 0`` (or the values are traced).

    Example:

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> kernel = jnp.sin(jnp.arange(72.0)).reshape(3, 3, 2, 4)
    >>> bias = jnp.zeros(4)
    >>> params, stats = jaxbn.init(4)
    >>> stats = stats._replace(mean=jnp.arange(4.0), var=jnp.full(4, 4.0))
    >>> k, b = fold_into_conv(kernel, bias, params, stats, through_max_pool=True)
    >>> x = jnp.cos(jnp.arange(50.0)).reshape(1, 5, 5, 2)
    >>> conv = lambda x, k, b: jax.lax.conv_general_dilated(
    ...     x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
    >>> y_bn, _ = jaxbn.batch_norm(conv(x, kernel, bias), params, stats, training=False)
    >>> bool(jnp.allclose(conv(x, k, b), y_bn, atol=1e-5))
    True
    """
    kernel = jnp.asarray(kernel)
    a, b = _affine(params, stats, epsilon)
    _check_kernel("fold_into_conv", kernel, -1, a.shape[0], "output channels (last axis)")
    bias = _bias_or_zeros("fold_into_conv", bias, kernel)
    if through_max_pool:
        if isinstance(a, Tracer):
            raise ValueError(
                "fold_into_conv(through_max_pool=True) must inspect the signs of the folded "
                "scale, got traced values; call it outside jit."
            )
        negative = np.flatnonzero(np.asarray(a) < 0)
        if negative.size:
            raise ValueError(
                f"cannot fold BatchNorm through a max-pool: max(z * a + b) = max(z) * a + b "
                f"needs every a = scale / sqrt(var + eps) >= 0, got a < 0 for channels "
                f"{negative.tolist()}; keep the BN as a separate affine after the pool "
                f"(a, b = jaxbn.fold(params, stats, epsilon=...))."
            )
    new_kernel = (kernel * a).astype(kernel.dtype)
    new_bias = (bias * a + b).astype(bias.dtype)
    return new_kernel, new_bias


def fold_into_dense(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: BatchNormParams | None,
    stats: BatchStats,
    *,
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an inference BatchNorm into the dense layer that feeds it.

    For ``dense(x) = x @ kernel + bias`` with a flax ``(in, out)`` kernel followed by BN
    over the ``out`` features: ``kernel' = kernel * a``, ``bias' = bias * a + b``.

    Args:
      kernel: ``(in, out)`` kernel (a PyTorch ``nn.Linear`` weight is its transpose).
      bias: ``(out,)`` bias, or ``None``.
      params: the BN's affine parameters, or ``None``.
      stats: the BN's running statistics.
      epsilon: the BN's epsilon.

    Returns:
      ``(kernel', bias')`` with ``x @ kernel' + bias' = bn(dense(x))`` up to rounding.

    Raises:
      ValueError: if the shapes disagree or ``stats`` is ``None``.

    Example:

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> kernel, x = jnp.ones((3, 2)), jnp.array([[1.0, 2.0, 3.0]])
    >>> params = jaxbn.BatchNormParams(jnp.array([2.0, 1.0]), jnp.array([0.0, 1.0]))
    >>> stats = jaxbn.BatchStats(jnp.array([6.0, 0.0]), jnp.array([4.0, 1.0]), jnp.array(1))
    >>> k, b = fold_into_dense(kernel, None, params, stats, epsilon=1e-12)
    >>> x @ k + b
    Array([[0., 7.]], dtype=float32)
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"fold_into_dense: expected an (in, out) kernel, got {kernel.shape}.")
    return fold_into_conv(kernel, bias, params, stats, epsilon=epsilon)


def fold_into_next_conv(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: BatchNormParams | None,
    stats: BatchStats,
    *,
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an inference BatchNorm into the *following* convolution (``BN -> conv``).

    With ``y = x * a + b`` per input channel, ``conv(y) = conv'(x)`` for::

        kernel'[..., i, o] = kernel[..., i, o] * a[i]
        bias'[o]           = bias[o] + sum over (..., i) of kernel[..., i, o] * b[i]

    This is exact (any sign of ``a``) only for ``'VALID'`` convolutions: zero padding would
    add zeros *after* the affine in the original but *before* it in the folded layer.
    Use it when BN comes after the activation (``conv -> act -> BN -> conv``).

    Args:
      kernel: ``(..., I, O)`` kernel of a VALID (unpadded) convolution.
      bias: ``(O,)`` bias, or ``None``.
      params: the BN's affine parameters over the ``I`` channels, or ``None``.
      stats: the BN's running statistics.
      epsilon: the BN's epsilon.

    Returns:
      ``(kernel', bias')``.

    Raises:
      ValueError: if the shapes disagree or ``stats`` is ``None``.

    Example:

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> params, stats = jaxbn.init(2)
    >>> stats = stats._replace(mean=jnp.array([1.0, -1.0]), var=jnp.array([4.0, 0.25]))
    >>> kernel = jnp.sin(jnp.arange(90.0)).reshape(3, 3, 2, 5)
    >>> k, b = fold_into_next_conv(kernel, None, params, stats)
    >>> x = jnp.cos(jnp.arange(72.0)).reshape(1, 6, 6, 2)
    >>> conv = lambda x, k: jax.lax.conv_general_dilated(
    ...     x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y, _ = jaxbn.batch_norm(x, params, stats, training=False)
    >>> bool(jnp.allclose(conv(x, k) + b, conv(y, kernel), atol=1e-4))
    True
    """
    kernel = jnp.asarray(kernel)
    a, b = _affine(params, stats, epsilon)
    _check_kernel("fold_into_next_conv", kernel, -2, a.shape[0], "input channels (axis -2)")
    bias = _bias_or_zeros("fold_into_next_conv", bias, kernel)
    kf = kernel.astype(a.dtype)
    new_kernel = (kf * a[:, None]).astype(kernel.dtype)
    shift = jnp.einsum("...io,i->o", kf, b, precision=jax.lax.Precision.HIGHEST)
    return new_kernel, (bias + shift).astype(bias.dtype)


def fold_into_next_dense(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    params: BatchNormParams | None,
    stats: BatchStats,
    *,
    epsilon: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an inference BatchNorm into the *following* dense layer (``BN -> dense``).

    The dense layer may read a channels-last tensor flattened to ``(B, S * C)`` (e.g. a
    ``(B, H, W, C)`` feature map reshaped, flax's NHWC flatten): its ``(S * C, out)`` kernel
    is then seen as ``(S, C, out)`` and each row is scaled by its channel's ``a``.

    Args:
      kernel: ``(in, out)`` kernel with ``in`` a multiple of the BN's feature count ``C``,
        the channel varying fastest along ``in``.
      bias: ``(out,)`` bias, or ``None``.
      params: the BN's affine parameters, or ``None``.
      stats: the BN's running statistics.
      epsilon: the BN's epsilon.

    Returns:
      ``(kernel', bias')`` with ``flatten(bn(x)) @ kernel + bias = flatten(x) @ kernel' +
      bias'`` up to rounding.

    Raises:
      ValueError: if the shapes disagree or ``stats`` is ``None``.

    Example:

    >>> import jax.numpy as jnp, jaxbn
    >>> params, stats = jaxbn.init(2)
    >>> stats = stats._replace(mean=jnp.array([1.0, 0.0]), var=jnp.array([4.0, 1.0]))
    >>> k, b = fold_into_next_dense(jnp.ones((4, 1)), None, params, stats, epsilon=1e-12)
    >>> k[:, 0], b
    (Array([0.5, 1. , 0.5, 1. ], dtype=float32), Array([-1.], dtype=float32))
    """
    kernel = jnp.asarray(kernel)
    a, _ = _affine(params, stats, epsilon)
    c = a.shape[0]
    if kernel.ndim != 2 or kernel.shape[0] % c:
        raise ValueError(
            f"fold_into_next_dense: expected an (in, out) kernel with in a multiple of the "
            f"BatchNorm's {c} features, got shape {kernel.shape}."
        )
    k3 = kernel.reshape(kernel.shape[0] // c, c, kernel.shape[1])
    new_k3, new_bias = fold_into_next_conv(k3, bias, params, stats, epsilon=epsilon)
    return new_k3.reshape(kernel.shape), new_bias
