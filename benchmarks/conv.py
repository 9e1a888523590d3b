"""Benchmark train.conv against flax.linen.Conv (XLA) and PyTorch on CPU.

Run: ``.venv/bin/python -m benchmarks.conv [--reps 20] [--batches 128,512]``.

Two tables, every number a median over ``--reps`` interleaved rounds (each round
runs every contender once, in turn, after warm-up), so that machine noise hits
all contenders alike:

1. (run and printed first) A whole LeNet-BN training step (conv-pool-BN-ReLU
   x2, dense 500, dense 10, softmax cross-entropy, SGD momentum 0.9), one jitted
   step with ``donate_argnums``, versus the same model in PyTorch eager.  JAX
   runs with flax's ``nn.max_pool`` (the obvious model) and with a reshape-based
   2x2 max pool, because XLA:CPU's ``nn.max_pool`` gradient (select-and-scatter,
   lowered to a scatter with materialised index arrays) is the next bottleneck
   once the convolutions are fast.  ``minflt``: page faults per step.
2. Convolution forward+backward at LeNet's shapes: conv1 ``(B,28,28,1) -> 20``
   (kernel and bias gradients only: its input is data, as in the network) and
   conv2 ``(B,12,12,20) -> 50`` (input, kernel and bias gradients), 5x5 VALID.
   JAX contenders are a jitted ``jax.vjp`` plus cotangent pullback (the output
   is returned too); PyTorch is ``nn.Conv2d`` (NCHW) with autograd.

Page faults: XLA:CPU allocates a step's temporaries as one buffer; above glibc's
32 MiB mmap threshold it is mapped afresh, and faulted page by page, on every
step (both JAX and, for its big tensors, PyTorch).  Running with
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=8589934592`` in the environment keeps freed memory in
the heap and removes those faults for every contender.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from train.conv import Conv, conv2d

try:
    import torch
except ImportError:  # torch is optional
    torch = None


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3):
    """Median wall time (s) per contender over ``reps`` interleaved rounds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


# ----------------------------------------------------------------------------- conv level


def _lax_conv(x, k, b):
    y = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def _ours_conv(x, k, b):
    return conv2d(x, k, b, padding="VALID")


def _jax_fb(conv, x, k, b, g, with_dx):
    if with_dx:
        fn = jax.jit(lambda x, k, b, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(conv, x, k, b)))
    else:
        fn = jax.jit(
            lambda x, k, b, g: (lambda y, vjp: (y, vjp(g)))(
                *jax.vjp(lambda k, b: conv(x, k, b), k, b)
            )
        )
    return lambda: jax.block_until_ready(fn(x, k, b, g))


def _nchw(a):
    """A writable, contiguous NCHW torch tensor from an NHWC array."""
    return torch.from_numpy(np.array(np.asarray(a).transpose(0, 3, 1, 2), order="C"))


def _torch_fb(x, k, b, g, with_dx):
    tx = _nchw(x)
    tx.requires_grad_(with_dx)
    layer = torch.nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(np.asarray(k).transpose(3, 2, 0, 1))))
        layer.bias.copy_(torch.from_numpy(np.array(b)))
    tg = _nchw(g)

    def run():
        layer.zero_grad(set_to_none=True)
        tx.grad = None
        layer(tx).backward(tg)

    return run


def conv_table(batches, reps):
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        for name, (h, cin, cout, with_dx) in {
            "conv1": (28, 1, 20, False),
            "conv2": (12, 20, 50, True),
        }.items():
            x = jnp.asarray(rng.standard_normal((batch, h, h, cin), np.float32))
            k = jnp.asarray(rng.standard_normal((5, 5, cin, cout), np.float32) * 0.1)
            b = jnp.zeros((cout,), jnp.float32)
            g = jnp.asarray(rng.standard_normal((batch, h - 4, h - 4, cout), np.float32))
            fns = {
                "flax/lax": _jax_fb(_lax_conv, x, k, b, g, with_dx),
                "ours": _jax_fb(_ours_conv, x, k, b, g, with_dx),
            }
            if torch is not None:
                fns["torch"] = _torch_fb(x, k, b, g, with_dx)
            rows.append((f"{name} B={batch}", interleaved(fns, reps)))
    print("\nConv forward+backward, median ms (conv1: dK, db only; conv2: dx, dK, db)")
    head = f"{'case':14s} {'flax/lax':>9s} {'ours':>8s}"
    if torch is not None:
        head += f" {'torch':>8s}"
    head += f" {'flax/ours':>10s}"
    if torch is not None:
        head += f" {'torch/ours':>11s}"
    print(head)
    for case, t in rows:
        line = f"{case:14s} {t['flax/lax'] * 1e3:9.2f} {t['ours'] * 1e3:8.2f}"
        if "torch" in t:
            line += f" {t['torch'] * 1e3:8.2f}"
        line += f" {t['flax/lax'] / t['ours']:9.2f}x"
        if "torch" in t:
            line += f" {t['torch'] / t['ours']:10.2f}x"
        print(line)
    return rows


# ----------------------------------------------------------------------------- step level


def reshape_max_pool(x):
    """2x2 / stride-2 max pool via reshape + max (cheap, fusible gradient on XLA:CPU)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def flax_max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class LeNetBN(nn.Module):
    conv: Callable[..., nn.Module] = nn.Conv
    pool: Callable[[jax.Array], jax.Array] = flax_max_pool

    @nn.compact
    def __call__(self, x, train: bool = True):
        for features in (20, 50):
            x = self.conv(features, (5, 5), padding="VALID")(x)
            x = self.pool(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(500)(x))
        return nn.Dense(10)(x)


def jax_step(conv, pool, batch, images, labels):
    model = LeNetBN(conv, pool)
    variables = model.init(jax.random.key(0), images[:1])
    tx = optax.sgd(0.01, momentum=0.9)
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

    def loss_fn(params, stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    def _step(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    step = jax.jit(_step, donate_argnums=(0, 1, 2))

    def run():
        *new_state, loss = step(*state, images, labels)
        state[:] = new_state
        loss.block_until_ready()

    return run


def torch_step(images, labels):
    tnn = torch.nn
    model = tnn.Sequential(
        tnn.Conv2d(1, 20, 5), tnn.MaxPool2d(2), tnn.BatchNorm2d(20), tnn.ReLU(),
        tnn.Conv2d(20, 50, 5), tnn.MaxPool2d(2), tnn.BatchNorm2d(50), tnn.ReLU(),
        tnn.Flatten(), tnn.Linear(800, 500), tnn.ReLU(), tnn.Linear(500, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = _nchw(images)
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    loss_fn = tnn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    return run


def with_faults(fn, counter):
    def run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counter.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    return run


def step_table(batches, reps):
    contenders = {
        "flax Conv + nn.max_pool": (nn.Conv, flax_max_pool),
        "ours + nn.max_pool": (Conv, flax_max_pool),
        "flax Conv + reshape pool": (nn.Conv, reshape_max_pool),
        "ours + reshape pool": (Conv, reshape_max_pool),
    }
    print("\nLeNet-BN training step (jit + donate; torch eager), median over interleaved rounds")
    print(
        f"{'batch':>5s} {'contender':26s} {'ms/step':>8s} {'img/s':>8s} {'minflt':>7s}"
        f" {'vs flax':>8s} {'vs torch':>9s}"
    )
    for batch in batches:
        rng = np.random.default_rng(batch)
        images = jnp.asarray(rng.standard_normal((batch, 28, 28, 1), np.float32))
        labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
        faults = {name: [] for name in contenders}
        fns = {
            name: with_faults(jax_step(conv, pool, batch, images, labels), faults[name])
            for name, (conv, pool) in contenders.items()
        }
        if torch is not None:
            fns["torch eager"] = torch_step(images, labels)
        t = interleaved(fns, reps)
        base, ref = t["flax Conv + nn.max_pool"], t.get("torch eager")
        for name, sec in t.items():
            minflt = f"{np.median(faults[name][-reps:]):7.0f}" if name in faults else f"{'-':>7s}"
            vs_torch = f"{ref / sec:8.2f}x" if ref else f"{'-':>9s}"
            print(
                f"{batch:5d} {name:26s} {sec * 1e3:8.2f} {batch / sec:8.0f} {minflt}"
                f" {base / sec:7.2f}x {vs_torch}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="interleaved rounds (median)")
    parser.add_argument("--batches", default="128,512")
    parser.add_argument("--skip-conv", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tv = f"{torch.__version__} ({torch.get_num_threads()} threads)" if torch else "absent"
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {tv}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    # Training step first: glibc's malloc adapts its mmap threshold to what a
    # process has freed before, and the step should see a fresh process's state.
    if not args.skip_step:
        step_table(batches, args.reps)
    if not args.skip_conv:
        conv_table(batches, args.reps)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
