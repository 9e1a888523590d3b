"""jax.export: functions over jaxbn's state types serialize, and batch sizes can be symbolic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import precise
from jaxbn.core import Renorm


def _train(x, params, stats):
    return jaxbn.batch_norm(x, params, stats, training=True, momentum=0.9)


def _round_trip(fn, *args):
    """Exports ``fn`` for ``args`` (arrays or ShapeDtypeStructs), serializes, deserializes."""
    blob = jax.export.export(jax.jit(fn))(*args).serialize()
    return jax.export.deserialize(blob)


def test_batch_norm_with_state_types_serializes():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    params, stats = jaxbn.init(3)
    y, new = _round_trip(_train, x, params, stats).call(x, params, stats)
    want_y, want = _train(x, params, stats)
    assert type(new) is jaxbn.BatchStats
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    for got, ref in zip(new, want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_every_state_type_round_trips():
    """Moments, Renorm and PreciseBN's Population as outputs come back as themselves."""
    def states(x):
        m = jaxbn.moments(x)
        return m, Renorm(m.mean, m.var, 3.0, 5.0), precise.accumulate(precise.population(3), m)

    x = jnp.arange(12.0).reshape(4, 3)
    got = _round_trip(states, x).call(x)
    want = states(x)
    assert [type(t) for t in got] == [jaxbn.Moments, Renorm, precise.Population]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


@pytest.mark.parametrize("mask", [False, True])
def test_symbolic_batch_size_exports(mask):
    """One export for every batch size: the layer traces with a symbolic batch dimension,
    serializes, and its calls at two sizes equal direct calls (statistics, output, grads)."""
    params = jaxbn.BatchNormParams(jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 1.0, -1.0]))
    stats = jaxbn.init(3)[1]

    def step(x, m, params, stats):
        def loss(x, params):
            y, new = jaxbn.batch_norm(x, params, stats, training=True, momentum=0.9,
                                      mask=m if mask else None)
            return jnp.sum(jnp.sin(y)), new

        (_, new), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
        return new, grads

    (b,) = jax.export.symbolic_shape("b")
    spec = (jax.ShapeDtypeStruct((b, 4, 3), jnp.float32), jax.ShapeDtypeStruct((b, 4, 1), bool))
    call = _round_trip(step, *spec, params, stats).call
    rng = np.random.default_rng(1)
    for n in (2, 5):
        x = jnp.asarray(rng.normal(3.0, 2.0, (n, 4, 3)), jnp.float32)
        m = jnp.asarray(rng.random((n, 4, 1)) < 0.7)
        got, want = call(x, m, params, stats), step(x, m, params, stats)
        # The same algorithm on the same numbers, compiled apart: float32 rounding only.
        jax.tree.map(lambda a, w: np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6),
                     got, want)
