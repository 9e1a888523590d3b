"""The seed's claims about BN, measured: six experiments of ``python -m train.experiments``.

Section 6.1.2 of the seed says that BN speeds up convergence (:func:`convergence`), makes
training less sensitive to the learning rate (:func:`lr_sweep`), makes saturating activations
usable (:func:`sigmoid`) and regularizes (:func:`regularization`); and that it degrades with
small batches (:func:`batch_size`). Whether BN belongs before or after the activation
(:func:`bn_position`) is left open. Each experiment trains the seed's LeNet through the shared
:class:`train.experiments.runner.Runner`, with its sizes from
:class:`train.experiments.protocol.Protocol`, and returns ``(title, body, notes, figure)``: a
Markdown table, its notes and a plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from train.experiments import report
from train.experiments.protocol import DEVICES, Protocol
from train.experiments.runner import Result, Runner, Spec

__all__ = ["EXPERIMENTS", "batch_size", "bn_position", "convergence", "lr_sweep",
           "regularization", "sigmoid"]

#: Steps to reach this smoothed training loss measure the speed of convergence.
LOSS_TARGET = 0.6
#: Steps over which equivalent runs (synced vs one device, per-device vs Ghost BN) are compared.
EARLY = 20
#: Accuracy within this of the best counts as "good" in the learning-rate sweep.
GOOD_WITHIN = 0.02

NORM_LABELS = {"none": "no BN", "bn": "BN", "renorm": "Batch Renorm", "ghost": "Ghost BN"}
COLORS = {"bn": "C0", "none": "C1", "renorm": "C2", "ghost": "C3"}


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
        f"({report.plural(p.bs_images / p.train_size, 'epoch')} of {p.train_size} images), "
        f"so the number of steps is {p.bs_images} / batch; the learning rate is {p.bs_lr:g} × "
        f"batch / {p.bs_lr_batch} up to batch {p.bs_lr_batch} (linear scaling) and "
        f"{p.bs_lr:g} above. {p.test_size} test images.",
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
}
