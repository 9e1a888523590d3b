"""The seed's claims about Batch Normalization, measured: ``python -m train.experiments``.

Section 6.1.2 of the seed says that BN (1) speeds up convergence, (2) makes training less
sensitive to the learning rate, (3) makes saturating activations (sigmoid, tanh) usable and
(4) regularizes; and that (5) it degrades with small batches. Whether BN belongs before or
after the activation (6) is left open. Each experiment below trains the seed's LeNet
(:class:`train.model.LeNet`) on Fashion-MNIST with several seeds (:mod:`train.runner`) and
writes a plot ``<name>.png`` and a Markdown table ``<name>.md`` (mean ± sample standard
deviation over the seeds; :mod:`train.report`) into ``--out``:

    convergence     smoothed training loss against the step, BN vs no BN        (claim 1)
    lr_sweep        final test accuracy against the learning rate, BN vs no BN  (claim 2)
    sigmoid         sigmoid and tanh networks with and without BN                (claim 3)
    regularization  train/test gap on a small training set, BN vs no BN         (claim 4)
    batch_size      test accuracy against the batch size: no BN, BN, Batch
                    Renorm; and 8 fake devices with synchronized vs per-device
                    BN, next to Ghost BN, its one-device equivalent             (claim 5)
    bn_position     BN before vs after the ReLU, across learning rates          (question 6)

and three on the statistics BN uses at test time (:mod:`train.population_experiments`, and
:mod:`train.fig1_experiment` for the last):

    ema_vs_precise  running averages vs PreciseBN across batch sizes and momenta, and
                    PreciseBN's sample size
    frozen_bn       batches of 2-8 per replica: FrozenBN vs PreciseBN, Batch Renorm and
                    synchronized BN
    bn_paper_fig1   the BN paper's Fig. 1: a sigmoid MLP with and without BN (functional API)

The protocol (:data:`FULL`; :data:`QUICK` with ``--quick``) is shared so that runs repeat
across experiments only once per process: SGD with momentum 0.9, a constant learning rate, no
weight decay, BN's running-average momentum 0.9 (PyTorch's default ``momentum=0.1``), the first
``train_size`` training images and the first ``test_size`` test images. Evaluation always uses
the running statistics (``train=False``), as a deployed model does; this is where BN trained on
too small batches fails. A run whose training loss becomes non-finite stops early and counts as
diverged; its accuracy is what the broken network scores (chance). The fake CPU devices are
created by :func:`main` before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train import data, fig1_experiment, population_experiments, report
from train.devices import ensure_devices
from train.errors import TrainError
from train.runner import Result, Runner, Spec

__all__ = ["EXPERIMENTS", "FULL", "QUICK", "Protocol", "main"]

#: Number of fake devices of the synchronized-BN runs.
DEVICES = 8
#: Steps to reach this smoothed training loss measure the speed of convergence.
LOSS_TARGET = 0.6
#: Steps over which equivalent runs (synced vs one device, per-device vs Ghost BN) are compared.
EARLY = 20
#: Accuracy within this of the best counts as "good" in the learning-rate sweep.
GOOD_WITHIN = 0.02


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Sizes of the experiments.

    Attributes:
        train_size: Training images (the first ones of the training set).
        test_size: Test images (the first ones of the test set).
        eval_batch_size: Evaluation batch size (a multiple of :data:`DEVICES`).
        batch_size: Batch size of the shared protocol.
        steps: Training steps of the shared protocol.
        lr: Learning rate of the shared protocol where one is needed.
        lrs: Learning rates of ``lr_sweep``.
        convergence_lrs: Learning rates of ``convergence`` (one panel each).
        saturating_lrs: Learning rates of ``sigmoid``.
        position_lrs: Learning rates of ``bn_position``.
        smooth: Window of the moving average of the training loss.
        reg_train_size: Training images of ``regularization`` (small, to overfit).
        reg_batch_size: Batch size of ``regularization``.
        reg_steps: Training steps of ``regularization``.
        reg_lr: Learning rate of ``regularization``.
        reg_eval_every: Steps between evaluations in ``regularization``.
        bs_images: Training examples seen by every run of ``batch_size``, whatever its batch
            size (so the number of steps is ``bs_images / batch``).
        bs_lr: Learning rate at batch size ``bs_lr_batch``; smaller batches scale it down
            linearly, larger ones keep it.
        bs_lr_batch: See ``bs_lr``.
        batch_sizes: One-device batch sizes of ``batch_size``.
        per_device_batch_sizes: Per-device batch sizes of the :data:`DEVICES`-device runs.
        pb_train_size: Training images of ``ema_vs_precise``.
        pb_epochs: Epochs of ``ema_vs_precise`` (at every batch size).
        pb_batch_sizes: Batch sizes of ``ema_vs_precise``.
        pb_lr: Learning rate at batch ``pb_lr_batch``, scaled linearly with the batch.
        pb_lr_batch: See ``pb_lr``.
        pb_warmup_epochs: Linear warm-up of ``ema_vs_precise``, in epochs.
        pb_momenta: BN momenta of the running averages compared with PreciseBN.
        pb_images: PreciseBN's images after every epoch.
        pb_sample_sizes: PreciseBN's sample sizes compared at the end.
        pb_subsets: Random subsets per sample size (and seed).
        fz_train_size: Training images of ``frozen_bn``.
        fz_epochs: Epochs of ``frozen_bn``.
        fz_frozen_epochs: The last epochs that FrozenBN trains frozen.
        fz_replicas: Data-parallel replicas of ``frozen_bn``.
        fz_batch_sizes: Images per replica.
        fz_lr: Learning rate at global batch ``fz_lr_batch``; smaller batches scale it down
            linearly.
        fz_lr_batch: See ``fz_lr``.
        fz_images: PreciseBN's images in ``frozen_bn``.
        f1_train_size: Training images of ``bn_paper_fig1``.
        f1_test_size: Test images of ``bn_paper_fig1``.
        f1_steps: Training steps of ``bn_paper_fig1``.
        f1_batch: Its batch size.
        f1_lr: Its learning rate (plain SGD).
        f1_eval_every: Steps between its evaluations.
        f1_images: PreciseBN's images at each of its evaluations.
    """

    train_size: int = 10_240
    test_size: int = 5_000
    eval_batch_size: int = 1_000
    batch_size: int = 64
    steps: int = 250
    lr: float = 0.1
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    convergence_lrs: tuple[float, ...] = (0.01, 0.1)
    saturating_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    position_lrs: tuple[float, ...] = (0.01, 0.1, 0.3)
    smooth: int = 20
    reg_train_size: int = 1_024
    reg_batch_size: int = 32
    reg_steps: int = 1_280
    reg_lr: float = 0.03
    reg_eval_every: int = 80
    bs_images: int = 10_240
    bs_lr: float = 0.1
    bs_lr_batch: int = 64
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 256)
    per_device_batch_sizes: tuple[int, ...] = (2, 4, 8, 32)
    pb_train_size: int = 16_384
    pb_epochs: int = 8
    pb_batch_sizes: tuple[int, ...] = (32, 256, 2048)
    pb_lr: float = 0.05
    pb_lr_batch: int = 128
    pb_warmup_epochs: float = 1.0
    pb_momenta: tuple[float, ...] = (0.9, 0.99)
    pb_images: int = 4_096
    pb_sample_sizes: tuple[int, ...] = (256, 512, 1_024, 2_048, 4_096, 8_192, 16_384)
    pb_subsets: int = 2
    fz_train_size: int = 8_192
    fz_epochs: int = 4
    fz_frozen_epochs: int = 1
    fz_replicas: int = 8
    fz_batch_sizes: tuple[int, ...] = (2, 4, 8)
    fz_lr: float = 0.1
    fz_lr_batch: int = 64
    fz_images: int = 4_096
    f1_train_size: int = 60_000
    f1_test_size: int = 10_000
    f1_steps: int = 50_000
    f1_batch: int = 60
    f1_lr: float = 0.5
    f1_eval_every: int = 1_000
    f1_images: int = 6_000


#: The full suite (on a 2-core CPU: the first six experiments about 25 minutes, the three on
#: test-time statistics about 36 minutes of CPU time).
FULL = Protocol()
#: ``--quick``: tiny subsets and few steps, for CI; the numbers mean nothing.
QUICK = Protocol(
    train_size=512, test_size=256, eval_batch_size=128, batch_size=32, steps=20,
    lrs=(0.01, 0.1, 1.0), convergence_lrs=(0.1,), saturating_lrs=(0.1,), position_lrs=(0.1,),
    smooth=5, reg_train_size=128, reg_batch_size=16, reg_steps=40, reg_lr=0.03,
    reg_eval_every=20, bs_images=64, bs_lr_batch=32, batch_sizes=(2, 16),
    per_device_batch_sizes=(2,),
    pb_train_size=512, pb_epochs=2, pb_batch_sizes=(64,), pb_lr_batch=32,
    pb_warmup_epochs=0.5, pb_images=128, pb_sample_sizes=(128, 512), pb_subsets=1,
    fz_train_size=128, fz_epochs=2, fz_replicas=4, fz_batch_sizes=(2,), fz_lr_batch=8,
    fz_images=64, f1_train_size=512, f1_test_size=256, f1_steps=40, f1_eval_every=20,
    f1_images=120,
)

NORM_LABELS = {"none": "no BN", "bn": "BN", "renorm": "Batch Renorm", "ghost": "Ghost BN"}
COLORS = {"bn": "C0", "none": "C1", "renorm": "C2", "ghost": "C3"}


# --------------------------------------------------------------------------------------------
# Experiments. Each takes (runner, protocol, seeds) and returns (title, body, notes, figure).


def _base(p: Protocol, **kw: Any) -> Spec:
    """The shared protocol's spec."""
    return Spec(**{"batch_size": p.batch_size, "steps": p.steps, "train_size": p.train_size,
                   "lr": p.lr, **kw})


def _smoothed_loss_at(results: Sequence[Result], window: int, index: int) -> str:
    """The smoothed training loss at step ``index``, mean ± std, or "diverged"."""
    if any(r.diverged for r in results):
        return "diverged"
    return report.pm([report.smooth(r.losses, window)[index] for r in results], digits=3)


def _steps_to(losses: np.ndarray, target: float, window: int) -> float:
    below = np.nonzero(report.smooth(losses, window) <= target)[0]
    return float(below[0] + 1) if len(below) else math.nan


def convergence(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 1: training loss against the step, with and without BN, at each LR."""
    fig, axes = report.figure(wide=len(p.convergence_lrs) > 1, ncols=len(p.convergence_lrs))
    rows = []
    for ax, lr in zip(axes, p.convergence_lrs, strict=True):
        for norm in ("bn", "none"):
            results = runner.runs(_base(p, norm=norm, lr=lr), seeds)
            curves = [report.smooth(r.losses, p.smooth) for r in results]
            report.band(ax, np.arange(1, p.steps + 1), curves, NORM_LABELS[norm],
                        color=COLORS[norm])
            reach = [_steps_to(r.losses, LOSS_TARGET, p.smooth) for r in results]
            reached = [s for s in reach if math.isfinite(s)]
            when = report.pm(reached, digits=0) if reached else "never"
            if 0 < len(reached) < len(reach):
                when += f" ({len(reached)}/{len(reach)} runs)"
            quarter = max(p.steps // 4, 1)
            rows.append([
                f"{lr:g}", NORM_LABELS[norm], when,
                _smoothed_loss_at(results, p.smooth, quarter - 1),
                _smoothed_loss_at(results, p.smooth, -1),
                report.accuracy_cell(results),
            ])
        ax.set_title(f"lr={lr:g}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(f"train loss ({p.smooth}-step mean)", fontsize=8)
        ax.set_ylim(0, 2.5)
        ax.legend(fontsize=8)
    header = ["lr", "model", f"steps to loss ≤ {LOSS_TARGET}",
              f"loss at step {max(p.steps // 4, 1)}", f"loss at step {p.steps}",
              "test accuracy (%)"]
    notes = [
        f"Batch {p.batch_size}, {p.steps} steps, SGD momentum 0.9, constant learning rate, "
        f"{p.train_size} training / {p.test_size} test images of {runner.ds.name}.",
        f"Losses are training-batch losses averaged over the last {p.smooth} steps; "
        "'steps to loss' is the first step where that average reaches the target.",
    ]
    return "Convergence: BN vs no BN", report.table(header, rows), notes, fig


def lr_sweep(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 2: final test accuracy against the learning rate."""
    fig, (ax,) = report.figure()
    by_norm = {}
    for norm in ("bn", "none"):
        by_norm[norm] = [runner.runs(_base(p, norm=norm, lr=lr), seeds) for lr in p.lrs]
        report.errorbar(ax, p.lrs, by_norm[norm], NORM_LABELS[norm], color=COLORS[norm])
    rows = [[f"{lr:g}", *(report.accuracy_cell(by_norm[norm][i]) for norm in ("bn", "none"))]
            for i, lr in enumerate(p.lrs)]
    good = []
    for norm in ("bn", "none"):
        means = [np.mean([r.test_accuracy for r in rs]) for rs in by_norm[norm]]
        best = max(means)
        ok = [f"{lr:g}" for lr, m in zip(p.lrs, means, strict=True) if m >= best - GOOD_WITHIN]
        good.append(f"{NORM_LABELS[norm]}: best {100 * best:.1f}% at lr="
                    f"{p.lrs[int(np.argmax(means))]:g}; within {100 * GOOD_WITHIN:.0f} points "
                    f"of it at lr ∈ {{{', '.join(ok)}}} ({len(ok)} of {len(p.lrs)})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)", fontsize=8)
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.set_title(f"{p.steps} steps of batch {p.batch_size}", fontsize=9)
    ax.legend(fontsize=8)
    notes = [
        f"Batch {p.batch_size}, {p.steps} steps, constant learning rate, {p.train_size} "
        f"training / {p.test_size} test images. A diverged run (non-finite loss) scores what "
        "its broken network scores (about 10%).",
        *good,
    ]
    return ("Learning-rate sensitivity: test accuracy vs learning rate",
            report.table(["lr", "BN", "no BN"], rows), notes, fig)


def sigmoid(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 3: saturating activations with and without BN (ReLU for reference)."""
    acts = ("sigmoid", "tanh", "relu")
    fig, axes = report.figure(wide=True, ncols=2)
    rows = []
    x = np.arange(1, p.steps + 1)
    for act in acts:
        for j, lr in enumerate(p.saturating_lrs):
            cells = []
            for norm in ("bn", "none"):
                results = runner.runs(_base(p, norm=norm, activation=act, lr=lr), seeds)
                cells.append(report.accuracy_cell(results))
                if act != "relu":
                    ax = axes[acts.index(act)]
                    report.band(ax, x, [report.smooth(r.losses, p.smooth) for r in results],
                          f"{NORM_LABELS[norm]}, lr={lr:g}", color=f"C{j}",
                          ls="-" if norm == "bn" else "--")
            rows.append([act, f"{lr:g}", *cells])
    for ax, act in zip(axes, acts[:2], strict=False):
        ax.set_title(act, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(f"train loss ({p.smooth}-step mean)", fontsize=8)
        ax.set_ylim(0, 2.5)
        ax.legend(fontsize=7)
    notes = [
        f"The activation replaces ReLU everywhere (both conv stages and fc1). Batch "
        f"{p.batch_size}, {p.steps} steps, {p.train_size} training / {p.test_size} test images. "
        "ReLU rows are the reference.",
    ]
    return ("Saturating activations: sigmoid and tanh with and without BN",
            report.table(["activation", "lr", "BN", "no BN"], rows), notes, fig)


def bn_position(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Question 6: BN before (the seed's order) vs after the ReLU."""
    fig, (ax,) = report.figure()
    variants = [("bn", "before_relu", "BN before ReLU"), ("bn", "after_relu", "BN after ReLU"),
                ("none", "before_relu", "no BN")]
    results = {}
    for norm, pos, label in variants:
        results[label] = [runner.runs(_base(p, norm=norm, bn_position=pos, lr=lr), seeds)
                          for lr in p.position_lrs]
        report.errorbar(ax, p.position_lrs, results[label], label,
                  color={"BN before ReLU": "C0", "BN after ReLU": "C2", "no BN": "C1"}[label])
    def final_loss(rs: Sequence[Result]) -> str:
        if any(r.diverged for r in rs):
            return f"diverged ({sum(r.diverged for r in rs)}/{len(rs)})"
        return report.pm([r.losses[-p.smooth:].mean() for r in rs], digits=3)

    rows = [[f"{lr:g}", *(report.accuracy_cell(results[label][i]) for _, _, label in variants),
             *(final_loss(results[label][i]) for label in ("BN before ReLU", "BN after ReLU"))]
            for i, lr in enumerate(p.position_lrs)]
    ax.set_xscale("log")
    ax.set_xlabel("learning rate", fontsize=8)
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.set_title("BN before vs after the ReLU", fontsize=9)
    ax.legend(fontsize=8)
    header = ["lr", "before ReLU", "after ReLU", "no BN", "final train loss, before",
              "final train loss, after"]
    notes = [
        f"Before: conv, pool, BN, ReLU (the seed's order); after: conv, pool, ReLU, BN. fc1 has "
        f"no BN in either. Batch {p.batch_size}, {p.steps} steps, {p.train_size} training / "
        f"{p.test_size} test images. Train loss: mean of the last {p.smooth} batch losses.",
    ]
    return "BN before vs after the activation", report.table(header, rows), notes, fig


def regularization(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 4: on a small training set, does BN shrink the train/test gap?"""
    fig, (ax_loss, ax_acc) = report.figure(wide=True, ncols=2)
    rows = []
    for norm in ("bn", "none"):
        spec = Spec(norm=norm, lr=p.reg_lr, batch_size=p.reg_batch_size, steps=p.reg_steps,
                    train_size=p.reg_train_size, eval_every=p.reg_eval_every, eval_train=True)
        results = runner.runs(spec, seeds)
        steps = np.asarray([c[0] for c in results[0].curve])
        label = NORM_LABELS[norm]
        report.band(ax_loss, steps, [np.asarray([c[1] for c in r.curve]) for r in results],
                    label, marker=".", ms=3, color=COLORS[norm])
        for col, ls, what in ((2, "-", "test"), (4, ":", "train")):
            report.band(ax_acc, steps,
                        [100 * np.asarray([c[col] for c in r.curve]) for r in results],
                        f"{label}, {what}", ls=ls, marker=".", ms=3, color=COLORS[norm])
        gap = [r.train_accuracy - r.test_accuracy for r in results]
        best = [min(c[1] for c in r.curve) for r in results]
        rows.append([
            label, report.pm([r.train_accuracy for r in results], 100.0),
            report.accuracy_cell(results), report.pm(gap, 100.0),
            report.pm([r.train_loss for r in results], digits=4)
            if not any(r.diverged for r in results) else "diverged",
            report.loss_cell(results),
            report.pm(best, digits=3) if not any(r.diverged for r in results) else "diverged",
        ])
    ax_loss.set_ylabel("test loss", fontsize=8)
    ax_loss.set_title("test loss (eval mode)", fontsize=9)
    ax_acc.set_ylabel("accuracy (%)", fontsize=8)
    ax_acc.set_title(f"{p.reg_train_size} training images: train vs test", fontsize=9)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    header = ["model", "train accuracy (%)", "test accuracy (%)", "gap (points)",
              "train loss", "test loss", "lowest test loss"]
    notes = [
        f"{p.reg_train_size} training images, batch {p.reg_batch_size}, {p.reg_steps} steps "
        f"({p.reg_steps * p.reg_batch_size // p.reg_train_size} epochs), lr {p.reg_lr:g}, no "
        f"weight decay, no augmentation; {p.test_size} test images. Train metrics are on the "
        "training images in eval mode; 'lowest test loss' is the minimum over the evaluations "
        f"every {p.reg_eval_every} steps.",
    ]
    return ("Regularization: train/test gap on a small training set", report.table(header, rows),
            notes, fig)


def _max_gap(a: Sequence[Sequence[Result]], b: Sequence[Sequence[Result]],
             steps: int = EARLY) -> float:
    """Largest difference of the first ``steps`` training losses of paired runs."""
    gaps = [np.max(np.abs(x.losses[:steps] - y.losses[:steps]))
            for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=False)]
    return float(max(gaps)) if gaps else math.nan


def _epochs(n: float) -> str:
    return f"{n:g} epoch" + ("" if n == 1 else "s")


def _bs_lr(p: Protocol, batch: int) -> float:
    return p.bs_lr * min(1.0, batch / p.bs_lr_batch)


def _bs_spec(p: Protocol, norm: str, batch: int, **kw: Any) -> Spec:
    return Spec(norm=norm, batch_size=batch, lr=_bs_lr(p, batch), train_size=p.train_size,
                steps=max(p.bs_images // batch, 1), **kw)


_BS_DEVICE_LABELS = {
    "synced": f"synced BN, {DEVICES} devices",
    "local": f"per-device BN, {DEVICES} devices",
    "ghost": "Ghost BN, 1 device",
}


def _bs_one_device(runner: Runner, p: Protocol, seeds: Sequence[int], ax: Any
                   ) -> tuple[dict[str, list[list[Result]]], str]:
    """No BN, BN and Batch Renorm on one device against the batch size; and its table."""
    one = {}
    for norm in ("none", "bn", "renorm"):
        one[norm] = [runner.runs(_bs_spec(p, norm, b), seeds) for b in p.batch_sizes]
        report.errorbar(ax, p.batch_sizes, one[norm], NORM_LABELS[norm], color=COLORS[norm])
    rows = [[str(b), str(max(p.bs_images // b, 1)), f"{_bs_lr(p, b):.3g}",
             *(report.accuracy_cell(one[n][i]) for n in ("none", "bn", "renorm"))]
            for i, b in enumerate(p.batch_sizes)]
    return one, report.table(["batch", "steps", "lr", "no BN", "BN", "Batch Renorm"], rows)


def _bs_many_devices(runner: Runner, p: Protocol, seeds: Sequence[int], ax: Any
                     ) -> tuple[dict[str, list[list[Result]]], str]:
    """Synced and per-device BN on :data:`DEVICES` devices, and Ghost BN; and its table."""
    many = {}
    styles = {"synced": dict(color="C0"), "local": dict(color="C4"),
              "ghost": dict(color="C3", ls="--", marker="x")}
    for kind, label in _BS_DEVICE_LABELS.items():
        if kind == "ghost":
            specs = [_bs_spec(p, "ghost", DEVICES * b, virtual_batch_size=b)
                     for b in p.per_device_batch_sizes]
        else:
            specs = [_bs_spec(p, "bn", DEVICES * b, devices=DEVICES, synced=kind == "synced")
                     for b in p.per_device_batch_sizes]
        many[kind] = [runner.runs(s, seeds) for s in specs]
        report.errorbar(ax, p.per_device_batch_sizes, many[kind], label, **styles[kind])
    rows = [[str(b), str(DEVICES * b), str(max(p.bs_images // (DEVICES * b), 1)),
             f"{_bs_lr(p, DEVICES * b):.3g}",
             *(report.accuracy_cell(many[k][i]) for k in _BS_DEVICE_LABELS)]
            for i, b in enumerate(p.per_device_batch_sizes)]
    header = ["per-device batch", "global batch", "steps", "lr", *_BS_DEVICE_LABELS.values()]
    return many, report.table(header, rows)


def _bs_notes(p: Protocol, many: dict[str, list[list[Result]]],
              same: list[list[Result]]) -> list[str]:
    return [
        f"Every run sees the same number of training examples, {p.bs_images} "
        f"({_epochs(p.bs_images / p.train_size)} of {p.train_size} images), so the number of "
        f"steps is {p.bs_images} / batch; the learning rate is {p.bs_lr:g} × batch / "
        f"{p.bs_lr_batch} up to batch {p.bs_lr_batch} (linear scaling) and {p.bs_lr:g} above. "
        f"{p.test_size} test images.",
        "Batch Renorm: r_max=3, d_max=5 from the first step (no warm-up). BN momentum 0.9 for "
        "all (the running statistics average about the last 10 batches).",
        f"Second table: {DEVICES} fake CPU devices, each with the per-device batch. Synced BN "
        "normalizes with the statistics of the global batch (one all-reduce per BN layer); "
        "per-device BN with those of its own shard, the running statistics then averaged over "
        "the devices. Ghost BN on one device with virtual batch = per-device batch computes "
        "what per-device BN computes, and synced BN what one-device BN computes on the global "
        "batch (the first table's BN column): the first step's training losses differ by at "
        f"most {_max_gap(many['local'], many['ghost'], 1):.1e} (per-device vs Ghost) and "
        f"{_max_gap(many['synced'], same, 1):.1e} (synced vs one device), float rounding. "
        f"Training amplifies it (by step {EARLY}: {_max_gap(many['local'], many['ghost']):.1e} "
        f"and {_max_gap(many['synced'], same):.1e}), so after hundreds of steps the twins are "
        "different runs that agree only within the seeds' spread.",
    ]


def batch_size(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 5: test accuracy against the batch size; and synchronized BN across devices."""
    fig, (ax1, ax2) = report.figure(wide=True, ncols=2)
    one, table1 = _bs_one_device(runner, p, seeds, ax1)
    many, table2 = _bs_many_devices(runner, p, seeds, ax2)
    for ax, xs, xl, title in (
        (ax1, p.batch_sizes, "batch size (1 device)", "one device"),
        (ax2, p.per_device_batch_sizes, f"examples per device ({DEVICES} devices)",
         f"{DEVICES} devices: global batch = {DEVICES} × x"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    # One-device BN runs on the same global batches as the synced runs (where swept).
    same = [one["bn"][p.batch_sizes.index(DEVICES * b)] if DEVICES * b in p.batch_sizes
            else [] for b in p.per_device_batch_sizes]
    return ("Batch size: BN, Batch Renorm and synchronized BN", table1 + "\n\n" + table2,
            _bs_notes(p, many, same), fig)


EXPERIMENTS: dict[str, Callable[..., Any]] = {
    "convergence": convergence,
    "lr_sweep": lr_sweep,
    "sigmoid": sigmoid,
    "batch_size": batch_size,
    "bn_position": bn_position,
    "regularization": regularization,
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


if __name__ == "__main__":
    main()
