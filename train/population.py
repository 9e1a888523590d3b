"""BN's population statistics in the training program: PreciseBN and FrozenBN.

The running averages BN keeps while training mix the statistics of weights that kept
changing. ``--precise-bn N`` recomputes them instead (PreciseBN; Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021, §3): after an epoch, with the weights fixed, the training-mode
forward pass runs over ``N`` training images and every BN layer's batch moments are pooled
exactly (:func:`jaxbn.precise_linen.precise_batch_stats`). ``--freeze-bn-epochs K`` trains
the last ``K`` epochs with BN frozen (FrozenBN, ibid. §4): statistics recomputed the same way
when those epochs start, then used by the training step as by evaluation
(``use_running_average=True``), so that the network's last updates see what it will see at
test time.

The images are whole training batches of the run's ``--batch-size``, in the order of the
epoch just finished (a pure function of ``(seed, epoch)``, as the training batches are), so
that BN normalizes them as in training and a resumed run recomputes the same statistics.
Over ``--devices`` the batches are split over the mesh as training splits them (with
synchronized BN, the moments are those of each global batch); in a multi-process run each
process feeds its rows of every batch.

Example:
    >>> num_precise_batches(1000, batch_size=128, steps_per_epoch=100)
    8
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxbn import precise_linen
from train import batching, steps
from train.config import FREEZE_IMAGES, Config
from train.distributed import AXIS
from train.model import LeNet

__all__ = ["PreciseFn", "freeze_images", "make_precise_fn", "num_precise_batches",
           "precise_images"]

#: ``precise(state, images) -> batch_stats``: PreciseBN's statistics for ``state``'s weights
#: from ``images``, ``(batches, rows, H, W, C)`` uint8 (this process's rows of each batch).
PreciseFn = Callable[[steps.TrainState, np.ndarray], Any]


def num_precise_batches(images: int, batch_size: int, steps_per_epoch: int) -> int:
    """The whole training batches that hold ``images`` images: at least one, at most an epoch.

    Args:
        images: Images wanted (``--precise-bn``).
        batch_size: The global training batch size.
        steps_per_epoch: Full training batches in an epoch.

    Returns:
        The number of batches.
    """
    return min(max(-(-images // batch_size), 1), steps_per_epoch)


def freeze_images(config: Config) -> int:
    """Images PreciseBN uses at the FrozenBN switch: ``--precise-bn``, or
    :data:`train.config.FREEZE_IMAGES` when that is 0."""
    return config.precise_bn or FREEZE_IMAGES


def precise_images(
    images: np.ndarray, labels: np.ndarray, config: Config, *, num_images: int, epoch: int,
    steps_per_epoch: int, shard: tuple[int, int] = (0, 1),
) -> np.ndarray:
    """This process's rows of the first training batches of ``epoch``, stacked.

    Args:
        images: The training images, ``(M, H, W, C)`` uint8.
        labels: Their labels.
        config: Supplies ``batch_size`` and ``seed``.
        num_images: Images wanted; rounded up to whole batches (:func:`num_precise_batches`).
        epoch: The epoch whose order is used (from 0).
        steps_per_epoch: Full training batches in an epoch.
        shard: ``(index, count)``: this process's block of rows of every global batch.

    Returns:
        ``(batches, batch_size / count, H, W, C)`` uint8.
    """
    k = num_precise_batches(num_images, config.batch_size, steps_per_epoch)
    batches = batching.batches(images, labels, config.batch_size, seed=config.seed, epoch=epoch,
                           shard_index=shard[0], num_shards=shard[1])
    return np.stack([x for x, _ in itertools.islice(batches, k)])


def make_precise_fn(model: LeNet, mean: float, std: float, mesh: Mesh) -> PreciseFn:
    """PreciseBN for the LeNet's training-mode forward pass, split over ``mesh``.

    Make it once per model: the forward pass is compiled on the first call and reused by
    later calls with the same number of batches.

    Args:
        model: The model (with BN; ``axis_name`` :data:`train.distributed.AXIS` or ``None``).
        mean: Pixel mean in [0, 1] units.
        std: Pixel standard deviation.
        mesh: One-axis mesh named :data:`train.distributed.AXIS`.

    Returns:
        ``precise(state, images) -> batch_stats``, shaped as ``state.batch_stats`` and
        replicated over ``mesh``.
    """

    def forward(variables: Any, images: Any, mutable: Any) -> Any:
        return model.apply(variables, steps.preprocess(images, mean, std), train=True,
                           mutable=mutable)

    def precise(state: steps.TrainState, images: np.ndarray) -> Any:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return precise_linen.precise_batch_stats(forward, variables, images, mesh=mesh,
                                                 axis_name=AXIS)

    return precise
