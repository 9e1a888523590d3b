"""linen and nnx BatchNormAct: the same variables and numbers as BatchNorm then the activation.

Each pair of models differs only in the layer: ``BatchNorm`` followed by the activation and
a residual add, or one ``BatchNormAct``. Checkpoints move between them unchanged, and
outputs, updated statistics and gradients agree to float32 rounding, in training, in
evaluation, under PreciseBN, under a mapped axis, and after folding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
import jaxbn.precise_linen
import jaxbn.precise_nnx

C = 4
ACTS = {"relu": jax.nn.relu,
        "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.2)}


class _LinenBlock(nn.Module):
    fused: bool
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(C)(x)
        kw = dict(use_running_average=not train, momentum=0.9, name="bn")
        if self.fused:
            return jaxbn.linen.BatchNormAct(activation=self.activation, negative_slope=0.2,
                                            **kw)(h, x)
        return ACTS[self.activation](jaxbn.linen.BatchNorm(**kw)(h) + x)


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(1.0, 2.0, (n, C)), jnp.float32)


def _close(a, b):
    # float32 against float32, sums of O(16) terms: a few units of rounding.
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=2e-6, atol=2e-6 * max(1.0, float(np.max(np.abs(v)))))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_linen_matches_batchnorm_then_activation(activation):
    x = _data()
    fused, plain = _LinenBlock(True, activation), _LinenBlock(False, activation)
    variables = plain.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(fused.init(jax.random.key(0), x, train=False)) == \
        jax.tree.structure(variables)

    def loss(model, params):
        y, upd = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd)

    out = {}
    for name, model in (("fused", fused), ("plain", plain)):
        (_, aux), g = jax.jit(jax.value_and_grad(functools.partial(loss, model),
                                                 has_aux=True))(variables["params"])
        out[name] = (aux, g, model.apply(variables, x, train=False))
    _close(out["fused"], out["plain"])


def test_linen_bool_residual_is_an_error():
    bn = jaxbn.linen.BatchNormAct()
    with pytest.raises(TypeError, match="pass use_running_average by keyword"):
        bn.init(jax.random.key(0), _data(), True)


class _NnxBlock(nnx.Module):
    def __init__(self, fused: bool, activation: str = "relu", **bn_kw):
        self.dense = nnx.Linear(C, C, rngs=nnx.Rngs(0))
        cls = jaxbn.nnx.BatchNormAct if fused else jaxbn.nnx.BatchNorm
        extra = dict(activation=activation, negative_slope=0.2) if fused else {}
        self.bn = cls(C, momentum=0.9, rngs=nnx.Rngs(1), **extra, **bn_kw)
        self.fused, self.activation = fused, activation

    def __call__(self, x):
        h = self.dense(x)
        if self.fused:
            return self.bn(h, x)
        return ACTS[self.activation](self.bn(h) + x)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_nnx_matches_batchnorm_then_activation(activation):
    x = _data()
    fused, plain = _NnxBlock(True, activation), _NnxBlock(False, activation)
    # A checkpoint of one loads into the other.
    nnx.update(fused, nnx.state(plain))
    assert jax.tree.structure(nnx.state(fused)) == jax.tree.structure(nnx.state(plain))

    def loss(model):
        return jnp.sum(jnp.sin(model(x)))

    grads = [nnx.jit(nnx.grad(loss))(m) for m in (fused, plain)]  # training: stats updated
    _close(nnx.state(grads[0], nnx.Param), nnx.state(grads[1], nnx.Param))
    _close(nnx.state(fused, nnx.BatchStat), nnx.state(plain, nnx.BatchStat))
    fused.eval()
    plain.eval()
    _close(fused(x), plain(x))


def test_nnx_renorm_and_ghost_run_unfused_with_the_same_result():
    x = _data()
    for kw in (dict(renorm=True), dict(virtual_batch_size=8)):
        fused, plain = _NnxBlock(True, **kw), _NnxBlock(False, **kw)
        _close(fused(x), plain(x))
        _close(nnx.state(fused, nnx.BatchStat), nnx.state(plain, nnx.BatchStat))


def test_nnx_vmap_synced_equals_whole_batch():
    x, r = _data(1), _data(2)
    bn = jaxbn.nnx.BatchNormAct(C, axis_name="d", rngs=nnx.Rngs(0))
    whole = jaxbn.nnx.BatchNormAct(C, rngs=nnx.Rngs(0))

    @nnx.vmap(in_axes=(None, 0, 0), out_axes=0, axis_name="d")
    def mapped(bn, x, r):
        return bn(x, r)

    y = mapped(bn, x.reshape(4, 4, C), r.reshape(4, 4, C)).reshape(16, C)
    _close(y, whole(x, r))
    _close(nnx.state(bn, nnx.BatchStat), nnx.state(whole, nnx.BatchStat))


def test_precise_batch_stats_linen_and_nnx():
    """PreciseBN gives a BatchNormAct model the statistics it gives the unfused one."""
    batches = [_data(s) for s in range(3)]
    fused, plain = _LinenBlock(True), _LinenBlock(False)
    variables = plain.init(jax.random.key(0), batches[0], train=False)
    got = [jaxbn.precise_linen.precise_batch_stats(functools.partial(m.apply, train=True),
                                                   variables, batches) for m in (fused, plain)]
    _close(got[0], got[1])
    assert not np.allclose(got[0]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
    models = [_NnxBlock(True), _NnxBlock(False)]
    for m in models:
        jaxbn.precise_nnx.precise_batch_stats(m, batches)
    _close(nnx.state(models[0], nnx.BatchStat), nnx.state(models[1], nnx.BatchStat))
    assert not np.allclose(models[0].bn.mean[...], 0.0)


def test_fold_gives_the_inference_affine_map():
    x, r = _data(1), _data(2)
    bn = jaxbn.nnx.BatchNormAct(C, activation="leaky_relu", negative_slope=0.2,
                                rngs=nnx.Rngs(0))
    bn(_data(3) * 3 + 1, r)
    bn.scale[...] = jnp.linspace(-1.0, 2.0, C)
    bn.eval()
    a, b = jaxbn.fold(jaxbn.BatchNormParams(bn.scale[...], bn.bias[...]),
                      jaxbn.BatchStats(bn.mean[...], bn.var[...], jnp.zeros((), jnp.int32)))
    _close(bn(x, r), ACTS["leaky_relu"](x * a + b + r))
