"""Counts the conformance checks per registry entry and prints them at the end of the run (the battery lives
in tests/conformance; the hook is here so that the xdist controller loads it too)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

import optimlab

_COUNTS: dict[str, Counter] = {}
# a test id names its entry as "name[variant]" (battery), "name.argument" (rules) or "name" alone
_ENTRY = re.compile(r"[\[\-](" + "|".join(map(re.escape, optimlab.available())) + r")(?=[\[.\]])")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    match = _ENTRY.search(report.nodeid)
    if match is None or (report.when != "call" and not report.skipped):
        return
    _COUNTS.setdefault(match.group(1), Counter())[report.outcome] += 1


def pytest_terminal_summary(terminalreporter) -> None:
    if not _COUNTS:
        return
    terminalreporter.section("conformance checks per registry entry")
    for entry in sorted(_COUNTS):
        counts = _COUNTS[entry]
        terminalreporter.write_line(f"{entry:12s} " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tests of many ops on tiny tensors (Monte Carlo loops,
    double backward passes, small solves) only gain synchronisation from more, and stall badly on a loaded
    machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
