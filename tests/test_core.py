"""The functional core against a float64 NumPy reference: single device, synced, numerics."""

from __future__ import annotations

import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import reference as ref

D = 8  # fake devices (tests/conftest.py)
RTOL = 1e-5  # float32 against float64: outputs are O(1), reductions over <= 4096 terms


def _rng(seed=0):
    return np.random.default_rng(seed)


def _params(c, seed=1):
    r = _rng(seed)
    return jaxbn.BatchNormParams(
        jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32), jnp.asarray(r.normal(size=c), jnp.float32)
    )


def _stats(c, seed=2):
    r = _rng(seed)
    return jaxbn.BatchStats(
        jnp.asarray(r.normal(size=c), jnp.float32),
        jnp.asarray(r.uniform(0.5, 2, c), jnp.float32),
        jnp.asarray(3, jnp.int32),
    )


# ----------------------------------------------------------------------------------------
# Single device.


@pytest.mark.parametrize(
    "axis,shape", [(-1, (16, 5, 5, 3)), (1, (16, 3, 7)), ((1, 3), (6, 4, 5, 3))]
)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("fast_variance", [False, True])
def test_training_matches_reference(axis, shape, use_mask, fast_variance):
    """Output, batch moments and the EMA update equal the float64 reference."""
    r = _rng()
    x = r.normal(2.0, 3.0, shape).astype(np.float32)
    feats, _ = ref._axes(len(shape), axis)
    fshape = tuple(shape[a] for a in feats)
    mask = r.random(shape) > 0.3 if use_mask else None
    params = jaxbn.BatchNormParams(*(jnp.asarray(r.normal(size=fshape), jnp.float32)
                                     for _ in range(2)))
    stats = jaxbn.BatchStats(jnp.zeros(fshape), jnp.ones(fshape), jnp.array(0))
    fn = jax.jit(partial(jaxbn.batch_norm, training=True, axis=axis, momentum=0.9,
                         fast_variance=fast_variance))
    y, new = fn(x, params, stats, mask=mask)
    y_ref, (mean, var, n) = ref.train_forward(x, params.scale, params.bias, axis, mask=mask)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(new.mean, ref.ema(0.0, mean, 0.9), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(new.var, ref.ema(1.0, var, 0.9), rtol=RTOL, atol=1e-6)
    assert int(new.count) == 1
    m = jaxbn.moments(x, axis=axis, mask=mask, fast_variance=fast_variance)
    np.testing.assert_array_equal(m.count, n)


def test_inference_uses_running_stats():
    """training=False normalizes with the running statistics and returns them unchanged."""
    x = _rng().normal(size=(8, 4, 4, 5)).astype(np.float32)
    params, stats = _params(5), _stats(5)
    y, out = jax.jit(partial(jaxbn.batch_norm, training=False))(x, params, stats)
    np.testing.assert_allclose(y, ref.forward(x, params.scale, params.bias, stats.mean, stats.var),
                               rtol=RTOL, atol=RTOL)
    assert out is not None
    for a, b in zip(out, stats, strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_running_stats_uses_batch_stats_in_inference():
    """stats=None (track_running_stats=False) uses batch statistics in both modes."""
    x = _rng().normal(size=(8, 6)).astype(np.float32)
    params = _params(6)
    y_train, s1 = jaxbn.batch_norm(x, params, None, training=True)
    y_eval, s2 = jaxbn.batch_norm(x, params, None, training=False)
    assert s1 is None and s2 is None
    np.testing.assert_array_equal(y_train, y_eval)
    np.testing.assert_allclose(y_eval, ref.train_forward(x, params.scale, params.bias)[0],
                               rtol=RTOL, atol=RTOL)


def test_no_affine_is_unit_scale_zero_bias():
    x = _rng().normal(size=(8, 6)).astype(np.float32)
    y, _ = jaxbn.batch_norm(x, None, None, training=True)
    np.testing.assert_allclose(y, ref.train_forward(x, np.ones(6), np.zeros(6))[0],
                               rtol=RTOL, atol=RTOL)


def test_closed_form_unit_moments():
    """With scale 1 and bias 0 the output has mean 0 and variance var/(var+eps) per feature."""
    x = _rng().normal(5, 2, size=(64, 3, 3, 4)).astype(np.float32)
    y, _ = jaxbn.batch_norm(x, None, None, training=True, epsilon=1e-5)
    y = np.asarray(y, np.float64)
    var = x.astype(np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), var / (var + 1e-5), rtol=1e-5)


def test_cumulative_average_and_unbiased_variance():
    """momentum=None averages all batches equally; unbiased_running_var stores n/(n-1)*var."""
    r = _rng()
    xs = [r.normal(i, 1 + i, size=(10, 3)).astype(np.float32) for i in range(4)]
    _, stats = jaxbn.init(3)
    fn = jax.jit(partial(jaxbn.batch_norm, training=True, momentum=None,
                         unbiased_running_var=True))
    for x in xs:
        _, stats = fn(x, None, stats)
    np.testing.assert_allclose(stats.mean, np.mean([x.mean(0) for x in xs], 0), rtol=RTOL)
    np.testing.assert_allclose(stats.var, np.mean([x.var(0, ddof=1) for x in xs], 0), rtol=RTOL)
    assert int(stats.count) == 4


def test_empty_batch_keeps_stats_and_is_finite():
    """A fully masked batch: finite output, running statistics and count unchanged."""
    x = _rng().normal(size=(4, 3)).astype(np.float32)
    x[0, 0] = np.nan  # masked garbage must not leak
    stats = _stats(3)
    y, new = jaxbn.batch_norm(x, _params(3), stats, training=True, mask=np.zeros((4, 3), bool))
    assert np.isfinite(np.asarray(y)[1:]).all()
    for a, b in zip(new, stats, strict=True):
        np.testing.assert_array_equal(a, b)


def test_masked_nan_does_not_leak():
    """NaN in masked-out positions does not reach the statistics or other outputs."""
    x = _rng().normal(size=(6, 2)).astype(np.float32)
    mask = np.ones((6, 2), bool)
    x[2, 1], mask[2, 1] = np.nan, False
    y, stats = jaxbn.batch_norm(x, None, jaxbn.init(2)[1], training=True, mask=mask)
    assert np.isfinite(np.asarray(stats.mean)).all() and np.isfinite(np.asarray(stats.var)).all()
    assert np.isfinite(np.delete(np.asarray(y).ravel(), 5)).all()


# ----------------------------------------------------------------------------------------
# Numerics.


def _offset_batch(shape=(512, 16), seed=0):
    return (1e4 + _rng(seed).normal(size=shape)).astype(np.float32)


def _rel(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b))


def test_stable_variance_when_mean_dominates():
    """float32 1e4 + N(0, 1): the default variance is within 1e-3 of float64, fast is not."""
    x = _offset_batch()
    truth = x.astype(np.float64).var(0)
    assert _rel(jaxbn.moments(x).var, truth) < 1e-3
    assert _rel(jaxbn.moments(x, fast_variance=True).var, truth) > 0.1


def test_stable_variance_on_the_first_step():
    """Fresh stats, one training step: the running variance gets the accurate batch variance."""
    x = _offset_batch()
    _, stats = jaxbn.init(16)
    _, new = jaxbn.batch_norm(x, None, stats, training=True, momentum=0.0)
    assert _rel(new.var, x.astype(np.float64).var(0)) < 1e-3
    assert _rel(new.mean, x.astype(np.float64).mean(0)) < 1e-6


def test_stable_variance_synced(mesh):
    """The same accuracy when the batch is split over 8 devices."""
    x = _offset_batch()
    f = jax.jit(jax.shard_map(partial(jaxbn.moments, axis_name="d"), mesh=mesh,
                              in_specs=P("d"), out_specs=P()))
    m = f(jax.device_put(x, NamedSharding(mesh, P("d"))))
    assert _rel(m.var, x.astype(np.float64).var(0)) < 1e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_statistics_are_float32(dtype):
    """Half-precision input: float32 statistics, output in the input dtype (or `dtype`)."""
    x = jnp.asarray(_rng().normal(3, 2, size=(32, 8)), dtype)
    params, stats = jaxbn.init(8)
    y, new = jaxbn.batch_norm(x, params, stats, training=True)
    assert y.dtype == dtype
    assert new.mean.dtype == new.var.dtype == jnp.float32
    assert jaxbn.moments(x).var.dtype == jnp.float32
    truth = np.asarray(x, np.float64)
    np.testing.assert_allclose(jaxbn.moments(x).mean, truth.mean(0), rtol=1e-6)
    y32, _ = jaxbn.batch_norm(x, params, stats, training=True, dtype=jnp.float32)
    assert y32.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_running_mean_converges(dtype):
    """1500 EMA updates at momentum 0.99 reach the target mean to 5e-3 relative."""
    target = np.linspace(-3.3, 7.7, 8)
    noise = jax.random.normal(jax.random.key(0), (1500, 64, 8))
    batches = (target + 0.5 * noise).astype(dtype)
    _, stats = jaxbn.init(8)

    def step(s, x):
        return jaxbn.batch_norm(x, None, s, training=True, momentum=0.99)[1], None

    stats, _ = jax.lax.scan(step, stats, batches)
    assert stats.mean.dtype == jnp.float32
    # Target: the mean of the (rounded) data actually fed in, over the EMA's horizon.
    fed = np.asarray(batches.astype(jnp.float32), np.float64)[-500:].mean(axis=(0, 1))
    np.testing.assert_allclose(stats.mean, fed, rtol=5e-3, atol=5e-3 * np.abs(fed).mean())
    np.testing.assert_allclose(stats.mean, target, rtol=5e-3, atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(8, 6, 6, 20), (4, 4, 4, 50)])
def test_few_channels_last_features_match_reference(dtype, shape):
    """20 or 50 channels-last features (bfloat16: a widened view inside): float64 reference.

    Statistics and parameter gradients are float32 sums whatever the input dtype, so they
    match the float64 reference of the (rounded) input to 1e-5; y and dx are rounded to the
    input dtype once (bfloat16: 8 significant bits, so 2**-7 relative to values of O(1)).
    """
    # bfloat16 takes the widened view (the path under test); float32 is the control.
    assert (jaxbn.core._widen(jnp.zeros(shape, dtype), (3,), None) > 1) == (dtype != jnp.float32)
    r = _rng(5)
    x = jnp.asarray(r.normal(2.0, 3.0, shape), dtype)
    g = jnp.asarray(r.normal(size=shape), dtype)
    c = shape[-1]
    params = _params(c)
    stats = jaxbn.BatchStats(jnp.zeros(c), jnp.ones(c), jnp.array(0))

    def fn(x, p):
        return jaxbn.batch_norm(x, p, stats, training=True, momentum=0.0)

    (y, new), vjp = jax.vjp(fn, x, params)
    dx, dp = vjp((g, jax.tree.map(jnp.zeros_like, new)._replace(
        count=np.zeros((), jax.dtypes.float0))))
    xd, gd = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, g))
    y_ref, (mean, var, _) = ref.train_forward(xd, params.scale, params.bias)
    rdx, rds, rdb = ref.train_backward(xd, params.scale, gd)
    assert y.dtype == dx.dtype == dtype and new.mean.dtype == new.var.dtype == jnp.float32
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    np.testing.assert_allclose(dp.scale, rds, rtol=1e-4, atol=1e-4)  # cancelling sums
    np.testing.assert_allclose(dp.bias, rdb, rtol=1e-5, atol=1e-5)
    tol = RTOL if dtype == jnp.float32 else 2.0**-7
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float64), rdx, rtol=tol, atol=tol)


@pytest.mark.parametrize("fast_variance", [False, True])
def test_float32_statistics_over_the_wide_view_match_reference(fast_variance):
    """A cache-resident float32 input whose statistics' sums run over the widened view.

    9216 values per feature: float32 sums of that many terms stay within 1e-5 relative of
    the float64 reference (their rounding error grows with the log of the count, ~1e-6
    here). The two-pass variance keeps that accuracy with the mean 200 standard deviations
    from zero; the fast formula is tested on centred data, where it has no cancellation.
    """
    shape = (64, 12, 12, 20)  # 720 KiB: in the band of _sums_fold
    assert jaxbn._xla_cpu._sums_fold(jnp.zeros(shape), (0, 1, 2), 1) > 1
    r = _rng(7)
    x = jnp.asarray(r.normal(0.0 if fast_variance else 600.0, 3.0, shape), jnp.float32)
    g = jnp.asarray(r.normal(size=shape), jnp.float32)
    params = _params(20)
    stats = jaxbn.BatchStats(jnp.zeros(20), jnp.ones(20), jnp.array(0))

    @jax.jit
    def run(x, p, g):
        def fn(x, p):
            return jaxbn.batch_norm(x, p, stats, training=True, momentum=0.0,
                                    fast_variance=fast_variance)

        (y, new), vjp = jax.vjp(fn, x, p)
        return y, new, vjp((g, jax.tree.map(jnp.zeros_like, new)._replace(
            count=np.zeros((), jax.dtypes.float0))))

    y, new, (dx, dp) = run(x, params, g)
    xd, gd = np.asarray(x, np.float64), np.asarray(g, np.float64)
    y_ref, (mean, var, _) = ref.train_forward(xd, params.scale, params.bias)
    rdx, rds, rdb = ref.train_backward(xd, params.scale, gd)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    # y and dx: the float32 mean of values near 600 is off by ~eps * 600 = 4e-5, which the
    # division by std = 3 leaves at ~1e-5 in y; 1e-4 bounds it with room.
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx, np.float64), rdx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp.bias, rdb, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dp.scale, rds, rtol=1e-4, atol=1e-3)  # cancelling sums


# ----------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("axis,shape", [(-1, (16, 4, 4, 3)), (1, (8, 5, 6))])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("fast_variance", [False, True])
def test_gradients_match_reference(axis, shape, use_mask, fast_variance):
    """d/dx, d/dscale, d/dbias equal the closed-form float64 gradients, masks included."""
    r = _rng(3)
    x = r.normal(1, 2, shape).astype(np.float32)
    g = r.normal(size=shape).astype(np.float32)
    c = shape[axis]
    params = _params(c)
    mask = r.random(shape) > 0.25 if use_mask else None

    def loss(x, p):
        y, _ = jaxbn.batch_norm(x, p, None, training=True, axis=axis, mask=mask,
                                fast_variance=fast_variance)
        return jnp.sum(y * g)

    dx, dp = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    rdx, rds, rdb = ref.train_backward(x, params.scale, g, axis, mask=mask)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)  # O(1) values, cancelling sums
    np.testing.assert_allclose(dp.scale, rds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp.bias, rdb, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Across devices.


def _uneven_batch(shape=(D * 6, 5), seed=4):
    """A batch and a mask with different valid counts per device; device 2 fully masked."""
    r = _rng(seed)
    x = r.normal(size=shape).astype(np.float32)
    x += np.repeat(np.arange(D), shape[0] // D)[:, None]  # per-device offsets
    mask = r.random(shape) > 0.5
    per = shape[0] // D
    mask[2 * per : 3 * per] = False
    mask[5 * per : 6 * per] = True
    return x, mask


def _run_synced(kind, fn, x, mask, mesh):
    """Runs ``fn(x, mask) -> (y, stats)`` with the batch split over 8 devices by ``kind``."""
    if kind == "jit-sharded":
        sh = NamedSharding(mesh, P("d"))
        return jax.jit(partial(fn, axis_name=None))(jax.device_put(x, sh),
                                                      jax.device_put(mask, sh))
    if kind == "shard_map":
        sh = NamedSharding(mesh, P("d"))
        f = jax.jit(jax.shard_map(partial(fn, axis_name="d"), mesh=mesh,
                                  in_specs=(P("d"), P("d")), out_specs=(P("d"), P())))
        return f(jax.device_put(x, sh), jax.device_put(mask, sh))
    split = lambda a: a.reshape(D, a.shape[0] // D, *a.shape[1:])
    mapper = {"vmap": jax.vmap, "pmap": jax.pmap}[kind]
    y, stats = mapper(partial(fn, axis_name="d"), axis_name="d")(split(x), split(mask))
    return y.reshape(x.shape), jax.tree.map(lambda s: s[0], stats)


KINDS = ["vmap", "pmap", "shard_map", "jit-sharded"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fast_variance", [False, True])
def test_synced_equals_whole_batch(kind, fast_variance, mesh):
    """Uneven masks and an all-masked device: stats of the union of valid elements."""
    x, mask = _uneven_batch()
    params, stats = _params(5), _stats(5)

    def fn(x, mask, axis_name):
        return jaxbn.batch_norm(x, params, stats, training=True, momentum=0.8, mask=mask,
                                axis_name=axis_name, fast_variance=fast_variance)

    y, new = _run_synced(kind, fn, x, mask, mesh)
    y_ref, (mean, var, _) = ref.train_forward(x, params.scale, params.bias, mask=mask)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(new.mean, ref.ema(stats.mean, mean, 0.8), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(new.var, ref.ema(stats.var, var, 0.8), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_synced_gradients_equal_whole_batch(kind, mesh):
    """Gradients through the synced statistics equal those of one device with the whole batch."""
    x, mask = _uneven_batch(seed=5)
    g = _rng(6).normal(size=x.shape).astype(np.float32)
    params = _params(5)

    def fn(x, mask, axis_name, p):
        return jaxbn.batch_norm(x, p, None, training=True, mask=mask, axis_name=axis_name)

    def loss(x, p):
        y, _ = _run_synced(kind, lambda x, m, axis_name: fn(x, m, axis_name, p), x, mask, mesh)
        return jnp.sum(y * g)

    dx, dp = jax.grad(loss, argnums=(0, 1))(x, params)
    rdx, rds, rdb = ref.train_backward(x, params.scale, g, mask=mask)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp.scale, rds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp.bias, rdb, rtol=1e-5, atol=1e-4)


GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("kind", ["pmap", "shard_map"])
def test_axis_index_groups_sync_within_groups(kind, mesh):
    """Each group of four devices gets the statistics of its own half of the batch."""
    x, mask = _uneven_batch(seed=7)

    def fn(x, mask):
        return jaxbn.moments(x, mask=mask, axis_name="d", axis_index_groups=GROUPS)

    if kind == "pmap":
        split = lambda a: a.reshape(D, -1, *a.shape[1:])
        m = jax.pmap(fn, axis_name="d")(split(x), split(mask))
    else:
        sh = NamedSharding(mesh, P("d"))
        f = jax.jit(jax.shard_map(lambda x, m: jax.tree.map(lambda v: v[None], fn(x, m)),
                                  mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
        m = f(jax.device_put(x, sh), jax.device_put(mask, sh))
    half = x.shape[0] // 2
    for dev in range(D):
        sl = slice(0, half) if dev < 4 else slice(half, None)
        mean, var, n = ref.moments(x[sl], mask=mask[sl])
        np.testing.assert_allclose(m.mean[dev], mean, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(m.var[dev], var, rtol=RTOL, atol=1e-6)
        np.testing.assert_array_equal(m.count[dev], n)


_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)


def _count_collectives(compiled) -> int:
    return len(_COLLECTIVE.findall(compiled.as_text()))


def _shard_map_cost(bn, mesh):
    """(forward, forward+backward) collective counts of ``bn(x, p) -> y`` under shard_map."""
    x = jax.device_put(jnp.ones((D * 4, 6, 6, 16)), NamedSharding(mesh, P("d")))
    p = jaxbn.init(16)[0]
    fwd = jax.jit(jax.shard_map(bn, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d")))

    def loss(x, p):
        return jnp.sum(fwd(x, p) ** 2)

    both = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return (_count_collectives(fwd.lower(x, p).compile()),
            _count_collectives(both.lower(x, p).compile()))


@pytest.mark.parametrize("fast_variance", [False, True])
def test_one_collective_each_way(fast_variance, mesh):
    """Compiled HLO: one collective forward, at most two forward+backward; flax needs more."""
    def ours(x, p):
        return jaxbn.batch_norm(x, p, None, training=True, axis_name="d",
                                fast_variance=fast_variance)[0]

    def theirs(x, p):
        bn = nn.BatchNorm(use_running_average=False, axis_name="d",
                          use_fast_variance=fast_variance)
        variables = {"params": {"scale": p.scale, "bias": p.bias},
                     "batch_stats": {"mean": jnp.zeros(16), "var": jnp.ones(16)}}
        return bn.apply(variables, x, mutable=["batch_stats"])[0]

    fwd, both = _shard_map_cost(ours, mesh)
    assert fwd == 1 and both <= 2, (fwd, both)
    if not fast_variance:
        flax_fwd, flax_both = _shard_map_cost(theirs, mesh)
        assert flax_fwd == 2 and flax_both == 4, (flax_fwd, flax_both)


# ----------------------------------------------------------------------------------------
# Bad input: one test per case, each message naming what was expected and what was got.


X = np.ones((4, 3), np.float32)


def test_error_non_floating_input():
    with pytest.raises(ValueError, match=r"floating-point \(or complex\) input, got dtype int32"):
        jaxbn.batch_norm(X.astype(np.int32), None, None, training=True)


def test_error_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis 2 is out of range .* rank 2.*\[-2, 1\]"):
        jaxbn.batch_norm(X, None, None, training=True, axis=2)


def test_error_params_feature_mismatch():
    with pytest.raises(ValueError, match=r"params.scale has shape \(5,\) .* \(3,\) features"):
        jaxbn.batch_norm(X, jaxbn.init(5)[0], None, training=True)


def test_error_stats_feature_mismatch():
    with pytest.raises(ValueError, match=r"stats.mean has shape \(4,\) .* \(3,\) features"):
        jaxbn.batch_norm(X, None, jaxbn.init(4)[1], training=True)


def test_error_mask_does_not_broadcast():
    with pytest.raises(ValueError, match=r"mask of shape \(4, 2\) does not broadcast .* \(4, 3\)"):
        jaxbn.batch_norm(X, None, None, training=True, mask=np.ones((4, 2), bool))


def test_error_mask_not_boolean():
    with pytest.raises(ValueError, match=r"mask must be a boolean array, got dtype float32"):
        jaxbn.batch_norm(X, None, None, training=True, mask=np.ones((4, 3), np.float32))


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_error_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\].*got {momentum}"):
        jaxbn.batch_norm(X, None, jaxbn.init(3)[1], training=True, momentum=momentum)


@pytest.mark.parametrize("epsilon", [0.0, -1e-5])
def test_error_epsilon_not_positive(epsilon):
    with pytest.raises(ValueError, match=rf"epsilon must be > 0, got {epsilon}"):
        jaxbn.batch_norm(X, None, None, training=True, epsilon=epsilon)


def test_error_one_value_per_feature():
    with pytest.raises(ValueError, match=r"more than 1 value per feature .* shape \(1, 3\)"):
        jaxbn.batch_norm(X[:1], None, None, training=True)


def test_one_value_per_feature_is_fine_synced():
    """With axis_name the other devices supply the values: no error."""
    y, _ = jax.vmap(partial(jaxbn.batch_norm, params=None, stats=None, training=True,
                            axis_name="d"), axis_name="d")(X.reshape(4, 1, 3))
    assert y.shape == (4, 1, 3)


def test_error_training_not_static():
    with pytest.raises(ValueError, match=r"training must be a static Python bool, got ArrayImpl"):
        jaxbn.batch_norm(X, None, None, training=jnp.array(True))


def test_error_groups_without_axis_name():
    with pytest.raises(ValueError, match=r"axis_index_groups was given without axis_name"):
        jaxbn.batch_norm(X, None, None, training=True, axis_index_groups=[[0]])


def test_error_raised_at_trace_time():
    """Errors surface while tracing under jit, before anything runs."""
    with pytest.raises(ValueError, match=r"params.bias has shape"):
        bad = jaxbn.BatchNormParams(jnp.ones(3), jnp.zeros(2))
        jax.jit(partial(jaxbn.batch_norm, training=True)).lower(X, bad, None)


def test_unsynced_bn_in_shard_map_with_replicated_params(mesh):
    """Per-device BN (no axis_name) under shard_map: replicated params get summed gradients."""
    x = _rng(8).normal(size=(D * 4, 3)).astype(np.float32)
    params = _params(3)

    def local(p, x):
        y, _ = jaxbn.batch_norm(x, p, None, training=True)
        return jax.lax.psum(jnp.sum(y**3), "d")

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())
    g = jax.jit(jax.grad(f))(params, jax.device_put(x, NamedSharding(mesh, P("d"))))
    want = [0.0, 0.0]
    for shard in x.reshape(D, 4, 3):
        gs = jax.grad(lambda p, s=shard: jnp.sum(
            jaxbn.batch_norm(s, p, None, training=True)[0] ** 3))(params)
        want = [want[0] + gs.scale, want[1] + gs.bias]
    np.testing.assert_allclose(g.scale, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.bias, want[1], rtol=1e-5, atol=1e-5)


def test_traced_hyperparameters_are_used_unchecked():
    """Traced momentum/epsilon (jit arguments) work, as documented: used as given, unchecked."""
    params, stats = jaxbn.init(3)
    x = _rng(9).normal(size=(6, 3)).astype(np.float32)
    step = jax.jit(lambda x, m, e: jaxbn.batch_norm(x, params, stats, training=True,
                                                     momentum=m, epsilon=e))
    y, new = step(x, 0.9, 1e-3)
    y_ref, new_ref = jaxbn.batch_norm(x, params, stats, training=True, momentum=0.9,
                                      epsilon=1e-3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, new_ref.var, rtol=1e-6)
    # Out of range but traced: no check, no clamp; the documented formula is applied as is.
    _, odd = step(x, 1.5, 1e-3)
    np.testing.assert_allclose(odd.mean, -0.5 * x.mean(0), rtol=1e-5, atol=1e-6)
    # The same values given as numbers are refused.
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\].*got 1.5"):
        jaxbn.batch_norm(x, params, stats, training=True, momentum=1.5)


# ----------------------------------------------------------------------------------------
# Complex inputs (flax's convention): complex mean, real variance E|x - mean|^2.


def _complex_batch(shape=(D * 4, 3), seed=10):
    r = _rng(seed)
    return (r.normal(1, 2, shape) + 1j * r.normal(-2, 1, shape)).astype(np.complex64)


@pytest.mark.parametrize("fast_variance", [False, True])
def test_complex_matches_reference(fast_variance):
    x = _complex_batch()
    params, stats = _params(3), _stats(3)
    y, new = jaxbn.batch_norm(x, params, stats, training=True, momentum=0.9,
                              fast_variance=fast_variance)
    xd = x.astype(np.complex128)
    mean, var = xd.mean(0), (np.abs(xd - xd.mean(0)) ** 2).mean(0)
    want = (xd - mean) / np.sqrt(var + 1e-5) * np.asarray(params.scale) + np.asarray(params.bias)
    assert y.dtype == jnp.complex64 and new.var.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(new.mean, 0.9 * np.asarray(stats.mean) + 0.1 * mean, rtol=RTOL)
    np.testing.assert_allclose(new.var, 0.9 * np.asarray(stats.var) + 0.1 * var, rtol=RTOL)
    y_eval, _ = jaxbn.batch_norm(x, params, new, training=False)
    assert y_eval.dtype == jnp.complex64


@pytest.mark.parametrize("kind", ["vmap", "shard_map"])
def test_complex_synced_equals_whole_batch(kind, mesh):
    x, mask = _complex_batch(), _uneven_batch(shape=(D * 4, 3))[1]
    params = _params(3)

    def fn(x, mask, axis_name):
        return jaxbn.batch_norm(x, params, None, training=True, mask=mask,
                                axis_name=axis_name)

    def loss(x, run):
        return jnp.sum(jnp.abs(run(x)[0]) ** 2 * jnp.arange(3.0))

    got = jax.jit(jax.value_and_grad(lambda x: loss(
        x, lambda x: _run_synced(kind, fn, x, mask, mesh))))(x)
    want = jax.jit(jax.value_and_grad(lambda x: loss(x, lambda x: fn(x, mask, None))))(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_complex_gradients_match_plain_autodiff():
    """The custom derivative rule agrees with JAX's own derivatives of the formula."""
    x = _complex_batch((12, 3))
    params = _params(3)

    def plain(x, p):
        mean = x.mean(0)
        var = jnp.mean(jnp.abs(x - mean) ** 2, 0)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p.scale + p.bias

    def loss(f):
        return lambda x, p: jnp.sum(jnp.sin(f(x, p).real) + jnp.cos(f(x, p).imag))

    ours = lambda x, p: jaxbn.batch_norm(x, p, None, training=True)[0]  # noqa: E731
    t = _complex_batch((12, 3), seed=11)

    @jax.jit
    def derivatives(x, p):
        return [(jax.grad(loss(f), argnums=(0, 1))(x, p),
                 jax.jvp(partial(f, p=p), (x,), (t,))[1]) for f in (ours, plain)]

    got, want = derivatives(x, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vmap", "pmap", "shard_map"])
def test_forward_mode_synced_equals_whole_batch(kind, mesh):
    """jvp and a forward-over-reverse Hessian-vector product through synced statistics."""
    x, mask = _uneven_batch(seed=12)
    t = _rng(13).normal(size=x.shape).astype(np.float32)
    params = _params(5)

    def fn(x, mask, axis_name):
        return jaxbn.batch_norm(x, params, None, training=True, mask=mask, axis_name=axis_name)

    def derivatives(run, x):
        y = lambda x: run(x)[0]  # noqa: E731
        loss = lambda x: jnp.sum(jnp.sin(y(x)))  # noqa: E731
        return jax.jvp(y, (x,), (t,))[1], jax.jvp(jax.grad(loss), (x,), (t,))[1]

    got = jax.jit(partial(derivatives, lambda x: _run_synced(kind, fn, x, mask, mesh)))(x)
    want = jax.jit(partial(derivatives, lambda x: fn(x, mask, None)))(x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
