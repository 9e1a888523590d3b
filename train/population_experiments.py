"""BN's test-time statistics, measured: three experiments of ``python -m train.experiments``.

The statistics BN normalizes with at test time are its weakest point (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021). These experiments measure, on Fashion-MNIST, what
the library's PreciseBN (:mod:`jaxbn.precise`) and FrozenBN (``train.lenet
--freeze-bn-epochs``) change, and repeat the BN paper's first figure (Ioffe & Szegedy, 2015,
Fig. 1):

    ema_vs_precise  the seed's LeNet at batch 32 to 2048 for a fixed number of epochs: test
                    accuracy after every epoch with the running averages (momentum 0.9 and
                    0.99, from the same runs) and with PreciseBN; and how many images
                    PreciseBN needs to reach its plateau
    frozen_bn       batches of 2 to 8 per replica, 8 data-parallel replicas: BN, BN with
                    PreciseBN, BN with the last epoch frozen (FrozenBN), Batch Renorm and
                    synchronized BN
    bn_paper_fig1   the BN paper's 784-100-100-100-10 sigmoid MLP (:mod:`train.mlp`, the
                    functional API), batch 60, SGD lr 0.5: test accuracy without BN, with
                    BN's running averages and with PreciseBN against the step, and the 15th,
                    50th and 85th percentiles of a last-layer sigmoid's input

Each returns ``(title, body, notes, figure)`` as the experiments of :mod:`train.experiments`
do, with its sizes from the shared :class:`train.experiments.Protocol`. Training runs whole
epochs (or chunks of steps) in one ``lax.scan`` (:mod:`train.scanned`), compiled once per
model and batch shape; the LeNets use the fast convolution (``conv='fast'``: under ``scan``
on XLA:CPU ``flax.linen.Conv`` is more than ten times slower). Evaluation and PreciseBN are
the training program's (:func:`train.steps.evaluate`, :func:`train.population.make_precise_fn`;
:func:`jaxbn.precise_batch_stats` for the MLP); every accuracy is on the protocol's test
images.
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
from jax import lax

import jaxbn
from train import distributed, mlp, population, report, scanned, steps
from train.distributed import AXIS
from train.model import LeNet
from train.runner import Runner

__all__ = ["EXPERIMENTS"]

#: The running averages' decay of the frozen_bn runs (PyTorch's default ``momentum=0.1``).
BN_MOMENTUM = 0.9
#: A PreciseBN sample is "enough" when its accuracy is within this many points of the
#: largest sample's, on average over seeds and subsets.
PLATEAU_POINTS = 0.1
#: The last hidden layer's unit whose input percentiles are plotted (chosen before looking).
FIG1_UNIT = 0
#: The evaluation steps listed in the Fig. 1 table (those the run reaches).
FIG1_TABLE_STEPS = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)


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
    """The training program's initialization for ``seed`` (as :class:`train.runner.Runner`)."""
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


def _pb_lr(p: Any, batch: int) -> float:
    return p.pb_lr * batch / p.pb_lr_batch


def _pb_run(runner: Runner, p: Any, batch: int, seed: int, data: tuple[Any, ...]
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


def _final(runs: Sequence[dict[str, Any]], key: str, momentum: float | None = None
           ) -> list[float]:
    """The last epoch's accuracy of each run (NaN if it diverged)."""
    curves = [r["ema"][momentum] if key == "ema" else r[key] for r in runs]
    return [c[-1] if c and not r["diverged"] else math.nan
            for c, r in zip(curves, runs, strict=True)]


def _plateau_gap(runs: Sequence[dict[str, Any]], n: int, largest: int) -> list[float]:
    """Per run, the mean over subsets of |accuracy with n images - with the largest sample|."""
    return [float(np.mean(np.abs(np.asarray(r["plateau"][n]) - np.mean(r["plateau"][largest]))))
            for r in runs if n in r["plateau"]]


def _plateau(p: Any, results: dict[int, list[dict[str, Any]]]) -> tuple[str, dict[int, Any]]:
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


def ema_vs_precise(runner: Runner, p: Any, seeds: Sequence[int]):
    """EMA vs PreciseBN across batch sizes and momenta; PreciseBN's sample size."""
    n = p.pb_train_size
    x_np = runner.ds.train_images[:n]
    data = (x_np, jnp.asarray(x_np), jnp.asarray(runner.ds.train_labels[:n]))
    results = {b: [_pb_run(runner, p, b, s, data) for s in seeds] for b in p.pb_batch_sizes}
    labels = {**{m: f"running averages, momentum {m:g}" for m in p.pb_momenta},
              "precise": f"PreciseBN ({p.pb_images} images)"}
    colors = {**{m: f"C{i + 1}" for i, m in enumerate(p.pb_momenta)}, "precise": "C0"}
    fig, (ax_curve, ax_batch, ax_n) = report.figure(wide=True, ncols=3)
    largest = max(p.pb_batch_sizes)
    epochs = np.arange(1, p.pb_epochs + 1)
    rows = []
    for b, runs in results.items():
        cells, jitters = [], []
        for key in (*p.pb_momenta, "precise"):
            curves = [r["ema"][key] if key != "precise" else r["precise"] for r in runs]
            final = _final(runs, "precise" if key == "precise" else "ema",
                           None if key == "precise" else key)
            cells.append(report.runs_cell(final))
            ok = [c for c, r in zip(curves, runs, strict=True) if not r["diverged"]]
            jitters.append(report.pm([report.jitter(c) for c in ok], 100.0, 2) if ok
                           else "diverged")
            if b == largest and ok:
                report.band(ax_curve, epochs, [100 * np.asarray(c) for c in ok], labels[key],
                            color=colors[key], marker=".", ms=3)
        spe = n // b
        rows.append([str(b), f"{_pb_lr(p, b):.3g}", str(spe), *cells, *jitters])
    for key in (*p.pb_momenta, "precise"):
        finals = [_final(results[b], "precise" if key == "precise" else "ema",
                         None if key == "precise" else key) for b in p.pb_batch_sizes]
        report.nan_errorbar(ax_batch, p.pb_batch_sizes, [100 * np.asarray(f) for f in finals],
                            labels[key], color=colors[key])
    plateau_table, needed = _plateau(p, results)
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
    header = ["batch", "lr", "steps/epoch",
              *(f"EMA {m:g}" for m in p.pb_momenta), "PreciseBN",
              *(f"jitter, EMA {m:g}" for m in p.pb_momenta), "jitter, PreciseBN"]
    plateau_line = "; ".join(f"batch {b}: {needed.get(b, 'not reached')}"
                             for b in p.pb_batch_sizes)
    notes = [
        f"{n} training images of {runner.ds.name}, {p.pb_epochs} epochs at every batch size; "
        f"SGD momentum 0.9, no weight decay; the learning rate is {p.pb_lr:g} × batch / "
        f"{p.pb_lr_batch} (linear scaling), warmed up linearly over "
        f"{_plural(p.pb_warmup_epochs, 'epoch')}, then cosine decay to 0. "
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
    return ("EMA vs PreciseBN across batch sizes and momenta",
            report.table(header, rows) + "\n\n" + plateau_table, notes, fig)


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------------------------
# FrozenBN for small batches.

_FZ_COLUMNS = {
    "bn": "BN",
    "precise": "BN + PreciseBN",
    "frozen": "BN + FrozenBN",
    "renorm": "Batch Renorm",
    "synced": "synced BN",
}


def _fz_lr(p: Any, global_batch: int) -> float:
    return p.fz_lr * min(1.0, global_batch / p.fz_lr_batch)


def _fz_run(runner: Runner, p: Any, b: int, seed: int, data: tuple[Any, ...]
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


def frozen_bn(runner: Runner, p: Any, seeds: Sequence[int]):
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
        f"{_plural(p.fz_frozen_epochs, 'epoch')} train with BN frozen at those statistics "
        "(computed at the switch), as `train.lenet --freeze-bn-epochs` does.",
    ]
    return ("FrozenBN for small batches: BN, PreciseBN, FrozenBN, Batch Renorm, synced BN",
            report.table(header, rows), notes, fig)


# --------------------------------------------------------------------------------------------
# The BN paper's Fig. 1.


@functools.cache
def _fig1_chunk(lr: float) -> Callable[..., Any]:
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
def _fig1_eval(net: mlp.MLP, stats: Any, x: jax.Array, y: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Test accuracy, and the 15/50/85th percentiles over the images of every last-layer
    sigmoid's input, ``(3, 100)``."""
    logits, _, pre = mlp.apply(net, stats, x, training=False)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return accuracy, jnp.percentile(pre, jnp.array([15.0, 50.0, 85.0]), axis=0)


@jax.jit
def _fig1_precise(net: mlp.MLP, stats: Any, batches: jax.Array) -> Any:
    """PreciseBN with the functional API: one ``lax.scan`` over the stacked batches."""
    return jaxbn.precise_batch_stats(functools.partial(mlp.moments, net), stats, batches)


def _fig1_indices(n: int, batch: int, seed: int, start: int, count: int) -> np.ndarray:
    """Steps ``start .. start + count - 1`` of the training order, ``(count, batch)``."""
    spe = n // batch
    rows, order = [], None
    for s in range(start, start + count):
        e, i = divmod(s, spe)
        if order is None or i == 0:
            order = scanned.epoch_indices(n, batch, seed=seed, epoch=e)
        rows.append(order[i])
    return np.stack(rows)


def _fig1_run(p: Any, bn: bool, seed: int, data: tuple[Any, ...]) -> dict[str, Any]:
    """One network: test accuracy (and, with BN, with PreciseBN) and the percentiles of the
    last hidden layer's sigmoid inputs, at step 0 and every ``f1_eval_every`` steps."""
    x_np, x, y, x_test, y_test = data
    net, stats = mlp.init(jax.random.key(seed), bn=bn)
    chunk = _fig1_chunk(float(p.f1_lr))
    out: dict[str, Any] = {"steps": [], "accuracy": [], "precise": [], "percentiles": [],
                           "diverged": False}

    def evaluate(step: int) -> None:
        accuracy, percentiles = _fig1_eval(net, stats, x_test, y_test)
        out["steps"].append(step)
        out["accuracy"].append(float(accuracy))
        out["percentiles"].append(np.asarray(percentiles))
        if bn:
            idx = scanned.epoch_indices(len(x_np), p.f1_batch, seed=seed, epoch=10_000 + step)
            k = population.num_precise_batches(p.f1_images, p.f1_batch, len(idx))
            batches = jnp.asarray(x_np[idx[:k]].astype(np.float32) / 255)
            out["precise"].append(float(_fig1_eval(
                net, _fig1_precise(net, stats, batches), x_test, y_test)[0]))

    evaluate(0)
    for start in range(0, p.f1_steps, p.f1_eval_every):
        count = min(p.f1_eval_every, p.f1_steps - start)
        idx = jnp.asarray(_fig1_indices(len(x_np), p.f1_batch, seed, start, count))
        net, stats, losses = chunk(net, stats, x, y, idx)
        if not np.all(np.isfinite(np.asarray(losses))):
            out["diverged"] = True
            break
        evaluate(start + count)
    return out


def _fig1_drift(runs: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """How far the last layer's sigmoid inputs move after the first evaluation: the median
    over units (and seeds) of the range of each unit's 50th percentile, and of its 15-85
    spread."""
    medians, spreads = [], []
    for r in runs:
        q = np.stack(r["percentiles"][1:])  # (evaluations, 3, units), from the first one on
        medians.append(np.median(np.ptp(q[:, 1], axis=0)))
        spreads.append(np.median(np.ptp(q[:, 2] - q[:, 0], axis=0)))
    return report.pm(medians, digits=2), report.pm(spreads, digits=2)


def bn_paper_fig1(runner: Runner, p: Any, seeds: Sequence[int]):
    """The BN paper's Fig. 1 on Fashion-MNIST: the sigmoid MLP with and without BN."""
    ds = runner.ds
    n = p.f1_train_size
    x_np = ds.train_images[:n].reshape(n, -1)
    test_x = ds.test_images[:p.f1_test_size]
    data = (x_np, jnp.asarray(x_np), jnp.asarray(ds.train_labels[:n]),
            jnp.asarray(test_x.reshape(len(test_x), -1).astype(np.float32) / 255),
            jnp.asarray(ds.test_labels[:p.f1_test_size]))
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for seed in seeds:
        for bn in (False, True):
            t0 = time.perf_counter()
            runs[bn].append(_fig1_run(p, bn, seed, data))
            r = runs[bn][-1]
            runner.runs_done += 1
            runner.log(f"  bn_paper_fig1 {'BN' if bn else 'no BN'} seed={seed}: "
                       f"test_accuracy={r['accuracy'][-1]:.4f}"
                       + (f" precise={r['precise'][-1]:.4f}" if bn else "")
                       + (" DIVERGED" if r["diverged"] else "")
                       + f" ({time.perf_counter() - t0:.1f} s)")
    curves = {
        "no BN": [r["accuracy"] for r in runs[False]],
        "BN, running averages": [r["accuracy"] for r in runs[True]],
        "BN, PreciseBN": [r["precise"] for r in runs[True]],
    }
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
        q = np.stack(runs[bn][0]["percentiles"])[:, :, FIG1_UNIT]
        for j, pct in enumerate((15, 50, 85)):
            ax.plot(runs[bn][0]["steps"], q[:, j], color="C0", lw=1.2 if pct == 50 else 0.8,
                    ls="-" if pct == 50 else "--", label=f"{pct}th percentile")
        lows.append(q.min())
        highs.append(q.max())
        ax.set(xlabel="step", ylabel=f"input of sigmoid {FIG1_UNIT}, last hidden layer")
        ax.set_title(f"{title} (seed {seeds[0]})", fontsize=9)
        ax.legend(fontsize=6)
    for ax in (ax_none, ax_bn):
        ax.set_ylim(min(lows) - 0.5, max(highs) + 0.5)
    for ax in (ax_acc, ax_none, ax_bn):
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
    listed = [s for s in FIG1_TABLE_STEPS if s in runs[True][0]["steps"]] or \
        [runs[True][0]["steps"][-1]]
    rows = []
    for s in listed:
        i = runs[True][0]["steps"].index(s)
        rows.append([str(s), *(report.runs_cell([c[i] if i < len(c) else math.nan
                                                 for c in cs]) for cs in curves.values())])
    final_none = float(np.mean([c[-1] for c in curves["no BN"]]))
    reach = [[report.steps_to_reach(x_steps, c, final_none) for c in cs]
             for cs in curves.values()]
    drift = {bn: _fig1_drift(runs[bn]) for bn in (False, True)}
    summary = [
        ["jitter (points)", *(report.pm([report.jitter(c) for c in cs], 100.0, 2)
                              for cs in curves.values())],
        ["steps to no BN's final accuracy",
         *(report.pm(v, digits=0) if np.isfinite(v).all() else
           f"not reached ({int(np.isnan(v).sum())}/{len(v)})" for v in reach)],
        ["drift of the median input", drift[False][0], drift[True][0], "(same network)"],
        ["drift of the 15–85 spread", drift[False][1], drift[True][1], "(same network)"],
    ]
    header = ["step", *curves]
    notes = [
        f"784-100-100-100-10 MLP, sigmoid hidden units, written with jaxbn's functional API "
        f"(train/mlp.py); BN on every hidden layer (before the sigmoid), none on the output. "
        f"Plain SGD, learning rate {p.f1_lr:g}, batch {p.f1_batch}, {p.f1_steps} steps over "
        f"the first {n} training images of {ds.name} (pixels / 255); LeCun-normal "
        f"initialization; BN's running averages with momentum {mlp.MOMENTUM:g}. Test "
        f"accuracy on {len(test_x)} test images every {p.f1_eval_every} steps.",
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
        f"Plots (b) and (c): unit {FIG1_UNIT} of the last hidden layer, seed {seeds[0]}, "
        "over the test images, on the same scale.",
    ]
    return ("The BN paper's Fig. 1 on Fashion-MNIST",
            report.table(header, rows + summary), notes, fig)


EXPERIMENTS: dict[str, Callable[..., Any]] = {
    "ema_vs_precise": ema_vs_precise,
    "frozen_bn": frozen_bn,
    "bn_paper_fig1": bn_paper_fig1,
}
