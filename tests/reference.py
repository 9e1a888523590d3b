"""A float64 NumPy reference of Batch Normalization, written for clarity, not speed."""

from __future__ import annotations

import numpy as np


def _axes(ndim, axis):
    feats = tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    return feats, tuple(a for a in range(ndim) if a not in feats)


def moments(x, axis=-1, mask=None):
    """Mean, biased variance and count over every axis but ``axis`` (valid elements only)."""
    x = np.asarray(x, np.float64)
    feats, red = _axes(x.ndim, axis)
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    n = keep.sum(axis=red)
    xs = np.where(keep, x, 0.0)
    mean = xs.sum(axis=red) / np.maximum(n, 1)
    dev = np.where(keep, x - np.expand_dims(mean, red), 0.0)
    var = (dev**2).sum(axis=red) / np.maximum(n, 1)
    return mean, var, n


def forward(x, scale, bias, mean, var, axis=-1, epsilon=1e-5):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` in float64."""
    x = np.asarray(x, np.float64)
    feats, red = _axes(x.ndim, axis)

    def e(v):
        return np.expand_dims(np.asarray(v, np.float64), red)

    return (x - e(mean)) / np.sqrt(e(var) + epsilon) * e(scale) + e(bias)


def train_forward(x, scale, bias, axis=-1, epsilon=1e-5, mask=None):
    mean, var, n = moments(x, axis, mask)
    return forward(x, scale, bias, mean, var, axis, epsilon), (mean, var, n)


def train_backward(x, scale, g, axis=-1, epsilon=1e-5, mask=None):
    """Closed-form gradients of training-mode BN w.r.t. ``x``, ``scale``, ``bias``.

    Masked elements do not enter the statistics, so only valid elements carry the
    statistics' terms; but every output, masked or not, depends on the statistics, so the
    sums in those terms run over all elements (divided by the valid count).
    """
    x = np.asarray(x, np.float64)
    g = np.asarray(g, np.float64)
    feats, red = _axes(x.ndim, axis)
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    mean, var, n = moments(x, axis, mask)
    inv = 1.0 / np.sqrt(var + epsilon)
    xhat = (x - np.expand_dims(mean, red)) * np.expand_dims(inv, red)
    gs = g * np.expand_dims(np.asarray(scale, np.float64), red)
    nn = np.maximum(n, 1)
    mg = gs.sum(axis=red) / nn
    mgx = (gs * xhat).sum(axis=red) / nn
    corr = np.expand_dims(mg, red) + xhat * np.expand_dims(mgx, red)
    dx = np.expand_dims(inv, red) * (gs - np.where(keep, corr, 0))
    return dx, (g * xhat).sum(axis=red), g.sum(axis=red)


def ema(old, new, momentum, count=None):
    """flax's running average; ``momentum=None`` is PyTorch's cumulative average."""
    if momentum is None:
        w = 1.0 / (count + 1)
        return (1 - w) * old + w * new
    return momentum * old + (1 - momentum) * new
