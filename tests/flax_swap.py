"""A pytest plugin that makes flax's BatchNorm classes jaxbn's, for flax's own test suite.

Loaded with ``-p flax_swap`` into a pytest run of flax's ``tests/`` (see
tests/test_flax_suite.py), before any test module is imported: ``flax.linen.BatchNorm``
and ``flax.nnx.BatchNorm`` become :class:`jaxbn.linen.BatchNorm` and
:class:`jaxbn.nnx.BatchNorm` — the one-import change a user makes, and nothing else.
With ``JAXBN_FLAX_REPORT`` set, it writes a JSON report there: per test id, the outcome
and whether the test built one of jaxbn's modules (proof that the swap took effect).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen
import flax.nnx
import pytest

import jaxbn.linen
import jaxbn.nnx

_current: list[str | None] = [None]
_built: set[str] = set()
_outcomes: dict[str, str] = {}


def _record(method: Any) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _current[0] is not None:
            _built.add(_current[0])
        return method(self, *args, **kwargs)

    return wrapper


def pytest_configure(config: pytest.Config) -> None:
    """The swap, when loaded as a plugin (importing this module changes nothing)."""
    flax.linen.BatchNorm = jaxbn.linen.BatchNorm
    flax.nnx.BatchNorm = jaxbn.nnx.BatchNorm
    # Construction hooks (linen modules are dataclasses: __post_init__ runs per instance).
    jaxbn.linen.BatchNorm.__post_init__ = _record(jaxbn.linen.BatchNorm.__post_init__)
    jaxbn.nnx.BatchNorm.__init__ = _record(jaxbn.nnx.BatchNorm.__init__)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _current[0] = item.nodeid
    yield
    _current[0] = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    counts = report.failed or report.when == "call" or report.skipped
    if counts and _outcomes.get(report.nodeid) in (None, "passed"):
        _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("JAXBN_FLAX_REPORT")
    if path:
        report = {k: {"outcome": v, "jaxbn": k in _built} for k, v in _outcomes.items()}
        with open(path, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
