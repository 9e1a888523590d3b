"""Export a trained LeNet as a BatchNorm-free inference model.

``python -m train.export --workdir W --out model.npz`` restores the latest orbax checkpoint
under ``W/checkpoints``, folds every BatchNorm into a neighbouring linear layer, and writes
``model.npz`` (the arrays) and ``model.json`` (the architecture). :func:`load_folded` reads
them back and :func:`folded_apply` runs them with nothing but ``jax.numpy``/``lax``.

How each BatchNorm is folded (``a = scale / sqrt(var + eps)``, ``b = bias - mean * a``, see
:func:`jaxbn.fold`):

* ``bn_position='before_relu'`` (the seed's ``conv -> max_pool -> BN -> act``): into the
  convolution *before* the pool. Max-pooling commutes with ``z * a + b`` only where
  ``a >= 0`` (for ``a < 0`` it would turn into a min-pool), so a stage is folded only when
  every channel has ``a >= 0``; otherwise that stage keeps BN as a precomputed per-channel
  affine ``y * a + b`` after the pool (``affine1``/``affine2`` in the arrays) — still exact,
  just one multiply-add that is not absorbed.
* ``bn_position='after_relu'`` (``conv -> max_pool -> act -> BN``): into the layer *after* it
  (``conv2``, which is unpadded, or ``fc1`` through the NHWC flatten), exact for any sign.
* ``norm='none'``: nothing to fold.

The network's options (``norm``, ``bn_position``, ``activation``, ``epsilon``) come from the
checkpoint's recorded config; a flag that contradicts them is refused with one ``error:`` line
and exit status 2 (it would export another network). Exit status 1: no intact checkpoint
(or none at ``--step``), or the output cannot be written; 0: written.

The training program standardizes its inputs, ``(pixels / 255 - mean) / std``; that affine
map is folded into ``conv1`` as well (exact: ``conv1`` is unpadded), so the exported model
takes plain ``pixels / 255`` in ``[0, 1]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import BatchNormParams, BatchStats, fold, interop
from train import data
from train.checkpoints import PRECISE, read_checkpoint
from train.config import OneLineErrorParser
from train.errors import ConfigError, os_error_cause
from train.model import ACTIVATIONS, BN_POSITIONS, NORMS, LeNet

__all__ = [
    "EXIT_BAD_OPTION",
    "EXIT_FAILED",
    "FORMAT",
    "export_folded",
    "folded_apply",
    "load_checkpoint",
    "load_folded",
    "main",
    "save_folded",
]

#: Written into the architecture JSON; :func:`load_folded` checks it.
FORMAT = "jaxbn-folded-lenet-v1"
#: Exit statuses of ``python -m train.export`` besides 0: no intact checkpoint (or none at
#: ``--step``), or the output cannot be written; a flag that contradicts the checkpoint.
EXIT_FAILED, EXIT_BAD_OPTION = 1, 2
_STAGES = (("conv1", "bn1", "affine1"), ("conv2", "bn2", "affine2"))


# ----------------------------------------------------------------------------------------
# The folded model.


def folded_apply(folded: Mapping[str, Any], x: jax.typing.ArrayLike, *,
                 activation: str = "relu") -> jax.Array:
    """Runs a folded LeNet: two ``conv -> max_pool -> [affine] -> act`` stages, two dense.

    Args:
        folded: arrays from :func:`export_folded` or :func:`load_folded`: ``conv1``, ``conv2``,
            ``fc1``, ``fc2`` (each ``{'kernel', 'bias'}``), and optionally ``affine1``/``affine2``
            (each ``{'scale', 'shift'}``) for stages whose BN could not be folded.
        x: ``(B, 28, 28, 1)`` float images, preprocessed as for the trained model.
        activation: ``'relu'``, ``'sigmoid'`` or ``'tanh'``, as the trained model.

    Returns:
        ``(B, num_classes)`` logits.
    """
    act = ACTIVATIONS[activation]
    x = jnp.asarray(x)
    for conv, _, affine in _STAGES:
        x = lax.conv_general_dilated(x, folded[conv]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = x + folded[conv]["bias"]
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        if affine in folded:
            x = x * folded[affine]["scale"] + folded[affine]["shift"]
        x = act(x)
    x = x.reshape(x.shape[0], -1)
    x = act(x @ folded["fc1"]["kernel"] + folded["fc1"]["bias"])
    return x @ folded["fc2"]["kernel"] + folded["fc2"]["bias"]


def _bn_state(variables: Mapping[str, Any], name: str) -> tuple[BatchNormParams, BatchStats]:
    params = variables["params"].get(name, {})
    try:
        stats = variables["batch_stats"][name]
        mean, var = jnp.asarray(stats["mean"]), jnp.asarray(stats["var"])
    except KeyError:
        raise ValueError(
            f"variables lack batch_stats/{name}/mean and var: expected the variables of a "
            f"LeNet with BatchNorm (or pass model_kwargs with norm='none')."
        ) from None
    scale = jnp.asarray(params["scale"]) if "scale" in params else jnp.ones_like(mean)
    bias = jnp.asarray(params["bias"]) if "bias" in params else jnp.zeros_like(mean)
    return BatchNormParams(scale, bias), BatchStats(mean, var, jnp.zeros((), jnp.int32))


def _layer(params: Mapping[str, Any], name: str) -> dict[str, jax.Array]:
    try:
        return {"kernel": jnp.asarray(params[name]["kernel"]),
                "bias": jnp.asarray(params[name]["bias"])}
    except KeyError:
        raise ValueError(
            f"variables lack params/{name}/kernel or bias: expected train.model.LeNet's "
            f"variables (conv1, conv2, fc1, fc2, with biases); got params {sorted(params)}."
        ) from None


def export_folded(
    variables: Mapping[str, Any],
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    input_mean: float = 0.0,
    input_std: float = 1.0,
) -> tuple[dict[str, Any], Callable[[Any, jax.typing.ArrayLike], jax.Array]]:
    """Folds a LeNet's BatchNorm layers (and its input standardization) away for inference.

    Args:
        variables: ``{'params': ..., 'batch_stats': ...}`` of :class:`train.model.LeNet`.
        model_kwargs: the LeNet's constructor arguments; ``norm``, ``bn_position``,
            ``activation`` and ``epsilon`` matter (defaults as in LeNet). Other keys are ignored.
        input_mean: the model was trained on ``(x - input_mean) / input_std``; the folded
            model takes ``x`` itself.
        input_std: see ``input_mean``; > 0.

    Returns:
        ``(folded, apply_fn)``: the arrays (see :func:`folded_apply`) and
        ``apply_fn(folded, x)``, which equals ``LeNet(**model_kwargs).apply(variables,
        (x - input_mean) / input_std, train=False)`` up to float32 rounding.

    Raises:
        ValueError: for variables that do not fit the model, or an unknown option.
    """
    kw = dict(model_kwargs or {})
    norm = kw.get("norm", "jaxbn")
    position = kw.get("bn_position", "before_relu")
    activation = kw.get("activation", "relu")
    epsilon = float(kw.get("epsilon", 1e-5))
    for field, value, choices in (("norm", norm, NORMS), ("bn_position", position, BN_POSITIONS),
                                  ("activation", activation, tuple(ACTIVATIONS))):
        if value not in choices:
            raise ValueError(f"model_kwargs[{field!r}]: expected one of {choices}, got "
                             f"{value!r}.")
    if not float(input_std) > 0:
        raise ValueError(f"input_std: expected a value > 0, got {input_std!r}.")
    params = variables["params"]
    folded: dict[str, Any] = {name: _layer(params, name)
                              for name in ("conv1", "conv2", "fc1", "fc2")}
    if (input_mean, input_std) != (0.0, 1.0):
        # conv1((x - m) / s) = conv1'(x): kernel / s, bias - m / s * sum(kernel) (VALID conv).
        k, b = folded["conv1"]["kernel"], folded["conv1"]["bias"]
        shift = jnp.sum(k, axis=(0, 1, 2), dtype=jnp.float32) * (input_mean / input_std)
        folded["conv1"] = {"kernel": (k / input_std).astype(k.dtype),
                           "bias": (b - shift).astype(b.dtype)}
    if norm != "none":
        (_, bn1, _), (conv2, bn2, _) = _STAGES
        if position == "before_relu":
            for conv, bn, affine in _STAGES:
                p, s = _bn_state(variables, bn)
                if interop.commutes_with_max_pool(p, s, epsilon=epsilon):
                    k, b = interop.fold_into_conv(folded[conv]["kernel"], folded[conv]["bias"],
                                                  p, s, epsilon=epsilon, through_max_pool=True)
                    folded[conv] = {"kernel": k, "bias": b}
                else:
                    a, b = fold(p, s, epsilon=epsilon)
                    folded[affine] = {"scale": a, "shift": b}
        else:
            for bn, nxt, fold_fn in ((bn1, conv2, interop.fold_into_next_conv),
                                     (bn2, "fc1", interop.fold_into_next_dense)):
                p, s = _bn_state(variables, bn)
                k, b = fold_fn(folded[nxt]["kernel"], folded[nxt]["bias"], p, s,
                               epsilon=epsilon)
                folded[nxt] = {"kernel": k, "bias": b}
    return folded, functools.partial(folded_apply, activation=activation)


# ----------------------------------------------------------------------------------------
# Files.


def _architecture(folded: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                  input_note: str) -> dict:
    activation = model_kwargs.get("activation", "relu")
    layers = []
    for conv, _, affine in _STAGES:
        k = folded[conv]["kernel"]
        layers.append(f"{conv}: conv {k.shape[0]}x{k.shape[1]} VALID, {k.shape[2]}->{k.shape[3]}")
        layers.append("max_pool 2x2 stride 2")
        if affine in folded:
            layers.append(f"{affine}: y * scale + shift (BN kept: a scale < 0 blocks folding)")
        layers.append(activation)
    layers += ["flatten NHWC", "fc1: dense", activation, "fc2: dense"]
    return {
        "format": FORMAT,
        "activation": activation,
        "input_shape": [28, 28, 1],
        "input": input_note,
        "num_classes": int(folded["fc2"]["kernel"].shape[1]),
        "layers": layers,
        "folded_from": {k: v for k, v in model_kwargs.items()
                        if isinstance(v, str | int | float | bool | None)},
    }


def save_folded(path: str | Path, folded: Mapping[str, Any],
                model_kwargs: Mapping[str, Any] | None = None, *,
                input_note: str = "float32 NHWC images, as the trained model's input"
                ) -> tuple[Path, Path]:
    """Writes ``path`` (``.npz``, keys like ``conv1/kernel``) and the same name ``.json``.

    Args:
        path: the ``.npz`` to write; the architecture goes to the same name with ``.json``.
        folded: arrays from :func:`export_folded`.
        model_kwargs: the LeNet options, recorded in the JSON.
        input_note: what the model expects as input, recorded in the JSON.

    Returns:
        The two paths written.
    """
    npz = Path(path).with_suffix(".npz")
    meta = npz.with_suffix(".json")
    npz.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{layer}/{name}": np.asarray(v)
              for layer, d in folded.items() for name, v in d.items()}
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    arch = _architecture(folded, dict(model_kwargs or {}), input_note)
    meta.write_text(json.dumps(arch, indent=2) + "\n")
    return npz, meta


def load_folded(path: str | Path) -> tuple[dict[str, Any], Callable[..., jax.Array]]:
    """Reads what :func:`save_folded` wrote: ``(folded, apply_fn)`` as from export_folded.

    Raises:
        ValueError: if the JSON is not of this format.
    """
    npz = Path(path).with_suffix(".npz")
    meta = json.loads(npz.with_suffix(".json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{npz.with_suffix('.json')}: expected format {FORMAT!r}, got "
                         f"{meta.get('format')!r}.")
    folded: dict[str, Any] = {}
    with np.load(npz) as arrays:
        for key in arrays.files:
            layer, name = key.split("/")
            folded.setdefault(layer, {})[name] = jnp.asarray(arrays[key])
    return folded, functools.partial(folded_apply, activation=meta["activation"])


def _find_variables(tree: Any) -> dict[str, Any] | None:
    """The first mapping in ``tree`` holding ``params`` (and ``batch_stats`` if any)."""
    if not isinstance(tree, Mapping):
        return None
    if "params" in tree and isinstance(tree["params"], Mapping):
        return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
    for v in tree.values():
        found = _find_variables(v)
        if found is not None:
            return found
    return None


def load_checkpoint(
    workdir: str | Path, step: int | None = None, *, running_stats: bool = False
) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """Restores LeNet variables from the orbax checkpoints under ``workdir/checkpoints``.

    ``python -m train.lenet`` saves a composite item: ``state`` (``{'state': TrainState as a
    dict, 'rng': ...}``, and with ``--precise-bn`` PreciseBN's statistics,
    ``precise_batch_stats``) and ``meta`` (JSON with the run's ``config``). The loader does
    not insist on that layout: it takes the first mapping with ``params`` (and
    ``batch_stats``) anywhere in the restored tree
    (:func:`train.checkpoints.read_checkpoint`), and ``meta`` when there is one. Where the
    checkpoint has PreciseBN's statistics, they replace the running averages.

    Args:
        workdir: The training run's directory.
        step: The step to restore; default the latest.
        running_stats: Keep the running averages even where PreciseBN's statistics exist.

    Returns:
        ``(variables, step, meta)``, ``meta`` empty when the checkpoint has none.

    Raises:
        ValueError: No checkpoint, a damaged one, or none with ``params`` in it.
    """
    step, items = read_checkpoint(workdir, step)
    meta = items.pop("meta", {})
    variables = _find_variables(items)
    if variables is None:
        raise ValueError(
            f"checkpoint {Path(workdir).absolute() / 'checkpoints' / str(step)} holds no "
            f"'params': expected LeNet variables ({{'params': ..., 'batch_stats': ...}}), got "
            f"top-level keys {sorted(items)}."
        )
    precise = items.get("state", {}).get(PRECISE) if isinstance(items.get("state"),
                                                                  Mapping) else None
    if precise and not running_stats:
        variables["batch_stats"] = precise
    return variables, step, dict(meta or {})


# ----------------------------------------------------------------------------------------
# Command line.


#: Options of :class:`train.config.Config` that are LeNet options, with LeNet's names.
_CONFIG_TO_MODEL = {"norm": "norm", "bn_position": "bn_position", "activation": "activation",
                    "bn_momentum": "momentum", "conv": "conv"}


def _model_kwargs(meta: Mapping[str, Any], args: argparse.Namespace,
                  variables: Mapping[str, Any]) -> dict[str, Any]:
    """LeNet options: the checkpoint's ``meta['config']``, where the flags may only agree.

    The options that describe the network (``norm``, ``bn_position``, ``activation``,
    ``epsilon``) come from the checkpoint when it records them (``python -m train.lenet``
    always trains with LeNet's ``epsilon``); a flag that contradicts them would export a
    different network, so it is refused. Without a recorded config the flags fill in, but
    ``--norm none`` is still refused for variables that hold BatchNorm statistics.

    Raises:
        ConfigError: A flag contradicts the checkpoint.
    """
    config = meta.get("config", {}) if isinstance(meta, Mapping) else {}
    kwargs = {dst: config[src] for src, dst in _CONFIG_TO_MODEL.items() if src in config}
    recorded = dict(kwargs)
    if "norm" in config:  # A train.lenet checkpoint: its BN epsilon is LeNet's default.
        recorded.setdefault("epsilon", LeNet.epsilon)
    for name in ("norm", "bn_position", "activation", "epsilon"):
        flag = getattr(args, name)
        if flag is None:
            continue
        if name in recorded and recorded[name] != flag:
            raise ConfigError(
                f"--{name.replace('_', '-')} {flag}: the checkpoint's network has "
                f"{name}={recorded[name]!r}, and exporting it as another network would "
                f"change its outputs; drop the flag (the checkpoint's options are used)"
            )
        kwargs[name] = flag
    if kwargs.get("norm") == "none" and variables.get("batch_stats"):
        raise ConfigError(
            "--norm none: the checkpoint's network has BatchNorm (its variables hold "
            f"batch_stats {sorted(variables['batch_stats'])}); drop the flag"
        )
    return kwargs


def _input_stats(meta: Mapping[str, Any], args: argparse.Namespace) -> tuple[float, float]:
    """The training program's input standardization ``(mean, std)`` of ``pixels / 255``."""
    if args.input_mean is not None or args.input_std is not None:
        return (0.0 if args.input_mean is None else args.input_mean,
                1.0 if args.input_std is None else args.input_std)
    config = meta.get("config", {}) if isinstance(meta, Mapping) else {}
    if "dataset" not in config:
        return 0.0, 1.0  # Not a train.lenet checkpoint: no standardization known.
    return data.pixel_stats(config["dataset"], config.get("data_dir"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.export --workdir W --out PATH``; returns the exit status."""
    parser = OneLineErrorParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--out", required=True, help="output .npz (a .json goes beside it)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--norm", choices=NORMS, default=None,
                        help="for a checkpoint without a recorded config; must agree with one")
    parser.add_argument("--bn-position", choices=BN_POSITIONS, default=None,
                        help="for a checkpoint without a recorded config; must agree with one")
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default=None,
                        help="for a checkpoint without a recorded config; must agree with one")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="BN epsilon (1e-5); must agree with the checkpoint's")
    parser.add_argument("--running-stats", action="store_true",
                        help="fold BN's running averages even where the checkpoint has "
                             "PreciseBN's statistics (train.lenet --precise-bn)")
    parser.add_argument("--input-mean", type=float, default=None,
                        help="training input standardization (default: the dataset's)")
    parser.add_argument("--input-std", type=float, default=None,
                        help="training input standardization (default: the dataset's)")
    args = parser.parse_args(argv)
    try:
        variables, step, meta = load_checkpoint(args.workdir, args.step,
                                                running_stats=args.running_stats)
        kwargs = _model_kwargs(meta, args, variables)
        mean, std = _input_stats(meta, args)
        folded, apply_fn = export_folded(variables, kwargs, input_mean=mean, input_std=std)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_OPTION
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    note = ("float32 NHWC images, pixels / 255 in [0, 1] (the training standardization "
            f"(x - {mean:g}) / {std:g} is folded into conv1)" if (mean, std) != (0.0, 1.0)
            else "float32 NHWC images, as the trained model's input")
    try:
        npz, path = save_folded(args.out, folded, kwargs, input_note=note)
    except OSError as e:
        cause = os_error_cause(e) or str(e)
        if isinstance(e, FileExistsError):  # mkdir met a file where a directory must be.
            cause = f"{e.filename} is not a directory"
        print(f"error: cannot write {Path(args.out).with_suffix('.npz')}: {cause}",
              file=sys.stderr)
        return EXIT_FAILED
    # Check against the unfolded model. Both conv implementations share the variables, and
    # inference never synchronizes, so the plain flax conv and no axis name will do.
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (64, 28, 28, 1)), jnp.float32)
    model = LeNet(**{**kwargs, "conv": "flax", "axis_name": None},
                  num_classes=int(folded["fc2"]["kernel"].shape[1]))
    ref = model.apply(variables, (x - mean) / std, train=False)
    diff = float(jnp.max(jnp.abs(apply_fn(folded, x) - ref)))
    kept = [k for k in folded if k.startswith("affine")]
    stats = ("PreciseBN's statistics" if meta.get(PRECISE) and not args.running_stats
             else "running averages")
    print(f"step {step}: wrote {npz} and {path}; BN ({stats}) "
          f"{'kept as a separate affine in ' + ', '.join(kept) if kept else 'fully folded'}; "
          f"max |folded - unfolded| logit difference on 64 random inputs: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
