"""Inference speed of the LeNet with BatchNorm against the same model with BN folded away.

    python -m benchmarks.fold [--batch 1024] [--repeats 30] [--norm jaxbn|flax]

Three jitted functions get the same device-resident batch (Fashion-MNIST test images when
``/usr/share/datasets/fashion-mnist`` has them, else uniform noise): the LeNet with BN in
inference mode; the folded weights run through the same flax layers (``LeNet(norm='none')``),
which isolates what folding saves; and :func:`train.export.folded_apply`, the exported
model. Calls alternate between them so that drifting machine load hits all alike; each
number is the median over ``--repeats`` rounds after warm-up; speed-up is relative to the
unfolded model. The weights are
random with BN statistics taken from the data; speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import export
from train.model import LeNet


def _images(batch: int) -> tuple[jax.Array, str]:
    from train import data, idx

    files = idx.find_idx_files(f"{data.DEBIAN_DATASETS_ROOT}/fashion-mnist")
    if files is None:
        rng = np.random.default_rng(0)
        return jnp.asarray(rng.uniform(0, 1, (batch, 28, 28, 1)), jnp.float32), "noise"
    images = idx.read_idx(files["test_images"])[:, :, :, None]
    reps = -(-batch // images.shape[0])
    return jnp.asarray(data.to_float(np.tile(images, (reps, 1, 1, 1))[:batch])), "fashion-mnist"


def _variables(model: LeNet, x: jax.Array) -> dict:
    rng = np.random.default_rng(0)
    shapes = {"conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (800, 500),
              "fc2": (500, 10)}
    params = {
        name: {"kernel": jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(s[:-1])), s),
                                     jnp.float32),
               "bias": jnp.zeros(s[-1])}
        for name, s in shapes.items()
    }
    stats = {}
    for name, c in (("bn1", 20), ("bn2", 50)):
        params[name] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                        "bias": jnp.zeros(c)}
        stats[name] = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
    # momentum 0: the running statistics become those of the batch.
    _, updates = model.clone(momentum=0.0).apply(
        {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return {"params": params, "batch_stats": updates["batch_stats"]}


def _time(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--norm", choices=("jaxbn", "flax"), default="jaxbn")
    args = parser.parse_args()

    x, source = _images(args.batch)
    model = LeNet(norm=args.norm)
    variables = _variables(model, x)
    folded, folded_fn = export.export_folded(variables, {"norm": args.norm})
    unfolded = jax.jit(lambda v, x: model.apply(v, x, train=False))
    folded_jit = jax.jit(folded_fn)
    # The folded weights through the unfolded model's own flax layers (LeNet without BN):
    # the same code minus BN, which isolates what folding saves from how folded_apply is
    # written. Valid here because every BN folded (all scales > 0, no affine kept).
    assert not any(k.startswith("affine") for k in folded)
    as_flax = {"params": folded}
    folded_flax = jax.jit(lambda v, x: model.clone(norm="none").apply(v, x, train=False))

    diff = float(jnp.max(jnp.abs(unfolded(variables, x) - folded_jit(folded, x))))
    for _ in range(3):  # warm-up
        _time(unfolded, variables, x)
        _time(folded_jit, folded, x)
        _time(folded_flax, as_flax, x)
    calls = {
        "unfolded (LeNet with BN)": (unfolded, variables),
        "folded, LeNet(norm='none') layers": (folded_flax, as_flax),
        "folded, export.folded_apply": (folded_jit, folded),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):
        for k, (fn, v) in calls.items():
            times[k].append(_time(fn, v, x))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"LeNet inference, batch {args.batch} ({source}), norm={args.norm}, "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}, median of {args.repeats} "
          f"interleaved calls; max |logit difference| {diff:.1e}")
    base = med["unfolded (LeNet with BN)"]
    print(f"{'model':<36} {'ms/batch':>9} {'images/s':>10} {'speed-up':>9}")
    for k, m in med.items():
        print(f"{k:<36} {m * 1e3:>9.2f} {args.batch / m:>10,.0f} {base / m:>8.3f}x")


if __name__ == "__main__":
    main()
