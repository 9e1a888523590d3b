"""The seed's LeNet with Batch Normalization, as a Flax linen module.

The layers are exactly the seed's (a PyTorch ``nn.Sequential``), in NHWC layout::

    conv1  Conv(1 -> 20, 5x5, VALID)    28x28x1  -> 24x24x20
           MaxPool 2                              -> 12x12x20
    bn1    BatchNorm(20), activation
    conv2  Conv(20 -> 50, 5x5, VALID)             -> 8x8x50
           MaxPool 2                              -> 4x4x50
    bn2    BatchNorm(50), activation
           flatten (H, W, C order)                -> 800
    fc1    Dense(800 -> 500), activation
    fc2    Dense(500 -> num_classes)              -> logits

The submodule names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc1``, ``fc2``) are part of the
interface: checkpoint converters rely on them. Convolutions and dense layers keep their bias
(as PyTorch's do), so a PyTorch ``state_dict`` maps onto the variables one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jaxbn.linen
from train.conv import Conv

__all__ = ["ACTIVATIONS", "BN_POSITIONS", "CONVS", "INPUT_SHAPE", "NORMS", "LeNet",
           "max_pool_2x2"]

#: ``(H, W, C)`` of one input image: the seed's LeNet takes 28x28 grayscale images.
INPUT_SHAPE = (28, 28, 1)

#: Normalization layers: this library's, flax's, or none (the seed's baseline without BN).
NORMS = ("jaxbn", "flax", "none")
#: Where BN sits relative to the activation: the seed's order, or after it.
BN_POSITIONS = ("before_relu", "after_relu")
#: Activation functions by name.
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
}
#: Convolution implementations: ``flax.linen.Conv`` or ``train.conv.Conv`` (same variables).
CONVS = ("flax", "fast")


def _check_choice(field: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"LeNet.{field}: expected one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (VALID), as ``nn.max_pool(x, (2, 2), strides=(2, 2))``.

    Written as a reshape and a max rather than ``reduce_window``: the forward pass is the
    same, and the gradient avoids XLA's ``select_and_scatter`` (or the scatter it becomes
    under ``shard_map``), which is several times slower than the whole rest of the LeNet's
    backward pass on CPU. At exact ties inside a window the gradient is shared equally
    instead of going to one element; both are valid subgradients.

    Args:
        x: ``(B, H, W, C)`` array; an odd last row or column is dropped, as with VALID.

    Returns:
        ``(B, H // 2, W // 2, C)`` window maxima.

    Example:
        >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
        >>> max_pool_2x2(x)[0, ..., 0]
        Array([[ 5.,  7.],
               [13., 15.]], dtype=float32)
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    # Under explicit mesh axes a reshape that splits dimensions must name its output
    # sharding: each split dimension keeps its sharding on the major half.
    spec = jax.typeof(x).sharding.spec
    sb, sh, sw, sc = (*spec, *(None,) * (4 - len(spec)))
    out_sharding = None if not any((sb, sh, sw, sc)) else P(sb, sh, None, sw, None, sc)
    windows = jax.lax.reshape(x, (b, h // 2, 2, w // 2, 2, c), out_sharding=out_sharding)
    return windows.max(axis=(2, 4))


def _as_kwargs(bn_kwargs: Any) -> dict[str, Any]:
    """``bn_kwargs`` as a dict; accepts a mapping (dict, FrozenDict) or (key, value) pairs."""
    if bn_kwargs is None:
        return {}
    try:
        kwargs = dict(bn_kwargs)
    except (TypeError, ValueError):
        raise ValueError(
            "LeNet.bn_kwargs: expected a mapping or a tuple of (name, value) pairs, "
            f"got {bn_kwargs!r}"
        ) from None
    reserved = {"use_running_average", "momentum", "epsilon", "axis_name", "name"} & set(kwargs)
    if reserved:
        raise ValueError(
            f"LeNet.bn_kwargs: {sorted(reserved)} are LeNet fields or set by LeNet; "
            "set them on LeNet instead of in bn_kwargs"
        )
    return kwargs


class LeNet(nn.Module):
    """The seed's LeNet: two conv/pool/BN/activation stages and two dense layers.

    Attributes:
        num_classes: Number of output logits.
        norm: ``'jaxbn'`` (:class:`jaxbn.linen.BatchNorm`), ``'flax'``
            (:class:`flax.linen.BatchNorm`) or ``'none'`` (no normalization).
        bn_position: ``'before_relu'`` (pool, BN, activation: the seed's order) or
            ``'after_relu'`` (pool, activation, BN).
        activation: ``'relu'``, ``'sigmoid'`` or ``'tanh'``; used after both conv stages and
            after ``fc1``.
        momentum: Running-average decay in flax's convention, ``new = momentum * old +
            (1 - momentum) * batch``; 0.9 is PyTorch's default ``momentum=0.1``.
        epsilon: Added to the variance, as PyTorch's ``eps``.
        axis_name: Mapped axis (``shard_map``, ``pmap``) over which BN synchronizes its
            batch statistics, or ``None``.
        bn_kwargs: Extra keyword arguments for the BN layers (e.g.
            ``{'unbiased_running_var': True}`` for ``norm='jaxbn'``), as a mapping or a
            tuple of ``(name, value)`` pairs.
        conv: ``'flax'`` (:class:`flax.linen.Conv`) or ``'fast'``
            (:class:`train.conv.Conv`, the same variables).
        fused_bn: Each BN and the activation after it as one
            :class:`jaxbn.linen.BatchNormAct` (the same variables and results, less memory
            kept for the backward pass); needs ``norm='jaxbn'`` and
            ``bn_position='before_relu'``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = LeNet()
        >>> x = jnp.zeros((2, 28, 28, 1))
        >>> variables = model.init(jax.random.key(0), x, train=False)
        >>> logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
        >>> logits.shape, sorted(updates['batch_stats'])
        ((2, 10), ['bn1', 'bn2'])
    """

    num_classes: int = 10
    norm: str = "jaxbn"
    bn_position: str = "before_relu"
    activation: str = "relu"
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    bn_kwargs: Any = None
    conv: str = "flax"
    fused_bn: bool = False

    def _check(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("bn_position", self.bn_position, BN_POSITIONS)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("conv", self.conv, CONVS)
        if self.fused_bn and (self.norm, self.bn_position) != ("jaxbn", "before_relu"):
            raise ValueError(
                f"LeNet.fused_bn: fuses jaxbn's BN with the activation after it, so it needs "
                f"norm='jaxbn' and bn_position='before_relu', got norm={self.norm!r} and "
                f"bn_position={self.bn_position!r}")

    def _norm(self, name: str, train: bool) -> Callable[[jax.Array], jax.Array]:
        """The BN layer called ``name`` (an identity for ``norm='none'``)."""
        if self.norm == "none":
            return lambda x: x
        batch_norm = jaxbn.linen.BatchNorm if self.norm == "jaxbn" else nn.BatchNorm
        return batch_norm(
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            name=name,
            **_as_kwargs(self.bn_kwargs),
        )

    def _stage(self, x: jax.Array, conv: str, features: int, bn: str, train: bool) -> jax.Array:
        """Conv 5x5 (VALID), max-pool 2, then BN and the activation in the chosen order."""
        act = ACTIVATIONS[self.activation]
        conv_cls = nn.Conv if self.conv == "flax" else Conv
        x = conv_cls(features, (5, 5), padding="VALID", name=conv)(x)
        x = max_pool_2x2(x)
        if self.fused_bn:
            # relu by name: its backward pass keeps the output (kept by the pooling anyway)
            # instead of ReLU's own mask; other activations are recomputed from BN's input.
            return jaxbn.linen.BatchNormAct(
                use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                axis_name=self.axis_name, name=bn, **_as_kwargs(self.bn_kwargs),
                activation="relu" if self.activation == "relu" else act)(x)
        norm = self._norm(bn, train)
        if self.bn_position == "before_relu":
            return act(norm(x))
        return norm(act(x))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Computes the logits.

        Args:
            x: ``(B, 28, 28, 1)`` float images (NHWC).
            train: Normalize with the batch statistics and update the running ones (apply
                with ``mutable=['batch_stats']``), or use the running statistics.

        Returns:
            ``(B, num_classes)`` logits.

        Raises:
            ValueError: An unknown option, or an input that is not ``(B, 28, 28, 1)``.
        """
        self._check()
        if x.ndim != 4 or x.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"LeNet: expected input of shape (B, 28, 28, 1), got {x.shape}")
        x = self._stage(x, "conv1", 20, "bn1", train)
        x = self._stage(x, "conv2", 50, "bn2", train)
        x = x.reshape((x.shape[0], -1))  # (B, 4, 4, 50) -> (B, 800), NHWC order.
        x = ACTIVATIONS[self.activation](nn.Dense(500, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)
