"""The training program's allocator settings: applied by the program, no faults per step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train import runtime

REPO = Path(__file__).resolve().parents[1]

# Starts as `python -m train.lenet` does (its main() up to the argument parser, when asked
# to), then takes the program's compiled step at batch 512 (a ~96 MiB temporary buffer, above
# both glibc's 32 MiB mmap cap and its 64 MiB per-thread heap) and counts minor page faults
# per step in steady state (the median over steps: with the settings, the heap still grows
# during the first few steps, re-faulting the buffer once or twice, then stays put).
_PROBE = """
import json, statistics, sys
from train import lenet
if sys.argv[1] == "program":
    try:
        lenet.main(["--help"])
    except SystemExit:
        pass
from benchmarks import harness, lenet as bench
run, info = bench.program_step(512)
for _ in range(4):
    run()
faults = []
for _ in range(7):
    f0 = harness.minor_faults()
    run()
    faults.append(harness.minor_faults() - f0)
print(json.dumps({"faults": statistics.median(faults), "temp_MiB": info["temp_MiB"]}))
"""


def _faults_per_step(*modes: str) -> list[dict]:
    """Each mode's probe in its own process, the processes side by side (faults, not time)."""
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE, mode], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for mode in modes]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(not runtime.glibc_available(), reason="mallopt is glibc's")
def test_training_program_step_takes_no_page_faults():
    tuned, default = _faults_per_step("program", "default")
    pages = default["temp_MiB"] * 2**20 / 4096
    # glibc's defaults map the step's temporaries afresh on every step: one fault per page.
    assert default["faults"] > 0.5 * pages, (default, pages)
    # With the program's settings they stay in the heap (slack for Python's own). Under a
    # fully loaded machine (the suite's parallel workers) a tuned process has been seen,
    # in a few of the suite's runs, to fault its whole buffer on every step; the cause is
    # not known. A second process must then show the settings working: if the settings are
    # broken, every process faults and this fails.
    if tuned["faults"] >= 0.01 * pages:
        (tuned,) = _faults_per_step("program")
    assert tuned["faults"] < 0.01 * pages, (tuned, pages)


def test_tune_allocator_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setattr(runtime, "glibc_available", lambda: False)
    assert runtime.tune_allocator() == {}
    assert runtime.tune_allocator() == {}  # idempotent
