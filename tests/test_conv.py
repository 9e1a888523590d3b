"""Tests for train.conv: values and gradients against lax / flax.linen.Conv.

Tolerance: float32 with ``rtol=1e-5`` and an absolute floor of ``1e-5 * max|ref|``.
The custom CPU path sums the same products as XLA's convolution but in another
order (per batch chunk, per kernel row, through matmuls), so results differ in
the last bits; entries that cancel to near zero need the absolute floor because a
pure relative bound is meaningless there.  Observed errors are ~1e-6 of max|ref|.
"""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import train.conv as conv_mod
from train.conv import Conv, conv2d

RTOL = 1e-5

CASES = {
    # name: (batch, height, width, c_in, c_out, kh, kw, padding)
    "lenet_conv1": (8, 28, 28, 1, 20, 5, 5, "VALID"),
    "lenet_conv2": (8, 12, 12, 20, 50, 5, 5, "VALID"),
    "same_3x3": (3, 9, 7, 4, 6, 3, 3, "SAME"),
    "same_even_kernel_odd_sizes": (2, 11, 6, 3, 7, 4, 3, "SAME"),
    "batch1_same": (1, 7, 9, 16, 5, 3, 3, "SAME"),
    "explicit_pads": (3, 8, 8, 2, 3, 3, 3, ((1, 2), (0, 1))),
}


def _close(actual, expected):
    expected = np.asarray(expected)
    atol = RTOL * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=atol)


def _normal(rng, *shape):
    # numpy, not jax.random: every new shape would cost a jax compile.
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _inputs(case, seed=0):
    """x, kernel, bias, and a numpy Generator for further draws (cotangents)."""
    b, h, w, c, o, kh, kw, _ = case
    rng = np.random.default_rng(seed)
    x = _normal(rng, b, h, w, c)
    k = _normal(rng, kh, kw, c, o) / np.sqrt(kh * kw * c)
    bias = _normal(rng, o)
    return x, k, bias, rng


def _reference(x, k, bias, padding):
    pads = conv_mod._pairs(padding, k.shape[:2])
    y = lax.conv_general_dilated(
        x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    return y + bias


def _value_and_grads(fn, x, k, bias, cot):
    """Output and d<y, cot>/d(x, k, bias), jitted."""
    def loss(x, k, bias):
        y = fn(x, k, bias)
        return jnp.vdot(y, cot), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(x, k, bias)
    return y, grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_lax_values_and_gradients(name):
    case = CASES[name]
    padding = case[-1]
    x, k, bias, kg = _inputs(case)
    out_shape = jax.eval_shape(lambda: _reference(x, k, bias, padding)).shape
    cot = _normal(kg, *out_shape)

    y, grads = _value_and_grads(lambda *a: conv2d(*a, padding=padding), x, k, bias, cot)
    y_ref, grads_ref = _value_and_grads(
        lambda *a: _reference(*a, padding), x, k, bias, cot
    )
    assert y.shape == out_shape
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        _close(g, g_ref)


@pytest.mark.parametrize(
    "case, chunk_bytes",
    [
        ((7, 12, 12, 20, 50, 5, 5, "VALID"), 300_000),  # 7 is prime: padded chunks
        ((6, 28, 28, 1, 20, 5, 5, "VALID"), 150_000),  # thin path, 3 chunks of 2
        ((5, 9, 8, 12, 4, 3, 3, "SAME"), 20_000),
    ],
)
def test_batch_chunking_matches(monkeypatch, case, chunk_bytes):
    # The chunk size is read at trace time: trace through a fresh jit (no cached
    # executable from other tests), restored afterwards with the chunk size.
    fresh = jax.jit(conv_mod._conv_cpu.__wrapped__, static_argnums=2)
    monkeypatch.setattr(conv_mod, "_conv_cpu", fresh)
    monkeypatch.setattr(conv_mod, "_CHUNK_BYTES", chunk_bytes)
    padding = case[-1]
    x, k, bias, kg = _inputs(case, seed=1)
    assert "scan" in str(jax.make_jaxpr(lambda x, k: conv2d(x, k, padding=padding))(x, k))
    out_shape = jax.eval_shape(lambda: _reference(x, k, bias, padding)).shape
    cot = _normal(kg, *out_shape)
    y, grads = _value_and_grads(lambda *a: conv2d(*a, padding=padding), x, k, bias, cot)
    y_ref, grads_ref = _value_and_grads(
        lambda *a: _reference(*a, padding), x, k, bias, cot
    )
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        _close(g, g_ref)


@pytest.mark.parametrize("chunk_bytes", [conv_mod._CHUNK_BYTES, 60_000], ids=["one", "chunks"])
def test_shard_map_with_a_replicated_kernel(mesh, monkeypatch, chunk_bytes):
    """Batch split over 8 devices, kernel and bias replicated (P()): the gradients are the
    sums over the devices, as lax's convolution gives them, with one chunk and with several
    (the scan's carry then varies along the mesh axis like the data)."""
    fresh = jax.jit(conv_mod._conv_cpu.__wrapped__, static_argnums=2)
    monkeypatch.setattr(conv_mod, "_conv_cpu", fresh)
    monkeypatch.setattr(conv_mod, "_CHUNK_BYTES", chunk_bytes)
    case = (16, 12, 12, 20, 50, 5, 5, "VALID")
    x, k, bias, kg = _inputs(case, seed=3)
    cot = _normal(kg, 16, 8, 8, 50)

    def sharded(fn):
        return jax.shard_map(fn, mesh=mesh, in_specs=(P("d"), P(), P()), out_specs=P("d"))

    y, grads = _value_and_grads(sharded(conv2d), x, k, bias, cot)
    y_ref, grads_ref = _value_and_grads(
        sharded(lambda *a: _reference(*a, "VALID")), x, k, bias, cot)
    if chunk_bytes < conv_mod._CHUNK_BYTES:
        jaxpr = jax.make_jaxpr(jax.grad(lambda k: sharded(conv2d)(x, k, bias).sum()))(k)
        assert "scan" in str(jaxpr)
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        _close(g, g_ref)


def test_lenet_conv2_batch128_default_chunks():
    """The default chunking at a real training batch (several chunks)."""
    case = (128, 12, 12, 20, 50, 5, 5, "VALID")
    assert conv_mod._chunks_for(jnp.zeros(case[:4]), jnp.zeros((5, 5, 20, 50))) > 1
    x, k, bias, kg = _inputs(case, seed=2)
    cot = _normal(kg, 128, 8, 8, 50)
    y, grads = _value_and_grads(conv2d, x, k, bias, cot)
    y_ref, grads_ref = _value_and_grads(lambda *a: _reference(*a, "VALID"), x, k, bias, cot)
    _close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        _close(g, g_ref)


def test_kernel_only_gradient_first_layer():
    """Data input (no x gradient), as in a network's first layer."""
    x, k, bias, _ = _inputs(CASES["lenet_conv1"])
    dk = jax.jit(jax.grad(lambda k: jnp.sum(conv2d(x, k) ** 2)))(k)
    dk_ref = jax.grad(lambda k: jnp.sum(_reference(x, k, 0.0, "VALID") ** 2))(k)
    _close(dk, dk_ref)


def test_vmap_over_examples_and_kernels():
    x, k, bias, kg = _inputs((4, 10, 10, 6, 8, 3, 3, "SAME"))
    xs = x.reshape(2, 2, 10, 10, 6)  # vmap over groups of examples
    ks = jnp.stack([k, 2.0 * k])  # and one kernel per group
    cot = _normal(kg, 2, 2, 10, 10, 8)

    def run(fn):
        def loss(xs, ks):
            y = jax.vmap(lambda x, k: fn(x, k, bias))(xs, ks)
            return jnp.vdot(y, cot), y

        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(xs, ks)

    (_, y), (dx, dk) = run(lambda x, k, b: conv2d(x, k, b, padding="SAME"))
    (_, y_ref), (dx_ref, dk_ref) = run(lambda x, k, b: _reference(x, k, b, "SAME"))
    _close(y, y_ref)
    _close(dx, dx_ref)
    _close(dk, dk_ref)


def test_second_order_reverse_mode():
    x, k, _, _ = _inputs((2, 8, 8, 3, 4, 3, 3, "VALID"))

    def gnorm(fn):
        inner = jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2))
        return jax.jit(jax.grad(lambda k: jnp.sum(inner(x, k) ** 2)))(k)

    _close(gnorm(conv2d), gnorm(lambda x, k: _reference(x, k, 0.0, "VALID")))


def test_module_loads_flax_params_and_matches():
    rng = np.random.default_rng(3)
    x = _normal(rng, 4, 12, 12, 20)
    key = jax.random.key(4)
    for padding in ("VALID",):  # SAME: test_module_batch_dims_like_flax
        ref = nn.Conv(features=50, kernel_size=(5, 5), padding=padding)
        ours = Conv(features=50, kernel_size=(5, 5), padding=padding)
        params = ref.init(key, x)
        # Same names, shapes and default initialisers: identical trees from one key.
        ours_params = ours.init(key, x)
        assert jax.tree.structure(ours_params) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)
        params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
        cot = _normal(rng, *jax.eval_shape(ref.apply, params, x).shape)

        def run(module, params, cot):
            def loss(p):
                y = module.apply(p, x)
                return jnp.vdot(y, cot), y

            return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

        (_, y), g = run(ours, params, cot)
        (_, y_ref), g_ref = run(ref, params, cot)
        _close(y, y_ref)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
            _close(a, b)


def test_module_batch_dims_like_flax():
    ref = nn.Conv(features=3, kernel_size=(3, 3), padding="SAME")
    ours = Conv(features=3, kernel_size=(3, 3))  # flax's default padding is SAME
    x = _normal(np.random.default_rng(6), 2, 3, 6, 6, 2)
    params = ref.init(jax.random.key(7), x)
    for inp in (x, x[0, 0]):  # two batch dims, and none
        _close(jax.jit(ours.apply)(params, inp), jax.jit(ref.apply)(params, inp))


def test_module_no_bias_explicit_padding():
    x = _normal(np.random.default_rng(8), 2, 6, 5, 3)
    kwargs = dict(features=4, kernel_size=(3, 2), padding=((1, 0), 2), use_bias=False)
    ours, ref = Conv(**kwargs), nn.Conv(**kwargs)
    params = ref.init(jax.random.key(0), x)
    assert set(params["params"]) == {"kernel"}
    _close(jax.jit(ours.apply)(params, x), jax.jit(ref.apply)(params, x))


def test_non_cpu_backend_is_plain_lax(monkeypatch):
    x, k, bias, _ = _inputs(CASES["same_3x3"])
    cpu_jaxpr = str(jax.make_jaxpr(lambda x, k: conv2d(x, k, padding="SAME"))(x, k))
    assert "custom_vjp" in cpu_jaxpr
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv2d(x, k, padding="SAME"))(x, k))
    assert "conv_general_dilated" in jaxpr and "custom_vjp" not in jaxpr
    _close(conv2d(x, k, bias, padding="SAME"), _reference(x, k, bias, "SAME"))


def test_padding_forms():
    assert conv_mod._pairs("valid", (5, 5)) == ((0, 0), (0, 0))
    assert conv_mod._pairs("SAME", (5, 4)) == ((2, 2), (1, 2))  # lax: extra one at the end
    assert conv_mod._pairs(1, (3, 3)) == ((1, 1), (1, 1))
    assert conv_mod._pairs([2, (0, 3)], (3, 3)) == ((2, 2), (0, 3))


def test_errors():
    x, k = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, k, padding="CIRCULAR")
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, jnp.ones((3, 3, 2, 4)))
    with pytest.raises(ValueError, match="larger"):
        conv2d(jnp.ones((1, 2, 2, 3)), k)
    with pytest.raises(ValueError, match="kernel_size"):
        Conv(features=4, kernel_size=3).init(jax.random.key(0), x)


def test_docstring_examples():
    result = doctest.testmod(
        conv_mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0
