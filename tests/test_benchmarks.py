"""The benchmark harness's accounting, and the LeNet and ResNet benchmarks end to end, tiny."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compile_time, gpu, harness, lenet, resnet

REPO = Path(__file__).resolve().parents[1]


def _snap(wall, busy, procs):
    return harness._Snapshot(wall, busy, busy * 2, procs)


def test_load_guard_counts_other_processes_only():
    me = os.getpid()
    hz = harness._HZ
    a = _snap(0.0, 0, {me: (1, "me", 0), me + 1: (me, "child", 0), 10: (1, "other", 0)})
    # Over 2 s: our process and our child each use 2 s of CPU, "other" 1 s (0.5 cores), and
    # a process that started in the window 0.4 s (0.2 cores).
    b = _snap(2.0, 6 * hz, {me: (1, "me", 2 * hz), me + 1: (me, "child", 2 * hz),
                            10: (1, "other", hz), 11: (1, "new", int(0.4 * hz))})
    guard = harness.LoadGuard(max_foreign_cores=0.6, verbose=False)
    rec = guard._measure("w", a, b)
    assert rec["foreign_cores"] == pytest.approx(0.7, abs=1e-3)
    assert rec["own_cores"] == pytest.approx(2.0, abs=1e-3)
    assert [t["comm"] for t in rec["top"]] == ["other", "new"]
    assert not rec["ok"] and not guard.reliable
    assert guard.report()["unreliable_windows"] == ["w"]
    quiet = harness.LoadGuard(max_foreign_cores=0.8, verbose=False)
    assert quiet._measure("w", a, b)["ok"] and quiet.reliable


def test_interleaved_pairs_each_peer_with_the_base_samples_around_it(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def cost(seconds):
        def call():
            clock[0] += seconds
        return call

    # The base slows down over time (drift): each base call costs 1 ms more than the last.
    drift = [0.010]

    def base():
        clock[0] += drift[0]
        drift[0] += 0.001

    res = harness.interleaved({"base": base, "fast": cost(0.005), "slow": cost(0.040)}, "base",
                              rounds=4, warmup=0, sample_s=0.0, max_inner=1)
    assert res.inner == {"base": 1, "fast": 1, "slow": 1}
    assert len(res.times["base"]) == 4 * 3 and len(res.ratios["fast"]) == 4
    # Each ratio uses the mean of the two adjacent base samples, so it follows the drift.
    for r in range(4):
        assert 0.010 / 0.040 < res.ratios["slow"][r] < 0.030 / 0.040
    st = res.stats()
    assert st["ms"]["slow"]["median"] == pytest.approx(40.0)
    assert st["ratio"]["fast"]["median"] > 2.0 and st["ratio"]["slow"]["median"] < 0.75
    with pytest.raises(ValueError, match="base: expected one of"):
        harness.interleaved({"a": base}, "b", rounds=1)


def test_calibrate_and_summary(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += 0.002

    assert harness._calibrate(call, target_s=0.005, max_inner=50) == 3
    assert harness._calibrate(call, target_s=1.0, max_inner=50) == 50
    assert harness.summary([]) == {"median": None, "q1": None, "q3": None, "n": 0}
    with pytest.raises(ValueError, match="threads: expected 1.."):
        harness.configure_threads(0)


def test_strip_removes_flags_and_values():
    argv = ["--quick", "--processes", "3", "--json=x.json", "--models", "resnet18"]
    assert harness.strip_flags(argv, "--processes", "--json") == ["--quick", "--models", "resnet18"]


def test_resnet_quick_end_to_end(tmp_path):
    """One tiny ResNet-18 in float32: flax and jaxbn agree, memory and ratios are reported."""
    out = tmp_path / "resnet.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.resnet", "--quick", "--models", "resnet18",
         "--dtypes", "float32", "--rounds", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["machine"]["cpu_model"]
    assert isinstance(data["meta"]["reliable"], bool)
    (rec,) = data["results"]
    assert (rec["model"], rec["dtype"], rec["batch"]) == ("resnet18", "float32", 8)
    assert rec["losses_agree"], (rec["jaxbn"]["first_loss"], rec["flax"]["first_loss"])
    assert rec["jaxbn"]["temp_bytes"] > 0 and rec["flax"]["temp_bytes"] > 0
    assert rec["ratio"]["flax"]["median"] > 0 and rec["ms"]["jaxbn"]["median"] > 0
    if importlib.util.find_spec("torch") is not None:
        assert {"torch_cl", "torch_nchw"} <= set(rec["ms"])
    assert "resnet18" in proc.stdout and "temp" in proc.stdout
    # --show prints the same tables again from the saved JSON (twice over: two runs' rows).
    shown = resnet.show([out, out])
    assert len(shown["results"]) == 2
    assert resnet.markdown(shown).count("| resnet18 | float32 | 8 |") == 2
    # The GPU summary reads the same JSON.
    buf = io.StringIO()
    gpu.print_summary({"meta": {"machine": data["meta"]["machine"], "total_s": 1.0},
                       "resnet": {"data": data}}, out=buf)
    assert "resnet18 jaxbn" in buf.getvalue()


def test_lenet_end_to_end_in_two_processes(tmp_path):
    """Our step vs PyTorch eager, merged over two fresh processes: speeds, faults, Markdown."""
    out = tmp_path / "lenet.json"
    has_torch = importlib.util.find_spec("torch") is not None
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lenet", "--batch-sizes", "16", "--rounds", "2",
         "--warmup", "1", "--sample-ms", "1", "--settle-ms", "0", "--processes", "2",
         "--peers", "torch_nchw,torch_cl", *([] if has_torch else ["--no-torch"]),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["processes"] == 2 and len(meta["guards"]) == 2
    assert isinstance(meta["reliable"], bool)
    (rec,) = data["results"]
    assert rec["batch"] == 16 and rec["base"] == "ours"
    assert rec["ms"]["ours"]["median"] > 0 and len(rec["ms"]["ours"]["per_process"]) == 2
    assert rec["faults_per_step"]["ours"]["median"] >= 0
    assert rec["ours_temp_MiB"] > 0 and rec["compile_s"]["ours"]["median"] > 0
    if has_torch:
        for peer in ("torch_nchw", "torch_cl"):
            s = rec["speed"][peer]
            assert s["min"] <= s["median"] <= s["max"] and s["median"] > 0
        assert "speed vs torch_cl" in lenet.markdown(data)
        buf = io.StringIO()
        gpu.print_summary({"meta": {"machine": meta["machine"], "total_s": 1.0},
                           "lenet": {"data": data}}, out=buf)
        assert "lenet ours" in buf.getvalue()
    assert "speed_vs_fastest_peer" in proc.stdout
    shown = lenet.show([out, out])
    assert [r["batch"] for r in shown["results"]] == [16, 16]
    assert len(shown["meta"]["guards"]) == 4


def test_lenet_speed_is_the_peers_time_over_ours():
    # The harness's ratio is base (our) time / peer time; the benchmark reports its inverse,
    # with the quartiles swapped.
    ratio = harness.summary([0.5, 0.25, 1.0, 2.0])  # ours 2x faster in the median round
    speed = lenet._inverse(ratio)
    assert speed["median"] == pytest.approx(1 / ratio["median"])
    assert (speed["q1"], speed["q3"]) == (1 / ratio["q3"], 1 / ratio["q1"])
    assert speed["q1"] <= speed["median"] <= speed["q3"]


def test_harness_doctests():
    import doctest

    result = doctest.testmod(harness, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_compile_time_fresh_processes_both_orders_and_gpu_diagnostics(tmp_path, monkeypatch):
    """The tiny LeNet step with each BN, compiled in fresh processes in both orders, stages
    timed apart, a warm recompile; the XLA:GPU statistics variant runs the same path (its
    options exist on the CPU and change nothing). About 25 s of CPU."""
    out = tmp_path / "compile.json"
    data = compile_time.main(["--quick", "--models", "lenet", "--variants", "default,stats",
                              "--json", str(out)])
    runs = data["runs"]
    assert [(r["variant"], r["order"]) for r in runs] == [
        ("default", ["jaxbn", "flax"]), ("default", ["flax", "jaxbn"]),
        ("stats", ["jaxbn"]), ("stats", ["flax"])]
    assert all("error" not in r and r["setup_s"] > 0 for r in runs)
    assert [(c["norm"], c["position"]) for c in runs[1]["compiles"]] == [
        ("flax", "first"), ("jaxbn", "second"), ("flax", "warm")]
    for c in (c for r in runs for c in r["compiles"]):
        assert min(c["trace_s"], c["lower_s"], c["compile_s"], c["xla_s"]) > 0, c
        assert c["xla_s"] <= c["compile_s"] and c["trace_event_s"] <= c["trace_s"]
    assert "log_tail" in runs[2]  # the statistics variant keeps its log
    rows = {(r["variant"], r["norm"], r["position"]): r for r in data["summary"]}
    assert rows[("default", "jaxbn", "first")]["n"] == 1
    assert set(compile_time.first_compile_ratios(data["summary"])) == {
        ("lenet", "float32", "default"), ("lenet", "float32", "stats")}
    assert json.loads(out.read_text())["summary"] == data["summary"]
    # The LeNet and ResNet benchmarks' --compile-time hand over to it.
    monkeypatch.setattr(compile_time, "main", lambda argv: argv)
    assert lenet.main(["--compile-time", "--json", str(out)]) == [
        "--models", "lenet", "--processes", "1", "--json", str(out)]
    assert resnet.main(["--compile-time", "--quick", "--models", "resnet50"])[:2] == [
        "--models", "resnet50"]


def test_compile_time_gpu_diagnostics_dry_run():
    """What ``make bench-gpu`` runs on a GPU, without one: each diagnostic in its own process
    with its XLA flag or compiler option."""
    _, gpu_args, _, limit = gpu.BENCHMARKS["compile"]
    runs = compile_time.plan(["resnet18"], ["float32"], gpu_args[-1].split(","), 1)
    assert len(runs) == 8 and {r["variant"] for r in runs} == set(compile_time.VARIANTS)
    for run in runs:
        cmd, env = compile_time.child_command(run, False, Path("x.json"))
        flags, options = compile_time.VARIANTS[run["variant"]]
        assert all(f in env.get("XLA_FLAGS", "") for f in flags)
        assert "--child" in cmd and run["order"] in cmd
    assert compile_time.VARIANTS["autotune0"][1] == {"xla_gpu_autotune_level": 0}
    assert float(gpu_args[gpu_args.index("--budget-s") + 1]) < limit
    assert sum(b[3] for b in gpu.BENCHMARKS.values()) <= gpu.BUDGET_S


def test_fused_resnet_is_the_jaxbn_resnet():
    """benchmarks.resnet's 'fused' choice: the same model (variables, first loss) as 'jaxbn'."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
    labels = jnp.arange(4, dtype=jnp.int32)
    losses, shapes = {}, {}
    for norm in ("jaxbn", "fused"):
        model = resnet.flax_resnet("resnet18", norm=norm, dtype=jnp.float32, width=4, blocks=1)
        step, tx = resnet.make_step(model)
        v = resnet.init_variables(model, x)
        shapes[norm] = sorted(a.shape for a in jax.tree.leaves(v["params"]))
        losses[norm] = float(step(v["params"], v["batch_stats"], tx.init(v["params"]), x,
                                  labels)[3])
    assert shapes["fused"] == shapes["jaxbn"]
    np.testing.assert_allclose(losses["fused"], losses["jaxbn"], rtol=1e-6)


def test_the_memory_scheduler_option_reaches_xla():
    """--fused's second memory column is compiled by XLA:CPU's memory-optimized scheduler.

    A compiler option XLA does not apply is ignored without a word; this small ResNet step
    needs 34 MiB of temporaries with the default (concurrency-optimized) scheduler and 19 with
    the memory-optimized one, so the two columns must differ.
    """
    import jax.numpy as jnp

    model = resnet.flax_resnet("resnet18", norm="flax", dtype=jnp.float32, width=16, blocks=1)
    default, memory = (resnet._compile_memory(model, 32, 32, options)["temp_bytes"]
                       for options in resnet.CPU_SCHEDULERS.values())
    assert memory < 0.8 * default, (default, memory)


def test_peak_buffers_lists_what_is_live_at_the_peak():
    """benchmarks.peak_buffers reads XLA's live ranges: the kept activations are there."""
    from benchmarks import peak_buffers

    res = peak_buffers.analyse("resnet18", "inplace", "float32", 32, "memory", size=32,
                               width=16, blocks=1)
    temps = [b for b in res["buffers"] if b.temp]
    # What is live in the temporary allocation at the peak fits in it and is most of it
    # (the peak is what sized it).
    live = peak_buffers.occupied(res["buffers"])
    assert 0.5 * res["memory"]["temp_bytes"] < live <= res["memory"]["temp_bytes"]
    assert all(b.offset is not None and b.offset + b.size <= res["memory"]["temp_bytes"]
               for b in temps)
    assert {b.group for b in res["buffers"]} <= {"forward", "backward", "layout copy",
                                                 "unattributed", "update", "argument"}
    # In-Place ABN keeps each BatchNormAct's output (batch 32 x 32 x 32 x 16 float32, 2 MiB).
    kept = [b for b in temps if b.group == "forward" and b.layer.startswith("BatchNormAct")
            and b.size == 32 * 32 * 32 * 16 * 4]
    assert kept, [b[:5] for b in temps[:10]]
    assert any(b.group == "argument" and b.name.startswith("params") for b in res["buffers"])


def test_fused_end_to_end(tmp_path):
    """--fused: every variant under each scheduler, the best one, time; the GPU summary."""
    out = tmp_path / "fused.json"
    data = resnet.main(["--fused", "--quick", "--no-max-batch", "--no-torch", "--models",
                        "resnet18", "--dtypes", "bfloat16", "--rounds", "1", "--json",
                        str(out)])
    assert json.loads(out.read_text())["meta"]["complete"] is True
    (rec,) = data["results"]
    assert rec["fused_loss_agrees"]
    for norm in ("flax", "jaxbn", "fused", "inplace"):
        mem = rec[norm]["memory"]
        assert set(mem) == set(resnet.CPU_SCHEDULERS)
        assert mem[rec[norm]["best"]]["total_bytes"] == min(m["total_bytes"]
                                                            for m in mem.values())
        assert "max_batch" not in rec[norm]  # --no-max-batch
    assert {"fused", "inplace"} <= set(rec["ratio"])
    buf = io.StringIO()
    gpu.print_summary({"meta": {"machine": data["meta"]["machine"], "total_s": 1.0},
                       "fused": {"data": data}}, out=buf)
    assert "| resnet18 | bfloat16 | 8 | inplace |" in buf.getvalue()
