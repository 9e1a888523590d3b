"""The seed's claims about Batch Normalization, measured: ``python -m train.experiments``.

Section 6.1.2 of the seed says that BN (1) speeds up convergence, (2) makes training less
sensitive to the learning rate, (3) makes saturating activations (sigmoid, tanh) usable and
(4) regularizes; and that (5) it degrades with small batches. Whether BN belongs before or
after the activation (6) is left open. Each experiment below trains the seed's LeNet
(:class:`train.model.LeNet`) on Fashion-MNIST with several seeds and writes a plot
``<name>.png`` and a Markdown table ``<name>.md`` (mean ± sample standard deviation over the
seeds) into ``--out``:

    convergence     smoothed training loss against the step, BN vs no BN        (claim 1)
    lr_sweep        final test accuracy against the learning rate, BN vs no BN  (claim 2)
    sigmoid         sigmoid and tanh networks with and without BN                (claim 3)
    regularization  train/test gap on a small training set, BN vs no BN         (claim 4)
    batch_size      test accuracy against the batch size: no BN, BN, Batch
                    Renorm; and 8 fake devices with synchronized vs per-device
                    BN, next to Ghost BN, its one-device equivalent             (claim 5)
    bn_position     BN before vs after the ReLU, across learning rates          (question 6)

The protocol (:data:`FULL`; :data:`QUICK` with ``--quick``) is shared so that runs repeat
across experiments only once per process: SGD with momentum 0.9, a constant learning rate, no
weight decay, BN's running-average momentum 0.9 (PyTorch's default ``momentum=0.1``), the first
``train_size`` training images and the first ``test_size`` test images. Evaluation always uses
the running statistics (``train=False``), as a deployed model does; this is where BN trained on
too small batches fails. A run whose training loss becomes non-finite stops early and counts as
diverged; its accuracy is what the broken network scores (chance).

Runs on one device use a plain ``jax.jit`` step. Runs on several devices use
:func:`train.lenet.make_train_step` (``shard_map``, BN synchronized over the mesh axis) or, for
per-device BN, the same step with each device normalizing its own shard and the running
statistics averaged over the devices afterwards. The fake CPU devices are created by
:func:`main` before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import data, lenet
from train.model import LeNet

__all__ = [
    "EXPERIMENTS",
    "FULL",
    "QUICK",
    "Protocol",
    "Result",
    "Runner",
    "Spec",
    "main",
    "parse_table",
]

#: Number of fake devices of the synchronized-BN runs.
DEVICES = 8
#: BN's running-average decay (flax convention): PyTorch's default ``momentum=0.1``.
BN_MOMENTUM = 0.9
#: Steps between host reads of the training loss (and checks for divergence).
CHECK_EVERY = 25
#: Steps to reach this smoothed training loss measure the speed of convergence.
LOSS_TARGET = 0.6
#: Steps over which equivalent runs (synced vs one device, per-device vs Ghost BN) are compared.
EARLY = 20
#: Accuracy within this of the best counts as "good" in the learning-rate sweep.
GOOD_WITHIN = 0.02
FIGSIZE = (5.0, 3.5)
WIDE_FIGSIZE = (8.0, 3.5)
DPI = 80


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


#: The full suite (about half an hour on a 2-core CPU).
FULL = Protocol()
#: ``--quick``: tiny subsets and few steps, for CI; the numbers mean nothing.
QUICK = Protocol(
    train_size=512,
    test_size=256,
    eval_batch_size=128,
    batch_size=32,
    steps=20,
    lrs=(0.01, 0.1, 1.0),
    convergence_lrs=(0.1,),
    saturating_lrs=(0.1,),
    position_lrs=(0.1,),
    smooth=5,
    reg_train_size=128,
    reg_batch_size=16,
    reg_steps=40,
    reg_lr=0.03,
    reg_eval_every=20,
    bs_images=64,
    bs_lr_batch=32,
    batch_sizes=(2, 16),
    per_device_batch_sizes=(2,),
)

NORM_LABELS = {"none": "no BN", "bn": "BN", "renorm": "Batch Renorm", "ghost": "Ghost BN"}
COLORS = {"bn": "C0", "none": "C1", "renorm": "C2", "ghost": "C3"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One training configuration; a run is a spec and a seed.

    Attributes:
        norm: ``'none'``, ``'bn'``, ``'renorm'`` (Batch Renormalization, ``r_max=3``,
            ``d_max=5`` from the first step) or ``'ghost'`` (Ghost BN).
        activation: ``'relu'``, ``'sigmoid'`` or ``'tanh'``.
        bn_position: ``'before_relu'`` or ``'after_relu'``.
        lr: Learning rate (constant).
        batch_size: Global batch size.
        steps: Training steps.
        train_size: Training images (the first ones).
        devices: Devices the batch is split over (``shard_map``); 1 for a plain ``jit``.
        synced: With several devices: BN statistics over the global batch, or per device.
        virtual_batch_size: Ghost BN's virtual batch size.
        eval_every: Also evaluate every this many steps (curves), or ``None``.
        eval_train: Also evaluate on the training images.
    """

    norm: str = "bn"
    activation: str = "relu"
    bn_position: str = "before_relu"
    lr: float = 0.1
    batch_size: int = 64
    steps: int = 250
    train_size: int = 10_240
    devices: int = 1
    synced: bool = True
    virtual_batch_size: int | None = None
    eval_every: int | None = None
    eval_train: bool = False


@dataclasses.dataclass
class Result:
    """What one run measured.

    Attributes:
        losses: ``(steps_done,)`` training loss of each step (batch statistics).
        test_loss: Final test loss (NaN when diverged).
        test_accuracy: Final test accuracy.
        train_loss: Final loss on the training images (eval mode), or NaN if not measured.
        train_accuracy: Final accuracy on the training images, or NaN.
        diverged: The training loss or the test loss became non-finite.
        curve: ``(step, test_loss, test_accuracy, train_loss, train_accuracy)`` at each
            evaluation (``eval_every``), the last one included.
        seconds: Wall time of the run (compilation included).
    """

    losses: np.ndarray
    test_loss: float
    test_accuracy: float
    train_loss: float
    train_accuracy: float
    diverged: bool
    curve: list[tuple[float, ...]]
    seconds: float


def _model(spec: Spec, num_classes: int) -> LeNet:
    kwargs: dict[str, Any] = {}
    if spec.norm == "renorm":
        kwargs = {"renorm": True}
    elif spec.norm == "ghost":
        kwargs = {"virtual_batch_size": spec.virtual_batch_size}
    sync = spec.norm != "none" and spec.devices > 1 and spec.synced
    return LeNet(
        num_classes=num_classes,
        norm="none" if spec.norm == "none" else "jaxbn",
        bn_position=spec.bn_position,
        activation=spec.activation,
        momentum=BN_MOMENTUM,
        axis_name=lenet.AXIS if sync else None,
        bn_kwargs=tuple(kwargs.items()) or None,
    )


def _loss_and_stats(model: LeNet, mean: float, std: float) -> Callable[..., Any]:
    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            lenet._preprocess(images, mean, std),
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates.get("batch_stats", {})

    return loss_fn


def _one_device_step(model: LeNet, mean: float, std: float) -> Callable[..., Any]:
    """A plain jitted training step (no mesh): on one device, the fastest."""
    loss_fn = _loss_and_stats(model, mean, std)

    def step(state, images, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, images, labels
        )
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), {"loss": loss}

    return jax.jit(step, donate_argnums=0)


def _per_device_bn_step(model: LeNet, mesh: Mesh, mean: float, std: float) -> Callable[..., Any]:
    """Data parallel over ``mesh`` with BN normalizing each device's shard on its own.

    As :func:`train.lenet.make_train_step`, but ``model`` has no ``axis_name``: each device's
    BN uses its own ``batch / devices`` examples (PyTorch's ``DistributedDataParallel``
    without ``SyncBatchNorm``). The loss and the gradient are still those of the global
    batch; the devices' running statistics are averaged so the state stays replicated.
    """
    loss_fn = _loss_and_stats(model, mean, std)

    def sharded(params, batch_stats, images, labels):
        # Mark the replicated parameters as device-varying before BN sees them: jaxbn's
        # backward pass with axis_name=None returns per-device cotangents for scale and bias,
        # which shard_map refuses for replicated inputs. pcast's transpose sums them instead.
        params = jax.lax.pcast(params, lenet.AXIS, to="varying")
        loss, stats = loss_fn(params, batch_stats, images, labels)
        return jax.lax.pmean(loss, lenet.AXIS), jax.lax.pmean(stats, lenet.AXIS)

    sharded_loss = jax.shard_map(
        sharded, mesh=mesh, in_specs=(P(), P(), P(lenet.AXIS), P(lenet.AXIS)),
        out_specs=(P(), P()),
    )

    def step(state, images, labels):
        (loss, batch_stats), grads = jax.value_and_grad(sharded_loss, has_aux=True)(
            state.params, state.batch_stats, images, labels
        )
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), {"loss": loss}

    return jax.jit(step, donate_argnums=0)


def _nanmean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _smooth(losses: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` steps average what there is."""
    c = np.cumsum(np.insert(np.asarray(losses, np.float64), 0, 0.0))
    n = np.arange(1, len(losses) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


class Runner:
    """Trains and evaluates runs; caches compiled steps and results for one process.

    Args:
        dataset: The data (subsets are taken per run).
        protocol: Sizes (test subset, evaluation batch).
        devices: The devices; multi-device specs use the first ``spec.devices``.
        log: Prints progress lines.
    """

    def __init__(
        self,
        dataset: data.Dataset,
        protocol: Protocol,
        devices: Sequence[jax.Device],
        log: Callable[[str], None] = print,
    ) -> None:
        self.ds = dataset
        self.protocol = protocol
        self.devices = list(devices)
        self.log = log
        if dataset.name in lenet.PIXEL_STATS:
            self.mean, self.std = lenet.PIXEL_STATS[dataset.name]
        else:
            pixels = dataset.train_images.astype(np.float64) / 255.0
            self.mean, self.std = float(pixels.mean()), float(pixels.std())
        self.test_images = dataset.test_images[: protocol.test_size]
        self.test_labels = dataset.test_labels[: protocol.test_size]
        # One optimizer object for every run: the learning rate lives in its state, so
        # changing it does not recompile the step.
        self.tx = optax.inject_hyperparams(optax.sgd)(
            learning_rate=1.0, momentum=lenet.SGD_MOMENTUM
        )
        self._steps: dict[Any, Any] = {}
        self._results: dict[tuple[Spec, int], Result] = {}
        self.runs_done = 0

    def _mesh(self, n: int) -> Mesh:
        if n > len(self.devices):
            raise RuntimeError(
                f"expected {n} devices, got {len(self.devices)}; run `python -m "
                "train.experiments`, which creates fake CPU devices before JAX starts, or set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
            )
        return Mesh(np.asarray(self.devices[:n]), (lenet.AXIS,))

    def _compiled(self, spec: Spec) -> tuple[LeNet, Callable[..., Any], Callable[..., Any], Mesh]:
        model = _model(spec, self.ds.num_classes)
        key = (model, spec.devices, spec.synced)
        if key not in self._steps:
            mesh = self._mesh(spec.devices)
            if spec.devices == 1:
                step = _one_device_step(model, self.mean, self.std)
            elif spec.synced or spec.norm == "none":
                step = lenet.make_train_step(model, mesh, self.mean, self.std)
            else:
                step = _per_device_bn_step(model, mesh, self.mean, self.std)
            evaluate = lenet.make_eval_step(model, mesh, self.mean, self.std)
            self._steps[key] = (model, step, evaluate, mesh)
        return self._steps[key]

    def _evaluate(self, eval_step, state, mesh, images, labels) -> dict[str, float]:
        batch = min(self.protocol.eval_batch_size, len(images))
        batch += -batch % mesh.size
        return lenet.evaluate(eval_step, state, images, labels, batch,
                              NamedSharding(mesh, P(lenet.AXIS)))

    def run(self, spec: Spec, seed: int) -> Result:
        """Trains ``spec`` with ``seed`` (initialization and data order), or returns the
        cached result of an identical earlier run."""
        if (spec, seed) in self._results:
            return self._results[(spec, seed)]
        t0 = time.perf_counter()
        model, step, eval_step, mesh = self._compiled(spec)
        train_x = self.ds.train_images[: spec.train_size]
        train_y = self.ds.train_labels[: spec.train_size]
        # lenet's split, so a run starts from the same weights as `train.lenet --seed`.
        init_key, _ = jax.random.split(jax.random.key(seed))
        state = lenet.create_train_state(model, self.tx, init_key, self.ds.image_shape)
        hyper = dict(state.opt_state.hyperparams)
        hyper["learning_rate"] = jnp.full_like(hyper["learning_rate"], spec.lr)
        state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(lenet.AXIS))
        if spec.devices > 1:
            state = jax.device_put(state, replicated)

        def evaluate(state, k: int) -> tuple[float, ...]:
            test = self._evaluate(eval_step, state, mesh, self.test_images, self.test_labels)
            train = {"loss": math.nan, "accuracy": math.nan}
            if spec.eval_train:
                train = self._evaluate(eval_step, state, mesh, train_x, train_y)
            return (k, test["loss"], test["accuracy"], train["loss"], train["accuracy"])

        losses: list[float] = []
        pending: list[jax.Array] = []
        curve: list[tuple[float, ...]] = []
        diverged = False
        k = 0
        for idx in _indices(len(train_x), spec.batch_size, seed, spec.steps):
            images, labels = train_x[idx], train_y[idx]
            if spec.devices > 1:
                images, labels = jax.device_put((images, labels), sharded)
            state, metrics = step(state, images, labels)
            pending.append(metrics["loss"])
            k += 1
            if k % CHECK_EVERY == 0 or k == spec.steps:
                losses.extend(float(v) for v in jax.device_get(pending))
                pending.clear()
                if not np.all(np.isfinite(losses[-CHECK_EVERY:])):
                    diverged = True
                    break
            if spec.eval_every and k % spec.eval_every == 0 and k < spec.steps:
                curve.append(evaluate(state, k))
        curve.append(evaluate(state, k))
        _, test_loss, test_acc, train_loss, train_acc = curve[-1]
        diverged = diverged or not math.isfinite(test_loss)
        result = Result(
            losses=np.asarray(losses),
            test_loss=test_loss,
            test_accuracy=test_acc,
            train_loss=train_loss,
            train_accuracy=train_acc,
            diverged=diverged,
            curve=curve,
            seconds=time.perf_counter() - t0,
        )
        self._results[(spec, seed)] = result
        self.runs_done += 1
        self.log(
            f"  {_describe(spec)} seed={seed}: test_accuracy={test_acc:.4f} "
            f"test_loss={test_loss:.4f}{' DIVERGED' if diverged else ''} "
            f"({result.seconds:.1f} s)"
        )
        return result

    def runs(self, spec: Spec, seeds: Sequence[int]) -> list[Result]:
        """:meth:`run` for each seed."""
        return [self.run(spec, s) for s in seeds]


def _indices(n: int, batch_size: int, seed: int, steps: int):
    """Yields ``steps`` index batches in :func:`train.data.batches`' order (epoch after
    epoch, each a permutation of ``(seed, epoch)``, the last partial batch dropped)."""
    ids = np.arange(n)
    k, epoch = 0, 0
    while True:
        for idx, _ in data.batches(ids, ids, batch_size, seed=seed, epoch=epoch):
            if k == steps:
                return
            yield idx
            k += 1
        epoch += 1


def _describe(spec: Spec) -> str:
    d = Spec()
    parts = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(Spec)
             if getattr(spec, f.name) != getattr(d, f.name) or f.name in ("norm", "lr")]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Formatting.


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``'mean ± std'`` of ``values * scale``."""
    mean, std = _nanmean_std(np.asarray(values) * scale)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _acc(results: Sequence[Result]) -> str:
    """Test accuracy in percent, mean ± std, with the count of diverged runs."""
    cell = _pm([r.test_accuracy for r in results], 100.0)
    n = sum(r.diverged for r in results)
    return f"{cell} ({n}/{len(results)} diverged)" if n else cell


def _loss(results: Sequence[Result], attr: str = "test_loss") -> str:
    n = sum(r.diverged for r in results)
    if n:
        return f"diverged ({n}/{len(results)})"
    return _pm([getattr(r, attr) for r in results], digits=3)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _environment() -> str:
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}, "
            f"{platform.python_implementation()} {platform.python_version()}")


def _write_table(out: Path, name: str, title: str, body: str, notes: Sequence[str],
                 seeds: Sequence[int], seconds: float, quick: bool) -> Path:
    mode = " --quick" if quick else ""
    footer = [
        *notes,
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); cells are mean ± sample "
        "standard deviation over the seeds; accuracies in percent, evaluated with the running "
        "statistics (train=False).",
        f"Regenerate: `python -m train.experiments --only {name} --seeds {len(seeds)}{mode}`. "
        f"Here it took {seconds:.0f} s (not counting runs shared with experiments before it "
        f"in the same process) on a {_environment()}.",
    ]
    path = out / f"{name}.md"
    path.write_text(f"### {title}\n\n{body}\n\n" + "\n".join(f"- {n}" for n in footer) + "\n")
    return path


def parse_table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as lists of cell strings.

    Example:
        >>> parse_table("| a | b |\\n|---|---|\\n| 1 | 2.0 ± 0.1 |\\n")
        [['1', '2.0 ± 0.1']]
    """
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def _figure(wide: bool = False, ncols: int = 1):
    from matplotlib.figure import Figure  # Lazy: slow to import; Figure draws with Agg.

    fig = Figure(figsize=WIDE_FIGSIZE if wide else FIGSIZE)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _compress_png(path)
    return path


def _compress_png(path: Path, colors: int = 128) -> None:
    """Rewrites a PNG with a palette of ``colors`` colors: about a third of the bytes, so the
    committed plots stay small (the translucent bands otherwise need full RGBA)."""
    from PIL import Image  # Lazy: matplotlib's dependency, only needed here.

    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=colors)
    quantized.save(path, optimize=True)


def _band(ax, x, curves: Sequence[np.ndarray], label: str, **kw) -> None:
    """Mean line and ±1 std band of curves of possibly different lengths (NaN padded)."""
    n = max(len(c) for c in curves)
    a = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        a[i, : len(c)] = c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN columns after divergence.
        mean, std = np.nanmean(a, 0), np.nanstd(a, 0)
    (line,) = ax.plot(x[:n], mean, label=label, lw=1.2, **kw)
    ax.fill_between(x[:n], mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def _errorbar(ax, x, results: Sequence[Sequence[Result]], label: str, **kw) -> None:
    acc = [[100 * r.test_accuracy for r in rs] for rs in results]
    mean = [np.mean(a) for a in acc]
    std = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in acc]
    kw = {"marker": "o", "ms": 3, "capsize": 2, "lw": 1.2, **kw}
    ax.errorbar(x, mean, yerr=std, label=label, **kw)


# --------------------------------------------------------------------------------------------
# Experiments. Each takes (runner, protocol, seeds) and returns (title, body, notes, figure).


def _base(p: Protocol, **kw: Any) -> Spec:
    """The shared protocol's spec."""
    return Spec(**{"batch_size": p.batch_size, "steps": p.steps, "train_size": p.train_size,
                   "lr": p.lr, **kw})


def _steps_to(losses: np.ndarray, target: float, window: int) -> float:
    below = np.nonzero(_smooth(losses, window) <= target)[0]
    return float(below[0] + 1) if len(below) else math.nan


def convergence(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 1: training loss against the step, with and without BN, at each LR."""
    fig, axes = _figure(wide=len(p.convergence_lrs) > 1, ncols=len(p.convergence_lrs))
    rows = []
    for ax, lr in zip(axes, p.convergence_lrs, strict=True):
        for norm in ("bn", "none"):
            results = runner.runs(_base(p, norm=norm, lr=lr), seeds)
            curves = [_smooth(r.losses, p.smooth) for r in results]
            _band(ax, np.arange(1, p.steps + 1), curves, NORM_LABELS[norm], color=COLORS[norm])
            reach = [_steps_to(r.losses, LOSS_TARGET, p.smooth) for r in results]
            reached = [s for s in reach if math.isfinite(s)]
            when = _pm(reached, digits=0) if reached else "never"
            if 0 < len(reached) < len(reach):
                when += f" ({len(reached)}/{len(reach)} runs)"
            quarter = max(p.steps // 4, 1)
            rows.append([
                f"{lr:g}", NORM_LABELS[norm], when,
                _pm([_smooth(r.losses, p.smooth)[quarter - 1] for r in results], digits=3)
                if not any(r.diverged for r in results) else "diverged",
                _pm([_smooth(r.losses, p.smooth)[-1] for r in results], digits=3)
                if not any(r.diverged for r in results) else "diverged",
                _acc(results),
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
    return "Convergence: BN vs no BN", _table(header, rows), notes, fig


def lr_sweep(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 2: final test accuracy against the learning rate."""
    fig, (ax,) = _figure()
    by_norm = {}
    for norm in ("bn", "none"):
        by_norm[norm] = [runner.runs(_base(p, norm=norm, lr=lr), seeds) for lr in p.lrs]
        _errorbar(ax, p.lrs, by_norm[norm], NORM_LABELS[norm], color=COLORS[norm])
    rows = [[f"{lr:g}", _acc(by_norm["bn"][i]), _acc(by_norm["none"][i])]
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
            _table(["lr", "BN", "no BN"], rows), notes, fig)


def sigmoid(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 3: saturating activations with and without BN (ReLU for reference)."""
    acts = ("sigmoid", "tanh", "relu")
    fig, axes = _figure(wide=True, ncols=2)
    rows = []
    x = np.arange(1, p.steps + 1)
    for act in acts:
        for j, lr in enumerate(p.saturating_lrs):
            cells = []
            for norm in ("bn", "none"):
                results = runner.runs(_base(p, norm=norm, activation=act, lr=lr), seeds)
                cells.append(_acc(results))
                if act != "relu":
                    ax = axes[acts.index(act)]
                    _band(ax, x, [_smooth(r.losses, p.smooth) for r in results],
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
            _table(["activation", "lr", "BN", "no BN"], rows), notes, fig)


def bn_position(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Question 6: BN before (the seed's order) vs after the ReLU."""
    fig, (ax,) = _figure()
    variants = [("bn", "before_relu", "BN before ReLU"), ("bn", "after_relu", "BN after ReLU"),
                ("none", "before_relu", "no BN")]
    results = {}
    for norm, pos, label in variants:
        results[label] = [runner.runs(_base(p, norm=norm, bn_position=pos, lr=lr), seeds)
                          for lr in p.position_lrs]
        _errorbar(ax, p.position_lrs, results[label], label,
                  color={"BN before ReLU": "C0", "BN after ReLU": "C2", "no BN": "C1"}[label])
    def final_loss(rs: Sequence[Result]) -> str:
        if any(r.diverged for r in rs):
            return f"diverged ({sum(r.diverged for r in rs)}/{len(rs)})"
        return _pm([r.losses[-p.smooth:].mean() for r in rs], digits=3)

    rows = [[f"{lr:g}", *(_acc(results[label][i]) for _, _, label in variants),
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
    return "BN before vs after the activation", _table(header, rows), notes, fig


def regularization(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 4: on a small training set, does BN shrink the train/test gap?"""
    fig, (ax_loss, ax_acc) = _figure(wide=True, ncols=2)
    rows = []
    for norm in ("bn", "none"):
        spec = Spec(norm=norm, lr=p.reg_lr, batch_size=p.reg_batch_size, steps=p.reg_steps,
                    train_size=p.reg_train_size, eval_every=p.reg_eval_every, eval_train=True)
        results = runner.runs(spec, seeds)
        steps = np.asarray([c[0] for c in results[0].curve])
        label = NORM_LABELS[norm]
        _band(ax_loss, steps, [np.asarray([c[1] for c in r.curve]) for r in results],
              label, marker=".", ms=3, color=COLORS[norm])
        for col, ls, what in ((2, "-", "test"), (4, ":", "train")):
            _band(ax_acc, steps, [100 * np.asarray([c[col] for c in r.curve]) for r in results],
                  f"{label}, {what}", ls=ls, marker=".", ms=3, color=COLORS[norm])
        gap = [r.train_accuracy - r.test_accuracy for r in results]
        best = [min(c[1] for c in r.curve) for r in results]
        rows.append([
            label, _pm([r.train_accuracy for r in results], 100.0),
            _acc(results), _pm(gap, 100.0),
            _pm([r.train_loss for r in results], digits=4)
            if not any(r.diverged for r in results) else "diverged",
            _loss(results),
            _pm(best, digits=3) if not any(r.diverged for r in results) else "diverged",
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
    return ("Regularization: train/test gap on a small training set", _table(header, rows),
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


def batch_size(runner: Runner, p: Protocol, seeds: Sequence[int]):
    """Claim 5: test accuracy against the batch size; and synchronized BN across devices."""
    fig, (ax1, ax2) = _figure(wide=True, ncols=2)

    def spec(norm: str, batch: int, **kw: Any) -> Spec:
        return Spec(norm=norm, batch_size=batch, lr=_bs_lr(p, batch), train_size=p.train_size,
                    steps=max(p.bs_images // batch, 1), **kw)

    one = {}
    for norm in ("none", "bn", "renorm"):
        one[norm] = [runner.runs(spec(norm, b), seeds) for b in p.batch_sizes]
        _errorbar(ax1, p.batch_sizes, one[norm], NORM_LABELS[norm], color=COLORS[norm])
    rows1 = [[str(b), str(max(p.bs_images // b, 1)), f"{_bs_lr(p, b):.3g}",
              *(_acc(one[n][i]) for n in ("none", "bn", "renorm"))]
             for i, b in enumerate(p.batch_sizes)]
    many = {}
    labels = {
        "synced": f"synced BN, {DEVICES} devices",
        "local": f"per-device BN, {DEVICES} devices",
        "ghost": "Ghost BN, 1 device",
    }
    for kind in ("synced", "local", "ghost"):
        if kind == "ghost":
            specs = [spec("ghost", DEVICES * b, virtual_batch_size=b)
                     for b in p.per_device_batch_sizes]
        else:
            specs = [spec("bn", DEVICES * b, devices=DEVICES, synced=kind == "synced")
                     for b in p.per_device_batch_sizes]
        many[kind] = [runner.runs(s, seeds) for s in specs]
        style = {"synced": dict(color="C0"), "local": dict(color="C4"),
                 "ghost": dict(color="C3", ls="--", marker="x")}[kind]
        _errorbar(ax2, p.per_device_batch_sizes, many[kind], labels[kind], **style)
    rows2 = [[str(b), str(DEVICES * b), str(max(p.bs_images // (DEVICES * b), 1)),
              f"{_bs_lr(p, DEVICES * b):.3g}", *(_acc(many[k][i]) for k in labels)]
             for i, b in enumerate(p.per_device_batch_sizes)]
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
    body = (
        _table(["batch", "steps", "lr", "no BN", "BN", "Batch Renorm"], rows1)
        + "\n\n"
        + _table(["per-device batch", "global batch", "steps", "lr", *labels.values()], rows2)
    )
    notes = [
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
    return "Batch size: BN, Batch Renorm and synchronized BN", body, notes, fig


EXPERIMENTS: dict[str, Callable[..., Any]] = {
    "convergence": convergence,
    "lr_sweep": lr_sweep,
    "sigmoid": sigmoid,
    "batch_size": batch_size,
    "bn_position": bn_position,
    "regularization": regularization,
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
        devices = lenet.ensure_devices(DEVICES) if "batch_size" in names else jax.devices()[:1]
        ds = data.load_dataset(args.dataset, args.data_dir)
    except (lenet.ConfigError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    protocol = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(ds, protocol, devices, log=lambda s: print(s, flush=True))
    print(f"data: {ds.name} from {ds.source}; {len(seeds)} seed(s); {_environment()}; "
          f"{len(jax.devices())} device(s)", flush=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    for name in names:
        print(f"{name}:", flush=True)
        t0 = time.perf_counter()
        title, body, notes, fig = EXPERIMENTS[name](runner, protocol, seeds)
        times[name] = time.perf_counter() - t0
        table = _write_table(out, name, title, body, notes, seeds, times[name], args.quick)
        plot = _save(fig, out / f"{name}.png")
        print(f"{name}: {times[name]:.0f} s; wrote {table} and {plot}", flush=True)
    total = time.perf_counter() - t_all
    print(f"done: {len(names)} experiment(s), {runner.runs_done} runs, {total:.0f} s "
          f"({', '.join(f'{n} {t:.0f} s' for n, t in times.items())})", flush=True)
    return times


if __name__ == "__main__":
    main()
