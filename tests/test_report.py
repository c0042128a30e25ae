"""The shared report style (bridgekit.report) and the comparison with an earlier assessment: no emulator needed."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

from bridgekit import report
from bridgekit.assess import compare
from bridgekit.checks import Check


def test_numbers_read_as_a_person_writes_them() -> None:
    assert report.num(128500.0) == "128,500" and report.num(82660.483004) == "82,660"
    assert report.num(0.000069) == "0.0001" and report.num(3.14159) == "3.14" and report.num(12) == "12"
    assert report.money(128500.0, "USD") == "$128,500" and report.money(1200, "CHF") == "1,200 CHF"
    assert report.pct(0.05) == "5.0%"
    assert report.duration(0.004) == "under 1 s" and report.duration(45) == "45 s"
    assert report.duration(720) == "12 min" and report.duration(3.4 * 3600) == "3.4 h"
    for missing in (None, math.nan, pd.NA, pd.NaT):
        assert report.num(missing) == report.cell(missing) == "\u2013"


def test_a_status_badge_reads_without_colour_or_emoji() -> None:
    for status in ("red", "amber", "green"):
        b = report.badge(status)
        assert status.upper() in b and "white-space:nowrap" in b
        assert not re.search(r"[\U0001F300-\U0001FAFF]", b)


def test_tables_have_no_index_no_nan_and_no_truncation() -> None:
    long = "a finding that goes on " * 20
    df = pd.DataFrame({"status": ["red", "green"], "finding": [long, None], "rate": [0.123456789, math.nan],
                       "rows": [1234567, 3]}, index=[7, 8])
    text = report.table(df, formats={"rate": "pct"})
    plain = re.sub(r"<[^>]+>", " ", text)
    assert long.strip() in plain and "…" not in plain
    assert not re.search(r"\b(NaN|nan|None)\b", plain) and not re.search(r"\d+\.\d{5,}", plain)
    assert "1,234,567" in plain and "12.3%" in plain and "RED" in plain
    assert ">7<" not in text and ">8<" not in text  # no index column
    capped = report.table([{"n": i} for i in range(30)], max_rows=5, more="in evidence.xlsx")
    assert capped.count("<tr>") == 6 and "25 more in evidence.xlsx" in capped


def test_charts_keep_to_eight_series_with_titles_and_no_minor_ticks() -> None:
    series = {f"table{i}": [i, i + 1.0] for i in range(16)}
    kept = report.top_n(series, other="other tables")
    assert len(kept) == report.MAX_SERIES and "other tables" in kept
    assert kept["other tables"] == [sum(range(9)), sum(range(9)) + 9.0]
    fig = go.Figure([go.Scatter(x=[1, 2], y=v, name=k) for k, v in kept.items()])
    fig.update_layout(title="t", xaxis_title="x", yaxis_title="y (count)")
    styled = report.style_figure(fig)
    assert styled.layout.yaxis.minor.ticks == "" and styled.layout.yaxis.tickformat == ",~f"
    crowded = go.Figure([go.Scatter(x=[1], y=[1], name=str(i)) for i in range(9)])
    crowded.update_layout(title="crowded")
    with pytest.raises(ValueError, match="at most 8"):
        report.style_figure(crowded)
    with pytest.raises(ValueError, match="title"):
        report.style_figure(go.Figure())


def test_workbook_has_a_summary_sheet_filters_frozen_headers_and_links(tmp_path: pytest.TempPathFactory) -> None:
    from openpyxl import load_workbook

    path = report.write_workbook(tmp_path / "e.xlsx", [{"finding": "a.b", "records": 1}],  # type: ignore[operator]
                                 {"b": [{"record": "Ann", "id": "1", "link": "https://x.example/1"}]})
    book = load_workbook(path)
    assert book.sheetnames == ["Summary", "b"]
    ws = book["b"]
    assert ws.freeze_panes == "A2" and ws.auto_filter.ref == "A1:C2"
    assert ws["C2"].hyperlink.target == "https://x.example/1"


def _check(cid: str, status: str, count: int) -> Check:
    return Check(cid, "data quality", cid, status, "", count=count)


def test_compare_sorts_findings_into_resolved_better_new_worse() -> None:
    previous = {"checks": [{"name": n, "status": s, "detail": ""} for n, s in
                           (("q.fixed", "red"), ("q.fewer", "red"), ("q.more", "amber"), ("q.same", "amber"),
                            ("q.calmer", "red"), ("q.ok", "green"))],
                "results": {"check_counts": {"q.fixed": 3, "q.fewer": 60, "q.more": 2, "q.same": 4, "q.calmer": 9}}}
    now = [_check("q.fixed", "green", 0), _check("q.fewer", "red", 59), _check("q.more", "amber", 5),
           _check("q.same", "amber", 4), _check("q.calmer", "amber", 9), _check("q.ok", "red", 1),
           _check("q.added", "amber", 2)]
    change = {r["check"]: r["change"] for r in compare(previous, now)}
    assert change == {"q.fixed": "resolved", "q.fewer": "better", "q.calmer": "better", "q.more": "worse",
                      "q.same": "unchanged", "q.ok": "new", "q.added": "new"}


def test_notebook_frames_display_as_report_tables_and_charts_use_the_template() -> None:
    import plotly.io as pio

    df = pd.DataFrame({"value": [128500.0, 82660.483004], "same_sign": [False, True]},
                      index=pd.Index(["a", "b"], name="driver"))
    text = report.frame_html(df)
    plain = re.sub(r"<[^>]+>", " ", text)
    assert "128,500" in plain and "82,660" in plain and "driver" in plain and "no" in plain
    assert not re.search(r"\d+\.\d{5,}", plain)
    from IPython.core.interactiveshell import InteractiveShell

    before = pio.templates.default
    try:
        shell = InteractiveShell.instance()
        report.install()
        shown = shell.display_formatter.format(df)[0]["text/html"]
        assert "128,500" in shown and "e+0" not in shown
        assert pio.templates.default == "plotly_white+bridgekit"
        assert list(pio.templates["bridgekit"].layout.colorway) == list(report.PALETTE)
    finally:
        pio.templates.default = before
        InteractiveShell.clear_instance()


def test_a_record_name_with_a_control_character_still_goes_into_the_workbook(tmp_path: Path) -> None:
    from openpyxl import load_workbook

    from bridgekit.report import write_workbook

    path = write_workbook(tmp_path / "e.xlsx", [{"finding": "x", "records": 1}],
                          {"x": [{"record": "before\x00after", "id": "1"}]})
    sheet = load_workbook(path)["x"]
    assert sheet.cell(row=2, column=1).value == "before\ufffdafter"
