"""Trains the seed's LeNet with Batch Normalization: ``python -m train.lenet``.

Flax + Optax + Orbax, in the shape of the flax examples: a :class:`Config`, a
:func:`train_and_evaluate`, a ``main``. The whole training step (forward, backward, optimizer
update) is one ``jax.jit`` with the state's buffers donated; evaluation is jitted at a fixed
batch size, padding and masking the last batch so the test metrics cover every test image.

Data parallelism: ``--devices N`` splits each global batch over a one-axis mesh named
``'batch'`` with :func:`jax.shard_map`. Batch Normalization synchronizes its statistics over
that axis, so N devices compute what one device would for the same global batch (to float
rounding): the loss is the mean over all N shards and its gradient is taken through the
``shard_map``. On a CPU-only machine, fake devices come from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; :func:`main` sets it up by itself when
JAX has not started yet.

Many processes (hosts): with ``--coordinator``, ``--num-processes`` and ``--process-id`` (or
the ``JAXBN_*`` environment variables, or a cluster that :func:`jax.distributed.initialize`
detects: SLURM, Cloud TPU, ...) every process runs this same program and joins JAX's
multi-process runtime (:mod:`train.distributed`). ``--devices`` and ``--batch-size`` stay
global: the mesh takes ``devices / num_processes`` devices from each process (on CPU,
:func:`main` creates that many fake devices per process), each process feeds only its rows of
every global batch and of every evaluation batch, and BN's statistics, the loss and the test
metrics are reduced over all devices of all processes, so the run computes what one process
with the same ``--devices`` computes. Every process takes part in each checkpoint's save and
restore (Orbax, primary host 0; ``--workdir`` must be one directory that all of them see);
only process 0 prints the progress, writes ``metrics.jsonl`` and plots. Every process prints
the ``final:`` line, with the same metrics.

Every epoch: a progress bar with the running loss, one summary line, a JSON line in
``<workdir>/metrics.jsonl``, the curves in ``<workdir>/curves.png``, and an Orbax checkpoint in
``<workdir>/checkpoints/<step>`` (state, RNG, epoch, config, metrics; the last three kept).
Data order is a pure function of ``(seed, epoch)`` and training has no other randomness, so
``--resume`` ends with the same metrics as an uninterrupted run. A fresh run (no ``--resume``)
in a workdir that holds a previous run's outputs moves them into
``<workdir>/previous/<timestamp>/`` first: nothing is deleted. A non-finite loss stops the
run (exit status 1) without saving; Ctrl-C waits for a pending save (exit status 130). The last
line printed is a summary such as::

    final: epochs=5 steps=2340 test_accuracy=0.9123 test_loss=0.2500 seconds=140.2 ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import serialization
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from train import data, distributed
from train.model import ACTIVATIONS, BN_POSITIONS, CONVS, NORMS, LeNet

__all__ = [
    "Config",
    "ConfigError",
    "DivergedError",
    "TrainState",
    "create_train_state",
    "load_checkpoint",
    "main",
    "make_optimizer",
    "make_schedule",
    "parse_args",
    "train_and_evaluate",
]

#: Name of the data-parallel mesh axis (and of BN's ``axis_name``).
AXIS = "batch"
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
#: Per-dataset mean and standard deviation of the pixels in [0, 1]; others are computed.
PIXEL_STATS = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
#: SGD's momentum (the optimizer's, not BN's).
SGD_MOMENTUM = 0.9
CHECKPOINTS_TO_KEEP = 3
#: Steps between host reads of the loss (progress bar, non-finite check).
LOG_EVERY = 20
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130
_FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
#: Config fields that fix the shapes of the state: a checkpoint only restores if they match.
_STRUCTURAL = ("dataset", "norm", "optimizer")

StepCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a run (the command-line flags, less ``--workdir``).

    Attributes:
        dataset: Dataset name (``fashion_mnist``, ``mnist``, ...); see ``train.data``.
        data_dir: Directory with the four IDX files, or ``None`` to search.
        epochs: Number of epochs; also the length of the learning-rate schedule.
        batch_size: Global batch size, split evenly over ``devices``.
        optimizer: ``'sgd'`` (momentum 0.9) or ``'adam'``.
        lr: Peak learning rate.
        schedule: ``'constant'``, ``'cosine'`` (to 0) or ``'step'`` (x0.1 at 50% and 75%).
        warmup_epochs: Linear warm-up from 0 to ``lr``, in epochs (may be fractional).
        weight_decay: Decay of conv and dense kernels (not biases or BN): L2 added to the
            gradient for SGD (as PyTorch), decoupled (AdamW) for Adam.
        norm: ``'jaxbn'``, ``'flax'`` or ``'none'``; see :class:`train.model.LeNet`.
        bn_position: ``'before_relu'`` or ``'after_relu'``.
        activation: ``'relu'``, ``'sigmoid'`` or ``'tanh'``.
        bn_momentum: BN running-average decay, flax convention (PyTorch's 0.1 is 0.9).
        conv: Convolution implementation, ``'flax'`` or ``'fast'``.
        seed: Seed of the initialization and of the data order.
        devices: Number of devices for data parallelism, over all processes of a
            multi-process run (``devices / num_processes`` from each).
        resume: Continue from the latest checkpoint in the workdir.
        max_steps: Stop after this many training steps in total (for tests), or ``None``.
        eval_batch_size: Evaluation batch size, rounded up to a multiple of ``devices``
            (the last batch is padded).
        train_subset: Use only the first N training images, or ``None`` for all.
        test_subset: Use only the first N test images, or ``None`` for all.
        progress: Show a progress bar.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 5e-4
    norm: str = "jaxbn"
    bn_position: str = "before_relu"
    activation: str = "relu"
    bn_momentum: float = 0.9
    conv: str = "fast"
    seed: int = 0
    devices: int = 1
    resume: bool = False
    max_steps: int | None = None
    eval_batch_size: int = 1000
    train_subset: int | None = None
    test_subset: int | None = None
    progress: bool = True


class ConfigError(ValueError):
    """A bad command-line option, or one that does not fit the data, devices or checkpoint."""


class DivergedError(RuntimeError):
    """The loss (or the state) became NaN or infinite; nothing was saved after it."""


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` plus BN's running statistics (``{}`` without BN)."""

    batch_stats: Any


# --------------------------------------------------------------------------------------------
# Configuration.


def _choice_error(flag: str, value: Any, choices: Sequence[Any]) -> str:
    return f"{flag}: expected one of {', '.join(map(str, choices))}, got {value!r}"


def validate(config: Config) -> None:
    """Checks the options that do not depend on the data.

    Args:
        config: The run's configuration.

    Raises:
        ConfigError: An option is out of range; the message names the flag.
    """
    choices = {
        "--optimizer": (config.optimizer, OPTIMIZERS),
        "--schedule": (config.schedule, SCHEDULES),
        "--norm": (config.norm, NORMS),
        "--bn-position": (config.bn_position, BN_POSITIONS),
        "--activation": (config.activation, tuple(ACTIVATIONS)),
        "--conv": (config.conv, CONVS),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(_choice_error(flag, value, allowed))
    positive = {
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--devices": config.devices,
        "--eval-batch-size": config.eval_batch_size,
        "--max-steps": config.max_steps,
        "--train-subset": config.train_subset,
        "--test-subset": config.test_subset,
    }
    for flag, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{flag}: expected a positive integer, got {value}")
    if not config.lr > 0:
        raise ConfigError(f"--lr: expected a positive learning rate, got {config.lr}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay: expected >= 0, got {config.weight_decay}")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise ConfigError(
            f"--warmup-epochs: expected in [0, --epochs={config.epochs}), "
            f"got {config.warmup_epochs}"
        )
    if not 0 <= config.bn_momentum <= 1:
        raise ConfigError(f"--bn-momentum: expected in [0, 1], got {config.bn_momentum}")
    if config.seed < 0:
        raise ConfigError(f"--seed: expected a non-negative integer, got {config.seed}")
    if config.batch_size % config.devices:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be divisible by --devices "
            f"{config.devices} (each device gets batch_size / devices examples); got "
            f"remainder {config.batch_size % config.devices}"
        )


# --------------------------------------------------------------------------------------------
# Devices.


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private API moved; assume the worst.
        return True
    return bool(xla_bridge.backends_are_initialized())


def ensure_devices(n: int) -> list[jax.Device]:
    """Returns ``n`` devices, creating fake CPU devices if JAX has not started yet.

    In a multi-process run (:func:`train.distributed.initialize` called first), ``n`` counts
    the devices of all processes: each process contributes ``n / num_processes`` of its own,
    and that is also how many fake CPU devices each process creates.

    Args:
        n: Number of devices wanted, over all processes.

    Returns:
        One process: the first ``n`` of ``jax.devices()``. Several: the first
        ``n / num_processes`` devices of each process, ordered by process (so each
        process's rows of a batch sharded over them are contiguous).

    Raises:
        ConfigError: Fewer than ``n`` devices exist (and it is too late to create fake ones),
            or ``n`` does not divide over the processes; the message says how to fix it.
    """
    processes = distributed.planned_process_count()
    if n % processes:
        raise ConfigError(
            f"--devices {n} must be divisible by the number of processes ({processes}): each "
            f"process contributes --devices / {processes} of its devices"
        )
    local = n // processes
    if (
        local > 1
        and not _backends_initialized()
        and _FAKE_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", "")
        and jax.config.jax_num_cpu_devices < local
    ):
        jax.config.update("jax_num_cpu_devices", local)
    if jax.process_count() > 1:
        return _devices_per_process(n)
    available = jax.devices()
    if len(available) < n:
        raise ConfigError(
            f"--devices {n}: expected {n} devices, got {len(available)} "
            f"({available[0].platform}). For fake CPU devices, start Python with "
            f"XLA_FLAGS={_FAKE_DEVICES_FLAG}={n} (and JAX_PLATFORMS=cpu), e.g. "
            f"`XLA_FLAGS={_FAKE_DEVICES_FLAG}={n} python -m train.lenet --devices {n}`; "
            "python -m train.lenet does this itself when JAX has not started yet."
        )
    return available[:n]


def _devices_per_process(n: int) -> list[jax.Device]:
    """The first ``n / process_count`` devices of every process, ordered by process."""
    processes = jax.process_count()
    local = n // processes
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    short = {p: len(ds) for p, ds in by_process.items() if len(ds) < local}
    if short or len(by_process) != processes:
        platform = jax.local_devices()[0].platform
        raise ConfigError(
            f"--devices {n} over {processes} processes: expected {local} devices in every "
            f"process, got {', '.join(f'{len(ds)} in process {p}' for p, ds in by_process.items())}"
            f" ({platform}). Pass --devices {processes} * (devices per process); on CPU "
            f"python -m train.lenet creates {local} fake devices per process itself unless "
            f"XLA_FLAGS sets {_FAKE_DEVICES_FLAG}."
        )
    return [d for p in sorted(by_process) for d in by_process[p][:local]]


def _is_main() -> bool:
    """True on process 0 (the only one that prints, writes metrics and plots)."""
    return jax.process_index() == 0


def _say(*args: Any, **kwargs: Any) -> None:
    """``print`` on process 0 only; the other processes of a multi-process run are quiet."""
    if _is_main():
        print(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Model, optimizer, state.


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step.

    Args:
        config: Supplies ``lr``, ``schedule``, ``warmup_epochs`` and ``epochs``.
        steps_per_epoch: Training steps per epoch.

    Returns:
        An optax schedule: optional linear warm-up from 0, then constant, cosine decay to 0
        at the end of ``epochs``, or step decay (x0.1 at 50% and at 75% of the steps).

    Example:
        >>> s = make_schedule(Config(lr=0.1, epochs=2, warmup_epochs=1), steps_per_epoch=10)
        >>> [round(float(s(i)), 3) for i in (0, 5, 10, 15, 20)]
        [0.0, 0.05, 0.1, 0.05, 0.0]
    """
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    decay = max(total - warmup, 1)
    if config.schedule == "constant":
        main_schedule = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        main_schedule = optax.cosine_decay_schedule(config.lr, decay)
    elif config.schedule == "step":
        boundaries = {max(1, round(decay * f)): 0.1 for f in (0.5, 0.75)}
        main_schedule = optax.piecewise_constant_schedule(config.lr, boundaries)
    else:
        raise ConfigError(_choice_error("--schedule", config.schedule, SCHEDULES))
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
    """
    schedule = make_schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=_kernels),
            optax.sgd(schedule, momentum=SGD_MOMENTUM),
        )
    if config.optimizer == "adam":
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=_kernels)
    raise ConfigError(_choice_error("--optimizer", config.optimizer, OPTIMIZERS))


def make_model(config: Config, num_classes: int) -> LeNet:
    """The LeNet of ``config``, with BN synchronized over :data:`AXIS`."""
    return LeNet(
        num_classes=num_classes,
        norm=config.norm,
        bn_position=config.bn_position,
        activation=config.activation,
        momentum=config.bn_momentum,
        axis_name=None if config.norm == "none" else AXIS,
        conv=config.conv,
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


# --------------------------------------------------------------------------------------------
# Steps.


def _preprocess(images: jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 images to float32 in [0, 1], then standardized with the dataset's mean/std."""
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def make_train_step(
    model: LeNet, mesh: Mesh, mean: float, std: float
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted training step: forward, backward and update, with the state donated.

    Each device sees ``batch / N`` examples; BN's statistics and the loss are over the whole
    global batch, so the gradient is that of one device holding all of it.

    Args:
        model: The model (``axis_name`` :data:`AXIS` for synchronized BN).
        mesh: One-axis mesh named :data:`AXIS`.
        mean: Pixel mean in [0, 1] units.
        std: Pixel standard deviation.

    Returns:
        ``step(state, images, labels) -> (state, {'loss', 'correct'})`` taking uint8
        ``(B, H, W, 1)`` images and int32 labels; ``loss`` is the global batch's mean
        cross-entropy and ``correct`` its number of correct predictions.
    """

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            _preprocess(images, mean, std),
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        # Equal shards: the global mean is the mean of the shards' means.
        loss = jax.lax.pmean(loss, AXIS)
        return loss, (updates.get("batch_stats", {}), jax.lax.psum(correct, AXIS))

    sharded_loss = jax.shard_map(
        loss_fn,
        mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(), (P(), P())),
    )

    def step(state, images, labels):
        grad_fn = jax.value_and_grad(sharded_loss, has_aux=True)
        (loss, (batch_stats, correct)), grads = grad_fn(
            state.params, state.batch_stats, images, labels
        )
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return state, {"loss": loss, "correct": correct}

    return jax.jit(step, donate_argnums=0)


def make_eval_step(
    model: LeNet, mesh: Mesh, mean: float, std: float
) -> Callable[..., dict[str, jax.Array]]:
    """The jitted evaluation step, with the running statistics (``train=False``).

    Args:
        model: The model.
        mesh: One-axis mesh named :data:`AXIS`.
        mean: Pixel mean in [0, 1] units.
        std: Pixel standard deviation.

    Returns:
        ``eval_step(params, batch_stats, images, labels, valid) -> {'loss', 'correct',
        'count'}``: sums over the examples where the boolean ``valid`` is True.
    """

    def sums(params, batch_stats, images, labels, valid):
        logits = model.apply(
            {"params": params, "batch_stats": batch_stats},
            _preprocess(images, mean, std),
            train=False,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        out = {
            "loss": jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": jnp.sum(valid & (jnp.argmax(logits, -1) == labels)),
            "count": jnp.sum(valid),
        }
        return jax.lax.psum(out, AXIS)

    return jax.jit(
        jax.shard_map(
            sums,
            mesh=mesh,
            in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
            out_specs=P(),
        )
    )


# --------------------------------------------------------------------------------------------
# Checkpoints and outputs.


def _checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """Every process of a multi-process run creates one, and calls save and restore on it.

    The saved state is a tree of host (numpy) arrays, identical on every process: Orbax
    writes them, and the directories and metadata, from the primary host (process 0) only,
    and synchronizes the processes at the start and the end of each save; every process
    reads them back on restore.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=CHECKPOINTS_TO_KEEP,
        create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


#: A run's outputs in its workdir; a fresh run moves a previous run's into ``previous/``.
_OUTPUTS = ("checkpoints", "metrics.jsonl", "curves.png")
PREVIOUS = "previous"


def _checkpoint_steps(directory: Path) -> list[int]:
    """The finalized checkpoints' steps (Orbax renames ``<step>.orbax-checkpoint-tmp-*``)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def archive_previous_run(workdir: str | os.PathLike[str], resume: bool = False) -> Path | None:
    """Moves a previous run's checkpoints, metrics and plot into ``workdir/previous/<time>/``.

    A fresh run calls this before it starts, instead of deleting anything: with ``resume``
    and a checkpoint to resume from there is nothing to do; otherwise whatever of
    ``checkpoints/``, ``metrics.jsonl`` and ``curves.png`` exists (an empty ``checkpoints/``
    aside) moves, by renames within the workdir, to ``previous/<YYYYmmdd-HHMMSS>/`` (with a
    ``-1``, ``-2``, ... suffix if that exists). In a multi-process run only process 0 calls it.

    Args:
        workdir: The run's ``--workdir``.
        resume: Whether the run resumes (then a checkpoint stays where it is).

    Returns:
        The directory the outputs went to, or ``None`` if nothing was moved.
    """
    workdir = Path(workdir)
    checkpoints = workdir / "checkpoints"
    if resume and _checkpoint_steps(checkpoints):
        return None
    found = [
        workdir / name
        for name in _OUTPUTS
        if (workdir / name).exists()
        and not ((workdir / name).is_dir() and not any((workdir / name).iterdir()))
    ]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = workdir / PREVIOUS / stamp
    for i in range(1, 1000):
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            dest = workdir / PREVIOUS / f"{stamp}-{i}"
    for path in found:
        path.rename(dest / path.name)
    return dest


def _host_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    """The state as a tree of numpy arrays: a copy, so donation cannot touch it."""
    tree = {"state": serialization.to_state_dict(state), "rng": jax.random.key_data(rng)}
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def _save(
    manager: ocp.CheckpointManager, state: TrainState, rng: jax.Array, meta: dict[str, Any]
) -> Path:
    step = int(meta["step"])
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_host_tree(state, rng)), meta=ocp.args.JsonSave(meta)
        ),
    )
    return Path(manager.directory) / str(step)


def _restore(
    manager: ocp.CheckpointManager, step: int, state: TrainState, rng: jax.Array
) -> tuple[TrainState, jax.Array, dict[str, Any]]:
    """Restores checkpoint ``step`` into the structure of ``state``."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_host_tree(state, rng)), meta=ocp.args.JsonRestore()
        ),
    )
    # Saved dtypes may be wider (int64 step); keep the template's so nothing recompiles.
    tree = jax.tree.map(lambda t, r: np.asarray(r, t.dtype), _host_tree(state, rng),
                        restored["state"])
    state = serialization.from_state_dict(state, tree["state"])
    rng = jax.random.wrap_key_data(jnp.asarray(tree["rng"]))
    return state, rng, dict(restored["meta"])


def load_checkpoint(
    workdir: str | os.PathLike[str], step: int | None = None
) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`train_and_evaluate`, without building a model.

    Args:
        workdir: The run's ``--workdir``.
        step: Global step of the checkpoint; ``None`` for the latest.

    Returns:
        ``{'state': {'step', 'params', 'batch_stats', 'opt_state'}, 'rng': uint32 key data,
        'meta': {'epoch', 'step', 'steps_per_epoch', 'config', 'metrics'}}`` as numpy
        arrays and JSON values.

    Raises:
        FileNotFoundError: There is no checkpoint in ``workdir``.
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (no checkpoint yet)")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: expected a checkpoint, found none")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
            ),
        )
    return {**restored["state"], "meta": dict(restored["meta"])}


def _check_resumable(saved: dict[str, Any], config: Config, checkpoint: Path) -> None:
    """Refuses to resume with options that change the state's structure; warns on others."""
    for name in _STRUCTURAL:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"--resume: checkpoint {checkpoint} was made with {name}={saved[name]!r}, "
                f"got {name}={getattr(config, name)!r}; pass the same value or use another "
                "--workdir"
            )
    ignored = {"resume", "max_steps", "progress", "devices", "eval_batch_size", "data_dir"}
    changed = [
        f"{k}: {saved[k]!r} -> {v!r}"
        for k, v in dataclasses.asdict(config).items()
        if k in saved and k not in ignored and saved[k] != v
    ]
    if changed and _is_main():
        print(f"warning: resuming with changed settings ({'; '.join(changed)}); the result "
              "will differ from an uninterrupted run", file=sys.stderr)


def _read_metrics(path: Path, max_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= max_step]


def _write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Plots loss and accuracy (train and test) against the epoch into a PNG.

    Args:
        rows: Metrics rows, as in ``metrics.jsonl``.
        path: Destination PNG.
    """
    from matplotlib.figure import Figure  # Lazy: slow to import; Figure draws with Agg.

    fig = Figure(figsize=(10, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.88, wspace=0.25)
    epochs = [r["epoch"] for r in rows]
    for ax, name in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "test"):
            ax.plot(epochs, [r[f"{split}_{name}"] for r in rows], "o-", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LeNet on " + rows[-1].get("dataset", ""))
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# Evaluation and training.


def _pixel_stats(ds: data.Dataset) -> tuple[float, float]:
    if ds.name in PIXEL_STATS:
        return PIXEL_STATS[ds.name]
    pixels = ds.train_images.astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, pad)


def evaluate(
    eval_step: Callable[..., dict[str, jax.Array]],
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    sharding: NamedSharding,
) -> dict[str, float]:
    """Mean loss and accuracy over every example, in fixed-size (padded, masked) batches.

    In a multi-process run every process passes the whole test set (and the same
    ``state``, replicated over ``sharding``'s mesh) and feeds its rows of each batch; the
    sums are over every device of every process, so each process gets the metrics of all
    ``M`` examples, each counted once.

    Args:
        eval_step: From :func:`make_eval_step`.
        state: The state to evaluate.
        images: ``(M, H, W, 1)`` uint8 images.
        labels: ``(M,)`` labels.
        batch_size: Evaluation batch size (a multiple of the number of devices).
        sharding: Sharding of a batch over the mesh.

    Returns:
        ``{'loss', 'accuracy'}`` over all ``M`` examples.
    """
    n = len(images)
    totals = None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = (
            _pad(images[start:stop], batch_size),
            _pad(labels[start:stop], batch_size),
            np.arange(start, start + batch_size) < stop,
        )
        if sharding.is_fully_addressable:
            batch = jax.device_put(batch, sharding)
        else:  # Several processes: each feeds only its rows of the global batch.
            rows = distributed.process_batch_slice(batch_size, sharding.mesh, axis_name=AXIS)
            batch = _global_batch([a[rows] for a in batch], sharding, batch_size)
        out = eval_step(state.params, state.batch_stats, *batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = int(totals["count"])
    return {"loss": float(totals["loss"]) / count, "accuracy": int(totals["correct"]) / count}


def _global_batch(
    local: Sequence[np.ndarray], sharding: NamedSharding, global_rows: int
) -> tuple[jax.Array, ...]:
    """This process's rows of a global batch, assembled into global arrays (no data moves)."""
    return tuple(
        jax.make_array_from_process_local_data(sharding, a, (global_rows, *a.shape[1:]))
        for a in local
    )


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Puts a tree that every process holds identically on every device of ``sharding``."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _is_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(_all_finite(leaves)) if leaves else True


@dataclasses.dataclass
class _Run:
    """What the epoch loop needs; built once per run."""

    config: Config
    ds: data.Dataset
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    steps_per_epoch: int
    eval_batch_size: int
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    batch_sharding: NamedSharding
    replicated: NamedSharding
    manager: ocp.CheckpointManager
    workdir: Path
    on_step: StepCallback | None
    #: This process's shard of every global training batch: ``(index, count)``.
    shard: tuple[int, int] = (0, 1)


def _subset(array: np.ndarray, n: int | None) -> np.ndarray:
    return array if n is None else array[:n]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _load(config: Config, devices: int) -> tuple[data.Dataset, tuple[np.ndarray, ...], int]:
    ds = data.load_dataset(config.dataset, config.data_dir)
    arrays = (
        _subset(ds.train_images, config.train_subset),
        _subset(ds.train_labels, config.train_subset),
        _subset(ds.test_images, config.test_subset),
        _subset(ds.test_labels, config.test_subset),
    )
    if len(arrays[0]) < config.batch_size:
        raise ConfigError(
            f"--batch-size {config.batch_size}: expected at most the number of training "
            f"images, got {len(arrays[0])} images from {ds.source}"
        )
    # A multiple of the devices (each gets equal rows), and no larger than the test set needs.
    eval_batch_size = _round_up(min(config.eval_batch_size, len(arrays[2])), devices)
    return ds, arrays, eval_batch_size


def _last_good(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "No checkpoint was saved (no epoch completed)."
    return f"Last good checkpoint: {checkpoint} (continue with --resume)."


def _flush(
    pending: list[tuple[int, dict[str, jax.Array]]],
    epoch: int,
    run: _Run,
    last_checkpoint: Path | None,
    bar: tqdm,
    totals: dict[str, float],
) -> None:
    """Reads pending step metrics, stops on a non-finite loss, updates the bar."""
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host, strict=True):
        loss = float(m["loss"])
        if not math.isfinite(loss):
            batch = (step - 1) % run.steps_per_epoch + 1
            raise DivergedError(
                f"training diverged: loss is {loss} at step {step} (epoch {epoch + 1}, batch "
                f"{batch}/{run.steps_per_epoch}); stopped without saving. "
                f"{_last_good(last_checkpoint)} Try a lower --lr (got {run.config.lr})."
            )
        totals["loss"] += loss
        totals["correct"] += int(m["correct"])
        totals["steps"] += 1
    bar.update(len(pending))
    if pending:
        bar.set_postfix(loss=f"{float(host[-1]['loss']):.4f}")
    pending.clear()


def _train_epoch(
    run: _Run, state: TrainState, epoch: int, start: int, last_checkpoint: Path | None
) -> tuple[TrainState, dict[str, float]]:
    """Trains from batch ``start`` of ``epoch`` to its end (or to ``max_steps``)."""
    config = run.config
    step = int(state.step)
    stop = run.steps_per_epoch
    if config.max_steps is not None:
        stop = min(stop, start + config.max_steps - step)
    shard_index, num_shards = run.shard
    batches: Iterator[tuple[np.ndarray, np.ndarray]] = data.batches(
        run.train_images, run.train_labels, config.batch_size, seed=config.seed, epoch=epoch,
        shard_index=shard_index, num_shards=num_shards,
    )
    totals = {"loss": 0.0, "correct": 0, "steps": 0}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=start,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not (config.progress and _is_main()),
        leave=False,
        dynamic_ncols=True,
    )
    t0 = t1 = time.perf_counter()
    with bar:
        for i, (images, labels) in enumerate(batches):
            if i < start:
                continue  # Resuming mid-epoch: same order, skip what was done.
            if i >= stop:
                break
            if num_shards == 1:
                batch = jax.device_put((images, labels), run.batch_sharding)
            else:
                batch = _global_batch((images, labels), run.batch_sharding, config.batch_size)
            state, metrics = run.train_step(state, *batch)
            step += 1
            pending.append((step, metrics))
            if run.on_step is not None:
                run.on_step(epoch, step)
            if i == start:
                # Throughput is timed from the end of the first step (which may compile).
                jax.block_until_ready(metrics)
                t1 = time.perf_counter()
            if len(pending) >= LOG_EVERY:
                _flush(pending, epoch, run, last_checkpoint, bar, totals)
        _flush(pending, epoch, run, last_checkpoint, bar, totals)
        jax.block_until_ready(state)
    t2 = time.perf_counter()
    n = totals["steps"]
    return state, {
        "train_loss": totals["loss"] / max(n, 1),
        "train_accuracy": totals["correct"] / max(n * config.batch_size, 1),
        "images_per_sec": (n - 1) * config.batch_size / (t2 - t1) if n > 1 else 0.0,
        "train_seconds": t2 - t0,
    }


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {row['epoch']:g}/{epochs}: train_loss={row['train_loss']:.4f} "
        f"train_accuracy={row['train_accuracy']:.4f} test_loss={row['test_loss']:.4f} "
        f"test_accuracy={row['test_accuracy']:.4f} images/s={row['images_per_sec']:.0f} "
        f"lr={row['lr']:.3g} ({row['train_seconds']:.1f} s)"
    )


def _compile_key(config: Config) -> Config:
    """``config`` with the fields that do not change the compiled steps set to defaults."""
    d = Config()
    return dataclasses.replace(
        config, **{f: getattr(d, f) for f in (
            "data_dir", "seed", "resume", "max_steps", "eval_batch_size", "train_subset",
            "test_subset", "progress")}
    )


@functools.lru_cache(maxsize=4)
def _build(
    config: Config,
    steps_per_epoch: int,
    num_classes: int,
    devices: tuple[jax.Device, ...],
    mean: float,
    std: float,
) -> tuple[LeNet, optax.GradientTransformation, Callable[..., Any], Callable[..., Any], Mesh]:
    """Model, optimizer, jitted steps and mesh; cached so that runs with the same settings
    in one process (tests, sweeps, a resumed run) reuse the compiled steps."""
    mesh = Mesh(np.asarray(devices), (AXIS,))
    model = make_model(config, num_classes)
    tx = make_optimizer(config, steps_per_epoch)
    return (
        model,
        tx,
        make_train_step(model, mesh, mean, std),
        make_eval_step(model, mesh, mean, std),
        mesh,
    )


def _prepare(config: Config, workdir: Path, on_step: StepCallback | None) -> tuple[_Run, Any]:
    """Loads the data and builds the model, optimizer, steps, mesh and checkpoint manager."""
    validate(config)
    devices = ensure_devices(config.devices)
    ds, (train_x, train_y, test_x, test_y), eval_batch_size = _load(config, config.devices)
    steps_per_epoch = data.num_batches(len(train_x), config.batch_size)
    mean, std = _pixel_stats(ds)
    model, tx, train_step, eval_step, mesh = _build(
        _compile_key(config), steps_per_epoch, ds.num_classes, tuple(devices), mean, std
    )
    processes = jax.process_count()
    # This process's rows of every global batch: block `index` of `processes` equal blocks.
    rows = distributed.process_batch_slice(config.batch_size, mesh, axis_name=AXIS)
    per_process = config.batch_size // processes
    if rows.stop - rows.start != per_process or rows.start % per_process:
        raise ConfigError(  # pragma: no cover - ensure_devices takes equal blocks per process
            f"--devices {config.devices}: this process's rows {rows} of each batch are not one "
            f"of {processes} equal blocks"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if _is_main():
        moved = archive_previous_run(workdir, config.resume)
        if moved is not None:
            steps = _checkpoint_steps(moved / "checkpoints")
            what = ", ".join(
                f"checkpoints {steps}" if name == "checkpoints" else name
                for name in _OUTPUTS if (moved / name).exists()
            )
            print(f"starting from scratch: moved the previous run's {what} to {moved} "
                  "(pass --resume to continue a run instead)", flush=True)
    if processes > 1:  # The others wait until process 0 has moved the old outputs away.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("train.lenet: previous run archived")
    where = f"{len(devices)} {devices[0].platform} device(s)"
    if processes > 1:
        where += f" in {processes} processes ({len(devices) // processes} each)"
    _say(
        f"data: {ds.name} from {ds.source}: {len(train_x)} train / {len(test_x)} test images; "
        f"{steps_per_epoch} steps of {config.batch_size} per epoch on {where}; "
        f"norm={config.norm} optimizer={config.optimizer} lr={config.lr} "
        f"schedule={config.schedule}",
        flush=True,
    )
    run = _Run(
        config=config,
        ds=ds,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        steps_per_epoch=steps_per_epoch,
        eval_batch_size=eval_batch_size,
        train_step=train_step,
        eval_step=eval_step,
        batch_sharding=NamedSharding(mesh, P(AXIS)),
        replicated=NamedSharding(mesh, P()),
        manager=_checkpoint_manager(workdir / "checkpoints"),
        workdir=workdir,
        on_step=on_step,
        shard=(rows.start // per_process, processes),
    )
    return run, (model, tx)


def _start(
    run: _Run, model: LeNet, tx: optax.GradientTransformation
) -> tuple[TrainState, jax.Array, dict[str, Any] | None, list[dict[str, Any]]]:
    """A fresh state, or the latest checkpoint's with ``--resume``."""
    config, manager = run.config, run.manager
    init_key, rng = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(model, tx, init_key, run.ds.image_shape)
    metrics_path = run.workdir / "metrics.jsonl"
    latest = manager.latest_step()
    if config.resume and latest is not None:
        checkpoint = Path(manager.directory) / str(latest)
        saved = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        _check_resumable(saved["meta"]["config"], config, checkpoint)
        if saved["meta"]["steps_per_epoch"] != run.steps_per_epoch:
            raise ConfigError(
                f"--resume: checkpoint {checkpoint} has {saved['meta']['steps_per_epoch']} "
                f"steps per epoch, got {run.steps_per_epoch} (--batch-size or "
                "--train-subset changed); pass the same values"
            )
        state, rng, meta = _restore(manager, latest, state, rng)
        _say(f"resumed from {checkpoint} (epoch {meta['epoch']:g}, step {latest})")
        rows = _read_metrics(metrics_path, latest)
        if not rows or rows[-1]["step"] != latest:
            rows.append(meta["metrics"])  # metrics.jsonl was lost or edited: the saved row.
        return state, rng, meta, rows
    if config.resume:
        _say(f"--resume: no checkpoint in {manager.directory}; starting from scratch")
    elif latest is not None:  # pragma: no cover - _prepare moved them away
        raise RuntimeError(f"{manager.directory} still holds checkpoints {manager.all_steps()}")
    return state, rng, None, []


def _done(config: Config, step: int, steps_per_epoch: int) -> bool:
    if config.max_steps is not None and step >= config.max_steps:
        return True
    return step >= config.epochs * steps_per_epoch


def _summary(
    run: _Run, meta: dict[str, Any] | None, seconds: float
) -> dict[str, Any]:
    if meta is None:
        raise RuntimeError("no training step was run and no checkpoint exists")
    metrics_path, plot_path = run.workdir / "metrics.jsonl", run.workdir / "curves.png"
    return {
        **meta["metrics"],
        "seconds": seconds,
        "workdir": str(run.workdir),
        "checkpoint": str(Path(run.manager.directory) / str(meta["step"])),
        "metrics": str(metrics_path),
        "plot": str(plot_path),
    }


def _record(
    run: _Run, state: TrainState, rng: jax.Array, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any], Path]:
    """Writes the metrics and the plot, starts the checkpoint's save, prints the epoch line.

    The metrics go first: a run stopped in between has a metrics row newer than its latest
    checkpoint, which ``--resume`` drops, rather than a checkpoint without its row.
    """
    row = rows[-1]
    if _is_main():
        _write_metrics(run.workdir / "metrics.jsonl", rows)
        write_plot(rows, run.workdir / "curves.png")
    meta = {
        "epoch": row["epoch"],
        "step": row["step"],
        "steps_per_epoch": run.steps_per_epoch,
        "config": dataclasses.asdict(run.config),
        "metrics": row,
    }
    checkpoint = _save(run.manager, state, rng, meta)
    _say(_epoch_line(row, run.config.epochs), flush=True)
    return meta, checkpoint


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str], *, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Trains and evaluates the LeNet; writes metrics, plot and checkpoints into ``workdir``.

    In a multi-process run (:func:`train.distributed.initialize` called before JAX
    started) every process calls this with the same arguments; see the module docstring.

    Args:
        config: Hyperparameters.
        workdir: Output directory (created): ``metrics.jsonl``, ``curves.png``,
            ``checkpoints/``; a previous run's are moved to ``previous/<timestamp>/`` unless
            ``config.resume``.
        on_step: Called as ``on_step(epoch, step)`` after each training step is dispatched
            (``epoch`` from 0, ``step`` the global step from 1); for tests and hooks.

    Returns:
        The last epoch's metrics (``epoch``, ``step``, ``train_loss``, ``train_accuracy``,
        ``test_loss``, ``test_accuracy``, ``images_per_sec``, ...) plus ``seconds`` (this
        call's wall time) and the paths ``workdir``, ``checkpoint``, ``metrics``, ``plot``.

    Raises:
        ConfigError: A bad option, or one that does not fit the data, the devices or the
            checkpoint being resumed.
        train.data.DataError: The data is missing or malformed.
        DivergedError: The loss or the state became non-finite; the previous checkpoint is
            kept and nothing was saved after it.
        KeyboardInterrupt: After any pending checkpoint save has finished.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir)
    run, (model, tx) = _prepare(config, workdir, on_step)
    try:
        state, rng, meta, rows = _start(run, model, tx)
        state = _replicate(state, run.replicated)
        spe = run.steps_per_epoch
        last_checkpoint = Path(run.manager.directory) / str(meta["step"]) if meta else None
        while not _done(config, int(state.step), spe):
            step = int(state.step)
            epoch, start = divmod(step, spe)
            state, row = _train_epoch(run, state, epoch, start, last_checkpoint)
            test = evaluate(run.eval_step, state, run.test_images, run.test_labels,
                            run.eval_batch_size, run.batch_sharding)
            step = int(state.step)
            if not (math.isfinite(test["loss"]) and _is_finite(state)):
                raise DivergedError(
                    f"training diverged: the state or the test loss ({test['loss']}) is not "
                    f"finite after step {step} (epoch {epoch + 1}); stopped without saving. "
                    f"{_last_good(last_checkpoint)} Try a lower --lr (got {config.lr})."
                )
            row = {
                "epoch": round(step / spe, 6),
                "step": step,
                **row,
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "lr": float(make_schedule(config, spe)(step - 1)),
                "dataset": run.ds.name,
            }
            rows.append(row)
            meta, last_checkpoint = _record(run, state, rng, rows)
    finally:
        run.manager.wait_until_finished()
        run.manager.close()
    return _summary(run, meta, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m train.lenet",
        description="Train the seed's LeNet with Batch Normalization and report test accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--dataset", default=d.dataset, help="dataset name (fashion_mnist, mnist, ...)")
    a("--data-dir", default=d.data_dir, help="directory with the four IDX files")
    a("--epochs", type=int, default=d.epochs, help="epochs (also the schedule's length)")
    a("--batch-size", type=int, default=d.batch_size, help="global batch size")
    a("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="sgd: momentum 0.9")
    a("--lr", type=float, default=d.lr, help="peak learning rate")
    a("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule")
    a("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up")
    a("--weight-decay", type=float, default=d.weight_decay, help="decay of the kernels")
    a("--norm", choices=NORMS, default=d.norm, help="batch norm implementation")
    a("--bn-position", choices=BN_POSITIONS, default=d.bn_position, help="BN vs activation")
    a("--activation", choices=tuple(ACTIVATIONS), default=d.activation, help="nonlinearity")
    a("--bn-momentum", type=float, default=d.bn_momentum,
      help="BN running-average decay (flax convention; PyTorch's 0.1 is 0.9)")
    a("--conv", choices=CONVS, default=d.conv,
      help="fast: train.conv (im2col, custom VJP; fastest on CPU); flax: flax.linen.Conv")
    a("--seed", type=int, default=d.seed, help="initialization and data-order seed")
    a("--devices", type=int, default=d.devices,
      help="data-parallel devices (synchronized BN), over all processes; fake CPU devices "
           "are created if needed")
    a("--workdir", default="runs/lenet", help="checkpoints, metrics.jsonl and curves.png")
    a("--resume", action="store_true",
      help="continue from the latest checkpoint in --workdir (without it, a previous run's "
           "outputs there are moved to --workdir/previous/<timestamp>/)")
    a("--max-steps", type=int, default=d.max_steps, help="stop after this many steps")
    a("--eval-batch-size", type=int, default=d.eval_batch_size,
      help="evaluation batch size (rounded up to a multiple of --devices)")
    a("--train-subset", type=int, default=d.train_subset, help="first N training images")
    a("--test-subset", type=int, default=d.test_subset, help="first N test images")
    a("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
      help="show a progress bar")
    g = p.add_argument_group(
        "multi-process runs",
        "Every process runs the same command. Each setting defaults to its JAXBN_* "
        "environment variable, else to what jax.distributed.initialize detects (SLURM, "
        "Cloud TPU, Open MPI); with none, the run is single-process.",
    )
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0, reachable by all (${distributed.ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes (${distributed.ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's id, 0 .. N-1 (${distributed.ENV_PROCESS_ID})")
    return p


#: The command-line flags that are not :class:`Config` fields: where the process runs.
_RUNTIME_FLAGS = ("workdir", "coordinator", "num_processes", "process_id")


def _parse(argv: Sequence[str] | None) -> tuple[Config, str, dict[str, Any]]:
    """``(config, workdir, {'coordinator', 'num_processes', 'process_id'})``."""
    args = vars(_parser().parse_args(argv))
    runtime = {k: args.pop(k) for k in _RUNTIME_FLAGS}
    return Config(**args), runtime.pop("workdir"), runtime


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, str]:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        ``(config, workdir)``.
    """
    config, workdir, _ = _parse(argv)
    return config, workdir


def _join(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Joins a multi-process run if one is configured; True if this is one.

    When JAX has already started (``main`` called inside a program, e.g. the tests) and no
    multi-process setting was given, this is a single-process run and the cluster
    environment is not probed: joining then would be too late anyway.
    """
    settings = (coordinator, num_processes, process_id)
    env = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
           distributed.ENV_PROCESS_ID)
    if (
        _backends_initialized()
        and all(v is None for v in settings)
        and not any(os.environ.get(k) for k in env)
    ):
        return jax.distributed.is_initialized()
    try:
        return distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs ``python -m train.lenet``; the last line printed is the ``final:`` summary.

    With ``--coordinator/--num-processes/--process-id`` (or their ``JAXBN_*`` variables, or
    a detected cluster) it first joins the multi-process runtime; then every process of the
    run executes this same function (see the module docstring).

    Args:
        argv: Command-line arguments without the program name; ``None`` for ``sys.argv``.

    Returns:
        The final metrics (see :func:`train_and_evaluate`).

    Raises:
        SystemExit: Status 2 for bad options or data, 1 when training diverged or the
            coordinator could not be reached, 130 when interrupted (the latest checkpoint
            stays loadable).
    """
    config, workdir, runtime = _parse(argv)
    with _exit_on((ConfigError, data.DataError), 2):
        validate(config)  # Before joining: every process of a run fails alike, and at once.
    with _exit_on(ConfigError, 2), _exit_on(distributed.CoordinatorUnreachableError, 1):
        _join(**runtime)
    if config.devices > 1:
        # Before anything starts JAX's backends: fake CPU devices can still be made.
        with _exit_on((ConfigError, data.DataError), 2):
            ensure_devices(config.devices)
    try:
        with _exit_on((ConfigError, data.DataError), 2), _exit_on(DivergedError, EXIT_DIVERGED):
            result = train_and_evaluate(config, workdir)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the latest checkpoint in {Path(workdir) / 'checkpoints'} is "
              "intact: continue with --resume", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    _say(f"checkpoint: {result['checkpoint']}")
    _say(f"metrics: {result['metrics']}")
    _say(f"plot: {result['plot']}")
    print(
        f"final: epochs={result['epoch']:g} steps={result['step']} "
        f"test_accuracy={result['test_accuracy']:.4f} test_loss={result['test_loss']:.4f} "
        f"train_accuracy={result['train_accuracy']:.4f} seconds={result['seconds']:.1f} "
        f"workdir={result['workdir']} checkpoint={result['checkpoint']} "
        f"metrics={result['metrics']} plot={result['plot']}",
        flush=True,
    )
    return result


@contextlib.contextmanager
def _exit_on(kind: type[Exception] | tuple[type[Exception], ...], code: int) -> Iterator[None]:
    """Turns ``kind`` into ``error: <message>`` on stderr and ``SystemExit(code)``."""
    try:
        yield
    except kind as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(code) from error


if __name__ == "__main__":
    main()
