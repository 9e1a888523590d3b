"""Tests of train/model.py: the seed's LeNet, its options, and a reference forward pass."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze
from jax import lax
from jax.sharding import PartitionSpec as P

from train.model import ACTIVATIONS, BN_POSITIONS, NORMS, LeNet, max_pool_2x2

B = 8

EXPECTED_PARAMS = {
    "conv1": {"kernel": (5, 5, 1, 20), "bias": (20,)},
    "bn1": {"scale": (20,), "bias": (20,)},
    "conv2": {"kernel": (5, 5, 20, 50), "bias": (50,)},
    "bn2": {"scale": (50,), "bias": (50,)},
    "fc1": {"kernel": (800, 500), "bias": (500,)},
    "fc2": {"kernel": (500, 10), "bias": (10,)},
}
EXPECTED_STATS = {"bn1": {"mean": (20,), "var": (20,)}, "bn2": {"mean": (50,), "var": (50,)}}


def _images(batch=B, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, 28, 28, 1))


def _init(model, x=None):
    x = _images() if x is None else x
    return model.init(jax.random.key(1), x, train=False)


def _shapes(tree):
    return jax.tree.map(jnp.shape, jax.tree_util.tree_map(jnp.asarray, dict(tree)))


def _randomize(variables, seed=2):
    """Non-trivial BN parameters and running statistics (init gives 1, 0, 0, 1)."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        x + 0.3 * jax.random.uniform(k, x.shape) if x.ndim == 1 else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


# ------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("norm", ["jaxbn", "flax"])
def test_param_names_and_shapes(norm):
    variables = _init(LeNet(norm=norm))
    assert set(variables) == {"params", "batch_stats"}
    assert _shapes(variables["params"]) == EXPECTED_PARAMS
    assert _shapes(variables["batch_stats"]) == EXPECTED_STATS
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_params == 20 * 26 + 40 + 50 * 501 + 100 + 800 * 500 + 500 + 500 * 10 + 10


def test_no_norm_has_no_bn_variables():
    variables = _init(LeNet(norm="none"))
    assert set(variables) == {"params"}
    expected = {k: v for k, v in EXPECTED_PARAMS.items() if not k.startswith("bn")}
    assert _shapes(variables["params"]) == expected


def test_layer_output_shapes():
    model = LeNet()
    variables = _init(model)
    _, state = model.apply(
        variables, _images(), train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    shapes = {k: v["__call__"][0].shape for k, v in state["intermediates"].items()
              if k != "__call__"}
    assert shapes == {
        "conv1": (B, 24, 24, 20),
        "bn1": (B, 12, 12, 20),
        "conv2": (B, 8, 8, 50),
        "bn2": (B, 4, 4, 50),
        "fc1": (B, 500),
        "fc2": (B, 10),
    }


def test_num_classes():
    model = LeNet(num_classes=3)
    variables = _init(model)
    assert variables["params"]["fc2"]["kernel"].shape == (500, 3)
    assert model.apply(variables, _images(), train=False).shape == (B, 3)


# ------------------------------------------------------------------------------------------
# The forward pass against an independent reference.


def _reference_bn(x, scale, bias, mean, var, eps=1e-5):
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _reference_forward(variables, x, *, norm, bn_position, activation, train):
    """The seed's LeNet written out with lax ops and the BN formula; float64-free but plain."""
    p = variables["params"]
    act = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}[activation]

    def conv(x, layer):
        y = lax.conv_general_dilated(
            x, p[layer]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )
        return y + p[layer]["bias"]

    def bn(x, layer):
        if norm == "none":
            return x
        if train:
            mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        else:
            mean = variables["batch_stats"][layer]["mean"]
            var = variables["batch_stats"][layer]["var"]
        return _reference_bn(x, p[layer]["scale"], p[layer]["bias"], mean, var)

    def stage(x, c, b):
        x = lax.reduce_window(conv(x, c), -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return act(bn(x, b)) if bn_position == "before_relu" else bn(act(x), b)

    x = stage(stage(x, "conv1", "bn1"), "conv2", "bn2").reshape(x.shape[0], -1)
    x = act(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]


GRID = list(itertools.product(NORMS, BN_POSITIONS, ACTIVATIONS))


@pytest.mark.parametrize(("norm", "bn_position", "activation"), GRID)
def test_forward_matches_reference(norm, bn_position, activation):
    model = LeNet(norm=norm, bn_position=bn_position, activation=activation)
    x = _images()
    variables = _randomize(_init(model, x))
    kwargs = dict(norm=norm, bn_position=bn_position, activation=activation)
    with jax.default_matmul_precision("highest"):
        for train in (False, True):
            got = model.apply(variables, x, train=train, mutable=["batch_stats"])[0]
            want = _reference_forward(variables, x, train=train, **kwargs)
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"{train=}")


@pytest.mark.parametrize("bn_position", BN_POSITIONS)
def test_running_statistics_follow_momentum(bn_position):
    """After one training step: new = momentum * old + (1 - momentum) * batch (biased)."""
    model = LeNet(bn_position=bn_position, momentum=0.8)
    x = _images()
    variables = _init(model, x)
    _, state = model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "conv1",
    )
    z = max_pool_2x2(state["intermediates"]["conv1"]["__call__"][0])
    if bn_position == "after_relu":
        z = jax.nn.relu(z)
    stats = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["mean"], 0.2 * z.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.8 + 0.2 * z.var((0, 1, 2)), rtol=1e-4)


def test_eval_does_not_update_statistics():
    model = LeNet()
    variables = _randomize(_init(model))
    _, state = model.apply(variables, _images(), train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, dict(state["batch_stats"]),
                 dict(variables["batch_stats"]))


@pytest.mark.parametrize("bn_position", BN_POSITIONS)
def test_jaxbn_matches_flax_batchnorm(bn_position):
    x = _images()
    ours, theirs = (LeNet(norm=n, bn_position=bn_position) for n in ("jaxbn", "flax"))
    variables = _randomize(_init(ours, x))
    for train in (True, False):
        a, sa = ours.apply(variables, x, train=train, mutable=["batch_stats"])
        b, sb = theirs.apply(variables, x, train=train, mutable=["batch_stats"])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6),
                     dict(sa), dict(sb))


# ------------------------------------------------------------------------------------------
# Options.


@pytest.mark.parametrize(
    "bn_kwargs",
    [{"unbiased_running_var": True}, freeze({"unbiased_running_var": True}),
     (("unbiased_running_var", True),)],
    ids=["dict", "frozendict", "pairs"],
)
def test_bn_kwargs_pass_through(bn_kwargs):
    x = _images()
    plain = LeNet()
    unbiased = LeNet(bn_kwargs=bn_kwargs)
    variables = _init(plain, x)
    _, s0 = plain.apply(variables, x, train=True, mutable=["batch_stats"])
    _, s1 = jax.jit(lambda v, x: unbiased.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    n = B * 12 * 12  # Elements per feature of bn1.
    batch_var0 = (s0["batch_stats"]["bn1"]["var"] - 0.9) / 0.1
    batch_var1 = (s1["batch_stats"]["bn1"]["var"] - 0.9) / 0.1
    np.testing.assert_allclose(batch_var1, batch_var0 * n / (n - 1), rtol=1e-3)


def test_bn_kwargs_reach_flax_batchnorm():
    x = _images()
    model = LeNet(norm="flax", bn_kwargs={"use_bias": False})
    assert "bias" not in _init(model, x)["params"]["bn1"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "batch"}, r"LeNet.norm: expected one of 'jaxbn', 'flax', 'none', got 'batch'"),
        ({"bn_position": "after"}, r"LeNet.bn_position: expected one of .*got 'after'"),
        ({"activation": "gelu"}, r"LeNet.activation: expected one of 'relu', .*got 'gelu'"),
        ({"conv": "cudnn"}, r"LeNet.conv: expected one of .*got 'cudnn'"),
        ({"bn_kwargs": 3}, r"LeNet.bn_kwargs: expected a mapping .*got 3"),
        ({"bn_kwargs": {"momentum": 0.5}}, r"\['momentum'\] are LeNet fields"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _init(LeNet(**kwargs))


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 28, 28, 1\), got "
                                         r"\(2, 32, 32, 1\)"):
        LeNet().init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)), train=False)


def test_fast_conv_matches_flax_conv():
    x = _images()
    variables = _randomize(_init(LeNet(conv="flax"), x))
    fast = LeNet(conv="fast")
    assert _shapes(_init(fast, x)["params"]) == EXPECTED_PARAMS
    a = LeNet(conv="flax").apply(variables, x, train=True, mutable=["batch_stats"])[0]
    b = fast.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Pooling and synchronized BN.


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (2, 7, 9, 3)])
def test_max_pool_matches_flax(shape):
    x = jax.random.normal(jax.random.key(0), shape)

    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), jax.jit(flax_pool)(x))
    # Without ties, the gradients agree too.
    grads = [jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2)))(x)
             for f in (max_pool_2x2, flax_pool)]
    np.testing.assert_allclose(*grads, rtol=1e-6)


@pytest.mark.parametrize("norm", ["jaxbn", "flax"])
def test_synced_bn_under_shard_map_equals_one_device(mesh, norm):
    """Eight devices with axis_name: the same logits and statistics as the whole batch."""
    x = _images(batch=16)
    single = LeNet(norm=norm)
    synced = LeNet(norm=norm, axis_name="d")
    variables = _init(single, x)
    want, want_state = single.apply(variables, x, train=True, mutable=["batch_stats"])

    def apply(v, x):
        return synced.apply(v, x, train=True, mutable=["batch_stats"])

    got, got_state = jax.jit(
        jax.shard_map(apply, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P()))
    )(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 dict(got_state), dict(want_state))


@pytest.mark.parametrize("norm", ["jaxbn", "flax"])
def test_forward_under_explicit_mesh_axes_equals_one_device(norm):
    """A batch sharded over jax.make_mesh's default (Explicit) axes under plain jit."""
    mesh = jax.make_mesh((8,), ("d",))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    x = _images(batch=16)
    model = LeNet(norm=norm)
    variables = _init(model, x)
    want, want_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("d")))
        got, got_state = jax.jit(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 dict(got_state), dict(want_state))
