"""The PyTorch parity tests once more, compiled with XLA's default code generation.

The session compiles with cheaper code generation (:data:`tests.compile_cache.XLA_FLAGS`);
users' programs compile with XLA's defaults. This runs tests/test_parity_torch.py (every BN
layout and dimension against PyTorch at float32 tolerances) in a pytest process without those
flags, so that the tightest parity checks also hold for the code users get. About 15 s of CPU.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import compile_cache

REPO = Path(__file__).resolve().parents[1]


def test_torch_parity_holds_with_xla_default_code_generation():
    pytest.importorskip("torch")  # as tests/test_parity_torch.py itself
    env = {**os.environ, compile_cache.DEFAULTS_VARIABLE: "1"}  # its conftest drops the flags
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
         "-p", "no:xdist", "tests/test_parity_torch.py", "-o", "addopts="],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = re.search(r"(\d+) passed", proc.stdout)
    assert summary and int(summary.group(1)) >= 30 and "skipped" not in proc.stdout, tail
