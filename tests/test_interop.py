"""jaxbn.interop: PyTorch state conversion, PyTorch-equivalent settings, and folding."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import interop

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def _state(c=3, *, affine=True, track=True, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    if affine:
        sd["weight"] = rng.normal(size=c).astype(np.float32)
        sd["bias"] = rng.normal(size=c).astype(np.float32)
    if track:
        sd["running_mean"] = rng.normal(size=c).astype(np.float32)
        sd["running_var"] = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
        sd["num_batches_tracked"] = np.array(12, np.int64)
    return sd


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        a_k, b_k = np.asarray(a[k]), np.asarray(b[k])
        assert a_k.dtype == b_k.dtype, k
        assert a_k.shape == b_k.shape, k
        np.testing.assert_array_equal(a_k, b_k, err_msg=k)


# ----------------------------------------------------------------------------------------
# from_torch / to_torch on NumPy state (no torch needed).


@pytest.mark.parametrize("affine, track", [(True, True), (True, False), (False, True)])
def test_numpy_round_trip(affine, track):
    sd = _state(affine=affine, track=track)
    params, stats = interop.from_torch(sd)
    assert (params is None) == (not affine)
    assert (stats is None) == (not track)
    if track:
        assert stats.count.dtype == jnp.int32 and int(stats.count) == 12
    back = interop.to_torch(params, stats)
    _assert_same(back, sd)
    if track:
        assert back["num_batches_tracked"].dtype == np.int64
        assert back["num_batches_tracked"].shape == ()


def test_prefix_and_legacy_state_without_counter():
    sd = {f"features.1.{k}": v for k, v in _state().items() if k != "num_batches_tracked"}
    sd["features.0.weight"] = np.ones((3, 1, 1, 1), np.float32)  # another layer: ignored
    params, stats = interop.from_torch(sd, prefix="features.1.")
    assert int(stats.count) == 0
    np.testing.assert_array_equal(params.scale, sd["features.1.weight"])
    out = interop.to_torch(params, stats, prefix="features.1.")
    assert out["features.1.num_batches_tracked"] == 0


def test_half_precision_round_trip():
    sd = {k: (v.astype(jnp.bfloat16) if k in ("weight", "bias") else v)
          for k, v in _state().items()}
    params, stats = interop.from_torch(sd)
    assert params.scale.dtype == jnp.bfloat16
    _assert_same(interop.to_torch(params, stats), sd)


def test_jaxbn_state_round_trip_through_torch_keys():
    params, stats = jaxbn.init(4)
    stats = stats._replace(mean=jnp.arange(4.0), count=jnp.array(3, jnp.int32))
    p2, s2 = interop.from_torch(interop.to_torch(params, stats))
    jax.tree.map(np.testing.assert_array_equal, (p2, s2), (params, stats))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd.pop("weight"), r"'bias' but not 'weight'"),
        (lambda sd: sd.pop("bias"), r"'weight' but not 'bias'"),
        (lambda sd: sd.pop("running_var"), r"'running_mean' but not 'running_var'"),
        (lambda sd: [sd.pop("running_mean"), sd.pop("running_var")],
         r"'num_batches_tracked' but no running statistics"),
        (lambda sd: sd.update(weight=np.ones(4, np.float32)), r"one C, got lengths"),
        (lambda sd: sd.update(running_mean=np.zeros((3, 1), np.float32)),
         r"running_mean: expected a 1-d array of shape \(C,\), got shape \(3, 1\)"),
        (lambda sd: sd.update(bias=np.zeros(3, np.int32)), r"bias: expected a floating"),
        (lambda sd: sd.update(num_batches_tracked=np.zeros(2, np.int64)),
         r"num_batches_tracked: expected an integer scalar, got shape \(2,\)"),
        (lambda sd: sd.update(num_batches_tracked=np.array(1.0)),
         r"expected an integer scalar.*float64"),
        (lambda sd: sd.update(num_batches_tracked=np.array(2**31, np.int64)),
         r"expected a value in \[0, 2147483647\].*got 2147483648"),
        (lambda sd: sd.update({"0.weight": np.ones(3)}), r"unexpected BatchNorm state_dict "
                                                          r"keys \['0.weight'\].*prefix="),
    ],
)
def test_from_torch_errors(mutate, match):
    sd = _state()
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        interop.from_torch(sd)


def test_from_torch_rejects_non_state():
    with pytest.raises(ValueError, match="a BatchNorm module or its state_dict"):
        interop.from_torch([1, 2, 3])


def test_empty_state_is_refused():
    """An empty mapping is no BatchNorm state (it used to mean BN with nothing at all)."""
    with pytest.raises(ValueError, match=r"empty state: expected BatchNorm keys .* got none"):
        interop.from_torch({})
    assert interop.to_torch(None, None) == {}


def test_prefix_that_matches_no_key():
    sd = {f"bn.{k}": v for k, v in _state().items()}
    with pytest.raises(ValueError, match=r"no key .* starts with prefix 'bm\.'.*bn.weight"):
        interop.from_torch(sd, prefix="bm.")


@needs_torch
@pytest.mark.parametrize("module", [
    lambda: torch.nn.LayerNorm(3), lambda: torch.nn.GroupNorm(1, 3),
    lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
])
def test_other_normalizations_are_refused(module):
    m = module()
    with pytest.raises(ValueError, match=rf"expects a BatchNorm module .* got "
                                         rf"{type(m).__name__}"):
        interop.from_torch(m)


@needs_torch
@pytest.mark.parametrize("module", [lambda: torch.nn.LayerNorm(3),
                                    lambda: torch.nn.GroupNorm(1, 3)])
def test_other_normalizations_state_dict_is_refused(module):
    """A state_dict() records its modules' versions: LayerNorm/GroupNorm's is 1, BN's 2."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), module())
    with pytest.raises(ValueError, match=r"prefix '1\.' is not a BatchNorm's: .* version 1"):
        interop.from_torch(model.state_dict(), prefix="1.")
    both_none = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    assert interop.from_torch(both_none) == (None, None)  # the module: known to be BN


@needs_torch
def test_meta_device_tensor_is_named():
    with torch.device("meta"):
        m = torch.nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"^bn\.weight: expected a tensor with data, got one "
                                         r"on the 'meta' device"):
        interop.from_torch({f"bn.{k}": v for k, v in m.state_dict().items()}, prefix="bn.")


def test_to_torch_rejects_mismatched_shapes():
    params, stats = jaxbn.init(3)
    with pytest.raises(ValueError, match=r"one shape \(C,\)"):
        interop.to_torch(params, stats._replace(mean=jnp.zeros(4)))


def test_torch_kwargs():
    assert interop.torch_kwargs() == {
        "axis": 1, "momentum": 0.9, "unbiased_running_var": True, "epsilon": 1e-5}
    assert interop.torch_kwargs(0.3, eps=1e-3)["momentum"] == 0.7
    assert interop.torch_kwargs(0.3, eps=1e-3)["epsilon"] == 1e-3
    assert interop.torch_kwargs(None)["momentum"] is None
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\] or None, got 1.5"):
        interop.torch_kwargs(1.5)
    with pytest.raises(ValueError, match=r"eps: expected a value > 0, got 0"):
        interop.torch_kwargs(0.1, eps=0)


# ----------------------------------------------------------------------------------------
# Against PyTorch itself.


def _torch_bn(ndim, c, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    torch.manual_seed(0)
    m = cls(c, **kwargs)
    if kwargs.get("affine", True):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    return m


@needs_torch
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_module_round_trip(affine, track):
    m = _torch_bn(4, 5, affine=affine, track_running_stats=track)
    if track:
        m.train()
        m(torch.randn(8, 5, 3, 3))
    params, stats = interop.from_torch(m)  # the module itself
    _assert_same(interop.to_torch(params, stats),
                 {k: v.numpy() for k, v in m.state_dict().items()})
    fresh = _torch_bn(4, 5, affine=affine, track_running_stats=track)
    fresh.load_state_dict({k: torch.from_numpy(v)
                           for k, v in interop.to_torch(params, stats).items()})
    _assert_same({k: v.numpy() for k, v in fresh.state_dict().items()},
                  {k: v.numpy() for k, v in m.state_dict().items()})


@needs_torch
def test_tensor_state_including_bfloat16():
    m = _torch_bn(4, 3).bfloat16()
    params, stats = interop.from_torch(m.state_dict())
    assert params.scale.dtype == jnp.bfloat16 and stats.mean.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params.scale, np.float32),
                                  m.weight.detach().float().numpy())


@needs_torch
@pytest.mark.parametrize("shape, momentum", [
    ((16, 4), 0.1), ((8, 4, 7), None), ((4, 4, 5, 6), 0.3), ((2, 4, 3, 4, 5), 0.1),
])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
def test_parity_with_torch(shape, momentum, affine, track):
    c = shape[1]
    m = _torch_bn(len(shape), c, momentum=momentum, eps=1e-3, affine=affine,
                  track_running_stats=track)
    params, stats = interop.from_torch(m)
    kwargs = interop.torch_kwargs(momentum, eps=1e-3)
    train = jax.jit(lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True, **kwargs))
    evaluate = jax.jit(lambda x, p, s: jaxbn.batch_norm(x, p, s, training=False, **kwargs))
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = (rng.normal(size=shape) * 2 + 3).astype(np.float32)
        m.train()
        y_t = m(torch.from_numpy(x)).detach().numpy()
        y, stats = train(x, params, stats)
        np.testing.assert_allclose(y, y_t, atol=1e-5, rtol=1e-5)
        if track:
            _, s_t = interop.from_torch(m)
            np.testing.assert_allclose(stats.mean, s_t.mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats.var, s_t.var, rtol=1e-5, atol=1e-6)
            assert int(stats.count) == int(s_t.count)
        m.eval()
        with torch.no_grad():
            y_t = m(torch.from_numpy(x)).numpy()
        y, _ = evaluate(x, params, stats)
        np.testing.assert_allclose(y, y_t, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Folding.


def _conv(x, k, b=None, padding="VALID"):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y if b is None else y + b


def _pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _randn(rng, *shape, scale=1.0):
    # NumPy, not jax.random: every new shape of jax.random.normal costs a ~1 s compile.
    return jnp.asarray(rng.normal(size=shape, scale=scale).astype(np.float32))


def _bn_state(c, *, seed=0, negative=False):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 2.0, size=c).astype(np.float32)
    if negative:
        scale[1] *= -1.0
    params = jaxbn.BatchNormParams(jnp.asarray(scale), _randn(rng, c))
    stats = jaxbn.BatchStats(_randn(rng, c, scale=3.0),
                             jnp.asarray(rng.uniform(0.1, 5.0, size=c).astype(np.float32)),
                             jnp.array(7, jnp.int32))
    return params, stats


def _eval_bn(y, params, stats, epsilon=1e-3):
    return jaxbn.batch_norm(y, params, stats, training=False, epsilon=epsilon)[0]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_into_conv(with_bias, affine):
    rng = np.random.default_rng(3)
    x, kernel = _randn(rng, 2, 12, 12, 3), _randn(rng, 5, 5, 3, 6, scale=0.2)
    bias = _randn(rng, 6) if with_bias else None
    params, stats = _bn_state(6)
    params = params if affine else None
    fold = jax.jit(lambda *a: interop.fold_into_conv(*a, epsilon=1e-3))
    k2, b2 = fold(kernel, bias, params, stats)
    assert k2.shape == kernel.shape and b2.shape == (6,)
    want = _eval_bn(_conv(x, kernel, bias), params, stats)
    np.testing.assert_allclose(_conv(x, k2, b2), want, atol=1e-5, rtol=1e-5)


def test_fold_through_max_pool():
    rng = np.random.default_rng(4)
    x, kernel = _randn(rng, 2, 12, 12, 3), _randn(rng, 5, 5, 3, 6, scale=0.2)
    bias = _randn(rng, 6)
    params, stats = _bn_state(6)
    assert interop.commutes_with_max_pool(params, stats, epsilon=1e-3)
    k2, b2 = interop.fold_into_conv(kernel, bias, params, stats, epsilon=1e-3,
                                    through_max_pool=True)
    want = _eval_bn(_pool(_conv(x, kernel, bias)), params, stats)
    np.testing.assert_allclose(_pool(_conv(x, k2, b2)), want, atol=1e-5, rtol=1e-5)

    # A negative scale turns the max into a min: folding across the pool would be wrong,
    # and the function refuses it.
    params, stats = _bn_state(6, negative=True)
    assert not interop.commutes_with_max_pool(params, stats, epsilon=1e-3)
    k2, b2 = interop.fold_into_conv(kernel, bias, params, stats, epsilon=1e-3)
    wrong = _pool(_conv(x, k2, b2))
    want = _eval_bn(_pool(_conv(x, kernel, bias)), params, stats)
    assert not np.allclose(wrong[..., 1], want[..., 1], atol=1e-3)
    np.testing.assert_allclose(wrong[..., 0], want[..., 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"a < 0 for channels \[1\].*separate affine"):
        interop.fold_into_conv(kernel, bias, params, stats, epsilon=1e-3,
                               through_max_pool=True)
    with pytest.raises(ValueError, match="traced values; call it outside jit"):
        jax.jit(lambda p: interop.fold_into_conv(kernel, bias, p, stats,
                                                 through_max_pool=True))(params)
    with pytest.raises(ValueError, match="traced values; call it outside jit"):
        jax.jit(lambda p: interop.commutes_with_max_pool(p, stats))(params)


def test_fold_into_dense():
    rng = np.random.default_rng(5)
    x, kernel, bias = _randn(rng, 16, 10), _randn(rng, 10, 4), _randn(rng, 4)
    params, stats = _bn_state(4)
    k2, b2 = interop.fold_into_dense(kernel, bias, params, stats, epsilon=1e-3)
    want = _eval_bn(x @ kernel + bias, params, stats)
    np.testing.assert_allclose(x @ k2 + b2, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("negative", [False, True])
def test_fold_into_next_conv_and_dense(negative):
    rng = np.random.default_rng(6)
    x = _randn(rng, 2, 8, 8, 3)
    params, stats = _bn_state(3, negative=negative)
    y = _eval_bn(x, params, stats)
    kernel = _randn(rng, 3, 3, 3, 5, scale=0.3)
    k2, b2 = interop.fold_into_next_conv(kernel, None, params, stats, epsilon=1e-3)
    np.testing.assert_allclose(_conv(x, k2, b2), _conv(y, kernel), atol=1e-4, rtol=1e-5)

    dense, bias = _randn(rng, 8 * 8 * 3, 7, scale=0.1), _randn(rng, 7)
    k2, b2 = interop.fold_into_next_dense(dense, bias, params, stats, epsilon=1e-3)
    flat = lambda v: v.reshape(v.shape[0], -1)
    hi = jax.lax.Precision.HIGHEST
    np.testing.assert_allclose(jnp.dot(flat(x), k2, precision=hi) + b2,
                               jnp.dot(flat(y), dense, precision=hi) + bias,
                               atol=1e-4, rtol=1e-5)


def test_fold_errors():
    params, stats = jaxbn.init(4)
    with pytest.raises(ValueError, match=r"has 4 features but the kernel of shape "
                                         r"\(3, 3, 2, 5\) has 5 output channels"):
        interop.fold_into_conv(jnp.ones((3, 3, 2, 5)), None, params, stats)
    with pytest.raises(ValueError, match=r"has 3 input channels"):
        interop.fold_into_next_conv(jnp.ones((3, 3, 3, 4)), None, params, stats)
    with pytest.raises(ValueError, match=r"expected a bias of shape \(4,\).*got \(5,\)"):
        interop.fold_into_conv(jnp.ones((3, 3, 2, 4)), jnp.ones(5), params, stats)
    with pytest.raises(ValueError, match=r"expected an \(in, out\) kernel"):
        interop.fold_into_dense(jnp.ones((3, 3, 4)), None, params, stats)
    with pytest.raises(ValueError, match=r"in a multiple of the BatchNorm's 4 features"):
        interop.fold_into_next_dense(jnp.ones((6, 2)), None, params, stats)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        interop.fold_into_dense(jnp.ones((3, 4)), None, params, None)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        interop.fold_into_dense(jnp.ones((3, 4)), None, params, stats, epsilon=0.0)


# ----------------------------------------------------------------------------------------
# Folding a whole LeNet for inference (train.export), on real images.

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def images():
    from train import data, idx

    files = idx.find_idx_files(FASHION_MNIST)
    if files is None:
        pytest.skip(f"Fashion-MNIST IDX files not found in {FASHION_MNIST} "
                    f"(apt-get install dataset-fashion-mnist)")
    return jnp.asarray(data.to_float(idx.read_idx(files["test_images"])[:256, :, :, None]))


def _lenet_variables(images, seed=0):
    """LeNet variables with random He-scaled weights and data-derived BN statistics."""
    from train.model import LeNet

    rng = np.random.default_rng(seed)
    shapes = {"conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (800, 500),
              "fc2": (500, 10)}
    params = {name: {"kernel": _randn(rng, *s, scale=np.sqrt(2 / np.prod(s[:-1]))),
                     "bias": _randn(rng, s[-1], scale=0.1)} for name, s in shapes.items()}
    for name, c in (("bn1", 20), ("bn2", 50)):
        params[name] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32)),
                        "bias": _randn(rng, c, scale=0.5)}
    stats = {name: {"mean": jnp.zeros(c), "var": jnp.ones(c)}
             for name, c in (("bn1", 20), ("bn2", 50))}
    # momentum 0: the running statistics become this batch's, then move them off a little
    # so that inference is not simply training mode.
    _, updates = LeNet(momentum=0.0).apply({"params": params, "batch_stats": stats}, images,
                                          train=True, mutable=["batch_stats"])
    stats = jax.tree.map(
        lambda v: v * jnp.asarray(rng.uniform(0.8, 1.25, v.shape).astype(np.float32)),
        updates["batch_stats"])
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def lenet_variables(images):
    return _lenet_variables(images)


def _with_scales(variables, bn, sign):
    out = jax.tree.map(lambda v: v, variables)
    scale = out["params"][bn]["scale"]
    out["params"][bn]["scale"] = scale * jnp.where(jnp.arange(scale.shape[0]) % 3 == 1, sign, 1)
    return out


@pytest.mark.parametrize("kwargs, negative, kept", [
    ({"norm": "jaxbn"}, None, []),
    ({"norm": "jaxbn", "activation": "tanh"}, "bn2", ["affine2"]),
    ({"norm": "flax", "bn_position": "after_relu"}, "bn1", []),
    ({"norm": "none"}, None, []),
])
def test_export_folded_matches_unfolded(images, lenet_variables, kwargs, negative, kept):
    from train import export
    from train.model import LeNet

    variables = lenet_variables
    if negative:
        variables = _with_scales(variables, negative, -1.0)
    if kwargs["norm"] == "none":
        variables = {"params": {k: v for k, v in variables["params"].items()
                                if not k.startswith("bn")}}
    folded, apply_fn = export.export_folded(variables, kwargs)
    assert sorted(k for k in folded if k.startswith("affine")) == kept
    assert not any(k.startswith("bn") for k in folded)
    want = jax.jit(lambda v, x: LeNet(**kwargs).apply(v, x, train=False))(variables, images)
    got = jax.jit(apply_fn)(folded, images)
    assert float(jnp.abs(want).max()) > 1.0  # non-trivial logits
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _write_lenet_checkpoints(workdir, variables, steps=(3, 7)):
    """Checkpoints laid out as ``python -m train.lenet`` writes them (norm jaxbn, before_relu)."""
    import orbax.checkpoint as ocp

    config = {"dataset": "fashion_mnist", "norm": "jaxbn", "bn_position": "before_relu",
              "activation": "relu", "bn_momentum": 0.9, "conv": "flax", "lr": 0.05}
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        for step in steps:
            state = {"step": step, **variables, "opt_state": {"mu": np.zeros(3)}}
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"state": state, "rng": np.zeros(2, np.uint32)}),
                meta=ocp.args.JsonSave({"step": step, "config": config})))
        manager.wait_until_finished()


def test_export_command_line(tmp_path, images, lenet_variables, capsys):
    """A checkpoint laid out as ``python -m train.lenet`` writes it, exported and reloaded."""
    import json

    from train import data, export
    from train.model import LeNet

    _write_lenet_checkpoints(tmp_path / "run", lenet_variables)
    out = tmp_path / "export" / "lenet.npz"
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "step 7: wrote" in capsys.readouterr().out
    arch = json.loads(out.with_suffix(".json").read_text())
    assert arch["format"] == export.FORMAT and arch["folded_from"]["momentum"] == 0.9
    assert "pixels / 255" in arch["input"]
    folded, apply_fn = export.load_folded(out)
    assert sorted(folded) == ["conv1", "conv2", "fc1", "fc2"]
    # The training program standardizes its inputs; the export takes pixels / 255.
    mean, std = data.PIXEL_STATS["fashion_mnist"]
    want = LeNet().apply(lenet_variables, (images[:64] - mean) / std, train=False)
    # Folding (x - mean) / std into conv1 sums kernel / std * x (std 0.35: terms ~3x larger)
    # and subtracts mean / std * sum(kernel) once: float32 rounding of the logits (up to ~10)
    # moves by about 1e-6 of their largest magnitude, so the absolute tolerance scales with it.
    np.testing.assert_allclose(apply_fn(folded, images[:64]), want, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()))

    assert export.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "expected orbax checkpoints in" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory, lenet_variables):
    workdir = tmp_path_factory.mktemp("lenet-run")
    _write_lenet_checkpoints(workdir, lenet_variables)
    return workdir


def _one_error_line(err):
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: "), err
    return line


@pytest.mark.parametrize("flags, message", [
    (["--norm", "none"], "--norm none: the checkpoint's network has norm='jaxbn'"),
    (["--bn-position", "after_relu"],
     "--bn-position after_relu: the checkpoint's network has bn_position='before_relu'"),
    (["--activation", "tanh"], "--activation tanh: the checkpoint's network has "
                               "activation='relu'"),
    (["--epsilon", "0.001"], "--epsilon 0.001: the checkpoint's network has epsilon=1e-05"),
])
def test_export_refuses_flags_that_contradict_the_checkpoint(lenet_run, tmp_path, capsys,
                                                             flags, message):
    """Such a flag would export another network (no BN, BN elsewhere): exit 2, one line."""
    from train import export

    out = tmp_path / "m.npz"
    code = export.main(["--workdir", str(lenet_run), "--out", str(out), *flags])
    assert code == export.EXIT_BAD_OPTION
    assert _one_error_line(capsys.readouterr().err).startswith(f"error: {message}")
    assert not out.exists()
    # A flag that agrees with the checkpoint is fine.
    agreeing = {"--norm": "jaxbn", "--bn-position": "before_relu", "--activation": "relu",
                "--epsilon": "1e-5"}[flags[0]]
    assert export.main(["--workdir", str(lenet_run), "--out", str(out), flags[0],
                        agreeing]) == 0


def test_export_refuses_norm_none_for_variables_with_bn(tmp_path, lenet_variables, capsys):
    """Without a recorded config, the variables themselves say there is BN."""
    import orbax.checkpoint as ocp

    from train import export

    with ocp.CheckpointManager(tmp_path / "run" / "checkpoints") as manager:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(lenet_variables)))
        manager.wait_until_finished()
    code = export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "m.npz"),
                        "--norm", "none"])
    assert code == export.EXIT_BAD_OPTION
    assert _one_error_line(capsys.readouterr().err).startswith(
        "error: --norm none: the checkpoint's network has BatchNorm")


def test_export_missing_step_and_unwritable_out_are_one_line(lenet_run, tmp_path, capsys):
    from train import export

    code = export.main(["--workdir", str(lenet_run), "--out", str(tmp_path / "m.npz"),
                        "--step", "5"])
    assert code == export.EXIT_FAILED
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: no checkpoint of step 5 in {lenet_run.absolute() / 'checkpoints'}: expected "
        "one of the steps 3, 7.")
    (tmp_path / "file").write_text("")
    code = export.main(["--workdir", str(lenet_run), "--out", str(tmp_path / "file" / "m.npz")])
    assert code == export.EXIT_FAILED
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: cannot write {tmp_path / 'file' / 'm.npz'}: {tmp_path / 'file'} is not a "
        "directory")


def test_export_flag_errors_are_one_line(capsys):
    from train import export

    with pytest.raises(SystemExit) as exc:
        export.main(["--workdir", "w"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: the following arguments are required: --out; see "
                                       "python -m train.export --help\n")
