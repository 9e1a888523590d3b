"""jaxbn.haiku.BatchNorm against haiku.BatchNorm: names, parity, sync, transformations.

haiku's variance is the one-pass ``E[x^2] - E[x]^2``; jaxbn's is the stable two-pass one.
On the well-scaled inputs below (|mean| about std) the two agree to float32 rounding: the
one-pass formula loses about |mean|^2 / var ulps, a few here, hence rtol 1e-5 rather than
1e-6. Where they must not agree (|mean| >> std), jaxbn is checked against float64.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn.haiku
import jaxbn.precise_haiku
from tests import reference as ref
from tests.conftest import NUM_DEVICES as D

TOL = dict(rtol=1e-5, atol=1e-5)  # see the module docstring
DECAY = 0.9
CLASSES = {"ours": jaxbn.haiku.BatchNorm, "theirs": hk.BatchNorm}


def _data(seed, shape=(8, 4, 3), channel_axis=-1):
    rng = np.random.default_rng(seed)
    per_channel = [1] * len(shape)
    per_channel[channel_axis] = shape[channel_axis]
    return jnp.asarray(rng.normal(size=shape) * rng.uniform(0.5, 2, per_channel)
                       + rng.normal(size=per_channel), jnp.float32)


def _close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.shape(u) == np.shape(v) and jnp.result_type(u) == jnp.result_type(v)
        np.testing.assert_allclose(np.asarray(u).astype(np.float64),
                                   np.asarray(v).astype(np.float64), **(tol or TOL))


def _model(cls, **kw):
    def f(x, is_training, test_local_stats=False):
        bn = cls(kw.get("create_scale", True), kw.get("create_offset", True), DECAY,
                 **{k: v for k, v in kw.items() if k not in ("create_scale", "create_offset")})
        return bn(x, is_training, test_local_stats)

    return hk.transform_with_state(f)


CONFIGS = {
    "default": {},
    "channels_first_eps": dict(data_format="channels_first", eps=1e-3),
    "axis_scale_init": dict(axis=[0, 1], scale_init=hk.initializers.Constant(2.0)),
    "no_affine": dict(create_scale=False, create_offset=False),
}


# ----------------------------------------------------------------------------------------
# Same parameters and state; haiku's trained variables load into jaxbn's module.


@pytest.mark.parametrize("config", CONFIGS)
def test_same_params_state_and_values_as_haiku_over_training_steps(config):
    kw = CONFIGS[config]
    channel_axis = 1 if kw.get("data_format") == "channels_first" else -1
    fs = {k: _model(c, **kw) for k, c in CLASSES.items()}
    x0 = _data(0, channel_axis=channel_axis)
    variables = {k: jax.jit(f.init, static_argnums=2)(None, x0, True) for k, f in fs.items()}
    _close(variables["ours"], variables["theirs"])  # init ran one training step

    def loss(f, params, state, x, g):
        y, state = f.apply(params, state, None, x, True)
        return jnp.sum(jnp.sin(y) * g), (y, state)

    g = jnp.asarray(np.random.default_rng(1).normal(size=x0.shape), jnp.float32)
    for step in range(3):
        x = _data(step + 2, channel_axis=channel_axis)
        out = {}
        for k, f in fs.items():
            params, state = variables[k]
            grads, (y, state) = jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 2),
                                                 has_aux=True))(params, state, x, g)
            out[k] = (y, state, grads)
            variables[k] = (params, state)
        _close(out["ours"], out["theirs"])
    x = _data(9, channel_axis=channel_axis)
    apply = {k: jax.jit(f.apply, static_argnums=(4, 5)) for k, f in fs.items()}
    evals = {k: apply[k](*variables[k], None, x, False, False) for k in fs}
    _close(evals["ours"], evals["theirs"])
    local = {k: apply[k](*variables[k], None, x, False, True) for k in fs}
    _close(local["ours"], local["theirs"])
    # haiku's variables, trained by haiku, in jaxbn's module.
    _close(apply["ours"](*variables["theirs"], None, x, False, False), evals["theirs"])


def test_conditional_scale_and_offset_at_call_time():
    x = _data(3)
    scale = jnp.asarray(np.random.default_rng(4).normal(size=(8, 1, 3)), jnp.float32)
    outs = []
    for cls in CLASSES.values():
        f = hk.transform_with_state(lambda x, c=cls: c(False, False, DECAY)(
            x, True, scale=scale, offset=2 * scale))
        outs.append(jax.jit(f.apply)(*jax.jit(f.init)(None, x), None, x))
    _close(outs[0], outs[1])
    with pytest.raises(ValueError, match="Cannot pass `scale` at call time"):
        hk.transform_with_state(lambda x: jaxbn.haiku.BatchNorm(True, True, DECAY)(
            x, True, scale=scale)).init(None, x)


def test_stable_variance_where_haiku_loses_every_digit():
    x = _data(5, (64, 3)) + 1e4  # |mean| >> std: E[x^2] - E[x]^2 cancels in float32
    f = _model(jaxbn.haiku.BatchNorm)
    y, state = f.apply(*f.init(None, x, True), None, x, True)
    want, (mean, var, _) = ref.train_forward(np.asarray(x), np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y, want, rtol=1e-3, atol=1e-3)  # x's own float32 rounding
    average = state["batch_norm/~/var_ema"]["average"][0]
    np.testing.assert_allclose(average, var, rtol=2e-3)  # debiased after one step: var
    g = _model(hk.BatchNorm)
    theirs = g.apply(*g.init(None, x, True), None, x, True)[1]["batch_norm/~/var_ema"]
    assert np.max(np.abs(theirs["average"][0] / var - 1)) > 0.05  # haiku's is noise


def test_half_precision_keeps_haiku_dtypes_with_float32_statistics():
    x = _data(6).astype(jnp.bfloat16)
    variables = {}
    for k, cls in CLASSES.items():
        f = _model(cls)
        params, state = jax.jit(f.init, static_argnums=2)(None, x, True)
        y, state = jax.jit(f.apply, static_argnums=4)(params, state, None, x, True)
        variables[k] = (y, params, state)
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), variables["ours"])
            == jax.tree.map(lambda a: (a.shape, a.dtype), variables["theirs"]))
    want, _ = ref.train_forward(np.asarray(x, np.float64), np.ones(3), np.zeros(3))
    np.testing.assert_allclose(np.asarray(variables["ours"][0], np.float64), want,
                               rtol=1e-2, atol=1e-2)  # bfloat16 output: 8 bits


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strict_dtype_and_rank_promotion(dtype):
    x = _data(13).astype(dtype)
    outs = []
    # Not under jit: haiku's moving average itself (jnp.power of a float and a traced int32
    # counter) fails strict promotion there, with either BatchNorm.
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        for cls in CLASSES.values():
            f = _model(cls)
            params, state = f.init(None, x, True)
            y, state = f.apply(params, state, None, x, True)
            outs.append((y, state, f.apply(params, state, None, x, False)))
    tol = TOL if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)  # bfloat16: 8 bits
    _close(outs[0], outs[1], **tol)


# ----------------------------------------------------------------------------------------
# cross_replica_axis: jaxbn's exact merge under pmap, vmap and shard_map.


def _train_step(cls, x, axis_name=None, groups=None):
    f = hk.transform_with_state(lambda x: cls(
        True, True, DECAY, cross_replica_axis=axis_name,
        cross_replica_axis_index_groups=groups)(x, True))
    params, state = f.init(None, x)
    return f.apply(params, state, None, x)


@pytest.mark.parametrize("mapper", ["vmap", "pmap", "shard_map"])
def test_cross_replica_axis_equals_one_batch(mapper, mesh):
    x = _data(7, (16, 2, 3))
    want = jax.jit(_train_step, static_argnums=0)(jaxbn.haiku.BatchNorm, x)
    split = x.reshape(D, 2, 2, 3)
    if mapper == "shard_map":
        run = jax.shard_map(lambda x: _train_step(jaxbn.haiku.BatchNorm, x, "d"),
                            mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P()))
        y, state = jax.jit(run)(x)
    else:
        def mapped(cls):
            f = functools.partial(_train_step, cls, axis_name="d")
            if mapper == "pmap":
                return jax.pmap(f, axis_name="d")(split)
            return jax.jit(jax.vmap(f, axis_name="d"))(split)

        y, state = mapped(jaxbn.haiku.BatchNorm)
        y, state = y.reshape(x.shape), jax.tree.map(lambda a: a[0], state)
        their_y, their_state = mapped(hk.BatchNorm)
        _close((y, state), (their_y.reshape(x.shape), jax.tree.map(lambda a: a[0],
                                                                    their_state)))
    _close((y, state), want)


def test_cross_replica_axis_index_groups_under_pmap():
    x = _data(8, (16, 3))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    y, _ = jax.pmap(lambda x: _train_step(jaxbn.haiku.BatchNorm, x, "d", groups),
                    axis_name="d")(x.reshape(D, 2, 3))
    one = jax.jit(_train_step, static_argnums=0)
    for g, rows in enumerate((x[:8], x[8:])):
        _close(y[4 * g:4 * (g + 1)].reshape(8, 3), one(jaxbn.haiku.BatchNorm, rows)[0])


# ----------------------------------------------------------------------------------------
# The transformation matrix: a training step under each transformation equals haiku's.

SHAPE = (16, 2, 3)


def _step(cls, x, g, axis_name=None):
    """(y, state, d/dx <g, sin y>) of one training step from a primed state."""
    f = hk.transform_with_state(lambda x: cls(True, True, DECAY,
                                              cross_replica_axis=axis_name)(x, True))
    params, state = f.init(None, x)
    _, state = f.apply(params, state, None, 2 * x + 1)

    def loss(x):
        y, new = f.apply(params, state, None, x)
        return jnp.sum(jnp.sin(y) * g), (y, new)

    gx, (y, new) = jax.grad(loss, has_aux=True)(x)
    return y, new, gx


def _under(transform, x, g, t, mesh):
    """The step under ``transform``, all of it inside ``jit`` (one compilation)."""
    cls = jaxbn.haiku.BatchNorm
    if transform == "jit":
        return functools.partial(_step, cls)(x, g)
    if transform == "jvp":
        y, new, gx = _step(cls, x, g)
        _, dy = jax.jvp(lambda x: _step(cls, x, g)[0], (x,), (t,))
        # The JVP is the transpose of the VJP: <g cos y, J t> = <J^T (g cos y), t>, so this
        # ratio is 1 and the gradient returned is unchanged exactly when the JVP is right.
        return y, new, jnp.sum(dy * g * jnp.cos(y)) / jnp.sum(gx * t) * gx
    if transform == "scan":
        _, out = jax.lax.scan(lambda c, xs: (c, _step(cls, *xs)), None, (x[None], g[None]))
        return jax.tree.map(lambda a: a[0], out)
    split = (x.reshape(D, -1, *x.shape[1:]), g.reshape(D, -1, *g.shape[1:]))
    if transform in ("vmap", "pmap"):
        mapped = {"vmap": jax.vmap, "pmap": jax.pmap}[transform]
        y, new, gx = mapped(lambda x, g: _step(cls, x, g, "d"), axis_name="d")(*split)
        return y.reshape(x.shape), jax.tree.map(lambda a: a[0], new), gx.reshape(x.shape)
    assert transform == "shard_map"
    return jax.shard_map(lambda x, g: _step(cls, x, g, "d"), mesh=mesh,
                         in_specs=(P("d"), P("d")), out_specs=(P("d"), P(), P("d")))(x, g)


@pytest.mark.parametrize("transform", ["jit", "jvp", "scan", "vmap", "pmap", "shard_map"])
def test_training_step_under_transformation(transform, mesh):
    rng = np.random.default_rng(10)
    x = _data(11, SHAPE)
    g, t = (jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(2))
    want = jax.jit(_step, static_argnums=0)(hk.BatchNorm, x, g)
    _close(jax.jit(functools.partial(_under, transform, mesh=mesh))(x, g, t), want)


# ----------------------------------------------------------------------------------------
# PreciseBN.


def test_precise_batch_stats_pools_every_layer_exactly(mesh):
    def net(x, is_training):
        h = hk.Linear(5)(x)
        h = jaxbn.haiku.BatchNorm(True, True, DECAY)(h, is_training)
        h = hk.BatchNorm(True, True, DECAY, name="theirs")(jax.nn.relu(h), is_training)
        return h

    f = hk.transform_with_state(net)
    batches = jnp.asarray(np.random.default_rng(12).normal(size=(4, 16, 3)) * 2 + 3,
                          jnp.float32)
    params, state = jax.jit(f.init, static_argnums=2)(jax.random.key(0), batches[0], True)
    _, state = jax.jit(f.apply, static_argnums=4)(params, state, None, batches[0], True)

    def train(p, s, x):
        return f.apply(p, s, None, x, True)

    new = jaxbn.precise_haiku.precise_batch_stats(train, params, state, batches)
    h = np.asarray(batches.reshape(64, 3) @ params["linear"]["w"] + params["linear"]["b"],
                   np.float64)
    entry = new["batch_norm/~/var_ema"]
    np.testing.assert_allclose(new["batch_norm/~/mean_ema"]["average"][0], h.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entry["average"][0], h.var(0), rtol=1e-5)
    assert int(entry["counter"]) == 1  # kept: average stays hidden's debiased value
    np.testing.assert_allclose(entry["hidden"], entry["average"] * (1 - DECAY), rtol=1e-6)
    # Both classes' layers are recomputed.
    assert not np.allclose(new["theirs/~/mean_ema"]["average"],
                           state["theirs/~/mean_ema"]["average"])
    sharded = jaxbn.precise_haiku.precise_batch_stats(train, params, state, batches,
                                                      axis_name="d", mesh=mesh)
    # The first layer's input does not depend on how the batch is split (the second's
    # does: the first normalizes per device, as in data-parallel training without sync).
    _close(sharded["batch_norm/~/mean_ema"], new["batch_norm/~/mean_ema"], rtol=1e-5,
           atol=1e-6)
    _close(sharded["batch_norm/~/var_ema"], new["batch_norm/~/var_ema"], rtol=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        jaxbn.precise_haiku.precise_batch_stats(
            lambda p, s, x: f.apply(p, s, None, x, False), params, state, batches)
