"""The seed's claims about Batch Normalization, measured: ``python -m train.experiments``.

Section 6.1.2 of the seed says that BN (1) speeds up convergence, (2) makes training less
sensitive to the learning rate, (3) makes saturating activations (sigmoid, tanh) usable and
(4) regularizes; and that (5) it degrades with small batches. Whether BN belongs before or
after the activation (6) is left open. Each experiment below trains the seed's LeNet
(:class:`train.model.LeNet`) on Fashion-MNIST with several seeds
(:mod:`train.experiments.runner`) and writes a plot ``<name>.png`` and a Markdown table
``<name>.md`` (mean ± sample standard deviation over the seeds; :mod:`train.experiments.report`)
into ``--out``. Six test those claims (:mod:`train.experiments.claims_experiments`):

    convergence     smoothed training loss against the step, BN vs no BN        (claim 1)
    lr_sweep        final test accuracy against the learning rate, BN vs no BN  (claim 2)
    sigmoid         sigmoid and tanh networks with and without BN                (claim 3)
    regularization  train/test gap on a small training set, BN vs no BN         (claim 4)
    batch_size      test accuracy against the batch size: no BN, BN, Batch
                    Renorm; and 8 fake devices with synchronized vs per-device
                    BN, next to Ghost BN, its one-device equivalent             (claim 5)
    bn_position     BN before vs after the ReLU, across learning rates          (question 6)

and three on the statistics BN uses at test time
(:mod:`train.experiments.population_experiments`, and :mod:`train.experiments.fig1_experiment`
for the last):

    ema_vs_precise  running averages vs PreciseBN across batch sizes and momenta, and
                    PreciseBN's sample size
    frozen_bn       batches of 2-8 per replica: FrozenBN vs PreciseBN, Batch Renorm and
                    synchronized BN
    bn_paper_fig1   the BN paper's Fig. 1: a sigmoid MLP with and without BN (functional API)

The protocol (:data:`train.experiments.protocol.FULL`; :data:`train.experiments.protocol.QUICK`
with ``--quick``) is shared so that runs repeat across experiments only once per process: SGD
with momentum 0.9, a constant learning rate, no weight decay, BN's running-average momentum 0.9
(PyTorch's default ``momentum=0.1``), the first ``train_size`` training images and the first
``test_size`` test images. Evaluation always uses the running statistics (``train=False``), as a
deployed model does; this is where BN trained on too small batches fails. A run whose training
loss becomes non-finite stops early and counts as diverged; its accuracy is what the broken
network scores (chance). The fake CPU devices are created by :func:`main` before JAX starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from train import data
from train.devices import ensure_devices
from train.errors import TrainError
from train.experiments import (
    claims_experiments,
    fig1_experiment,
    population_experiments,
    report,
)
from train.experiments.protocol import DEVICES, FULL, QUICK
from train.experiments.runner import Runner

__all__ = ["EXPERIMENTS", "main"]

EXPERIMENTS: dict[str, Callable[..., Any]] = {
    **claims_experiments.EXPERIMENTS,
    **population_experiments.EXPERIMENTS,
    "bn_paper_fig1": fig1_experiment.bn_paper_fig1,
}


# --------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.experiments",
        description="Measure the seed's claims about Batch Normalization; write plots and "
                    "Markdown tables.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--only", default=",".join(EXPERIMENTS),
                   help="comma-separated experiments to run")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per configuration (default: 3, or 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny subsets and few steps (for CI; the numbers mean nothing)")
    p.add_argument("--out", default="docs/experiments", help="output directory")
    p.add_argument("--dataset", default="fashion_mnist", help="dataset name")
    p.add_argument("--data-dir", default=None, help="directory with the four IDX files")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the experiments named by ``--only``; returns their wall times in seconds.

    Args:
        argv: Command-line arguments without the program name; ``None`` for ``sys.argv``.

    Raises:
        SystemExit: Status 2 for an unknown experiment, a bad option or missing data.
    """
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        print(f"error: --only: expected names from {', '.join(EXPERIMENTS)}, got "
              f"{args.only!r}", file=sys.stderr)
        raise SystemExit(2)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    if not seeds:
        print(f"error: --seeds: expected a positive integer, got {args.seeds}", file=sys.stderr)
        raise SystemExit(2)
    try:
        # Before anything starts JAX's backends: fake CPU devices can still be made.
        devices = ensure_devices(DEVICES) if "batch_size" in names else jax.devices()[:1]
        ds = data.load_dataset(args.dataset, args.data_dir)
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    protocol = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(ds, protocol.test_size, protocol.eval_batch_size, devices,
                    log=lambda s: print(s, flush=True))
    print(f"data: {ds.name} from {ds.source}; {len(seeds)} seed(s); {report.environment()}; "
          f"{len(jax.devices())} device(s)", flush=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    for name in names:
        print(f"{name}:", flush=True)
        t0 = time.perf_counter()
        title, body, notes, fig = EXPERIMENTS[name](runner, protocol, seeds)
        times[name] = time.perf_counter() - t0
        table = report.write_table(out, name, title, body, notes, seeds, times[name], args.quick)
        plot = report.save_figure(fig, out / f"{name}.png")
        print(f"{name}: {times[name]:.0f} s; wrote {table} and {plot}", flush=True)
    total = time.perf_counter() - t_all
    print(f"done: {len(names)} experiment(s), {runner.runs_done} runs, {total:.0f} s "
          f"({', '.join(f'{n} {t:.0f} s' for n, t in times.items())})", flush=True)
    return times

