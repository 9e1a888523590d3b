"""haiku's own BatchNorm tests, run with haiku's BatchNorm swapped for jaxbn's.

The test of "drop-in": haiku's tests ship inside its package (``haiku/_src/*_test.py``),
so they run from the installed copy, nothing copied here. One pytest process runs the tests
listed below with the plugin ``tests/haiku_swap.py``, which sets ``haiku.BatchNorm`` and
``haiku._src.batch_norm.BatchNorm`` to :class:`jaxbn.haiku.BatchNorm` before haiku's test
modules import them, on eight fake CPU devices (haiku's cross-replica tests need several).

The list: every BatchNorm test of ``batch_norm_test.py`` and every test of
``integration/jax_transforms_test.py`` and ``integration/hk_transforms_test.py`` that
constructs a BatchNorm (found by running those files whole with construction recorded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import haiku

REPO = Path(__file__).resolve().parent.parent
SITE = Path(haiku.__file__).resolve().parent.parent

#: haiku's tests that build a BatchNorm, relative to the installed package's parent.
HAIKU_BATCHNORM_TESTS = (
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_basic",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_eps_cast_to_var_dtype",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_no_offset_beta_init_provided",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_no_scale_and_init_provided",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_no_scale_and_offset",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_no_type_promotion",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_simple_training",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_simple_training_cross_replica_axis",
    "haiku/_src/batch_norm_test.py::BatchNormTest::"
    "test_simple_training_cross_replica_axis_index_groups",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_simple_training_nchw",
    "haiku/_src/batch_norm_test.py::BatchNormTest::test_simple_training_normalized_axes",
    "haiku/_src/integration/jax_transforms_test.py::JaxTransformsTest::test_jit_BatchNorm",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_fast_eval_shape_BatchNorm",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_fast_eval_shape_inside_transform_BatchNorm",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_hk_jit_BatchNorm_init",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_hk_jit_BatchNorm_not_init",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::test_hk_remat_BatchNorm",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_hk_scan_BatchNorm_init",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_hk_scan_BatchNorm_not_init",
    "haiku/_src/integration/hk_transforms_test.py::HaikuTransformsTest::"
    "test_optimize_rng_use_under_jit_BatchNorm",
)


def test_haiku_batchnorm_tests_pass_with_jaxbn():
    """All listed tests pass, each having built jaxbn's module, in one process."""
    with tempfile.TemporaryDirectory(prefix="jaxbn-haiku-") as tmp:
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")  # haiku's tests, not this repository's settings
        env = dict(os.environ)
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        env["JAX_PLATFORMS"] = "cpu"
        env["JAXBN_HAIKU_REPORT"] = str(Path(tmp) / "report.json")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(SITE),
               "-p", "haiku_swap", "-p", "no:cacheprovider", "-q", "--no-header", "-rfE",
               *(str(SITE / t) for t in HAIKU_BATCHNORM_TESTS)]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=900)
        log = (proc.stdout + proc.stderr)[-6000:]
        report = Path(tmp) / "report.json"
        assert report.exists(), f"haiku's tests did not run (exit {proc.returncode}):\n{log}"
        results = json.loads(report.read_text())
    outcome = {t: results.get(t, {}).get("outcome", "not run") for t in HAIKU_BATCHNORM_TESTS}
    failed = {t: o for t, o in outcome.items() if o != "passed"}
    assert not failed, f"{len(failed)} of haiku's tests did not pass: {failed}\n{log}"
    not_swapped = [t for t in HAIKU_BATCHNORM_TESTS if not results[t]["jaxbn"]]
    assert not not_swapped, f"these tests did not build jaxbn's BatchNorm: {not_swapped}"
    assert proc.returncode == 0, log
