"""The run's Orbax checkpoints: saved asynchronously, verified on restore, never silently lost.

Each checkpoint ``<workdir>/checkpoints/<step>`` holds two items: ``state`` (the
:class:`train.steps.TrainState` as a tree of numpy arrays, the RNG key, and with
``--precise-bn`` PreciseBN's statistics, ``precise_batch_stats``) and ``meta``
(JSON: epoch, step, config, the epoch's metrics and running sums, and a SHA-256
``checksum`` of the saved arrays and of the rest of ``meta``). :class:`Checkpoints`

* saves in the background while training goes on, and turns a failed save (disk full,
  read-only) into a one-line :class:`train.errors.StorageError`, leaving no unfinished
  ``*.orbax-checkpoint-tmp`` directory behind and the older checkpoints as they were;
* restores the newest checkpoint that restores *and* matches its checksum: a damaged one
  (truncated, emptied, missing an item, bit-flipped) is named with the reason in one line
  and moved to ``<workdir>/damaged/``, and the next older one is tried; with none left,
  :class:`train.errors.CheckpointError`.

Every process of a multi-process run takes part in saving and restoring (Orbax's primary host
is process 0, which alone writes, removes and moves files); ``--workdir`` must be one
directory that all of them see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from train import distributed
from train.errors import CheckpointError, StorageError, os_error_cause
from train.workdir import checkpoint_steps, storage_errors

__all__ = [
    "CHECKPOINTS_TO_KEEP",
    "DAMAGED",
    "PRECISE",
    "Checkpoints",
    "checksum",
    "latest_checkpoint",
    "load_checkpoint",
    "quiet_orbax",
    "read_checkpoint",
    "unfinished_saves",
]

CHECKPOINTS_TO_KEEP = 3
#: The ``state`` item's entry (and ``meta``'s flag) for PreciseBN's statistics.
PRECISE = "precise_batch_stats"
#: Where damaged checkpoints go, in the workdir.
DAMAGED = "damaged"
#: Orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp*`` and renames it when done.
_UNFINISHED = "*.orbax-checkpoint-tmp*"
_MAX_REASON_CHARS = 300
#: How long a failed save's other writes may take to end before its files are removed.
_WRITES_TIMEOUT_S = 120


@contextlib.contextmanager
def quiet_orbax(debug: bool = False) -> Iterator[None]:
    """Silences Orbax's log (absl), which prints tracebacks of errors reported anyway.

    Also drops the "Event loop is closed" errors that follow a failed restore: TensorStore
    then completes the reads still in flight on the event loop Orbax has already closed,
    which is harmless but prints a traceback per read.

    Args:
        debug: Keep the log and those errors (``--debug``).
    """
    log, previous_hook = logging.getLogger("absl"), sys.unraisablehook
    level = log.level

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous_hook(unraisable)

    if not debug:
        log.setLevel(logging.CRITICAL)
        sys.unraisablehook = hook
    try:
        yield
    finally:
        log.setLevel(level)
        sys.unraisablehook = previous_hook


def checksum(tree: Any, meta: Mapping[str, Any]) -> str:
    """SHA-256 of the arrays of ``tree`` (paths, dtypes, shapes, bytes) and of ``meta``.

    ``meta``'s own ``checksum`` entry, if any, is left out.

    Example:
        >>> a = checksum({"w": np.zeros(2, np.float32)}, {"step": 1})
        >>> a == checksum({"w": np.zeros(2, np.float32)}, {"step": 1, "checksum": a})
        True
        >>> a == checksum({"w": np.array([0, 1e-45], np.float32)}, {"step": 1})
        False
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    return digest.hexdigest()


def _host_tree(state: Any, rng: jax.Array, precise_batch_stats: Any = None) -> dict[str, Any]:
    """The state as a tree of numpy arrays: a copy, so donation cannot touch it."""
    tree = {"state": serialization.to_state_dict(state), "rng": jax.random.key_data(rng)}
    if precise_batch_stats is not None:
        tree[PRECISE] = serialization.to_state_dict(precise_batch_stats)
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + " [...]"


def _verify(tree: Any, meta: Mapping[str, Any]) -> None:
    expected = meta.get("checksum")  # Checkpoints of older versions have none.
    if expected is not None and checksum(tree, meta) != expected:
        raise CheckpointError("checksum mismatch: the arrays or metadata read back differ "
                              "from those written")


class Checkpoints:
    """A run's checkpoint directory: asynchronous saves and verified restores.

    Args:
        directory: ``<workdir>/checkpoints`` (created).
        main: Whether this is process 0 (which alone removes and moves files).
        say: Prints a line (process 0's stderr); for the messages about damaged checkpoints.
    """

    def __init__(self, directory: Path, *, main: bool = True,
                 say: Callable[[str], None] = print) -> None:
        self.directory = Path(directory).absolute()
        self.main = main
        self.say = say
        #: Unfinished saves of an earlier run that were found and removed.
        self.removed = self._remove_unfinished() if main else []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=CHECKPOINTS_TO_KEEP,
            create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
        )
        with storage_errors("cannot create the checkpoint directory", self.directory):
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None
        self._failed = False

    def path(self, step: int) -> Path:
        """Where checkpoint ``step`` is (or goes)."""
        return self.directory / str(step)

    def _remove_unfinished(self) -> list[Path]:
        found = unfinished_saves(self.directory)
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        return found

    def _give_up(self) -> None:
        """After a failed save: lets Orbax's other writes of it end (they would recreate
        the unfinished directory), stops Orbax and removes what the save left."""
        self._failed = True
        for thread in threading.enumerate():
            if type(thread).__module__.startswith("orbax.") and thread.is_alive():
                thread.join(_WRITES_TIMEOUT_S)
        with contextlib.suppress(Exception):  # Orbax raises the save's error again.
            self.manager.close()
        if self.main:
            self._remove_unfinished()

    @contextlib.contextmanager
    def _saving(self, step: int) -> Iterator[None]:
        """Turns a failed save into a :class:`StorageError`, after removing what it left."""
        try:
            yield
        except Exception as e:
            cause = os_error_cause(e)
            if cause is None:
                raise
            self._give_up()
            raise StorageError(f"cannot save checkpoint {self.path(step)}: {cause}") from e

    def save(self, state: Any, rng: jax.Array, meta: dict[str, Any], *,
             precise_batch_stats: Any = None) -> Path:
        """Starts saving ``state``, ``rng`` and ``meta`` as checkpoint ``meta['step']``.

        Waits for the previous save first. Returns the checkpoint's path.

        Args:
            state: The training state.
            rng: The run's key.
            meta: JSON-able metadata.
            precise_batch_stats: PreciseBN's statistics, shaped as ``state.batch_stats``,
                saved beside the state (and flagged in ``meta``); ``None`` for none.

        Raises:
            StorageError: This save or the previous one failed for lack of space or rights.
        """
        self.wait()
        step = int(meta["step"])
        tree = _host_tree(state, rng, precise_batch_stats)
        if precise_batch_stats is not None:
            meta = {**meta, PRECISE: True}
        meta = {**meta, "checksum": checksum(tree, meta)}
        with self._saving(step):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        self._pending = step
        return self.path(step)

    def wait(self) -> None:
        """Waits for the save in progress, if any.

        Raises:
            StorageError: It failed; no unfinished directory is left.
        """
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        with self._saving(step):
            self.manager.wait_until_finished()
        if self.main and not self.path(step).is_dir():  # Orbax logged the reason only.
            self._give_up()
            raise StorageError(f"cannot save checkpoint {self.path(step)}: it was not "
                               "completed (run with --debug to see Orbax's log)")

    def close(self) -> None:
        """Waits for the save in progress and releases Orbax's resources."""
        self.wait()
        if not self._failed:  # Else already closed.
            self.manager.close()

    def _restore(self, step: int, state: Any, rng: jax.Array,
                 check: Callable[[dict[str, Any], Path], None]) -> tuple[Any, jax.Array, dict]:
        try:
            meta = dict(self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"])
        except Exception as e:
            raise CheckpointError(f"unreadable metadata ({_reason(e)})") from e
        check(meta, self.path(step))  # A ConfigError is not damage: it propagates.
        # PreciseBN's statistics are recomputed, not resumed, but the checksum covers them.
        template = _host_tree(state, rng, state.batch_stats if meta.get(PRECISE) else None)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"unreadable state ({_reason(e)})") from e
        # Saved dtypes may be wider (int64 step); keep the template's so nothing recompiles.
        tree = jax.tree.map(lambda t, r: np.asarray(r, t.dtype), template, restored["state"])
        _verify(tree, meta)
        state = serialization.from_state_dict(state, tree["state"])
        return state, jax.random.wrap_key_data(jnp.asarray(tree["rng"])), meta

    def restore_latest(
        self, state: Any, rng: jax.Array, check: Callable[[dict[str, Any], Path], None]
    ) -> tuple[Any, jax.Array, dict[str, Any]] | None:
        """Restores the newest intact checkpoint into the structure of ``state``.

        A checkpoint that does not restore, or does not match its checksum, is named in one
        line with the reason and moved to ``<workdir>/damaged/``; the next older one is tried.

        Args:
            state: A state of the run's structure (the template).
            rng: A key of the run's kind (the template).
            check: ``check(meta, path)`` raises if the checkpoint was made with options this
                run cannot continue (:func:`train.config.check_resumable`).

        Returns:
            ``(state, rng, meta)``, or ``None`` if there is no checkpoint at all.

        Raises:
            CheckpointError: There are checkpoints, and none is intact.
        """
        damaged: list[tuple[int, str]] = []
        found = None
        for step in reversed(checkpoint_steps(self.directory)):
            try:
                found = self._restore(step, state, rng, check)
                break
            except CheckpointError as e:
                damaged.append((step, str(e)))
                self.say(f"warning: checkpoint {self.path(step)} is damaged: {e}; "
                         f"moving it to {self.directory.parent / DAMAGED}; trying the "
                         "previous one")
        if damaged:
            self._move_damaged([step for step, _ in damaged])
        if found is None and damaged:
            raise CheckpointError(
                f"--resume: no intact checkpoint in {self.directory}: "
                + "; ".join(f"{step}: {reason}" for step, reason in damaged)
                + f" (moved to {self.directory.parent / DAMAGED}); start afresh without "
                "--resume"
            )
        return found

    def _move_damaged(self, steps: list[int]) -> None:
        if self.main:
            target = self.directory.parent / DAMAGED
            with storage_errors("cannot move a damaged checkpoint to", target):
                target.mkdir(exist_ok=True)
                for step in steps:
                    dest, i = target / str(step), 0
                    while dest.exists():
                        i += 1
                        dest = target / f"{step}-{i}"
                    self.path(step).rename(dest)
        distributed.barrier("train: damaged checkpoints moved")
        self.manager.reload()


def unfinished_saves(directory: Path) -> list[Path]:
    """The unfinished checkpoint saves in ``directory`` (``<step>.orbax-checkpoint-tmp*``)."""
    return sorted(directory.glob(_UNFINISHED)) if directory.is_dir() else []


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest finished checkpoint in ``directory``, or ``None``."""
    steps = checkpoint_steps(directory)
    return directory / str(steps[-1]) if steps else None


def _as_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping) or (hasattr(tree, "items") and hasattr(tree, "keys")):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def read_checkpoint(
    workdir: str | Path, step: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Every item of a checkpoint under ``workdir/checkpoints``, as Orbax infers them.

    Needs no model and no particular layout; when there is a ``meta`` item with a
    ``checksum`` (as :class:`Checkpoints` writes), the ``state`` item is verified against it.

    Args:
        workdir: The run's ``--workdir``.
        step: The checkpoint's step; ``None`` for the latest.

    Returns:
        ``(step, {item name: tree of numpy arrays or JSON values})``.

    Raises:
        CheckpointError: No checkpoint (or none of ``step``), or one that does not match its
            checksum.
    """
    directory = (Path(workdir) / "checkpoints").absolute()
    if not directory.is_dir():
        raise CheckpointError(f"expected orbax checkpoints in {directory}, found no such "
                              "directory.")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with quiet_orbax(), ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps())
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"expected at least one checkpoint in {directory}, found "
                                  "none.")
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}: expected "
                                  f"one of the steps {', '.join(map(str, steps))}.")
        items = _as_dict(manager.restore(step))
    items = {name: item if name == "meta" else jax.tree.map(np.asarray, item)
             for name, item in items.items()}
    meta = items.get("meta")
    if isinstance(meta, dict) and "state" in items:
        try:
            _verify(items["state"], meta)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {directory / str(step)}: {e}") from None
    return int(step), items


def load_checkpoint(workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`train.train.train_and_evaluate`, verified.

    Args:
        workdir: The run's ``--workdir``.
        step: Global step of the checkpoint; ``None`` for the latest.

    Returns:
        ``{'state': {'step', 'params', 'batch_stats', 'opt_state'}, 'rng': uint32 key data,
        'meta': {'epoch', 'step', 'steps_per_epoch', 'config', 'metrics', ...}}`` as numpy
        arrays and JSON values, and ``'precise_batch_stats'`` when the run recomputed BN's
        statistics (``--precise-bn``).

    Raises:
        CheckpointError: No checkpoint in ``workdir``, or a damaged one.
    """
    _, items = read_checkpoint(workdir, step)
    return {**items["state"], "meta": items["meta"]}
