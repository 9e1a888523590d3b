"""The devices of a run: ``--devices N`` over all processes, with fake CPU devices if needed.

On a CPU-only machine JAX shows one device unless told otherwise before it starts;
:func:`ensure_devices` asks for ``N / num_processes`` CPU devices per process while that is
still possible (``jax_num_cpu_devices``), then picks the run's devices with
:func:`select_devices`.

Fake CPU devices share the machine's cores and memory, and XLA:CPU synchronizes them at every
collective: with far more devices than cores, the all-reduces of a training step miss XLA's
rendezvous deadline and the process aborts (512 devices on 2 cores do, after a minute or
more). So a process makes at most :func:`max_fake_devices` of them:
:data:`FAKE_DEVICES_PER_CORE` per CPU core, and no more than the available memory holds at
:data:`FAKE_DEVICE_BYTES` each (the replicated LeNet state: parameters, gradients and
optimizer state). A larger ``--devices`` is refused before any device is made.
"""

from __future__ import annotations

import os

import jax

from train import distributed
from train.errors import ConfigError

__all__ = ["FAKE_DEVICES_FLAG", "FAKE_DEVICES_PER_CORE", "FAKE_DEVICE_BYTES", "ensure_devices",
           "max_fake_devices", "select_devices"]

#: The XLA flag that makes fake CPU devices.
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
#: Fake CPU devices per core that a process may make.
FAKE_DEVICES_PER_CORE = 16
#: Memory a fake device needs at least: LeNet's 431,080 float32 parameters replicated five
#: times (parameters, gradients, SGD momentum, and the updated parameters and momentum),
#: about 8.6 MB, rounded up to 16 MiB for the per-device buffers of a step.
FAKE_DEVICE_BYTES = 16 * 2**20


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_fake_devices() -> tuple[int, str]:
    """How many fake CPU devices this process may make, and why that many.

    Returns:
        ``(limit, reason)``: the smaller of :data:`FAKE_DEVICES_PER_CORE` per CPU core and
        the available memory over :data:`FAKE_DEVICE_BYTES`, and a phrase that says which.

    Example:
        >>> limit, reason = max_fake_devices()
        >>> limit >= FAKE_DEVICES_PER_CORE
        True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    limit = FAKE_DEVICES_PER_CORE * cores
    reason = f"{FAKE_DEVICES_PER_CORE} per CPU core, {cores} cores"
    memory = _available_memory()
    if memory is not None and memory // FAKE_DEVICE_BYTES < limit:
        limit = max(1, memory // FAKE_DEVICE_BYTES)
        reason = (f"{memory / 2**30:.1f} GiB of available memory at "
                  f"{FAKE_DEVICE_BYTES // 2**20} MiB each")
    return limit, reason


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
            more fake CPU devices are needed than :func:`max_fake_devices` allows, or ``n``
            does not divide over the processes; the message says how to fix it.

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
        limit, reason = max_fake_devices()
        if local > limit:
            per = "" if processes == 1 else f" ({local} per process)"
            raise ConfigError(
                f"--devices {n}{per}: expected at most {limit} fake CPU devices per process "
                f"on this machine ({reason}); more would miss XLA's collective deadlines or "
                "run out of memory. Use fewer devices (or more processes)"
            )
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
