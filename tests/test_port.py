"""train.port: the seed's PyTorch LeNet against train.model.LeNet with converted weights."""

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from train import port  # noqa: E402
from train.model import LeNet  # noqa: E402

LR = 0.1
BATCH = 16


def _batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(BATCH, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH)
    return x, y


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _torch_step(model, opt, x, y):
    model.train()
    opt.zero_grad()
    logits = model(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    opt.step()
    return logits.detach().numpy()


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained():
    """A seed LeNet after a few SGD steps on random data (non-trivial BN state)."""
    torch.manual_seed(0)
    model = port.torch_lenet()
    with torch.no_grad():  # BN state far from its initial values, some scales negative
        for bn in (model.conv[2], model.conv[6]):
            bn.weight.uniform_(-0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        model.dense[2].weight.mul_(3.0)  # logits of order 1-10, not 0.1
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(3):
        _torch_step(model, opt, *_batch(step))
    return model


# PyTorch keeps the unbiased variance in its running statistics; momentum 0.9 / eps 1e-5
# (LeNet's defaults) are PyTorch's momentum 0.1 / eps 1e-5.
MODEL = LeNet(norm="jaxbn", bn_kwargs={"unbiased_running_var": True})


def _assert_state_close(ours, theirs, atol):
    assert list(ours) == list(theirs)  # same keys, same (PyTorch's) order
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k
        np.testing.assert_allclose(ours[k], theirs[k], atol=atol, rtol=atol, err_msg=k)


@pytest.mark.parametrize("norm", ["jaxbn", "flax"])
def test_eval_logits_match(trained, norm):
    variables = port.from_torch_state_dict(trained.state_dict())
    x, _ = _batch(10)
    trained.eval()
    with torch.no_grad():
        want = trained(torch.from_numpy(x)).numpy()
    got = jax.jit(lambda v, x: LeNet(norm=norm).apply(v, x, train=False))(variables, _nhwc(x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_train_mode_and_one_sgd_step_match(trained):
    model = port.torch_lenet()
    model.load_state_dict(trained.state_dict())
    variables = port.from_torch_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _batch(20)
    want_logits = _torch_step(model, opt, x, y)

    def loss_fn(params, batch_stats, x, y):
        logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates["batch_stats"])

    @jax.jit
    def step(variables, x, y):
        grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(
            variables["params"], variables["batch_stats"], x, y)
        params = jax.tree.map(lambda p, g: p - LR * g, variables["params"], grads)
        return logits, {"params": params, "batch_stats": batch_stats}

    logits, new_variables = step(variables, _nhwc(x), jnp.asarray(y))
    # Train-mode logits (batch statistics) agree as tightly as eval-mode ones.
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    # Running statistics after the update (unbiased variance) and parameters after one
    # plain SGD step. Both sides sum float32 in different orders, so they differ by
    # rounding (observed <= 1e-7); 1e-5 absolute and relative is comfortably above that.
    nbt = int(model.state_dict()["conv.2.num_batches_tracked"])
    ours = port.to_torch_state_dict(new_variables, num_batches_tracked=nbt)
    _assert_state_close(ours, _state(model), atol=1e-5)

    # And the models still agree afterwards, in both modes.
    x2, _ = _batch(21)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x2)).numpy()
    got = MODEL.apply(new_variables, _nhwc(x2), train=False)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_export_round_trip_is_exact(trained):
    sd = _state(trained)
    _assert_state_close(port.to_torch_state_dict(
        port.from_torch_state_dict(trained.state_dict(), keep_count=True)), sd, atol=0)
    back = port.to_torch_state_dict(port.from_torch_state_dict(sd), num_batches_tracked=3)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    fresh = port.torch_lenet()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    _assert_state_close(_state(fresh), sd, atol=0)


def test_flatten_order():
    """fc1's rows are permuted so that NHWC flattening reads the same weights."""
    sd = _state(port.torch_lenet())
    sd["dense.0.weight"] = np.zeros_like(sd["dense.0.weight"])
    c, h, w = 7, 2, 3
    sd["dense.0.weight"][5, c * 16 + h * 4 + w] = 1.0  # PyTorch flattens (C, H, W)
    kernel = port.from_torch_state_dict(sd)["params"]["fc1"]["kernel"]
    assert np.flatnonzero(kernel[:, 5]).tolist() == [h * 200 + w * 50 + c]  # (H, W, C)


def test_keep_count_and_momentum_none(trained):
    variables = port.from_torch_state_dict(trained.state_dict(), keep_count=True)
    assert int(variables["batch_stats"]["bn1"]["count"]) == 3
    assert variables["batch_stats"]["bn1"]["count"].dtype == jnp.int32
    x, _ = _batch(30)
    _, updates = LeNet(momentum=None).apply(variables, _nhwc(x), train=True,
                                            mutable=["batch_stats"])
    assert int(updates["batch_stats"]["bn2"]["count"]) == 4


def test_errors():
    sd = _state(port.torch_lenet())
    with pytest.raises(ValueError, match=r"missing keys \['conv.2.bias'\], unexpected keys "
                                         r"\['extra'\]"):
        port.from_torch_state_dict({**{k: v for k, v in sd.items() if k != "conv.2.bias"},
                                    "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"conv.4.weight: expected shape \(50, 20, 5, 5\), "
                                         r"got \(50, 20, 3, 3\)"):
        port.from_torch_state_dict({**sd, "conv.4.weight": np.zeros((50, 20, 3, 3))})
    with pytest.raises(ValueError, match="with key 'dense.2.weight'"):
        port.from_torch_state_dict({})
    variables = port.from_torch_state_dict(sd)  # as a LeNet(norm='none') has them:
    del variables["params"]["bn1"], variables["params"]["bn2"], variables["batch_stats"]
    with pytest.raises(ValueError, match=r"variables lack bn1: expected the variables of "
                                         r"train.model.LeNet with BatchNorm"):
        port.to_torch_state_dict(variables)
