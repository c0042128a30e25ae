"""The one report style of every runbook and notebook: status badges, number formats, readable tables, charts.

Everything here returns :class:`Html` (a ``str`` that Jupyter displays as HTML) or styles a plotly figure,
so a notebook cell stays one call::

    >>> from bridgekit import report
    >>> report.badge("amber")                      # doctest: +ELLIPSIS
    '<span class="bk-badge" ...>AMBER</span>'
    >>> report.num(128500.0), report.money(128500.0, "USD"), report.duration(0.004)
    ('128,500', '$128,500', 'under 1 s')

The rules a reader notices: a status reads as a word in a box (no colour or emoji font needed); numbers have
thousands separators and a sensible number of digits; tables have no index, no NaN and no truncated cells;
charts have a title, axis titles with units, at most :data:`MAX_SERIES` series and no minor-tick clutter.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_SERIES",
    "PALETTE",
    "RUN_DIR_ENV",
    "STATUS_LABEL",
    "Html",
    "badge",
    "cell",
    "duration",
    "frame_html",
    "heading",
    "install",
    "join",
    "money",
    "num",
    "output_dir",
    "paragraph",
    "pct",
    "section",
    "status_word",
    "style_figure",
    "table",
    "top_n",
    "write_csv",
    "write_workbook",
]

#: Set by the runbook runner for the kernel: the run's directory, where a runbook writes its extra files.
RUN_DIR_ENV = "BRIDGEKIT_RUN_DIR"
#: A chart with more series than this cannot be read; collapse the rest into "other" (:func:`top_n`).
MAX_SERIES = 8
#: Okabe-Ito, the colour-blind-safe palette of eight (black last, for "other").
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#555555")
STATUS_LABEL = {"green": "GREEN", "amber": "AMBER", "red": "RED"}
# Dark text on a light fill with a border: the word carries the meaning, the colour only helps.
_BADGE_STYLE = {
    "green": "background:#e6f4ea;color:#14532d;border:1px solid #2e7d32",
    "amber": "background:#fff4d6;color:#6b4400;border:1px dashed #b26a00",
    "red": "background:#fde8e8;color:#7f1d1d;border:2px solid #c62828",
}
_CURRENCY = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_MISSING = "\u2013"  # an en dash: missing, never NaN or None


class Html(str):
    """A string of HTML that Jupyter (and the runner's report) renders rather than prints."""

    __slots__ = ()

    def _repr_html_(self) -> str:
        return str(self)


def output_dir() -> Path:
    """Where a runbook writes files beside its report: the run's directory under the runner, else ``.``."""
    return Path(os.environ.get(RUN_DIR_ENV) or ".")


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if type(value).__name__ in ("NAType", "NaTType"):
        return True
    try:  # pandas NA/NaT without importing pandas
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def status_word(status: str) -> str:
    """``RED``, ``AMBER``, ``GREEN``: a status as the word the badge shows."""
    return STATUS_LABEL.get(str(status).lower(), str(status).upper())


def badge(status: str) -> Html:
    """A status as a word in a styled box: ``RED``, ``AMBER``, ``GREEN`` (readable in black and white)."""
    s = str(status).lower()
    style = _BADGE_STYLE.get(s, "background:#eee;color:#333;border:1px solid #999")
    return Html(f'<span class="bk-badge" style="{style};border-radius:3px;padding:0 6px;font-weight:600;'
                f'font-size:0.85em;letter-spacing:0.04em;white-space:nowrap;display:inline-block">'
                f"{html.escape(STATUS_LABEL.get(s, s.upper()))}</span>")


def num(value: Any, digits: int | None = None) -> str:
    """A number with thousands separators; floats get ``digits`` decimals (default: by magnitude).

    >>> num(82660.483004), num(0.1234), num(7), num(None)
    ('82,660', '0.12', '7', '\u2013')
    """
    if _missing(value):
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    x = float(value)
    if digits is None:
        a = abs(x)
        digits = 0 if a >= 100 or x == int(x) else 1 if a >= 10 else 2 if a >= 0.01 or a == 0 else 4
    return f"{x:,.{digits}f}"


def pct(rate: Any, digits: int = 1) -> str:
    """A share (0.05) as a percentage (``5.0%``)."""
    return _MISSING if _missing(rate) else f"{float(rate) * 100:.{digits}f}%"


def money(value: Any, currency: str = "USD", digits: int = 0) -> str:
    """An amount in a currency: ``$128,500``, ``€1,200``, ``1,200 CHF``."""
    if _missing(value):
        return _MISSING
    x = float(value)
    text = f"{abs(x):,.{digits}f}"
    sign = "-" if x < 0 else ""
    symbol = _CURRENCY.get(currency.upper())
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency.upper()}"


def duration(seconds: Any) -> str:
    """A duration a person reads: ``under 1 s``, ``45 s``, ``12 min``, ``3.4 h``, ``2.5 days``."""
    if _missing(seconds):
        return _MISSING
    s = float(seconds)
    if s < 1:
        return "under 1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def cell(value: Any) -> str:
    """Any value as table text (escaped): numbers formatted, missing as a dash, lists and dicts spelled out."""
    if _missing(value):
        return _MISSING
    if isinstance(value, Html):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float | Decimal) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        v = value.item() if hasattr(value, "item") else value
        return html.escape(num(v))
    if isinstance(value, _dt.datetime) and value.time() == _dt.time(0) and value.utcoffset() in (None, _dt.timedelta(0)):
        return value.date().isoformat()  # a month or a day, not a moment
    if isinstance(value, _dt.datetime):
        return html.escape(value.strftime("%Y-%m-%d %H:%M") + (" UTC" if value.utcoffset() is not None else ""))
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "<br>".join(f"{html.escape(str(k))}: {cell(v)}" for k, v in value.items()) or _MISSING
    if isinstance(value, list | tuple | set):
        return ", ".join(cell(v) for v in value) or _MISSING
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat) and hasattr(value, "year"):
        return cell(_dt.datetime.fromisoformat(str(isoformat())))
    return html.escape(str(value))


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------

_TABLE_STYLE = "border-collapse:collapse;margin:0.4em 0 1em;font-size:0.92em;width:auto;max-width:100%"
_TH = ("text-align:left;vertical-align:bottom;border-bottom:2px solid #444;padding:3px 10px 3px 0;"
       "white-space:nowrap")
_TD = "text-align:left;vertical-align:top;border-bottom:1px solid #ddd;padding:3px 10px 3px 0"
_TD_NUM = _TD.replace("text-align:left", "text-align:right") + ";white-space:nowrap"

Format = str | Callable[[Any], str]


def _formatter(fmt: Format | None, column: str) -> Callable[[Any], str]:
    if callable(fmt):
        return lambda v: _MISSING if _missing(v) else fmt(v)
    named: dict[str, Callable[[Any], str]] = {
        "pct": lambda v: html.escape(pct(v)), "money": lambda v: html.escape(money(v)),
        "duration": lambda v: html.escape(duration(v)), "int": lambda v: html.escape(num(v, 0)),
        "status": lambda v: str(badge(v)), "html": lambda v: str(v), "text": lambda v: html.escape(str(v)),
        "link": lambda v: _MISSING if _missing(v) else
        f'<a href="{html.escape(str(v), quote=True)}" target="_blank" rel="noopener">open</a>',
    }
    chosen = named["status"] if fmt is None and column == "status" else named.get(fmt or "", cell)
    return lambda v: _MISSING if _missing(v) else chosen(v)


def table(rows: Any, columns: Sequence[str] | None = None, *, formats: Mapping[str, Format] | None = None,
          labels: Mapping[str, str] | None = None, max_rows: int | None = None, more: str = "",
          nowrap: Sequence[str] = ("id", "status", "effort", "owner", "severity")) -> Html:
    """Rows (a DataFrame or dicts) as a readable HTML table: no index, formatted cells, nothing cut off.

    Args:
        rows: A pandas DataFrame or a sequence of mappings.
        columns: The columns to show, in order (default: all).
        formats: Per column: ``pct``, ``money``, ``duration``, ``int``, ``status`` (a badge), ``link``,
            ``html`` (already HTML), ``text``, or a callable returning HTML. A column called ``status`` is
            badged unless told otherwise.
        labels: Header text per column (default: the name with underscores as spaces).
        max_rows: Show at most this many rows, then a line saying how many more there are.
        more: Where the rest is (``"in evidence.xlsx"``), for that line.
        nowrap: Columns whose cells never wrap (ids, badges, short values).
    """
    records: list[Mapping[str, Any]] = (rows.to_dict("records") if hasattr(rows, "to_dict")
                                        else [dict(r) for r in rows])
    cols = list(columns) if columns is not None else (
        [str(c) for c in rows.columns] if hasattr(rows, "columns") else list(dict.fromkeys(k for r in records for k in r)))
    fmts = {c: _formatter((formats or {}).get(c), c) for c in cols}
    numeric = {c for c in cols if records and all(isinstance(r.get(c), int | float | Decimal) and not isinstance(
        r.get(c), bool) for r in records if not _missing(r.get(c))) and any(not _missing(r.get(c)) for r in records)
        and (formats or {}).get(c) in (None, "pct", "money", "duration", "int")}
    head = "".join(f'<th style="{_TH}{";text-align:right" if c in numeric else ""}">'
                   f"{html.escape((labels or {}).get(c, c.replace('_', ' ')))}</th>" for c in cols)
    shown = records if max_rows is None else records[:max_rows]
    style = {c: _TD_NUM if c in numeric else _TD + (";white-space:nowrap" if c in nowrap else "") for c in cols}

    def td(c: str, r: Mapping[str, Any]) -> str:
        text = fmts[c](r.get(c))
        short = len(text) <= 16 and "<" not in text  # "under 1 s", "about 15 min": never split over lines
        return f'<td style="{style[c]}{";white-space:nowrap" if short else ""}">{text}</td>'

    body = "".join("<tr>" + "".join(td(c, r) for c in cols) + "</tr>" for r in shown)
    rest = len(records) - len(shown)
    tail = (f'<p style="margin-top:-0.6em;font-size:0.9em">… and {rest:,} more{" " + html.escape(more) if more else ""}'
            "</p>" if rest > 0 else "")
    return Html(f'<table class="bk-table" style="{_TABLE_STYLE}"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>{tail}")


def heading(text: str, level: int = 2, *, anchor: str | None = None) -> Html:
    """A heading (``<h2>`` by default); level-2 headings start a new page when printed."""
    ident = f' id="{html.escape(anchor, quote=True)}"' if anchor else ""
    return Html(f"<h{level}{ident}>{html.escape(text)}</h{level}>")


def paragraph(text: str, *, label: str | None = None) -> Html:
    """A paragraph of plain text, optionally led by a bold label (``Why it matters:``)."""
    lead = f"<b>{html.escape(label)}</b> " if label else ""
    return Html(f"<p>{lead}{html.escape(text)}</p>")


def join(*parts: str) -> Html:
    """Several blocks as one output."""
    return Html("".join(str(p) for p in parts if p))


def section(title: str, *parts: str, page_break: bool = True, anchor: str | None = None) -> Html:
    """A titled section; when printed it starts on a new page (``page_break``)."""
    cls = "bk-section bk-page" if page_break else "bk-section"
    return Html(f'<section class="{cls}">{heading(title, 2, anchor=anchor)}{join(*parts)}</section>')


# --------------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------------

def top_n(series: Mapping[str, Sequence[float]], n: int = MAX_SERIES, *,
          other: str = "other") -> dict[str, list[float]]:
    """At most ``n`` series: the ``n - 1`` largest by total, the rest summed point by point into ``other``.

    >>> top_n({"a": [5, 5], "b": [1, 1], "c": [2, 2]}, 2)
    {'a': [5.0, 5.0], 'other': [3.0, 3.0]}
    """
    items = {k: [float(v) for v in vs] for k, vs in series.items()}
    if len(items) <= n:
        return items
    ranked = sorted(items, key=lambda k: sum(items[k]), reverse=True)
    keep, rest = ranked[: n - 1], ranked[n - 1:]
    length = max(len(items[k]) for k in rest)
    summed = [sum(items[k][i] for k in rest if i < len(items[k])) for i in range(length)]
    return {**{k: items[k] for k in keep}, other: summed}


def style_figure(fig: Any, *, height: int | None = None, legend: bool | None = None) -> Any:
    """Apply the report style to a plotly figure (in place) and return it.

    White background, the :data:`PALETTE`, no minor ticks, grouped thousands on the axes, the legend below
    the plot. A figure must already carry its title and axis titles (with units): this raises ValueError
    without them, and when it has more than :data:`MAX_SERIES` series (use :func:`top_n`).
    """
    layout = fig.layout
    title = layout.title.text if layout.title else None
    if not title:
        raise ValueError("a report chart needs a title")
    if len(fig.data) > MAX_SERIES:
        raise ValueError(f"{title!r} draws {len(fig.data)} series; at most {MAX_SERIES} can be told apart "
                         "(collapse the rest with report.top_n)")
    named = sum(1 for t in fig.data if getattr(t, "name", None))
    fig.update_layout(
        template="plotly_white", colorway=list(PALETTE), separators=".,",
        font={"family": "DejaVu Sans, Arial, Helvetica, sans-serif", "size": 13},
        title={"x": 0.0, "xanchor": "left", "font": {"size": 16}},
        margin={"l": 70, "r": 30, "t": 90, "b": 60},
        showlegend=legend if legend is not None else named > 1,
        # Above the plot, under the title: below it the legend collides with slanted category labels.
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0},
        **({"height": height} if height else {}))
    fig.update_xaxes(minor={"showgrid": False, "ticks": ""}, automargin=True)
    fig.update_yaxes(minor={"showgrid": False, "ticks": ""}, tickformat=",~f", automargin=True)
    return fig


# --------------------------------------------------------------------------------------------------
# Files beside the report: Excel and CSV
# --------------------------------------------------------------------------------------------------

def _sheet_name(name: str, taken: set[str]) -> str:
    base = "".join("_" if ch in "[]:*?/\\" else ch for ch in name)[:31] or "sheet"
    out, i = base, 2
    while out.lower() in taken:
        out = f"{base[:28]}~{i}"
        i += 1
    taken.add(out.lower())
    return out


def _plain(value: Any) -> Any:
    """A value openpyxl and csv can write: missing as empty, numpy scalars as Python, dates as they are."""
    if _missing(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, _dt.datetime) and value.tzinfo is not None:
        return value.astimezone(_dt.UTC).replace(tzinfo=None)  # Excel has no time zones: UTC, said in the header
    if isinstance(value, list | tuple | set | Mapping):
        value = cell(value).replace("<br>", "; ")
    if isinstance(value, str):
        # Control characters (a NUL in a record's name) cannot be stored in a worksheet's XML: shown as U+FFFD.
        return _CONTROL.sub("\ufffd", value)
    return value


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def write_workbook(path: str | os.PathLike[str], summary: Sequence[Mapping[str, Any]],
                   sheets: Mapping[str, Sequence[Mapping[str, Any]]], *, title: str = "Summary",
                   link_columns: Sequence[str] = ("link",)) -> Path:
    """An Excel workbook: a summary sheet, then one sheet per name in ``sheets``; every sheet has a header
    row in bold, frozen, with filters, column widths fitted to the content and links that open.

    Returns:
        The path written.
    """
    from openpyxl import Workbook
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    wb = Workbook()
    taken: set[str] = set()

    def fill(ws: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        ws.append([c.replace("_", " ") for c in cols])
        for c in ws[1]:
            c.font = Font(bold=True)
        for r in rows:
            ws.append([_plain(r.get(c)) for c in cols])
        for j, c in enumerate(cols, start=1):
            letter = get_column_letter(j)
            width = max([len(str(c))] + [len(str(_plain(r.get(c)) or "")) for r in rows[:500]])
            ws.column_dimensions[letter].width = min(max(10, width + 2), 60)
            if c in link_columns:
                for i in range(2, len(rows) + 2):
                    target = ws.cell(row=i, column=j)
                    if target.value:
                        target.hyperlink = str(target.value)
                        target.style = "Hyperlink"
        ws.freeze_panes = "A2"
        if cols:
            ws.auto_filter.ref = f"A1:{get_column_letter(len(cols))}{max(1, len(rows) + 1)}"

    first = wb.active
    first.title = _sheet_name(title, taken)
    fill(first, summary)
    for name, rows in sheets.items():
        fill(wb.create_sheet(_sheet_name(name, taken)), rows)
    out = Path(path)
    wb.save(out)
    return out


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows as one CSV file (UTF-8, header row; missing values empty)."""
    import csv

    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = Path(path)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if _plain(r.get(c)) is None else _plain(r.get(c)) for c in cols})
    return out


# --------------------------------------------------------------------------------------------------
# Notebooks: the same style for what a cell displays on its own
# --------------------------------------------------------------------------------------------------

def frame_html(df: Any, *, max_rows: int = 50) -> Html:
    """A DataFrame as a report table: a meaningful index becomes a column, a plain 0..n-1 index is dropped."""
    import pandas as pd

    if not isinstance(df.index, pd.RangeIndex) or df.index.name is not None:
        df = df.reset_index()
    df = df.rename(columns=lambda c: " / ".join(map(str, c)) if isinstance(c, tuple) else str(c))
    return table(df, max_rows=max_rows, more="rows")


def install() -> None:
    """Use the report style in this notebook: DataFrames display as :func:`frame_html` tables and plotly
    charts use the palette, a white background and no minor ticks (the ``bridgekit`` template).

    Call once in a notebook's setup cell; outside IPython only the plotly template is set.
    """
    import plotly.graph_objects as go
    import plotly.io as pio

    template = go.layout.Template(layout={
        "colorway": list(PALETTE), "font": {"family": "DejaVu Sans, Arial, Helvetica, sans-serif", "size": 13},
        "title": {"x": 0.0, "xanchor": "left"},
        "xaxis": {"minor": {"showgrid": False, "ticks": ""}, "automargin": True},
        "yaxis": {"minor": {"showgrid": False, "ticks": ""}, "automargin": True, "separatethousands": True},
    })
    pio.templates["bridgekit"] = template
    pio.templates.default = "plotly_white+bridgekit"
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - notebooks always have IPython
        return
    shell = get_ipython()  # type: ignore[no-untyped-call]
    if shell is not None:
        import pandas as pd

        # By class, not by name: pandas 3 reports DataFrame's module as "pandas", older ones "pandas.core.frame".
        shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, lambda df: str(frame_html(df)))
