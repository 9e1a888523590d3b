"""batch_norm_act: the fused chain equals the unfused one under every transformation.

Each *subject* is a training step ``(x, residual, mask, params, stats) -> (y, stats)`` of
``activation(batch_norm(x) + residual)``, computed by :func:`jaxbn.batch_norm_act`; each
*transformation* (the matrix of tests/test_transforms.py) returns named quantities, which
one body compares with a float64 NumPy reference: the BN part by tests/reference.py, its
derivatives by central differences (smooth), the activation's derivative in closed form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import fused
from tests import reference as ref
from tests.conftest import NUM_DEVICES as D
from tests.test_transforms import _jacobian

SHAPE = (16, 3)  # two examples per device when split over the 8 devices
MOMENTUM = 0.9
EPS = 1e-5
SLOPE = 0.1


class Subject(NamedTuple):
    activation: Any  # as batch_norm_act takes it
    f64: Callable[[np.ndarray], np.ndarray]  # the activation in float64
    df64: Callable[[np.ndarray], np.ndarray]  # its derivative
    residual: bool
    masked: bool


def _relu_d(z):
    return (z > 0).astype(np.float64)


SUBJECTS = {
    # keeps x and the output
    "relu": Subject("relu", lambda z: np.maximum(z, 0), _relu_d, True, False),
    "relu-masked": Subject("relu", lambda z: np.maximum(z, 0), _relu_d, False, True),
    # keeps the output and the residual (In-Place ABN)
    "leaky": Subject("leaky_relu", lambda z: np.where(z >= 0, z, SLOPE * z),
                     lambda z: np.where(z >= 0, 1.0, SLOPE), True, True),
    "identity": Subject("identity", lambda z: z, np.ones_like, True, False),
    # keeps x and the residual, recomputes z
    "tanh": Subject(jnp.tanh, np.tanh, lambda z: 1 - np.tanh(z) ** 2, True, False),
}


def _step(name: str) -> Callable[..., Any]:
    sub = SUBJECTS[name]

    def step(x, r, mask, p, s, axis_name=None):
        y, new = jaxbn.batch_norm_act(
            x, p, s, training=True, activation=sub.activation, negative_slope=SLOPE,
            residual=r if sub.residual else None, momentum=MOMENTUM, epsilon=EPS,
            mask=mask if sub.masked else None, axis_name=axis_name)
        return y, (new.mean, new.var)

    return step


class Case(NamedTuple):
    x: jax.Array
    x2: jax.Array  # scan's second batch
    r: jax.Array
    mask: np.ndarray
    params: jaxbn.BatchNormParams
    stats: jaxbn.BatchStats
    g: jax.Array  # output cotangent of the loss sum(y * g)
    t: jax.Array  # tangent of (x, r, scale, bias), flattened
    want: dict[str, np.ndarray]


def _ref(sub: Subject, x, r, mask, scale, bias, mean0, var0):
    m = mask if sub.masked else None
    bmean, bvar, _ = ref.moments(x, mask=m)
    z = ref.forward(x, scale, bias, bmean, bvar, epsilon=EPS) + (r if sub.residual else 0)
    return z, ref.ema(mean0, bmean, MOMENTUM), ref.ema(var0, bvar, MOMENTUM)


@functools.cache
def _case(name: str) -> Case:
    sub = SUBJECTS[name]
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, SHAPE)
    x2 = rng.normal(-1.0, 0.5, SHAPE)
    r = rng.normal(size=SHAPE)
    mask = rng.random(SHAPE) > 0.3
    # A negative scale too: the inversion divides by it.
    scale = rng.uniform(0.5, 1.5, SHAPE[1]) * np.array([1.0, -1.0, 1.0])
    bias = rng.normal(size=SHAPE[1])
    mean0, var0 = rng.normal(size=SHAPE[1]) + 3.0, rng.uniform(0.2, 0.5, SHAPE[1])
    g, t = rng.normal(size=SHAPE), rng.normal(size=2 * x.size + 2 * SHAPE[1])
    z, mean, var = _ref(sub, x, r, mask, scale, bias, mean0, var0)
    # Pre-activations near ReLU's kink would make the reference's derivative ambiguous.
    assert np.min(np.abs(z)) > 1e-3
    nx, c = x.size, SHAPE[1]

    def zf(v):  # the pre-activation z(x, r, scale, bias): smooth
        xs, rs = v[:nx].reshape(SHAPE), v[nx:2 * nx].reshape(SHAPE)
        s, b = v[2 * nx:2 * nx + c], v[2 * nx + c:]
        return _ref(sub, xs, rs, mask, s, b, mean0, var0)[0].ravel()

    v = np.concatenate([x.ravel(), r.ravel(), scale, bias])
    jac = sub.df64(z).ravel()[:, None] * _jacobian(zf, v, 1e-5)
    z2, mean2, var2 = _ref(sub, x2, r, mask, scale, bias, mean, var)
    grad = jac.T @ g.ravel()
    want = dict(y=sub.f64(z), mean=mean, var=var, dx=grad[:nx].reshape(SHAPE),
                dr=grad[nx:2 * nx].reshape(SHAPE), dscale=grad[2 * nx:2 * nx + c],
                dbias=grad[2 * nx + c:], jvp=(jac @ t).reshape(SHAPE),
                jac=jac[:, :nx].reshape(SHAPE + SHAPE), y2=sub.f64(z2), mean2=mean2,
                var2=var2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Case(f32(x), f32(x2), f32(r), mask,
                jaxbn.BatchNormParams(f32(scale), f32(bias)),
                jaxbn.BatchStats(f32(mean0), f32(var0), jnp.array(3, jnp.int32)), f32(g),
                f32(t), want)


# ----------------------------------------------------------------------------------------
# Transformations.


def _values(step, c: Case, **kw) -> dict[str, Any]:
    y, (mean, var) = step(c.x, c.r, c.mask, c.params, c.stats, **kw)
    return dict(y=y, mean=mean, var=var)


def _loss(step, c: Case):
    return lambda x, r, p: jnp.sum(step(x, r, c.mask, p, c.stats)[0] * c.g)


def _y_of(step, c: Case):
    return lambda x, r, p: step(x, r, c.mask, p, c.stats)[0]


def _tangent(c: Case):
    n, k = c.x.size, c.params.scale.size
    return (c.t[:n].reshape(SHAPE), c.t[n:2 * n].reshape(SHAPE),
            jaxbn.BatchNormParams(c.t[2 * n:2 * n + k], c.t[2 * n + k:]))


def _grads(loss, c: Case) -> dict[str, Any]:
    dx, dr, dp = loss(c.x, c.r, c.params)
    return dict(dx=dx, dr=dr, dscale=dp.scale, dbias=dp.bias)


def _split(a):
    return a.reshape(D, a.shape[0] // D, *a.shape[1:])


def _mapped(mapper):
    def run(step, c: Case):
        f = mapper(functools.partial(step, axis_name="d"), axis_name="d",
                   in_axes=(0, 0, 0, None, None))
        y, (mean, var) = f(_split(c.x), _split(c.r), _split(c.mask), c.params, c.stats)
        return dict(y=y.reshape(SHAPE), mean=mean[0], var=var[0])

    return run


def _shard_map(step, c: Case):
    mesh = jax.make_mesh((D,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def loss(x, r, p):  # gradients through the synced backward pass
        y, _ = jax.shard_map(functools.partial(step, axis_name="d"), mesh=mesh,
                             in_specs=(P("d"), P("d"), P("d"), P(), P()),
                             out_specs=(P("d"), P()))(x, r, c.mask, p, c.stats)
        return jnp.sum(y * c.g), y

    (_, y), (dx, dr, dp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        c.x, c.r, c.params)
    return dict(y=y, dx=dx, dr=dr, dscale=dp.scale, dbias=dp.bias)


def _sharded_jit(axis_type):
    def run(step, c: Case):
        mesh = jax.make_mesh((D,), ("d",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            sh = NamedSharding(mesh, P("d"))
            c = c._replace(x=jax.device_put(c.x, sh), r=jax.device_put(c.r, sh),
                           mask=jax.device_put(c.mask, sh))
            out = _values(jax.jit(step), c)
            grads = _grads(jax.jit(jax.grad(_loss(step, c), argnums=(0, 1, 2))), c)
        return {**out, **grads}

    return run


def _checkpoint(step, c: Case):
    out = _values(jax.jit(jax.checkpoint(step)), c)
    grads = _grads(jax.jit(jax.grad(jax.checkpoint(_loss(step, c)), argnums=(0, 1, 2))), c)
    return {**out, **grads}


def _scan(step, c: Case):
    def body(s, x):
        y, (mean, var) = step(x, c.r, c.mask, c.params, s)
        return s._replace(mean=mean, var=var), y

    s, ys = jax.jit(lambda xs: jax.lax.scan(body, c.stats, xs))(jnp.stack([c.x, c.x2]))
    return dict(y=ys[0], y2=ys[1], mean2=s.mean, var2=s.var)


def _grad(step, c: Case):
    return _grads(jax.jit(jax.grad(_loss(step, c), argnums=(0, 1, 2))), c)


def _jvp(step, c: Case):
    return dict(jvp=jax.jit(lambda *a: jax.jvp(_y_of(step, c), a, _tangent(c))[1])(
        c.x, c.r, c.params))


def _linearize(step, c: Case):
    @jax.jit
    def run(x, r, p, tangent):
        y, lin = jax.linearize(_y_of(step, c), x, r, p)
        return y, lin(*tangent)

    y, jvp = run(c.x, c.r, c.params, _tangent(c))
    return dict(y=y, jvp=jvp)


def _jacfwd(step, c: Case):
    return dict(jac=jax.jit(jax.jacfwd(lambda x: _y_of(step, c)(x, c.r, c.params)))(c.x))


TRANSFORMS: dict[str, Callable[..., dict[str, Any]]] = {
    "jit": lambda step, c: _values(jax.jit(step), c),
    "vmap": _mapped(jax.vmap),
    "shard_map": _shard_map,
    "jit-sharded-auto": _sharded_jit(jax.sharding.AxisType.Auto),
    "jit-sharded-explicit": _sharded_jit(jax.sharding.AxisType.Explicit),
    "checkpoint": _checkpoint,
    "scan": _scan,
    "grad": _grad,
    "jvp": _jvp,
    "linearize": _linearize,
    "jacfwd": _jacfwd,
}

# Relative to the reference's largest magnitude, as in tests/test_transforms.py: float32
# against float64, derivatives through sums of O(50) terms. The inversion of the output
# path adds a relative error of about float32's epsilon times (|z| + |bias| + |r|) / |scale|
# (< 1e-6 here) to xhat, well inside these.
TOLERANCE = {"jac": 5e-5, "jvp": 5e-5, "dx": 5e-5, "dr": 5e-5, "dscale": 5e-5, "dbias": 5e-5}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_fused_under_transformation(transform, subject):
    """Values, statistics and derivatives equal the unfused chain's float64 reference."""
    c = _case(subject)
    got = TRANSFORMS[transform](_step(subject), c)
    assert got
    for name, value in got.items():
        want = c.want[name]
        atol = TOLERANCE.get(name, 1e-5) * max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(np.asarray(value, np.float64), want, rtol=1e-5, atol=atol,
                                   err_msg=f"{transform} / {subject}: {name}")


# ----------------------------------------------------------------------------------------
# What the backward pass keeps, other dtypes, second order, edge cases and errors.


def _unfused(activation, slope=SLOPE):
    fns = {"relu": jax.nn.relu, "identity": lambda z: z,
           "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=slope)}

    def step(x, r, p, s, **kw):
        y, new = jaxbn.batch_norm(x, p, s, **kw)
        return fns.get(activation, activation)(y if r is None else y + r), new

    return step


def _fused_step(activation, slope=SLOPE):
    def step(x, r, p, s, **kw):
        return jaxbn.batch_norm_act(x, p, s, activation=activation, negative_slope=slope,
                                    residual=r, **kw)

    return step


def _full_size_residuals(step, x, r, p, s):
    """The full-size arrays the VJP closure keeps (its pytree leaves are the residuals)."""
    out, vjp = jax.vjp(lambda x, r, p: step(x, r, p, s, training=True)[0], x, r, p)
    return out, [a for a in jax.tree.leaves(vjp) if getattr(a, "shape", ()) == x.shape]


@pytest.mark.parametrize(("activation", "kept"), [
    ("leaky_relu", ("out", "r")), ("identity", ("out", "r")), ("relu", ("x", "out")),
])
def test_backward_keeps_output_not_intermediates(activation, kept):
    """The residuals of the fused rule are the named tensors; the unfused chain keeps more."""
    c = _case("relu")
    out, res = _full_size_residuals(_fused_step(activation), c.x, c.r, c.params, c.stats)
    named = {"x": c.x, "r": c.r, "out": out}
    assert len(res) == len(kept)
    for name in kept:
        assert any(np.array_equal(a, named[name]) for a in res), name
    if activation == "relu":  # op by op: x, and the activation's mask besides
        _, unfused = _full_size_residuals(_unfused(activation), c.x, c.r, c.params, c.stats)
        assert len(unfused) > len(res)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_bfloat16_wide_view_matches_unfused(activation):
    """bfloat16 with 20 channels-last features (the widened view) equals the unfused chain."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 4, 4, 20)), jnp.bfloat16)
    r = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    p, s = jaxbn.init(20)
    p = p._replace(scale=jnp.linspace(0.5, 1.5, 20), bias=jnp.linspace(-0.5, 0.5, 20))

    def run(step):
        def loss(x, r, p):
            return jnp.sum((step(x, r, p, s, training=True)[0] * g).astype(jnp.float32))

        y, new = jax.jit(step, static_argnames="training")(x, r, p, s, training=True)
        return y, new, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, r, p)

    (y1, s1, g1), (y2, s2, g2) = run(_fused_step(activation)), run(_unfused(activation))
    assert y1.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y2, np.float32))
    np.testing.assert_array_equal(s1.mean, s2.mean)
    np.testing.assert_array_equal(s1.var, s2.var)
    # Both round each gradient to bfloat16 (2^-8 relative); the fused one also recovers
    # xhat from the bfloat16 output, off by 2^-8 times (|z| + |bias| + |r|) / scale (about
    # 3 here) where the output is negative: four bfloat16 steps of the largest gradient.
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=4 * 2.0**-8 * np.max(np.abs(b)))


@pytest.mark.parametrize("activation", ["leaky_relu", jnp.tanh])
def test_second_order_matches_unfused(activation):
    """Hessian-vector products: the fused rule differentiates through its tangent."""
    c = _case("tanh")

    def hvp(step):
        def loss(x):
            return jnp.sum(jnp.sin(step(x, c.r, c.params, c.stats, training=True)[0]))

        return jax.jit(lambda x, t: jax.jvp(jax.grad(loss), (x,), (t,))[1])(c.x, c.g)

    want = hvp(_unfused(activation))
    np.testing.assert_allclose(hvp(_fused_step(activation)), want, rtol=1e-5,
                               atol=5e-5 * float(jnp.max(jnp.abs(want))))


def test_zero_scale_stays_finite():
    """A scale of 0 (floored in the inversion): x's and the bias' gradients stay exact."""
    c = _case("leaky")
    p = c.params._replace(scale=c.params.scale.at[0].set(0.0))

    def grads(step):
        def loss(x, r, p):
            return jnp.sum(step(x, r, p, c.stats, training=True)[0] * c.g)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(c.x, c.r, p)

    (dx, dr, dp), (ux, ur, up) = grads(_fused_step("leaky_relu")), grads(_unfused("leaky_relu"))
    np.testing.assert_allclose(dx, ux, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dr, ur, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dp.bias, up.bias, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(dp.scale))
    np.testing.assert_allclose(dp.scale[1:], up.scale[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_inference_and_no_running_stats_match_unfused(activation):
    c = _case("relu")
    for stats, training in ((c.stats, False), (None, False), (None, True)):
        y1, s1 = _fused_step(activation)(c.x, c.r, c.params, stats, training=training)
        y2, s2 = _unfused(activation)(c.x, c.r, c.params, stats, training=training)
        np.testing.assert_array_equal(y1, y2)
        assert s1 is s2 or (s1 is None and s2 is None)


def test_axis_index_groups_sync_within_groups():
    """Groups of four devices: each half of the batch is normalized by its own statistics."""
    c = _case("relu")
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def step(x, r):
        return jaxbn.batch_norm_act(x, c.params, c.stats, training=True, residual=r,
                                    axis_name="d", axis_index_groups=groups)[0]

    y = jax.pmap(step, axis_name="d")(_split(c.x), _split(c.r)).reshape(SHAPE)
    half = SHAPE[0] // 2
    for sl in (slice(0, half), slice(half, None)):
        want, _ = _unfused("relu")(c.x[sl], c.r[sl], c.params, c.stats, training=True)
        np.testing.assert_allclose(y[sl], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(activation="gelu"), "activation must be one of"),
    (dict(activation="leaky_relu", negative_slope="0.1"), "negative_slope must be a Python"),
    (dict(activation="leaky_relu", negative_slope=float("nan")), "must be finite"),
    (dict(residual=np.ones((3, 3), np.float32)), "residual must have the shape"),
    (dict(residual=np.ones((4, 3), np.int32)), "residual must be floating"),
])
def test_errors(kwargs, match):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=match):
        jaxbn.batch_norm_act(x, *jaxbn.init(3), training=True, **kwargs)


def test_error_complex_input():
    x = jnp.ones((4, 3), jnp.complex64)
    with pytest.raises(ValueError, match="real inputs only"):
        jaxbn.batch_norm_act(x, *jaxbn.init(3), training=True, activation="identity")


def test_activation_names_are_exported():
    assert fused.ACTIVATIONS == ("relu", "leaky_relu", "identity")
    assert "batch_norm_act" in jaxbn.__all__


def test_compiled_backward_keeps_less_memory():
    """In-Place ABN in a conv chain: the compiled gradient's temporaries shrink against
    leaky_relu(batch_norm(x) + r) (XLA's own measure)."""
    n, h, c, layers = 16, 8, 32, 4
    kernels = jax.random.normal(jax.random.key(0), (layers, 3, 3, c, c)) * 0.05
    p, s = jaxbn.init(c)

    def net(x, ks, p, fused):
        for i in range(layers):
            hid = jax.lax.conv_general_dilated(x, ks[i], (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
            r = x if i % 2 else None
            x = (_fused_step if fused else _unfused)("leaky_relu", 0.01)(
                hid, r, p, s, training=True)[0]
        return jnp.sum(x**2)

    x = jax.random.normal(jax.random.key(1), (n, h, h, c))
    temp = {f: jax.jit(jax.grad(functools.partial(net, fused=f), argnums=(0, 1, 2)))
            .lower(x, kernels, p).compile().memory_analysis().temp_size_in_bytes
            for f in (False, True)}
    # XLA's buffer assignment decides how much of the saving shows: about two activations
    # over the 4 layers with jaxlib 0.10.2, 1.3 with 0.10.1 (make test-min); at least one.
    assert temp[True] <= temp[False] - x.nbytes, temp
