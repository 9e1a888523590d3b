"""What programs lowered for each platform contain: XLA:CPU's devices in CPU programs only.

Lowering needs no device of the platform: ``jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))`` on the CPU gives the program a GPU would compile. A small
ResNet-like training step (convolution, BatchNorm, ReLU, a residual block) with jaxbn's
BatchNorm and with flax's: for ``cuda`` and ``tpu`` jaxbn's has no conditional on the
platform and no optimization barrier beyond flax's; for ``cpu`` it keeps its barriers.
Then the barrier path itself (every input taking it) under the transformations, and
exported for two platforms at once.
"""

from __future__ import annotations

import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from jaxbn import _xla_cpu


class _Net(nn.Module):
    """conv, BN, ReLU; one residual block of two; global mean; logits."""

    bn: type[nn.Module]
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = partial(nn.Conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype)
        bn = partial(self.bn, use_running_average=False, momentum=0.9, dtype=self.dtype)
        x = nn.relu(bn()(conv(16)(x)))
        y = nn.relu(bn()(conv(16)(x)))
        x = nn.relu(x + bn()(conv(16)(y)))
        return nn.Dense(10, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


def _counts(bn: type[nn.Module], dtype: jnp.dtype, shape: tuple[int, ...]
            ) -> dict[str, dict[str, int]]:
    """``{platform: {"case": n, "barrier": n}}`` of one SGD training step's program."""
    net = _Net(bn, dtype)
    x = jax.ShapeDtypeStruct(shape, dtype)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    tx = optax.sgd(0.1, momentum=0.9)

    def step(variables, opt_state, x, labels):
        def loss_fn(params):
            logits, upd = net.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels).mean()
            return loss, upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return optax.apply_updates(variables["params"], updates), upd, opt_state, loss

    traced = jax.jit(step).trace(variables, jax.eval_shape(tx.init, variables["params"]),
                                 x, labels)
    out = {}
    for platform in ("cuda", "tpu", "cpu"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        out[platform] = {"case": len(re.findall(r"stablehlo\.case\b", text)),
                         "barrier": len(re.findall(r"stablehlo\.optimization_barrier\b", text))}
    return out


# float32 at 2 MiB per BN input (the smallest that takes XLA:CPU's barrier path); bfloat16
# always takes it, and the wide view. Lowering only: nothing is compiled or run.
@pytest.mark.parametrize(("dtype", "shape"), [(jnp.float32, (32, 32, 32, 3)),
                                              (jnp.bfloat16, (8, 8, 8, 3))])
def test_accelerator_programs_have_only_what_flax_has(dtype, shape):
    ours = _counts(jaxbn.linen.BatchNorm, dtype, shape)
    flax = _counts(nn.BatchNorm, dtype, shape)
    for platform in ("cuda", "tpu"):
        assert ours[platform]["case"] <= flax[platform]["case"], (platform, ours, flax)
        assert ours[platform]["barrier"] <= flax[platform]["barrier"], (platform, ours, flax)
    # The CPU program keeps XLA:CPU's barriers (at least one per BN layer), with no
    # conditional on the platform either.
    assert ours["cpu"]["barrier"] >= flax["cpu"]["barrier"] + 3, (ours, flax)
    assert ours["cpu"]["case"] <= flax["cpu"]["case"], (ours, flax)


# ----------------------------------------------------------------------------------------
# The barrier path under the transformations: every input takes it here.


@pytest.fixture
def every_input_streams(monkeypatch):
    monkeypatch.setattr(_xla_cpu, "_STREAM_BYTES", 0)


def _bn(x, scale, bias, axis_name=None):
    from jaxbn.core import batch_normalize

    return batch_normalize(x, jaxbn.BatchNormParams(scale, bias), axis_name=axis_name)


def _value_and_grads(x, scale, bias, axis_name=None):
    def loss(x, scale, bias):
        y, _ = _bn(x, scale, bias, axis_name)
        return jnp.sum(jnp.sin(y))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, scale, bias)


def _data(n=8):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(1.0, 2.0, (n, 4, 4, 5)), jnp.float32)
    return x, jnp.asarray(r.uniform(0.5, 1.5, 5), jnp.float32), jnp.asarray(r.normal(size=5),
                                                                             jnp.float32)


def _close(a, b):
    # Barriers change no value; the programs differ only in how XLA fuses them, so float32
    # rounding of the sums over 128 elements (a few ulps) bounds the difference.
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=2e-6, atol=2e-6)


def test_barrier_path_under_transformations(every_input_streams):
    x, scale, bias = _data()
    want = jax.jit(_value_and_grads)(x, scale, bias)
    text = jax.jit(_value_and_grads).trace(x, scale, bias).lower(
        lowering_platforms=("cpu",)).as_text()
    assert "optimization_barrier" in text  # the path under test is taken

    xs = jnp.stack([x, x * 2 + 1])
    got_vmap = jax.jit(jax.vmap(_value_and_grads, in_axes=(0, None, None)))(xs, scale, bias)
    _close(jax.tree.map(lambda v: v[0], got_vmap), want)

    def forward(x):
        return _bn(x, scale, bias)[0]

    y, y_dot = jax.jit(lambda x, t: jax.jvp(forward, (x,), (t,)))(x, jnp.cos(x))
    y0, lin = jax.linearize(forward, x)
    _close((y, y_dot), (y0, lin(jnp.cos(x))))

    def body(carry, x):
        return carry, _value_and_grads(x, scale, bias)

    _close(jax.tree.map(lambda v: v[0], jax.jit(lambda xs: jax.lax.scan(body, 0, xs))(xs)[1]),
           want)

    # One batch split over devices, its statistics synced: shard_map and pmap. The loss is
    # a per-device sum there; the parameters' gradients come out global.
    d = 4
    mesh = jax.make_mesh((d,), ("b",), axis_types=(jax.sharding.AxisType.Explicit,))

    def per_device(x, scale, bias):
        loss, grads = _value_and_grads(x, scale, bias, axis_name="b")
        return jax.lax.psum(loss, "b"), grads

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("b"), P(), P()),
                                    out_specs=(P(), (P("b"), P(), P()))))
    _close(sharded(jax.device_put(x, jax.sharding.NamedSharding(mesh, P("b"))), scale, bias),
           want)
    loss, (dx, _, _) = jax.pmap(partial(_value_and_grads, axis_name="b"), axis_name="b",
                                in_axes=(0, None, None))(x.reshape(d, -1, *x.shape[1:]),
                                                         scale, bias)
    _close((loss.sum(), dx.reshape(x.shape)), (want[0], want[1][0]))


def test_export_for_cpu_and_cuda_runs_on_the_cpu(every_input_streams):
    x, scale, bias = _data()
    exported = jax.export.export(jax.jit(_value_and_grads), platforms=("cpu", "cuda"))(
        x, scale, bias)
    assert exported.platforms == ("cpu", "cuda")
    text = exported.mlir_module()
    assert "optimization_barrier" in text
    got = jax.export.deserialize(exported.serialize()).call(x, scale, bias)
    _close(got, jax.jit(_value_and_grads)(x, scale, bias))
