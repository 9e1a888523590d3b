"""Batch Renormalization and Ghost BatchNorm against plain BN and the float64 reference."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.variants import batch_renorm, ghost_batch_norm
from tests import reference as ref

RTOL = 1e-5


def _data(shape=(16, 5), seed=0, loc=1.0, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _params(c, seed=1):
    r = np.random.default_rng(seed)
    return jaxbn.BatchNormParams(jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32),
                                 jnp.asarray(r.normal(size=c), jnp.float32))


def _stats(c, seed=2):
    r = np.random.default_rng(seed)
    return jaxbn.BatchStats(jnp.asarray(r.normal(size=c), jnp.float32),
                            jnp.asarray(r.uniform(0.2, 3, c), jnp.float32), jnp.array(5))


def _assert_tree_close(a, b, rtol=RTOL, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# Batch Renormalization.


@pytest.mark.parametrize("use_mask", [False, True])
def test_renorm_without_corrections_is_batch_norm(use_mask):
    """r_max=1, d_max=0: outputs, stats and gradients equal plain BN."""
    x, g = _data(), _data(seed=3)
    mask = np.random.default_rng(4).random(x.shape) > 0.3 if use_mask else None
    params, stats = _params(5), _stats(5)

    def run(fn, x, p):
        y, s = fn(x, p, stats, training=True, mask=mask, momentum=0.8)
        return jnp.sum(y * g), (y, s)

    renorm = partial(batch_renorm, r_max=1.0, d_max=0.0)
    (_, out_r), grads_r = jax.value_and_grad(partial(run, renorm), (0, 1), has_aux=True)(x, params)
    (_, out_b), grads_b = jax.value_and_grad(partial(run, jaxbn.batch_norm), (0, 1),
                                             has_aux=True)(x, params)
    _assert_tree_close(out_r, out_b)
    _assert_tree_close(grads_r, grads_b, rtol=1e-4, atol=1e-5)


def test_renorm_training_equals_inference_at_matching_stats():
    """When the running statistics equal the batch's, training output == inference output."""
    x = _data()
    params = _params(5)
    m = jaxbn.moments(x)
    stats = jaxbn.BatchStats(m.mean, m.var, jnp.array(10))
    y_train, _ = batch_renorm(x, params, stats, training=True)
    y_eval, _ = batch_renorm(x, params, stats, training=False)
    np.testing.assert_allclose(y_train, y_eval, rtol=RTOL, atol=1e-5)


def test_renorm_matches_reference_with_clipping():
    """Running stats far from the batch's: r and d are clipped as in Ioffe (2017)."""
    x = _data(loc=4.0)
    params, stats = _params(5), _stats(5)
    y, new = batch_renorm(x, params, stats, training=True, r_max=1.5, d_max=0.5, momentum=0.9)
    mean, var, _ = ref.moments(x)
    sb, s = np.sqrt(var + 1e-5), np.sqrt(np.asarray(stats.var, np.float64) + 1e-5)
    r = np.clip(sb / s, 1 / 1.5, 1.5)
    d = np.clip((mean - np.asarray(stats.mean)) / s, -0.5, 0.5)
    assert (np.abs(d) == 0.5).any() and ((r == 1.5) | (r == 1 / 1.5)).any()  # both clip
    want = ((x - mean) / sb * r + d) * np.asarray(params.scale) + np.asarray(params.bias)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(new.mean, ref.ema(stats.mean, mean, 0.9), rtol=RTOL)


def test_renorm_has_no_gradient_through_r_and_d():
    """dL/dx equals plain BN's with the scale multiplied by the (constant) r."""
    x, g = _data(), _data(seed=3)
    params, stats = _params(5), _stats(5)
    m = ref.moments(x)
    r = np.clip(np.sqrt(m[1] + 1e-5) / np.sqrt(np.asarray(stats.var, np.float64) + 1e-5),
                1 / 3, 3)
    gx = jax.grad(lambda x: jnp.sum(batch_renorm(x, params, stats, training=True)[0] * g))(x)
    want, _, _ = ref.train_backward(x, np.asarray(params.scale) * r, g)
    np.testing.assert_allclose(gx, want, rtol=1e-4, atol=1e-4)


def test_renorm_synced_equals_whole_batch():
    """With axis_name under vmap, the 4 shards renormalize as the whole batch does."""
    x = _data((16, 5))
    params, stats = _params(5), _stats(5)
    fn = partial(batch_renorm, params=params, stats=stats, training=True, axis_name="d")
    y, s = jax.vmap(fn, axis_name="d")(x.reshape(4, 4, 5))
    y_all, s_all = batch_renorm(x, params, stats, training=True)
    np.testing.assert_allclose(y.reshape(16, 5), y_all, rtol=RTOL, atol=1e-5)
    _assert_tree_close(jax.tree.map(lambda v: v[0], s), s_all)


def test_renorm_errors():
    x = _data()
    with pytest.raises(ValueError, match="needs running statistics"):
        batch_renorm(x, None, None, training=True)
    with pytest.raises(ValueError, match=r"r_max must be >= 1, got 0.5"):
        batch_renorm(x, None, _stats(5), training=True, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be >= 0, got -1"):
        batch_renorm(x, None, _stats(5), training=True, d_max=-1)


# ----------------------------------------------------------------------------------------
# Ghost BatchNorm.


@pytest.mark.parametrize("shape,axis", [((12, 5), -1), ((12, 3, 4, 4), 1), ((12, 4, 4, 3), -1)])
def test_ghost_equals_vmapped_batch_norm(shape, axis):
    """Output equals plain BN vmapped over the splits; stats move to the splits' mean."""
    x, v = _data(shape), 4
    c = shape[axis]
    params, stats = _params(c), _stats(c)
    y, new = ghost_batch_norm(x, params, stats, training=True, virtual_batch_size=v, axis=axis,
                              momentum=0.9, unbiased_running_var=True)
    splits = x.reshape(3, v, *shape[1:])
    bn = partial(jaxbn.batch_norm, params=params, stats=stats, training=True, axis=axis,
                 momentum=0.9, unbiased_running_var=True)
    y_ref, s_ref = jax.vmap(bn)(splits)
    np.testing.assert_allclose(y, y_ref.reshape(shape), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(new.mean, s_ref.mean.mean(0), rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(new.var, s_ref.var.mean(0), rtol=RTOL, atol=1e-6)
    assert int(new.count) == int(stats.count) + 1


def test_ghost_with_mask_matches_reference():
    """Masked elements leave each virtual batch's statistics; gradients still flow."""
    x = _data((8, 3))
    mask = np.random.default_rng(5).random(x.shape) > 0.3
    y, _ = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4, mask=mask)
    for k in range(2):
        sl = slice(4 * k, 4 * k + 4)
        want, _ = ref.train_forward(x[sl], np.ones(3), np.zeros(3), mask=mask[sl])
        np.testing.assert_allclose(y[sl], want, rtol=RTOL, atol=1e-5)


def test_ghost_synced_merges_kth_virtual_batches():
    """Under vmap with axis_name, virtual batch k of every device is normalized together."""
    x = _data((4, 8, 3))  # 4 devices x 8 examples
    y, _ = jax.vmap(partial(ghost_batch_norm, params=None, stats=None, training=True,
                            virtual_batch_size=4, axis_name="d"), axis_name="d")(x)
    for k in range(2):
        sl = slice(4 * k, 4 * k + 4)
        union = x[:, sl].reshape(-1, 3)
        want, _ = ref.train_forward(union, np.ones(3), np.zeros(3))
        np.testing.assert_allclose(y[:, sl].reshape(-1, 3), want, rtol=RTOL, atol=1e-5)


def test_ghost_inference_uses_running_stats():
    x, stats = _data(), _stats(5)
    y, out = ghost_batch_norm(x, None, stats, training=False, virtual_batch_size=4)
    y_bn, _ = jaxbn.batch_norm(x, None, stats, training=False)
    np.testing.assert_array_equal(y, y_bn)
    assert out is stats


def test_ghost_errors():
    x = _data((12, 5))
    with pytest.raises(ValueError, match=r"positive divisor of the batch size 12 .* got 5"):
        ghost_batch_norm(x, None, None, training=True, virtual_batch_size=5)
    with pytest.raises(ValueError, match=r"batch_axis must be a non-feature axis"):
        ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4, batch_axis=1)
    with pytest.raises(ValueError, match=r"more than 1 value per feature in each virtual batch"):
        ghost_batch_norm(x, None, None, training=True, virtual_batch_size=1)


# ----------------------------------------------------------------------------------------
# Through the Flax modules.


@pytest.mark.parametrize("kind", ["linen", "nnx"])
@pytest.mark.parametrize("variant", ["renorm", "ghost"])
def test_module_keywords_select_the_variant(kind, variant):
    """renorm=True / virtual_batch_size=v in the modules equal the pure functions."""
    from flax import nnx

    from jaxbn import linen as jlinen
    from jaxbn import nnx as jnnx

    x = _data((8, 5))
    kw = {"renorm": True, "renorm_r_max": 1.5, "renorm_d_max": 0.5} if variant == "renorm" \
        else {"virtual_batch_size": 4}
    if kind == "linen":
        bn = jlinen.BatchNorm(use_running_average=False, momentum=0.9, **kw)
        variables = bn.init(jax.random.key(0), x)
        running = {"mean": jnp.full(5, 0.5), "var": jnp.full(5, 2.0)}
        variables = {**variables, "batch_stats": running}
        y, upd = bn.apply(variables, x, mutable=["batch_stats"])
        new_mean = upd["batch_stats"]["mean"]
    else:
        bn = jnnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0), **kw)
        bn.mean[...] = jnp.full(5, 0.5)
        bn.var[...] = jnp.full(5, 2.0)
        y = bn(x)
        new_mean = bn.mean[...]
    stats = jaxbn.BatchStats(jnp.full(5, 0.5), jnp.full(5, 2.0), jnp.array(0))
    if variant == "renorm":
        want, s = batch_renorm(x, jaxbn.init(5)[0], stats, training=True, momentum=0.9,
                               r_max=1.5, d_max=0.5)
    else:
        want, s = ghost_batch_norm(x, jaxbn.init(5)[0], stats, training=True, momentum=0.9,
                                   virtual_batch_size=4)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(new_mean, s.mean, rtol=RTOL, atol=1e-6)
    # And it is not plain BN.
    plain, _ = jaxbn.batch_norm(x, jaxbn.init(5)[0], stats, training=True)
    assert np.abs(np.asarray(y) - np.asarray(plain)).max() > 1e-3


def test_select_rejects_both_variants():
    from jaxbn.variants import select

    with pytest.raises(ValueError, match="choose one of renorm=True and virtual_batch_size"):
        select(renorm=True, virtual_batch_size=4)
