"""Where a multi-process run's settings come from, checked before JAX starts.

:func:`train.distributed.initialize` takes the coordinator's address, the number of processes
and this process's id from its arguments, else from the ``JAXBN_*`` environment variables
(:func:`process_settings`), else from a cluster environment that
:func:`jax.distributed.initialize` auto-detects (:func:`detected_cluster`); its timeouts the
same way (:func:`timeouts`). Before it joins, a process other than 0 probes the coordinator
(:func:`wait_for_coordinator`), so that a wrong address or a coordinator that is not up fails
with :class:`CoordinatorUnreachableError` instead of JAX's abort from C++.

Example:
    >>> timeouts(5, None, None)[0]
    5
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from typing import Any

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "DEFAULT_SHUTDOWN_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "ENV_COORDINATOR",
    "ENV_HEARTBEAT_TIMEOUT_S",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_SHUTDOWN_TIMEOUT_S",
    "ENV_TIMEOUT_S",
    "CoordinatorUnreachableError",
    "detected_cluster",
    "process_settings",
    "raise_missing",
    "timeouts",
    "wait_for_coordinator",
]

#: ``host:port`` of process 0's coordination service.
ENV_COORDINATOR = "JAXBN_COORDINATOR"
#: Total number of processes.
ENV_NUM_PROCESSES = "JAXBN_NUM_PROCESSES"
#: This process's id, in ``0 .. num_processes - 1``.
ENV_PROCESS_ID = "JAXBN_PROCESS_ID"

#: Overrides of the defaults below (seconds), for launchers that only pass environment.
ENV_TIMEOUT_S = "JAXBN_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT_S = "JAXBN_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN_TIMEOUT_S = "JAXBN_SHUTDOWN_TIMEOUT_S"

#: Seconds to wait for the coordinator and for every process to join.
DEFAULT_TIMEOUT_S = 30
#: Seconds without a heartbeat after which a process counts as dead (JAX's default: 100).
DEFAULT_HEARTBEAT_TIMEOUT_S = 15
#: Seconds a finishing process waits at exit for the others to finish (JAX's default: 300).
DEFAULT_SHUTDOWN_TIMEOUT_S = 120


class CoordinatorUnreachableError(RuntimeError):
    """Nothing accepted a connection at the coordinator address before the timeout."""


def _int_or_none(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def _seconds(name: str, value: int | None, env: str, default: int) -> int:
    if value is None:
        value = _int_or_none(env, os.environ.get(env))
        name = env if value is not None else name
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
    return value


def timeouts(timeout_s: int | None, heartbeat_timeout_s: int | None,
             shutdown_timeout_s: int | None) -> tuple[int, int, int]:
    """The timeouts of :func:`train.distributed.initialize`, in seconds: each argument, else
    its ``JAXBN_*_S`` environment variable, else its default.

    Raises:
        ValueError: One is not a positive integer.
    """
    return (_seconds("timeout_s", timeout_s, ENV_TIMEOUT_S, DEFAULT_TIMEOUT_S),
            _seconds("heartbeat_timeout_s", heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT_S,
                     DEFAULT_HEARTBEAT_TIMEOUT_S),
            _seconds("shutdown_timeout_s", shutdown_timeout_s, ENV_SHUTDOWN_TIMEOUT_S,
                     DEFAULT_SHUTDOWN_TIMEOUT_S))


def process_settings(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int | None, int | None]:
    """The three settings from the arguments, else the environment; checked.

    Returns:
        ``(coordinator_address, num_processes, process_id)``, each ``None`` where neither
        gave it.

    Raises:
        ValueError: A setting from the environment is not an integer, ``num_processes < 1``
            or ``process_id`` is out of range.

    Example:
        >>> process_settings("10.0.0.1:1234", 2, 1)
        ('10.0.0.1:1234', 2, 1)
    """
    coordinator_address = (coordinator_address or os.environ.get(ENV_COORDINATOR)
                           or os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
    num_processes = _int_or_none(
        ENV_NUM_PROCESSES,
        num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES),
    )
    process_id = _int_or_none(
        ENV_PROCESS_ID, process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID)
    )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if num_processes is not None and process_id is not None and not (
        0 <= process_id < num_processes
    ):
        raise ValueError(
            f"process_id must be in [0, {num_processes - 1}] for {num_processes} processes, "
            f"got {process_id}."
        )
    return coordinator_address, num_processes, process_id


def raise_missing(explicit: tuple[str | None, int | None, int | None]) -> None:
    """Raises the ``ValueError`` that names the settings :func:`process_settings` lacks."""
    missing = [
        f"{arg} (or {env})"
        for arg, env, value in zip(
            ("coordinator_address", "num_processes", "process_id"),
            (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), explicit, strict=True)
        if value is None
    ]
    raise ValueError(
        f"a multi-process run needs coordinator_address, num_processes and process_id, "
        f"and no cluster environment (SLURM, Cloud TPU, Open MPI) supplies the rest; "
        f"missing: {', '.join(missing)}."
    )


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would auto-detect (SLURM, TPU, ...), or None.

    JAX has no public "is there a cluster?" query; this asks the same private registry that
    :func:`jax.distributed.initialize` consults. Were it to move, we fall back to letting
    ``initialize`` decide (which requires JAX not to have started yet).
    """
    try:
        from jax._src.clusters import ClusterEnv

        kinds = list(ClusterEnv._cluster_types)
    except (ImportError, AttributeError):  # JAX moved its internals: let initialize decide
        return "unknown"
    for kind in kinds:
        if getattr(kind, "opt_in_only_method", False):
            continue
        try:
            # Kubernetes without the `kubernetes` package warns here; that pod is simply
            # not a multi-process job, which is not worth a warning on every run.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                present = kind.is_env_present()
        except Exception:  # noqa: BLE001 - a broken probe means "not this cluster"
            continue
        if present:
            return kind.__name__
    return None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"coordinator address must be 'host:port' (e.g. 10.0.0.1:12345), got {address!r}."
        )
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Blocks until something accepts TCP connections at ``address``, or raises.

    JAX's client retries for ``initialization_timeout`` and then aborts the process from C++
    with a generic "DEADLINE_EXCEEDED" message; probing first turns the commonest mistake
    (wrong address, process 0 not started, firewall) into a Python exception that says so.
    """
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(2.0, remaining)):
                return
        except OSError as e:  # refused, unreachable, unresolvable: retry until the deadline
            last = e
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    raise CoordinatorUnreachableError(
        f"could not reach the coordinator at {address} within {timeout_s:g} s "
        f"({type(last).__name__}: {last}). Check that process 0 was started with the same "
        f"address, that this host can reach it (port open, no proxy), or raise timeout_s."
    )
