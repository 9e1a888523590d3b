"""The training loop: :func:`train_and_evaluate`, in the shape of the flax examples.

Every epoch: a progress bar with the running loss, one summary line, a JSON line in
``<workdir>/metrics.jsonl``, the curves in ``<workdir>/curves.png``, and an Orbax checkpoint in
``<workdir>/checkpoints/<step>`` (:mod:`train.checkpoints`; the last three kept). Data order
is a pure function of ``(seed, epoch)`` and training has no other randomness, so ``--resume``
ends with the same metrics as an uninterrupted run, also from a checkpoint in the middle of
an epoch (``--max-steps``): the checkpoint carries the epoch's running sums.

Nothing is lost: a run holds a lock on its workdir (:class:`train.workdir.WorkdirLock`;
process 0's in a multi-process run), so a second run there is refused; a fresh run (no
``--resume``) moves a previous run's outputs into ``<workdir>/previous/<timestamp>/``;
``--resume`` skips damaged checkpoints (and says which, and why); a non-finite loss stops the
run without saving; a full or read-only disk stops it with the last good checkpoint intact;
and Ctrl-C waits for a checkpoint save in progress (further Ctrl-Cs included) before it stops.

Many processes: every process of a multi-process run (:mod:`train.distributed`) calls
:func:`train_and_evaluate` with the same arguments. ``--devices`` and ``--batch-size`` stay
global: the mesh takes ``devices / num_processes`` devices from each process, each process
feeds only its rows of every global batch and of every evaluation batch, and BN's
statistics, the loss and the test metrics are reduced over all devices of all processes, so
the run computes what one process with the same ``--devices`` computes. Only process 0
prints the progress, writes ``metrics.jsonl`` and plots.

What a run needs before its first step (the workdir locked and archived, the data, the
compiled steps, the checkpoints) is :mod:`train.prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from train import batching, distributed, metrics, population, steps
from train.checkpoints import quiet_orbax
from train.config import Config, check_resumable, validate
from train.devices import ensure_devices
from train.distributed import say
from train.errors import ConfigError, DivergedError, Terminated
from train.prepare import Run, StepCallback, locked, prepare

__all__ = ["LOG_EVERY", "StepCallback", "defer_interrupts", "say", "terminate_like_interrupt",
           "train_and_evaluate"]

#: Steps between host reads of the loss (progress bar, non-finite check).
LOG_EVERY = 20


@contextlib.contextmanager
def defer_interrupts(doing: str) -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) and SIGTERM back while the block runs, then raises.

    For work that must not be cut short, such as a checkpoint save: every Ctrl-C or SIGTERM
    received meanwhile is noted (the first one with a line on stderr saying what is
    finishing), and one exception follows the block: :class:`train.errors.Terminated` if a
    SIGTERM came, else ``KeyboardInterrupt``. Only the main thread receives signals;
    elsewhere the block runs as is.

    Args:
        doing: What is finishing, for the message (e.g. ``"saving checkpoint <path>"``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        if not received:
            what = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
            print(f"\n{what}: {doing} first; it takes a moment", file=sys.stderr, flush=True)
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in received:
        raise Terminated
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`train.errors.Terminated` (a
    ``KeyboardInterrupt``) in the main thread, so a preempted run stops as on Ctrl-C.

    Outside the main thread (where no handler can be installed) the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_checkpoint(run: Run, meta: dict[str, Any], path: Path) -> None:
    changed = check_resumable(meta.get("config", {}), run.config, path)
    if meta.get("steps_per_epoch", run.steps_per_epoch) != run.steps_per_epoch:
        raise ConfigError(
            f"--resume: checkpoint {path} has {meta['steps_per_epoch']} steps per epoch, got "
            f"{run.steps_per_epoch} (--batch-size or --train-subset changed); pass the same "
            "values"
        )
    if changed:
        say(f"warning: resuming with changed settings ({'; '.join(changed)}); the result "
            "will differ from an uninterrupted run", file=sys.stderr)


def _start(run: Run) -> tuple[steps.TrainState, jax.Array, dict[str, Any] | None, list]:
    """A fresh state, or the latest intact checkpoint's with ``--resume``."""
    config = run.config
    init_key, rng = jax.random.split(jax.random.key(config.seed))
    state = steps.create_train_state(run.built.model, run.built.tx, init_key, run.ds.image_shape)
    if not config.resume:
        return state, rng, None, []
    restored = run.checkpoints.restore_latest(
        state, rng, functools.partial(_check_checkpoint, run))
    if restored is None:
        if not run.archived:  # Else _archive said so.
            say(f"--resume: no checkpoint in {run.checkpoints.directory}; starting from "
                "scratch", flush=True)
        return state, rng, None, []
    state, rng, meta = restored
    step = int(meta["step"])
    say(f"resumed from {run.checkpoints.path(step)} (epoch {meta['epoch']:g}, step {step})")
    rows = metrics.read_metrics(run.workdir / "metrics.jsonl", step)
    if not rows or rows[-1]["step"] != step:
        rows.append(meta["metrics"])  # metrics.jsonl was lost or edited: the saved row.
    return state, rng, meta, rows


def _replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a tree that every process holds identically on every device of ``mesh``."""
    sharding = NamedSharding(mesh, P())
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _last_good(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "No checkpoint was saved (no epoch completed)."
    return f"Last good checkpoint: {checkpoint} (continue with --resume)."


def _flush(pending: list[tuple[int, dict[str, jax.Array]]], epoch: int, run: Run,
           last_checkpoint: Path | None, bar: tqdm, sums: dict[str, Any]) -> None:
    """Reads pending step metrics into ``sums``, stops on a non-finite loss, updates the bar."""
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
        sums["loss"] += loss
        sums["correct"] += int(m["correct"])
        sums["steps"] += 1
    bar.update(len(pending))
    if pending:
        bar.set_postfix(loss=f"{float(host[-1]['loss']):.4f}")
    pending.clear()


def _train_epoch(run: Run, state: steps.TrainState, epoch: int, start: int,
                 sums: dict[str, Any], last_checkpoint: Path | None,
                 train_step: Callable[..., Any]) -> tuple[steps.TrainState, dict[str, float]]:
    """Trains from batch ``start`` of ``epoch`` to its end (or to ``max_steps``) with
    ``train_step``, adding each step's loss and correct predictions to the epoch's running
    ``sums``."""
    config, step = run.config, int(state.step)
    stop = run.steps_per_epoch if config.max_steps is None else \
        min(run.steps_per_epoch, start + config.max_steps - step)
    batches = batching.batches(run.arrays[0], run.arrays[1], config.batch_size, seed=config.seed,
                           epoch=epoch, shard_index=run.shard[0], num_shards=run.shard[1])
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/"
               f"{config.epochs}", disable=not (config.progress and
                                                 distributed.is_main_process()),
               leave=False, dynamic_ncols=True)
    t0 = t1 = time.perf_counter()
    with bar:
        for i, (images, labels) in enumerate(batches):
            if i < start:
                continue  # Resuming mid-epoch: same order, skip what was done.
            if i >= stop:
                break
            batch = distributed.make_global_batch((images, labels), run.built.mesh)
            state, step_metrics = train_step(state, *batch)
            step += 1
            pending.append((step, step_metrics))
            if run.on_step is not None:
                run.on_step(epoch, step)
            if i == start:  # Throughput is timed from the end of the first step (compiles).
                jax.block_until_ready(step_metrics)
                t1 = time.perf_counter()
            if len(pending) >= LOG_EVERY:
                _flush(pending, epoch, run, last_checkpoint, bar, sums)
        _flush(pending, epoch, run, last_checkpoint, bar, sums)
        jax.block_until_ready(state)
    t2, n = time.perf_counter(), step - int(start + epoch * run.steps_per_epoch)
    return state, {
        "train_loss": sums["loss"] / max(sums["steps"], 1),
        "train_accuracy": sums["correct"] / max(sums["steps"] * config.batch_size, 1),
        "images_per_sec": (n - 1) * config.batch_size / (t2 - t1) if n > 1 else 0.0,
        "train_seconds": t2 - t0,
    }


def _epoch_sums(meta: dict[str, Any] | None, start: int) -> dict[str, Any]:
    """The running sums to continue the epoch from: a mid-epoch checkpoint's, else zeros."""
    saved = (meta or {}).get("epoch_sums")
    if start and saved is not None and saved["steps"] == start:
        return dict(saved)
    return {"loss": 0.0, "correct": 0, "steps": 0}


def _record(run: Run, state: steps.TrainState, rng: jax.Array, rows: list[dict[str, Any]],
            sums: dict[str, Any], precise: Any = None) -> tuple[dict[str, Any], Path]:
    """Writes the metrics and the plot, starts the checkpoint's save, prints the epoch line.

    The metrics go first: a run stopped in between has a metrics row newer than its latest
    checkpoint, which ``--resume`` drops, rather than a checkpoint without its row.
    ``precise`` (PreciseBN's statistics, or ``None``) is saved beside the state.
    """
    row = rows[-1]
    if distributed.is_main_process():
        metrics.write_metrics(run.workdir / "metrics.jsonl", rows)
        metrics.write_plot(rows, run.workdir / "curves.png")
    meta = {"epoch": row["epoch"], "step": row["step"],
            "steps_per_epoch": run.steps_per_epoch, "config": dataclasses.asdict(run.config),
            "metrics": row, "epoch_sums": sums}
    with defer_interrupts(f"saving checkpoint {run.checkpoints.path(row['step'])}"):
        checkpoint = run.checkpoints.save(state, rng, meta, precise_batch_stats=precise)
    say(metrics.epoch_line(row, run.config.epochs), flush=True)
    return meta, checkpoint


def _precise(run: Run, state: steps.TrainState, epoch: int, num_images: int) -> Any:
    """PreciseBN's statistics for ``state``'s weights, from ``num_images`` training images in
    the order of ``epoch`` (:mod:`train.population`)."""
    assert run.built.precise is not None  # validate() refuses the flags without BN.
    images = population.precise_images(
        run.arrays[0], run.arrays[1], run.config, num_images=num_images, epoch=epoch,
        steps_per_epoch=run.steps_per_epoch, shard=run.shard)
    return run.built.precise(state, images)


def _test(run: Run, state: steps.TrainState, batch_stats: Any = None) -> dict[str, float]:
    """Test loss and accuracy of ``state``, or of its weights with ``batch_stats``."""
    if batch_stats is not None:
        state = state.replace(batch_stats=batch_stats)
    return steps.evaluate(run.built.eval_step, state, run.arrays[2], run.arrays[3],
                          run.eval_batch_size, run.built.mesh)


def _train(run: Run) -> dict[str, Any]:
    """The epoch loop; returns the last epoch's metrics.

    With ``--freeze-bn-epochs K``, the epochs from ``epochs - K`` on train with the frozen
    step, from statistics PreciseBN recomputes when the first of them starts (at its first
    batch: a run resumed inside a frozen epoch has them in its state already). With
    ``--precise-bn N``, PreciseBN recomputes the statistics after every epoch that trained
    with batch statistics; in a frozen epoch, the statistics the run trains with are
    PreciseBN's from the switch, and are reported as such.
    """
    config, spe = run.config, run.steps_per_epoch
    state, rng, meta, rows = _start(run)
    state = _replicate(state, run.built.mesh)
    last = run.checkpoints.path(meta["step"]) if meta else None
    total = spe * config.epochs
    first_frozen = config.epochs - config.freeze_bn_epochs
    while int(state.step) < min(total, config.max_steps or total):
        epoch, start = divmod(int(state.step), spe)
        frozen = epoch >= first_frozen
        if frozen and epoch == first_frozen and start == 0:
            images = population.freeze_images(config)
            state = state.replace(batch_stats=_precise(run, state, epoch - 1, images))
            used = config.batch_size * population.num_precise_batches(
                images, config.batch_size, spe)
            asked = "" if used == images else f", for {images} asked (whole batches, at " \
                f"most one epoch)"
            say(f"epoch {epoch + 1}/{config.epochs}: BN frozen for the last "
                f"{config.freeze_bn_epochs} epoch(s), with statistics recomputed from "
                f"{used} training images{asked} (PreciseBN)", flush=True)
        sums = _epoch_sums(meta, start)
        state, train = _train_epoch(run, state, epoch, start, sums, last,
                                    run.built.frozen_step if frozen else run.built.train_step)
        test = _test(run, state)
        step = int(state.step)
        if not (math.isfinite(test["loss"]) and steps.is_finite(state)):
            raise DivergedError(
                f"training diverged: the state or the test loss ({test['loss']}) is not "
                f"finite after step {step} (epoch {epoch + 1}); stopped without saving. "
                f"{_last_good(last)} Try a lower --lr (got {config.lr})."
            )
        row = {"epoch": round(step / spe, 6), "step": step, **train,
               "test_loss": test["loss"], "test_accuracy": test["accuracy"]}
        precise = None
        if config.precise_bn:
            precise = state.batch_stats if frozen else _precise(run, state, epoch,
                                                                config.precise_bn)
            test = test if frozen else _test(run, state, precise)
            row.update(precise_test_loss=test["loss"], precise_test_accuracy=test["accuracy"])
        if config.freeze_bn_epochs:
            row["bn_frozen"] = frozen
        rows.append({**row, "lr": float(steps.make_schedule(config, spe)(step - 1)),
                     "dataset": run.ds.name})
        meta, last = _record(run, state, rng, rows, sums, precise)
    return {**meta["metrics"], "checkpoint": str(last)}


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike[str], *, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Trains and evaluates the LeNet; writes metrics, plot and checkpoints into ``workdir``.

    In a multi-process run (:func:`train.distributed.initialize` called before JAX
    started) every process calls this with the same arguments; see the module docstring.

    Args:
        config: Hyperparameters.
        workdir: Output directory (created and locked): ``metrics.jsonl``, ``curves.png``,
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
        train.errors.DataError: The data is missing or malformed.
        WorkdirBusyError: Another run holds the workdir.
        train.errors.CheckpointError: ``--resume`` found only damaged checkpoints.
        StorageError: The workdir cannot be written (read-only, full, ...); the last good
            checkpoint is kept.
        DivergedError: The loss or the state became non-finite; the previous checkpoint is
            kept and nothing was saved after it.
        KeyboardInterrupt: After any pending checkpoint save has finished
            (:class:`train.errors.Terminated` for a SIGTERM received during a save, or
            anywhere inside :func:`terminate_like_interrupt`).
    """
    t0 = time.perf_counter()
    validate(config)
    devices = ensure_devices(config.devices)
    workdir = Path(workdir)
    with quiet_orbax(config.debug), locked(workdir):
        run = prepare(config, workdir, devices, on_step)
        try:
            result = _train(run)
        finally:
            with defer_interrupts("finishing the checkpoint save in progress"):
                run.checkpoints.close()
    return {**result, "seconds": time.perf_counter() - t0, "workdir": str(workdir),
            "metrics": str(workdir / "metrics.jsonl"), "plot": str(workdir / "curves.png")}
