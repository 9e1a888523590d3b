"""Many hosts: JAX's multi-process runtime for the training program, and its failure bounds.

One Python process runs per host (or per GPU, as SLURM usually launches them); together they
see one global set of devices, ``jax.devices()``, and a jitted function over a mesh of all of
them runs on every process at once (SPMD). :func:`jax.distributed.initialize` is the engine:
process 0 runs the coordination service, every process connects to it, and cross-process
collectives go through gloo on CPU and NCCL / ICI on GPU / TPU. Batch Normalization needs
nothing more: its ``psum`` over the mesh axis spans every process.

Typical use, identical on one process and on many::

    from train import distributed

    distributed.initialize()          # flags or JAXBN_* environment, else auto-detection
    mesh = distributed.global_mesh()  # all devices of all processes, axis 'batch'
    rows = distributed.process_batch_slice(global_batch_size)
    batch = distributed.make_global_batch(images[rows], mesh)
    ...
    if distributed.is_main_process():
        write_metrics(...)

Failure behaviour. A process that dies (crash, ``SIGKILL``, out of memory, preemption) stops
sending heartbeats; after ``heartbeat_timeout_s`` the coordination service tells every other
process, and JAX *terminates* them (``SIGABRT``, exit status 134 from a shell) with the
message "Terminating process because the JAX distributed service detected fatal errors. This
most likely indicates that another task died". If process 0 (the coordinator) dies, the
others notice at once (their connection closes). A coordinator that cannot be reached makes
:func:`initialize` raise :class:`CoordinatorUnreachableError` after ``timeout_s``; a process
that never joins makes the others abort (as above) about 5 s after ``timeout_s``. The
defaults (30 s, 15 s) bound all of these well under a minute, where JAX's own defaults are
100 s to 5 minutes; ``tests/test_multihost.py`` measures them. Reading the settings and the
timeouts, and probing the coordinator, is :mod:`train.cluster`'s job.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import cluster
from train.cluster import (
    ENV_COORDINATOR,
    ENV_HEARTBEAT_TIMEOUT_S,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_SHUTDOWN_TIMEOUT_S,
    ENV_TIMEOUT_S,
    CoordinatorUnreachableError,
)

__all__ = [
    "AXIS",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_TIMEOUT_S",
    "ENV_HEARTBEAT_TIMEOUT_S",
    "ENV_SHUTDOWN_TIMEOUT_S",
    "CoordinatorUnreachableError",
    "backends_initialized",
    "barrier",
    "broadcast_from_main",
    "global_mesh",
    "initialize",
    "is_main_process",
    "make_global_batch",
    "planned_process_count",
    "process_batch_slice",
    "say",
    "shutdown",
]

#: Name of the data-parallel mesh axis (and of BN's ``axis_name``).
AXIS = "batch"


# --------------------------------------------------------------------------------------------
# Start-up.


def backends_initialized() -> bool:
    """Whether JAX has started its backends (after which devices and the runtime are fixed).

    JAX has no public query for this; it is asked of ``jax._src.xla_bridge``, and if that
    moved, the answer is True (the cautious one: too late to configure anything).

    Returns:
        True once anything touched the devices (``jax.devices()``, a computation).

    Example:
        >>> _ = jax.devices(); backends_initialized()
        True
    """
    try:
        from jax._src import xla_bridge
    except ImportError:
        return True
    return bool(xla_bridge.backends_are_initialized())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_s: int | None = None,
    heartbeat_timeout_s: int | None = None,
    shutdown_timeout_s: int | None = None,
) -> bool:
    """Joins this process to the multi-process JAX runtime, or does nothing for one process.

    Each of ``coordinator_address``, ``num_processes`` and ``process_id`` comes from its
    argument, else from ``JAXBN_COORDINATOR`` (or JAX's ``JAX_COORDINATOR_ADDRESS``) /
    ``JAXBN_NUM_PROCESSES`` / ``JAXBN_PROCESS_ID``, else from the cluster environment that
    :func:`jax.distributed.initialize` auto-detects (SLURM, Cloud TPU, Kubernetes for GKE
    TPUs, Open MPI). With none of these, or ``num_processes == 1``, the run is single-process
    and nothing is started. Must be called before anything else touches JAX
    (``jax.devices()``, any computation).

    On CPU the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``).
    The failure bounds the timeouts set are in the module docstring.

    Args:
        coordinator_address: ``host:port`` of process 0, reachable from every process.
        num_processes: total number of processes.
        process_id: this process's id in ``0 .. num_processes - 1``; 0 runs the coordinator.
        local_device_count: number of CPU devices this process exposes (sets
            ``jax_num_cpu_devices``, overriding ``--xla_force_host_platform_device_count``);
            ``None`` keeps JAX's default. Ignored by GPU and TPU backends.
        timeout_s: seconds to wait for the coordinator to accept connections and for every
            process to join; default ``JAXBN_TIMEOUT_S``, else 30.
        heartbeat_timeout_s: seconds without a heartbeat after which a process counts as
            dead; default ``JAXBN_HEARTBEAT_TIMEOUT_S``, else 15.
        shutdown_timeout_s: seconds a process waits at exit for the others to finish too;
            default ``JAXBN_SHUTDOWN_TIMEOUT_S``, else 120.

    Returns:
        True if a multi-process runtime is running (started now or before), False for a
        single process.

    Raises:
        ValueError: an environment variable is not an integer, the address is not
            ``host:port``, ``process_id`` is out of range, or only some of the three settings
            were given and no cluster environment supplies the rest.
        CoordinatorUnreachableError: nothing listened at the coordinator address in time.
        RuntimeError: JAX had already started (called too late).

    Example:
        >>> initialize(num_processes=1)  # one process: nothing to start
        False
    """
    if jax.distributed.is_initialized():
        return True
    explicit = cluster.process_settings(coordinator_address, num_processes, process_id)
    coordinator_address, num_processes, process_id = explicit
    timeout_s, heartbeat_timeout_s, shutdown_timeout_s = cluster.timeouts(
        timeout_s, heartbeat_timeout_s, shutdown_timeout_s)
    detected = (None if None not in explicit or num_processes == 1
                else cluster.detected_cluster())
    if local_device_count is not None:
        _set_local_device_count(local_device_count)
    if num_processes == 1 or (explicit == (None, None, None) and detected is None):
        return False
    if None in explicit and detected is None:
        cluster.raise_missing(explicit)

    # Affects only the CPU backend; gloo is JAX's default today, named here so that a
    # changed default cannot silently leave CPU processes without cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start = time.monotonic()
    if coordinator_address is not None and process_id not in (None, 0):
        cluster.wait_for_coordinator(coordinator_address, timeout_s)
    remaining = max(2, math.ceil(timeout_s - (time.monotonic() - start)))
    if None not in explicit:
        print(
            f"jaxbn: process {process_id}/{num_processes} joining the coordinator at "
            f"{coordinator_address} (waits {remaining} s for all {num_processes} processes; "
            f"a dead process is detected after {heartbeat_timeout_s} s)",
            file=sys.stderr,
            flush=True,
        )
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=remaining,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=shutdown_timeout_s,
        )
    except ValueError as e:
        if detected == "unknown" and explicit == (None, None, None) and (
            "coordinator_address" in str(e)
        ):
            return False  # detected_cluster could not tell, and JAX found no cluster either
        raise
    return True


def _set_local_device_count(n: int) -> None:
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"local_device_count must be a positive int, got {n!r}.")
    if backends_initialized():
        if jax.local_device_count() != n:
            raise RuntimeError(
                f"local_device_count={n} but JAX has already started with "
                f"{jax.local_device_count()} local devices; call initialize() before anything "
                f"touches JAX."
            )
        return
    jax.config.update("jax_num_cpu_devices", n)


def shutdown() -> None:
    """Leaves the multi-process runtime (waits for the other processes); a no-op otherwise.

    JAX also calls this at interpreter exit, so calling it is only needed to leave early.
    """
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def planned_process_count() -> int:
    """The number of processes of this run, known without starting JAX's backends.

    After :func:`initialize` joined a multi-process run it is that run's ``num_processes``
    (auto-detected ones included), which :func:`jax.process_count` would only report after
    starting the backends, too late to choose the number of fake CPU devices per process.

    Returns:
        ``num_processes`` of the joined run; else :func:`jax.process_count` if the backends
        have started; else 1.

    Example:
        >>> planned_process_count()
        1
    """
    if jax.distributed.is_initialized():
        try:
            from jax._src.distributed import global_state

            return int(global_state.num_processes)
        except (ImportError, AttributeError, TypeError):  # JAX moved its internals
            pass
    if backends_initialized():
        return jax.process_count()
    return 1


# --------------------------------------------------------------------------------------------
# Helpers for a data-parallel training loop.


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: int) -> int:
    """Process 0's ``value`` on every process (``value`` itself on one process).

    Example:
        >>> broadcast_from_main(3)
        3
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def is_main_process() -> bool:
    """True on process 0: the one that prints, writes metrics, plots and logs.

    Example:
        >>> is_main_process()
        True
    """
    return jax.process_index() == 0


def say(*args: Any, **kwargs: Any) -> None:
    """``print`` on process 0 only; the other processes of a multi-process run are quiet."""
    if is_main_process():
        print(*args, **kwargs)


def global_mesh(
    devices: Sequence[jax.Device] | None = None, axis_name: str = AXIS
) -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process).

    The axis is explicit, as with :func:`jax.make_mesh`'s defaults; the devices keep their
    order (give them grouped by process, as :func:`train.devices.select_devices` does), so
    each process's devices hold one contiguous block of rows of a batch sharded along
    ``axis_name``.

    Args:
        devices: The mesh's devices; ``None`` for all, ordered by ``(process_index, id)``.
        axis_name: Name of the mesh axis (BN's ``axis_name`` under ``shard_map``).

    Returns:
        A :class:`jax.sharding.Mesh` of shape ``(len(devices),)``.

    Example:
        >>> mesh = global_mesh()
        >>> mesh.axis_names, mesh.size == jax.device_count()
        (('batch',), True)
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis_name,),
                axis_types=(jax.sharding.AxisType.Explicit,))


def process_batch_slice(
    global_batch_size: int, mesh: Mesh | None = None, *, axis_name: str = AXIS
) -> slice:
    """The rows of a global batch that this process loads and feeds.

    Args:
        global_batch_size: rows of the global batch, divisible by the number of devices
            along ``axis_name``.
        mesh: the mesh the batch is sharded over (default :func:`global_mesh`).
        axis_name: the mesh axis the batch's first dimension is sharded along.

    Returns:
        ``slice(start, stop)``: this process's contiguous block of rows, of length
        ``global_batch_size / jax.process_count()`` for a mesh over all devices.

    Raises:
        ValueError: the batch does not divide over the devices, or this process's rows are
            not contiguous in ``mesh`` (build it with :func:`global_mesh`).

    Example:
        >>> process_batch_slice(8)  # one process holds every row
        slice(0, 8, None)
    """
    mesh = global_mesh(axis_name=axis_name) if mesh is None else mesh
    n = mesh.shape[axis_name]
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"{n} devices along mesh axis {axis_name!r}."
        )
    sharding = NamedSharding(mesh, P(axis_name))
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    if not starts:
        raise ValueError(f"this process has no device in the mesh {mesh}.")
    for (_, stop), (start, _) in zip(starts, starts[1:], strict=False):
        if stop != start:
            raise ValueError(
                f"this process's rows {starts} are not contiguous in the mesh; order its "
                f"devices by process, as global_mesh() does."
            )
    return slice(starts[0][0], starts[-1][1])


def make_global_batch(local: Any, mesh: Mesh | None = None, spec: P | None = None) -> Any:
    """Assembles one global :class:`jax.Array` from every process's rows.

    Every process calls this with its own rows (those of :func:`process_batch_slice`); the
    result is one array (or pytree of arrays) of the global shape, sharded by ``spec``,
    whose shards live on the processes that supplied them. No data crosses processes. On
    one process this is ``jax.device_put``.

    Args:
        local: This process's rows, an array or a pytree of arrays (e.g. images, labels).
        mesh: The global mesh (default :func:`global_mesh`).
        spec: How the global array is sharded (default ``P(AXIS)``: rows over the batch
            axis).

    Returns:
        A global :class:`jax.Array` (or the same pytree of them).

    Example:
        >>> import numpy as np
        >>> batch = make_global_batch(np.zeros((8, 3), np.float32))
        >>> batch.shape, batch.sharding.spec == P(AXIS)
        ((8, 3), True)
    """
    mesh = global_mesh() if mesh is None else mesh
    sharding = NamedSharding(mesh, P(AXIS) if spec is None else spec)
    if sharding.is_fully_addressable:
        return jax.device_put(local, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local
    )
