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

import json
import os
from typing import Any

import pytest

_current: list[str | None] = [None]
_built: set[str] = set()
_outcomes: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """The swap, when loaded as a plugin (importing this module changes nothing)."""
    import haiku
    from haiku._src import batch_norm

    import jaxbn.haiku

    haiku.BatchNorm = jaxbn.haiku.BatchNorm
    batch_norm.BatchNorm = jaxbn.haiku.BatchNorm
    init = jaxbn.haiku.BatchNorm.__init__

    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        if _current[0] is not None:
            _built.add(_current[0])
        init(self, *args, **kwargs)

    jaxbn.haiku.BatchNorm.__init__ = recorded


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
    path = os.environ.get("JAXBN_HAIKU_REPORT")
    if path:
        report = {k: {"outcome": v, "jaxbn": k in _built} for k, v in _outcomes.items()}
        with open(path, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
