"""flax's own BatchNorm tests, run with flax's BatchNorm classes swapped for jaxbn's.

The test of "drop-in": flax's test suite is not copied here. Its source distribution on
PyPI carries ``tests/``; the first run downloads it (``pip download --no-binary``) into a
cache directory (``$JAXBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxbn`` or ``~/.cache/jaxbn``),
unpacks ``tests/`` and ``pyproject.toml`` (flax's pytest settings, warnings as errors
included), and runs the tests listed below in one pytest process with the plugin
``tests/flax_swap.py``, which sets ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` to
jaxbn's before flax's test modules import them. One process, as in a user's session:
state that one test leaves behind (``nnx.tabulate``'s, for one) reaches the next. In a
whole session the run starts in the background right after collection (tests/conftest.py)
and overlaps the other tests; the test, moved to the end, waits for it.

The list: every test of the files below that constructs a BatchNorm (found by running
each whole file with construction recorded; ``python -m pytest FILE`` in flax's sdist).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

FLAX_VERSION = importlib.metadata.version("flax")
REPO = Path(__file__).resolve().parent.parent

#: flax's tests that build a BatchNorm, relative to the sdist's tests/ directory.
FLAX_BATCHNORM_TESTS = (
    "linen/linen_module_test.py::ModuleTest::test_bind_stateful",
    "linen/linen_test.py::NormalizationTest::test_batch_norm0",
    "linen/linen_test.py::NormalizationTest::test_batch_norm1",
    "linen/linen_test.py::NormalizationTest::test_batch_norm_complex0",
    "linen/linen_test.py::NormalizationTest::test_batch_norm_complex1",
    "linen/linen_test.py::NormalizationTest::test_batch_norm_multi_init",
    "linen/linen_transforms_test.py::TransformTest::test_vmap_batchnorm",
    "linen/summary_test.py::SummaryTest::test_module_reuse",
    "linen/summary_test.py::SummaryTest::test_module_summary",
    "linen/summary_test.py::SummaryTest::test_module_summary_with_depth",
    "linen/summary_test.py::SummaryTest::test_tabulate",
    "linen/summary_test.py::SummaryTest::test_tabulate_function",
    "linen/summary_test.py::SummaryTest::test_tabulate_with_method",
    "linen/summary_test.py::SummaryTest::test_tabulate_with_sow",
    "nnx/bridge/wrappers_test.py::TestCompatibility::test_linen_to_nnx_submodule",
    "nnx/bridge/wrappers_test.py::TestCompatibility::test_nnx_to_linen_multiple_collections",
    "nnx/graph_utils_test.py::TestGraphUtils::test_cached_unflatten",
    "nnx/graph_utils_test.py::TestGraphUtils::test_module_list0",
    "nnx/graph_utils_test.py::TestGraphUtils::test_module_list1",
    "nnx/graph_utils_test.py::TestTreeFlatten::test_prefix_callable_per_type_tree_mode",
    "nnx/graph_utils_test.py::TestTreeFlatten::test_prefix_multiple_filters_graph_mode",
    "nnx/graph_utils_test.py::TestTreeFlatten::test_prefix_multiple_filters_tree_mode",
    "nnx/graph_utils_test.py::TestUnpack::test_merge_different_graphdefs_error",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_merge_roundtrip_multiple_filters0",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_merge_roundtrip_multiple_filters1",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_merge_roundtrip_with_rest0",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_merge_roundtrip_with_rest1",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_multiple_filters0",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_multiple_filters1",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_state_graphdefs_shared",
    "nnx/graph_utils_test.py::TestUnpack::test_unpack_with_nnx_grad_and_optimizer",
    "nnx/helpers_test.py::TestHelpers::test_train_state_methods",
    "nnx/integration_test.py::TestIntegration::test_basic_view_example0",
    "nnx/integration_test.py::TestIntegration::test_basic_view_example1",
    "nnx/integration_test.py::TestIntegration::test_example_mutable_arrays",
    "nnx/integration_test.py::TestIntegration::test_shared_modules",
    "nnx/integration_test.py::TestIntegration::test_shared_modules_pure",
    "nnx/integration_test.py::TestIntegration::test_shared_modules_pure_view",
    "nnx/integration_test.py::TestIntegration::test_shared_modules_view",
    "nnx/integration_test.py::TestIntegration::test_tree_mode_multi_module",
    "nnx/module_test.py::TestModule::test_repr",
    "nnx/module_test.py::TestModule::test_set_attribute_error",
    "nnx/module_test.py::TestModule::test_set_attributes",
    "nnx/module_test.py::TestModule::test_view0",
    "nnx/module_test.py::TestModule::test_view1",
    "nnx/module_test.py::TestModule::test_view_error0",
    "nnx/module_test.py::TestModule::test_view_error1",
    "nnx/module_test.py::TestModule::test_view_info0",
    "nnx/module_test.py::TestModule::test_view_info1",
    "nnx/module_test.py::TestModule::test_view_info_with_filter0",
    "nnx/module_test.py::TestModule::test_view_info_with_filter1",
    "nnx/module_test.py::TestModule::test_with_attributes0",
    "nnx/module_test.py::TestModule::test_with_attributes1",
    "nnx/module_test.py::TestModule::test_with_attributes_error0",
    "nnx/module_test.py::TestModule::test_with_attributes_error1",
    "nnx/module_test.py::TestModule::test_with_attributes_filter0",
    "nnx/module_test.py::TestModule::test_with_attributes_filter1",
    "nnx/nn/linear_test.py::TestLayersParamsMetadata::test7",
    "nnx/nn/linear_test.py::TestLayersSameGraph::test7",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence0",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence1",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence10",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence11",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence12",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence13",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence14",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence15",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence2",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence3",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence4",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence5",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence6",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence7",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence8",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_batchnorm_equivalence9",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence0",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence1",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence10",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence11",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence12",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence13",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence14",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence15",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence2",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence3",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence4",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence5",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence6",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence7",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence8",
    "nnx/nn/normalization_test.py::TestLinenConsistency::test_nnx_linen_spectralnorm_equivalence9",
    "nnx/summary_test.py::SummaryTest::test_nested",
    "nnx/summary_test.py::SummaryTest::test_shared",
    "nnx/summary_test.py::SummaryTest::test_tabulate",
    "nnx/transforms_test.py::TestJIT::test_graph_updates_unflatten",
    "nnx/transforms_test.py::TestScan::test_complex",
    "nnx/transforms_test.py::TestScan::test_complex_broadcast_dropout",
    "nnx/transforms_test.py::TestScan::test_complex_broadcast_dropout_functional0",
    "nnx/transforms_test.py::TestScan::test_complex_broadcast_dropout_view",
    "nnx/transforms_test.py::TestScan::test_complex_broadcast_dropout_view_functional0",
    "nnx/transforms_test.py::TestScan::test_complex_broadcast_dropout_view_functional1",
    "nnx/transforms_test.py::TestScan::test_complex_decorator",
    "nnx/transforms_test.py::TestScan::test_complex_decorator_functional0",
    "nnx/transforms_test.py::TestScan::test_complex_decorator_functional1",
    "nnx/transforms_test.py::TestScan::test_complex_decorator_view",
    "nnx/transforms_test.py::TestScan::test_complex_decorator_view_functional0",
    "nnx/transforms_test.py::TestScan::test_complex_decorator_view_functional1",
    "nnx/transforms_test.py::TestScan::test_complex_functional0",
    "nnx/transforms_test.py::TestScan::test_complex_functional1",
    "nnx/transforms_test.py::TestScan::test_complex_view",
    "nnx/transforms_test.py::TestScan::test_complex_view_functional0",
    "nnx/transforms_test.py::TestScan::test_complex_view_functional1",
    "nnx/transforms_test.py::TestVmap::test_example0",
    "nnx/transforms_test.py::TestVmap::test_example1",
    "nnx/transforms_test.py::TestVmap::test_example2",
    "nnx/transforms_test.py::TestVmap::test_split_rngs_decorator_simple",
    "nnx/transforms_test.py::TestVmap::test_split_rngs_decorator_simple_functional0",
    "nnx/transforms_test.py::TestVmap::test_split_rngs_decorator_simple_functional1",
    "nnx/transforms_test.py::TestVmap::test_state_axes_from_state",
    "nnx/transforms_test.py::TestVmap::test_state_axes_from_state_functional0",
    "nnx/transforms_test.py::TestVmap::test_state_axes_from_state_functional1",
    "nnx/transforms_test.py::TestVmap::test_state_axes_simple",
    "nnx/transforms_test.py::TestVmap::test_state_axes_simple_functional0",
    "nnx/transforms_test.py::TestVmap::test_state_axes_simple_functional1",
    "nnx/transforms_test.py::TestVmap::test_state_axes_super_simple0",
    "nnx/transforms_test.py::TestVmap::test_state_axes_super_simple1",
    "nnx/transforms_test.py::TestVmap::test_state_axes_super_simple2",
)


def _cache_dir() -> Path:
    if os.environ.get("JAXBN_CACHE_DIR"):
        return Path(os.environ["JAXBN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxbn"


def _flax_tests() -> Path:
    """flax's sdist tests/ and pyproject.toml, unpacked once into the cache directory."""
    root = _cache_dir() / f"flax-{FLAX_VERSION}-tests"
    if (root / ".complete").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"flax=={FLAX_VERSION}",
               "--no-binary", ":all:", "--no-deps", "--quiet", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"flax {FLAX_VERSION}'s sdist could not be downloaded in 300 s")
        sdists = list(Path(tmp).glob("flax-*.tar.gz"))
        if proc.returncode or not sdists:
            pytest.skip(f"flax {FLAX_VERSION}'s sdist could not be downloaded "
                        f"({' '.join(cmd[2:])}): {(proc.stderr or proc.stdout)[-300:]}")
        prefix = f"flax-{FLAX_VERSION}/"
        staging = Path(tmp) / "unpacked"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix + "tests/")
                       or m.name == prefix + "pyproject.toml"]
            tar.extractall(staging, members=members, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / prefix), root)
        (root / ".complete").touch()
    return root


_RUN: dict[str, Any] = {}


def start() -> None:
    """Starts flax's tests in a subprocess (once), so they can overlap the rest of a session.

    tests/conftest.py calls this right after collection when the test below is selected
    (and moves that test to the end); on its own the test starts them itself.
    """
    if _RUN:
        return
    try:
        root = _flax_tests()
    except pytest.skip.Exception as e:
        _RUN["skip"] = str(e)
        return
    tmp = Path(tempfile.mkdtemp(prefix="jaxbn-flax-"))
    env = dict(os.environ)
    # tests/conftest.py's fake devices are not flax's set-up (its tests set their own).
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXBN_FLAX_REPORT"] = str(tmp / "report.json")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-p", "flax_swap", "-p", "no:cacheprovider", "-q",
           "--no-header", "-rfE", *(f"tests/{t}" for t in FLAX_BATCHNORM_TESTS)]
    log = open(tmp / "log.txt", "w")  # noqa: SIM115 - closed in _finish
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    atexit.register(lambda: proc.poll() is None and proc.kill())
    _RUN.update(proc=proc, tmp=tmp, log=log)


def _finish() -> tuple[int, str, dict[str, Any]]:
    proc = _RUN["proc"]
    try:
        code = proc.wait(timeout=900)
    finally:
        _RUN["log"].close()
    tmp = _RUN["tmp"]
    log = (tmp / "log.txt").read_text()[-6000:]
    report = tmp / "report.json"
    assert report.exists(), f"flax's tests did not run (exit {code}):\n{log}"
    results = json.loads(report.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return code, log, results


def test_flax_batchnorm_tests_pass_with_jaxbn():
    """All listed tests pass, each having built jaxbn's module, in one process."""
    start()
    if "skip" in _RUN:
        pytest.skip(_RUN["skip"])
    code, log, results = _finish()
    outcome = {t: results.get(f"tests/{t}", {}).get("outcome", "not run")
               for t in FLAX_BATCHNORM_TESTS}
    failed = {t: o for t, o in outcome.items() if o != "passed"}
    assert not failed, f"{len(failed)} of flax's tests did not pass: {failed}\n{log}"
    not_swapped = [t for t in FLAX_BATCHNORM_TESTS if not results[f"tests/{t}"]["jaxbn"]]
    assert not not_swapped, f"these tests did not build jaxbn's BatchNorm: {not_swapped}"
    assert code == 0, log
