"""Images/s of one LeNet-BN training step: our jitted step vs the seed's PyTorch model.

Our step is exactly the training program's (``train.steps.make_train_step``: uint8 images in,
preprocessing, forward, cross-entropy, backward, SGD-momentum update, state donated, one
jitted call); PyTorch's is the seed's ``nn.Sequential`` LeNet in eager mode (NCHW float32
input already on the device, ``zero_grad``/``forward``/``backward``/``step``). The two run
interleaved, a block of steps each, after warm-up; the table shows medians and the median of
the paired ratios. Also prints the first-step compile time of our step. The device is
whatever JAX picks (a GPU when there is one; PyTorch then runs on CUDA too).

    python -m benchmarks.lenet [--batch-sizes 128,512] [--repeats 15] [--json PATH]

The last line is ``ratio_vs_torch=<ours / torch images/s at batch 128>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train import config, data, distributed, steps

STEPS = 5  # steps per timed block


def _ours(batch: int, conv: str):
    cfg = config.Config(batch_size=batch, conv=conv)
    model = steps.make_model(cfg, 10)
    tx = steps.make_optimizer(cfg, 100)
    state = steps.create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    mesh = distributed.global_mesh(jax.devices()[:1])
    mean, std = data.pixel_stats("fashion_mnist")
    step = steps.make_train_step(model, mean, std, mesh)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, batch, dtype=np.int32))
    t0 = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def run(n: int) -> None:
        s = box["state"]
        for _ in range(n):
            s, metrics = compiled(s, images, labels)
        jax.block_until_ready(metrics["loss"])
        box["state"] = s

    return run, compile_s


def _torch(batch: int):
    import torch

    from train.port import torch_lenet

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_lenet().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def run(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()

    return run


def _timed(run, n: int = STEPS) -> float:
    t = time.perf_counter()
    run(n)
    return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--convs", default="flax,fast", help="our conv formulations to time")
    parser.add_argument("--json", default="benchmarks/results/lenet.json")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    convs = [c for c in args.convs.split(",") if c]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {os.cpu_count()} CPUs")
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runners = {}
        for conv in convs:
            try:
                runners[f"ours[{conv}]"], compile_s = _ours(batch, conv)
            except Exception as e:  # an optional formulation that does not build here
                print(f"  skip ours[{conv}]: {type(e).__name__}: {e}")
                continue
            print(f"batch {batch} ours[{conv}]: first-step compile {compile_s:.2f} s")
            rows.append({"batch": batch, "impl": f"ours[{conv}]", "compile_s": compile_s})
        if have_torch:
            runners["torch"] = _torch(batch)
        for run in runners.values():  # warm-up
            run(3)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                times[name].append(_timed(run))
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {"batch": batch, "impl": name, "ms_per_step": med * 1e3,
                   "images_per_s": batch / med}
            if have_torch and name != "torch":
                ratios = [t_torch / t for t, t_torch in zip(ts, times["torch"], strict=True)]
                row["speed_vs_torch"] = statistics.median(ratios)
            rows.append(row)
    print(f"\n{'batch':>6} {'impl':>12} {'ms/step':>9} {'images/s':>10} {'vs torch':>9}")
    for r in rows:
        if "ms_per_step" in r:
            vs = f"{r['speed_vs_torch']:.2f}x" if "speed_vs_torch" in r else ""
            print(f"{r['batch']:>6} {r['impl']:>12} {r['ms_per_step']:>9.2f} "
                  f"{r['images_per_s']:>10.0f} {vs:>9}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    at128 = [r for r in rows if r.get("batch") == 128 and "speed_vs_torch" in r]
    best = max(at128, key=lambda r: r["speed_vs_torch"]) if at128 else None
    print(f"ratio_vs_torch={best['speed_vs_torch']:.3f} ({best['impl']})" if best
          else "ratio_vs_torch=nan (torch not installed or batch 128 not run)")
    return {"rows": rows}


if __name__ == "__main__":
    main()
