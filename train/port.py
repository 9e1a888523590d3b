"""The seed's PyTorch LeNet, and conversion of its weights to and from :class:`train.model.LeNet`.

The seed's model is an ``nn.Sequential`` pair; its ``state_dict`` keys map onto our Flax
variables like this:

* ``conv.0.*``, ``conv.4.*`` -> ``params/conv1``, ``params/conv2``: ``weight`` ``(O, I, H, W)``
  becomes ``kernel`` ``(H, W, I, O)``; ``bias`` as is.
* ``conv.2.*``, ``conv.6.*`` -> ``bn1``, ``bn2`` through :func:`jaxbn.interop.from_torch`:
  ``weight``/``bias`` are ``params/bnX/scale``/``bias``, ``running_mean``/``running_var``
  are ``batch_stats/bnX/mean``/``var``, and ``num_batches_tracked`` is optionally
  ``batch_stats/bnX/count`` (int32).
* ``dense.0.*``, ``dense.2.*`` -> ``params/fc1``, ``params/fc2``: ``weight`` ``(out, in)``
  becomes ``kernel`` ``(in, out)`` (for ``fc1`` with its rows reordered, below).

``fc1`` reads the flattened output of the second stage. PyTorch flattens ``(C, H, W) =
(50, 4, 4)``, so its input index is ``c * 16 + h * 4 + w``; we flatten NHWC ``(4, 4, 50)``,
index ``h * 200 + w * 50 + c``. The rows of ``fc1``'s kernel are permuted accordingly.

PyTorch trains BN with the unbiased variance in its running statistics; to reproduce a
PyTorch training step exactly, build the model as
``LeNet(bn_kwargs={'unbiased_running_var': True})`` (``momentum=0.9`` and ``epsilon=1e-5``,
the defaults, are PyTorch's ``momentum=0.1`` and ``eps=1e-5``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbn import BatchNormParams, BatchStats, interop

__all__ = ["from_torch_state_dict", "to_torch_state_dict", "torch_lenet"]

#: Feature map entering ``fc1``: (H, W, C).
_FC1_INPUT = (4, 4, 50)
#: (flax conv, PyTorch index), (flax BN, PyTorch index), (flax dense, PyTorch index).
_CONVS = (("conv1", "conv.0"), ("conv2", "conv.4"))
_BNS = (("bn1", "conv.2"), ("bn2", "conv.6"))
_DENSES = (("fc1", "dense.0"), ("fc2", "dense.2"))


def torch_lenet(num_classes: int = 10) -> Any:
    """Builds the seed's PyTorch LeNet (imports torch).

    ``Conv(1->20, 5) -> MaxPool 2 -> BN(20) -> ReLU -> Conv(20->50, 5) -> MaxPool 2 -> BN(50)
    -> ReLU -> flatten -> Linear(800, 500) -> ReLU -> Linear(500, num_classes)``, NCHW input
    ``(B, 1, 28, 28)``.

    Args:
        num_classes: number of logits.

    Returns:
        A freshly initialized ``torch.nn.Module``.
    """
    import torch
    from torch import nn

    class LeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 20, kernel_size=5), nn.MaxPool2d(2), nn.BatchNorm2d(20), nn.ReLU(),
                nn.Conv2d(20, 50, kernel_size=5), nn.MaxPool2d(2), nn.BatchNorm2d(50), nn.ReLU(),
            )
            self.dense = nn.Sequential(
                nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, num_classes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            x = torch.flatten(x, start_dim=1)
            return self.dense(x)

    return LeNet()


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor (duck-typed: torch is not imported) or array as a NumPy array."""
    if all(hasattr(value, m) for m in ("detach", "cpu", "numpy")):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


def _expected_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "conv.0.weight": (20, 1, 5, 5), "conv.0.bias": (20,),
        "conv.4.weight": (50, 20, 5, 5), "conv.4.bias": (50,),
        "dense.0.weight": (500, 800), "dense.0.bias": (500,),
        "dense.2.weight": (num_classes, 500), "dense.2.bias": (num_classes,),
    }
    for prefix, c in (("conv.2.", 20), ("conv.6.", 50)):
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[prefix + k] = (c,)
        shapes[prefix + "num_batches_tracked"] = ()
    return shapes


def from_torch_state_dict(
    state_dict: Mapping[str, Any], *, keep_count: bool = False
) -> dict[str, dict[str, Any]]:
    """Converts the seed LeNet's ``state_dict`` into variables of :class:`train.model.LeNet`.

    Args:
        state_dict: the PyTorch model's ``state_dict()`` (torch tensors or NumPy arrays).
        keep_count: also store each BN's ``num_batches_tracked`` as ``batch_stats/bnX/count``
            (int32). A ``LeNet(momentum=None)`` (cumulative average) needs it; with a float
            momentum the model ignores it (it does not advance it either). Without it,
            :func:`to_torch_state_dict` needs ``num_batches_tracked`` for an exact round trip.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` for ``LeNet(norm='jaxbn' or 'flax')``, float
        arrays in the state_dict's dtype.

    Raises:
        ValueError: if keys are missing or unexpected, or a shape is not the seed's.
    """
    sd = {k: _numpy(v) for k, v in state_dict.items()}
    if "dense.2.weight" not in sd:
        raise ValueError(
            f"expected the seed LeNet's state_dict with key 'dense.2.weight', got keys "
            f"{sorted(sd)}."
        )
    expected = _expected_shapes(sd["dense.2.weight"].shape[0])
    missing = sorted(set(expected) - set(sd) - {"conv.2.num_batches_tracked",
                                                 "conv.6.num_batches_tracked"})
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match the seed LeNet: missing keys {missing}, unexpected "
            f"keys {unexpected} (expected {sorted(expected)})."
        )
    for k, v in sd.items():
        if v.shape != expected[k] and not (v.size == 1 and expected[k] == ()):
            raise ValueError(f"{k}: expected shape {expected[k]}, got {v.shape}.")

    params: dict[str, Any] = {}
    batch_stats: dict[str, Any] = {}
    for name, key in _CONVS:
        params[name] = {
            "kernel": jnp.asarray(sd[key + ".weight"].transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            "bias": jnp.asarray(sd[key + ".bias"]),
        }
    for name, key in _BNS:
        p, s = interop.from_torch(sd, prefix=key + ".")
        params[name] = {"scale": p.scale, "bias": p.bias}
        batch_stats[name] = {"mean": s.mean, "var": s.var}
        if keep_count:
            batch_stats[name]["count"] = s.count
    w1 = sd["dense.0.weight"]  # (500, 800), columns in (C, H, W) order.
    h, w, c = _FC1_INPUT
    params["fc1"] = {
        "kernel": jnp.asarray(w1.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)),
        "bias": jnp.asarray(sd["dense.0.bias"]),
    }
    params["fc2"] = {
        "kernel": jnp.asarray(sd["dense.2.weight"].T),
        "bias": jnp.asarray(sd["dense.2.bias"]),
    }
    return {"params": params, "batch_stats": batch_stats}


def _get(tree: Mapping[str, Any], *path: str) -> np.ndarray:
    node: Any = tree
    for i, p in enumerate(path):
        if not isinstance(node, Mapping) or p not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(
                f"variables lack {'/'.join(path[: i + 1])}: expected the variables of "
                f"train.model.LeNet with BatchNorm (norm='jaxbn' or 'flax'), found {have}."
            )
        node = node[p]
    return np.asarray(node)


def to_torch_state_dict(
    variables: Mapping[str, Any], *, num_batches_tracked: int | Mapping[str, int] = 0
) -> dict[str, np.ndarray]:
    """Converts :class:`train.model.LeNet` variables into the seed LeNet's ``state_dict``.

    The inverse of :func:`from_torch_state_dict`, bit for bit. Load the result with
    ``model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})``.

    Args:
        variables: ``{'params': ..., 'batch_stats': ...}`` of a LeNet with BatchNorm.
        num_batches_tracked: PyTorch's update counter for BN layers whose ``batch_stats``
            have no ``count``: one int for both, or ``{'bn1': n1, 'bn2': n2}``.

    Returns:
        A dict of NumPy arrays with the seed LeNet's keys, in PyTorch's order.

    Raises:
        ValueError: if a variable is missing.
    """
    params, batch_stats = variables.get("params", {}), variables.get("batch_stats", {})
    sd: dict[str, np.ndarray] = {}
    convs, bns = dict(_CONVS), dict(_BNS)
    for name in ("conv1", "bn1", "conv2", "bn2"):
        if name in convs:
            key = convs[name]
            sd[key + ".weight"] = _get(params, name, "kernel").transpose(3, 2, 0, 1)
            sd[key + ".bias"] = _get(params, name, "bias")
            continue
        stats = batch_stats.get(name, {})
        if "count" in stats:
            count = stats["count"]
        elif isinstance(num_batches_tracked, Mapping):
            count = num_batches_tracked[name]
        else:
            count = num_batches_tracked
        sd.update(interop.to_torch(
            BatchNormParams(_get(params, name, "scale"), _get(params, name, "bias")),
            BatchStats(_get(batch_stats, name, "mean"), _get(batch_stats, name, "var"),
                               np.asarray(count)),
            prefix=bns[name] + ".",
        ))
    h, w, c = _FC1_INPUT
    k1 = _get(params, "fc1", "kernel")  # (800, 500), rows in (H, W, C) order.
    sd["dense.0.weight"] = k1.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, h * w * c)
    sd["dense.0.bias"] = _get(params, "fc1", "bias")
    sd["dense.2.weight"] = _get(params, "fc2", "kernel").T
    sd["dense.2.bias"] = _get(params, "fc2", "bias")
    return {k: np.array(v, order="C") for k, v in sd.items()}
