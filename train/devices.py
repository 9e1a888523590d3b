"""The devices of a run: ``--devices N`` over all processes, with fake CPU devices if needed.

On a CPU-only machine JAX shows one device unless told otherwise before it starts;
:func:`ensure_devices` asks for ``N / num_processes`` CPU devices per process while that is
still possible (``jax_num_cpu_devices``), then picks the run's devices with
:func:`select_devices`.
"""

from __future__ import annotations

import os

import jax

from train import distributed
from train.errors import ConfigError

__all__ = ["FAKE_DEVICES_FLAG", "ensure_devices", "select_devices"]

#: The XLA flag that makes fake CPU devices.
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def ensure_devices(n: int) -> list[jax.Device]:
    """Returns ``n`` devices, creating fake CPU devices if JAX has not started yet.

    In a multi-process run (:func:`train.distributed.initialize` called first), ``n`` counts
    the devices of all processes: each process contributes ``n / num_processes`` of its own,
    and that is also how many fake CPU devices each process creates.

    Args:
        n: Number of devices wanted, over all processes.

    Returns:
        The devices of :func:`select_devices`: each process's first
        ``n / num_processes``, ordered by process (so each process's rows of a batch
        sharded over them are contiguous).

    Raises:
        ConfigError: Fewer than ``n`` devices exist (and it is too late to create fake ones),
            or ``n`` does not divide over the processes; the message says how to fix it.

    Example:
        >>> len(ensure_devices(1))
        1
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
        and not distributed.backends_initialized()
        and FAKE_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", "")
        and jax.config.jax_num_cpu_devices < local
    ):
        jax.config.update("jax_num_cpu_devices", local)
    try:
        return select_devices(n)
    except ValueError as e:
        raise ConfigError(
            f"--devices {n}: {e}. For fake CPU devices, start Python with "
            f"XLA_FLAGS={FAKE_DEVICES_FLAG}={local} (and JAX_PLATFORMS=cpu), e.g. "
            f"`XLA_FLAGS={FAKE_DEVICES_FLAG}={local} python -m train.lenet --devices {n}`; "
            "python -m train.lenet does this itself when JAX has not started yet."
        ) from None


def select_devices(n: int | None = None) -> list[jax.Device]:
    """The first ``n / process_count`` devices of every process, ordered by process.

    Args:
        n: Devices wanted over all processes; ``None`` for all of them.

    Returns:
        The devices, each process's in one contiguous block (by ``(process_index, id)``), so
        that each process holds one block of rows of a batch sharded over them.

    Raises:
        ValueError: ``n`` does not divide over the processes, or some process has fewer than
            ``n / process_count`` devices; the message says how many each has.

    Example:
        >>> [d.id for d in select_devices(1)]
        [0]
    """
    processes = jax.process_count()
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    if n is None:
        return [d for p in sorted(by_process) for d in by_process[p]]
    if n <= 0 or n % processes:
        raise ValueError(f"expected a positive multiple of the {processes} processes' count "
                         f"of devices, got {n}")
    local = n // processes
    if any(len(ds) < local for ds in by_process.values()) or len(by_process) != processes:
        platform = jax.local_devices()[0].platform
        if processes == 1:
            raise ValueError(f"expected {n} devices, got {jax.device_count()} ({platform})")
        have = ", ".join(f"{len(ds)} in process {p}" for p, ds in by_process.items())
        raise ValueError(f"expected {local} devices in each of the {processes} processes "
                         f"({n} in all), got {have} ({platform})")
    return [d for p in sorted(by_process) for d in by_process[p][:local]]
