"""The report of the swap plugins (``flax_swap``, ``haiku_swap``), shared by both.

A plugin that swaps a framework's BatchNorm for jaxbn's registers a :class:`SwapReport` and
wraps the constructors of jaxbn's classes with :meth:`SwapReport.record`. With the report's
environment variable set, the run writes a JSON report there: per test id, the outcome and
whether the test built one of jaxbn's modules (proof that the swap took effect).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest


class SwapReport:
    """pytest hooks that record each test's outcome and whether it built a jaxbn module."""

    def __init__(self, env_var: str) -> None:
        self.env_var = env_var
        self.current: str | None = None
        self.built: set[str] = set()
        self.outcomes: dict[str, str] = {}

    def record(self, method: Any) -> Any:
        """``method`` (a constructor) that also notes the running test as having built one."""

        def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if self.current is not None:
                self.built.add(self.current)
            return method(obj, *args, **kwargs)

        return wrapper

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        self.current = item.nodeid
        yield
        self.current = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        counts = report.failed or report.when == "call" or report.skipped
        if counts and self.outcomes.get(report.nodeid) in (None, "passed"):
            self.outcomes[report.nodeid] = report.outcome

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = os.environ.get(self.env_var)
        if path:
            report = {k: {"outcome": v, "jaxbn": k in self.built}
                      for k, v in self.outcomes.items()}
            with open(path, "w") as f:
                json.dump(report, f, indent=1, sort_keys=True)
