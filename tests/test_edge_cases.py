"""Inputs at the edges: weakly typed or 64-bit statistics, a count at the int32 maximum,
NaN and Inf where the mask excludes them. Each has one right answer, pinned here."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

# ----------------------------------------------------------------------------------------
# The statistics' dtype.


def test_weakly_typed_statistics_are_float32_for_half_inputs():
    """Statistics built from Python floats are weakly typed: they must not be rounded to
    bfloat16 with the input (1000.3 would become 1000, and y 0 instead of -3)."""
    x = jnp.full((4, 5), 1000.0, jnp.bfloat16)
    weak = jaxbn.BatchStats(jnp.full((5,), 1000.3), jnp.full((5,), 0.01), jnp.array(0))
    strong = jaxbn.BatchStats(jnp.full((5,), 1000.3, jnp.float32),
                              jnp.full((5,), 0.01, jnp.float32), jnp.array(0))
    assert weak.mean.weak_type and not strong.mean.weak_type
    y_weak, _ = jaxbn.batch_norm(x, None, weak, training=False, epsilon=1e-12)
    y_strong, _ = jaxbn.batch_norm(x, None, strong, training=False, epsilon=1e-12)
    np.testing.assert_array_equal(y_weak.astype(jnp.float32), y_strong.astype(jnp.float32))
    np.testing.assert_allclose(y_strong.astype(jnp.float32), -3.0, rtol=1e-2)
    y = jaxbn.normalize(x, weak.mean, weak.var, epsilon=1e-12)
    np.testing.assert_array_equal(y.astype(jnp.float32), y_strong.astype(jnp.float32))
    # Updated statistics stay float32 (not rounded to the input's dtype).
    _, new = jaxbn.batch_norm(x, None, weak, training=True, momentum=0.5)
    assert new.mean.dtype == jnp.float32
    np.testing.assert_allclose(new.mean, 1000.15, rtol=1e-7)


def test_statistics_are_as_wide_as_float64_parameters():
    """Under x64, float32 statistics of data at mean 1e8 are off by ~8 (their spacing), a
    tenth of a standard deviation here: inference then disagrees with training."""
    with jax.enable_x64(True):
        params, stats = jaxbn.init(3, param_dtype=jnp.float64)
        assert stats.mean.dtype == stats.var.dtype == jnp.float64
        assert stats.count.dtype == jnp.int32
        x = 1e8 + 80.0 * jnp.asarray(np.random.default_rng(0).normal(size=(64, 3)))
        y_train, new = jaxbn.batch_norm(x, params, stats, training=True, momentum=0.0)
        y_eval, _ = jaxbn.batch_norm(x, params, new, training=False)
        assert new.mean.dtype == jnp.float64
        np.testing.assert_allclose(y_eval, y_train, atol=1e-9)
        # Half-precision parameters keep float32 statistics.
        assert jaxbn.init(3, param_dtype=jnp.bfloat16)[1].mean.dtype == jnp.float32


# ----------------------------------------------------------------------------------------
# The count.


INT32_MAX = np.iinfo(np.int32).max


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_count_saturates_at_the_int32_maximum(momentum):
    """A count PyTorch carried past 2**31 - 1 (from_torch accepts it) stays there, and the
    cumulative average keeps a weight of about 1 / 2**31 for the new batch."""
    stats = jaxbn.BatchStats(jnp.full((3,), 2.0), jnp.full((3,), 4.0), jnp.array(INT32_MAX))
    batch = jaxbn.Moments(jnp.full((3,), 3.0), jnp.full((3,), 5.0), jnp.full((3,), 8.0))
    new = jax.jit(partial(jaxbn.update_stats, momentum=momentum))(stats, batch)
    assert int(new.count) == INT32_MAX
    want = (2.0, 4.0) if momentum is None else (2.1, 4.1)
    np.testing.assert_allclose(new.mean, want[0], rtol=1e-6)
    np.testing.assert_allclose(new.var, want[1], rtol=1e-6)
    x = jnp.arange(12.0).reshape(4, 3)
    _, new = jaxbn.batch_norm(x, None, stats, training=True, momentum=momentum)
    assert int(new.count) == INT32_MAX
    # Below the maximum, the count still grows by one.
    below = stats._replace(count=jnp.array(INT32_MAX - 1))
    assert int(jaxbn.update_stats(below, batch, momentum=momentum).count) == INT32_MAX


# ----------------------------------------------------------------------------------------
# Non-finite values where the mask excludes them.


def _masked_grads(x, mask, params, g, **kwargs):
    def loss(x, params):
        y, _ = jaxbn.batch_norm(x, params, jaxbn.init(3)[1], training=True, mask=mask,
                                **kwargs)
        return jnp.sum(jnp.where(mask, y, 0.0) * g)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)


@pytest.mark.parametrize("padding", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kwargs", [{}, {"fast_variance": True}],
                         ids=["two-pass", "fast_variance"])
def test_masked_non_finite_padding_does_not_reach_the_gradients(padding, kwargs):
    """Padding excluded by the mask is never read: the gradients of the valid elements,
    of scale and of bias equal those with clean padding, and padding gets zero."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4, 3)).astype(np.float32)
    mask = np.ones((6, 4, 1), bool)
    mask[4:, 2:] = False  # the last two sequences are shorter
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    params = jaxbn.BatchNormParams(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.1, 0.2, 0.3]))
    clean = _masked_grads(jnp.asarray(np.where(mask, x, 0.0)), mask, params, g, **kwargs)
    dirty = _masked_grads(jnp.asarray(np.where(mask, x, padding)), mask, params, g, **kwargs)
    for got, want in zip(jax.tree.leaves(dirty), jax.tree.leaves(clean), strict=True):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_array_equal(got, want)  # the same operations on the same values
    dx = np.asarray(dirty[0])
    np.testing.assert_array_equal(dx[~np.broadcast_to(mask, x.shape)], 0.0)
