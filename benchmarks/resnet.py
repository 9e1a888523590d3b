"""A BN-heavy model: one ResNet training step with flax's BatchNorm vs jaxbn's, and PyTorch's.

Run ``python -m benchmarks.resnet`` (``--quick`` for a smoke test on tiny sizes; ``--help``
for the flags). Models, in ``flax.linen``, NHWC:

* ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no pooling, four stages of two basic blocks,
  widths 64-128-256-512, strides 1-2-2-2, global average pool, 10 logits), 32x32x3 inputs,
  batch 64 by default;
* ``resnet50``: the bottleneck ResNet-50 (7x7/2 stem and 3x3/2 max-pool, stages of 3-4-6-3
  bottleneck blocks of widths 64-512 expanded 4x) at a small resolution, 64x64x3 inputs,
  batch 32 by default.

Every ``BatchNorm`` takes the same arguments in both variants (``use_running_average``,
``momentum=0.9``, ``epsilon=1e-5``, ``dtype``): ``flax`` is ``flax.linen.BatchNorm``,
``jaxbn`` is ``jaxbn.linen.BatchNorm`` -- the one-import swap a user makes (flax's default
variance is the fast one-pass formula, jaxbn's the stable two-pass one). ``float32`` runs
everything in float32; ``bfloat16`` computes in bfloat16 with float32 parameters
(``dtype=bfloat16``, ``param_dtype=float32`` on every layer, as usual in flax) and the loss
in float32.

The step is one jitted call with the state donated: forward in training mode,
cross-entropy, backward, ``optax.sgd(0.1, momentum=0.9)``, new BN statistics. For each model
and dtype the benchmark

* checks that the flax and jaxbn steps agree (the loss of the first step from the same
  parameters and batch);
* reports the compiled step's temporary memory (``.compile().memory_analysis()``'s
  ``temp_size_in_bytes``) for both, and the time it took (``compile_s``: lowering and
  compiling, both steps in one process, jaxbn's first: the second reuses what the first
  warmed, so the two are no comparison of compile times -- ``--compile-time`` is);
* times jaxbn against flax and against PyTorch's eager step on the same architecture in
  ``channels_last`` and NCHW memory formats (``torch.autocast`` to bfloat16 for ``bfloat16``;
  on CUDA when JAX runs on a GPU), interleaved and paired (:mod:`benchmarks.harness`):
  ``time ratio`` = jaxbn's time / the peer's, the median over rounds (and over processes with
  ``--processes``); ``images/s`` from the median step times; minor page faults per step.

The process first applies the training program's allocator settings
(:func:`train.runtime.tune_allocator`; ``--malloc default`` leaves glibc's): without them
every step page-faults its ~90k pages of temporaries in again. Thread settings, the load
guard and the machine's name come from :mod:`benchmarks.harness`;
a result measured while another process competed for the CPU is marked ``reliable: false``.
Results are printed as a table (and as docs/performance.md's Markdown table) and written as JSON
(``benchmarks/results/resnet.json`` or ``--json PATH``); ``--show A.json B.json`` prints the
tables of saved results, e.g. of one run per model.

``--compile-time`` measures compile times instead, for ``--models`` and ``--dtypes``:
:mod:`benchmarks.compile_time` (each step compiled in fresh processes, in both orders, the
backend set up first, trace, lowering and XLA compile timed apart, plus a warm compile).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "resnet.json"
MODELS = ("resnet18", "resnet50")
DTYPES = ("float32", "bfloat16")
NUM_CLASSES = 10
BN_MOMENTUM = 0.9  # flax convention; PyTorch's momentum=0.1
BN_EPSILON = 1e-5
LR = 0.1
SGD_MOMENTUM = 0.9


#: name -> (block kind, blocks per stage, stem, input size, default batch)
SPECS: dict[str, tuple[str, tuple[int, ...], str, int, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), "cifar", 32, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "imagenet", 64, 32),
}
#: --quick: the same architectures, narrow (base width 8), one block per stage, 16x16, batch 8.
QUICK = {"width": 8, "blocks": 1, "size": 16, "batch": 8}


# ----------------------------------------------------------------------------------------
# Flax models.


def flax_resnet(name: str, *, norm: str, dtype: Any, width: int = 64,
                blocks: int | None = None) -> Any:
    """The ``flax.linen`` ResNet ``name`` with ``norm`` = ``'flax'`` or ``'jaxbn'`` BatchNorm.

    Args:
        name: ``'resnet18'`` or ``'resnet50'``.
        norm: which BatchNorm class every normalization layer uses.
        dtype: computation dtype (parameters are float32).
        width: channels of the first stage (64 in the standard models).
        blocks: blocks per stage, or ``None`` for the standard counts.

    Returns:
        An ``nn.Module`` called as ``model(x, train=...)`` on NHWC ``x``.

    Raises:
        ValueError: on an unknown ``name`` or ``norm``.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    import jaxbn.linen

    if name not in SPECS:
        raise ValueError(f"model: expected one of {sorted(SPECS)}, got {name!r}")
    if norm in FUSED:
        return fused_resnet(name, activation=FUSED[norm], dtype=dtype, width=width,
                            blocks=blocks)
    norms = {"flax": nn.BatchNorm, "jaxbn": jaxbn.linen.BatchNorm}
    if norm not in norms:
        raise ValueError(f"norm: expected one of {sorted(norms)}, got {norm!r}")
    kind, stage_blocks, stem, _, _ = SPECS[name]
    if blocks is not None:
        stage_blocks = (blocks,) * len(stage_blocks)
    bn_cls = norms[norm]

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                                     param_dtype=jnp.float32)
            bn = functools.partial(bn_cls, use_running_average=not train, momentum=BN_MOMENTUM,
                                   epsilon=BN_EPSILON, dtype=dtype)
            if stem == "cifar":
                x = nn.relu(bn()(conv(width, (3, 3), padding=((1, 1), (1, 1)))(x)))
            else:
                x = conv(width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)))(x)
                x = nn.relu(bn()(x))
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            for stage, n in enumerate(stage_blocks):
                features = width * 2**stage
                for i in range(n):
                    strides = 2 if stage > 0 and i == 0 else 1
                    x = _block(x, kind, features, strides, conv, bn)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(NUM_CLASSES, dtype=dtype, param_dtype=jnp.float32)(x)

    return ResNet()


def _block(x, kind: str, features: int, strides: int, conv: Callable, bn: Callable):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual block, PyTorch's layout."""
    import flax.linen as nn

    pad = ((1, 1), (1, 1))
    s = (strides, strides)
    if kind == "basic":
        out = features
        y = nn.relu(bn()(conv(features, (3, 3), strides=s, padding=pad)(x)))
        y = bn()(conv(features, (3, 3), padding=pad)(y))
    else:
        out = 4 * features
        y = nn.relu(bn()(conv(features, (1, 1))(x)))
        y = nn.relu(bn()(conv(features, (3, 3), strides=s, padding=pad)(y)))
        y = bn()(conv(out, (1, 1))(y))
    if strides != 1 or x.shape[-1] != out:
        x = bn()(conv(out, (1, 1), strides=s)(x))
    return nn.relu(y + x)


#: Fused BatchNorm choices of :func:`flax_resnet`: every BN -> ReLU, every BN -> + shortcut
#: -> ReLU, and the shortcut's BN as one ``jaxbn.linen.BatchNormAct`` with this activation.
#: ``fused`` is the same model as ``flax`` and ``jaxbn``; ``inplace`` is In-Place ABN's
#: (leaky ReLU, slope 0.01), which keeps only each layer's output for the backward pass.
FUSED = {"fused": "relu", "inplace": "leaky_relu"}


def fused_resnet(name: str, *, activation: str, dtype: Any, width: int = 64,
                 blocks: int | None = None) -> Any:
    """:func:`flax_resnet` with ``jaxbn.linen.BatchNormAct`` fusing BN, shortcut and activation.

    The same convolutions in the same order; each ``relu(bn(conv(x)))`` is
    ``BatchNormAct(activation)(conv(x))``, each block's ``relu(bn(conv(y)) + shortcut)`` is
    ``BatchNormAct(activation)(conv(y), shortcut)``, and a projection shortcut's BN is a
    ``BatchNormAct`` with ``activation="identity"``.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    import jaxbn.linen

    kind, stage_blocks, stem, _, _ = SPECS[name]
    if blocks is not None:
        stage_blocks = (blocks,) * len(stage_blocks)

    class FusedResNet(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                                     param_dtype=jnp.float32)
            bn = functools.partial(jaxbn.linen.BatchNormAct, use_running_average=not train,
                                   momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                                   activation=activation)
            if stem == "cifar":
                x = bn()(conv(width, (3, 3), padding=((1, 1), (1, 1)))(x))
            else:
                x = bn()(conv(width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)))(x))
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            for stage, n in enumerate(stage_blocks):
                features = width * 2**stage
                for i in range(n):
                    strides = 2 if stage > 0 and i == 0 else 1
                    x = _fused_block(x, kind, features, strides, conv, bn)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(NUM_CLASSES, dtype=dtype, param_dtype=jnp.float32)(x)

    return FusedResNet()


def _fused_block(x, kind: str, features: int, strides: int, conv: Callable, bn: Callable):
    """:func:`_block` with each BN and what follows it as one ``BatchNormAct``."""
    pad = ((1, 1), (1, 1))
    s = (strides, strides)
    if kind == "basic":
        out = features
        y = bn()(conv(features, (3, 3), strides=s, padding=pad)(x))
        y = conv(features, (3, 3), padding=pad)(y)
    else:
        out = 4 * features
        y = bn()(conv(features, (1, 1))(x))
        y = bn()(conv(features, (3, 3), strides=s, padding=pad)(y))
        y = conv(out, (1, 1))(y)
    if strides != 1 or x.shape[-1] != out:
        x = bn(activation="identity")(conv(out, (1, 1), strides=s)(x))
    return bn()(y, x)


def make_step(model: Any) -> tuple[Callable, Any]:
    """The donated, jitted training step of ``model`` and its optimizer.

    Returns:
        ``(step, tx)`` with ``step(params, batch_stats, opt_state, x, labels) -> (params,
        batch_stats, opt_state, loss)``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.sgd(LR, momentum=SGD_MOMENTUM)

    def step(params, batch_stats, opt_state, x, labels):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels).mean()
            return loss, upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2)), tx


def init_variables(model: Any, x: Any, seed: int = 0) -> dict[str, Any]:
    """He-normal kernels, unit BN scales, zero biases, fresh statistics, made with NumPy.

    ``model.init`` would do as well but XLA:CPU takes tens of seconds to compile its
    random-number code for a ResNet; the shapes come from ``jax.eval_shape`` instead.
    """
    import jax
    import numpy as np

    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x[:1])
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape).astype(s.dtype)
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(s.shape, fill, s.dtype)

    return jax.tree.map(jax.numpy.asarray, jax.tree_util.tree_map_with_path(leaf, shapes))


def _jax_runner(model: Any, x, labels, seed: int = 0) -> dict[str, Any]:
    """Compiles ``model``'s step; returns its runner, memory and first-step loss."""
    import jax

    step, tx = make_step(model)
    variables = init_variables(model, x, seed)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = jax.jit(tx.init)(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, stats, opt_state, x, labels).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    box = list(compiled(params, stats, opt_state, x, labels))
    first_loss = float(box[3])

    def run():
        box[:] = compiled(box[0], box[1], box[2], x, labels)
        box[3].block_until_ready()

    return {"run": run, "compile_s": compile_s, "first_loss": first_loss,
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}


# ----------------------------------------------------------------------------------------
# PyTorch, the same architectures.


def torch_resnet(torch: Any, name: str, *, width: int = 64, blocks: int | None = None) -> Any:
    """The PyTorch ResNet ``name`` (NCHW ``nn.Module``, BN ``momentum=0.1``, ``eps=1e-5``)."""
    nn = torch.nn
    kind, stage_blocks, stem, _, _ = SPECS[name]
    if blocks is not None:
        stage_blocks = (blocks,) * len(stage_blocks)

    def bn(c):
        return nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=1 - BN_MOMENTUM)

    class Block(nn.Module):
        def __init__(self, cin, features, strides):
            super().__init__()
            if kind == "basic":
                out = features
                self.body = nn.Sequential(
                    nn.Conv2d(cin, features, 3, strides, 1, bias=False), bn(features),
                    nn.ReLU(inplace=True), nn.Conv2d(features, features, 3, 1, 1, bias=False),
                    bn(features))
            else:
                out = 4 * features
                self.body = nn.Sequential(
                    nn.Conv2d(cin, features, 1, bias=False), bn(features), nn.ReLU(inplace=True),
                    nn.Conv2d(features, features, 3, strides, 1, bias=False), bn(features),
                    nn.ReLU(inplace=True), nn.Conv2d(features, out, 1, bias=False), bn(out))
            self.short = (nn.Sequential(nn.Conv2d(cin, out, 1, strides, bias=False), bn(out))
                          if strides != 1 or cin != out else nn.Identity())
            self.out = out

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    layers: list[Any]
    if stem == "cifar":
        layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), bn(width), nn.ReLU(inplace=True)]
    else:
        layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), bn(width), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage, n in enumerate(stage_blocks):
        for i in range(n):
            block = Block(cin, width * 2**stage, 2 if stage > 0 and i == 0 else 1)
            layers.append(block)
            cin = block.out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES)]
    return nn.Sequential(*layers)


def _torch_runner(torch: Any, device: str, name: str, fmt: str, dtype: str, x_np, labels_np,
                  width: int, blocks: int | None) -> Callable[[], None]:
    torch.manual_seed(0)
    memory_format = torch.channels_last if fmt == "cl" else torch.contiguous_format
    model = torch_resnet(torch, name, width=width, blocks=blocks).to(device).train()
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=SGD_MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.from_numpy(labels_np.astype("int64")).to(device)
    autocast = dtype == "bfloat16"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        sync()

    run()
    return run


# ----------------------------------------------------------------------------------------
# One configuration.


def run_config(name: str, dtype_name: str, args: argparse.Namespace, torch_mod: Any,
               torch_dev: str | None, guard: harness.LoadGuard) -> dict[str, Any]:
    """Checks, compiles, measures memory and times one model in one dtype."""
    import jax.numpy as jnp
    import numpy as np

    _, _, _, size, batch = SPECS[name]
    size, batch = args.size or size, args.batch or batch
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)
    labels_np = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
    dtype = jnp.dtype(dtype_name)
    rec: dict[str, Any] = {"model": name, "dtype": dtype_name, "batch": batch,
                           "input": [size, size, 3], "width": args.width,
                           "blocks": args.blocks or list(SPECS[name][1])}
    runners: dict[str, Callable[[], None]] = {}
    t0 = time.perf_counter()
    for norm in ("jaxbn", "flax"):
        model = flax_resnet(name, norm=norm, dtype=dtype, width=args.width, blocks=args.blocks)
        r = _jax_runner(model, x, labels)
        runners[norm] = r.pop("run")
        rec[norm] = r
    # Same parameters, same batch: the first losses differ only by float rounding (and flax's
    # one-pass variance); bfloat16 compute rounds activations to 8 bits of mantissa.
    tol = 1e-4 if dtype_name == "float32" else 3e-2
    a, b = rec["jaxbn"]["first_loss"], rec["flax"]["first_loss"]
    rec["losses_agree"] = bool(abs(a - b) <= tol * max(1.0, abs(b)))
    if not rec["losses_agree"]:
        print(f"  WARNING: {name} {dtype_name}: first-step losses differ: jaxbn {a} flax {b}",
              file=sys.stderr)
    rec["temp_ratio"] = rec["jaxbn"]["temp_bytes"] / max(rec["flax"]["temp_bytes"], 1)
    if torch_mod is not None:
        for fmt in ("cl", "nchw"):
            try:
                runners[f"torch_{fmt}"] = _torch_runner(torch_mod, torch_dev, name, fmt,
                                                        dtype_name, x_np, labels_np, args.width,
                                                        args.blocks)
            except RuntimeError as e:  # e.g. a dtype the device's kernels lack
                print(f"  torch_{fmt} {dtype_name}: unsupported ({e})", file=sys.stderr)
    rec["setup_s"] = round(time.perf_counter() - t0, 2)
    res = harness.interleaved(runners, "jaxbn", rounds=args.rounds, warmup=args.warmup,
                              sample_s=args.sample_ms / 1e3, max_inner=args.max_inner,
                              guard=guard, label=f"{name} {dtype_name}")
    rec.update(res.stats())
    rec["reliable"] = all(f <= guard.max_foreign_cores for f in res.foreign_cores)
    return rec


def _images_per_s(rec: dict[str, Any], impl: str) -> float | None:
    ms = rec["ms"].get(impl, {}).get("median")
    return rec["batch"] / ms * 1e3 if ms else None


def _torch_best(rec: dict[str, Any]) -> str | None:
    names = [k for k in ("torch_cl", "torch_nchw") if k in rec["ms"]]
    return min(names, key=lambda k: rec["ms"][k]["median"]) if names else None


def merge(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merges several processes' JSON: per record, medians over processes of the medians."""
    first = runs[0]
    out = {"meta": {**first["meta"], "processes": len(runs),
                    "reliable": all(r["meta"]["reliable"] for r in runs),
                    "guards": [r["meta"]["guard"] for r in runs]}, "results": []}
    out["meta"].pop("guard", None)
    for i, rec in enumerate(first["results"]):
        recs = [r["results"][i] for r in runs]
        m = {k: v for k, v in rec.items() if k not in ("ms", "ratio", "faults_per_call")}
        m["reliable"] = all(r["reliable"] for r in recs)
        for key in ("ms", "ratio", "faults_per_call"):
            m[key] = {}
            for impl in rec[key]:
                meds = [r[key][impl]["median"] for r in recs]
                m[key][impl] = {"median": statistics.median(meds), "per_process": meds,
                                "q1": min(r[key][impl]["q1"] for r in recs),
                                "q3": max(r[key][impl]["q3"] for r in recs)}
        out["results"].append(m)
    return out


def print_table(data: dict[str, Any], out=sys.stdout) -> None:
    """The results as one table."""
    meta = data["meta"]
    print(f"\n== ResNet training step on {harness.machine_name(meta['machine'])}; "
          f"{meta.get('processes', 1)} process(es); reliable={meta['reliable']}", file=out)
    print("   time ratio = jaxbn time / peer time (median of paired rounds); temp = compiled "
          "step's temporary MiB; img/s from median step times", file=out)
    head = (f"{'model':>9} {'dtype':>8} {'batch':>5} | {'jaxbn ms':>9} {'flax ms':>9} "
            f"{'t/flax':>6} [{'q1':>4},{'q3':>4}] | {'temp j':>7} {'temp f':>7} {'j/f':>5} | "
            f"{'img/s j':>8} {'torch':>9} {'img/s t':>8} {'t/torch':>7} | {'flt/step':>8} "
            f"{'ok':>3}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in data["results"]:
        tb = _torch_best(r)
        rj = r["ratio"].get("flax", {})
        rt = r["ratio"].get(tb, {}) if tb else {}
        print(f"{r['model']:>9} {r['dtype']:>8} {r['batch']:>5} | "
              f"{harness.fmt(r['ms']['jaxbn']['median'], '.1f', 9)} "
              f"{harness.fmt(r['ms']['flax']['median'], '.1f', 9)} "
              f"{harness.fmt(rj.get('median'), '.3f', 6)} "
              f"[{harness.fmt(rj.get('q1'), '.2f', 4)},{harness.fmt(rj.get('q3'), '.2f', 4)}] | "
              f"{harness.fmt(r['jaxbn']['temp_bytes'] / 2**20, '.1f', 7)} "
              f"{harness.fmt(r['flax']['temp_bytes'] / 2**20, '.1f', 7)} "
              f"{harness.fmt(r['temp_ratio'], '.2f', 5)} | "
              f"{harness.fmt(_images_per_s(r, 'jaxbn'), '.0f', 8)} {tb or '-':>9} "
              f"{harness.fmt(_images_per_s(r, tb) if tb else None, '.0f', 8)} "
              f"{harness.fmt(rt.get('median'), '.2f', 7)} | "
              f"{harness.fmt(r['faults_per_call']['jaxbn']['median'], '.0f', 8)} "
              f"{'yes' if r['reliable'] else 'NO':>3}", file=out)
    print("\nMarkdown:\n", file=out)
    print(markdown(data), file=out)


def markdown(data: dict[str, Any]) -> str:
    """The performance page's table: jaxbn vs flax time and temporary memory, PyTorch too."""
    head = ["model", "dtype", "batch", "jaxbn ms", "flax ms", "time jaxbn/flax [q1, q3]",
            "temp MiB jaxbn / flax", "temp ratio", "PyTorch best (ms)", "time jaxbn/PyTorch",
            "faults/step jaxbn", "load ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["results"]:
        tb = _torch_best(r)
        rj = r["ratio"].get("flax", {})
        rt = r["ratio"].get(tb, {}) if tb else {}
        torch_cell = f"{tb} ({r['ms'][tb]['median']:.0f})" if tb else "-"
        lines.append("| " + " | ".join([
            r["model"], r["dtype"], str(r["batch"]), f"{r['ms']['jaxbn']['median']:.0f}",
            f"{r['ms']['flax']['median']:.0f}",
            f"{harness.fmt(rj.get('median'), '.3f')} [{harness.fmt(rj.get('q1'), '.2f')}, "
            f"{harness.fmt(rj.get('q3'), '.2f')}]",
            f"{r['jaxbn']['temp_bytes'] / 2**20:.1f} / {r['flax']['temp_bytes'] / 2**20:.1f}",
            f"{r['temp_ratio']:.2f}", torch_cell, harness.fmt(rt.get("median"), ".2f"),
            f"{r['faults_per_call']['jaxbn']['median']:.0f}",
            "yes" if r["reliable"] else "no"]) + " |")
    return "\n".join(lines)


def show(paths: Sequence[Path]) -> dict[str, Any]:
    """Prints the tables of saved results (several files: their results in turn)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    data = {"meta": {**runs[0]["meta"], "reliable": all(r["meta"]["reliable"] for r in runs)},
            "results": [rec for r in runs for rec in r["results"]]}
    print_table(data)
    return data


# ----------------------------------------------------------------------------------------
# --fused: BatchNorm fused with its activation and the residual add (jaxbn.linen.BatchNormAct).


#: XLA:CPU's two instruction schedulers, compile modes of the --fused memory columns. XLA:CPU
#: orders a program for concurrency by default; its memory-optimized scheduler (XLA's
#: list, DFS and post-order heuristics, the least peak of the three) is a compiler option
#: (``jax.jit(...).lower(...).compile(compiler_options=...)``). Neither dominates: each
#: variant's memory is taken at its better one, so flax's is its strongest. Other
#: platforms have one column, their compiler's default.
CPU_SCHEDULERS: dict[str, dict[str, Any]] = {
    "default": {},
    "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}


def _schedulers(platform: str) -> dict[str, dict[str, Any]]:
    return CPU_SCHEDULERS if platform == "cpu" else {"default": {}}


def _compile_memory(model: Any, batch: int, size: int,
                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compiles ``model``'s step at ``batch`` (no run): its memory, from ``memory_analysis``.

    ``total`` is what the step holds at its peak: temporaries plus arguments (the step
    donates its state, so every output but the loss reuses an argument's buffer).
    ``options`` are XLA compiler options (:data:`CPU_SCHEDULERS`).
    """
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step, tx = make_step(model)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               x)
    opt_state = jax.eval_shape(tx.init, variables["params"])
    mem = step.lower(variables["params"], variables["batch_stats"], opt_state, x,
                     labels).compile(compiler_options=options or None).memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes
    return {"batch": batch, "temp_bytes": int(mem.temp_size_in_bytes), "total_bytes": int(total)}


def _max_batch(model: Any, size: int, budget: int, at: dict[str, Any],
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The largest batch whose step's ``total`` memory fits ``budget`` (compile only).

    Memory is close to affine in the batch: fitted through ``at`` (one compiled batch) and
    half that batch, the prediction is then checked by compiling it, and stepped down by 2%
    until it fits. Returns the batch and the compiles it took.
    """
    half = _compile_memory(model, max(at["batch"] // 2, 1), size, options)
    slope = (at["total_bytes"] - half["total_bytes"]) / max(at["batch"] - half["batch"], 1)
    b = max(int((budget - (at["total_bytes"] - slope * at["batch"])) / max(slope, 1)), 1)
    checked = [half]
    mem = _compile_memory(model, b, size, options)
    checked.append(mem)
    while mem["total_bytes"] > budget and b > 1:
        b = max(int(b * 0.98), 1)
        mem = _compile_memory(model, b, size, options)
        checked.append(mem)
    return {"max_batch": b, "checked": checked}


def run_fused_config(name: str, dtype_name: str, args: argparse.Namespace,
                     guard: harness.LoadGuard, platform: str = "cpu") -> dict[str, Any]:
    """Memory, time and the largest batch in a budget: flax, jaxbn, fused and inplace.

    ``fused`` (ReLU, the same model) and ``inplace`` (leaky ReLU, In-Place ABN) are the
    :data:`FUSED` choices of :func:`flax_resnet`. Each variant's step is compiled under each
    scheduler of :data:`CPU_SCHEDULERS`; its ``best`` is the one with the least peak
    (``total``), and memory ratios compare bests, so flax's is its strongest. The budget is
    flax's best whole step at the batch given (flax's largest batch is that batch); each
    other variant's largest batch is found at its best scheduler. Time is measured with
    the default scheduler, relative to unfused jaxbn's (paired rounds,
    :func:`harness.interleaved`).
    """
    import jax.numpy as jnp
    import numpy as np

    _, _, _, size, batch = SPECS[name]
    size, batch = args.size or size, args.batch or batch
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.0, 1.0, (batch, size, size, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
    dtype = jnp.dtype(dtype_name)
    schedulers = _schedulers(platform)
    rec: dict[str, Any] = {"model": name, "dtype": dtype_name, "batch": batch,
                           "schedulers": schedulers}
    runners: dict[str, Callable[[], None]] = {}
    models = {}
    for norm in ("flax", "jaxbn", *FUSED):
        models[norm] = flax_resnet(name, norm=norm, dtype=dtype, width=args.width,
                                   blocks=args.blocks)
        r = _jax_runner(models[norm], x, labels)
        runner = r.pop("run")
        if norm != "flax":
            runners[norm] = runner
        r["total_bytes"] = r["temp_bytes"] + r["argument_bytes"]
        # The runner's compile is the default scheduler's: only the others compile again.
        compiled = {"batch": batch, "temp_bytes": r["temp_bytes"],
                    "total_bytes": r["total_bytes"]}
        r["memory"] = {sched: _compile_memory(models[norm], batch, size, options) if options
                       else compiled for sched, options in schedulers.items()}
        r["best"] = min(r["memory"], key=lambda k: r["memory"][k]["total_bytes"])
        rec[norm] = r
    # fused is the same model as jaxbn: the same first loss to float rounding.
    a, b = rec["fused"]["first_loss"], rec["jaxbn"]["first_loss"]
    rec["fused_loss_agrees"] = bool(abs(a - b) <= (1e-5 if dtype_name == "float32" else 1e-2)
                                    * max(1.0, abs(b)))
    res = harness.interleaved(runners, "jaxbn", rounds=args.rounds, warmup=args.warmup,
                              sample_s=args.sample_ms / 1e3, max_inner=args.max_inner,
                              guard=guard, label=f"{name} {dtype_name} fused")
    rec.update(res.stats())
    rec["reliable"] = all(f <= guard.max_foreign_cores for f in res.foreign_cores)
    flax_best = rec["flax"]["memory"][rec["flax"]["best"]]
    budget = flax_best["total_bytes"]
    rec["budget_bytes"] = budget
    for norm in ("jaxbn", *FUSED) if args.max_batch else ():
        best = rec[norm]["best"]
        at = {"batch": batch, "total_bytes": rec[norm]["memory"][best]["total_bytes"]}
        rec[norm].update(_max_batch(models[norm], size, budget, at, schedulers[best]))
    return rec


def print_fused_table(data: dict[str, Any], out=sys.stdout) -> None:
    """The --fused results: memory and batch relative to flax's best, time to jaxbn's."""
    print(f"\n== ResNet step with BatchNorm fused into BatchNormAct on "
          f"{harness.machine_name(data['meta']['machine'])}; reliable="
          f"{data['meta'].get('reliable')}", file=out)
    print("   temp = compiled step's temporary MiB under each XLA scheduler (default / "
          "memory-optimized); best/flax = the variant's least temp / flax's least; time = "
          "median of paired rounds / unfused jaxbn's [q1, q3] (default scheduler); max batch "
          "= largest batch whose whole step fits flax's best at the given batch", file=out)
    head = ["model", "dtype", "batch", "variant", "temp MiB", "best/flax", "ms",
            "time/jaxbn [q1, q3]", "max batch", "batch/flax"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["results"]:
        flax_temp = min(m["temp_bytes"] for m in r["flax"]["memory"].values())
        for norm in ("flax", "jaxbn", *FUSED):
            v = r[norm]
            ratio = r["ratio"].get(norm, {})
            time_cell = "-"
            if norm == "jaxbn":
                time_cell = "1"
            elif ratio:
                time_cell = (f"{1 / ratio['median']:.3f} [{1 / ratio['q3']:.2f}, "
                             f"{1 / ratio['q1']:.2f}]")
            ms = r["ms"].get(norm, {}).get("median")
            mb = {"flax": r["batch"]}.get(norm, v.get("max_batch"))
            temps = [m["temp_bytes"] for m in v["memory"].values()]
            lines.append("| " + " | ".join([
                r["model"], r["dtype"], str(r["batch"]), norm,
                " / ".join(f"{t / 2**20:.0f}" for t in temps),
                f"{min(temps) / max(flax_temp, 1):.2f}",
                harness.fmt(ms, ".0f"), time_cell, str(mb) if mb else "-",
                f"{mb / r['batch']:.2f}" if mb else "-"]) + " |")
    print("\n".join(lines), file=out)


def fused_main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """``--fused``: :func:`run_fused_config` for every model and dtype, one table."""
    meta, threads, platform, _, _ = harness.start_model_run(args)
    if args.sample_ms is None:
        args.sample_ms = meta["args"]["sample_ms"] = 1.0 if platform == "cpu" else 50.0
    guard = harness.LoadGuard()
    meta["probe"] = guard.probe()
    records: list[dict[str, Any]] = []
    for name in filter(None, args.models.split(",")):
        for dtype_name in filter(None, args.dtypes.split(",")):
            t0 = time.perf_counter()
            records.append(run_fused_config(name, dtype_name, args, guard, platform))
            print(f"  {name} {dtype_name}: {time.perf_counter() - t0:.0f} s", flush=True)
            # After every configuration: a run stopped by a time limit keeps what it measured.
            _write_json({"meta": {**meta, "complete": False}, "results": records}, args.json)
    meta.update(guard=guard.report(), complete=True)
    meta["reliable"] = meta["guard"]["reliable"]
    data = {"meta": meta, "results": records}
    print_fused_table(data)
    _write_json(data, args.json)
    print(f"# wrote {args.json}", flush=True)
    return data


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny models ({QUICK}), 2 rounds: a smoke test of a few seconds each")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    ap.add_argument("--batch", type=int, default=None, help="override each model's batch")
    ap.add_argument("--size", type=int, default=None, help="override each model's input size")
    ap.add_argument("--width", type=int, default=64, help="channels of the first stage")
    ap.add_argument("--blocks", type=int, default=None, help="blocks per stage (all stages)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each implementation")
    ap.add_argument("--sample-ms", type=float, default=None,
                    help="minimum length of one timing sample (default 1 on CPU, 50 on GPU)")
    ap.add_argument("--compile-time", action="store_true",
                    help="measure compile times in fresh processes (benchmarks.compile_time)")
    ap.add_argument("--fused", action="store_true",
                    help="instead: flax, jaxbn and the fused BatchNormAct variants (fused, "
                         "inplace): temporary memory, time against jaxbn, and the largest "
                         "batch within flax's memory (JSON default: results/resnet_fused.json)")
    ap.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                    help="--fused: leave out the search for the largest batch (compiles only; "
                         "several per variant)")
    harness.add_model_args(ap, DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.fused and args.json == DEFAULT_JSON:
        args.json = DEFAULT_JSON.with_name("resnet_fused.json")
    if args.quick:
        args.width, args.blocks = QUICK["width"], QUICK["blocks"]
        args.size, args.batch = args.size or QUICK["size"], args.batch or QUICK["batch"]
        args.rounds = args.rounds or 2
    args.rounds = args.rounds or 5
    for flag, allowed in (("models", SPECS), ("dtypes", DTYPES)):
        for name in getattr(args, flag).split(","):
            if name and name not in allowed:
                raise SystemExit(f"--{flag}: expected some of {list(allowed)}, got {name!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.fused:
        return fused_main(args, argv)
    if args.show:
        return show(args.show)
    if args.compile_time:
        from benchmarks import compile_time

        json_arg = [] if args.json == DEFAULT_JSON else ["--json", str(args.json)]
        return compile_time.main(["--models", args.models, "--dtypes", args.dtypes,
                                  "--processes", str(args.processes),
                                  *(["--quick"] if args.quick else []), *json_arg])
    if args.processes > 1:
        data = merge(harness.run_processes("benchmarks.resnet", argv, args.processes))
        _write(data, args.json)
        return data

    meta, threads, platform, torch_mod, torch_dev = harness.start_model_run(args)
    if args.sample_ms is None:
        args.sample_ms = meta["args"]["sample_ms"] = 1.0 if platform == "cpu" else 50.0
    import flax
    import jax

    meta["flax"] = flax.__version__
    print(f"# {harness.machine_name(meta['machine'])}; jax {jax.__version__}, flax "
          f"{flax.__version__}, torch {meta.get('torch')} ({torch_dev}); {threads} threads; "
          f"malloc {meta['malloc'] or 'default'}", flush=True)
    guard = harness.LoadGuard()
    meta["probe"] = guard.probe()
    records: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for name in filter(None, args.models.split(",")):
        for dtype_name in filter(None, args.dtypes.split(",")):
            t0 = time.perf_counter()
            rec = run_config(name, dtype_name, args, torch_mod, torch_dev, guard)
            records.append(rec)
            # Written after every configuration: a run stopped by a time limit keeps the rest.
            partial = {"meta": {**meta, "complete": False, "reliable": guard.reliable},
                       "results": records}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(partial, indent=1))
            print(f"  {name} {dtype_name}: jaxbn {rec['ms']['jaxbn']['median']:.1f} ms, "
                  f"time ratio /flax {rec['ratio']['flax']['median']:.3f}, temp "
                  f"{rec['temp_ratio']:.2f}x flax's  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    meta.update(total_s=round(time.perf_counter() - t_start, 1), guard=guard.report(),
                complete=True)
    meta["reliable"] = meta["guard"]["reliable"]
    data = {"meta": meta, "results": records}
    _write(data, args.json)
    return data


def _write(data: dict[str, Any], path: Path) -> None:
    print_table(data)
    _write_json(data, path)
    print(f"# wrote {path}", flush=True)


if __name__ == "__main__":
    main()
