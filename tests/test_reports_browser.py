"""The HTML reports of the sync, assess and monitor runs, opened in headless Chromium (Debian's package).

Every plotly chart must draw (a ``.plotly .main-svg`` inside each chart div) with its title and axis titles, offline,
and the page must log no error. ``make test`` installs ``/usr/bin/chromium`` first when it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from runbook_support import render

# Charts per report: sync (rows changed), assess (latency, growth, full sync, quality, ownership, integration map),
# monitor (latency, headroom, freshness, error rate).
EXPECTED = {"sync": 1, "assess": 6, "monitor": 4}
# Charts without cartesian axes (the Sankey map of the integration surface), so without axis titles.
NO_AXES = {"assess": 1}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_chart_of_the_report_renders_offline_without_errors(name: str, demo_runs: Any,
                                                                  monitor_run: Any, tmp_path: Path) -> None:
    run_dir = {"sync": demo_runs.sync, "assess": demo_runs.assess, "monitor": monitor_run.run_dir}[name]
    report = run_dir / f"{name}.html"
    assert report.is_file()
    shot = tmp_path / f"{name}-first-screen.png"  # kept with the test's artefacts (pytest's basetemp)
    page = render(report, screenshot=shot)
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert page.errors == []
    # Text meant for reading: no missing-value spellings, no raw floats.
    assert not re.findall(r"\b(?:NaN|nan|None)\b", page.text)
    assert not re.findall(r"\d+\.\d{5,}", page.text)
    if name == "assess":
        assert page.tables_before_summary == 0 and page.tables > 3  # the executive summary comes first
        first = page.text[:3000]
        assert first.index("Executive summary") < first.index("Top actions")
        assert "Overall readiness" in first and "Status: failed" not in page.text
    assert page.charts == EXPECTED[name]
    assert page.rendered == page.charts
    assert all(page.titles), page.titles
    # x and y axis titles on every chart that has axes
    no_axes = NO_AXES.get(name, 0)
    assert sorted(page.axis_titles) == [0] * no_axes + [2] * (page.charts - no_axes), page.axis_titles


def test_the_browser_check_sees_a_broken_page(tmp_path: Path) -> None:
    """The harness itself: a script error and a chart that never draws are both reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><div class='plotly-graph-div'></div>"
                    "<script>console.error('drawing failed'); undefinedFunction();</script></body></html>")
    seen = render(page, timeout=5)
    assert seen.charts == 1 and seen.rendered == 0
    assert any("undefinedFunction" in e for e in seen.errors)
    assert any("drawing failed" in e for e in seen.errors)
