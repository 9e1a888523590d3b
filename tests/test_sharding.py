"""Sharded ``jit`` with explicit mesh axes (``jax.make_mesh``'s default): one-device results.

With the batch sharded over explicit axes the core runs per device inside a ``shard_map``
over them, so batch sizes whose first rows do not split evenly over the devices (the slice
the two-pass variance takes its shift from) work too, and the compiled program has the
collectives of ``axis_name`` synchronization and no others.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests.conftest import NUM_DEVICES as D

# The shift's slice is 3 rows of 25 values for (B, 5, 5, 7) — not a multiple of 8 devices —
# and 64 rows for (512, 7), which is.
SHAPES = [(8, 5, 5, 7), (64, 5, 5, 7), (512, 7)]


@pytest.fixture(scope="module")
def explicit():
    return jax.make_mesh((D,), ("d",))


def _data(shape, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(2.0, 3.0, shape).astype(np.float32)
    mask = r.random(shape[:-1] + (1,)) > 0.3
    params = jaxbn.BatchNormParams(jnp.asarray(r.uniform(0.5, 1.5, shape[-1]), jnp.float32),
                                   jnp.asarray(r.normal(size=shape[-1]), jnp.float32))
    stats = jaxbn.BatchStats(jnp.asarray(r.normal(size=shape[-1]), jnp.float32),
                             jnp.asarray(r.uniform(0.5, 2, shape[-1]), jnp.float32),
                             jnp.array(0, jnp.int32))
    return x, mask, params, stats


def _linen(x, mask, p, s):
    model = nn.Sequential([nn.Dense(6), jaxbn.linen.BatchNorm(use_running_average=False)])
    variables = model.init(jax.random.key(0), x)
    variables["params"]["layers_1"] = {"scale": p.scale[:6], "bias": p.bias[:6]}
    y, upd = model.apply(variables, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]


def _nnx(x, mask, p, s):
    bn = jaxbn.nnx.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = p.scale, p.bias
    return bn(x), (bn.mean[...], bn.var[...])


SUBJECTS = {
    "core": lambda x, m, p, s: jaxbn.batch_norm(x, p, s, training=True),
    "masked": lambda x, m, p, s: jaxbn.batch_norm(x, p, s, training=True, mask=m),
    "moments": lambda x, m, p, s: (x, jaxbn.moments(x)),
    "renorm": lambda x, m, p, s: jaxbn.batch_renorm(x, p, s, training=True, r_max=1.5,
                                                    d_max=0.5),
    "ghost-aligned": lambda x, m, p, s: jaxbn.ghost_batch_norm(x, p, s, training=True,
                                                               virtual_batch_size=4),
    "ghost-spanning": lambda x, m, p, s: jaxbn.ghost_batch_norm(x, p, s, training=True,
                                                                virtual_batch_size=16),
    "linen": _linen,
    "nnx": _nnx,
}


def _close(got, want, what):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5,
                                   atol=2e-5 * max(1.0, float(np.abs(b).max())), err_msg=what)


@pytest.mark.parametrize("shape,subject", [(s, "core") for s in SHAPES]
                         + [((64, 5, 5, 7), k) for k in SUBJECTS if k != "core"])
def test_explicit_sharding_equals_one_device(shape, subject, explicit):
    """Outputs, statistics and gradients equal the unsharded ones; y keeps x's sharding."""
    fn = SUBJECTS[subject]
    x, mask, params, stats = _data(shape)

    def loss(x, p):
        y, s = fn(x, mask, p, stats)
        return jnp.sum(jnp.sin(y)), (y, s)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    want = grad(x, params)
    with jax.set_mesh(explicit):
        xs = jax.device_put(x, P("d"))
        mask = jax.device_put(mask, P("d"))
        got = jax.jit(grad)(xs, params)
    _close(got, want, f"{subject} {shape}")
    y = got[0][1][0]
    assert jax.typeof(y).sharding.spec[0] == "d", jax.typeof(y)


def test_feature_axis_sharded_too():
    """A 2-d mesh, batch over one axis and features over the other: still one-device."""
    mesh = jax.make_mesh((2, 4), ("b", "f"))
    x, mask, params, stats = _data((16, 3, 3, 8), seed=1)
    fn = lambda x, p: jaxbn.batch_norm(x, p, stats, training=True)  # noqa: E731
    want = jax.grad(lambda x, p: jnp.sum(fn(x, p)[0] ** 2), argnums=(0, 1))(x, params)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("b", None, None, "f"))
        got = jax.jit(jax.grad(lambda x, p: jnp.sum(fn(x, p)[0] ** 2), argnums=(0, 1)))(
            xs, params)
        y, new = jax.jit(fn)(xs, params)
    _close(got, want, "grads")
    _close((y, new), fn(x, params), "values")


_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)


def _collectives(f, *args) -> int:
    return len(_COLLECTIVE.findall(jax.jit(f).lower(*args).compile().as_text()))


@pytest.mark.parametrize("fast_variance", [False, True])
def test_collectives_no_more_than_flax(fast_variance, explicit):
    """Compiled HLO: one collective forward, two with the backward; flax needs as many or more."""
    x, _, params, _ = _data((64, 5, 5, 7))

    def ours(x, p):
        return jaxbn.batch_norm(x, p, None, training=True, fast_variance=fast_variance)[0]

    def theirs(x, p):
        bn = nn.BatchNorm(use_running_average=False, use_fast_variance=fast_variance)
        variables = {"params": {"scale": p.scale, "bias": p.bias},
                     "batch_stats": {"mean": jnp.zeros(7), "var": jnp.ones(7)}}
        return bn.apply(variables, x, mutable=["batch_stats"])[0]

    counts = {}
    with jax.set_mesh(explicit):
        xs = jax.device_put(x, P("d"))
        for name, f in (("ours", ours), ("flax", theirs)):
            both = jax.grad(lambda x, p, f=f: jnp.sum(f(x, p) ** 2), argnums=(0, 1))
            counts[name] = (_collectives(f, xs, params), _collectives(both, xs, params))
    assert counts["ours"] == (1, 2), counts
    assert counts["flax"][0] >= 1 and counts["flax"][1] >= 2, counts
