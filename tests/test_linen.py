"""jaxbn.linen.BatchNorm against flax.linen.BatchNorm: structure, numerics, sync, extras."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import linen as bn_linen
from tests import tolerance

NUM_DEVICES = 8
# float32 parity: rtol 1e-6 with an absolute floor of 1e-6 times the leaf's largest magnitude
# (at least 1e-6), about 8 float32 ulps of the leaf's scale. The two sides agree to ~1e-7
# normwise, not bit for bit: the core sums then divides where flax takes jnp.mean, its stable
# variance is a shifted two-pass (flax: plain two-pass), and it has its own backward pass; and
# the order in which XLA sums (so the rounding) changes with the CPU's vector width. An
# element's rounding error follows the size of the terms summed into it, not its own size, so
# the floor scales with the leaf's largest magnitude, and with 1 for leaves below that: BN's
# normalized outputs, O(1), enter every statistic and gradient, and gradients that are zero in
# exact arithmetic (a conv bias feeding BN) come back as rounding noise of ~1e-9. A floor of
# one ulp (1e-7) failed on other CPUs. The multi-step training test is judged against a
# float64 run instead (tests/tolerance.py).
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


class CNN(nn.Module):
    """Conv -> BN -> relu -> Conv -> BN -> relu -> mean-pool -> Dense."""

    bn: Any
    fast: bool

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(2):
            x = nn.Conv(8, (3, 3))(x)
            x = self.bn(use_running_average=not train, momentum=0.9, use_fast_variance=self.fast)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _data(step: int):
    kx, ky = jax.random.split(jax.random.key(100 + step))
    x = jax.random.normal(kx, (16, 8, 8, 3)) * 2.0 + 0.5
    return x, jax.random.randint(ky, (16,), 0, 10)


def _make_step(model: nn.Module, tx: optax.GradientTransformation):
    def loss_fn(params, batch_stats, x, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    @jax.jit
    def step(params, batch_stats, opt_state, x, labels):
        grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(
            params, batch_stats, x, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, logits, grads

    return step


@pytest.mark.parametrize("fast", [True, False])
def test_cnn_training_matches_flax(fast):
    ref, ours = CNN(nn.BatchNorm, fast), CNN(bn_linen.BatchNorm, fast)
    x0, _ = _data(0)
    v_ref = ref.init(jax.random.key(0), x0, train=True)
    v_ours = ours.init(jax.random.key(0), x0, train=True)
    # Same tree, shapes, dtypes and values: the same rng path reaches every initializer.
    assert_trees_close(v_ref, v_ours, rtol=0, atol=0)
    assert "count" not in v_ours["batch_stats"]["BatchNorm_0"]

    # Two float32 runs of the same training, flax's and ours, judged against flax's run in
    # float64: ours may round a few times more than flax's (tests/tolerance.py), on any CPU.
    tx = optax.sgd(0.1)
    data = [_data(i) for i in range(3)]
    x_eval, _ = _data(3)
    state = (v_ref["params"], v_ref["batch_stats"], tx.init(v_ref["params"]))
    runs = [_train_and_eval(m, tx, state, data, x_eval) for m in (ref, ours)]
    with jax.enable_x64(True):
        exact = _train_and_eval(ref, tx, tolerance.float64(state), tolerance.float64(data),
                                tolerance.float64(x_eval))
    for i, (want, got, ref64) in enumerate(zip(*runs, exact, strict=True)):
        tolerance.assert_as_accurate_as_reference(got, want, ref64, what=f"step {i}")


def _train_and_eval(model, tx, state, data, x_eval):
    """Per training step (logits, grads, batch_stats, params after the update), then the
    eval-mode logits on ``x_eval``."""
    step, out = _make_step(model, tx), []
    for x, labels in data:
        *state, logits, grads = step(*state, x, labels)
        out.append((logits, grads, state[1], state[0]))
    variables = {"params": state[0], "batch_stats": state[1]}
    return [*out, model.apply(variables, x_eval, train=False)]


def test_flax_variables_load_unchanged():
    ref, ours = CNN(nn.BatchNorm, True), CNN(bn_linen.BatchNorm, True)
    x, _ = _data(0)
    v = ref.init(jax.random.key(0), x, train=True)
    _, upd = ref.apply(v, x, train=True, mutable=["batch_stats"])
    v = {**v, **upd}  # non-trivial running statistics
    # Inference uses no batch statistics, so it is exact whatever the variance mode.
    np.testing.assert_array_equal(ref.apply(v, x, train=False), ours.apply(v, x, train=False))
    y_ref, s_ref = ref.apply(v, x, train=True, mutable=["batch_stats"])
    y_ours, s_ours = ours.apply(v, x, train=True, mutable=["batch_stats"])
    assert_trees_close((y_ref, s_ref), (y_ours, s_ours))


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def test_every_flax_field_and_call_argument_is_accepted():
    flax_fields, our_fields = _fields(nn.BatchNorm), _fields(bn_linen.BatchNorm)
    # Same order first (positional construction keeps working), extras only at the end.
    assert list(our_fields)[: len(flax_fields)] == list(flax_fields)
    assert set(our_fields) - set(flax_fields) == EXTRAS
    for name, f in flax_fields.items():
        expected = False if name == "use_fast_variance" else f.default  # documented choice
        assert our_fields[name].default == expected, name
    assert our_fields["unbiased_running_var"].default is False

    sig_flax = inspect.signature(nn.BatchNorm.__call__).parameters
    sig_ours = inspect.signature(bn_linen.BatchNorm.__call__).parameters
    assert [(p.name, p.kind, p.default) for p in sig_flax.values()] == [
        (p.name, p.kind, p.default) for p in sig_ours.values()
    ]
    # Every field can be passed by keyword.
    kwargs = {name: f.default for name, f in flax_fields.items()}
    x = jnp.ones((4, 3))
    bn_linen.BatchNorm(**kwargs).init(jax.random.key(0), x, use_running_average=True)


_x = jax.random.normal(jax.random.key(1), (6, 4, 5)) * 3.0 + 1.0
_grid = [
    dict(),
    dict(use_scale=False),
    dict(use_bias=False),
    dict(use_scale=False, use_bias=False),
    dict(axis=1),
    dict(axis=(1, 2)),
    dict(param_dtype=jnp.bfloat16),
    dict(dtype=jnp.float16),
    dict(input_dtype=jnp.bfloat16),
    dict(input_dtype=jnp.bfloat16, use_scale=False, use_bias=False),
    dict(mask=True),
    dict(scale_init=nn.initializers.normal(), bias_init=nn.initializers.normal()),
    dict(force_float32_reductions=False, param_dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("cfg", _grid, ids=[str(sorted(c)) for c in _grid])
def test_single_layer_matches_flax(cfg):
    cfg = dict(cfg)
    x = _x.astype(cfg.pop("input_dtype", jnp.float32))
    mask = (jnp.arange(6) % 3 != 0)[:, None, None] if cfg.pop("mask", False) else None
    ref = nn.BatchNorm(momentum=0.8, use_fast_variance=True, **cfg)
    ours = bn_linen.BatchNorm(momentum=0.8, use_fast_variance=True, **cfg)
    v = ref.init(jax.random.key(0), x, use_running_average=False, mask=mask)
    assert_trees_close(
        v, ours.init(jax.random.key(0), x, use_running_average=False, mask=mask), rtol=0, atol=0
    )

    half = jnp.dtype(x.dtype).itemsize == 2 or jnp.dtype(cfg.get("dtype", x.dtype)).itemsize == 2
    # Half precision: a bf16/fp16 ulp. float32: the gradients are sums of O(1) terms
    # accumulated in a different order (the core has its own backward pass).
    tol = dict(rtol=1e-2, atol=1e-2) if half or "param_dtype" in cfg else dict(atol=2e-6)

    @functools.partial(jax.jit, static_argnums=0)
    def run(model, v):  # both modes in one compilation: [train, eval]
        def grads(train):
            def loss(params):
                y, upd = model.apply(
                    {**v, "params": params},
                    x,
                    use_running_average=not train,
                    mask=mask,
                    mutable=["batch_stats"],
                )
                return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, upd)

            return jax.grad(loss, has_aux=True)(v.get("params", {}))

        return [grads(True), grads(False)]

    for ref_out, our_out in zip(run(ref, v), run(ours, v), strict=True):
        g_ref, (y_ref, u_ref) = ref_out
        g_ours, (y_ours, u_ours) = our_out
        assert y_ref.dtype == y_ours.dtype
        assert_trees_close(y_ref, y_ours, **tol)
        # Only parameters that exist get gradients; the constant stand-ins do not appear.
        assert_trees_close(g_ref, g_ours, **tol)
        if cfg.get("force_float32_reductions", True):
            assert_trees_close(u_ref, u_ours, **tol)
        else:  # flax lets the update promote its bfloat16 statistics; ours keeps the dtype
            dtypes = lambda t: jax.tree.map(lambda a: a.dtype, t)
            assert dtypes(u_ours["batch_stats"]) == dtypes(v["batch_stats"])
            assert_trees_close(
                jax.tree.map(lambda a: a.astype(jnp.float32), u_ref),
                jax.tree.map(lambda a: a.astype(jnp.float32), u_ours),
                **tol,
            )


def _sync_data(masked: bool):
    x = jax.random.normal(jax.random.key(2), (NUM_DEVICES * 4, 5)) * 3.0 + 2.0
    # Uneven valid counts across devices: device i keeps i % 4 + 1 of its 4 rows.
    mask = (jnp.arange(x.shape[0]) % 4 < (jnp.arange(x.shape[0]) // 4) % 4 + 1)[:, None]
    return x, (mask if masked else None)


def _unsynced(x, mask, **kw):
    ref = bn_linen.BatchNorm(momentum=0.9, **kw)
    v = ref.init(jax.random.key(0), x, use_running_average=False)

    def loss(params):
        y, upd = ref.apply(
            {**v, "params": params},
            x,
            use_running_average=False,
            mask=mask,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y)), (y, upd)

    grads, (y, upd) = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
    return v, y, upd, grads


def test_axis_name_pmap():
    x, _ = _sync_data(False)
    v, y_ref, u_ref, g_ref = _unsynced(x, None)
    bn = bn_linen.BatchNorm(momentum=0.9, axis_name="b")
    # init needs no bound axis name (flax semantics); it gives the same variables.
    assert_trees_close(v, bn.init(jax.random.key(0), x, use_running_average=False), 0, 0)

    def per_device(v, x):
        def loss(params):
            y, upd = bn.apply(
                {**v, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(y)), (y, upd)

        grads, (y, upd) = jax.grad(loss, has_aux=True)(v["params"])
        return y, upd, jax.lax.psum(grads, "b")

    f = jax.pmap(per_device, axis_name="b", in_axes=(None, 0))
    y, upd, grads = f(v, x.reshape(NUM_DEVICES, -1, x.shape[-1]))
    assert_trees_close(y.reshape(x.shape), y_ref)
    for d in range(NUM_DEVICES):
        assert_trees_close(jax.tree.map(lambda a, d=d: a[d], upd), u_ref)
        assert_trees_close(jax.tree.map(lambda a, d=d: a[d], grads), g_ref, atol=1e-5)


def test_axis_index_groups_pmap():
    x, _ = _sync_data(False)
    xs = x.reshape(NUM_DEVICES, -1, x.shape[-1])
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    bn = bn_linen.BatchNorm(momentum=0.9, axis_name="b", axis_index_groups=groups)
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    f = jax.pmap(
        lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"]),
        axis_name="b",
        in_axes=(None, 0),
    )
    y, upd = f(v, xs)
    for group in groups:
        _, y_ref, u_ref, _ = _unsynced(xs[np.array(group)].reshape(-1, x.shape[-1]), None)
        assert_trees_close(y[np.array(group)].reshape(y_ref.shape), y_ref)
        for d in group:
            assert_trees_close(jax.tree.map(lambda a, d=d: a[d], upd), u_ref)


@pytest.mark.parametrize("masked", [False, True])
def test_axis_name_shard_map(mesh, masked):
    x, mask = _sync_data(masked)
    v, y_ref, u_ref, g_ref = _unsynced(x, mask)
    bn = bn_linen.BatchNorm(momentum=0.9, axis_name="d")

    def per_device(v, x, mask):
        def loss(params):
            y, upd = bn.apply(
                {**v, "params": params},
                x,
                use_running_average=False,
                mask=mask,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y)), (y, upd)

        # v is replicated (device-invariant), so shard_map's autodiff already sums the
        # per-device gradients of v: no psum here, unlike under pmap.
        grads, (y, upd) = jax.grad(loss, has_aux=True)(v["params"])
        return y, upd, grads

    f = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P(), P())
        )
    )
    y, upd, grads = f(v, x, mask)
    if mask is None:
        assert_trees_close(y, y_ref)
    else:  # masked-out rows are normalized too but carry no meaning; compare the valid ones
        keep = np.asarray(mask[:, 0])
        assert_trees_close(y[keep], y_ref[keep])
    assert_trees_close(upd, u_ref)
    assert_trees_close(grads, g_ref, atol=1e-5)


@pytest.mark.parametrize("momentum", [None, 0.7])
@pytest.mark.parametrize("unbiased", [False, True])
def test_momentum_none_and_unbiased_var_match_core(momentum, unbiased):
    bn = bn_linen.BatchNorm(momentum=momentum, unbiased_running_var=unbiased)
    xs = [jax.random.normal(jax.random.key(i), (5, 3)) * (i + 1) + i for i in range(4)]
    v = bn.init(jax.random.key(0), xs[0], use_running_average=False)
    has_count = "count" in v["batch_stats"]
    assert has_count == (momentum is None)
    params, stats = jaxbn.init(3)
    apply = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
    for x in xs:
        y, upd = apply(v, x)
        v = {**v, **upd}
        y_core, stats = jaxbn.batch_norm(
            x, params, stats, training=True, momentum=momentum, unbiased_running_var=unbiased
        )
        # jit against eager: the same operations, fused differently (an ulp or two).
        assert_trees_close(y, y_core, atol=1e-6)
        assert_trees_close(v["batch_stats"]["mean"], stats.mean, atol=1e-6)
        assert_trees_close(v["batch_stats"]["var"], stats.var, atol=1e-6)
        if has_count:
            np.testing.assert_array_equal(v["batch_stats"]["count"], stats.count)
    y_eval = bn.apply(v, xs[0], use_running_average=True)
    assert_trees_close(y_eval, jaxbn.batch_norm(xs[0], params, stats, training=False)[0], atol=1e-6)


def test_momentum_none_with_flax_checkpoint():
    x = jax.random.normal(jax.random.key(0), (5, 3))
    v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    bn = bn_linen.BatchNorm(momentum=None)
    bn.apply(v, x, use_running_average=True)  # inference needs no count
    with pytest.raises(ValueError, match=r"momentum=None .* in 'batch_stats/count' .* got none"):
        bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])


def test_init_semantics():
    x = jax.random.normal(jax.random.key(0), (1, 3)) + 4.0
    # One value per feature: init accepts it like flax (and returns flax's output) ...
    v_ref = nn.BatchNorm(use_fast_variance=False).init_with_output(
        jax.random.key(0), x, use_running_average=False
    )
    v_ours = bn_linen.BatchNorm().init_with_output(jax.random.key(0), x, use_running_average=False)
    assert_trees_close(v_ref, v_ours, rtol=0, atol=0)
    # ... and does not update the statistics.
    np.testing.assert_array_equal(v_ours[1]["batch_stats"]["mean"], jnp.zeros(3))
    np.testing.assert_array_equal(v_ours[1]["batch_stats"]["var"], jnp.ones(3))
    # Training on such a batch follows flax too: variance 0, output = bias, stats updated.
    kw = dict(use_running_average=False, mutable=["batch_stats"])
    y_ref, upd_ref = nn.BatchNorm(use_fast_variance=False).apply(v_ref[1], x, **kw)
    y, upd = bn_linen.BatchNorm().apply(v_ours[1], x, **kw)
    np.testing.assert_array_equal(y, v_ours[1]["params"]["bias"][None])
    assert_trees_close((y, upd), (y_ref, upd_ref), rtol=1e-6, atol=1e-6)


def test_use_running_average_must_be_given_once():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError):
        bn_linen.BatchNorm().init(jax.random.key(0), x)
    with pytest.raises(ValueError):
        bn_linen.BatchNorm(use_running_average=True).init(jax.random.key(0), x, True)


def test_stable_default_where_fast_variance_fails():
    # |mean| >> std: flax's default E[x^2] - E[x]^2 cancels catastrophically in float32.
    x = jax.random.normal(jax.random.key(0), (256, 2)) + 1e4
    v = {
        "params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
        "batch_stats": {"mean": jnp.zeros(2), "var": jnp.ones(2)},
    }

    @jax.jit
    def train_std(v, x):
        outs = [
            m.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
            for m in (
                bn_linen.BatchNorm(),
                nn.BatchNorm(),
                bn_linen.BatchNorm(use_fast_variance=True),
            )
        ]
        return [y.std(axis=0) for y in outs]

    std_ours, std_flax, std_ours_fast = train_std(v, x)
    np.testing.assert_allclose(std_ours, 1.0, rtol=1e-3)
    assert not np.allclose(std_flax, 1.0, rtol=1e-2)
    assert not np.allclose(std_ours_fast, 1.0, rtol=1e-2)  # the option does reach the core


# ----------------------------------------------------------------------------------------
# Where flax workflows used to break.


class _Block(nn.Module):
    bn: Any

    @nn.compact
    def __call__(self, x):
        return self.bn(use_running_average=False)(nn.Dense(3)(x))


def test_tabulate_and_intercepted_methods_show_only_call():
    """The count variable is no method: summaries list BatchNorm once, as flax's."""
    x = jnp.ones((4, 2))
    ours, ref = (nn.tabulate(_Block(bn), jax.random.key(0))(x)
                 for bn in (bn_linen.BatchNorm, nn.BatchNorm))
    assert ours.count("BatchNorm") == ref.count("BatchNorm") >= 1
    assert len(ours.splitlines()) == len(ref.splitlines())
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, bn_linen.BatchNorm):
            seen.append(context.method_name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _Block(functools.partial(bn_linen.BatchNorm, momentum=None)).init(jax.random.key(0), x)
    assert seen == ["__call__"]


@pytest.mark.parametrize("x", [
    jax.random.normal(jax.random.key(1), (6, 3), jnp.complex64) * (2 - 1j) + 3j,
    jnp.arange(18).reshape(6, 3),
], ids=["complex", "int"])
def test_complex_and_integer_inputs_match_flax(x):
    kw = dict(momentum=0.9, use_running_average=False)
    ref = nn.BatchNorm(use_fast_variance=False, **kw)
    v = ref.init(jax.random.key(0), x)
    want = ref.apply(v, x, mutable=["batch_stats"])
    got = bn_linen.BatchNorm(**kw).apply(v, x, mutable=["batch_stats"])
    assert_trees_close(got, want, atol=1e-6)


def test_init_on_one_dimensional_input():
    """No axis to reduce: init works as flax's (variance 0, output bias)."""
    x = jnp.array([1.0, 2.0, 3.0])
    want = nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    got = bn_linen.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    assert_trees_close(got, want)
