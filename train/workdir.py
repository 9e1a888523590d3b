"""The run's ``--workdir``: one run at a time, nothing deleted, every write failure named.

* :class:`WorkdirLock` holds an exclusive ``fcntl.flock`` on ``<workdir>/.lock`` for the
  whole run. The kernel releases it when the process ends, however it ends (a crash,
  ``SIGKILL``), so a stale lock cannot block the next run; a second run on a busy workdir
  gets :class:`train.errors.WorkdirBusyError` naming the holder's pid and host.
* :func:`archive_previous_run` moves a previous run's outputs to ``previous/<time>/``.
* :func:`write_atomic` replaces a file in one step, so a full disk leaves the old content.
* :func:`storage_errors` turns an :class:`OSError` into a one-line
  :class:`train.errors.StorageError` naming the path and the operating system's reason.

This module needs only the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from train.errors import StorageError, WorkdirBusyError, os_error_cause

__all__ = [
    "LOCK_FILE",
    "OUTPUTS",
    "PREVIOUS",
    "WorkdirLock",
    "archive_previous_run",
    "checkpoint_steps",
    "storage_errors",
    "write_atomic",
]

#: The lock file in the workdir; it holds ``<pid> <host> <start time>`` of the running run.
LOCK_FILE = ".lock"
#: A run's outputs in its workdir; a fresh run moves a previous run's into :data:`PREVIOUS`.
OUTPUTS = ("checkpoints", "metrics.jsonl", "curves.png")
PREVIOUS = "previous"


@contextlib.contextmanager
def storage_errors(doing: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Turns an :class:`OSError` inside the block into a one-line :class:`StorageError`.

    Args:
        doing: What was being done, e.g. ``"cannot write"``.
        path: The path it was done to.

    Example:
        >>> with storage_errors("cannot create", "/proc/x"):
        ...     os.mkdir("/proc/x")
        Traceback (most recent call last):
        ...
        train.errors.StorageError: cannot create /proc/x: No such file or directory (ENOENT)
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"{doing} {path}: {os_error_cause(e) or e}") from e


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replaces ``path`` with ``content`` in one rename: on failure the old file stays.

    Raises:
        StorageError: The file cannot be written (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with storage_errors("cannot write", path):
        try:
            if isinstance(content, str):
                tmp.write_text(content)
            else:
                tmp.write_bytes(content)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _describe_holder(path: Path) -> str:
    try:
        pid, host, *since = path.read_text().split()
    except (OSError, ValueError):
        return "a run that has not yet written its pid"
    started = f", started {' '.join(since)}" if since else ""
    return f"pid {pid} on host {host}{started}"


class WorkdirLock:
    """An exclusive lock on a workdir, held from :meth:`acquire` to :meth:`release`.

    Creates the workdir (and its parents) if needed. Usable as a context manager.

    Args:
        workdir: The run's ``--workdir``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, WorkdirLock(d):
        ...     WorkdirLock(d).acquire()
        Traceback (most recent call last):
        ...
        train.errors.WorkdirBusyError: --workdir ... is in use by another run (pid ...
    """

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises at once if another run holds it.

        Raises:
            WorkdirBusyError: Another run (or another lock in this process) holds it.
            StorageError: The workdir cannot be created or written.
        """
        with storage_errors("cannot use --workdir", self.workdir):
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # Something that is not a directory is in the way.
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         str(self.workdir)) from None
        with storage_errors("cannot create the lock file", self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(f"cannot lock {self.path}: {os_error_cause(e)}") from e
            raise WorkdirBusyError(
                f"--workdir {self.workdir} is in use by another run "
                f"({_describe_holder(self.path)}); wait for it to end or pass another "
                "--workdir"
            ) from None
        try:
            with storage_errors("cannot write the lock file", self.path):
                os.ftruncate(fd, 0)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                os.write(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode())
        except StorageError:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock (closing the file releases it); the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def checkpoint_steps(directory: Path) -> list[int]:
    """The steps of the finished checkpoints in ``directory`` (Orbax writes each into
    ``<step>.orbax-checkpoint-tmp*`` first and renames it ``<step>`` when complete)."""
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

    Raises:
        StorageError: A rename failed.
    """
    workdir = Path(workdir)
    if resume and checkpoint_steps(workdir / "checkpoints"):
        return None
    found = [
        workdir / name
        for name in OUTPUTS
        if (workdir / name).exists()
        and not ((workdir / name).is_dir() and not any((workdir / name).iterdir()))
    ]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = workdir / PREVIOUS / stamp
    with storage_errors("cannot move the previous run to", dest):
        for i in range(1, 1000):
            try:
                dest.mkdir(parents=True)
                break
            except FileExistsError:
                dest = workdir / PREVIOUS / f"{stamp}-{i}"
        for path in found:
            path.rename(dest / path.name)
    return dest
