"""The BN paper's Fig. 1, repeated: ``bn_paper_fig1`` of ``python -m train.experiments``.

Ioffe & Szegedy (2015), Fig. 1: the 784-100-100-100-10 sigmoid MLP
(:mod:`train.experiments.mlp`, written with jaxbn's functional API) trained with and without BN,
batch 60, SGD lr 0.5. Measured on Fashion-MNIST: the test accuracy against the step without BN,
with BN's running averages and with PreciseBN (:func:`jaxbn.precise_batch_stats`), and the 15th,
50th and 85th percentiles of a last-layer sigmoid's input.

Like the other experiments it returns ``(title, body, notes, figure)``, with its sizes from the
shared :class:`train.experiments.protocol.Protocol` (the ``f1_*`` fields). Training runs chunks
of steps (those between two evaluations) in one ``lax.scan``, compiled once per network (with
and without BN); every accuracy is on the protocol's test images.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxbn
from train import population
from train.data import Dataset
from train.experiments import mlp, report, scanned
from train.experiments.protocol import Protocol
from train.experiments.runner import Runner

__all__ = ["UNIT", "TABLE_STEPS", "bn_paper_fig1"]

#: The last hidden layer's unit whose input percentiles are plotted (chosen before looking).
UNIT = 0
#: The evaluation steps listed in the table (those the run reaches).
TABLE_STEPS = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)


@functools.cache
def _chunk(lr: float) -> Callable[..., Any]:
    """A jitted ``lax.scan`` of SGD steps on the MLP: ``(net, stats, x, y, idx) -> (net,
    stats, losses)``, ``x`` uint8 ``(M, 784)``, ``idx`` ``(steps, batch)``; compiled once per
    network (with and without BN) and number of steps."""

    def loss_fn(net, stats, x, y):
        logits, stats, _ = mlp.apply(net, stats, x, training=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def chunk(net, stats, x, y, idx):
        def step(carry, i):
            net, stats = carry
            (loss, stats), grads = grad_fn(net, stats, x[i].astype(jnp.float32) / 255, y[i])
            return (jax.tree.map(lambda p, g: p - lr * g, net, grads), stats), loss

        (net, stats), losses = lax.scan(step, (net, stats), idx)
        return net, stats, losses

    return chunk


@jax.jit
def _eval(net: mlp.MLP, stats: Any, x: jax.Array, y: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    """Test accuracy, and the 15/50/85th percentiles over the images of every last-layer
    sigmoid's input, ``(3, 100)``."""
    logits, _, pre = mlp.apply(net, stats, x, training=False)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return accuracy, jnp.percentile(pre, jnp.array([15.0, 50.0, 85.0]), axis=0)


@jax.jit
def _precise(net: mlp.MLP, stats: Any, batches: jax.Array) -> Any:
    """PreciseBN with the functional API: one ``lax.scan`` over the stacked batches."""
    return jaxbn.precise_batch_stats(functools.partial(mlp.moments, net), stats, batches)


def _indices(n: int, batch: int, seed: int, start: int, count: int) -> np.ndarray:
    """Steps ``start .. start + count - 1`` of the training order, ``(count, batch)``."""
    spe = n // batch
    rows, order = [], None
    for s in range(start, start + count):
        e, i = divmod(s, spe)
        if order is None or i == 0:
            order = scanned.epoch_indices(n, batch, seed=seed, epoch=e)
        rows.append(order[i])
    return np.stack(rows)


def _data(ds: Dataset, p: Protocol) -> tuple[Any, ...]:
    """The flattened training images (numpy and on device) and labels, and the test images
    (in ``[0, 1]``) and labels."""
    n = p.f1_train_size
    x_np = ds.train_images[:n].reshape(n, -1)
    test_x = ds.test_images[:p.f1_test_size]
    return (x_np, jnp.asarray(x_np), jnp.asarray(ds.train_labels[:n]),
            jnp.asarray(test_x.reshape(len(test_x), -1).astype(np.float32) / 255),
            jnp.asarray(ds.test_labels[:p.f1_test_size]))


def _run(runner: Runner, p: Protocol, bn: bool, seed: int, data: tuple[Any, ...]
         ) -> dict[str, Any]:
    """One network: test accuracy (and, with BN, with PreciseBN) and the percentiles of the
    last hidden layer's sigmoid inputs, at step 0 and every ``f1_eval_every`` steps."""
    t0 = time.perf_counter()
    x_np, x, y, x_test, y_test = data
    net, stats = mlp.init(jax.random.key(seed), bn=bn)
    chunk = _chunk(float(p.f1_lr))
    out: dict[str, Any] = {"steps": [], "accuracy": [], "precise": [], "percentiles": [],
                           "diverged": False}

    def evaluate(step: int) -> None:
        accuracy, percentiles = _eval(net, stats, x_test, y_test)
        out["steps"].append(step)
        out["accuracy"].append(float(accuracy))
        out["percentiles"].append(np.asarray(percentiles))
        if bn:
            idx = scanned.epoch_indices(len(x_np), p.f1_batch, seed=seed, epoch=10_000 + step)
            k = population.num_precise_batches(p.f1_images, p.f1_batch, len(idx))
            batches = jnp.asarray(x_np[idx[:k]].astype(np.float32) / 255)
            out["precise"].append(float(_eval(
                net, _precise(net, stats, batches), x_test, y_test)[0]))

    evaluate(0)
    for start in range(0, p.f1_steps, p.f1_eval_every):
        count = min(p.f1_eval_every, p.f1_steps - start)
        idx = jnp.asarray(_indices(len(x_np), p.f1_batch, seed, start, count))
        net, stats, losses = chunk(net, stats, x, y, idx)
        if not np.all(np.isfinite(np.asarray(losses))):
            out["diverged"] = True
            break
        evaluate(start + count)
    runner.runs_done += 1
    runner.log(f"  bn_paper_fig1 {'BN' if bn else 'no BN'} seed={seed}: "
               f"test_accuracy={out['accuracy'][-1]:.4f}"
               + (f" precise={out['precise'][-1]:.4f}" if bn else "")
               + (" DIVERGED" if out["diverged"] else "")
               + f" ({time.perf_counter() - t0:.1f} s)")
    return out


def _drift(runs: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """How far the last layer's sigmoid inputs move after the first evaluation: the median
    over units (and seeds) of the range of each unit's 50th percentile, and of its 15-85
    spread."""
    medians, spreads = [], []
    for r in runs:
        q = np.stack(r["percentiles"][1:])  # (evaluations, 3, units), from the first one on
        medians.append(np.median(np.ptp(q[:, 1], axis=0)))
        spreads.append(np.median(np.ptp(q[:, 2] - q[:, 0], axis=0)))
    return report.pm(medians, digits=2), report.pm(spreads, digits=2)


def _table(runs: dict[bool, list[dict[str, Any]]], curves: dict[str, list[list[float]]]
           ) -> str:
    """The accuracy of each curve at the listed steps, then its jitter, the steps it takes to
    reach the no-BN network's final accuracy, and the drift of the sigmoid inputs."""
    steps_ = runs[True][0]["steps"]
    listed = [s for s in TABLE_STEPS if s in steps_] or [steps_[-1]]
    rows = []
    for s in listed:
        i = steps_.index(s)
        rows.append([str(s), *(report.runs_cell([c[i] if i < len(c) else math.nan
                                                 for c in cs]) for cs in curves.values())])
    final_none = float(np.mean([c[-1] for c in curves["no BN"]]))
    reach = [[report.steps_to_reach(np.asarray(steps_), c, final_none) for c in cs]
             for cs in curves.values()]
    drift = {bn: _drift(runs[bn]) for bn in (False, True)}
    summary = [
        ["jitter (points)", *(report.pm([report.jitter(c) for c in cs], 100.0, 2)
                              for cs in curves.values())],
        ["steps to no BN's final accuracy",
         *(report.pm(v, digits=0) if np.isfinite(v).all() else
           f"not reached ({int(np.isnan(v).sum())}/{len(v)})" for v in reach)],
        ["drift of the median input", drift[False][0], drift[True][0], "(same network)"],
        ["drift of the 15–85 spread", drift[False][1], drift[True][1], "(same network)"],
    ]
    return report.table(["step", *curves], rows + summary)


def _figure(runs: dict[bool, list[dict[str, Any]]], curves: dict[str, list[list[float]]],
            seed: int) -> Any:
    """(a) the test accuracy curves; (b), (c) the first seed's percentiles of unit
    :data:`UNIT`'s input, without and with BN, on the same scale."""
    x_steps = np.asarray(runs[True][0]["steps"])
    fig, (ax_acc, ax_none, ax_bn) = report.figure(wide=True, ncols=3)
    for (label, cs), color in zip(curves.items(), ("C1", "C2", "C0"), strict=True):
        report.band(ax_acc, x_steps, [100 * np.asarray(c) for c in cs], label, color=color)
    ax_acc.set(xlabel="step", ylabel="test accuracy (%)")
    ax_acc.set_ylim(max(0.0, 100 * min(np.min(c[1:]) for cs in curves.values() for c in cs)
                        - 2), None)
    ax_acc.set_title("(a) test accuracy", fontsize=9)
    ax_acc.legend(fontsize=6)
    lows, highs = [], []
    for ax, bn, title in ((ax_none, False, "(b) without BN"), (ax_bn, True, "(c) with BN")):
        q = np.stack(runs[bn][0]["percentiles"])[:, :, UNIT]
        for j, pct in enumerate((15, 50, 85)):
            ax.plot(runs[bn][0]["steps"], q[:, j], color="C0", lw=1.2 if pct == 50 else 0.8,
                    ls="-" if pct == 50 else "--", label=f"{pct}th percentile")
        lows.append(q.min())
        highs.append(q.max())
        ax.set(xlabel="step", ylabel=f"input of sigmoid {UNIT}, last hidden layer")
        ax.set_title(f"{title} (seed {seed})", fontsize=9)
        ax.legend(fontsize=6)
    for ax in (ax_none, ax_bn):
        ax.set_ylim(min(lows) - 0.5, max(highs) + 0.5)
    for ax in (ax_acc, ax_none, ax_bn):
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
    return fig


def _notes(ds: Dataset, p: Protocol, num_test: int, seed: int) -> list[str]:
    return [
        f"784-100-100-100-10 MLP, sigmoid hidden units, written with jaxbn's functional API "
        f"(train/experiments/mlp.py); BN on every hidden layer (before the sigmoid), none on the "
        f"output. "
        f"Plain SGD, learning rate {p.f1_lr:g}, batch {p.f1_batch}, {p.f1_steps} steps over "
        f"the first {p.f1_train_size} training images of {ds.name} (pixels / 255); LeCun-normal "
        f"initialization; BN's running averages with momentum {mlp.MOMENTUM:g}. Test "
        f"accuracy on {num_test} test images every {p.f1_eval_every} steps.",
        f"BN, PreciseBN: the same BN network evaluated with statistics recomputed at each "
        f"evaluation from {p.f1_images} training images (batches of {p.f1_batch}, "
        "jaxbn.precise_batch_stats).",
        "Last rows: jitter is the mean absolute change of the test accuracy between "
        "consecutive evaluations over the second half of training; 'steps to' is the first "
        "evaluation at which the curve reaches the no-BN network's final accuracy (mean over "
        "seeds); drift is, over the last hidden layer's 100 sigmoid units (median over "
        "units), the range over the evaluations from the first one on of a unit's 50th "
        "percentile and of its 85th − 15th percentile, inputs from the test images in "
        "inference mode (BN with its running averages).",
        f"Plots (b) and (c): unit {UNIT} of the last hidden layer, seed {seed}, "
        "over the test images, on the same scale.",
    ]


def bn_paper_fig1(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """The BN paper's Fig. 1 on Fashion-MNIST: the sigmoid MLP with and without BN."""
    data = _data(runner.ds, p)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for seed in seeds:
        for bn in (False, True):
            runs[bn].append(_run(runner, p, bn, seed, data))
    curves = {
        "no BN": [r["accuracy"] for r in runs[False]],
        "BN, running averages": [r["accuracy"] for r in runs[True]],
        "BN, PreciseBN": [r["precise"] for r in runs[True]],
    }
    return ("The BN paper's Fig. 1 on Fashion-MNIST", _table(runs, curves),
            _notes(runner.ds, p, len(data[3]), seeds[0]), _figure(runs, curves, seeds[0]))
