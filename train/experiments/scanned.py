"""Training compiled whole, for the experiments on BN's statistics: an epoch is one ``lax.scan``.

:func:`make_epoch` turns a loss function (:func:`train.steps.make_loss_fn`'s signature) into
one jitted function that runs every step of an epoch inside ``lax.scan``: the batches are
gathered on the device from the training set by an ``(steps, batch)`` array of indices
(:func:`epoch_indices`, the training program's order), the optimizer is SGD with momentum
0.9 (:data:`train.steps.SGD_MOMENTUM`) without weight decay, and the learning rate is an
argument (:class:`Hyper`), so one compilation serves every learning rate, seed and epoch of
a batch shape. No step returns to Python: on a 2-core CPU that saves the dispatch of
thousands of small steps (batches of 2 to 16 images).

Two options cover the experiments' variants:

* ``replicas=R``: each batch is split into ``R`` equal parts run under ``jax.vmap`` with the
  axis name :data:`train.distributed.AXIS`: ``R`` data-parallel replicas on one device. A
  model whose BN has ``axis_name=AXIS`` synchronizes its statistics over them (the same
  collective as over devices with ``shard_map``); one without normalizes each part alone,
  and the replicas' new running statistics are averaged, as over devices.
* ``momenta=(m1, m2, ...)``: for a model whose BN has ``momentum=0`` (so that the statistics
  it returns are the batch's own moments), the carry keeps one exponential moving average of
  them per momentum, ``new = m * old + (1 - m) * batch``, all from the same training run:
  the weights do not depend on BN's momentum, only the running averages do.

Example:
    >>> epoch_indices(6, 2, seed=0, epoch=0).shape
    (3, 2)
    >>> round(float(learning_rate(jnp.array(5), Hyper.of(0.1, total=10, warmup=0),
    ...                               "cosine")), 6)
    0.05
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from train import batching, steps
from train.distributed import AXIS

__all__ = ["SCHEDULES", "Carry", "EpochFn", "Hyper", "epoch_indices", "init_carry",
           "learning_rate", "make_epoch"]

#: ``constant`` (after the warm-up) or ``cosine`` (decay to 0 at ``Hyper.total``).
SCHEDULES = ("constant", "cosine")

_TX = optax.trace(decay=steps.SGD_MOMENTUM)


class Hyper(NamedTuple):
    """A run's learning-rate schedule, as arrays (one compiled epoch serves every value)."""

    lr: jax.Array  # (), float32: the peak learning rate
    total: jax.Array  # (), float32: steps of the whole run (the cosine reaches 0 there)
    warmup: jax.Array  # (), float32: steps of linear warm-up from 0 to ``lr``

    @classmethod
    def of(cls, lr: float, *, total: int, warmup: int = 0) -> Hyper:
        """The schedule's arrays from Python numbers."""
        return cls(*(jnp.asarray(v, jnp.float32) for v in (lr, total, warmup)))


def learning_rate(step: jax.Array, hyper: Hyper, schedule: str) -> jax.Array:
    """The learning rate of step ``step`` (from 0): warm-up, then constant or cosine decay."""
    t = step.astype(jnp.float32)
    warm = jnp.minimum((t + 1) / jnp.maximum(hyper.warmup, 1), 1.0)
    if schedule == "constant":
        return hyper.lr * warm
    progress = jnp.clip((t - hyper.warmup) / jnp.maximum(hyper.total - hyper.warmup, 1), 0, 1)
    return hyper.lr * jnp.where(t < hyper.warmup, warm, 0.5 * (1 + jnp.cos(jnp.pi * progress)))


class Carry(NamedTuple):
    """What an epoch carries from step to step."""

    params: Any  # the model's parameters
    opt_state: Any  # SGD's momentum (optax.trace's state)
    stats: Any  # BN's running statistics; with momenta, a tuple of them, one per momentum
    step: jax.Array  # (), int32: steps done


def init_carry(params: Any, stats: Any, momenta: Sequence[float] | None = None) -> Carry:
    """A run's first carry, holding copies of ``params`` and ``stats`` (one copy of
    ``stats`` per momentum when ``momenta`` is given): epochs donate their carry, and the
    arrays passed here stay usable, e.g. as the start of another run."""
    copy = functools.partial(jax.tree.map, jnp.copy)
    stats = copy(stats) if momenta is None else tuple(copy(stats) for _ in momenta)
    return Carry(copy(params), _TX.init(params), stats, jnp.zeros((), jnp.int32))


#: ``epoch(carry, hyper, images, labels, idx) -> (carry, losses)``: the steps of the rows of
#: ``idx`` (``(steps, batch)`` indices into ``images`` and ``labels``), ``losses`` of shape
#: ``(steps,)``.
EpochFn = Callable[..., tuple[Carry, jax.Array]]


def _on_replicas(loss_fn: steps.LossFn, replicas: int) -> steps.LossFn:
    """``loss_fn`` over ``replicas`` equal parts of the batch under ``vmap`` (named
    :data:`train.distributed.AXIS`): the mean loss, the mean of the new statistics, the
    sum of the correct predictions."""
    if replicas == 1:
        return loss_fn

    def split(a: jax.Array) -> jax.Array:
        return a.reshape(replicas, a.shape[0] // replicas, *a.shape[1:])

    def replicated(params, batch_stats, images, labels):
        loss, (stats, correct) = jax.vmap(loss_fn, in_axes=(None, None, 0, 0),
                                          axis_name=AXIS)(params, batch_stats, split(images),
                                                          split(labels))
        return loss.mean(), (jax.tree.map(lambda a: a.mean(0), stats), correct.sum())

    return replicated


def make_epoch(loss_fn: steps.LossFn, *, replicas: int = 1,
               momenta: Sequence[float] | None = None, schedule: str = "cosine") -> EpochFn:
    """One jitted function that trains every step of an epoch in a ``lax.scan``.

    Args:
        loss_fn: ``loss_fn(params, batch_stats, images, labels) -> (loss, (batch_stats,
            correct))`` on one batch, as :func:`train.steps.make_loss_fn` makes it.
        replicas: Data-parallel replicas the batch is split over (see the module docstring).
        momenta: Keep one moving average of the batch statistics per momentum (the loss's
            model must have BN momentum 0); ``None``: keep what the loss returns.
        schedule: One of :data:`SCHEDULES`.

    Returns:
        ``epoch(carry, hyper, images, labels, idx) -> (carry, losses)``, the carry donated.

    Raises:
        ValueError: An unknown schedule or a non-positive number of replicas.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if replicas < 1:
        raise ValueError(f"replicas: expected a positive integer, got {replicas}")
    grad_fn = jax.value_and_grad(_on_replicas(loss_fn, replicas), has_aux=True)

    def step(carry: Carry, batch: tuple[jax.Array, ...], hyper: Hyper) -> tuple[Carry, jax.Array]:
        model_stats = carry.stats[0] if momenta is not None else carry.stats
        (loss, (stats, _)), grads = grad_fn(carry.params, model_stats, *batch)
        if momenta is not None:
            stats = tuple(jax.tree.map(lambda e, b, m=m: m * e + (1 - m) * b, ema, stats)
                          for m, ema in zip(momenta, carry.stats, strict=True))
        updates, opt_state = _TX.update(grads, carry.opt_state)
        lr = learning_rate(carry.step, hyper, schedule)
        params = jax.tree.map(lambda p, u: p - lr * u, carry.params, updates)
        return Carry(params, opt_state, stats, carry.step + 1), loss

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(carry: Carry, hyper: Hyper, images: jax.Array, labels: jax.Array,
              idx: jax.Array) -> tuple[Carry, jax.Array]:
        return lax.scan(lambda c, i: step(c, (images[i], labels[i]), hyper), carry, idx)

    return epoch


def epoch_indices(n: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """The batches of an epoch as indices, ``(n // batch_size, batch_size)`` int32, in the
    order of :func:`train.batching.batches` (a permutation of ``(seed, epoch)``)."""
    ids = np.arange(n, dtype=np.int32)
    return np.stack([i for i, _ in batching.batches(ids, ids, batch_size, seed=seed, epoch=epoch)])
