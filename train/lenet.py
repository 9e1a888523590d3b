"""Trains the seed's LeNet with Batch Normalization: ``python -m train.lenet``.

The program in the shape of the flax examples: the options (:mod:`train.config`), the
training loop (:func:`train.train.train_and_evaluate`, which documents the outputs, resuming
and multi-process runs), and this ``main``. Data parallelism over ``--devices N`` comes from
:mod:`train.steps` (fake CPU devices are created before JAX starts, when it has not yet);
several processes join with ``--coordinator/--num-processes/--process-id``
(:mod:`train.distributed`). The last line printed is a summary such as::

    final: epochs=5 steps=2340 test_accuracy=0.9115 test_loss=0.2410 train_accuracy=0.9496 ...

A fresh program first keeps freed memory in its heap (:func:`train.runtime.tune_allocator`:
without it, XLA:CPU's per-step buffers are page-faulted in anew on every step).

Errors end the run with one line on stderr, ``error: <what and why>``, and the exit status
of :data:`train.errors.EXIT_CODES` (``--help`` lists them); ``--debug`` adds the traceback.
SIGTERM (a scheduler's preemption) stops the run as Ctrl-C does, on every process that
receives it: a checkpoint save in progress finishes, the message names the latest complete
checkpoint, and the exit status is 143.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax

from train import distributed, metrics, runtime
from train.checkpoints import latest_checkpoint
from train.config import parse_args, validate
from train.devices import ensure_devices
from train.errors import EXIT_INTERRUPTED, ConfigError, Terminated, TrainError
from train.train import say, terminate_like_interrupt, train_and_evaluate

__all__ = ["main"]


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
        distributed.backends_initialized()
        and all(v is None for v in settings)
        and not any(os.environ.get(k) for k in env)
    ):
        return jax.distributed.is_initialized()
    try:
        return distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _interrupted(workdir: str, what: str = "interrupted") -> str:
    """What a Ctrl-C (or SIGTERM) leaves behind, as found on disk (a save in progress has
    finished)."""
    latest = latest_checkpoint(Path(workdir).absolute() / "checkpoints")
    if latest is None:
        return (f"{what} before the first checkpoint was saved: nothing to resume, the "
                "next run starts from scratch")
    return f"{what}; the latest checkpoint, {latest}, is complete: continue with --resume"


@contextlib.contextmanager
def _exit_on_errors(workdir: str, debug: bool) -> Iterator[None]:
    """Ends the program on an error: ``error: <message>`` on stderr and its exit status."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if debug:
            traceback.print_exc()
        terminated = isinstance(interrupt, Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\n{_interrupted(workdir, what)}", file=sys.stderr, flush=True)
        raise SystemExit(Terminated.exit_code if terminated else EXIT_INTERRUPTED) from None
    except (TrainError, distributed.CoordinatorUnreachableError) as error:
        if debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(getattr(error, "exit_code", 1)) from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs ``python -m train.lenet``; the last line printed is the ``final:`` summary.

    With ``--coordinator/--num-processes/--process-id`` (or their ``JAXBN_*`` variables, or
    a detected cluster) it first joins the multi-process runtime; then every process of the
    run executes this same function.

    Args:
        argv: Command-line arguments without the program name; ``None`` for ``sys.argv``.

    Returns:
        The final metrics (see :func:`train.train.train_and_evaluate`).

    Raises:
        SystemExit: With the status of :data:`train.errors.EXIT_CODES` on an error, Ctrl-C
            or SIGTERM.
    """
    if not distributed.backends_initialized():
        # A fresh process: before JAX starts its threads, which then share one malloc arena.
        runtime.tune_allocator()
    args = parse_args(argv)
    with _exit_on_errors(args.workdir, args.config.debug), terminate_like_interrupt():
        validate(args.config)  # Before joining: every process of a run fails alike, and at once.
        _join(args.coordinator, args.num_processes, args.process_id)
        if args.config.devices > 1:
            # Before anything starts JAX's backends: fake CPU devices can still be made.
            ensure_devices(args.config.devices)
        result = train_and_evaluate(args.config, args.workdir)
    say(f"checkpoint: {result['checkpoint']}")
    say(f"metrics: {result['metrics']}")
    say(f"plot: {result['plot']}")
    print(metrics.final_line(result), flush=True)
    return result


if __name__ == "__main__":
    main()
