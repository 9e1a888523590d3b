"""A pytest plugin that makes haiku's BatchNorm jaxbn's, for haiku's own test suite.

Loaded with ``-p haiku_swap`` into a pytest run of haiku's tests (see
tests/test_haiku_suite.py), before any test module is imported: ``haiku.BatchNorm`` and
``haiku._src.batch_norm.BatchNorm`` (which haiku's tests use) become
:class:`jaxbn.haiku.BatchNorm` -- the one-import change a user makes, and nothing else.
(haiku's own networks, e.g. ``hk.nets.ResNet``, bound haiku's class when they were
imported and keep it, as they would in a user's program.) With ``JAXBN_HAIKU_REPORT`` set,
it writes a JSON report there: per test id, the outcome and whether the test built jaxbn's
module.
"""

from __future__ import annotations

import pytest
from swap_report import SwapReport


def pytest_configure(config: pytest.Config) -> None:
    """The swap, when loaded as a plugin (importing this module changes nothing)."""
    import haiku
    from haiku._src import batch_norm

    import jaxbn.haiku

    report = SwapReport("JAXBN_HAIKU_REPORT")
    config.pluginmanager.register(report, "jaxbn_swap_report")
    haiku.BatchNorm = jaxbn.haiku.BatchNorm
    batch_norm.BatchNorm = jaxbn.haiku.BatchNorm
    jaxbn.haiku.BatchNorm.__init__ = report.record(jaxbn.haiku.BatchNorm.__init__)
