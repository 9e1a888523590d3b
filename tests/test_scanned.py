"""Tests of the experiments' compiled training (train/experiments/scanned.py) and of the BN
paper's MLP (train/experiments/mlp.py), on tiny models: what the experiments on BN's statistics
build on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn.linen import BatchNorm
from train.distributed import AXIS
from train.experiments import mlp, scanned

N, BATCH, FEATURES = 32, 8, 5


class _Tiny(nn.Module):
    momentum: float
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        x = BatchNorm(use_running_average=not train, momentum=self.momentum,
                      axis_name=self.axis_name)(x)
        return nn.Dense(3)(nn.relu(x))


def _loss_fn(model):
    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (updates["batch_stats"], jnp.sum(jnp.argmax(logits, -1) == labels))

    return loss_fn


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, (N, FEATURES)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, N), jnp.int32)
    variables = _Tiny(0.9).init(jax.random.key(0), x[:BATCH], train=False)
    idx = jnp.asarray(scanned.epoch_indices(N, BATCH, seed=0, epoch=0))
    return x, y, variables["params"], variables["batch_stats"], idx


def _close(a, b, **tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, **tol)


def test_momenta_keep_the_running_averages_bn_would_keep(problem):
    """One run with BN momentum 0 and averages for 0.9 and 0.99 in the carry trains the same
    weights as BN with momentum 0.9, and keeps the running averages BN 0.9 and 0.99 keep."""
    x, y, params, stats, idx = problem
    hyper = scanned.Hyper.of(0.1, total=len(idx), warmup=1)
    both, losses = scanned.make_epoch(_loss_fn(_Tiny(0.0)), momenta=(0.9, 0.99))(
        scanned.init_carry(params, stats, (0.9, 0.99)), hyper, x, y, idx)
    assert losses.shape == (N // BATCH,) and int(both.step) == N // BATCH
    for i, m in enumerate((0.9, 0.99)):
        one, _ = scanned.make_epoch(_loss_fn(_Tiny(m)))(scanned.init_carry(params, stats),
                                                       hyper, x, y, idx)
        _close(both.params, one.params, rtol=1e-6, atol=1e-7)
        _close(both.stats[i], one.stats, rtol=1e-6, atol=1e-7)
    assert not np.allclose(both.stats[0]["BatchNorm_0"]["mean"],
                           both.stats[1]["BatchNorm_0"]["mean"])


def test_synced_replicas_equal_one_batch(problem):
    """Two replicas whose BN synchronizes over the named axis train as one batch does; two
    that normalize alone do not."""
    x, y, params, stats, idx = problem
    hyper = scanned.Hyper.of(0.1, total=len(idx))
    one, _ = scanned.make_epoch(_loss_fn(_Tiny(0.9)))(scanned.init_carry(params, stats),
                                                     hyper, x, y, idx)
    synced, _ = scanned.make_epoch(_loss_fn(_Tiny(0.9, AXIS)), replicas=2)(
        scanned.init_carry(params, stats), hyper, x, y, idx)
    alone, _ = scanned.make_epoch(_loss_fn(_Tiny(0.9)), replicas=2)(
        scanned.init_carry(params, stats), hyper, x, y, idx)
    # float32: the psum over replicas adds in another order than one batch's reduction.
    _close(synced.params, one.params, rtol=1e-5, atol=1e-6)
    _close(synced.stats, one.stats, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone.params["Dense_1"]["kernel"], one.params["Dense_1"]["kernel"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "step"}, "schedule: expected one of ('constant', 'cosine'), got 'step'"),
    ({"replicas": 0}, "replicas: expected a positive integer, got 0"),
])
def test_make_epoch_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scanned.make_epoch(_loss_fn(_Tiny(0.9)), **kwargs)


def test_learning_rate_schedules():
    hyper = scanned.Hyper.of(1.0, total=10, warmup=2)
    lr = {s: np.asarray(scanned.learning_rate(jnp.arange(11), hyper, s))
          for s in scanned.SCHEDULES}
    np.testing.assert_allclose(lr["constant"], [0.5] + [1.0] * 10)
    np.testing.assert_allclose(lr["cosine"][:3], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(lr["cosine"][6], 0.5, atol=1e-6)  # half-way through the decay
    assert lr["cosine"][10] == pytest.approx(0.0, abs=1e-7)


def test_mlp_moments_are_those_bn_normalizes_with():
    """mlp.moments returns, per hidden layer, the batch moments training-mode BN uses (and
    stores with momentum 0); PreciseBN over one batch gives back the same statistics."""
    net, stats = mlp.init(jax.random.key(0), bn=True)
    x = jax.random.uniform(jax.random.key(1), (60, 784))
    _, batch, pre = jax.jit(lambda n, s, x: mlp.apply(n, s, x, training=True, momentum=0.0))(
        net, stats, x)
    moments = jax.jit(mlp.moments)(net, x)
    precise = jax.jit(lambda n, s, b: jaxbn.precise_batch_stats(
        lambda a: mlp.moments(n, a), s, b))(net, stats, x[None])
    for m, s, p in zip(moments, batch, precise, strict=True):
        np.testing.assert_allclose(m.mean, s.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m.var, s.var, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p.mean, s.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p.var, s.var, rtol=1e-6, atol=1e-7)
    assert pre.shape == (60, 100)
    plain, none = mlp.init(jax.random.key(0), bn=False)
    assert none is None and mlp.apply(plain, None, x[:2], training=True)[1] is None
    with pytest.raises(ValueError, match="expected a network with BN"):
        mlp.moments(plain, x)
