"""The sizes of ``python -m train.experiments``: one :class:`Protocol` every experiment reads.

Every experiment takes its sizes (training and test images, steps, batch sizes, learning
rates, seeds aside) from the same :class:`Protocol`, so that a run two experiments share is
trained once per process (:class:`train.experiments.runner.Runner` caches runs by their spec).
:data:`FULL` is the protocol of the documented results; :data:`QUICK` (``--quick``) shrinks
every size for CI, where the numbers mean nothing.

Example:
    >>> QUICK.steps < FULL.steps, FULL.eval_batch_size % DEVICES
    (True, 0)
"""

from __future__ import annotations

import dataclasses

__all__ = ["DEVICES", "FULL", "QUICK", "Protocol"]

#: Number of fake devices of the synchronized-BN runs.
DEVICES = 8


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
