"""Batches for the training examples, in a deterministic order.

The order of epoch ``e`` is a pure function of ``(seed, e)``, so a run resumed at epoch ``k``
sees exactly the batches an uninterrupted run would have seen, and every process of a
multi-process run cuts the same global batches into its own rows. Like :mod:`train.data`, this
module depends only on numpy: batches are numpy arrays, and the caller moves them to devices.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["batches", "num_batches"]


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches :func:`batches` yields for ``n`` examples.

    Args:
        n: Number of examples.
        batch_size: Global batch size.
        drop_remainder: Whether a last, partial batch is dropped.

    Returns:
        ``n // batch_size`` if ``drop_remainder``, else ``ceil(n / batch_size)``.

    Example:
        >>> num_batches(10, 4), num_batches(10, 4, drop_remainder=False)
        (2, 3)
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields one epoch of ``(images, labels)`` numpy batches in a deterministic order.

    The order is ``numpy.random.default_rng([seed, epoch]).permutation(n)``: a pure function of
    ``(seed, epoch)``, so resuming at epoch ``k`` yields exactly the batches of an
    uninterrupted run. Images stay uint8 (see :func:`train.data.to_float`).

    For multi-process data parallelism, each of ``num_shards`` processes passes its
    ``shard_index`` and gets rows ``[shard_index * b / num_shards, (shard_index + 1) * b /
    num_shards)`` of each global batch of size ``b``; the shards concatenate to the global
    batch. A last partial batch (``drop_remainder=False``) is split the same way, possibly
    unevenly.

    Args:
        images: ``(N, ...)`` array.
        labels: ``(N, ...)`` array.
        batch_size: Global batch size; must be divisible by ``num_shards``.
        seed: Non-negative shuffle seed.
        epoch: Non-negative epoch number.
        shuffle: Whether to permute; if not, batches are in index order.
        drop_remainder: Whether to drop a last, partial batch.
        shard_index: This process's shard, in ``[0, num_shards)``.
        num_shards: Number of shards each global batch is split into.

    Yields:
        ``(images[idx], labels[idx])`` for each batch's (shard of) indices ``idx``.

    Raises:
        ValueError: Mismatched lengths, non-positive sizes, a bad shard, a batch size not
            divisible by ``num_shards``, or a negative seed or epoch.

    Example:
        >>> x, y = np.arange(10), np.arange(10) * 10
        >>> [yb.tolist() for _, yb in batches(x, y, 4, seed=0, epoch=0, shuffle=False)]
        [[0, 10, 20, 30], [40, 50, 60, 70]]
        >>> run1 = [xb for xb, _ in batches(x, y, 4, seed=1, epoch=3)]
        >>> run2 = [xb for xb, _ in batches(x, y, 4, seed=1, epoch=3)]
        >>> all((a == b).all() for a, b in zip(run1, run2))
        True
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images and labels differ in length: {n} vs {len(labels)}")
    if batch_size <= 0 or num_shards <= 0:
        raise ValueError(
            f"batch_size and num_shards must be positive, got {batch_size}, {num_shards}"
        )
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    if batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by num_shards {num_shards}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got {seed}, {epoch}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for i in range(num_batches(n, batch_size, drop_remainder)):
        idx = order[i * batch_size : (i + 1) * batch_size]
        b = len(idx)
        idx = idx[shard_index * b // num_shards : (shard_index + 1) * b // num_shards]
        yield images[idx], labels[idx]
