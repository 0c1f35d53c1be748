"""Shared pieces of the speed benchmarks: a summary of measured speed-ups after the run."""

from __future__ import annotations

import pytest

_SPEEDUPS: list[str] = []


@pytest.fixture
def report_speedup():
    """Tests call this with one line of text; the lines are printed in the terminal summary."""
    return _SPEEDUPS.append


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """pyproject's addopts carry --benchmark-skip so the normal run skips these; pytest-benchmark
    lets only --benchmark-only override that, so make an explicit --benchmark-enable do it too."""
    session = getattr(config, "_benchmarksession", None)
    if session is not None and config.getoption("benchmark_enable", False):
        session.skip = False


def pytest_terminal_summary(terminalreporter):
    if _SPEEDUPS:
        terminalreporter.section("knowbench speed-ups")
        for line in _SPEEDUPS:
            terminalreporter.write_line(line)
