"""Compile time of a training step with jaxbn's BatchNorm vs flax's, each in a fresh process.

Run ``python -m benchmarks.compile_time`` (``--quick`` for tiny models; ``--help`` for the
flags), or ``python -m benchmarks.resnet --compile-time`` / ``python -m benchmarks.lenet
--compile-time``, which run this for their models. Why the method matters: XLA caches work
per process (on a GPU, the autotuning results of cuDNN convolutions, GEMMs and fusions,
keyed by the instruction's HLO), and a ResNet step with jaxbn's BN shares every convolution
with the same step with flax's. Compiled one after the other in one process, the second
reuses what the first paid for; the first compile of a process also pays for the backend's
one-time set-up (CUDA, cuDNN, thread pools). So for each model and dtype this benchmark

* starts a fresh process per order, ``jaxbn`` then ``flax`` and ``flax`` then ``jaxbn``
  (``--processes`` times each), with JAX's persistent compilation cache off;
* sets the backend up first, outside any timed compile: the first device use and a trivial
  jitted program compiled and run (``setup_s``);
* compiles each step through the ahead-of-time API, timing its stages separately:
  ``jit(step).trace(*args)`` (``trace_s``), ``.lower()`` (``lower_s``), ``.compile()``
  (``compile_s``), and records JAX's own compile events (:mod:`jax.monitoring`:
  ``/jax/core/compile/jaxpr_trace_duration``, ``jaxpr_to_mlir_module_duration``,
  ``backend_compile_duration``; ``xla_s`` is the last, XLA's compile alone);
* then compiles the process's first step again from a new function (``warm``): what the
  process's caches save.

A step's ``first`` compile (first in its process, after the set-up) is the number to compare
between BatchNorms; ``second`` (compiled after the other BN's step) shows how much the
other's compile warmed the caches. ``--variants`` adds XLA:GPU diagnostics, each in its own
processes (an unknown flag aborts a process): ``autotune0`` (``.compile(compiler_options=
{"xla_gpu_autotune_level": 0})``: no autotuning), ``no_fusion_autotuner``
(``--xla_gpu_experimental_enable_fusion_autotuner=false``) and ``stats``
(``--xla_gpu_print_compilation_stats``; the tail of the child's log goes into the JSON). On
the CPU these options exist and change nothing, so the same code runs there (the tests do).

Results: a table (``ms`` per stage, median over processes) and JSON
(``benchmarks/results/compile_time.json`` or ``--json PATH``), written after every process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "compile_time.json"
MODELS = ("resnet18", "resnet50", "lenet")
NORMS = ("jaxbn", "flax")
EVENTS = {"trace": "/jax/core/compile/jaxpr_trace_duration",
          "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "xla": "/jax/core/compile/backend_compile_duration"}
#: name -> (XLA_FLAGS added, compiler_options of ``.compile()``)
VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "default": ((), {}),
    "autotune0": ((), {"xla_gpu_autotune_level": 0}),
    "no_fusion_autotuner": (("--xla_gpu_experimental_enable_fusion_autotuner=false",), {}),
    "stats": (("--xla_gpu_print_compilation_stats",), {}),
}
#: The diagnostics' orders: one process per BatchNorm, each compiled first.
SOLO = (("jaxbn",), ("flax",))
BOTH_ORDERS = (("jaxbn", "flax"), ("flax", "jaxbn"))


# ----------------------------------------------------------------------------------------
# The child: one process, one order.


def _resnet_step(model_name: str, norm: str, dtype_name: str, quick: bool):
    """ResNet's donated step (:func:`benchmarks.resnet.make_step`) and abstract arguments."""
    import jax
    import jax.numpy as jnp

    from benchmarks import resnet

    _, _, _, size, batch = resnet.SPECS[model_name]
    width, blocks = 64, None
    if quick:
        width, blocks, size, batch = (resnet.QUICK[k] for k in ("width", "blocks", "size",
                                                                 "batch"))
    model = resnet.flax_resnet(model_name, norm=norm, dtype=jnp.dtype(dtype_name), width=width,
                               blocks=blocks)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step, tx = resnet.make_step(model)
    variables = jax.eval_shape(lambda k, a: model.init(k, a, train=False), jax.random.key(0), x)
    opt_state = jax.eval_shape(tx.init, variables["params"])
    return step, (variables["params"], variables["batch_stats"], opt_state, x, labels)


def _lenet_step(norm: str, quick: bool):
    """The training program's step (:func:`train.steps.make_train_step`) with ``norm``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from train import config, data, distributed, steps

    batch = 16 if quick else 128
    cfg = config.Config(batch_size=batch, norm=norm)
    model = steps.make_model(cfg, 10)
    tx = steps.make_optimizer(cfg, 100)
    mesh = distributed.global_mesh(jax.devices()[:1])
    # Placed as the program places them: the state replicated, the batch split over the mesh.
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(distributed.AXIS))
    state = jax.eval_shape(lambda k: steps.create_train_state(model, tx, k, (28, 28, 1)),
                           jax.random.key(0))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                         state)
    images = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.uint8, sharding=split)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)
    mean, std = data.pixel_stats("fashion_mnist")
    return steps.make_train_step(model, mean, std, mesh), (state, images, labels)


def build_step(model_name: str, norm: str, dtype_name: str, quick: bool):
    """A new jitted step for ``(model, norm)`` and its (abstract) arguments."""
    if model_name == "lenet":
        if dtype_name != "float32":
            raise ValueError(f"lenet: expected dtype float32, got {dtype_name!r}")
        return _lenet_step(norm, quick)
    return _resnet_step(model_name, norm, dtype_name, quick)


def timed_compile(step: Any, args: Sequence[Any], options: dict[str, Any],
                  events: list[tuple[str, float]]) -> dict[str, float]:
    """Traces, lowers and compiles ``step`` for ``args``; seconds per stage and per event."""
    del events[:]
    t0 = time.perf_counter()
    traced = step.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile(compiler_options=options or None)
    t3 = time.perf_counter()
    rec = {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}
    for stage, name in EVENTS.items():
        rec[f"{stage}_event_s"] = sum(d for e, d in events if e == name)
    rec["xla_s"] = rec["xla_event_s"]
    return rec


def backend_setup() -> float:
    """First device use and a trivial program compiled and run: seconds."""
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    jax.devices()
    jax.jit(lambda a: a * 2 + 1)(jnp.ones(8)).block_until_ready()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: set-up, each BN's step in ``args.order``, then the first one warm."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: events.append((name, secs)))
    setup_s = backend_setup()
    options = VARIANTS[args.variant][1]
    order = args.order.split(",")
    compiles = []
    for position, norm in [*(("first" if i == 0 else "second", n) for i, n in enumerate(order)),
                           ("warm", order[0])]:
        step, step_args = build_step(args.model, norm, args.dtype, args.quick)
        rec = timed_compile(step, step_args, options, events)
        compiles.append({"norm": norm, "position": position, **rec})
        print(f"  {args.model} {args.dtype} {args.variant} {norm} {position}: trace "
              f"{rec['trace_s']:.2f} s, lower {rec['lower_s']:.2f} s, compile "
              f"{rec['compile_s']:.2f} s (XLA {rec['xla_s']:.2f} s)", flush=True)
    return {"model": args.model, "dtype": args.dtype, "variant": args.variant, "order": order,
            "quick": args.quick, "setup_s": setup_s, "backend": jax.default_backend(),
            "jax": jax.__version__, "compiles": compiles}


# ----------------------------------------------------------------------------------------
# The parent: the processes, the table.


def plan(models: Sequence[str], dtypes: Sequence[str], variants: Sequence[str],
         processes: int) -> list[dict[str, Any]]:
    """The child runs, in order: every model and dtype with the default variant in both
    orders first, then the diagnostics, one process per BatchNorm.

    Example:
        >>> [(r["model"], r["variant"], r["order"]) for r in plan(["lenet"], ["float32"],
        ...                                                         ["default", "stats"], 1)]
        [('lenet', 'default', 'jaxbn,flax'), ('lenet', 'default', 'flax,jaxbn'),
         ('lenet', 'stats', 'jaxbn'), ('lenet', 'stats', 'flax')]
    """
    runs = []
    for variant in variants:
        orders = BOTH_ORDERS if variant == "default" else SOLO
        for model in models:
            for dtype in dtypes:
                if model == "lenet" and dtype != "float32":
                    continue
                for _ in range(processes):
                    runs += [{"model": model, "dtype": dtype, "variant": variant,
                              "order": ",".join(o)} for o in orders]
    return runs


def child_command(run: dict[str, Any], quick: bool, json_path: Path) -> tuple[list[str],
                                                                               dict[str, str]]:
    """The command line and environment of one child run."""
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--child", "--model", run["model"],
           "--dtype", run["dtype"], "--variant", run["variant"], "--order", run["order"],
           "--json", str(json_path), *(["--quick"] if quick else [])]
    flags = VARIANTS[run["variant"]][0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if flags:
        env["XLA_FLAGS"] = " ".join([*os.environ.get("XLA_FLAGS", "").split(), *flags])
    return cmd, env


def run_children(runs: Sequence[dict[str, Any]], args: argparse.Namespace,
                 write: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Runs each child in a fresh process (within ``args.budget_s``); returns their records."""
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(runs):
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 10:
                results.append({**run, "error": f"skipped: {left:.0f} s of the budget left"})
                continue
            path = Path(tmp) / f"{i}.json"
            log = Path(tmp) / f"{i}.log"
            cmd, env = child_command(run, args.quick, path)
            with log.open("w") as f:
                try:
                    rc: Any = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                             timeout=left, check=False).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            text = log.read_text(errors="replace")
            print(text, end="", flush=True)
            rec = json.loads(path.read_text()) if path.exists() else {**run}
            if rc != 0:
                rec["error"] = f"exit status {rc}"
            if run["variant"] == "stats" or rc != 0:
                rec["log_tail"] = text[-4000:]
            results.append(rec)
            write(results)
    return results


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over processes per (model, dtype, variant, norm, position)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in results:
        for c in r.get("compiles", []):
            key = (r["model"], r["dtype"], r["variant"], c["norm"], c["position"])
            groups.setdefault(key, []).append({**c, "setup_s": r["setup_s"]})
    rows = []
    for (model, dtype, variant, norm, position), recs in groups.items():
        row: dict[str, Any] = {"model": model, "dtype": dtype, "variant": variant, "norm": norm,
                               "position": position, "n": len(recs)}
        for k in ("setup_s", "trace_s", "lower_s", "compile_s", "xla_s", "total_s"):
            row[k] = statistics.median(c[k] for c in recs)
        rows.append(row)
    order = {p: i for i, p in enumerate(("first", "second", "warm"))}
    rows.sort(key=lambda r: (r["model"], r["dtype"], list(VARIANTS).index(r["variant"]),
                             order[r["position"]], r["norm"]))
    return rows


def print_table(data: dict[str, Any], out=sys.stdout) -> None:
    """The summary: seconds per stage, medians over processes."""
    meta = data["meta"]
    print(f"\n== Compile time of one training step on {harness.machine_name(meta['machine'])}"
          f" ({meta['backend']}, jax {meta['jax']}); fresh processes, both orders; seconds, "
          f"median over processes; load average {meta.get('loadavg_before')} before, "
          f"{meta.get('loadavg_after')} after", file=out)
    print("   first: the process's first step compile (after the backend set-up); second: "
          "after the other BN's step; warm: the first step compiled again", file=out)
    head = (f"{'model':>9} {'dtype':>8} {'variant':>19} {'BN':>5} {'position':>8} {'n':>2} | "
            f"{'setup':>6} {'trace':>6} {'lower':>6} {'compile':>7} {'(XLA)':>7} {'total':>7}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in data["summary"]:
        print(f"{r['model']:>9} {r['dtype']:>8} {r['variant']:>19} {r['norm']:>5} "
              f"{r['position']:>8} {r['n']:>2} | {r['setup_s']:6.2f} {r['trace_s']:6.2f} "
              f"{r['lower_s']:6.2f} {r['compile_s']:7.2f} {r['xla_s']:7.2f} "
              f"{r['total_s']:7.2f}", file=out)
    ratios = first_compile_ratios(data["summary"])
    if ratios:
        print("\n   jaxbn / flax, first compile (XLA compile; total): " + "; ".join(
            f"{m} {d} {v}: {x:.2f}, {t:.2f}" for (m, d, v), (x, t) in ratios.items()), file=out)
    for r in data["runs"]:
        if "error" in r:
            print(f"   {r['model']} {r['dtype']} {r['variant']} {r['order']}: {r['error']}",
                  file=out)


def first_compile_ratios(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], tuple]:
    """``(model, dtype, variant) -> (xla ratio, total ratio)`` of jaxbn's over flax's first
    compile."""
    first = {(r["model"], r["dtype"], r["variant"], r["norm"]): r for r in rows
             if r["position"] == "first"}
    out = {}
    for (m, d, v, n), r in first.items():
        f = first.get((m, d, v, "flax"))
        if n == "jaxbn" and f and f["xla_s"] > 0 and f["total_s"] > 0:
            out[(m, d, v)] = (r["xla_s"] / f["xla_s"], r["total_s"] / f["total_s"])
    return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,lenet", help=f"some of {MODELS}")
    ap.add_argument("--dtypes", default="float32", help="float32,bfloat16 (ResNet only)")
    ap.add_argument("--variants", default="default",
                    help=f"some of {list(VARIANTS)}; the diagnostics are for XLA:GPU")
    ap.add_argument("--processes", type=int, default=1, help="processes per order")
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    ap.add_argument("--budget-s", type=float, default=3600.0,
                    help="stop starting processes after this many seconds")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the child commands and their XLA_FLAGS; run nothing")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output JSON path")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--order", default="jaxbn,flax", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag, allowed in (("models", MODELS), ("dtypes", ("float32", "bfloat16")),
                          ("variants", VARIANTS)):
        for name in getattr(args, flag).split(","):
            if name not in allowed:
                raise SystemExit(f"--{flag}: expected some of {list(allowed)}, got {name!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.child:
        rec = child(args)
        args.json.write_text(json.dumps(rec, indent=1))
        return rec
    runs = plan(args.models.split(","), args.dtypes.split(","), args.variants.split(","),
                args.processes)
    if args.dry_run:
        for run in runs:
            cmd, env = child_command(run, args.quick, Path("OUT.json"))
            print(f"XLA_FLAGS={env.get('XLA_FLAGS', '')!r} {' '.join(cmd[1:])}")
        return {"runs": runs}
    import jax

    meta = {"machine": harness.machine_info(), "backend": jax.default_backend(),
            "jax": jax.__version__, "args": {k: str(v) if isinstance(v, Path) else v
                                             for k, v in vars(args).items()}}
    print(f"# {harness.machine_name(meta['machine'])}; jax {jax.__version__} "
          f"({meta['backend']}); {len(runs)} processes", flush=True)

    def write(results: list[dict[str, Any]]) -> dict[str, Any]:
        data = {"meta": meta, "runs": results, "summary": summarize(results)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        return data

    # No load guard can make a compile time on a busy machine reliable: the load average
    # before and after is recorded with the numbers instead.
    meta["loadavg_before"] = harness._loadavg()
    results = run_children(runs, args, write)
    meta["loadavg_after"] = harness._loadavg()
    data = write(results)
    print_table(data)
    print(f"# wrote {args.json}", flush=True)
    return data


if __name__ == "__main__":
    main()
