"""Many short training runs of the seed's LeNet, for the experiments (:mod:`train.experiments`).

A run is a :class:`Spec` (model, learning rate, batch, steps, devices) and a seed; the
:class:`Runner` trains it with the training program's own steps (:mod:`train.steps`) and
returns a :class:`Result`, caching the compiled steps per model and the results per run, so
that runs shared between experiments happen once per process.

Runs on one device use a plain ``jax.jit`` step. Runs on several devices split each batch
over a mesh with ``shard_map``: with BN synchronized over the mesh axis, or (``synced=False``)
with each device normalizing its own shard and the running statistics averaged over the
devices afterwards (PyTorch's ``DistributedDataParallel`` without ``SyncBatchNorm``).
Evaluation always uses the running statistics (``train=False``), as a deployed model does.
A run whose training loss becomes non-finite stops early and counts as diverged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from train import batching, data, distributed, steps
from train.model import LeNet

__all__ = ["BN_MOMENTUM", "CHECK_EVERY", "Result", "Runner", "Spec"]

#: BN's running-average decay (flax convention): PyTorch's default ``momentum=0.1``.
BN_MOMENTUM = 0.9
#: Steps between host reads of the training loss (and checks for divergence).
CHECK_EVERY = 25


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
        axis_name=distributed.AXIS if sync else None,
        bn_kwargs=tuple(kwargs.items()) or None,
    )


def _indices(n: int, batch_size: int, seed: int, steps: int) -> Iterator[np.ndarray]:
    """Yields ``steps`` index batches in :func:`train.batching.batches`' order (epoch after
    epoch, each a permutation of ``(seed, epoch)``, the last partial batch dropped)."""
    ids = np.arange(n)
    k, epoch = 0, 0
    while True:
        for idx, _ in batching.batches(ids, ids, batch_size, seed=seed, epoch=epoch):
            if k == steps:
                return
            yield idx
            k += 1
        epoch += 1


def describe(spec: Spec) -> str:
    """The spec's fields that differ from the defaults (and ``norm``, ``lr``), as one line.

    Example:
        >>> describe(Spec(norm="none", batch_size=8))
        'norm=none lr=0.1 batch_size=8'
    """
    d = Spec()
    parts = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(Spec)
             if getattr(spec, f.name) != getattr(d, f.name) or f.name in ("norm", "lr")]
    return " ".join(parts)


class Runner:
    """Trains and evaluates runs; caches compiled steps and results for one process.

    Args:
        dataset: The data (subsets are taken per run).
        test_size: Test images (the first ones of the test set).
        eval_batch_size: Evaluation batch size (rounded up to a multiple of the devices).
        devices: The devices; multi-device specs use the first ``spec.devices``.
        log: Prints progress lines.
    """

    def __init__(self, dataset: data.Dataset, test_size: int, eval_batch_size: int,
                 devices: Sequence[jax.Device], log: Callable[[str], None] = print) -> None:
        self.ds = dataset
        self.eval_batch_size = eval_batch_size
        self.devices = list(devices)
        self.log = log
        self.mean, self.std = data.pixel_stats(dataset.name, dataset=dataset)
        self.test_images = dataset.test_images[:test_size]
        self.test_labels = dataset.test_labels[:test_size]
        # One optimizer object for every run: the learning rate lives in its state, so
        # changing it does not recompile the step.
        self.tx = optax.inject_hyperparams(optax.sgd)(
            learning_rate=1.0, momentum=steps.SGD_MOMENTUM
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
        return distributed.global_mesh(self.devices[:n])

    def _compiled(self, spec: Spec) -> tuple[LeNet, Callable[..., Any], Callable[..., Any], Mesh]:
        model = _model(spec, self.ds.num_classes)
        key = (model, spec.devices)
        if key not in self._steps:
            mesh = self._mesh(spec.devices)
            train_step = steps.make_train_step(model, self.mean, self.std,
                                               mesh if spec.devices > 1 else None)
            eval_step = steps.make_eval_step(model, self.mean, self.std, mesh)
            self._steps[key] = (model, train_step, eval_step, mesh)
        return self._steps[key]

    def _evaluate(self, eval_step: Callable[..., Any], state: steps.TrainState, mesh: Mesh,
                  images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        batch = min(self.eval_batch_size, len(images))
        batch += -batch % mesh.size
        return steps.evaluate(eval_step, state, images, labels, batch, mesh)

    def _initial_state(self, model: LeNet, seed: int, lr: float) -> steps.TrainState:
        # train.train's split, so a run starts from the same weights as `train.lenet --seed`.
        init_key, _ = jax.random.split(jax.random.key(seed))
        state = steps.create_train_state(model, self.tx, init_key, self.ds.image_shape)
        hyper = dict(state.opt_state.hyperparams)
        hyper["learning_rate"] = jnp.full_like(hyper["learning_rate"], lr)
        return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))

    def run(self, spec: Spec, seed: int) -> Result:
        """Trains ``spec`` with ``seed`` (initialization and data order), or returns the
        cached result of an identical earlier run."""
        if (spec, seed) in self._results:
            return self._results[(spec, seed)]
        t0 = time.perf_counter()
        model, train_step, eval_step, mesh = self._compiled(spec)
        train_x = self.ds.train_images[: spec.train_size]
        train_y = self.ds.train_labels[: spec.train_size]
        state = self._initial_state(model, seed, spec.lr)
        if spec.devices > 1:
            state = jax.device_put(state, jax.NamedSharding(mesh, jax.P()))

        def evaluate(state: steps.TrainState, k: int) -> tuple[float, ...]:
            test = self._evaluate(eval_step, state, mesh, self.test_images, self.test_labels)
            train = {"loss": math.nan, "accuracy": math.nan}
            if spec.eval_train:
                train = self._evaluate(eval_step, state, mesh, train_x, train_y)
            return (k, test["loss"], test["accuracy"], train["loss"], train["accuracy"])

        losses, curve = self._train(spec, seed, state, train_step, mesh, evaluate)
        _, test_loss, test_acc, train_loss, train_acc = curve[-1]
        diverged = len(losses) < spec.steps or not math.isfinite(test_loss) or \
            not np.all(np.isfinite(losses))
        result = Result(np.asarray(losses), test_loss, test_acc, train_loss, train_acc,
                        diverged, curve, time.perf_counter() - t0)
        self._results[(spec, seed)] = result
        self.runs_done += 1
        self.log(f"  {describe(spec)} seed={seed}: test_accuracy={test_acc:.4f} "
                 f"test_loss={test_loss:.4f}{' DIVERGED' if diverged else ''} "
                 f"({result.seconds:.1f} s)")
        return result

    def _train(self, spec: Spec, seed: int, state: steps.TrainState,
               train_step: Callable[..., Any], mesh: Mesh,
               evaluate: Callable[[steps.TrainState, int], tuple[float, ...]]
               ) -> tuple[list[float], list[tuple[float, ...]]]:
        """The training loop of one run: its losses and its evaluations (the last one at the
        end, after ``spec.steps`` steps or the divergence that stopped it)."""
        train_x = self.ds.train_images[: spec.train_size]
        train_y = self.ds.train_labels[: spec.train_size]
        losses: list[float] = []
        pending: list[jax.Array] = []
        curve: list[tuple[float, ...]] = []
        k = 0
        for idx in _indices(len(train_x), spec.batch_size, seed, spec.steps):
            batch = (train_x[idx], train_y[idx])
            if spec.devices > 1:
                batch = distributed.make_global_batch(batch, mesh)
            state, step_metrics = train_step(state, *batch)
            pending.append(step_metrics["loss"])
            k += 1
            if k % CHECK_EVERY == 0 or k == spec.steps:
                losses.extend(float(v) for v in jax.device_get(pending))
                pending.clear()
                if not np.all(np.isfinite(losses[-CHECK_EVERY:])):
                    break
            if spec.eval_every and k % spec.eval_every == 0 and k < spec.steps:
                curve.append(evaluate(state, k))
        curve.append(evaluate(state, k))
        return losses, curve

    def runs(self, spec: Spec, seeds: Sequence[int]) -> list[Result]:
        """:meth:`run` for each seed."""
        return [self.run(spec, s) for s in seeds]
