"""The training program's errors and exit statuses, defined once for the code, ``--help`` and docs.

Each error class carries the exit status that ``python -m train.lenet`` ends with when it
stops the run; :data:`EXIT_CODES` lists them all (with success, Ctrl-C and SIGTERM), and
:func:`exit_codes_help` renders that table for ``--help``. The module imports nothing but
the standard library, so :mod:`train.data` (which must not import JAX) can use it.

Example:
    >>> ConfigError("--lr: expected a positive learning rate, got 0.0").exit_code
    2
    >>> EXIT_CODES[WorkdirBusyError.exit_code]
    'the --workdir is in use by another run (the message names its pid and host)'
"""

from __future__ import annotations

import errno
import os
import re

__all__ = [
    "EXIT_CODES",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergedError",
    "StorageError",
    "Terminated",
    "TrainError",
    "WorkdirBusyError",
    "exit_codes_help",
    "os_error_cause",
]

EXIT_OK = 0
#: Ctrl-C: the run stopped after any checkpoint save in progress had finished.
EXIT_INTERRUPTED = 130
#: SIGTERM (what SLURM, Kubernetes and preemptible VMs send), 128 + 15 as a shell reports a
#: process killed by it: the run stopped as on Ctrl-C.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM asked the run to stop; handled like Ctrl-C (a ``KeyboardInterrupt``).

    Example:
        >>> issubclass(Terminated, KeyboardInterrupt), Terminated.exit_code
        (True, 143)
    """

    exit_code = EXIT_TERMINATED


class TrainError(Exception):
    """An error that ends a run with a one-line message and :attr:`exit_code`."""

    #: The process's exit status when this error stops ``python -m train.lenet``.
    exit_code = 1
    #: What the status means, for ``--help`` and the docs (docs/lenet.md).
    meaning = "the run failed"


class DivergedError(TrainError, RuntimeError):
    """The loss (or the state) became NaN or infinite; nothing was saved after it."""

    exit_code = 1
    meaning = ("training diverged (or the coordinator of a multi-process run could not be "
               "reached); the last good checkpoint is kept")


class ConfigError(TrainError, ValueError):
    """A bad command-line option, or one that does not fit the data, devices or checkpoint."""

    exit_code = 2
    meaning = ("a bad option (or one that does not fit the data, the devices or the "
               "checkpoint), or missing or malformed data")


class DataError(TrainError, ValueError):
    """The data is missing, malformed, or inconsistent.

    The message names the file (or ``tfds:<name>[<split>]``) and says what was expected and
    what was found.
    """

    exit_code = 2
    meaning = "the data is missing or malformed"


class WorkdirBusyError(TrainError):
    """Another run holds the lock on the workdir."""

    exit_code = 3
    meaning = "the --workdir is in use by another run (the message names its pid and host)"


class CheckpointError(TrainError, ValueError):
    """No checkpoint could be restored and verified."""

    exit_code = 4
    meaning = "--resume found checkpoints but none of them is intact"


class StorageError(TrainError, OSError):
    """The workdir cannot be written: read-only, not a directory, disk full, ...

    The message names the path and the operating system's reason.
    """

    exit_code = 5
    meaning = ("the --workdir cannot be written (read-only, not a directory, disk full, ...); "
               "the last good checkpoint is kept")


#: Every exit status of ``python -m train.lenet`` and what it means.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "the run finished (or there was nothing left to train)",
    **{cls.exit_code: cls.meaning for cls in (DivergedError, ConfigError, WorkdirBusyError,
                                              CheckpointError, StorageError)},
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the message says which checkpoint to resume from",
    EXIT_TERMINATED: "terminated (SIGTERM, as sent by SLURM, Kubernetes or a preempted VM); "
                     "as for Ctrl-C, the message says which checkpoint to resume from",
}


def exit_codes_help() -> str:
    """The exit statuses as lines for ``--help``.

    Returns:
        One line per status, ``"  <status>  <meaning>"``.

    Example:
        >>> exit_codes_help().splitlines()[0]
        'exit status:'
    """
    return "exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in
                                        EXIT_CODES.items())


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_cause(error: BaseException) -> str | None:
    """The operating system's reason behind ``error``, or ``None`` if there is none.

    Looks through the chain of causes for an :class:`OSError`, and in the messages for the
    ``[os_error_code=N]`` that TensorStore (Orbax's array writer) appends.

    Args:
        error: The exception.

    Returns:
        ``"No space left on device (ENOSPC)"`` and the like, or ``None``.

    Example:
        >>> os_error_cause(ValueError("Failed writing: ... [os_error_code='28']"))
        'No space left on device (ENOSPC)'
        >>> os_error_cause(KeyError("x")) is None
        True
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None) if isinstance(current, OSError) else None
        if code is None:
            match = _OS_ERROR_CODE.search(str(current))
            code = int(match[1]) if match else None
        if code:
            name = errno.errorcode.get(code, f"errno {code}")
            return f"{os.strerror(code)} ({name})"
        current = current.__cause__ or current.__context__
    return None
