"""jaxbn.equinox.BatchNorm against equinox.nn.BatchNorm: state layout, parity, transformations.

Equinox computes the batch statistics with a two-pass variance (``mean`` first, then the
mean of squared deviations), as jaxbn does, so on these well-scaled inputs the two layers
agree to float32 rounding: the tolerances below allow a few float32 ulps (1.2e-7 each) of
O(1) values per reduction over a few dozen elements.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn.equinox
from tests import reference as ref
from tests.conftest import NUM_DEVICES as D

MODES = ("batch", "ema")
TOL = dict(rtol=2e-6, atol=2e-6)  # see the module docstring
MOMENTUM = 0.9


def _make(cls, mode, channels=3, **kw):
    return eqx.nn.make_with_state(cls)(channels, "batch", mode=mode, momentum=MOMENTUM, **kw)


def _train(bn, axis_name="batch"):
    return jax.vmap(bn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def _data(seed, shape=(8, 3, 4, 5)):
    rng = np.random.default_rng(seed)
    per_channel = (shape[1],) + (1,) * (len(shape) - 2)
    scale = rng.uniform(0.5, 2, size=per_channel)
    return jnp.asarray(rng.normal(size=shape) * scale + rng.normal(size=per_channel),
                       jnp.float32)


def _leaves(tree):
    return [a for a in jax.tree.leaves(tree) if eqx.is_array(a)]  # axis_name is a leaf too


def _close(a, b, **tol):
    for u, v in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(tol or TOL))


# ----------------------------------------------------------------------------------------
# The same module: fields, initial state, serialisation.


@pytest.mark.parametrize("mode", MODES)
def test_same_fields_state_and_files_as_equinox(mode, tmp_path):
    ours, ours_state = _make(jaxbn.equinox.BatchNorm, mode, dtype=jnp.float32)
    theirs, their_state = _make(eqx.nn.BatchNorm, mode, dtype=jnp.float32)
    assert isinstance(ours, eqx.nn.BatchNorm) and isinstance(ours, eqx.nn.StatefulLayer)
    for f in ("input_size", "axis_name", "eps", "channelwise_affine", "momentum", "mode",
              "inference"):
        assert getattr(ours, f) == getattr(theirs, f), f
    for a, b in zip(_leaves((ours, ours_state)), _leaves((theirs, their_state)), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_array_equal(a, b)
    # A file written by either class loads into the other, values included.
    _, trained = _train(theirs)(_data(0), their_state)
    eqx.tree_serialise_leaves(tmp_path / "eqx.eqx", (theirs, trained))
    _, loaded = eqx.tree_deserialise_leaves(tmp_path / "eqx.eqx", (ours, ours_state))
    _close(loaded, trained, rtol=0, atol=0)
    eqx.tree_serialise_leaves(tmp_path / "jaxbn.eqx", (ours, loaded))
    _, back = eqx.tree_deserialise_leaves(tmp_path / "jaxbn.eqx", (theirs, their_state))
    _close(back, trained, rtol=0, atol=0)


def test_unspecified_mode_warns_and_is_ema_as_in_equinox():
    with pytest.warns(UserWarning, match="defaults to 'ema'"):
        bn = jaxbn.equinox.BatchNorm(2, "batch")
    assert bn.mode == "ema"
    with pytest.raises(ValueError, match="Invalid mode"):
        jaxbn.equinox.BatchNorm(2, "batch", mode="other")


# ----------------------------------------------------------------------------------------
# Parity: outputs, new state and gradients over several steps, then inference.


def _loss(bn, x, state, g):
    y, state = _train(bn)(x, state)
    return jnp.sum(jnp.sin(y) * g), (y, state)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_training_steps_and_inference_match_equinox(mode, affine):
    models = {}
    for name, cls in (("ours", jaxbn.equinox.BatchNorm), ("theirs", eqx.nn.BatchNorm)):
        models[name] = _make(cls, mode, channelwise_affine=affine)
    g = jnp.asarray(np.random.default_rng(9).normal(size=(8, 3, 4, 5)), jnp.float32)

    @eqx.filter_jit
    def step(bn_x, state):
        return eqx.filter_grad(lambda p: _loss(p[0], p[1], state, g), has_aux=True)(bn_x)

    for i in range(3):
        x = _data(i)
        out = {}
        for name, (bn, state) in models.items():
            (gbn, gx), (y, state) = step((bn, x), state)
            out[name] = (y, _leaves(state), gx, gbn.weight, gbn.bias)
            models[name] = (bn, state)
        _close(out["ours"], out["theirs"])
    x = _data(7)
    evals = [_train(eqx.nn.inference_mode(bn))(x, s) for bn, s in models.values()]
    _close(evals[0], evals[1])


def test_matches_the_float64_reference_in_batch_mode_with_three_spatial_dims():
    x = _data(3, (6, 3, 2, 3, 4))
    bn, state = _make(jaxbn.equinox.BatchNorm, "batch")
    y, state = _train(bn)(x, state)
    want, (mean, var, _) = ref.train_forward(x, np.ones(3), np.zeros(3), axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    hidden_mean, hidden_var = state.get(bn.batch_state_index)
    np.testing.assert_allclose(hidden_mean, (1 - MOMENTUM) * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hidden_var, MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-6)
    assert int(state.get(bn.batch_counter)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_zero_training_steps_inference(mode):
    x = _data(4, (5, 3))
    outs = []
    for cls in (jaxbn.equinox.BatchNorm, eqx.nn.BatchNorm):
        bn, state = _make(cls, mode, inference=True)
        outs.append(_train(bn)(x, state))
    _close(outs[0], outs[1], rtol=1e-6, atol=0)  # x * rsqrt(v + eps) vs x / sqrt(v + eps)
    if mode == "batch":  # initial statistics 0 and 1, used as they are
        np.testing.assert_allclose(outs[0][0], x / np.sqrt(1 + 1e-5), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Where equinox users hit problems: nested vmaps, scan, map, strict promotion.


@pytest.mark.parametrize("mode", MODES)
def test_vmap_twice_with_a_tuple_of_axis_names_is_one_batch(mode):
    x = _data(5, (8, 3, 4))
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
        3, ("b1", "b2"), mode=mode, momentum=MOMENTUM)
    inner = jax.vmap(bn, axis_name="b2", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="b1", in_axes=(0, None), out_axes=(0, None))
    y, new = outer(x.reshape(2, 4, 3, 4), state)
    flat, flat_state = _make(jaxbn.equinox.BatchNorm, mode)
    want, want_state = _train(flat)(x, flat_state)
    theirs, their_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, ("b1", "b2"), mode=mode, momentum=MOMENTUM)
    their_y, their_new = jax.vmap(
        jax.vmap(theirs, axis_name="b2", in_axes=(0, None), out_axes=(0, None)),
        axis_name="b1", in_axes=(0, None), out_axes=(0, None))(x.reshape(2, 4, 3, 4),
                                                               their_state)
    _close((y.reshape(x.shape), new), (want, want_state))
    _close((y, new), (their_y, their_new))


@pytest.mark.parametrize("mode", MODES)
def test_inside_scan_and_map(mode):
    xs = jnp.stack([_data(s, (4, 3, 2)) for s in range(3)])
    pairs = [_make(c, mode) for c in (jaxbn.equinox.BatchNorm, eqx.nn.BatchNorm)]

    def scanned(bn, state):
        return jax.lax.scan(lambda s, x: _train(bn)(x, s)[::-1], state, xs)

    (state_ours, ys_ours), (state_theirs, ys_theirs) = (scanned(*p) for p in pairs)
    _close((ys_ours, state_ours), (ys_theirs, state_theirs))
    # A Python loop of steps gives the same as the scan.
    bn, state = pairs[0]
    for i, x in enumerate(xs):
        y, state = _train(bn)(x, state)
        _close(y, ys_ours[i])
    _close(state, state_ours)
    # lax.map: independent batches from the same state.
    mapped = [jax.lax.map(lambda x, p=p: _train(p[0])(x, p[1])[0], xs) for p in pairs]
    _close(mapped[0], mapped[1])


@pytest.mark.parametrize("mode", MODES)
def test_strict_dtype_and_rank_promotion(mode):
    x = _data(6, (4, 3, 5))
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        results = []
        for cls in (jaxbn.equinox.BatchNorm, eqx.nn.BatchNorm):
            bn, state = _make(cls, mode)
            gx, (y, state) = jax.grad(functools.partial(_loss, bn, state=state, g=1.0),
                                      has_aux=True)(x)
            y_eval, _ = _train(eqx.nn.inference_mode(bn))(x, state)
            results.append((y, state, gx, y_eval))
    _close(results[0], results[1])


# ----------------------------------------------------------------------------------------
# equinox's own transformations on a model, and PreciseBN.


class _Net(eqx.Module):
    layers: eqx.nn.Sequential

    def __init__(self, bn_cls, key, mode="batch"):
        k1, k2 = jax.random.split(key)
        self.layers = eqx.nn.Sequential([
            eqx.nn.Linear(4, 6, key=k1),
            bn_cls(6, "batch", mode=mode, momentum=MOMENTUM),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(6, 2, key=k2),
        ])

    def __call__(self, x, state):
        return self.layers(x, state)


def _model_step(model, state, x):
    def loss(model):
        y, new = eqx.filter_vmap(model, axis_name="batch", in_axes=(0, None),
                                 out_axes=(0, None))(x, state)
        return jnp.mean(y**2), new

    return eqx.filter_value_and_grad(loss, has_aux=True)(model)


def test_inference_mode_filter_jit_filter_vmap_filter_grad():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
    runs = []
    for cls in (jaxbn.equinox.BatchNorm, eqx.nn.BatchNorm):
        model, state = eqx.nn.make_with_state(_Net)(cls, jax.random.key(0))
        step = eqx.filter_jit(_model_step)
        for _ in range(2):
            (loss, state), grads = step(model, state, x)
            model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
        evaluate = eqx.filter_jit(eqx.filter_vmap(eqx.nn.inference_mode(model),
                                                  axis_name="batch", in_axes=(0, None),
                                                  out_axes=(0, None)))
        y_eval, state_eval = evaluate(x, state)
        _close(state_eval, state, rtol=0, atol=0)  # inference leaves the state alone
        runs.append((loss, eqx.filter(model, eqx.is_array), state, y_eval))
    _close(runs[0], runs[1], rtol=1e-5, atol=1e-6)  # two SGD steps amplify ulps slightly


@pytest.mark.parametrize("mode", MODES)
def test_precise_batch_stats_pools_every_layer_exactly(mode):
    import jaxbn.precise_equinox as pe

    model, state = eqx.nn.make_with_state(_Net)(jaxbn.equinox.BatchNorm, jax.random.key(1),
                                                mode)
    batches = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8, 4)) * 3 + 1, jnp.float32)

    def forward(model, state, x):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state)

    new = pe.precise_batch_stats(forward, model, state, batches)
    bn = model.layers[1]
    h = np.asarray(jax.vmap(model.layers[0])(batches.reshape(40, 4)), np.float64)
    index, flag = ((bn.batch_state_index, bn.batch_counter) if mode == "batch"
                   else (bn.ema_state_index, bn.ema_first_time_index))
    mean, var = new.get(index)
    np.testing.assert_allclose(mean, h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, h.var(0), rtol=1e-5, atol=1e-6)
    # "batch": counter 0, used as they are at inference; "ema": no longer the first step.
    assert not bool(new.get(flag))
    # equinox's own layer is recomputed too, with the same result.
    theirs, their_state = eqx.nn.make_with_state(_Net)(eqx.nn.BatchNorm, jax.random.key(1),
                                                       mode)
    _close(pe.precise_batch_stats(forward, theirs, their_state, batches), new)
    with pytest.raises(ValueError, match="no equinox.nn.BatchNorm"):
        pe.precise_batch_stats(forward, eqx.nn.Linear(4, 2, key=jax.random.key(0)),
                               state, batches)


# ----------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_fix():
    bn, state = _make(jaxbn.equinox.BatchNorm, "batch")
    with pytest.raises(NameError, match=r"axis_name 'batch' is not bound.*jax.vmap"):
        bn(jnp.zeros(3), state)
    with pytest.raises(NameError, match="not bound"):
        jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(jnp.zeros((2, 3)), state)
    with pytest.raises(ValueError, match=r"expects one example of shape \(3, \*spatial\)"):
        _train(bn)(jnp.zeros((2, 4)), state)


# ----------------------------------------------------------------------------------------
# The transformation matrix: one training step (or a primed EMA step) under each
# transformation equals equinox's layer called plainly.

SHAPE = (16, 2, 3)


def _matrix_case():
    x = _data(11, SHAPE)
    x2 = _data(12, SHAPE)
    g = jnp.asarray(np.random.default_rng(13).normal(size=SHAPE), jnp.float32)
    t = jnp.asarray(np.random.default_rng(14).normal(size=SHAPE), jnp.float32)
    return x, x2, g, t


def _step(bn, state, x, g, axis_name="batch"):
    """(y, state, d/dx <g, sin y>) of a training step of a per-example layer."""
    def loss(x):
        y, new = jax.vmap(bn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))(
            x, state)
        return jnp.sum(jnp.sin(y) * g), (y, new)

    gx, (y, new) = jax.grad(loss, has_aux=True)(x)
    return y, new, gx


def _primed(cls, mode, x2):
    bn, state = _make(cls, mode, channels=2)
    _, state = _train(bn)(x2, state)
    return bn, state


def _under(transform, bn, state, x, g, t, mesh):
    names = ("d", "batch")
    if transform == "jit":
        return eqx.filter_jit(_step)(bn, state, x, g)
    if transform == "jvp":
        def y_of(x):
            return _train(bn)(x, state)[0]
        _, dy = jax.jvp(y_of, (x,), (t,))
        y, new, gx = _step(bn, state, x, g)
        # The JVP is the transpose of the VJP: <g cos y, J t> = <J^T (g cos y), t>, so this
        # ratio is 1 and the gradient returned is unchanged exactly when the JVP is right.
        return y, new, jnp.sum(dy * g * jnp.cos(y)) / jnp.sum(gx * t) * gx
    if transform == "scan":
        _, out = jax.lax.scan(lambda c, xs: (c, _step(bn, state, *xs)), None,
                              (x[None], g[None]))
        return jax.tree.map(lambda a: a[0], out)
    synced = eqx.tree_at(lambda b: b.axis_name, bn, names)
    if transform == "pmap":
        out = jax.pmap(lambda x, g, s: _step(synced, s, x, g), axis_name="d",
                       in_axes=(0, 0, None))(x.reshape(D, -1, *x.shape[1:]),
                                             g.reshape(D, -1, *g.shape[1:]), state)
        return (out[0].reshape(x.shape), jax.tree.map(lambda a: a[0], out[1]),
                out[2].reshape(x.shape))
    assert transform == "shard_map"
    # check_vma=False: jax's varying-axes check rejects a psum over a vmap axis inside
    # shard_map (equinox's own layer fails there too).
    fn = jax.shard_map(lambda x, g, s: _step(synced, s, x, g), mesh=mesh,
                       in_specs=(P("d"), P("d"), P()), out_specs=(P("d"), P(), P("d")),
                       check_vma=False)
    return fn(x, g, state)


TRANSFORMS = ("jit", "jvp", "scan", "pmap", "shard_map")  # untransformed: the parity tests


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("mode", MODES)
def test_training_step_under_transformation(mode, transform, mesh):
    x, x2, g, t = _matrix_case()
    ours = _primed(jaxbn.equinox.BatchNorm, mode, x2)
    theirs = _primed(eqx.nn.BatchNorm, mode, x2)
    want = _step(*theirs, x, g)
    got = _under(transform, *ours, x, g, t, mesh)
    _close(got, want, rtol=1e-5, atol=2e-6)  # 16-element reductions, split per device

