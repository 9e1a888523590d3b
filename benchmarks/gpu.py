"""The BN, LeNet and ResNet benchmarks on one GPU, in one command and one JSON file.

``make bench-gpu`` (``scripts/bench_gpu.sh``) runs ``python -m benchmarks.gpu`` with a Python
whose JAX sees a GPU (this checkout's ``.venv`` when it does, else the machine's ``python3``;
nothing is installed or downloaded). It runs, each in a fresh process with a time limit so
that the whole run stays under :data:`BUDGET_S` (8 minutes):

* ``benchmarks.bn`` at three shapes up to 256x56x56x128, float32 and bfloat16: the fraction of
  the two-pass memory floor (8 tensor passes at the measured copy bandwidth) that jaxbn, flax
  and PyTorch reach in forward+backward;
* ``benchmarks.lenet`` at batch 128 and 1024: images/s of the training program's step vs the
  PyTorch model on CUDA (eager, NCHW and channels-last);
* ``benchmarks.compile_time``: ResNet-18 and LeNet steps compiled with each BN in fresh
  processes (both orders, set-up outside the timed compile; trace, lowering, XLA compile),
  then with XLA:GPU's autotuning off, the fusion autotuner off and compilation statistics;
* ``benchmarks.resnet --fused``: the same steps with BatchNorm fused into ``BatchNormAct``
  against flax and unfused jaxbn, temporary memory and time (bfloat16 first);
* ``benchmarks.resnet``: ResNet-18 (CIFAR, batch 64) and ResNet-50 (64x64, batch 32) steps,
  float32 and bfloat16: jaxbn vs flax time and temporary memory, images/s vs PyTorch
  channels-last and NCHW.

It writes ``benchmarks/results/gpu.json`` (``--json``) holding each benchmark's own JSON under
``bn``, ``lenet``, ``compile``, ``fused`` and ``resnet`` with the run's metadata, and prints
one summary table.
``--cpu-smoke`` runs the same path on the CPU with tiny sizes (to test the script where no
GPU is available); it never writes the default GPU file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "gpu.json"
#: The whole run's limit, seconds.
BUDGET_S = 480

#: name -> (module, GPU arguments, CPU-smoke arguments, time limit in seconds on the GPU)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], int]] = {
    "bn": ("benchmarks.bn",
           # The memory analysis (compile-only, already measured on the CPU) is left out
           # to keep within the budget.
           ["--shapes", "128,12,12,20;256,32,32,64;256,56,56,128", "--repeats", "9",
            "--sample-ms", "10", "--no-memory"],
           ["--shapes", "16,4,4,8", "--repeats", "2", "--sample-ms", "1", "--warmup", "1"],
           100),
    # Eager PyTorch only: torch.compile's first compiles alone would take most of the budget.
    "lenet": ("benchmarks.lenet", ["--batch-sizes", "128,1024", "--peers", "torch_nchw,torch_cl",
                                   "--rounds", "7", "--sample-ms", "50", "--settle-ms", "0"],
              ["--batch-sizes", "16", "--peers", "torch_nchw", "--rounds", "2", "--warmup", "1",
               "--sample-ms", "1", "--settle-ms", "0", "--convs", "flax"], 80),
    # Where a step's compile time goes: ResNet-18 and the LeNet with each BN in fresh
    # processes, then XLA:GPU's autotuning off, the fusion autotuner off, and its compilation
    # statistics; it writes its JSON after every process and stops within its budget.
    "compile": ("benchmarks.compile_time",
                ["--models", "resnet18,lenet", "--budget-s", "90",
                 "--variants", "default,autotune0,no_fusion_autotuner,stats"],
                ["--quick", "--models", "lenet", "--variants", "default,stats"], 100),
    # BatchNorm fused with its activation (BatchNormAct) against flax and unfused jaxbn:
    # temporary memory and time, without the largest-batch search (compiles only, several
    # per variant). It writes its JSON after every configuration, as "resnet" does.
    "fused": ("benchmarks.resnet",
              ["--fused", "--no-max-batch", "--no-torch", "--models", "resnet18,resnet50",
               "--dtypes", "bfloat16,float32", "--rounds", "3", "--sample-ms", "50"],
              ["--fused", "--quick", "--no-max-batch", "--no-torch", "--models", "resnet18",
               "--dtypes", "bfloat16", "--rounds", "1"], 100),
    # Last, and it writes its JSON after every configuration: a time-out keeps what ran.
    "resnet": ("benchmarks.resnet", ["--rounds", "7", "--sample-ms", "50"],
               ["--quick", "--models", "resnet18", "--dtypes", "float32", "--rounds", "1"],
               100),
}


def run_all(cpu_smoke: bool, only: list[str], budget_s: float) -> dict[str, Any]:
    """Runs the benchmarks in child processes; returns their JSON (or errors) by name."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # Let PyTorch and JAX share the GPU instead of JAX taking 75% up front.
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    out: dict[str, Any] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in only:
            module, gpu_args, smoke_args, limit = BENCHMARKS[name]
            left = budget_s - (time.perf_counter() - t_start)
            if left < 20:
                out[name] = {"error": f"skipped: {left:.0f} s of the {budget_s} s budget left"}
                continue
            path = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", module, *(smoke_args if cpu_smoke else gpu_args),
                   "--json", str(path)]
            print(f"\n### {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, timeout=None if cpu_smoke
                                      else min(limit, left), check=False)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            seconds = round(time.perf_counter() - t0, 1)
            if rc == 0 and path.exists():
                out[name] = {"seconds": seconds, "command": cmd[1:-2],
                             "data": json.loads(path.read_text())}
            elif path.exists():  # stopped, but it left partial results
                out[name] = {"seconds": seconds, "command": cmd[1:-2],
                             "error": f"exit status {rc}; partial results",
                             "data": json.loads(path.read_text())}
            else:
                out[name] = {"seconds": seconds, "command": cmd[1:-2],
                             "error": f"exit status {rc}"}
    return out


def bn_rows(bn: Any) -> list[dict[str, Any]]:
    """One row per shape and dtype: forward+backward ms and the fraction of the 8-pass floor."""
    rows = []
    for r in bn.get("results", []):
        m = r["fwdbwd"]
        frac = m["floor_frac"]
        tb = m.get("torch_best")
        rows.append({"shape": "x".join(map(str, r["shape"])), "dtype": r["dtype"],
                     "jaxbn_ms": m["median_ms"]["jaxbn"], "floor_ms": m["floor_ms"],
                     "copy_GBps": m["copy_GBps"], "jaxbn": frac.get("jaxbn"),
                     "flax_fast": frac.get("flax_fast"), "flax_2pass": frac.get("flax_2pass"),
                     "torch_best": frac.get(tb) if tb else None, "torch_layout": tb})
    return rows


def model_rows(lenet: Any, resnet: Any) -> list[dict[str, Any]]:
    """Images/s of our step and of PyTorch's best layout, for every model, batch and dtype."""
    rows = []
    for r in (lenet or {}).get("results", []):
        base = r["base"]
        peers = [k for k in r["ms"] if k.startswith("torch")]
        best = min(peers, key=lambda k: r["ms"][k]["median"]) if peers else None
        rows.append({"model": f"lenet {base}", "dtype": "float32", "batch": r["batch"],
                     "ours": r["batch"] / r["ms"][base]["median"] * 1e3,
                     "torch": r["batch"] / r["ms"][best]["median"] * 1e3 if best else None,
                     "torch_layout": best,
                     "speed_vs_torch": r["speed"][best]["median"] if best else None})
    for r in (resnet or {}).get("results", []):
        names = [k for k in ("torch_cl", "torch_nchw") if k in r["ms"]]
        best = min(names, key=lambda k: r["ms"][k]["median"]) if names else None
        ours = r["batch"] / r["ms"]["jaxbn"]["median"] * 1e3
        flax = r["batch"] / r["ms"]["flax"]["median"] * 1e3
        torch_ips = r["batch"] / r["ms"][best]["median"] * 1e3 if best else None
        ratio = r["ratio"].get(best, {}).get("median") if best else None
        rows.append({"model": f"{r['model']} jaxbn", "dtype": r["dtype"], "batch": r["batch"],
                     "ours": ours, "flax": flax, "torch": torch_ips, "torch_layout": best,
                     # ratio is jaxbn time / torch time: speed is its inverse.
                     "speed_vs_torch": 1 / ratio if ratio else None,
                     "time_vs_flax": r["ratio"]["flax"]["median"],
                     "temp_vs_flax": r["temp_ratio"]})
    return rows


def print_summary(data: dict[str, Any], out=sys.stdout) -> None:
    """The summary table of a :func:`main` result."""
    meta = data["meta"]
    print(f"\n== {harness.machine_name(meta['machine'])}; total {meta['total_s']} s", file=out)
    for name in BENCHMARKS:
        entry = data.get(name, {})
        if "error" in entry:
            print(f"   {name}: {entry['error']}", file=out)
    rows = bn_rows(data.get("bn", {}).get("data", {}))
    if rows:
        print("\nBN forward+backward: fraction of the two-pass floor (8 tensor passes at copy "
              "bandwidth; 1.0 = at the floor)", file=out)
        head = (f"{'shape':>15} {'dtype':>8} | {'jaxbn ms':>9} {'floor ms':>9} {'copy GB/s':>9} | "
                f"{'jaxbn':>6} {'flax':>6} {'flax2p':>6} {'torch':>6}")
        print(head, file=out)
        print("-" * len(head), file=out)
        for r in rows:
            print(f"{r['shape']:>15} {r['dtype']:>8} | {harness.fmt(r['jaxbn_ms'], '.3f', 9)} "
                  f"{harness.fmt(r['floor_ms'], '.3f', 9)} {harness.fmt(r['copy_GBps'], '.0f', 9)}"
                  f" | {harness.fmt(r['jaxbn'], '.2f', 6)} {harness.fmt(r['flax_fast'], '.2f', 6)}"
                  f" {harness.fmt(r['flax_2pass'], '.2f', 6)} "
                  f"{harness.fmt(r['torch_best'], '.2f', 6)}", file=out)
    compile_data = data.get("compile", {}).get("data")
    if compile_data and compile_data.get("summary"):
        from benchmarks import compile_time

        compile_time.print_table(compile_data, out=out)
    fused = data.get("fused", {}).get("data")
    if fused and fused.get("results"):
        from benchmarks import resnet

        resnet.print_fused_table(fused, out=out)
    rows = model_rows(data.get("lenet", {}).get("data"), data.get("resnet", {}).get("data"))
    if rows:
        print("\nTraining steps: images/s, ours vs PyTorch's best layout (speed > 1: ours "
              "faster); ResNet also jaxbn/flax time and temporary memory", file=out)
        head = (f"{'model':>18} {'dtype':>8} {'batch':>5} | {'ours img/s':>11} {'torch img/s':>11}"
                f" {'layout':>10} {'speed':>6} | {'t/flax':>6} {'mem/flax':>8}")
        print(head, file=out)
        print("-" * len(head), file=out)
        for r in rows:
            print(f"{r['model']:>18} {r['dtype']:>8} {r['batch']:>5} | "
                  f"{harness.fmt(r['ours'], '.0f', 11)} {harness.fmt(r['torch'], '.0f', 11)} "
                  f"{r['torch_layout'] or '-':>10} {harness.fmt(r['speed_vs_torch'], '.2f', 6)} | "
                  f"{harness.fmt(r.get('time_vs_flax'), '.3f', 6)} "
                  f"{harness.fmt(r.get('temp_vs_flax'), '.2f', 8)}", file=out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run on the CPU with tiny sizes (tests the script; no GPU needed)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="limit of the whole run")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"output (default {DEFAULT_JSON.name} in benchmarks/results; "
                         "--cpu-smoke: gpu-cpu-smoke.json in the temp dir)")
    args = ap.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    for n in only:
        if n not in BENCHMARKS:
            raise SystemExit(f"--only: expected some of {list(BENCHMARKS)}, got {n!r}")
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    platform = jax.default_backend()
    if platform != "gpu" and not args.cpu_smoke:
        raise SystemExit(f"benchmarks.gpu: expected JAX to see a GPU, got backend {platform!r} "
                         f"({jax.devices()[0]}); use a Python with CUDA-enabled jaxlib "
                         "(scripts/bench_gpu.sh picks one), or --cpu-smoke to test the script")
    path = args.json or (Path(tempfile.gettempdir()) / "gpu-cpu-smoke.json" if args.cpu_smoke
                         else DEFAULT_JSON)
    meta: dict[str, Any] = {"machine": harness.machine_info(), "python": sys.executable,
                            "cpu_smoke": args.cpu_smoke, "budget_s": args.budget_s}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        meta["torch"] = None
    print(f"# {harness.machine_name(meta['machine'])}; jax {jax.__version__}; torch "
          f"{meta['torch']}; {sys.executable}", flush=True)
    t0 = time.perf_counter()
    data: dict[str, Any] = {"meta": meta, **run_all(args.cpu_smoke, only, args.budget_s)}
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    print_summary(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"# wrote {path}", flush=True)
    return data


if __name__ == "__main__":
    main()
