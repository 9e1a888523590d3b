"""PreciseBN: population statistics pooled exactly over batches, for every API.

References are float64 numpy statistics of all the inputs a layer saw, concatenated: for a
first layer that is one big batch holding all N samples; for deeper layers, the inputs the
per-batch training-mode forward pass produced (captured separately here).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn import precise, precise_linen, precise_nnx
from tests import compile_cache, tolerance

# float32 statistics of a few thousand values against float64 ones (relative).
RTOL = 2e-6


def _ref(xs, *, ddof=0, mask=None):
    """float64 mean/var over every axis but the last, of arrays concatenated on axis 0."""
    x = np.concatenate([np.asarray(a, np.float64) for a in xs])
    x = x.reshape(-1, x.shape[-1])
    if mask is not None:
        keep = np.broadcast_to(np.concatenate(mask), x.shape[:-1] + (1,)).reshape(-1)
        x = x[keep]
    return x.mean(0), x.var(0, ddof=ddof)


def _check(stats, xs, *, ddof=0, mask=None):
    mean, var = _ref(xs, ddof=ddof, mask=mask)
    np.testing.assert_allclose(stats.mean, mean, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(stats.var, var, rtol=RTOL)


def _data(k=6, b=8, shape=(3, 3), c=4, seed=0):
    """k batches whose means differ from batch to batch (sorted by a drifting offset)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, b, *shape, c)) * rng.uniform(0.5, 3, c)
    x += np.linspace(-3, 3, k).reshape(k, *(1,) * (x.ndim - 1)) + rng.normal(size=c) * 5
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------
# The functional API.

W = jax.random.normal(jax.random.key(1), (4, 5))
P1 = jaxbn.BatchNormParams(jnp.linspace(0.5, 2, 4), jnp.linspace(-1, 1, 4))


def _hidden(x, m1):
    return jax.nn.relu(jaxbn.normalize(x, m1.mean, m1.var, P1)) @ W


@jax.jit
def _bn1_then_hidden(x):  # bn2's input in the training-mode forward pass
    return _hidden(x, jaxbn.moments(x))


def _moments_fn(x):
    m1 = jaxbn.moments(x)
    return {"bn1": m1, "bn2": jaxbn.moments(_hidden(x, m1)), "no_stats": None}


def _stats():
    return {"bn1": jaxbn.init(4)[1], "bn2": jaxbn.init(5)[1], "no_stats": None}


@pytest.mark.parametrize("unbiased", [False, True])
def test_functional_equals_one_big_batch(unbiased):
    data = _data()
    stats = precise.precise_batch_stats(_moments_fn, _stats(), list(data),
                                        unbiased_running_var=unbiased)
    ddof = int(unbiased)
    _check(stats["bn1"], data, ddof=ddof)  # the first layer: one batch of all 6 * 8 images
    hidden = [_bn1_then_hidden(x) for x in data]
    _check(stats["bn2"], hidden, ddof=ddof)
    assert int(stats["bn1"].count) == int(stats["bn2"].count) == len(data)
    assert stats["no_stats"] is None
    # Averaging per-batch variances (update_bn's approximation) misses the batch means'
    # spread; here that is far off.
    naive = np.mean([np.var(x.reshape(-1, 4), axis=0) for x in data], axis=0)
    assert np.all(np.asarray(stats["bn1"].var) > 1.2 * naive)


def test_masks_weight_each_batch_by_its_valid_count():
    data = _data(k=4, b=6, shape=(), c=3)
    rng = np.random.default_rng(1)
    masks = rng.uniform(size=(4, 6, 1)) < np.array([0.9, 0.2, 0.6, 1.0]).reshape(4, 1, 1)
    masks[1] = False
    masks[1, 0] = True  # batch 1: one valid row
    batches = [(x, m) for x, m in zip(data, masks, strict=True)]
    stats = precise.precise_batch_stats(lambda b: jaxbn.moments(b[0], mask=b[1]),
                                        jaxbn.init(3)[1], batches)
    _check(stats, data, mask=list(masks))
    # A feature with no valid element in any batch keeps its statistics.
    old = jaxbn.BatchStats(jnp.full(3, 7.0), jnp.full(3, 9.0), jnp.array(3))
    none = [(x, np.zeros_like(m)) for x, m in batches]
    same = precise.precise_batch_stats(lambda b: jaxbn.moments(b[0], mask=b[1]), old, none)
    for a, b in zip(same, old, strict=True):
        np.testing.assert_array_equal(a, b)


def test_compiled_once_and_stacked_input_agrees():
    traces = []

    def fn(x):
        traces.append(1)
        return _moments_fn(x)

    data = _data(k=5)
    first = precise.precise_batch_stats(fn, _stats(), iter(data))
    assert len(traces) == 1  # one trace for five batches
    precise.precise_batch_stats(fn, _stats(), list(data[:3]))
    assert len(traces) == 1  # the same function again: the compiled step is reused
    stacked = jax.jit(lambda s, b: precise.precise_batch_stats(fn, s, b))(_stats(), data)
    assert len(traces) == 2
    # The same sums compiled as two programs: rounding differs by a few ulps of the largest
    # value (the terms' size), whatever an element's own size (tests/tolerance.py).
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=tolerance.atol_for(b))


def test_pooled_sums_do_not_drift_with_many_batches():
    """|mean| >> std over 1000 batches: as accurate as one float32 batch of everything."""
    rng = np.random.default_rng(0)
    data = (1e3 + rng.normal(size=(1000, 32, 2))).astype(np.float32)
    stats = precise.precise_batch_stats(jaxbn.moments, jaxbn.init(2)[1], data)
    mean, var = _ref(data)
    # float32 cannot hold 1e3 closer than 6e-5; an uncompensated running mean drifts by
    # ~30 times that here.
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=2e-4)
    np.testing.assert_allclose(stats.var, var, rtol=1e-5)


def test_merge_of_process_results_equals_all_data(monkeypatch):
    """Per-process populations, merged as after the cross-process all-gather."""
    data = _data(k=7, shape=(), c=3)
    parts = [data[:1], data[1:5], data[5:]]  # unequal numbers of batches per "process"

    add = jax.jit(lambda pop, x: precise.accumulate(pop, jaxbn.moments(x)))

    def pooled(part):
        pop = precise.population(3)
        for x in part:
            pop = add(pop, x)
        return pop

    pops = [pooled(p) for p in parts]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *pops)
    stats = jax.jit(lambda p: precise.finalize(precise._merge_stacked(p), jaxbn.init(3)[1],
                                               unbiased_running_var=True))(stacked)
    _check(stats, data, ddof=1)
    assert int(stats.count) == 7

    # The multi-process path: each process's results are all-gathered (faked here: this
    # process is process 1 of 3) and merged; global results are left alone.
    from jax.experimental import multihost_utils

    def allgather(tree):
        assert jax.tree.structure(tree) == jax.tree.structure([pops[1]])
        return [jax.tree.map(lambda *a: np.stack(a), *(jax.device_get(p) for p in pops))]

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    synced = precise.precise_batch_stats(jaxbn.moments, jaxbn.init(3)[1], list(parts[1]),
                                         unbiased_running_var=True)
    _check(synced, data, ddof=1)
    alone = precise.precise_batch_stats(jaxbn.moments, jaxbn.init(3)[1], list(parts[1]),
                                        sync_processes=False)
    _check(alone, parts[1])


@pytest.mark.parametrize("synced", [False, True])
def test_split_over_devices_equals_one_device(mesh, synced):
    data = _data(k=3, b=16)
    one = precise.precise_batch_stats(_moments_fn, _stats(), list(data),
                                      unbiased_running_var=True)

    def per_device(x):  # this device's rows only, or synchronized over all of them
        m1 = jaxbn.moments(x, axis_name="d" if synced else None)
        return {"bn1": m1, "bn2": jaxbn.moments(_hidden(x, m1),
                                                axis_name="d" if synced else None),
                "no_stats": None}

    split = precise.precise_batch_stats(per_device, _stats(), list(data), axis_name="d",
                                        mesh=mesh, unbiased_running_var=True)
    # bn1 sees the raw batches: its statistics are the same however they are split.
    for a, b in zip(one["bn1"], split["bn1"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if synced:
        for a, b in zip(one["bn2"], split["bn2"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:  # bn2 sees bn1 normalized per device (2 rows each): those inputs, merged.
        hidden = [_bn1_then_hidden(r) for x in data for r in np.split(x, 8)]
        _check(split["bn2"], hidden, ddof=1)


def test_under_vmap_the_named_axis_is_merged():
    data = _data(k=3, b=8, shape=(), c=4)  # (batches, rows, features)
    one = precise.precise_batch_stats(jaxbn.moments, jaxbn.init(4)[1], data)
    split = data.reshape(3, 4, 2, 4)  # rows split over 4 mapped "devices"
    per = jax.vmap(lambda b: precise.precise_batch_stats(jaxbn.moments, jaxbn.init(4)[1], b,
                                                         axis_name="v"),
                   in_axes=1, axis_name="v")(split)
    for a, b in zip(one, per, strict=True):  # summed in another order: ulps of the scale
        np.testing.assert_allclose(np.broadcast_to(a, b.shape), b, rtol=1e-6,
                                   atol=tolerance.atol_for(b))


# ------------------------------------------------------------------------------------------
# Flax linen.


class LinenMLP(nn.Module):
    flax_bn: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        if self.flax_bn:
            bn1 = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)
            bn2 = nn.BatchNorm(use_running_average=not train, use_fast_variance=False,
                               axis_name=self.axis_name)
        else:
            bn1 = jaxbn.linen.BatchNorm(use_running_average=not train, unbiased_running_var=True,
                                        axis_name=self.axis_name)
            bn2 = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=None,
                                        axis_name=self.axis_name)
        x = nn.relu(bn1(nn.Dense(6)(x)))
        return bn2(nn.Dense(5)(x))


def _linen_inputs(model, variables, data):
    """Every BN's inputs, per path, from training-mode forward passes."""

    @jax.jit
    def inputs(x):
        seen: dict = {}

        def grab(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module,
                                                                 precise_linen.LAYERS):
                seen.setdefault("/".join(context.module.scope.path), []).append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            model.apply(variables, x, train=True, mutable=["batch_stats"])
        return seen

    out: dict = {}
    for x in data:
        for path, xs in inputs(x).items():
            out.setdefault(path, []).extend(xs)
    return out


@pytest.mark.parametrize("flax_bn", [False, True])
def test_linen_models(flax_bn):
    model = LinenMLP(flax_bn=flax_bn)
    data = _data(k=4, b=16, shape=(), c=3)
    variables = model.init(jax.random.key(0), data[0], train=False)
    calls = []

    def apply_fn(v, x, **kw):
        calls.append(1)
        return model.apply(v, x, train=True, **kw)

    new = precise_linen.precise_batch_stats(apply_fn, variables, list(data))
    assert len(calls) == 1
    assert jax.tree.structure(new) == jax.tree.structure(variables["batch_stats"])
    seen = _linen_inputs(model, variables, data)
    for name, ddof in (("BatchNorm_0", 0 if flax_bn else 1), ("BatchNorm_1", 0)):
        stats = jaxbn.BatchStats(new[name]["mean"], new[name]["var"], None)
        if flax_bn and name == "BatchNorm_0":
            # flax's default one-pass variance E[x^2] - E[x]^2, which precise_batch_stats
            # follows, loses ~mean^2/var ulps (up to ~40 here); checked more loosely.
            mean, var = _ref(seen[name])
            np.testing.assert_allclose(stats.mean, mean, rtol=RTOL, atol=1e-6)
            np.testing.assert_allclose(stats.var, var, rtol=3e-5)
        else:
            _check(stats, seen[name], ddof=ddof)
    if not flax_bn:
        assert int(new["BatchNorm_1"]["count"]) == len(data)
    # The new statistics evaluate the model.
    model.apply({**variables, "batch_stats": new}, data[0], train=False)

    with pytest.raises(ValueError, match="no BatchNorm layer .* ran in training mode"):
        precise_linen.precise_batch_stats(functools.partial(model.apply, train=False),
                                          variables, list(data))


@pytest.mark.parametrize(("flax_bn", "synced"), [(False, True), (True, False)])
def test_linen_split_over_devices_equals_one_device(mesh, flax_bn, synced):
    data = _data(k=2, b=16, shape=(), c=3)
    one_model = LinenMLP(flax_bn=flax_bn)
    variables = one_model.init(jax.random.key(0), data[0], train=False)
    one = precise_linen.precise_batch_stats(functools.partial(one_model.apply, train=True),
                                            variables, list(data))
    # Layers synchronized over the mesh axis, or per device and merged by the function.
    split_model = LinenMLP(flax_bn=flax_bn, axis_name="d" if synced else None)
    split = precise_linen.precise_batch_stats(
        functools.partial(split_model.apply, train=True), variables, list(data),
        axis_name="d", mesh=mesh)
    # Unsynchronized, only the first layer's inputs are those of one device (the second
    # sees the first normalized per device).
    for name in ("BatchNorm_0", "BatchNorm_1") if synced else ("BatchNorm_0",):
        for a, b in zip(jax.tree.leaves(one[name]), jax.tree.leaves(split[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Flax nnx.


class NnxMLP(nnx.Module):
    def __init__(self, flax_bn: bool, rngs: nnx.Rngs):
        self.l1, self.l2 = nnx.Linear(3, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs)
        if flax_bn:
            self.bn1 = nnx.BatchNorm(6, rngs=rngs)
            self.bn2 = nnx.BatchNorm(5, use_fast_variance=False, rngs=rngs)
        else:
            self.bn1 = jaxbn.nnx.BatchNorm(6, unbiased_running_var=True, rngs=rngs)
            self.bn2 = jaxbn.nnx.BatchNorm(5, momentum=None, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.l2(nnx.relu(self.bn1(self.l1(x)))))


@pytest.mark.parametrize("flax_bn", [False, True])
def test_nnx_models(flax_bn):
    model = NnxMLP(flax_bn, nnx.Rngs(0))
    model.eval()
    data = _data(k=4, b=16, shape=(), c=3)
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    ref = nnx.clone(model)
    h1, h2 = [], []
    for x in data:  # the inputs of both layers in training mode, eagerly
        h1.append(ref.l1(x))
        h2.append(ref.l2(nnx.relu(ref.bn1(h1[-1], use_running_average=False))))

    precise_nnx.precise_batch_stats(model, list(data))
    _check(model.bn1, h1, ddof=0 if flax_bn else 1)
    _check(model.bn2, h2)
    if not flax_bn:
        assert int(model.bn2.count[...]) == len(data)
    assert model.bn1.use_running_average is True  # the model's mode is left as it was
    assert jax.tree.all(jax.tree.map(np.array_equal, params,
                                     jax.tree.map(np.asarray, nnx.state(model, nnx.Param))))

    # A layer the forward pass freezes keeps its statistics; the next sees its output.
    old_bn1 = (np.asarray(model.bn1.mean[...]), np.asarray(model.bn1.var[...]))
    frozen = [model.l2(nnx.relu(model.bn1(model.l1(x), use_running_average=True)))
              for x in data]
    precise_nnx.precise_batch_stats(
        model, list(data),
        forward=lambda m, x: m.bn2(m.l2(nnx.relu(m.bn1(m.l1(x), use_running_average=True)))))
    np.testing.assert_array_equal(model.bn1.mean[...], old_bn1[0])
    np.testing.assert_array_equal(model.bn1.var[...], old_bn1[1])
    _check(model.bn2, frozen)


def test_nnx_split_over_devices_equals_one_device(mesh):
    data = _data(k=2, b=16, shape=(), c=3)
    one = NnxMLP(False, nnx.Rngs(0))
    split = nnx.clone(one)
    split.bn1.axis_name = split.bn2.axis_name = "d"  # synchronized over the mesh axis
    precise_nnx.precise_batch_stats(one, list(data))
    precise_nnx.precise_batch_stats(split, data, axis_name="d", mesh=mesh)  # stacked input
    for a, b in zip(jax.tree.leaves(nnx.state(one, nnx.BatchStat)),
                    jax.tree.leaves(nnx.state(split, nnx.BatchStat)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Errors.


def test_errors():
    stats = jaxbn.init(4)[1]
    data = _data(k=2, shape=(), c=4)
    with pytest.raises(ValueError, match="batches is empty: expected at least one batch"):
        precise.precise_batch_stats(jaxbn.moments, stats, [])
    with pytest.raises(ValueError, match="batches is empty"):
        precise.precise_batch_stats(jaxbn.moments, stats, np.zeros((0, 8, 4), np.float32))
    with pytest.raises(ValueError, match=r"batch 0 has float32\[8, 4\].*batch 1 has "
                                         r"float32\[5, 4\].*incomplete last batch"):
        precise.precise_batch_stats(jaxbn.moments, stats, [data[0], data[1][:5]])
    with pytest.raises(ValueError, match="leading axis of the same size"):
        precise.precise_batch_stats(lambda b: jaxbn.moments(b["x"]), stats,
                                    {"x": data, "y": np.zeros(3)})
    with pytest.raises(ValueError, match="pytree of BatchStats.*without BatchNorm"):
        precise.precise_batch_stats(jaxbn.moments, {"w": jnp.ones(3)}, list(data))
    with pytest.raises(ValueError, match="pytree of BatchStats"):
        precise.precise_batch_stats(jaxbn.moments, None, list(data))
    with pytest.raises(ValueError, match="shaped like stats"):
        precise.precise_batch_stats(jaxbn.moments, [stats, stats], list(data))
    with pytest.raises(ValueError, match=r"feature shape \(4,\) cannot be pooled.*\(3,\)"):
        precise.precise_batch_stats(jaxbn.moments, jaxbn.init(3)[1], list(data))
    with pytest.raises(ValueError, match="mesh was given without axis_name"):
        precise.precise_batch_stats(jaxbn.moments, stats, list(data), mesh=object())

    class NoBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    variables = NoBN().init(jax.random.key(0), data[0])
    with pytest.raises(ValueError, match="no batch_stats.*without BatchNorm"):
        precise_linen.precise_batch_stats(NoBN().apply, variables, list(data))
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        precise_nnx.precise_batch_stats(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), list(data))
    model = NnxMLP(True, nnx.Rngs(0))
    with pytest.raises(ValueError, match="batches is empty"):
        precise_nnx.precise_batch_stats(model, iter([]))
    with pytest.raises(ValueError, match="no BatchNorm layer ran with batch statistics"):
        precise_nnx.precise_batch_stats(
            model, list(data[:, :, :3]), forward=lambda m, x: m.bn1(
                m.l1(x), use_running_average=True))


# ------------------------------------------------------------------------------------------
# Two real processes (jax.distributed, gloo, a coordinator on 127.0.0.1).


def test_two_processes_equal_one(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tests import precise_worker as worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XLA_", "JAX_")) and "proxy" not in k.lower()}
    env.update(compile_cache.variables(), JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))
    procs = [subprocess.Popen([sys.executable, worker.__file__, f"127.0.0.1:{port}", str(i),
                               str(tmp_path / f"p{i}.npz")], env=env, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        try:
            log, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker hung")
        assert p.returncode == 0, log
    x = worker.data()
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        for key, xs, count in (("local", x, worker.BATCHES), ("mesh", x, worker.BATCHES),
                               ("mesh_synced", 2.0 * x, worker.BATCHES)):
            mean, var = _ref(xs, ddof=1)
            np.testing.assert_allclose(got[f"{key}/mean"], mean, rtol=RTOL, err_msg=key)
            np.testing.assert_allclose(got[f"{key}/var"], var, rtol=RTOL, err_msg=key)
            assert int(got[f"{key}/count"]) == count, key
