"""Training-mode BatchNorm, side by side: jaxbn vs flax.linen.BatchNorm vs PyTorch vs a copy.

Run ``python -m benchmarks.bn`` (``--quick`` for a < 2 minute subset; ``--help`` for the
flags). For every NHWC shape and dtype it times, on the device JAX picks (CPU or GPU):

* ``fwd``: the forward pass in training mode, returning ``y`` and the updated running
  statistics;
* ``fwdbwd``: forward and backward, returning ``y``, the new statistics and the gradients
  of ``sum(y * g)`` for a fixed cotangent ``g`` (an argument, not a constant) with respect
  to ``x``, ``scale`` and ``bias`` (JAX: one jitted ``jax.vjp``; PyTorch:
  ``torch.autograd.grad(y, (x, w, b), g)``);

for these implementations:

* ``jaxbn``: :func:`jaxbn.batch_norm` (``training=True``, default two-pass variance);
* ``flax_fast`` / ``flax_2pass``: ``flax.linen.BatchNorm(use_fast_variance=True / False)``,
  with ``dtype=x.dtype`` so that the output has the input's dtype as jaxbn's does;
* ``torch_nchw`` / ``torch_cl``: ``torch.nn.BatchNorm2d`` on an NCHW tensor and on the same
  tensor in ``channels_last`` memory format (when torch imports and can run on the device;
  on CPU with ``torch.set_num_threads`` = the cores this process may use, which XLA uses
  too); bfloat16 runs the module and tensors in bfloat16 (``--no-torch-bf16`` skips it);
* ``copy``: the **copy floor**, ``jax.jit(lambda x: x * 2)``: one read and one write of the
  tensor into a fresh output buffer (so it pays what any non-donating jitted op pays for its
  output, page faults included on CPU). Its bandwidth ``bw = 2 * bytes / t_copy`` defines
  memory-traffic floors: ``fwd`` must move at least 3 tensors (read x for the statistics,
  read it again to normalize, write y) and ``fwdbwd`` at least 8 (forward 3; backward: read
  x and g for the two sums, read both again and write dx). ``floor`` in the table is
  ``floor_time / time``, the fraction of that floor reached (1.0 = at copy speed).

Timing: after warm-up, every round runs each peer once in a fresh random order, with a
jaxbn sample before the first, between any two and after the last (``J P1 J P2 ... Pk J``;
one sample = the mean of ``inner`` back-to-back calls, ``inner`` chosen so a sample lasts
>= ``--sample-ms``). The ratio ``jaxbn / peer`` of a round compares the peer's sample with
the mean of the two jaxbn samples around it (interleaved A/B pairs, which cancel a shared
machine's drift); the tables give the median over rounds (the JSON also the quartiles).
``torch_best`` is the torch layout with the lower median time. Thread settings, the load
guard (a result measured while another process competed for the CPU is marked
``reliable: false`` with a warning), minor page faults per call and the machine's name come
from :mod:`benchmarks.harness`: both sides use the same CPUs and thread count, and PyTorch's
idle OpenMP threads are passive so that they do not spin while the next implementation runs.

Memory, per shape and dtype, for jaxbn and both flax variants:

* ``temp_bytes``: XLA's compiled temporary memory of the fused forward+backward
  ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` with
  ``loss = sum(bn(x, params) * g)`` accumulated in float32 (``memory_analysis()``'s
  ``temp_size_in_bytes``); ``vjp_temp_bytes``: the same for the timed ``fwdbwd`` function;
* ``residual_bytes``: the split setting, the bytes the forward must keep for the backward:
  the leaves of the function ``jax.vjp(bn, x, params)`` returns (found with
  ``jax.eval_shape``, nothing allocated); ``residual_extra_bytes`` leaves out one leaf of
  ``x``'s shape and dtype (``x`` itself, which the caller holds anyway).

Results are printed as tables and written as JSON (``benchmarks/results/bn.json`` or
``--json PATH``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from benchmarks import harness

SHAPES = [(128, 12, 12, 20), (128, 4, 4, 50), (256, 32, 32, 64), (64, 56, 56, 256)]
QUICK_SHAPES = [(128, 12, 12, 20), (256, 32, 32, 64)]
DTYPES = ["float32", "bfloat16"]
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bn.json"
PEERS = ["flax_fast", "flax_2pass", "torch_best"]
MOMENTUM = 0.9
EPSILON = 1e-5
COPY_FACTOR = 2.0


# ----------------------------------------------------------------------------------------
# JAX implementations: each a pair of jitted (fwd, fwdbwd) taking (x, params, stats, g).


def _jaxbn_fn(x, p, s):
    return jaxbn.batch_norm(x, p, s, training=True, momentum=MOMENTUM, epsilon=EPSILON)


def _flax_fn(fast: bool):
    import flax.linen as nn

    def fn(x, p, s):
        # dtype=x.dtype: output in the input's dtype, as jaxbn (flax would promote a
        # bfloat16 input with float32 parameters to a float32 output).
        module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON,
                              use_fast_variance=fast, dtype=x.dtype)
        variables = {"params": {"scale": p.scale, "bias": p.bias},
                     "batch_stats": {"mean": s.mean, "var": s.var}}
        y, upd = module.apply(variables, x, mutable=["batch_stats"])
        bs = upd["batch_stats"]
        return y, jaxbn.BatchStats(bs["mean"], bs["var"], s.count + 1)

    return fn


def _jax_impls() -> dict[str, Any]:
    impls = {"jaxbn": _jaxbn_fn}
    try:
        impls["flax_fast"] = _flax_fn(True)
        impls["flax_2pass"] = _flax_fn(False)
    except ImportError:  # pragma: no cover - flax is an optional dependency
        print("flax not importable: skipping the flax peers", file=sys.stderr)
    return impls


def _fwd(fn):
    return jax.jit(fn)


def _fwdbwd(fn):
    def both(x, p, s, g):
        (y, new_stats), vjp = jax.vjp(lambda x, p: fn(x, p, s), x, p)
        ct_stats = jax.tree.map(_zero_cotangent, new_stats)
        dx, dp = vjp((g.astype(y.dtype), ct_stats))
        return y, new_stats, dx, dp

    return jax.jit(both)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def _loss_grad(fn):
    """The fused setting for temporary memory: value_and_grad of sum(bn(x, p) * g)."""

    def loss(x, p, s, g):
        y, _ = fn(x, p, s)
        return jnp.sum(y * g, dtype=jnp.float32)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _memory(fn, x, p, s, g) -> dict[str, int]:
    compiled = _loss_grad(fn).lower(x, p, s, g).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    vjp_temp = _fwdbwd(fn).lower(x, p, s, g).compile().memory_analysis().temp_size_in_bytes
    vjp_fn = jax.eval_shape(lambda x, p: jax.vjp(lambda x, p: fn(x, p, s)[0], x, p)[1], x, p)
    leaves = jax.tree.leaves(vjp_fn)
    nbytes = [math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves]
    total = sum(nbytes)
    # Leaves with x's shape and dtype: x itself (saved by reference) or a same-size copy;
    # the first such leaf is counted as x, any other is a genuine extra residual.
    x_like = [b for a, b in zip(leaves, nbytes, strict=True)
              if a.shape == x.shape and a.dtype == x.dtype]
    extra = total - (x_like[0] if x_like else 0)
    return {"temp_bytes": int(temp), "vjp_temp_bytes": int(vjp_temp),
            "residual_bytes": int(total),
            "residual_extra_bytes": int(extra), "residual_leaves": len(leaves)}


# ----------------------------------------------------------------------------------------
# PyTorch.


def _torch_impls(torch, device, shape, dtype_name, x_np, g_np):
    """``{name: (fwd, fwdbwd)}`` zero-argument callables for both memory formats."""
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    n, h, w, c = shape
    # NHWC data -> logical NCHW tensor; the float32 array holds the bf16-rounded values.
    x_nchw = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
    g_nchw = torch.from_numpy(np.ascontiguousarray(g_np.transpose(0, 3, 1, 2)))
    out = {}
    for name, fmt in (("torch_nchw", torch.contiguous_format),
                      ("torch_cl", torch.channels_last)):
        bn = torch.nn.BatchNorm2d(c, eps=EPSILON, momentum=1 - MOMENTUM).to(device)
        bn.train()
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, c))
            bn.bias.copy_(torch.linspace(-1, 1, c))
        if tdtype != torch.float32:
            bn = bn.to(tdtype)
        x = x_nchw.to(device=device, dtype=tdtype).contiguous(memory_format=fmt)
        g = g_nchw.to(device=device, dtype=tdtype).contiguous(memory_format=fmt)
        xr = x.clone().requires_grad_(True)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def fwd(bn=bn, x=x, sync=sync):
            with torch.no_grad():
                y = bn(x)
            sync()
            return y

        def fwdbwd(bn=bn, xr=xr, g=g, sync=sync):
            y = bn(xr)
            grads = torch.autograd.grad(y, (xr, bn.weight, bn.bias), g)
            sync()
            return y, grads

        try:
            fwd()
            fwdbwd()
        except RuntimeError as e:  # e.g. a dtype the device's kernels lack
            print(f"  {name} {dtype_name}: unsupported ({e})", file=sys.stderr)
            continue
        out[name] = (fwd, fwdbwd)
    return out


# ----------------------------------------------------------------------------------------
# Timing.


def _block(out):
    jax.block_until_ready(out)
    return out


# ----------------------------------------------------------------------------------------
# One configuration.


def _inputs(shape, dtype_name, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    dtype = jnp.dtype(dtype_name)
    x = jnp.asarray(rng.normal(0.5, 2.0, shape).astype(np.float32), dtype)
    g = jnp.asarray(rng.normal(0.0, 1.0, shape).astype(np.float32), dtype)
    p = jaxbn.BatchNormParams(jnp.linspace(0.5, 1.5, c, dtype=jnp.float32),
                              jnp.linspace(-1.0, 1.0, c, dtype=jnp.float32))
    _, s = jaxbn.init(c)
    return x, p, s, g


def _calls(x, p, s, g, dtype_name, args, jax_impls, torch_mod, torch_dev) -> dict:
    """Each implementation's forward and forward+backward call (compiled), and the copy."""
    calls: dict[str, dict[str, Any]] = {"fwd": {}, "fwdbwd": {}}
    for name, fn in jax_impls.items():
        f, fb = _fwd(fn), _fwdbwd(fn)
        calls["fwd"][name] = functools.partial(lambda f: _block(f(x, p, s)), f)
        calls["fwdbwd"][name] = functools.partial(lambda fb: _block(fb(x, p, s, g)), fb)
    copy = jax.jit(lambda x: x * jnp.asarray(COPY_FACTOR, x.dtype))
    copy_call = lambda: _block(copy(x))  # noqa: E731
    calls["fwd"]["copy"] = calls["fwdbwd"]["copy"] = copy_call
    if torch_mod is not None and not (dtype_name == "bfloat16" and args.no_torch_bf16):
        x_np = np.asarray(x.astype(jnp.float32))
        g_np = np.asarray(g.astype(jnp.float32))
        for name, (tf, tfb) in _torch_impls(torch_mod, torch_dev, x.shape, dtype_name, x_np,
                                            g_np).items():
            calls["fwd"][name] = tf
            calls["fwdbwd"][name] = tfb
    for d in calls.values():  # compile outside the timed rounds
        for c in d.values():
            c()
    return calls


def _summary(meas: harness.Interleaved, mode: str, nbytes: int, guard) -> dict:
    """Medians, ratios to jaxbn and memory-traffic floors of one mode's measurement."""
    times, pair = meas.times, meas.ratios
    med = {k: statistics.median(v) for k, v in times.items()}
    res: dict[str, Any] = {"median_ms": {k: v * 1e3 for k, v in med.items()}}
    res["faults_per_call"] = {k: statistics.median(v) for k, v in meas.faults.items()}
    res["reliable"] = all(f <= guard.max_foreign_cores for f in meas.foreign_cores)
    torch_names = [k for k in med if k.startswith("torch_")]
    if torch_names:
        best = min(torch_names, key=med.get)
        res["torch_best"] = best
        pair["torch_best"] = pair[best]
    # jaxbn / peer, the median over rounds of the ratio to the adjacent jaxbn samples.
    res["ratio"] = {k: statistics.median(v) for k, v in pair.items()}
    res["ratio_iqr"] = {k: [harness.quantile(v, 0.25), harness.quantile(v, 0.75)]
                        for k, v in pair.items()}
    # Memory-traffic floors from the copy's bandwidth (see the module docstring).
    tensors = 3 if mode == "fwd" else 8
    bw = 2 * nbytes / med["copy"]
    floor = tensors * nbytes / bw
    res["copy_GBps"] = bw / 1e9
    res["floor_ms"] = floor * 1e3
    res["floor_frac"] = {k: floor / v for k, v in med.items() if k != "copy"}
    res["GBps"] = {k: tensors * nbytes / v / 1e9 for k, v in med.items() if k != "copy"}
    return res


def _memory_record(jax_impls, x, p, s, g) -> dict:
    """Compiled temporary and residual memory of each JAX implementation, and jaxbn's ratios."""
    memory = {name: _memory(fn, x, p, s, g) for name, fn in jax_impls.items()}
    if "flax_fast" in memory:
        j = memory["jaxbn"]
        for peer in ("flax_fast", "flax_2pass"):
            f = memory.get(peer)
            if f:
                memory[f"jaxbn/{peer}"] = {
                    k: (j[k] / f[k] if f[k] else None)
                    for k in ("temp_bytes", "vjp_temp_bytes", "residual_bytes",
                              "residual_extra_bytes")}
    return memory


def run_config(shape, dtype_name, args, jax_impls, torch_mod, torch_dev, guard) -> dict:
    x, p, s, g = _inputs(shape, dtype_name)
    nbytes = x.size * x.dtype.itemsize
    rec: dict[str, Any] = {"shape": list(shape), "dtype": dtype_name, "bytes": nbytes}
    t0 = time.perf_counter()
    calls = _calls(x, p, s, g, dtype_name, args, jax_impls, torch_mod, torch_dev)
    rec["setup_s"] = round(time.perf_counter() - t0, 2)
    for mode in ("fwd", "fwdbwd"):
        meas = harness.interleaved(calls[mode], "jaxbn", rounds=args.repeats,
                                   warmup=args.warmup, sample_s=args.sample_ms / 1e3,
                                   max_inner=args.max_inner, guard=guard,
                                   label=f"{_fmt_shape(shape)} {dtype_name} {mode}")
        rec[mode] = _summary(meas, mode, nbytes, guard)
    rec["memory"] = {} if args.no_memory else _memory_record(jax_impls, x, p, s, g)
    return rec


# ----------------------------------------------------------------------------------------
# Output.


def _fmt_shape(shape):
    return "x".join(map(str, shape))


def _mb(b):
    return f"{b / 2**20:.2f}"


def print_table(records, out=sys.stdout, machine=None):
    impls = ["jaxbn", "flax_fast", "flax_2pass", "torch_nchw", "torch_cl", "copy"]
    if machine:
        print(f"\n# {harness.machine_name(machine)}", file=out)
    for mode in ("fwd", "fwdbwd"):
        print(f"\n== {mode}: median ms; j/peer = median of paired ratios jaxbn/peer; "
              f"floor = fraction of the {3 if mode == 'fwd' else 8}-tensor copy floor", file=out)
        head = (f"{'shape':>14} {'dtype':>8} | " + " ".join(f"{k:>10}" for k in impls)
                + " | " + " ".join(f"{'j/' + k:>12}" for k in PEERS)
                + f" | {'jaxbn floor':>11} {'jaxbn GB/s':>10} {'flt/call':>8} {'ok':>3}")
        print(head, file=out)
        print("-" * len(head), file=out)
        for r in records:
            m = r[mode]
            cells = [f"{m['median_ms'][k]:10.3f}" if k in m["median_ms"] else f"{'-':>10}"
                     for k in impls]
            ratios = [f"{m['ratio'][k]:12.2f}" if k in m["ratio"] else f"{'-':>12}"
                      for k in PEERS]
            print(f"{_fmt_shape(r['shape']):>14} {r['dtype']:>8} | " + " ".join(cells)
                  + " | " + " ".join(ratios)
                  + f" | {m['floor_frac']['jaxbn']:11.2f} {m['GBps']['jaxbn']:10.1f}"
                  + f" {m['faults_per_call']['jaxbn']:8.0f} {'yes' if m['reliable'] else 'NO':>3}",
                  file=out)
    if any(r["memory"] for r in records):
        mem_impls = ("jaxbn", "flax_fast", "flax_2pass")
        keys = ("temp_bytes", "vjp_temp_bytes", "residual_bytes", "residual_extra_bytes")
        print("\n== memory, MiB: temp = temporaries of jit(value_and_grad(sum(bn(x,p)*g))), "
              "vjp = of the timed fwdbwd, resid = bytes kept by the vjp closure (+x = "
              "without x itself); ratios jaxbn/flax_fast, jaxbn/flax_2pass", file=out)
        head = (f"{'shape':>14} {'dtype':>8} | " + " | ".join(
            f"{k:>10}: {'temp':>6} {'vjp':>6} {'resid':>6} {'extra':>6}" for k in mem_impls)
            + f" | {'temp ratios':>11} | {'resid ratios':>12}")
        print(head, file=out)
        print("-" * len(head), file=out)
        for r in records:
            mem = r["memory"]
            cells = []
            for k in mem_impls:
                vals = [_mb(mem[k][q]) if k in mem else "-" for q in keys]
                cells.append(f"{'':>10}  " + " ".join(f"{v:>6}" for v in vals))

            def ratios(q, mem=mem):
                return " ".join(
                    f"{mem[f'jaxbn/{k}'][q]:.2f}" if mem.get(f"jaxbn/{k}", {}).get(q) is not None
                    else "-" for k in ("flax_fast", "flax_2pass"))

            print(f"{_fmt_shape(r['shape']):>14} {r['dtype']:>8} | " + " | ".join(cells)
                  + f" | {ratios('temp_bytes'):>11} | {ratios('residual_bytes'):>12}", file=out)


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if part:
            shapes.append(tuple(int(v) for v in part.replace("x", ",").split(",") if v))
    for s in shapes:
        if len(s) != 4:
            raise SystemExit(f"--shapes: expected NHWC shapes of rank 4, got {s}")
    return shapes


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"shapes {QUICK_SHAPES}, 7 rounds, 5 ms samples (< 2 minutes)")
    ap.add_argument("--shapes", type=_parse_shapes, default=None,
                    help="NHWC shapes, ';'-separated, e.g. '128,12,12,20;64x56x56x256'")
    ap.add_argument("--dtypes", default=None, help="comma-separated (float32,bfloat16)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output JSON path")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved rounds per mode (default 15, --quick 7)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per implementation")
    ap.add_argument("--sample-ms", type=float, default=None,
                    help="minimum length of one timing sample (default 20, --quick 5)")
    ap.add_argument("--max-inner", type=int, default=50, help="calls per sample, at most")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--no-torch-bf16", action="store_true", help="skip PyTorch in bfloat16")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory analysis")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides")
    args = ap.parse_args(argv)
    for d in args.dtypes.split(",") if args.dtypes else DTYPES:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: expected some of {DTYPES}, got {d!r}")
    if args.repeats is None:
        args.repeats = 7 if args.quick else 15
    if args.sample_ms is None:
        args.sample_ms = 5.0 if args.quick else 20.0
    return args


def _meta(args, threads, torch_mod, torch_dev) -> dict:
    """The run's description saved with its results: machine, threads, versions, arguments."""
    dev = jax.devices()[0]
    meta = {
        "machine": harness.machine_info(), "threads": harness.thread_settings(threads),
        "device": str(dev), "platform": dev.platform,
        "device_kind": getattr(dev, "device_kind", ""), "cpu_threads": threads,
        "jax": jax.__version__, "python": platform.python_version(),
        "arch": platform.machine(), "torch": getattr(torch_mod, "__version__", None),
        "torch_device": torch_dev, "args": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in vars(args).items() if k != "shapes"},
        "copy_floor": f"jax.jit(lambda x: x * {COPY_FACTOR}) (read + write, fresh output)",
    }
    if torch_dev == "cpu":
        meta["threads"].update(harness.pin_torch(torch_mod, threads))
    try:
        import flax
        meta["flax"] = flax.__version__
    except ImportError:  # pragma: no cover
        pass
    return meta


def main(argv=None) -> int:
    args = _parse(argv)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    dtypes = args.dtypes.split(",") if args.dtypes else DTYPES
    # Before JAX's CPU backend starts and before torch is imported (below).
    threads = harness.configure_threads(args.threads)
    torch_mod, torch_dev = ((None, None) if args.no_torch
                            else harness.torch_for(jax.devices()[0].platform))
    meta = _meta(args, threads, torch_mod, torch_dev)
    print(f"# {harness.machine_name(meta['machine'])}  threads {threads}  jax {jax.__version__}"
          f"  flax {meta.get('flax')}  torch {meta['torch']} ({torch_dev})", flush=True)

    jax_impls = _jax_impls()
    guard = harness.LoadGuard()
    meta["probe"] = guard.probe()
    records = []
    t_start = time.perf_counter()
    for shape in shapes:
        for dtype_name in dtypes:
            t0 = time.perf_counter()
            rec = run_config(shape, dtype_name, args, jax_impls, torch_mod, torch_dev, guard)
            records.append(rec)
            r = rec["fwdbwd"]["ratio"]
            print(f"  {_fmt_shape(shape)} {dtype_name}: fwdbwd jaxbn "
                  f"{rec['fwdbwd']['median_ms']['jaxbn']:.3f} ms, ratios "
                  + ", ".join(f"/{k} {v:.2f}" for k, v in r.items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    meta["guard"] = guard.report()
    meta["reliable"] = meta["guard"]["reliable"]
    print_table(records, machine=meta["machine"])
    print(f"# reliable={meta['reliable']} (other processes' CPU use, max "
          f"{meta['guard']['foreign_cores_max']:.2f} cores)")
    print(f"\n# total {meta['total_s']} s", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
