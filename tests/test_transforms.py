"""One test body under every JAX transformation, for every training-mode path (chex-style).

Each *subject* is a training-mode BatchNorm step ``(x, mask, params, stats) -> (y, stats)``:
the core (with and without a mask), Batch Renormalization, Ghost BN and the two Flax
modules. Each *transformation* runs a subject and returns named quantities — outputs,
running statistics, derivatives — which the one body compares with a float64 NumPy
reference (derivatives by central differences of the reference). So every row of the
matrix checks the same thing: that the transformation changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference as ref
from tests.conftest import NUM_DEVICES as D

SHAPE = (16, 2)  # two examples per device when split over the 8 devices
MOMENTUM = 0.9
EPS = 1e-5
R_MAX, D_MAX = 1.5, 0.5
VIRTUAL = 8

# ----------------------------------------------------------------------------------------
# Subjects: one training step, with the running statistics as plain arrays.


def _stats_tuple(s: jaxbn.BatchStats) -> tuple[jax.Array, jax.Array]:
    return s.mean, s.var


def _core(fn: Callable[..., Any], masked: bool) -> Callable[..., Any]:
    def step(x, mask, p, s, axis_name=None):
        y, new = fn(x, p, s, training=True, momentum=MOMENTUM, epsilon=EPS,
                    mask=mask if masked else None, axis_name=axis_name)
        return y, _stats_tuple(new)

    return step


def _linen(x, mask, p, s, axis_name=None):
    bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS,
                               axis_name=axis_name)
    variables = {"params": {"scale": p.scale, "bias": p.bias},
                 "batch_stats": {"mean": s.mean, "var": s.var}}
    y, upd = bn.apply(variables, x, mutable=["batch_stats"])
    return y, (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])


def _nnx(x, mask, p, s, axis_name=None):
    bn = jaxbn.nnx.BatchNorm(x.shape[-1], momentum=MOMENTUM, epsilon=EPS, axis_name=axis_name,
                             rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...], bn.mean[...], bn.var[...] = p.scale, p.bias, s.mean, s.var
    y = bn(x)
    return y, (bn.mean[...], bn.var[...])


SUBJECTS: dict[str, Callable[..., Any]] = {
    "core": _core(jaxbn.batch_norm, masked=False),
    "masked": _core(jaxbn.batch_norm, masked=True),
    "renorm": _core(functools.partial(jaxbn.batch_renorm, r_max=R_MAX, d_max=D_MAX), False),
    "ghost": _core(functools.partial(jaxbn.ghost_batch_norm, virtual_batch_size=VIRTUAL),
                   False),
    "linen": _linen,
    "nnx": _nnx,
}

# ----------------------------------------------------------------------------------------
# The float64 reference of each subject.


def _ref_step(subject: str, x, mask, scale, bias, mean0, var0, frozen=None):
    """Reference ``(y, mean, var, rd)``; ``frozen`` fixes renorm's r and d (no gradient)."""
    m = mask if subject == "masked" else None
    if subject == "ghost":
        parts = [_ref_step("core", x[k:k + VIRTUAL], None, scale, bias, mean0, var0)
                 for k in range(0, len(x), VIRTUAL)]
        stats = [ref.moments(x[k:k + VIRTUAL]) for k in range(0, len(x), VIRTUAL)]
        mean = np.mean([s[0] for s in stats], axis=0)
        var = np.mean([s[1] for s in stats], axis=0)
        return (np.concatenate([p[0] for p in parts]), ref.ema(mean0, mean, MOMENTUM),
                ref.ema(var0, var, MOMENTUM), None)
    bmean, bvar, _ = ref.moments(x, mask=m)
    if subject == "renorm":
        sb, sr = np.sqrt(bvar + EPS), np.sqrt(var0 + EPS)
        rd = frozen or (np.clip(sb / sr, 1 / R_MAX, R_MAX),
                        np.clip((bmean - mean0) / sr, -D_MAX, D_MAX))
        y = ((x - bmean) / sb * rd[0] + rd[1]) * scale + bias
        return y, ref.ema(mean0, bmean, MOMENTUM), ref.ema(var0, bvar, MOMENTUM), rd
    y = ref.forward(x, scale, bias, bmean, bvar, epsilon=EPS)
    return y, ref.ema(mean0, bmean, MOMENTUM), ref.ema(var0, bvar, MOMENTUM), None


def _jacobian(f: Callable[[np.ndarray], np.ndarray], z: np.ndarray, h: float) -> np.ndarray:
    cols = []
    for i in range(z.size):
        e = np.zeros_like(z)
        e[i] = h
        cols.append((f(z + e) - f(z - e)) / (2 * h))
    return np.stack(cols, axis=-1)


class _Want(dict):
    """Reference quantities; the Hessians are computed on first use."""

    def __init__(self, lazy: Callable[[], dict[str, np.ndarray]], **values: np.ndarray):
        super().__init__(values)
        self._lazy: Callable[[], dict[str, np.ndarray]] | None = lazy

    def __missing__(self, key: str) -> np.ndarray:
        if self._lazy is None:
            raise KeyError(key)
        lazy, self._lazy = self._lazy, None
        self.update(lazy())
        return self[key]


class Case(NamedTuple):
    x: np.ndarray
    x2: np.ndarray  # a second batch (scan's second step)
    mask: np.ndarray
    params: jaxbn.BatchNormParams
    stats: jaxbn.BatchStats
    g: np.ndarray  # output cotangent of the loss sum(y * g)
    t: np.ndarray  # input tangent (x, scale, bias, flattened)
    want: _Want


@functools.cache
def _case(subject: str) -> Case:
    r = np.random.default_rng(0)
    x = r.normal(1.0, 2.0, SHAPE)
    x2 = r.normal(-1.0, 0.5, SHAPE)
    mask = r.random(SHAPE) > 0.3
    scale, bias = r.uniform(0.5, 1.5, SHAPE[1]), r.normal(size=SHAPE[1])
    mean0, var0 = r.normal(size=SHAPE[1]) + 3.0, r.uniform(0.2, 0.5, SHAPE[1])
    g, t = r.normal(size=SHAPE), r.normal(size=x.size + 2 * SHAPE[1])
    y, mean, var, rd = _ref_step(subject, x, mask, scale, bias, mean0, var0)
    nx, c = x.size, SHAPE[1]

    def f(z, frozen=rd):  # y(x, scale, bias), renorm's r and d held fixed
        xs, s, b = z[:nx].reshape(SHAPE), z[nx:nx + c], z[nx + c:]
        return _ref_step(subject, xs, mask, s, b, mean0, var0, frozen)[0].ravel()

    z = np.concatenate([x.ravel(), scale, bias])
    jac = _jacobian(f, z, 1e-5)

    def grad_sin(xf):  # d/dx sum(sin(y)), for the Hessian
        zz = np.concatenate([xf, scale, bias])
        return _jacobian(f, zz, 1e-5)[:, :nx].T @ np.cos(f(zz))

    def hessians():  # the costly part (central differences of central differences): lazily
        hess = _jacobian(grad_sin, x.ravel(), 1e-4)
        return dict(hess=hess.reshape(SHAPE + SHAPE), hvp=(hess @ t[:nx]).reshape(SHAPE))

    y2, mean2, var2, _ = _ref_step(subject, x2, mask, scale, bias, mean, var)
    grad = jac.T @ g.ravel()
    want = _Want(hessians, y=y, mean=mean, var=var, dx=grad[:nx].reshape(SHAPE),
                 dscale=grad[nx:nx + c], dbias=grad[nx + c:], jvp=(jac @ t).reshape(SHAPE),
                 jac=jac[:, :nx].reshape(SHAPE + SHAPE), y2=y2, mean2=mean2, var2=var2)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Case(f32(x), f32(x2), mask, jaxbn.BatchNormParams(f32(scale), f32(bias)),
                jaxbn.BatchStats(f32(mean0), f32(var0), jnp.array(3, jnp.int32)), f32(g),
                f32(t), want)


# ----------------------------------------------------------------------------------------
# Transformations: each runs a subject on a case and returns named quantities.


def _values(step, c: Case, **kw) -> dict[str, Any]:
    y, (mean, var) = step(c.x, c.mask, c.params, c.stats, **kw)
    return dict(y=y, mean=mean, var=var)


def _loss(step, c: Case) -> Callable[..., jax.Array]:
    return lambda x, p: jnp.sum(step(x, c.mask, p, c.stats)[0] * c.g)


def _y_of(step, c: Case) -> Callable[..., jax.Array]:
    return lambda x, p: step(x, c.mask, p, c.stats)[0]


def _tangent(c: Case) -> tuple[jax.Array, jaxbn.BatchNormParams]:
    n, k = c.x.size, c.params.scale.size
    return c.t[:n].reshape(SHAPE), jaxbn.BatchNormParams(c.t[n:n + k], c.t[n + k:])


def _split(a):
    return a.reshape(D, a.shape[0] // D, *a.shape[1:])


def _mapped(mapper):
    def run(step, c: Case):
        f = mapper(functools.partial(step, axis_name="d"), axis_name="d",
                   in_axes=(0, 0, None, None))
        y, (mean, var) = f(_split(c.x), _split(c.mask), c.params, c.stats)
        return dict(y=y.reshape(SHAPE), mean=mean[0], var=var[0])

    return run


def _shard_map(step, c: Case):
    mesh = jax.make_mesh((D,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.jit(jax.shard_map(functools.partial(step, axis_name="d"), mesh=mesh,
                              in_specs=(P("d"), P("d"), P(), P()), out_specs=(P("d"), P())))
    y, (mean, var) = f(c.x, c.mask, c.params, c.stats)
    return dict(y=y, mean=mean, var=var)


def _sharded_jit(axis_type):
    def run(step, c: Case):
        mesh = jax.make_mesh((D,), ("d",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            sh = NamedSharding(mesh, P("d"))
            return _values(jax.jit(step), c._replace(x=jax.device_put(c.x, sh),
                                                     mask=jax.device_put(c.mask, sh)))

    return run


def _checkpoint(step, c: Case):
    out = _values(jax.jit(jax.checkpoint(step)), c)
    dx, dp = jax.jit(jax.grad(jax.checkpoint(_loss(step, c)), argnums=(0, 1)))(c.x, c.params)
    return dict(out, dx=dx, dscale=dp.scale, dbias=dp.bias)


def _scan(step, c: Case):
    def body(s, x):
        y, (mean, var) = step(x, c.mask, c.params, s)
        return s._replace(mean=mean, var=var), y

    s, ys = jax.jit(lambda xs: jax.lax.scan(body, c.stats, xs))(jnp.stack([c.x, c.x2]))
    return dict(y=ys[0], y2=ys[1], mean2=s.mean, var2=s.var)


def _export(step, c: Case):
    def flat(x, mask, scale, bias, mean, var):
        y, (m, v) = step(x, mask, jaxbn.BatchNormParams(scale, bias),
                         jaxbn.BatchStats(mean, var, jnp.array(3, jnp.int32)))
        return y, m, v

    args = (c.x, c.mask, c.params.scale, c.params.bias, c.stats.mean, c.stats.var)
    blob = jax.export.export(jax.jit(flat))(*args).serialize(vjp_order=1)
    call = jax.export.deserialize(blob).call
    y, mean, var = call(*args)
    dx, dscale, dbias = jax.grad(lambda x, s, b: jnp.sum(call(x, c.mask, s, b, *args[4:])[0]
                                                         * c.g), argnums=(0, 1, 2))(*args[:1],
                                                                                   *args[2:4])
    return dict(y=y, mean=mean, var=var, dx=dx, dscale=dscale, dbias=dbias)


def _grad(step, c: Case):
    dx, dp = jax.jit(jax.grad(_loss(step, c), argnums=(0, 1)))(c.x, c.params)
    return dict(dx=dx, dscale=dp.scale, dbias=dp.bias)


def _jvp(step, c: Case):
    return dict(jvp=jax.jit(lambda *a: jax.jvp(_y_of(step, c), a, _tangent(c))[1])(
        c.x, c.params))


def _linearize(step, c: Case):
    @jax.jit
    def run(x, p, tangent):
        y, lin = jax.linearize(_y_of(step, c), x, p)
        return y, lin(*tangent)

    y, jvp = run(c.x, c.params, _tangent(c))
    return dict(y=y, jvp=jvp)


def _jacfwd(step, c: Case):
    return dict(jac=jax.jit(jax.jacfwd(lambda x: _y_of(step, c)(x, c.params)))(c.x))


def _sin_loss(step, c: Case) -> Callable[[jax.Array], jax.Array]:
    return lambda x: jnp.sum(jnp.sin(_y_of(step, c)(x, c.params)))


def _hessian(step, c: Case):
    return dict(hess=jax.jit(jax.hessian(_sin_loss(step, c)))(c.x))


def _hvp(step, c: Case):
    hvp = jax.jit(lambda x, t: jax.jvp(jax.grad(_sin_loss(step, c)), (x,), (t,))[1])
    return dict(hvp=hvp(c.x, _tangent(c)[0]))


TRANSFORMS: dict[str, Callable[..., dict[str, Any]]] = {
    "jit": lambda step, c: _values(jax.jit(step), c),
    "vmap": _mapped(jax.vmap),
    "pmap": _mapped(jax.pmap),
    "shard_map": _shard_map,
    "jit-sharded-auto": _sharded_jit(jax.sharding.AxisType.Auto),
    "jit-sharded-explicit": _sharded_jit(jax.sharding.AxisType.Explicit),
    "checkpoint": _checkpoint,
    "scan": _scan,
    "export": _export,
    "grad": _grad,
    "jvp": _jvp,
    "linearize": _linearize,
    "jacfwd": _jacfwd,
    "hessian": _hessian,
    "hvp": _hvp,
}

# Under a named axis Ghost BN merges the k-th virtual batch of every device (documented),
# which is not the one-device computation this matrix compares with: those pairs are not in
# the matrix (tests/test_variants.py checks that merge against its own reference).
_NAMED = {"vmap", "pmap", "shard_map"}
CASES = [(t, s) for s in SUBJECTS for t in TRANSFORMS if not (s == "ghost" and t in _NAMED)]

# Relative to the reference's largest magnitude: float32 against float64; derivatives go
# through sums of O(100) terms, the Hessian also through central differences.
TOLERANCE = {"hess": 2e-4, "hvp": 2e-4, "jac": 5e-5, "jvp": 5e-5, "dx": 5e-5, "dscale": 5e-5,
             "dbias": 5e-5}


@pytest.mark.parametrize(("transform", "subject"), CASES)
def test_batch_norm_under_transformation(transform, subject):
    """The transformation changes nothing: values and derivatives equal the reference."""
    c = _case(subject)
    got = TRANSFORMS[transform](SUBJECTS[subject], c)
    assert got
    for name, value in got.items():
        want = c.want[name]
        atol = TOLERANCE.get(name, 1e-5) * max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(np.asarray(value, np.float64), want, rtol=1e-5, atol=atol,
                                   err_msg=f"{transform} / {subject}: {name}")


def test_flax_linen_batchnorm_is_the_reference_of_the_module_subjects():
    """Sanity of the matrix's module subjects: flax's own module gives the same numbers."""
    c = _case("linen")
    bn = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS,
                      use_fast_variance=False)
    variables = {"params": {"scale": c.params.scale, "bias": c.params.bias},
                 "batch_stats": {"mean": c.stats.mean, "var": c.stats.var}}
    y, _ = bn.apply(variables, c.x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, c.want["y"], rtol=1e-5, atol=1e-5)
