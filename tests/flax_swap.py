"""A pytest plugin that makes flax's BatchNorm classes jaxbn's, for flax's own test suite.

Loaded with ``-p flax_swap`` into a pytest run of flax's ``tests/`` (see
tests/test_flax_suite.py), before any test module is imported: ``flax.linen.BatchNorm``
and ``flax.nnx.BatchNorm`` become :class:`jaxbn.linen.BatchNorm` and
:class:`jaxbn.nnx.BatchNorm` — the one-import change a user makes, and nothing else.
With ``JAXBN_FLAX_REPORT`` set, it writes a JSON report there: per test id, the outcome
and whether the test built one of jaxbn's modules (proof that the swap took effect).
"""

from __future__ import annotations

import flax.linen
import flax.nnx
import pytest
from swap_report import SwapReport

import jaxbn.linen
import jaxbn.nnx


def pytest_configure(config: pytest.Config) -> None:
    """The swap, when loaded as a plugin (importing this module changes nothing)."""
    report = SwapReport("JAXBN_FLAX_REPORT")
    config.pluginmanager.register(report, "jaxbn_swap_report")
    flax.linen.BatchNorm = jaxbn.linen.BatchNorm
    flax.nnx.BatchNorm = jaxbn.nnx.BatchNorm
    # Construction hooks (linen modules are dataclasses: __post_init__ runs per instance).
    jaxbn.linen.BatchNorm.__post_init__ = report.record(jaxbn.linen.BatchNorm.__post_init__)
    jaxbn.nnx.BatchNorm.__init__ = report.record(jaxbn.nnx.BatchNorm.__init__)
