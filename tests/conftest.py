"""Test set-up: eight fake CPU devices and the session's compile settings
(tests/compile_cache.py), configured before JAX initializes its backends."""

import os

from tests import compile_cache

NUM_DEVICES = 8

# pytest plugins that other tests load into a framework's own test run (-p flax_swap, with
# this directory on the path), not modules of this suite: --doctest-modules would import
# them as tests.flax_swap, where their top-level import of swap_report fails.
collect_ignore = ["flax_swap.py", "haiku_swap.py", "swap_report.py"]

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    )
os.environ.setdefault("JAX_PLATFORMS", "cpu")
compile_cache.enable()

import jax  # noqa: E402
import pytest  # noqa: E402

if jax.device_count() < NUM_DEVICES:  # pragma: no cover - a set-up error, not a test result
    raise RuntimeError(
        f"expected {NUM_DEVICES} CPU devices for the tests, got {jax.device_count()}: JAX was "
        f"initialized before tests/conftest.py could set XLA_FLAGS."
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """flax's own BatchNorm tests run in a subprocess. In one pytest process: start it now,
    wait for it last. Under pytest-xdist (``make test``, one file per worker at a time): its
    file goes first, so that a worker starts it at once while the others take the rest."""
    if hasattr(config, "workerinput"):
        first = ("tests/test_flax_suite.py",)
        items.sort(key=lambda i: not i.nodeid.startswith(first))  # stable: order kept
        return
    flax_suite = [i for i in items if i.nodeid.startswith("tests/test_flax_suite.py")]
    if not flax_suite or config.option.collectonly:
        return
    rest = [i for i in items if i not in flax_suite]
    items[:] = rest + flax_suite
    from tests import test_flax_suite

    test_flax_suite.start()


@pytest.fixture(scope="session")
def mesh():
    """A one-axis mesh named 'd' over the eight fake devices (automatic sharding)."""
    return jax.make_mesh((NUM_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
