"""One process of the two-process PreciseBN test, launched by ``tests/test_precise.py``.

``python tests/precise_worker.py COORDINATOR PROCESS_ID OUT.npz``: joins a two-process run
(two CPU devices each, gloo) and recomputes statistics of :func:`data` two ways:

* ``local``: each process pools its own batches (process ``p`` takes batches ``p::2``) on
  one device; the results are merged across processes by an all-gather.
* ``mesh``: every batch is split over the four devices of both processes (each process
  gives its half of the rows) and runs under ``shard_map`` on the global mesh; the moments
  are per device (merged over the mesh axis) for one layer and synchronized for the other.

Importing this module has no side effect (pytest imports it for doctests).
"""

from __future__ import annotations

import sys

import numpy as np

BATCHES, ROWS, FEATURES = 4, 8, 3


def data() -> np.ndarray:
    """``(BATCHES, ROWS, FEATURES)``, each batch with its own mean."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCHES, ROWS, FEATURES)) * [1.0, 2.0, 3.0]
    return (x + np.arange(BATCHES).reshape(-1, 1, 1) * 2.0 + 5.0).astype(np.float32)


def moments_fn(x):
    """Two 'layers': one per device (to be merged), one synchronized over the mesh axis."""
    import jaxbn

    return {"per_device": jaxbn.moments(x), "synced": jaxbn.moments(2.0 * x, axis_name="batch")}


def main(argv: list[str]) -> int:
    coordinator, pid, out = argv[0], int(argv[1]), argv[2]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator, 2, pid, initialization_timeout=60)
    import jaxbn

    x = data()
    local = jaxbn.precise_batch_stats(jaxbn.moments, jaxbn.init(FEATURES)[1],
                                      list(x[pid::2]), unbiased_running_var=True)
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = slice(pid * ROWS // 2, (pid + 1) * ROWS // 2)
    both = {"per_device": jaxbn.init(FEATURES)[1], "synced": jaxbn.init(FEATURES)[1]}
    split = jaxbn.precise_batch_stats(moments_fn, both, list(x[:, rows]), axis_name="batch",
                                      mesh=mesh, unbiased_running_var=True)
    results = {"local": local, "mesh": split["per_device"],
               "mesh_synced": split["synced"]}
    np.savez(out, **{f"{k}/{f}": np.asarray(getattr(v, f)) for k, v in results.items()
                     for f in ("mean", "var", "count")})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
