"""The benchmark harness's accounting, and the ResNet benchmark end to end on tiny sizes."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu, harness, resnet

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
    assert resnet._strip(argv, "--processes", "--json") == ["--quick", "--models", "resnet18"]


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
    # The GPU summary reads the same JSON.
    buf = io.StringIO()
    gpu.print_summary({"meta": {"machine": data["meta"]["machine"], "total_s": 1.0},
                       "resnet": {"data": data}}, out=buf)
    assert "resnet18 jaxbn" in buf.getvalue()


def test_harness_doctests():
    import doctest

    result = doctest.testmod(harness, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
