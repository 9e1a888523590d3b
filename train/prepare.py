"""A training run before its first step: the workdir, the data, the compiled steps.

:func:`train.train.train_and_evaluate` holds the workdir's lock (:func:`locked`), then
:func:`prepare` moves a previous run's outputs away (unless resuming), loads the data, builds
the model, optimizer, jitted steps and mesh (:func:`build`, cached across runs with the same
compiled settings), opens the checkpoints, and hands the epoch loop one :class:`Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from train import batching, data, distributed, population, steps
from train.checkpoints import Checkpoints, unfinished_saves
from train.config import Config, compile_key
from train.distributed import say
from train.errors import ConfigError, StorageError, WorkdirBusyError
from train.model import INPUT_SHAPE
from train.workdir import OUTPUTS, WorkdirLock, archive_previous_run, checkpoint_steps

__all__ = ["Built", "Run", "StepCallback", "archive", "build", "load", "locked", "prepare"]

#: ``on_step(epoch, step)``, called after each training step is dispatched.
StepCallback = Callable[[int, int], None]


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Holds the workdir's lock (process 0 does; the others learn whether it could)."""
    lock = error = None
    if distributed.is_main_process():
        try:
            lock = WorkdirLock(workdir).acquire()
        except (WorkdirBusyError, StorageError) as e:
            error = e
    code = distributed.broadcast_from_main(error.exit_code if error else 0)
    if error is not None:
        raise error
    if code:
        kind = WorkdirBusyError if code == WorkdirBusyError.exit_code else StorageError
        raise kind(f"process 0 could not lock --workdir {workdir}; its message says why")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class Built(NamedTuple):
    """What :func:`build` compiles once for a model's settings, devices and data shape."""

    model: Any
    tx: optax.GradientTransformation
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    #: The training step with BN frozen (``--freeze-bn-epochs``); compiled when first used.
    frozen_step: Callable[..., Any]
    #: PreciseBN (:func:`train.population.make_precise_fn`); compiled when first used.
    precise: population.PreciseFn | None
    mesh: Mesh


@dataclasses.dataclass
class Run:
    """What the epoch loop needs; built once per run."""

    config: Config
    ds: data.Dataset
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, y; test x, y
    steps_per_epoch: int
    eval_batch_size: int
    built: Built
    checkpoints: Checkpoints
    workdir: Path
    on_step: StepCallback | None
    #: This process's shard of every global training batch: ``(index, count)``.
    shard: tuple[int, int] = (0, 1)
    #: Whether a previous run's outputs were moved to ``previous/`` (and said so).
    archived: bool = False


def load(config: Config, devices: int) -> tuple[data.Dataset, tuple[np.ndarray, ...], int]:
    """The dataset, its training and test subsets, and the evaluation batch size."""
    ds = data.load_dataset(config.dataset, config.data_dir)
    data.check_image_shape(ds, INPUT_SHAPE, "LeNet")
    arrays = (ds.train_images[: config.train_subset], ds.train_labels[: config.train_subset],
              ds.test_images[: config.test_subset], ds.test_labels[: config.test_subset])
    if len(arrays[0]) < config.batch_size:
        raise ConfigError(
            f"--batch-size {config.batch_size}: expected at most the number of training "
            f"images, got {len(arrays[0])} images from {ds.source}"
        )
    # A multiple of the devices (each gets equal rows), and no larger than the test set needs.
    eval_batch_size = -(-min(config.eval_batch_size, len(arrays[2])) // devices) * devices
    return ds, arrays, eval_batch_size


@functools.lru_cache(maxsize=8)
def build(
    config: Config, steps_per_epoch: int, num_classes: int, devices: tuple[jax.Device, ...],
    mean: float, std: float,
) -> Built:
    """Model, optimizer, jitted steps and mesh; cached (by :func:`train.config.compile_key`)
    so that runs with the same settings in one process (tests, sweeps, a resumed run) reuse
    the compiled steps. Each step compiles when first called."""
    mesh = distributed.global_mesh(devices)
    model = steps.make_model(config, num_classes)
    precise = None if config.norm == "none" else population.make_precise_fn(model, mean, std,
                                                                            mesh)
    return Built(model, steps.make_optimizer(config, steps_per_epoch),
                 steps.make_train_step(model, mean, std, mesh),
                 steps.make_eval_step(model, mean, std, mesh),
                 steps.make_train_step(model, mean, std, mesh, frozen_bn=True), precise, mesh)


def archive(workdir: Path, config: Config) -> bool:
    """Process 0 moves a previous run's outputs away unless resuming from a checkpoint;
    returns whether it did (on every process)."""
    moved = None
    if distributed.is_main_process():
        checkpoints = workdir / "checkpoints"
        unfinished = [p.name for p in unfinished_saves(checkpoints)]
        moved = archive_previous_run(workdir, config.resume)
        if moved is not None:
            note = f" (with an unfinished save, {', '.join(unfinished)})" if unfinished else ""
            what = ", ".join(
                f"checkpoints {checkpoint_steps(moved / name)}{note}" if name == "checkpoints"
                else name for name in OUTPUTS if (moved / name).exists())
            first = (f"--resume: no checkpoint to resume from in {checkpoints}; starting "
                     "from scratch" if config.resume else "starting from scratch")
            print(f"{first}: moved the previous run's {what} to {moved}"
                  + ("" if config.resume else " (pass --resume to continue a run instead)"),
                  flush=True)
    return bool(distributed.broadcast_from_main(moved is not None))


def prepare(config: Config, workdir: Path, devices: Sequence[jax.Device],
            on_step: StepCallback | None) -> Run:
    """Loads the data, builds the model, optimizer, steps and mesh, and opens checkpoints."""
    ds, arrays, eval_batch_size = load(config, config.devices)
    steps_per_epoch = batching.num_batches(len(arrays[0]), config.batch_size)
    mean, std = data.pixel_stats(ds.name, dataset=ds)
    built = build(compile_key(config), steps_per_epoch, ds.num_classes, tuple(devices),
                  mean, std)
    processes = jax.process_count()
    # This process's rows of every global batch: block `index` of `processes` equal blocks.
    rows = distributed.process_batch_slice(config.batch_size, built.mesh)
    archived = archive(workdir, config)
    where = f"{len(devices)} {devices[0].platform} device(s)"
    if processes > 1:
        where += f" in {processes} processes ({len(devices) // processes} each)"
    say(f"data: {ds.name} from {ds.source}: {len(arrays[0])} train / {len(arrays[2])} test "
        f"images; {steps_per_epoch} steps of {config.batch_size} per epoch on {where}; "
        f"norm={config.norm} optimizer={config.optimizer} lr={config.lr} "
        f"schedule={config.schedule}", flush=True)
    checkpoints = Checkpoints(workdir / "checkpoints", main=distributed.is_main_process(),
                              say=functools.partial(say, file=sys.stderr, flush=True))
    if checkpoints.removed:
        say(f"removed an unfinished checkpoint save: {', '.join(map(str, checkpoints.removed))}"
            " (a run stopped while saving)", file=sys.stderr, flush=True)
    return Run(config, ds, arrays, steps_per_epoch, eval_batch_size, built, checkpoints,
               workdir, on_step,
               shard=(rows.start // (config.batch_size // processes), processes),
               archived=archived)
