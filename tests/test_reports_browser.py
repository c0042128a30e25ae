"""The HTML reports of the sync, assess and monitor runs and of the four analytics notebooks, opened in headless
Chromium (Debian's package). The migrate runbook's report is opened the same way in tests/test_migration.py.

Every plotly chart must draw (a ``.plotly .main-svg`` inside each chart div) with its title and axis titles, offline,
and the page must log no error. ``make test`` installs ``/usr/bin/chromium`` first when it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from runbook_support import assert_readable_report, render

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
    page = assert_readable_report(report, shot, no_axes=NO_AXES.get(name, 0))
    if name == "assess":
        assert page.tables > 3
        first = page.text[:3000]
        assert first.index("Executive summary") < first.index("Top actions")
        assert "Overall readiness" in first and "Status: failed" not in page.text
    assert page.charts == EXPECTED[name]


# Charts per analytics report (each notebook's own, all with axes).
NOTEBOOK_CHARTS = {"account_health": 4, "explore": 4, "revenue_forecast": 3, "win_probability": 4}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_CHARTS))
def test_an_analytics_report_reads_as_a_deliverable(name: str, notebook_runs: dict[str, Any], tmp_path: Path) -> None:
    """The runs tests/test_notebooks.py checks (one execution per session), opened as the customer's analyst would."""
    result = notebook_runs[name]
    assert result.exit_code == 0 and result.report is not None, result.manifest.get("error")
    page = assert_readable_report(result.report, tmp_path / f"{name}-first-screen.png")
    assert page.charts == NOTEBOOK_CHARTS[name]
    first = page.text[:4000]
    assert "Executive summary" in first and "Data as of" in first
    # Every chart and table is explained in words, and the figures carry their units.
    assert page.text.count("What it means:") >= page.charts
    assert "drivers_same_sign" not in page.text and not re.findall(r"\b(?:True|False)\b", page.text)
    if name in ("win_probability", "revenue_forecast", "account_health"):
        assert "$" in first  # amounts in the tenant's base currency (USD)


def test_the_browser_check_sees_a_broken_page(tmp_path: Path) -> None:
    """The harness itself: a script error and a chart that never draws are both reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><div class='plotly-graph-div'></div>"
                    "<script>console.error('drawing failed'); undefinedFunction();</script></body></html>")
    seen = render(page, timeout=5)
    assert seen.charts == 1 and seen.rendered == 0
    assert any("undefinedFunction" in e for e in seen.errors)
    assert any("drawing failed" in e for e in seen.errors)
