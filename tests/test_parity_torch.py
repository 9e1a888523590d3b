"""Parity of :func:`jaxbn.batch_norm` with ``torch.nn.BatchNorm1d/2d/3d``.

jaxbn runs with PyTorch's conventions: ``axis=1``, ``momentum = 1 - torch_momentum`` (``None``
for PyTorch's cumulative average), ``unbiased_running_var=True`` and the same ``epsilon``.
Three training steps (each side's updated running statistics feeding the next) are followed
by one evaluation step; outputs, running statistics, the update count and the gradients with
respect to the input, weight and bias (for a random upstream gradient) are compared.
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest

import jaxbn

torch = pytest.importorskip("torch")

STEPS = 3  # training steps before the evaluation step

# name: (torch module, input shape (N, C, ...), eps)
LAYOUTS = {
    "1d-NC": (torch.nn.BatchNorm1d, (8, 4), 1e-5),
    "1d-NCL": (torch.nn.BatchNorm1d, (4, 3, 7), 1e-5),
    "2d": (torch.nn.BatchNorm2d, (3, 4, 5, 6), 1e-3),
    "3d": (torch.nn.BatchNorm3d, (2, 3, 4, 3, 5), 1e-5),
}
TORCH_MOMENTA = (0.1, None)


def _inputs(shape, seed=0):
    """``STEPS + 1`` batches and upstream gradients, and a nontrivial weight and bias."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    offset = rng.normal(size=c).reshape(bshape) * 2
    spread = rng.uniform(0.5, 3.0, size=c).reshape(bshape)
    xs = (offset + spread * rng.normal(size=(STEPS + 1, *shape))).astype(np.float32)
    grads = rng.normal(size=(STEPS + 1, *shape)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    return xs, grads, weight, bias


@functools.partial(jax.jit, static_argnames=("train", "momentum", "epsilon"))
def _jaxbn_step(x, g, params, stats, *, train, momentum, epsilon):
    """Output, new statistics, and the vjp of the upstream gradient ``g``."""

    def f(x, p):
        return jaxbn.batch_norm(x, p, stats, training=train, axis=1, momentum=momentum,
                                epsilon=epsilon, unbiased_running_var=True)

    y, vjp, new = jax.vjp(f, x, params, has_aux=True)
    gx, gp = vjp(g)
    return y, new, gx, gp


def _torch_step(bn, x, g, *, train):
    """Output and gradients of one torch step (the module updates its own buffers)."""
    bn.train(train)
    for p in bn.parameters():
        p.grad = None
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = bn(xt)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), xt.grad.numpy(), bn


def _close(name, got, want, rtol=1e-6, atol_rel=1e-6):
    """``assert_allclose`` with ``atol`` scaled to the magnitude of the reference."""
    got, want = np.asarray(got), np.asarray(want)
    atol = atol_rel * max(float(np.max(np.abs(want))), 1.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize(
    "layout,torch_momentum,affine,track",
    [
        pytest.param(layout, m, affine, track, id="-".join((
            layout, "cumulative" if m is None else f"m={m}", "affine" if affine else "no-affine",
            "track" if track else "no-track")))
        for layout, m, affine, track in itertools.product(
            LAYOUTS, TORCH_MOMENTA, (True, False), (True, False))
    ],
)
def test_torch_parity_train_then_eval(layout, torch_momentum, affine, track):
    """Three training steps then eval match torch BatchNorm{1,2,3}d: output, running stats,
    num_batches_tracked and gradients w.r.t. input, weight and bias."""
    torch.manual_seed(0)
    module, shape, eps = LAYOUTS[layout]
    c = shape[1]
    xs, grads, weight, bias = _inputs(shape)
    bn = module(c, eps=eps, momentum=torch_momentum, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(weight))
            bn.bias.copy_(torch.from_numpy(bias))
    params, stats = jaxbn.init(c, affine=affine, track_running_stats=track)
    if affine:
        params = jaxbn.BatchNormParams(weight, bias)
    momentum = None if torch_momentum is None else 1 - torch_momentum

    for i in range(STEPS + 1):
        train = i < STEPS
        y_ref, gx_ref, bn = _torch_step(bn, xs[i], grads[i], train=train)
        y, stats, gx, gp = _jaxbn_step(xs[i], grads[i], params, stats, train=train,
                                       momentum=momentum, epsilon=eps)
        _close(f"step {i} y", y, y_ref)
        _close(f"step {i} grad x", gx, gx_ref)
        if affine:
            _close(f"step {i} grad weight", gp.scale, bn.weight.grad.numpy())
            _close(f"step {i} grad bias", gp.bias, bn.bias.grad.numpy())
        else:
            assert gp is None and bn.weight is None
        if track:
            assert int(stats.count) == int(bn.num_batches_tracked) == min(i + 1, STEPS)
            _close(f"step {i} running mean", stats.mean, bn.running_mean.numpy())
            _close(f"step {i} running var", stats.var, bn.running_var.numpy())
        else:
            assert stats is None and bn.running_mean is None
