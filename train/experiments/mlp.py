"""The BN paper's MNIST network, written with jaxbn's functional API.

Ioffe & Szegedy (2015), §4.1 and Fig. 1: a fully connected network with three hidden layers
of 100 sigmoid units, 784-100-100-100-10, trained with plain SGD on batches of 60. With BN,
each hidden layer is ``sigmoid(BN(x W))`` (BN's ``beta`` takes the place of the bias); without,
``sigmoid(x W + b)``. The output layer is never normalized.

Everything is explicit: :class:`MLP` holds the weights and BN's :class:`~jaxbn.BatchNormParams`,
BN's running statistics are a separate tuple of :class:`~jaxbn.BatchStats`, and
:func:`apply` is a pure function of both. :func:`moments` is the training-mode forward pass
that :func:`jaxbn.precise_batch_stats` needs (each layer's batch :class:`~jaxbn.Moments`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> net, stats = init(jax.random.key(0), bn=True)
    >>> x = jnp.ones((60, 784))
    >>> logits, new_stats, pre = apply(net, stats, x, training=True)
    >>> logits.shape, pre.shape, len(new_stats)
    ((60, 10), (60, 100), 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import jaxbn

__all__ = ["MOMENTUM", "SIZES", "MLP", "apply", "init", "moments"]

#: Layer widths of the paper's network.
SIZES = (784, 100, 100, 100, 10)
#: BN's running-average decay (flax convention; PyTorch's ``momentum=0.01``).
MOMENTUM = 0.99


class MLP(NamedTuple):
    """The network's parameters."""

    kernels: tuple[jax.Array, ...]  # (fan_in, fan_out) float32 per layer
    biases: tuple[jax.Array, ...]  # (fan_out,) float32 per layer; hidden ones unused with BN
    bn: tuple[jaxbn.BatchNormParams, ...] | None  # per hidden layer; None without BN


def init(key: jax.Array, *, bn: bool, sizes: Sequence[int] = SIZES
         ) -> tuple[MLP, tuple[jaxbn.BatchStats, ...] | None]:
    """Parameters (LeCun-normal kernels, zero biases) and BN's initial statistics.

    Args:
        key: PRNG key.
        bn: With BN on the hidden layers.
        sizes: Layer widths, input first.

    Returns:
        ``(mlp, stats)``: ``stats`` one :class:`~jaxbn.BatchStats` per hidden layer, or
        ``None`` without BN.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    init_fn = jax.nn.initializers.lecun_normal()
    kernels = tuple(init_fn(k, (a, b), jnp.float32)
                    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True))
    biases = tuple(jnp.zeros((b,), jnp.float32) for b in sizes[1:])
    if not bn:
        return MLP(kernels, biases, None), None
    params, stats = zip(*(jaxbn.init(n) for n in sizes[1:-1]), strict=True)
    return MLP(kernels, biases, tuple(params)), tuple(stats)


def apply(mlp: MLP, stats: tuple[jaxbn.BatchStats, ...] | None, x: jax.Array, *,
          training: bool, momentum: float = MOMENTUM
          ) -> tuple[jax.Array, tuple[jaxbn.BatchStats, ...] | None, jax.Array]:
    """The forward pass.

    Args:
        mlp: The parameters.
        stats: BN's running statistics (``None`` without BN).
        x: ``(B, 784)`` inputs.
        training: Normalize with the batch's statistics and update the running ones, or
            use the running ones.
        momentum: BN's running-average decay.

    Returns:
        ``(logits, new_stats, pre)``: ``pre`` is the input of the last hidden layer's
        sigmoids, ``(B, 100)`` (the quantity of the paper's Fig. 1b and 1c).
    """
    new_stats = []
    h, pre = x, x
    last = len(mlp.kernels) - 1
    for i in range(last):
        pre = h @ mlp.kernels[i]
        if mlp.bn is None:
            pre = pre + mlp.biases[i]
        else:
            pre, s = jaxbn.batch_norm(pre, mlp.bn[i], stats[i], training=training,
                                      momentum=momentum)
            new_stats.append(s)
        h = jax.nn.sigmoid(pre)
    logits = h @ mlp.kernels[last] + mlp.biases[last]
    return logits, None if mlp.bn is None else tuple(new_stats), pre


def moments(mlp: MLP, x: jax.Array) -> tuple[jaxbn.Moments, ...]:
    """The training-mode forward pass, returning each hidden BN layer's batch moments.

    The layers normalize with the moments they return (``jaxbn.moments`` then
    ``jaxbn.normalize``: what :func:`jaxbn.batch_norm` does in training), so this is
    :func:`jaxbn.precise_batch_stats`' ``moments_fn`` (with ``mlp`` bound).

    Raises:
        ValueError: ``mlp`` has no BN.
    """
    if mlp.bn is None:
        raise ValueError("moments: expected a network with BN (init(..., bn=True)), got one "
                         "without")
    out = []
    h = x
    for i, params in enumerate(mlp.bn):
        pre = h @ mlp.kernels[i]
        m = jaxbn.moments(pre)
        out.append(m)
        h = jax.nn.sigmoid(jaxbn.normalize(pre, m.mean, m.var, params))
    return tuple(out)
