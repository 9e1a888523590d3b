"""One LeNet-BN training step: the training program's vs PyTorch's, eager and compiled.

Run ``python -m benchmarks.lenet`` (``--help`` for the flags; ``--processes 3`` repeats the
whole measurement in fresh processes and reports medians over them). At each batch size
(128 and 512 by default) it times, interleaved and paired (:mod:`benchmarks.harness`):

* ``ours``: the training program's step exactly -- :func:`train.steps.make_train_step` over
  the program's mesh (one device), its state replicated and the batch placed as the program
  places them; uint8 images in, preprocessing, forward, cross-entropy, backward, SGD with
  momentum, BN statistics, the state donated; one jitted call (``--convs fast,flax`` adds
  ``ours_flax``, the same step with ``flax.linen.Conv``);
* ``torch_nchw``, ``torch_cl``: the source chapter's PyTorch model (:func:`train.port.torch_lenet`)
  in eager mode, NCHW and ``channels_last`` (model and input), float32 input prepared
  beforehand; ``zero_grad``, forward, cross-entropy, ``backward``, ``SGD(momentum=0.9)``;
* ``torch_compile``, ``torch_compile_cl``: the same step function under ``torch.compile``
  (inductor, default mode), NCHW and channels-last. Its compile time (the first two calls,
  with a fresh inductor cache directory, as a new user sees it) is reported separately, as
  is our step's (``.lower().compile()``).

Every call runs one step and waits for it (``block_until_ready`` / ``loss.item()``). The
process starts as the training program does (:func:`train.runtime.tune_allocator`, before
any thread exists; ``--malloc default`` leaves glibc's defaults), both sides get the same
CPUs and thread count (:func:`benchmarks.harness.configure_threads`, OpenMP's own wait
policy: PyTorch's fastest) and each sample starts after ``--settle-ms`` of sleep so that the
other side's threads have stopped spinning. ``speed`` = the peer's time / ours, the median
over rounds of the paired ratios (> 1: ours is faster); with ``--processes`` the median over
processes of those medians, with their range. ``faults/step``: minor page faults per step
(``getrusage``), the median over samples. The load guard checks other processes' CPU use
before and during every round; when it exceeds 0.15 cores the result is marked
``reliable: false`` and a warning names the competitors.

Results are printed as a table (and as docs/performance.md's Markdown table) and written as JSON
(``benchmarks/results/lenet.json`` or ``--json PATH``); ``--show A.json B.json`` prints the
tables of saved results, e.g. of one run per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "lenet.json"
TORCH_PEERS = ("torch_nchw", "torch_cl", "torch_compile", "torch_compile_cl")
NUM_CLASSES = 10
LR = 0.05
SGD_MOMENTUM = 0.9


def _batch(batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    return images, labels


def program_step(batch: int, conv: str = "fast") -> tuple[Callable[[], None], dict[str, Any]]:
    """The training program's compiled step on a fixed batch, as a zero-argument runner.

    Args:
        batch: global batch size.
        conv: the model's ``conv`` option (``'fast'`` or ``'flax'``).

    Returns:
        ``(run, info)``: ``run()`` takes one step and waits for it; ``info`` has
        ``compile_s`` (lowering and compiling), ``temp_MiB`` (the compiled step's temporary
        buffer) and ``first_loss``.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from train import config, data, distributed, steps

    cfg = config.Config(batch_size=batch, conv=conv, lr=LR)
    model = steps.make_model(cfg, NUM_CLASSES)
    tx = steps.make_optimizer(cfg, 100)
    mesh = distributed.global_mesh(jax.devices()[:1])
    state = steps.create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    images, labels = distributed.make_global_batch(_batch(batch), mesh)
    mean, std = data.pixel_stats("fashion_mnist")
    step = steps.make_train_step(model, mean, std, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    info: dict[str, Any] = {"compile_s": time.perf_counter() - t0,
                            "temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20}
    box = [state]

    def run() -> None:
        box[0], metrics = compiled(box[0], images, labels)
        metrics["loss"].block_until_ready()

    box[0], metrics = compiled(box[0], images, labels)
    info["first_loss"] = float(metrics["loss"])
    return run, info


def torch_step(torch: Any, device: str, batch: int, peer: str,
               cache_dir: str | None = None) -> tuple[Callable[[], None], dict[str, Any]]:
    """PyTorch's step for ``peer`` (one of :data:`TORCH_PEERS`) as a zero-argument runner.

    Returns:
        ``(run, info)``; for the compiled peers ``info['compile_s']`` is the time of the
        first two calls (tracing, inductor's code generation and compilation).
    """
    from train.port import torch_lenet

    images, labels = _batch(batch)
    channels_last = peer.endswith("_cl")
    torch.manual_seed(0)
    model = torch_lenet(NUM_CLASSES).to(device).train()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype("float32") / 255.0).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels.astype("int64")).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=SGD_MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    info: dict[str, Any] = {}
    if peer.startswith("torch_compile"):
        if cache_dir is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        step = torch.compile(step)
        t0 = time.perf_counter()
        step().item()
        step().item()
        info["compile_s"] = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        step().item()
        sync()

    return run, info


def run_batch(batch: int, args: argparse.Namespace, torch: Any, device: str | None,
              guard: harness.LoadGuard) -> dict[str, Any]:
    """Builds every contender at one batch size and times them, interleaved."""
    rec: dict[str, Any] = {"batch": batch, "compile_s": {}}
    runners: dict[str, Callable[[], None]] = {}
    for conv in args.convs:
        name = "ours" if conv == "fast" else f"ours_{conv}"
        runners[name], info = program_step(batch, conv)
        rec["compile_s"][name] = info["compile_s"]
        rec[f"{name}_temp_MiB"] = info["temp_MiB"]
        rec[f"{name}_first_loss"] = info["first_loss"]
    if torch is not None:
        for peer in args.peers:
            cache = os.path.join(args.inductor_cache, f"{peer}_{batch}")
            try:
                runners[peer], info = torch_step(torch, device, batch, peer, cache)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor
                print(f"  {peer}: unavailable ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            if "compile_s" in info:
                rec["compile_s"][peer] = info["compile_s"]
    base = "ours" if "ours" in runners else next(iter(runners))
    res = harness.interleaved(runners, base, rounds=args.rounds, warmup=args.warmup,
                              sample_s=args.sample_ms / 1e3, max_inner=args.max_inner,
                              guard=guard, label=f"batch {batch}",
                              settle_s=args.settle_ms / 1e3)
    st = res.stats()
    rec["base"] = base
    rec["ms"] = st["ms"]
    rec["faults_per_step"] = st["faults_per_call"]
    # harness ratios are base time / peer time; speed is the peer's time over ours.
    rec["speed"] = {k: _inverse(v) for k, v in st["ratio"].items()}
    rec["inner"] = st["inner"]
    rec["foreign_cores"] = res.foreign_cores
    rec["reliable"] = all(f <= guard.max_foreign_cores for f in res.foreign_cores)
    return rec


def _inverse(s: dict[str, Any]) -> dict[str, Any]:
    """Summary of ``1 / x`` from the summary of ``x`` (quartiles swap)."""
    def inv(v):
        return None if v is None else 1.0 / v

    return {"median": inv(s["median"]), "q1": inv(s["q3"]), "q3": inv(s["q1"]), "n": s["n"]}


def merge(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merges several processes' JSON: medians over processes of each process's medians."""
    first = runs[0]
    meta = {**first["meta"], "processes": len(runs),
            "reliable": all(r["meta"]["reliable"] for r in runs),
            "guards": [r["meta"]["guard"] for r in runs]}
    meta.pop("guard", None)
    out = {"meta": meta, "results": []}
    for i, rec in enumerate(first["results"]):
        recs = [r["results"][i] for r in runs]
        m: dict[str, Any] = {"batch": rec["batch"], "base": rec["base"],
                             "reliable": all(r["reliable"] for r in recs)}
        for key in ("ms", "speed", "faults_per_step"):
            m[key] = {}
            for impl in rec[key]:
                meds = [r[key][impl]["median"] for r in recs]
                m[key][impl] = {"median": statistics.median(meds), "per_process": meds,
                                "min": min(meds), "max": max(meds)}
        m["compile_s"] = {impl: {"median": statistics.median(r["compile_s"][impl] for r in recs),
                                 "per_process": [r["compile_s"][impl] for r in recs]}
                          for impl in rec["compile_s"]}
        for key in rec:
            if key.endswith(("_temp_MiB", "_first_loss")):
                m[key] = rec[key]
        m["foreign_cores"] = [f for r in recs for f in r["foreign_cores"]]
        out["results"].append(m)
    return out


def _median(entry: Any) -> float | None:
    return entry.get("median") if isinstance(entry, dict) else entry


def _load_line(data: dict[str, Any]) -> str:
    meta = data["meta"]
    foreign = [f for r in data["results"] for f in r["foreign_cores"]]
    loads = [g.get("loadavg_start") for g in meta.get("guards", [meta.get("guard", {})])]
    loads = [g[0] for g in loads if g]
    return (f"other processes' CPU use during the rounds: median "
            f"{statistics.median(foreign) if foreign else 0:.2f} cores, max "
            f"{max(foreign, default=0):.2f}; 1-min load average at start "
            f"{', '.join(f'{v:.1f}' for v in loads) or '-'}")


def print_table(data: dict[str, Any], out=sys.stdout) -> None:
    """The results as a text table, then the same as a Markdown table."""
    meta = data["meta"]
    results = data["results"]
    impls = [k for k in results[0]["ms"]] if results else []
    peers = [k for k in impls if k != results[0]["base"]]
    print(f"\n== LeNet-BN training step on {harness.machine_name(meta['machine'])}; "
          f"{meta.get('processes', 1)} process(es); reliable={meta['reliable']}", file=out)
    print(f"   {_load_line(data)}", file=out)
    print("   ms: median step time; speed: peer time / our time, median of paired rounds "
          "(> 1: ours faster); flt: minor page faults per step", file=out)
    head = f"{'batch':>5} | " + " ".join(f"{k:>16}" for k in impls) + " | " + " ".join(
        f"{'vs ' + k:>19}" for k in peers) + " | " + " ".join(f"{'flt ' + k:>10}"
                                                               for k in impls)
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in results:
        ms = " ".join(harness.fmt(_median(r["ms"][k]), ".2f", 16) for k in impls)
        sp = " ".join(harness.fmt(_median(r["speed"].get(k)), ".3f", 19) for k in peers)
        fl = " ".join(harness.fmt(_median(r["faults_per_step"][k]), ".0f", 10) for k in impls)
        print(f"{r['batch']:>5} | {ms} | {sp} | {fl}", file=out)
    for r in results:
        comp = ", ".join(f"{k} {_median(v):.1f} s" for k, v in r["compile_s"].items())
        print(f"   batch {r['batch']}: compile {comp}; our step's temporary buffer "
              f"{r.get('ours_temp_MiB', float('nan')):.1f} MiB", file=out)
    print("\nMarkdown:\n", file=out)
    print(markdown(data), file=out)


def markdown(data: dict[str, Any]) -> str:
    """The performance page's table: per batch, our time, each peer's time and our speed."""
    results = data["results"]
    base = results[0]["base"]
    peers = [k for k in results[0]["ms"] if k != base]
    multi = data["meta"].get("processes", 1) > 1
    head = ["batch", f"{base} ms", *(f"{p} ms" for p in peers),
            *(f"speed vs {p}" for p in peers), "faults/step (ours, torch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r["batch"]), f"{_median(r['ms'][base]):.1f}"]
        cells += [f"{_median(r['ms'][p]):.1f}" for p in peers]
        for p in peers:
            s = r["speed"][p]
            cell = f"{_median(s):.2f}"
            if multi:
                cell += f" ({s['min']:.2f}–{s['max']:.2f})"
            cells.append(cell)
        torch_faults = [_median(r["faults_per_step"][p]) for p in peers]
        cells.append(f"{_median(r['faults_per_step'][base]):.0f}, "
                     f"{max(torch_faults, default=0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(data: dict[str, Any], path: Path) -> None:
    print_table(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    best = {}
    for r in data["results"]:
        speeds = [_median(v) for v in r["speed"].values() if _median(v) is not None]
        if speeds:
            best[r["batch"]] = min(speeds)
    print(f"# wrote {path}", flush=True)
    print("speed_vs_fastest_peer: " + (" ".join(f"batch{b}={s:.3f}" for b, s in best.items())
                                       or "-"), flush=True)


def show(paths: Sequence[Path]) -> dict[str, Any]:
    """Prints the tables of saved results (several files, e.g. one per batch size, in turn)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    meta = {**runs[0]["meta"], "reliable": all(r["meta"]["reliable"] for r in runs),
            "guards": [g for r in runs
                       for g in r["meta"].get("guards", [r["meta"].get("guard", {})])]}
    data = {"meta": meta, "results": [rec for r in runs for rec in r["results"]]}
    print_table(data)
    return data


def _parse_list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [t for t in text.split(",") if t]
    for t in items:
        if t not in allowed:
            raise SystemExit(f"{flag}: expected some of {list(allowed)}, got {t!r}")
    return items


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="128,512", help="comma-separated")
    ap.add_argument("--peers", default=",".join(TORCH_PEERS),
                    help=f"PyTorch contenders, comma-separated (of {','.join(TORCH_PEERS)})")
    ap.add_argument("--convs", default="fast", help="our conv options to time (fast,flax)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds per batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each contender")
    ap.add_argument("--sample-ms", type=float, default=150.0,
                    help="minimum length of one timing sample")
    ap.add_argument("--settle-ms", type=float, default=50.0,
                    help="untimed sleep before each sample (spinning threads go idle)")
    harness.add_model_args(ap, DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.show:
        return show(args.show)
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    args.peers = _parse_list(args.peers, TORCH_PEERS, "--peers")
    args.convs = _parse_list(args.convs, ("fast", "flax"), "--convs")
    if not args.convs:
        raise SystemExit("--convs: expected at least one of fast,flax")

    if args.processes > 1:
        data = merge(harness.run_processes("benchmarks.lenet", argv, args.processes))
        _write(data, args.json)
        return data

    meta, threads, _, torch, device = harness.start_model_run(args)
    import jax

    print(f"# {harness.machine_name(meta['machine'])}; jax {jax.__version__}, torch "
          f"{meta.get('torch')} ({device}); {threads} threads; "
          f"malloc {meta['malloc'] or 'default'}", flush=True)
    guard = harness.LoadGuard()
    meta["probe"] = guard.probe()
    records = []
    t_start = time.perf_counter()
    # A fresh inductor cache for every compiled step (kept until exit: compiled kernels are
    # loaded from it), so that its compile time is a first compile's.
    with tempfile.TemporaryDirectory(prefix="lenet_inductor_") as cache:
        args.inductor_cache = cache
        for batch in batches:
            rec = run_batch(batch, args, torch, device, guard)
            records.append(rec)
            print(f"  batch {batch}: " + ", ".join(
                f"{k} {v['median']:.2f} ms" for k, v in rec["ms"].items()), flush=True)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    meta["guard"] = guard.report()
    meta["reliable"] = meta["guard"]["reliable"]
    data = {"meta": meta, "results": records}
    _write(data, args.json)
    return data


if __name__ == "__main__":
    main()
