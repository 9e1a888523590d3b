"""One process of a multi-process test run, launched by ``tests/test_multihost.py``.

``python tests/multihost_worker.py MODE --out DIR [options]``, with the process's place in
the run given by ``--coordinator/--num-processes/--process-id`` or by the ``JAXBN_*``
environment variables (both are what :func:`train.distributed.initialize` reads). Modes:

* ``bn``: Batch Normalization over the global mesh, under ``shard_map`` and under plain
  ``jit``, with and without masks; saves this process's rows of the sharded results and the
  replicated ones to ``DIR/p<id>.npz`` (:func:`compute` is shared with the in-process
  reference).
* ``die``: one collective, then process ``--victim`` leaves with ``os._exit(3)`` (after
  writing the time to ``DIR/died``) while the others keep running collectives.
* ``loop``: every process runs collectives (writing ``DIR/ready<id>`` after the first)
  until ``--max-seconds``; the test kills one of them.
* ``init``: joins the run, prints the sum over all devices of one all-reduce, and exits
  (for auto-detection, an unreachable coordinator, a missing peer).

And ``python tests/multihost_worker.py lenet --writes FILE [ARGS ...]`` runs
``python -m train.lenet ARGS`` (as ``runpy`` runs ``-m``, flags and all), appending to
``FILE`` the path of every file the process opens for writing (a Python audit hook), one per
line as it happens, so that the test can tell which process wrote what, even of a killed one.

Importing this module has no side effect (pytest imports it for doctests).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

import numpy as np

GLOBAL_BATCH = 16
FEATURES = 5
#: (rows, height) of the mask: per example and position, broadcast over the features.
MASK_SHAPE = (GLOBAL_BATCH, 3, 1)
#: Rows per device on a four-device mesh: 4. Device 0 keeps 5 of its 12 elements, device 1
#: one row, device 2 none at all, device 3 all but two elements: every weighting differs.
_MASK_KEEP = {
    0: [(0, 0), (0, 2), (1, 1), (2, 0), (3, 2)],
    1: [(5, 0), (5, 1), (5, 2)],
    2: [],
    3: [(r, h) for r in range(12, 16) for h in range(3) if (r, h) not in {(13, 1), (15, 0)}],
}
VARIANTS = ("shard_map", "shard_map_mask", "jit", "jit_mask")


def inputs() -> dict[str, np.ndarray]:
    """The global batch every process (and the reference) slices its rows from."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(GLOBAL_BATCH, 3, FEATURES)) * 2 + 5).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    mask = np.zeros(MASK_SHAPE, bool)
    for cells in _MASK_KEEP.values():
        for r, h in cells:
            mask[r, h, 0] = True
    return {"x": x, "cotangent": cotangent, "mask": mask}


def compute(mesh) -> dict[str, np.ndarray]:
    """BN's outputs, new statistics and gradients for every variant, as this process sees them.

    Sharded results (``y``, ``dx``) hold this process's rows only; replicated ones (the
    statistics, ``dscale``, ``dbias``) are whole. ``rows`` is ``[start, stop)``.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jaxbn
    from train import distributed

    axis = distributed.AXIS
    rows = distributed.process_batch_slice(GLOBAL_BATCH, mesh)
    local = {k: v[rows] for k, v in inputs().items()}
    batch = distributed.make_global_batch(local, mesh)
    params, stats = jaxbn.init(FEATURES)
    params = jaxbn.BatchNormParams(params.scale * 1.5, params.bias + 0.25)
    kwargs = dict(training=True, axis=-1, momentum=0.9, epsilon=1e-5)

    def variant(use_shard_map: bool, use_mask: bool):
        def bn(x, p, s, m):
            return jaxbn.batch_norm(x, p, s, mask=m if use_mask else None,
                                    axis_name=axis if use_shard_map else None, **kwargs)

        if use_shard_map:
            bn = jax.shard_map(bn, mesh=mesh, in_specs=(P(axis), P(), P(), P(axis)),
                               out_specs=(P(axis), P()))

        def loss(x, p, s, m, ct):
            y, new_stats = bn(x, p, s, m)
            return jnp.sum(y * ct), (y, new_stats)

        @jax.jit
        def step(x, p, s, m, ct):
            (_, (y, new_stats)), (dx, dp) = jax.value_and_grad(
                loss, argnums=(0, 1), has_aux=True)(x, p, s, m, ct)
            return {"y": y, "mean": new_stats.mean, "var": new_stats.var,
                    "count": new_stats.count, "dx": dx, "dscale": dp.scale, "dbias": dp.bias}

        return step(batch["x"], params, stats, batch["mask"], batch["cotangent"])

    out = {"rows": np.array([rows.start, rows.stop])}
    for name in VARIANTS:
        results = variant(name.startswith("shard_map"), name.endswith("_mask"))
        for key, arr in results.items():
            out[f"{name}/{key}"] = _local_view(arr)
    return out


def _local_view(a) -> np.ndarray:
    if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _collective(mesh):
    """A jitted all-reduce over every device of every process."""
    import jax
    from jax.sharding import PartitionSpec as P

    from train import distributed

    f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, distributed.AXIS), mesh=mesh,
                              in_specs=P(distributed.AXIS), out_specs=P()))
    local = np.ones((jax.local_device_count(), 1024), np.float32)
    v = distributed.make_global_batch(local, mesh)
    return lambda: f(v).block_until_ready()[0, 0].item()


def _keep_reducing(step, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        step()
        time.sleep(0.01)
    print("no failure detected: every collective completed", flush=True)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def run_lenet(argv: list[str]) -> int:
    """``--writes FILE ARGS...``: ``python -m train.lenet ARGS``, logging opens for writing."""
    if len(argv) < 2 or argv[0] != "--writes":
        raise SystemExit("usage: multihost_worker.py lenet --writes FILE [train.lenet flags]")
    log = open(argv[1], "a", buffering=1)  # noqa: SIM115 - open until the process ends

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return
        mode, flags = args[1], args[2]
        writing = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
            isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writing:
            log.write(os.fsdecode(args[0]) + "\n")

    sys.addaudithook(hook)
    sys.argv = ["python -m train.lenet", *argv[2:]]
    try:
        runpy.run_module("train.lenet", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lenet"]:
        return run_lenet(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=("bn", "die", "loop", "init"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--local-devices", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=20)
    ap.add_argument("--heartbeat", type=int, default=10)
    ap.add_argument("--victim", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=90.0)
    args = ap.parse_args(argv)

    from train import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           local_device_count=args.local_devices, timeout_s=args.timeout,
                           heartbeat_timeout_s=args.heartbeat)
    import jax

    pid = jax.process_index()
    print(f"process {pid}/{jax.process_count()}: {jax.local_device_count()} local devices, "
          f"{jax.device_count()} in all", flush=True)
    mesh = distributed.global_mesh()
    if args.mode == "bn":
        np.savez(args.out / f"p{pid}.npz", **compute(mesh))
        return 0
    step = _collective(mesh)
    print(f"all-reduce over {jax.device_count()} devices: {step():g}", flush=True)
    if args.mode == "init":
        return 0
    if args.mode == "die":
        if pid == args.victim:
            (args.out / "died").write_text(repr(time.time()))
            os._exit(3)
    else:
        (args.out / f"ready{pid}").write_text(repr(time.time()))
    _keep_reducing(step, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
