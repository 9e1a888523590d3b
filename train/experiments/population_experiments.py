"""BN's test-time statistics, measured: two experiments of ``python -m train.experiments``.

The statistics BN normalizes with at test time are its weakest point (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021). These experiments measure, on Fashion-MNIST, what
the library's PreciseBN (:mod:`jaxbn.precise`) and FrozenBN (``train.lenet
--freeze-bn-epochs``) change (a third, the BN paper's Fig. 1 with PreciseBN, is
:mod:`train.experiments.fig1_experiment`):

    ema_vs_precise  the seed's LeNet at batch 32 to 2048 for a fixed number of epochs: test
                    accuracy after every epoch with the running averages (momentum 0.9 and
                    0.99, from the same runs) and with PreciseBN; and how many images
                    PreciseBN needs to reach its plateau
    frozen_bn       batches of 2 to 8 per replica, 8 data-parallel replicas: BN, BN with
                    PreciseBN, BN with the last epoch frozen (FrozenBN), Batch Renorm and
                    synchronized BN

Each returns ``(title, body, notes, figure)`` as the experiments of :mod:`train.experiments` do,
with its sizes from the shared :class:`train.experiments.protocol.Protocol`. Training runs whole
epochs in one ``lax.scan`` (:mod:`train.experiments.scanned`), compiled once per model and batch
shape; the LeNets use the fast convolution (``conv='fast'``: under ``scan`` on XLA:CPU
``flax.linen.Conv`` is more than ten times slower). Evaluation and PreciseBN are the training
program's (:func:`train.steps.evaluate`, :func:`train.population.make_precise_fn`); every
accuracy is on the protocol's test images.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import distributed, population, steps
from train.distributed import AXIS
from train.experiments import report, scanned
from train.experiments.protocol import Protocol
from train.experiments.runner import Runner
from train.model import LeNet

__all__ = ["EXPERIMENTS"]

#: The running averages' decay of the frozen_bn runs (PyTorch's default ``momentum=0.1``).
BN_MOMENTUM = 0.9
#: A PreciseBN sample is "enough" when its accuracy is within this many points of the
#: largest sample's, on average over seeds and subsets.
PLATEAU_POINTS = 0.1


class _Weights(NamedTuple):
    """What evaluation and PreciseBN read of a training state."""

    params: Any
    batch_stats: Any


# --------------------------------------------------------------------------------------------
# The compiled pieces, made once per process.


def _lenet(**kw: Any) -> LeNet:
    return LeNet(conv="fast", **kw)


def _mesh(runner: Runner) -> jax.sharding.Mesh:
    return distributed.global_mesh(runner.devices[:1])


@functools.cache
def _eval_step(mean: float, std: float, mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    # Evaluation (train=False) does not depend on BN's momentum, axis name or renorm.
    return steps.make_eval_step(_lenet(), mean, std, mesh)


@functools.cache
def _precise_fn(model: LeNet, mean: float, std: float,
                mesh: jax.sharding.Mesh) -> population.PreciseFn:
    return population.make_precise_fn(model, mean, std, mesh)


@functools.cache
def _epoch_fn(model: LeNet, mean: float, std: float, *, replicas: int = 1,
              momenta: tuple[float, ...] | None = None, frozen_bn: bool = False,
              schedule: str = "cosine") -> scanned.EpochFn:
    loss_fn = steps.make_loss_fn(model, mean, std, frozen_bn=frozen_bn)
    return scanned.make_epoch(loss_fn, replicas=replicas, momenta=momenta, schedule=schedule)


def _init(model: LeNet, seed: int, image_shape: Sequence[int]) -> _Weights:
    """The training program's initialization for ``seed`` (as
    :class:`train.experiments.runner.Runner`)."""
    init_key, _ = jax.random.split(jax.random.key(seed))
    state = steps.create_train_state(model, optax.identity(), init_key, image_shape)
    return _Weights(state.params, state.batch_stats)


def _accuracy(runner: Runner, weights: _Weights) -> float:
    mesh = _mesh(runner)
    batch = min(runner.eval_batch_size, len(runner.test_images))
    return steps.evaluate(_eval_step(runner.mean, runner.std, mesh), weights,
                          runner.test_images, runner.test_labels, batch, mesh)["accuracy"]


def _precise_batches(images: np.ndarray, batch: int, num_images: int, *, seed: int,
                     order: int) -> list[np.ndarray]:
    """The first whole batches holding ``num_images`` images of permutation ``(seed, order)``.

    A list: PreciseBN then compiles one step per batch shape, whatever the number of batches.
    """
    idx = scanned.epoch_indices(len(images), batch, seed=seed, epoch=order)
    k = population.num_precise_batches(num_images, batch, len(idx))
    return [images[i] for i in idx[:k]]


def _precise(runner: Runner, model: LeNet, weights: _Weights, batches: list[np.ndarray]) -> Any:
    return _precise_fn(model, runner.mean, runner.std, _mesh(runner))(weights, batches)


def _copy(tree: Any) -> Any:
    """A copy of a carry that an epoch is about to donate."""
    return jax.tree.map(jnp.copy, tree)


def _epochs(runner: Runner, epoch_fn: scanned.EpochFn, carry: scanned.Carry,
            hyper: scanned.Hyper, x: jax.Array, y: jax.Array, batch: int, seed: int,
            epochs: range, after: Callable[[int, scanned.Carry], None] | None = None
            ) -> tuple[scanned.Carry, bool]:
    """Trains ``epochs`` (the training program's data order); ``after(epoch, carry)`` after
    each. Returns the carry and whether training diverged (a non-finite loss: it stops)."""
    for e in epochs:
        idx = jnp.asarray(scanned.epoch_indices(len(x), batch, seed=seed, epoch=e))
        carry, losses = epoch_fn(carry, hyper, x, y, idx)
        if not np.all(np.isfinite(np.asarray(losses))):
            return carry, True
        if after is not None:
            after(e, carry)
    return carry, False


# --------------------------------------------------------------------------------------------
# EMA vs PreciseBN on the LeNet.


def _pb_lr(p: Protocol, batch: int) -> float:
    return p.pb_lr * batch / p.pb_lr_batch


def _pb_run(runner: Runner, p: Protocol, batch: int, seed: int, data: tuple[Any, ...]
            ) -> dict[str, Any]:
    """One run: the accuracies after every epoch (running averages per momentum, PreciseBN),
    and at the end PreciseBN's accuracy per sample size and subset."""
    x_np, x, y = data
    model = _lenet(momentum=0.0)  # BN returns the batch's moments; the carry averages them
    epoch_fn = _epoch_fn(model, runner.mean, runner.std, momenta=p.pb_momenta)
    start = _init(model, seed, runner.ds.image_shape)
    spe = len(x_np) // batch
    hyper = scanned.Hyper.of(_pb_lr(p, batch), total=p.pb_epochs * spe,
                             warmup=round(p.pb_warmup_epochs * spe))
    carry = scanned.init_carry(start.params, start.batch_stats, p.pb_momenta)
    out: dict[str, Any] = {"ema": {m: [] for m in p.pb_momenta}, "precise": [], "plateau": {}}

    def evaluate(epoch: int, carry: scanned.Carry) -> None:
        for m, stats in zip(p.pb_momenta, carry.stats, strict=True):
            out["ema"][m].append(_accuracy(runner, _Weights(carry.params, stats)))
        weights = _Weights(carry.params, carry.stats[0])
        batches = _precise_batches(x_np, batch, p.pb_images, seed=seed, order=epoch)
        precise = _precise(runner, model, weights, batches)
        out["precise"].append(_accuracy(runner, _Weights(carry.params, precise)))

    t0 = time.perf_counter()
    carry, out["diverged"] = _epochs(runner, epoch_fn, carry, hyper, x, y, batch, seed,
                                     range(p.pb_epochs), evaluate)
    if not out["diverged"]:
        weights = _Weights(carry.params, carry.stats[0])
        for n in p.pb_sample_sizes:
            if batch <= n <= len(x_np):
                out["plateau"][n] = [
                    _accuracy(runner, _Weights(carry.params, _precise(
                        runner, model, weights,
                        _precise_batches(x_np, batch, n, seed=seed, order=p.pb_epochs + r))))
                    for r in range(p.pb_subsets)]
    runner.runs_done += 1
    runner.log(f"  ema_vs_precise batch={batch} seed={seed}: "
               + " ".join(f"ema{m:g}={a[-1]:.4f}" for m, a in out["ema"].items() if a)
               + (f" precise={out['precise'][-1]:.4f}" if out["precise"] else "")
               + (" DIVERGED" if out["diverged"] else "")
               + f" ({time.perf_counter() - t0:.1f} s)")
    return out


def _pb_keys(p: Protocol) -> tuple[Any, ...]:
    """The curves of every run: one per running-average momentum, and ``"precise"``."""
    return (*p.pb_momenta, "precise")


def _curves(runs: Sequence[dict[str, Any]], key: Any) -> list[list[float]]:
    """Each run's accuracy after every epoch, for a momentum's running averages or
    ``"precise"``."""
    return [r["precise"] if key == "precise" else r["ema"][key] for r in runs]


def _converged(runs: Sequence[dict[str, Any]], key: Any) -> list[list[float]]:
    """The curves of the runs that did not diverge."""
    return [c for c, r in zip(_curves(runs, key), runs, strict=True) if not r["diverged"]]


def _final(runs: Sequence[dict[str, Any]], key: Any) -> list[float]:
    """The last epoch's accuracy of each run (NaN if it diverged)."""
    return [c[-1] if c and not r["diverged"] else math.nan
            for c, r in zip(_curves(runs, key), runs, strict=True)]


def _plateau_gap(runs: Sequence[dict[str, Any]], n: int, largest: int) -> list[float]:
    """Per run, the mean over subsets of |accuracy with n images - with the largest sample|."""
    return [float(np.mean(np.abs(np.asarray(r["plateau"][n]) - np.mean(r["plateau"][largest]))))
            for r in runs if n in r["plateau"]]


def _plateau(p: Protocol, results: dict[int, list[dict[str, Any]]]) -> tuple[str, dict[int, Any]]:
    """The sample-size table, and per batch size the smallest sample on the plateau."""
    sizes = [n for n in p.pb_sample_sizes
             if any(n in r["plateau"] for rs in results.values() for r in rs)]
    needed: dict[int, Any] = {}
    rows = []
    for n in sizes:
        row = [str(n)]
        for b, runs in results.items():
            largest = max((m for r in runs for m in r["plateau"]), default=None)
            gaps = _plateau_gap(runs, n, largest) if largest else []
            accs = [a for r in runs for a in r["plateau"].get(n, [])]
            row.append(f"{report.pm(accs, 100.0)} (Δ {100 * np.mean(gaps):.2f})" if gaps
                       else "—")
            if gaps and b not in needed and 100 * np.mean(gaps) <= PLATEAU_POINTS:
                needed[b] = n
        rows.append(row)
    header = ["images", *(f"batch {b}" for b in results)]
    return report.table(header, rows), needed


def _pb_table(p: Protocol, results: dict[int, list[dict[str, Any]]], n: int) -> str:
    """Per batch size: each curve's final accuracy, then its jitter."""
    rows = []
    for b, runs in results.items():
        cells = [report.runs_cell(_final(runs, key)) for key in _pb_keys(p)]
        jitters = []
        for key in _pb_keys(p):
            ok = _converged(runs, key)
            jitters.append(report.pm([report.jitter(c) for c in ok], 100.0, 2) if ok
                           else "diverged")
        rows.append([str(b), f"{_pb_lr(p, b):.3g}", str(n // b), *cells, *jitters])
    header = ["batch", "lr", "steps/epoch",
              *(f"EMA {m:g}" for m in p.pb_momenta), "PreciseBN",
              *(f"jitter, EMA {m:g}" for m in p.pb_momenta), "jitter, PreciseBN"]
    return report.table(header, rows)


def _pb_figure(p: Protocol, results: dict[int, list[dict[str, Any]]]) -> Any:
    """The curves at the largest batch, the final accuracies against the batch size, and
    PreciseBN's distance to its plateau against its sample size."""
    labels = {**{m: f"running averages, momentum {m:g}" for m in p.pb_momenta},
              "precise": f"PreciseBN ({p.pb_images} images)"}
    colors = {**{m: f"C{i + 1}" for i, m in enumerate(p.pb_momenta)}, "precise": "C0"}
    fig, (ax_curve, ax_batch, ax_n) = report.figure(wide=True, ncols=3)
    largest = max(p.pb_batch_sizes)
    for key in _pb_keys(p):
        ok = _converged(results[largest], key)
        if ok:
            report.band(ax_curve, np.arange(1, p.pb_epochs + 1),
                        [100 * np.asarray(c) for c in ok], labels[key], color=colors[key],
                        marker=".", ms=3)
        report.nan_errorbar(ax_batch, p.pb_batch_sizes,
                            [100 * np.asarray(_final(results[b], key)) for b in p.pb_batch_sizes],
                            labels[key], color=colors[key])
    for i, (b, runs) in enumerate(results.items()):
        sizes = [m for m in p.pb_sample_sizes if any(m in r["plateau"] for r in runs)]
        if sizes:
            largest_n = max(sizes)
            ax_n.plot(sizes, [100 * np.mean(_plateau_gap(runs, m, largest_n)) for m in sizes],
                      marker="o", ms=3, lw=1.2, color=f"C{i}", label=f"batch {b}")
    ax_curve.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax_curve.set_title(f"batch {largest}: after every epoch", fontsize=9)
    ax_batch.set_xscale("log", base=2)
    ax_batch.set(xlabel="batch size", ylabel="final test accuracy (%)")
    ax_batch.set_title(f"after {p.pb_epochs} epochs", fontsize=9)
    ax_n.set_xscale("log", base=2)
    ax_n.axhline(PLATEAU_POINTS, color="0.5", lw=0.8, ls=":")
    ax_n.set(xlabel="PreciseBN images", ylabel="|Δ accuracy| to the largest sample (points)")
    ax_n.set_title("PreciseBN's sample size", fontsize=9)
    for ax in (ax_curve, ax_batch, ax_n):
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
        ax.legend(fontsize=6)
    return fig


def _pb_notes(runner: Runner, p: Protocol, n: int, needed: dict[int, Any]) -> list[str]:
    plateau_line = "; ".join(f"batch {b}: {needed.get(b, 'not reached')}"
                             for b in p.pb_batch_sizes)
    return [
        f"{n} training images of {runner.ds.name}, {p.pb_epochs} epochs at every batch size; "
        f"SGD momentum 0.9, no weight decay; the learning rate is {p.pb_lr:g} × batch / "
        f"{p.pb_lr_batch} (linear scaling), warmed up linearly over "
        f"{report.plural(p.pb_warmup_epochs, 'epoch')}, then cosine decay to 0. "
        f"{len(runner.test_images)} test images.",
        "One training run per batch size and seed: BN's weights do not depend on its "
        "momentum, so the model's BN returns each batch's moments and the run keeps one "
        f"running average per momentum ({', '.join(f'{m:g}' for m in p.pb_momenta)}). "
        f"PreciseBN: after every epoch, the statistics of {p.pb_images} training images "
        "(whole batches of the training batch size, training-mode forward pass, pooled "
        "exactly).",
        "Accuracy columns: test accuracy (%) after the last epoch. Jitter: mean absolute "
        "change of the test accuracy between consecutive epochs over the second half of "
        "training, in points.",
        f"Second table: PreciseBN from N images of a random subset (a fresh permutation per "
        f"subset; {p.pb_subsets} subsets per seed) with the final weights; cells are the "
        "accuracy (%) and, after Δ, the mean absolute difference (points) to the accuracy "
        "with the largest sample. Smallest N within "
        f"{PLATEAU_POINTS:g} points of it: {plateau_line}.",
    ]


def ema_vs_precise(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """EMA vs PreciseBN across batch sizes and momenta; PreciseBN's sample size."""
    n = p.pb_train_size
    x_np = runner.ds.train_images[:n]
    data = (x_np, jnp.asarray(x_np), jnp.asarray(runner.ds.train_labels[:n]))
    results = {b: [_pb_run(runner, p, b, s, data) for s in seeds] for b in p.pb_batch_sizes}
    plateau_table, needed = _plateau(p, results)
    return ("EMA vs PreciseBN across batch sizes and momenta",
            _pb_table(p, results, n) + "\n\n" + plateau_table,
            _pb_notes(runner, p, n, needed), _pb_figure(p, results))


# --------------------------------------------------------------------------------------------
# FrozenBN for small batches.

_FZ_COLUMNS = {
    "bn": "BN",
    "precise": "BN + PreciseBN",
    "frozen": "BN + FrozenBN",
    "renorm": "Batch Renorm",
    "synced": "synced BN",
}


def _fz_lr(p: Protocol, global_batch: int) -> float:
    return p.fz_lr * min(1.0, global_batch / p.fz_lr_batch)


def _fz_run(runner: Runner, p: Protocol, b: int, seed: int, data: tuple[Any, ...]
            ) -> dict[str, float]:
    """The five variants at ``b`` images per replica: their final test accuracies."""
    x_np, x, y = data
    r = p.fz_replicas
    global_batch = r * b
    spe = len(x_np) // global_batch
    hyper = scanned.Hyper.of(_fz_lr(p, global_batch), total=p.fz_epochs * spe)
    local = _lenet(momentum=BN_MOMENTUM)
    models = {"bn": local, "renorm": _lenet(momentum=BN_MOMENTUM, bn_kwargs=(("renorm", True),)),
              "synced": _lenet(momentum=BN_MOMENTUM, axis_name=AXIS)}
    start = _init(local, seed, runner.ds.image_shape)  # every variant starts here
    switch = p.fz_epochs - p.fz_frozen_epochs
    acc: dict[str, float] = {}
    t0 = time.perf_counter()

    def train(name: str, carry: scanned.Carry, epochs: range, **kw: Any) -> scanned.Carry | None:
        epoch_fn = _epoch_fn(models.get(name, local), runner.mean, runner.std, **kw)
        carry, diverged = _epochs(runner, epoch_fn, carry, hyper, x, y, global_batch, seed,
                                  epochs)
        return None if diverged else carry

    def score(name: str, carry: scanned.Carry | None, stats: Any = None) -> None:
        acc[name] = math.nan if carry is None else _accuracy(
            runner, _Weights(carry.params, carry.stats if stats is None else stats))

    def precise(carry: scanned.Carry, order: int) -> Any:
        batches = _precise_batches(x_np, b, p.fz_images, seed=seed, order=order)
        return _precise(runner, local, _Weights(carry.params, carry.stats), batches)

    carry = train("bn", scanned.init_carry(*start), range(switch), replicas=r)
    at_switch = None if carry is None else _copy(carry)
    if carry is not None:
        carry = train("bn", carry, range(switch, p.fz_epochs), replicas=r)
    score("bn", carry)
    score("precise", carry, None if carry is None else precise(carry, p.fz_epochs - 1))
    if at_switch is not None:
        at_switch = at_switch._replace(stats=precise(at_switch, switch - 1))
        at_switch = train("frozen", at_switch, range(switch, p.fz_epochs), frozen_bn=True)
    score("frozen", at_switch)
    for name in ("renorm", "synced"):
        score(name, train(name, scanned.init_carry(*start), range(p.fz_epochs), replicas=r))
    runner.runs_done += 4
    runner.log(f"  frozen_bn batch={b}x{r} seed={seed}: "
               + " ".join(f"{k}={v:.4f}" for k, v in acc.items())
               + f" ({time.perf_counter() - t0:.1f} s)")
    return acc


def frozen_bn(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """BN with small per-replica batches: FrozenBN against PreciseBN, Batch Renorm and
    synchronized BN."""
    n = p.fz_train_size
    x_np = runner.ds.train_images[:n]
    data = (x_np, jnp.asarray(x_np), jnp.asarray(runner.ds.train_labels[:n]))
    results = {b: [_fz_run(runner, p, b, s, data) for s in seeds] for b in p.fz_batch_sizes}
    fig, (ax,) = report.figure()
    styles = {"bn": dict(color="C0"), "precise": dict(color="C0", ls="--"),
              "frozen": dict(color="C3"), "renorm": dict(color="C2"),
              "synced": dict(color="C4", ls=":")}
    for key, label in _FZ_COLUMNS.items():
        acc = [[100 * a[key] for a in results[b]] for b in p.fz_batch_sizes]
        report.nan_errorbar(ax, p.fz_batch_sizes, acc, label, **styles[key])
    ax.set_xscale("log", base=2)
    ax.set_xticks(p.fz_batch_sizes, [str(b) for b in p.fz_batch_sizes])
    ax.minorticks_off()
    ax.set_xlabel(f"images per replica ({p.fz_replicas} replicas)", fontsize=8)
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.set_title("small per-replica batches", fontsize=9)
    ax.legend(fontsize=7)
    rows = []
    for b in p.fz_batch_sizes:
        g = p.fz_replicas * b
        rows.append([str(b), str(g), str(p.fz_epochs * (n // g)), f"{_fz_lr(p, g):.3g}",
                     *(report.runs_cell([a[k] for a in results[b]]) for k in _FZ_COLUMNS)])
    header = ["per-replica batch", "global batch", "steps", "lr", *_FZ_COLUMNS.values()]
    notes = [
        f"{n} training images of {runner.ds.name}, {p.fz_epochs} epochs, SGD momentum 0.9, "
        f"no weight decay, learning rate {p.fz_lr:g} × global batch / {p.fz_lr_batch} "
        f"(linear scaling, capped at {p.fz_lr:g}) with cosine decay to 0; "
        f"{len(runner.test_images)} test images.",
        f"{p.fz_replicas} data-parallel replicas, run with jax.vmap over a named axis on one "
        "device (the collective of synchronized BN is the same psum as over devices with "
        "shard_map); the gradient is the replicas' mean. BN, Batch Renorm: each replica "
        "normalizes its own images and the replicas' running statistics are averaged "
        f"(momentum {BN_MOMENTUM:g}); synced BN: the statistics of all replicas' images. "
        "Batch Renorm: r_max=3, d_max=5 from the first step.",
        f"BN + PreciseBN: the BN runs evaluated with the statistics of {p.fz_images} training "
        "images, recomputed with the training-mode forward pass on batches of the "
        "per-replica size. BN + FrozenBN: the same runs, whose last "
        f"{report.plural(p.fz_frozen_epochs, 'epoch')} train with BN frozen at those statistics "
        "(computed at the switch), as `train.lenet --freeze-bn-epochs` does.",
    ]
    return ("FrozenBN for small batches: BN, PreciseBN, FrozenBN, Batch Renorm, synced BN",
            report.table(header, rows), notes, fig)


EXPERIMENTS: dict[str, Callable[..., Any]] = {
    "ema_vs_precise": ema_vs_precise,
    "frozen_bn": frozen_bn,
}
