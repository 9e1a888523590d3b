"""jaxbn.nnx.BatchNorm against flax.nnx.BatchNorm: structure, numerics, sync, extras."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import nnx as bn_nnx
from tests import tolerance

NUM_DEVICES = 8
# As in tests/test_linen.py: ~1e-7 normwise agreement (different summation order, variance
# algorithm and backward pass, and a summation order that changes with the CPU); the floor,
# ~8 ulps of the leaf's largest magnitude (at least of 1), covers elements far below the
# largest and gradients that are zero in exact arithmetic.
RTOL, ATOL = 1e-6, 1e-6

# Keywords we add to flax's set: the unbiased running variance and the BN variants.
EXTRAS = {"unbiased_running_var", "renorm", "renorm_r_max", "renorm_d_max", "virtual_batch_size"}


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        dt = np.complex64 if jnp.iscomplexobj(x) else np.float32
        x, y = np.asarray(x, dt), np.asarray(y, dt)
        floor = atol * max(1.0, float(np.max(np.abs(x), initial=0.0)))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=floor)


class CNN(nnx.Module):
    """Conv -> BN -> relu -> Conv -> BN -> relu -> mean-pool -> Linear."""

    def __init__(self, bn, fast: bool, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = bn(8, momentum=0.9, use_fast_variance=fast, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.bn2 = bn(8, momentum=0.9, use_fast_variance=fast, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def _data(step: int):
    kx, ky = jax.random.split(jax.random.key(100 + step))
    x = jax.random.normal(kx, (16, 8, 8, 3)) * 2.0 + 0.5
    return x, jax.random.randint(ky, (16,), 0, 10)


@nnx.jit
def _train_step(model, optimizer, x, labels):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    grads, logits = nnx.grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return logits, grads


def _leaves(state):
    """A plain pytree of arrays from an nnx State (Variable types dropped)."""
    return nnx.to_pure_dict(state)


@pytest.mark.parametrize("fast", [True, False])
def test_cnn_training_matches_flax(fast):
    ref = CNN(nnx.BatchNorm, fast, rngs=nnx.Rngs(0))
    ours = CNN(bn_nnx.BatchNorm, fast, rngs=nnx.Rngs(0))
    # The same state structure (Variable types included), shapes, dtypes and values:
    # checkpoints are interchangeable and rng draws happen in the same order.
    assert jax.tree.structure(nnx.state(ref)) == jax.tree.structure(nnx.state(ours))
    assert_trees_close(_leaves(nnx.state(ref)), _leaves(nnx.state(ours)), rtol=0, atol=0)

    # Two float32 runs of the same training, flax's and ours, judged against flax's run in
    # float64: ours may round a few times more than flax's (tests/tolerance.py), on any CPU.
    exact = CNN(nnx.BatchNorm, fast, rngs=nnx.Rngs(0))
    data = [_data(i) for i in range(3)]
    x_eval, _ = _data(3)
    runs = [_train_and_eval(ref, data, x_eval), _train_and_eval(ours, data, x_eval)]
    assert ours.bn1.use_running_average is True
    with jax.enable_x64(True):
        nnx.update(exact, tolerance.float64(nnx.state(exact)))
        runs.append(_train_and_eval(exact, tolerance.float64(data), tolerance.float64(x_eval)))
    for i, (want, got, ref64) in enumerate(zip(*runs, strict=True)):
        tolerance.assert_as_accurate_as_reference(got, want, ref64, what=f"step {i}")


def _train_and_eval(model, data, x_eval):
    """Per training step (logits, grads, the model's state after the update), then the
    eval-mode logits on ``x_eval``."""
    optimizer, out = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), []
    for x, labels in data:
        logits, grads = _train_step(model, optimizer, x, labels)
        out.append((logits, _leaves(grads), _leaves(nnx.state(model))))
    model.eval()
    return [*out, model(x_eval)]


def test_checkpoints_interchangeable():
    ref = CNN(nnx.BatchNorm, True, rngs=nnx.Rngs(0))
    x, _ = _data(0)
    ref(x)  # non-trivial running statistics
    ours = CNN(bn_nnx.BatchNorm, True, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(ref))
    ref.eval()
    ours.eval()
    np.testing.assert_array_equal(ref(x), ours(x))
    # ... and back: our state loads into flax's model.
    back = CNN(nnx.BatchNorm, True, rngs=nnx.Rngs(2))
    nnx.update(back, nnx.state(ours))
    back.eval()
    np.testing.assert_array_equal(back(x), ours(x))
    # nnx.view switches mode like flax's module.
    view = nnx.view(ours, use_running_average=False)
    assert view.bn1.use_running_average is False and ours.bn1.use_running_average is True


def test_every_flax_argument_is_accepted():
    sig_flax = inspect.signature(nnx.BatchNorm.__init__).parameters
    sig_ours = inspect.signature(bn_nnx.BatchNorm.__init__).parameters
    assert set(sig_ours) - set(sig_flax) == EXTRAS
    for name, p in sig_flax.items():
        q = sig_ours[name]
        assert q.kind == p.kind, name
        expected = False if name == "use_fast_variance" else p.default  # documented choice
        assert q.default == expected, name
    assert sig_ours["unbiased_running_var"].default is False
    call_flax = inspect.signature(nnx.BatchNorm.__call__).parameters
    call_ours = inspect.signature(bn_nnx.BatchNorm.__call__).parameters
    assert [(p.name, p.kind, p.default) for p in call_flax.values()] == [
        (p.name, p.kind, p.default) for p in call_ours.values()
    ]
    # Every argument can be passed by keyword, and the attributes are flax's.
    kwargs = {n: p.default for n, p in sig_flax.items() if n not in ("self", "num_features")}
    kwargs["rngs"] = nnx.Rngs(0)
    bn = bn_nnx.BatchNorm(3, **kwargs)
    ref = nnx.BatchNorm(3, **kwargs)
    assert set(vars(ref)) <= set(vars(bn))


_x = jax.random.normal(jax.random.key(1), (6, 4, 5)) * 3.0 + 1.0
_grid = [
    dict(),
    dict(use_scale=False),
    dict(use_bias=False),
    dict(use_scale=False, use_bias=False),
    dict(axis=1, num_features=4),
    dict(param_dtype=jnp.bfloat16),
    dict(dtype=jnp.float16),
    dict(input_dtype=jnp.bfloat16),
    dict(mask=True),
    dict(scale_init=nnx.initializers.normal(), bias_init=nnx.initializers.normal()),
    dict(scale_metadata={"tag": "gamma"}, bias_metadata={"tag": "beta"}),
]


@pytest.mark.parametrize("cfg", _grid, ids=[str(sorted(c)) for c in _grid])
def test_single_layer_matches_flax(cfg):
    cfg = dict(cfg)
    x = _x.astype(cfg.pop("input_dtype", jnp.float32))
    mask = (jnp.arange(6) % 3 != 0)[:, None, None] if cfg.pop("mask", False) else None
    n = cfg.pop("num_features", 5)
    kw = dict(momentum=0.8, use_fast_variance=True, **cfg)
    ref = nnx.BatchNorm(n, **kw, rngs=nnx.Rngs(0))
    ours = bn_nnx.BatchNorm(n, **kw, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(ref)) == jax.tree.structure(nnx.state(ours))
    assert_trees_close(_leaves(nnx.state(ref)), _leaves(nnx.state(ours)), rtol=0, atol=0)
    if "scale_metadata" in cfg:
        assert ours.scale.get_metadata() == ref.scale.get_metadata()

    half = x.dtype == jnp.bfloat16 or "dtype" in cfg or "param_dtype" in cfg
    # Half precision: a bf16/fp16 ulp. float32: the gradients are sums of O(1) terms
    # accumulated in a different order (the core has its own backward pass).
    tol = dict(rtol=1e-2, atol=1e-2) if half else dict(atol=2e-6)

    @nnx.jit
    def run(model):  # both modes in one compilation: train (updating stats), then eval
        def grads(train):
            def loss(model):
                y = model(x, use_running_average=not train, mask=mask)
                return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

            return nnx.grad(loss, has_aux=True)(model), nnx.state(model, nnx.BatchStat)

        return [grads(True), grads(False)]

    for ref_out, our_out in zip(run(ref), run(ours), strict=True):
        (g_ref, y_ref), s_ref = ref_out
        (g_ours, y_ours), s_ours = our_out
        assert y_ref.dtype == y_ours.dtype
        assert_trees_close(y_ref, y_ours, **tol)
        # Only parameters that exist get gradients; the constant stand-ins do not appear.
        assert_trees_close(_leaves(g_ref), _leaves(g_ours), **tol)
        assert_trees_close(_leaves(s_ref), _leaves(s_ours), **tol)


def _sync_data(masked: bool):
    x = jax.random.normal(jax.random.key(2), (NUM_DEVICES * 4, 5)) * 3.0 + 2.0
    # Uneven valid counts across devices: device i keeps i % 4 + 1 of its 4 rows.
    mask = (jnp.arange(x.shape[0]) % 4 < (jnp.arange(x.shape[0]) // 4) % 4 + 1)[:, None]
    return x, (mask if masked else None)


def _split_step(axis_name):
    """A pure training step over split state: what a data-parallel loop maps."""
    bn = bn_nnx.BatchNorm(5, momentum=0.9, axis_name=axis_name, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def step(params, stats, x, mask):
        model = nnx.merge(graphdef, params, stats, copy=True)  # leave the inputs untouched

        def loss(model):
            y = model(x, mask=mask)
            return jnp.sum(jnp.sin(y)), y

        grads, y = nnx.grad(loss, has_aux=True)(model)
        return y, nnx.state(model, nnx.BatchStat), grads

    return step, params, stats


def _unsynced(x, mask):
    step, params, stats = _split_step(None)
    return (params, stats), jax.jit(step)(params, stats, x, mask)


def test_axis_name_vmap():
    x, _ = _sync_data(False)
    (params, stats), (y_ref, s_ref, g_ref) = _unsynced(x, None)
    step, _, _ = _split_step("b")
    f = jax.jit(jax.vmap(step, in_axes=(None, None, 0, None), axis_name="b"))
    y, s, g = f(params, stats, x.reshape(NUM_DEVICES, -1, 5), None)
    assert_trees_close(y.reshape(x.shape), y_ref)
    for d in range(NUM_DEVICES):
        pick = lambda t, d=d: jax.tree.map(lambda a: a[d], _leaves(t))
        assert_trees_close(pick(s), _leaves(s_ref))
    # Per-example gradients of the replicated parameters sum to the whole batch's.
    assert_trees_close(jax.tree.map(lambda a: a.sum(0), _leaves(g)), _leaves(g_ref), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_axis_name_shard_map(mesh, masked):
    x, mask = _sync_data(masked)
    (params, stats), (y_ref, s_ref, g_ref) = _unsynced(x, mask)
    step, _, _ = _split_step("d")
    # Replicated inputs are device-invariant, so shard_map's autodiff sums their gradients.
    f = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P("d"), P("d")), out_specs=(P("d"), P(), P())
        )
    )
    y, s, g = f(params, stats, x, mask)
    keep = slice(None) if mask is None else np.asarray(mask[:, 0])
    assert_trees_close(y[keep], y_ref[keep])
    assert_trees_close(_leaves(s), _leaves(s_ref))
    assert_trees_close(_leaves(g), _leaves(g_ref), atol=1e-5)


@pytest.mark.parametrize("momentum", [None, 0.7])
@pytest.mark.parametrize("unbiased", [False, True])
def test_momentum_none_and_unbiased_var_match_core(momentum, unbiased):
    bn = bn_nnx.BatchNorm(3, momentum=momentum, unbiased_running_var=unbiased, rngs=nnx.Rngs(0))
    keys = set(nnx.state(bn).keys())
    assert keys == {"scale", "bias", "mean", "var"} | ({"count"} if momentum is None else set())
    params, stats = jaxbn.init(3)
    for i in range(4):
        x = jax.random.normal(jax.random.key(i), (5, 3)) * (i + 1) + i
        y = bn(x)
        y_core, stats = jaxbn.batch_norm(
            x, params, stats, training=True, momentum=momentum, unbiased_running_var=unbiased
        )
        np.testing.assert_array_equal(y, y_core)
        np.testing.assert_array_equal(bn.mean[...], stats.mean)
        np.testing.assert_array_equal(bn.var[...], stats.var)
        if momentum is None:
            np.testing.assert_array_equal(bn.count[...], stats.count)
    np.testing.assert_array_equal(
        bn(x, use_running_average=True), jaxbn.batch_norm(x, params, stats, training=False)[0]
    )


def test_momentum_none_without_count():
    bn = bn_nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bn.momentum = None  # e.g. switched after loading a flax checkpoint
    x = jnp.arange(6.0).reshape(2, 3)
    bn(x, use_running_average=True)  # inference needs no count
    with pytest.raises(ValueError, match=r"momentum=None .* in a `count` BatchStat .* got none"):
        bn(x)


def test_running_statistics_stay_float32_under_bfloat16():
    # flax rounds the running mean to bfloat16 before normalizing at inference; here it
    # enters the float32 arithmetic as is, and only the output is cast.
    x = jax.random.normal(jax.random.key(0), (64, 3)) * 0.1 + 30.0
    bn = bn_nnx.BatchNorm(3, momentum=0.1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    for _ in range(8):
        bn(x)
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32
    y = bn(x, use_running_average=True)
    assert y.dtype == jnp.bfloat16
    stats = jaxbn.BatchStats(bn.mean[...], bn.var[...], jnp.zeros((), jnp.int32))
    params = jaxbn.BatchNormParams(bn.scale[...], bn.bias[...])
    y_core, _ = jaxbn.batch_norm(
        x.astype(jnp.bfloat16), params, stats, training=False, dtype=jnp.bfloat16
    )
    np.testing.assert_array_equal(y, y_core)
    assert float(jnp.abs(y.astype(jnp.float32).mean(0)).max()) < 0.05


def test_use_running_average_required():
    bn = bn_nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        bn(jnp.ones((4, 3)))


# ----------------------------------------------------------------------------------------
# Where flax workflows used to break.


class _MLP(nnx.Module):
    def __init__(self, bn, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 4, rngs=rngs)
        self.bn = bn(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_one_value_per_feature_follows_flax():
    """A batch of one in training: output = bias, stats updated as flax; tabulate works."""
    x = jnp.array([[0.5, -1.0]])
    ref, ours = _MLP(nnx.BatchNorm, nnx.Rngs(0)), _MLP(bn_nnx.BatchNorm, nnx.Rngs(0))
    assert_trees_close(ours(x), ref(x))
    assert_trees_close(_leaves(nnx.state(ours)), _leaves(nnx.state(ref)))
    table = nnx.tabulate(_MLP(bn_nnx.BatchNorm, nnx.Rngs(0)), jnp.ones((1, 2)))
    assert "BatchNorm" in table
    # An ensemble vmapped over members, one example each.
    members = jnp.arange(6.0).reshape(3, 1, 2)

    def ensemble(bn):
        graphdef, state = nnx.split(_MLP(bn, nnx.Rngs(1)))

        def member(state, x):
            model = nnx.merge(graphdef, state)
            return model(x), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        return jax.vmap(member, in_axes=(None, 0))(state, members)

    assert_trees_close(ensemble(bn_nnx.BatchNorm), ensemble(nnx.BatchNorm))


def test_grad_with_hijax_variables():
    """nnx.var_defaults(hijax=True): the new running stats carry no gradient (as flax's)."""
    x = jax.random.normal(jax.random.key(0), (8, 2))
    results = []
    for bn in (nnx.BatchNorm, bn_nnx.BatchNorm):
        with nnx.var_defaults(hijax=True):
            model = _MLP(bn, nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def step(x, graphdef=graphdef, params=params, rest=rest):
            def loss(params):
                return jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(x)) * x[:, :1])

            return jax.grad(loss)(nnx.with_vars(params, hijax=False))

        results.append((nnx.to_pure_dict(step(x)), model.bn.mean[...]))
    assert_trees_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# flax.nnx's module stores its complex running mean into a float32 BatchStat (JAX warns).
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_complex_input_matches_flax():
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.complex64) + (1 + 2j)
    ref = nnx.BatchNorm(3, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = bn_nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    assert_trees_close(ours(x), ref(x), atol=1e-6)
    assert_trees_close((ours.mean[...], ours.var[...]), (ref.mean[...], ref.var[...]))
