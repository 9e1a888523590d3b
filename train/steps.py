"""The pieces of a training run: model, optimizer, state, and the jitted train and eval steps.

These are the building blocks of :func:`train.train.train_and_evaluate`, public for the
experiments (:mod:`train.experiments`) and benchmarks: the whole training step (forward,
backward, optimizer update) is one ``jax.jit`` with the state's buffers donated; the
evaluation step sums over a fixed-size, masked batch.

Data parallelism: with a ``mesh`` (one axis named :data:`train.distributed.AXIS`), a step
splits each global batch over the devices with :func:`jax.shard_map`. Batch Normalization
synchronizes its statistics over that axis when the model's ``axis_name`` is set, so N
devices compute what one device would for the same global batch (to float rounding); the
loss is the mean over the shards and its gradient is taken through the ``shard_map``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from train import distributed
from train.config import Config, field_error
from train.distributed import AXIS
from train.errors import ConfigError
from train.model import LeNet

__all__ = [
    "SGD_MOMENTUM",
    "LossFn",
    "TrainState",
    "create_train_state",
    "evaluate",
    "is_finite",
    "make_eval_step",
    "make_loss_fn",
    "make_model",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "preprocess",
]

#: SGD's momentum (the optimizer's, not BN's).
SGD_MOMENTUM = 0.9

#: ``loss_fn(params, batch_stats, images, labels) -> (loss, (batch_stats, correct))``.
LossFn = Callable[..., tuple[jax.Array, tuple[Any, jax.Array]]]


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` plus BN's running statistics (``{}`` without BN)."""

    batch_stats: Any


def _check(config: Config, name: str) -> None:
    error = field_error(config, name)
    if error is not None:
        raise ConfigError(error)


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step.

    Args:
        config: Supplies ``lr``, ``schedule``, ``warmup_epochs`` and ``epochs``.
        steps_per_epoch: Training steps per epoch.

    Returns:
        An optax schedule: optional linear warm-up from 0, then constant, cosine decay to 0
        at the end of ``epochs``, or step decay (x0.1 at 50% and at 75% of the steps).

    Raises:
        ConfigError: An unknown ``schedule``.

    Example:
        >>> s = make_schedule(Config(lr=0.1, epochs=2, warmup_epochs=1), steps_per_epoch=10)
        >>> [round(float(s(i)), 3) for i in (0, 5, 10, 15, 20)]
        [0.0, 0.05, 0.1, 0.05, 0.0]
    """
    _check(config, "schedule")
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    decay = max(total - warmup, 1)
    if config.schedule == "constant":
        main_schedule = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        main_schedule = optax.cosine_decay_schedule(config.lr, decay)
    else:
        boundaries = {max(1, round(decay * f)): 0.1 for f in (0.5, 0.75)}
        main_schedule = optax.piecewise_constant_schedule(config.lr, boundaries)
    if warmup == 0:
        return main_schedule
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, warmup), main_schedule], [warmup]
    )


def _kernels(params: Any) -> Any:
    """Weight-decay mask: True for conv and dense kernels only."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum 0.9 and L2 on the kernels, or AdamW; both on :func:`make_schedule`.

    Args:
        config: Supplies ``optimizer``, ``weight_decay`` and the schedule's options.
        steps_per_epoch: Training steps per epoch.

    Returns:
        The optax transformation.

    Raises:
        ConfigError: An unknown ``optimizer`` or ``schedule``.
    """
    _check(config, "optimizer")
    schedule = make_schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=_kernels),
            optax.sgd(schedule, momentum=SGD_MOMENTUM),
        )
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=_kernels)


def make_model(config: Config, num_classes: int) -> LeNet:
    """The LeNet of ``config``, with BN synchronized over :data:`train.distributed.AXIS`."""
    return LeNet(
        num_classes=num_classes,
        norm=config.norm,
        bn_position=config.bn_position,
        activation=config.activation,
        momentum=config.bn_momentum,
        axis_name=None if config.norm == "none" else AXIS,
        conv=config.conv,
        fused_bn=config.fused_bn,
    )


@functools.lru_cache(maxsize=8)
def _jitted_init(model: LeNet) -> Callable[..., Any]:
    """``model.init`` jitted: one compilation rather than one per operation (seconds on CPU),
    made once per model (modules are hashable), so repeated runs in one process reuse it."""
    return jax.jit(functools.partial(model.init, train=False))


def create_train_state(
    model: LeNet, tx: optax.GradientTransformation, key: jax.Array, image_shape: Sequence[int]
) -> TrainState:
    """Initializes the parameters, BN statistics and optimizer state.

    Args:
        model: The model.
        tx: The optimizer.
        key: PRNG key of the initialization.
        image_shape: ``(H, W, C)`` of one image.

    Returns:
        The initial :class:`TrainState` (step 0).
    """
    variables = _jitted_init(model)(key, jnp.zeros((1, *image_shape), jnp.float32))
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )
    # A strongly typed step, like a restored one: the jitted step then compiles once.
    return state.replace(step=jnp.zeros((), jnp.int32))


def preprocess(images: jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 images to float32 in [0, 1], then standardized with the dataset's mean and std.

    Example:
        >>> preprocess(jnp.array([0, 255], jnp.uint8), 0.5, 0.5)
        Array([-1.,  1.], dtype=float32)
    """
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def make_loss_fn(model: LeNet, mean: float, std: float, *, frozen_bn: bool = False) -> LossFn:
    """The training loss on one batch (or one device's shard of it).

    Args:
        model: The model.
        mean: Pixel mean in [0, 1] units.
        std: Pixel standard deviation.
        frozen_bn: BN normalizes with its running statistics and leaves them unchanged
            (``use_running_average=True``: FrozenBN); the weights still train.

    Returns:
        ``loss_fn(params, batch_stats, images, labels) -> (loss, (batch_stats, correct))``:
        the mean cross-entropy, BN's updated running statistics and the number of correct
        predictions, for uint8 ``(B, H, W, 1)`` images and int32 labels.
    """

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            preprocess(images, mean, std),
            train=not frozen_bn,  # LeNet's `train` only switches BN's mode.
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (updates.get("batch_stats", {}), correct)

    return loss_fn


def _over_mesh(loss_fn: LossFn, mesh: Mesh, synced: bool) -> LossFn:
    """``loss_fn`` on the global batch, split over ``mesh`` with ``shard_map``.

    The loss is the mean of the shards' (equal shards: the global mean) and ``correct`` their
    sum. BN without ``axis_name`` (``synced=False``) normalizes each shard on its own; its
    running statistics are then averaged over the devices, so the state stays replicated.
    """

    def sharded(params, batch_stats, images, labels):
        loss, (batch_stats, correct) = loss_fn(params, batch_stats, images, labels)
        if not synced:
            batch_stats = jax.lax.pmean(batch_stats, AXIS)
        return jax.lax.pmean(loss, AXIS), (batch_stats, jax.lax.psum(correct, AXIS))

    return jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                         out_specs=(P(), (P(), P())))


def make_train_step(
    model: LeNet, mean: float, std: float, mesh: Mesh | None = None, *, frozen_bn: bool = False
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted training step: forward, backward and update, with the state donated.

    Args:
        model: The model; its ``axis_name`` (:data:`train.distributed.AXIS` or ``None``)
            says whether BN synchronizes its statistics over the mesh.
        mean: Pixel mean in [0, 1] units.
        std: Pixel standard deviation.
        mesh: One-axis mesh named :data:`train.distributed.AXIS` to split each batch over,
            or ``None`` for a plain ``jit`` on one device.
        frozen_bn: Train with BN frozen (see :func:`make_loss_fn`).

    Returns:
        ``step(state, images, labels) -> (state, {'loss', 'correct'})`` taking uint8
        ``(B, H, W, 1)`` images and int32 labels; ``loss`` is the global batch's mean
        cross-entropy and ``correct`` its number of correct predictions.
    """
    loss_fn = make_loss_fn(model, mean, std, frozen_bn=frozen_bn)
    if mesh is not None:
        loss_fn = _over_mesh(loss_fn, mesh, synced=model.axis_name is not None)

    def step(state, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, correct)), grads = grad_fn(
            state.params, state.batch_stats, images, labels
        )
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return state, {"loss": loss, "correct": correct}

    return jax.jit(step, donate_argnums=0)


def make_eval_step(
    model: LeNet, mean: float, std: float, mesh: Mesh
) -> Callable[..., dict[str, jax.Array]]:
    """The jitted evaluation step, with the running statistics (``train=False``).

    Args:
        model: The model.
        mean: Pixel mean in [0, 1] units.
        std: Pixel standard deviation.
        mesh: One-axis mesh named :data:`train.distributed.AXIS`.

    Returns:
        ``eval_step(params, batch_stats, images, labels, valid) -> {'loss', 'correct',
        'count'}``: sums over the examples where the boolean ``valid`` is True.
    """

    def sums(params, batch_stats, images, labels, valid):
        logits = model.apply(
            {"params": params, "batch_stats": batch_stats},
            preprocess(images, mean, std),
            train=False,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        out = {
            "loss": jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": jnp.sum(valid & (jnp.argmax(logits, -1) == labels)),
            "count": jnp.sum(valid),
        }
        return jax.lax.psum(out, AXIS)

    return jax.jit(jax.shard_map(sums, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
                                 out_specs=P()))


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    return np.pad(array, [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1))


def evaluate(
    eval_step: Callable[..., dict[str, jax.Array]],
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    mesh: Mesh,
) -> dict[str, float]:
    """Mean loss and accuracy over every example, in fixed-size (padded, masked) batches.

    In a multi-process run every process passes the whole test set (and the same
    ``state``, replicated over ``mesh``) and feeds its rows of each batch; the sums are over
    every device of every process, so each process gets the metrics of all ``M`` examples,
    each counted once.

    Args:
        eval_step: From :func:`make_eval_step`.
        state: The state to evaluate.
        images: ``(M, H, W, 1)`` uint8 images.
        labels: ``(M,)`` labels.
        batch_size: Evaluation batch size (a multiple of the number of devices).
        mesh: The mesh the batches are split over.

    Returns:
        ``{'loss', 'accuracy'}`` over all ``M`` examples.
    """
    n = len(images)
    rows = distributed.process_batch_slice(batch_size, mesh)
    totals = None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = (
            _pad(images[start:stop], batch_size),
            _pad(labels[start:stop], batch_size),
            np.arange(start, start + batch_size) < stop,
        )
        batch = distributed.make_global_batch(tuple(a[rows] for a in batch), mesh)
        out = eval_step(state.params, state.batch_stats, *batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss"]) / count, "accuracy": int(totals["correct"]) / count}


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def is_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one jitted reduction).

    Example:
        >>> is_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])})
        False
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(_all_finite(leaves)) if leaves else True
