"""Operational health over a window: API latency, throttling headroom, sync freshness and error rates, against SLOs.

``runbooks/monitor.ipynb`` runs on a schedule; a breached SLO is a red check, so ``bridgekit run monitor``
exits 6 (CHECK_FAILED) and the scheduler can alert::

    >>> m = Monitor(bridgekit.connect("prod"))                       # doctest: +SKIP
    >>> m.latency(calls=10, p95_slo_ms=800); m.freshness(slo_minutes=60)  # doctest: +SKIP
    >>> m.record()                                                   # doctest: +SKIP

This module also owns the sync run's report helpers (:func:`sync_figure`, :func:`record_sync`); the data
watermark every runbook records lives in :mod:`bridgekit.checks`.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from bridgekit import record, report
from bridgekit.catalog import DATAVERSE_EXECUTION_S_PER_WINDOW, DATAVERSE_REQUESTS_PER_WINDOW
from bridgekit.checks import (
    STATUS_ORDER,
    Check,
    Latency,
    Section,
    endpoints,
    frame,
    measure,
    record_watermarks,
    watermarks,
    worst,
)

__all__ = [
    "Monitor",
    "record_sync",
    "sync_figure",
    "sync_summary",
    "watermark_table",
]

_BURST = "x-ms-ratelimit-burst-remaining-xrm-requests"
_TIME = "x-ms-ratelimit-time-remaining-xrm-requests"
_GRAPH_PCT = "x-ms-throttle-limit-percentage"  # Graph identity APIs, only sent above 80 % of the limit (§2.4)


# --------------------------------------------------------------------------------------------------
# The sync runbook's report
# --------------------------------------------------------------------------------------------------

def sync_figure(run: Any) -> Any:
    """A stacked bar chart of the rows each table gained, changed and lost in one sync run."""
    import plotly.graph_objects as go

    tables = [t.table for t in run.tables]
    colours = {"created": "#009E73", "updated": "#0072B2", "deleted": "#D55E00"}
    fig = go.Figure([go.Bar(name=kind, x=tables, y=[getattr(t, kind) for t in run.tables],
                            marker_color=colours[kind]) for kind in ("created", "updated", "deleted")])
    fig.update_layout(title=f"Rows changed per table in sync run {run.run_id}", barmode="stack",
                      xaxis_title="table", yaxis_title="rows changed (count)")
    return report.style_figure(fig)


def sync_summary(run: Any) -> report.Html:
    """A sync run for the report: one sentence with the totals, then one row per table."""
    failed = [t.table for t in run.tables if t.status == "error"]
    status = "red" if failed else "green"
    rows = [{"table": t.table, "mode": t.mode, "status": "red" if t.status == "error" else "green",
             "created": t.created, "updated": t.updated, "deleted": t.deleted, "fetched": t.fetched,
             "pages": t.pages, "time": report.duration(t.duration_s),
             "note": "; ".join(x for x in ("resynced" if t.resynced else "", "resumed" if t.resumed else "",
                                           t.error or t.message or "") if x)} for t in run.tables]
    return report.section(
        "Summary",
        f"<p>{report.badge(status)} Sync run <b>{run.run_id}</b>: {len(run.tables)} tables, "
        f"{report.num(run.changed)} row changes, {report.num(run.fetched)} rows fetched in "
        f"{report.duration(run.duration_s)} ({report.num(run.throughput)} rows/s)"
        + (f"; failed: {', '.join(failed)}" if failed else "") + ".</p>",
        report.table(rows, formats={"note": "text"}), page_break=False, anchor="summary")


def watermark_table(wb: Any, tables: Any = None) -> report.Html:
    """The data watermark of a warehouse for the report: per table the sync run, delta position and rows."""
    rows = [{"table": w["table"], "sync_run": w["sync_run_id"], "delta_position": w["position"], "rows": w["rows"],
             "last_status": w["last_status"], "last_synced": w["last_ended_at"]}
            for w in watermarks(wb.warehouse, tables)]
    return report.table(rows, formats={"sync_run": "text", "delta_position": "text"})


def record_sync(run: Any, wb: Any) -> dict[str, Any]:
    """Record a sync run: watermarks of its tables, its totals, and a red check when a table failed."""
    record_watermarks(wb, [t.table for t in run.tables])
    failed = [t.table for t in run.tables if t.status == "error"]
    results = {"sync_run_id": run.run_id, "tables": len(run.tables), "changed": run.changed,
               "fetched": run.fetched, "duration_s": round(run.duration_s, 3),
               "rows_per_s": round(run.throughput, 1), "failed_tables": failed,
               "changed_by_table": {t.table: t.created + t.updated + t.deleted for t in run.tables}}
    for k, v in results.items():
        record.result(k, v)
    record.check("sync.tables", "red" if failed else "green",
                 detail=(f"{len(failed)} table(s) failed: {', '.join(failed)}" if failed
                         else f"{len(run.tables)} table(s) synced, {run.changed} row change(s)"))
    return results


# --------------------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------------------

def _status_of(value: float, limit: float, *, amber_at: float = 0.8) -> str:
    """``red`` above the limit, ``amber`` above ``amber_at`` of it, else ``green``."""
    if value > limit:
        return "red"
    return "amber" if value > amber_at * limit else "green"


class Monitor:
    """Health of one profile's integration over a window, as checks against SLOs.

    Args:
        wb: A :class:`~bridgekit.workbench.Workbench`.
        now: The reference time (default: the current UTC time).
    """

    def __init__(self, wb: Any, *, now: _dt.datetime | None = None) -> None:
        self.wb = wb
        self.now = now or _dt.datetime.now(_dt.UTC)
        self.sections: dict[str, Section] = {}
        self._latency: list[Latency] = []

    @property
    def checks(self) -> list[Check]:
        """Every check run so far."""
        return [c for s in self.sections.values() for c in s.checks]

    def planned_tables(self) -> list[str]:
        """``schema.table`` for every table of the profile's sync plan."""
        plan = self.wb.profile.sync
        return [f"dataverse.{t}" for t in plan.dataverse] + [f"graph.{r}" for r in plan.graph]

    def latency(self, *, calls: int = 10, p95_slo_ms: float = 800.0) -> Section:
        """API latency percentiles (p50/p95/p99) per endpoint against a p95 SLO."""
        import plotly.graph_objects as go

        self._latency = measure(endpoints(self.wb), calls)
        checks = []
        for lat in self._latency:
            p50, p95, p99 = lat.p(50), lat.p(95), lat.p(99)
            if p95 is None:
                checks.append(Check(f"latency.{lat.endpoint}", "latency", f"{lat.endpoint} latency", "red",
                                    f"no successful call: {lat.errors[0] if lat.errors else 'no answer'}",
                                    "check the service health page and the network path",
                                    measures={"errors": len(lat.errors)}))
                continue
            status = _status_of(p95, p95_slo_ms)
            checks.append(Check(
                f"latency.{lat.endpoint}", "latency", f"{lat.endpoint} latency", status,
                f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms over {len(lat.samples_ms)} calls "
                f"(SLO p95 {p95_slo_ms:g} ms)" + (f"; {len(lat.errors)} failed" if lat.errors else ""),
                "" if status == "green" else "p95 latency is near or over its SLO: check service health and the network path",
                measures={"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "slo_ms": p95_slo_ms,
                          "errors": len(lat.errors)}))
        names = [la.endpoint for la in self._latency]
        fig = go.Figure([go.Bar(name=f"p{q}", x=names, y=[la.p(q) for la in self._latency]) for q in (50, 95, 99)])
        fig.add_hline(y=p95_slo_ms, line_dash="dash", annotation_text=f"p95 SLO {p95_slo_ms:g} ms")
        fig.update_layout(title=f"API latency percentiles over {calls} calls", barmode="group",
                          xaxis_title="endpoint", yaxis_title="latency (ms)")
        report.style_figure(fig)
        self.sections["latency"] = Section("API latency", checks, self._latency, fig)
        return self.sections["latency"]

    def throttling(self, *, min_headroom_pct: float = 10.0) -> Section:
        """Throttling headroom from the rate-limit headers of the latency calls.

        Dataverse sends the requests (``x-ms-ratelimit-burst-remaining-xrm-requests``, of 6,000 per 300 s) and
        the execution time (``x-ms-ratelimit-time-remaining-xrm-requests``, of 1,200 s) left to the caller
        (protocols.md §1.12); Graph's identity APIs send ``x-ms-throttle-limit-percentage`` only above 80 % of
        their limit (§2.4). Headroom is the smallest share left.
        """
        import plotly.graph_objects as go

        if not self._latency:
            self._latency = measure(endpoints(self.wb), 3)
        checks = []
        shares: dict[str, float | None] = {}
        for lat in self._latency:
            if lat.endpoint == "dataverse":
                bursts = [int(h[_BURST]) for h in lat.headers if h.get(_BURST, "").isdigit()]
                times = [float(h[_TIME]) for h in lat.headers if _TIME in h]
                if not bursts and not times:
                    shares["dataverse"] = None
                    checks.append(Check("throttling.dataverse", "throttling", "Dataverse service-protection headroom",
                                        "amber", "the responses carried no x-ms-ratelimit headers",
                                        "check for a proxy that strips response headers", measures={}))
                    continue
                request_share = min(bursts) / max(DATAVERSE_REQUESTS_PER_WINDOW, *bursts) if bursts else 1.0
                time_share = min(times) / max(DATAVERSE_EXECUTION_S_PER_WINDOW, *times) if times else 1.0
                share = min(request_share, time_share)
                shares["dataverse"] = share
                status = ("red" if share * 100 < min_headroom_pct else
                          "amber" if share * 100 < 2 * min_headroom_pct else "green")
                checks.append(Check(
                    "throttling.dataverse", "throttling", "Dataverse service-protection headroom", status,
                    f"{share * 100:.1f}% left (requests {min(bursts) if bursts else 'n/a'} of the window, execution "
                    f"time {min(times) if times else 'n/a'} s); floor {min_headroom_pct:g}%",
                    "" if status == "green" else
                    "lower the sync's concurrency or spread schedules; another integration may share the user",
                    measures={"headroom_pct": round(share * 100, 2), "burst_remaining": min(bursts) if bursts else None,
                              "time_remaining_s": min(times) if times else None}))
            elif lat.endpoint == "graph":
                pcts = [float(h[_GRAPH_PCT]) for h in lat.headers if _GRAPH_PCT in h]
                g_share = max(0.0, 1.0 - max(pcts)) if pcts else None
                shares["graph"] = g_share if g_share is not None else 0.2
                if g_share is None:
                    status, finding = "green", "under 80% of the limit (Graph sent no throttle-percentage header)"
                else:
                    status = ("red" if g_share * 100 < min_headroom_pct else
                              "amber" if g_share * 100 < 2 * min_headroom_pct else "green")
                    finding = f"{g_share * 100:.1f}% left of the identity API limit"
                checks.append(Check("throttling.graph", "throttling", "Graph throttling headroom", status, finding,
                                    "" if status == "green" else "batch and $select Graph reads; stagger mailbox syncs",
                                    measures={"headroom_pct": None if g_share is None else round(g_share * 100, 2)}))
        fig = go.Figure(go.Bar(x=list(shares), y=[None if v is None else v * 100 for v in shares.values()]))
        fig.add_hline(y=min_headroom_pct, line_dash="dash", annotation_text=f"floor {min_headroom_pct:g}%")
        fig.update_layout(title="Throttling headroom left per service", xaxis_title="service",
                          yaxis_title="headroom left (% of the limit)", yaxis_range=[0, 100])
        report.style_figure(fig)
        self.sections["throttling"] = Section("Throttling headroom", checks, shares, fig)
        return self.sections["throttling"]

    def freshness(self, *, slo_minutes: float = 60.0) -> Section:
        """Minutes since the position each planned table's data reached, against an SLO.

        The position is when the last round the merged data came from began (a delta, or the catch-up
        that ended a resumed or full load: ``sync_state.position_at``), not when the last run ended: a
        run that merged pages read long ago is not fresh. Warehouses written before the position was
        recorded fall back to the last successful run's end.
        """
        import pandas as pd
        import plotly.graph_objects as go

        last: dict[str, Any] = {}
        if self.wb.warehouse.exists():
            df = self.wb.sql("SELECT table_name, max(ended_at) AS ended FROM bridgekit.sync_runs WHERE status = 'ok' "
                             "GROUP BY 1")
            last = {str(t): e for t, e in zip(df["table_name"], df["ended"], strict=True)}
            has = self.wb.sql("SELECT count(*) AS n FROM duckdb_columns() WHERE schema_name = 'bridgekit' "
                              "AND table_name = 'sync_state' AND column_name = 'position_at'")
            if int(has["n"][0]):
                pos = self.wb.sql("SELECT table_name, position_at FROM bridgekit.sync_state "
                                  "WHERE position_at IS NOT NULL")
                last.update({str(t): p for t, p in zip(pos["table_name"], pos["position_at"], strict=True)
                             if str(t) in last})
        rows = []
        checks = []
        for t in self.planned_tables():
            ended = last.get(t)
            if ended is None or pd.isna(ended):
                rows.append({"table": t, "minutes": None})
                checks.append(Check(f"freshness.{t}", "freshness", f"{t} freshness", "red",
                                    "never synced successfully", "run `bridgekit sync` and schedule it",
                                    measures={"slo_minutes": slo_minutes}))
                continue
            ts = pd.Timestamp(ended)
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
            age = max(0.0, (pd.Timestamp(self.now) - ts).total_seconds() / 60.0)
            rows.append({"table": t, "minutes": round(age, 2)})
            status = _status_of(age, slo_minutes)
            checks.append(Check(f"freshness.{t}", "freshness", f"{t} freshness", status,
                                f"data reached its position {age:.1f} min ago (SLO {slo_minutes:g} min)",
                                "" if status == "green" else "check the sync schedule and the last runs' errors",
                                measures={"age_minutes": round(age, 2), "slo_minutes": slo_minutes}))
        data = pd.DataFrame(rows)
        fig = go.Figure(go.Bar(x=data["table"], y=data["minutes"]))
        fig.add_hline(y=slo_minutes, line_dash="dash", annotation_text=f"SLO {slo_minutes:g} min")
        fig.update_layout(title="Time since the last successful sync per table", xaxis_title="table",
                          yaxis_title="age (minutes)")
        report.style_figure(fig)
        self.sections["freshness"] = Section("Sync freshness", checks, data, fig)
        return self.sections["freshness"]

    def errors(self, *, window_hours: float = 24.0, max_error_rate: float = 0.05) -> Section:
        """Share of failed table runs in ``bridgekit.sync_runs`` over the window, per table."""
        import pandas as pd
        import plotly.graph_objects as go

        since = self.now - _dt.timedelta(hours=window_hours)
        df = pd.DataFrame(columns=["table_name", "runs", "errors"])
        if self.wb.warehouse.exists():
            df = self.wb.sql("SELECT table_name, count(*) AS runs, count(*) FILTER (WHERE status = 'error') AS errors "
                             "FROM bridgekit.sync_runs WHERE ended_at >= ? AND status <> 'skipped' GROUP BY 1 "
                             "ORDER BY 1", [since])
        runs = int(df["runs"].sum()) if len(df) else 0
        errs = int(df["errors"].sum()) if len(df) else 0
        rate = errs / runs if runs else None
        bad = [str(t) for t, r, e in zip(df["table_name"], df["runs"], df["errors"], strict=True)
               if r and e / r > max_error_rate]
        if not runs:
            status, finding = "amber", f"no sync ran in the last {window_hours:g} h"
        else:
            status = "red" if bad else ("amber" if errs else "green")
            finding = (f"{errs} of {runs} table runs failed in the last {window_hours:g} h "
                       f"({rate * 100 if rate is not None else 0:.1f}%; SLO {max_error_rate * 100:g}% per table)")
            if bad:
                finding += f"; over the SLO: {', '.join(bad)}"
        checks = [Check("errors.sync_runs", "errors", "Sync error rate", status, finding,
                        "" if status == "green" else "read the error column of bridgekit.sync_runs for the failing tables",
                        count=errs, rate=rate, ids=bad, measures={"runs": runs, "errors": errs,
                                                                 "window_hours": window_hours})]
        data = df.assign(error_rate_pct=(df["errors"] / df["runs"] * 100) if len(df) else [])
        fig = go.Figure(go.Bar(x=data["table_name"], y=data["error_rate_pct"]))
        fig.add_hline(y=max_error_rate * 100, line_dash="dash", annotation_text=f"SLO {max_error_rate * 100:g}%")
        fig.update_layout(title=f"Failed sync runs per table, last {window_hours:g} h", xaxis_title="table",
                          yaxis_title="failed runs (% of runs)")
        report.style_figure(fig)
        self.sections["errors"] = Section("Sync error rate", checks, data, fig)
        return self.sections["errors"]

    def summary(self) -> Any:
        """Every check as a DataFrame."""
        return frame(self.checks)

    def overview(self) -> report.Html:
        """The report's first section: the overall status, the breached SLOs and every check, worst first."""
        checks = sorted(self.checks, key=lambda c: -STATUS_ORDER[c.status])
        counts = " ".join(f"{report.badge(s)}&nbsp;{sum(1 for c in checks if c.status == s)}"
                          for s in ("red", "amber", "green"))
        breached = [c.title for c in checks if c.status == "red"]
        return report.section(
            "Summary",
            f"<p><b>Overall:</b> {report.badge(self.status())} "
            + (f"SLOs breached: {', '.join(breached)}." if breached else "every SLO met.") + "</p>",
            f"<p><b>Checks by severity:</b> {counts}</p>",
            report.table([{"status": c.status, "check": c.title, "finding": c.finding} for c in checks]),
            page_break=False, anchor="summary")

    def areas(self) -> list[Any]:
        """Every section of the report and its chart, for ``display(*m.areas())``."""
        return [part for s in self.sections.values() for part in s.parts()]

    def status(self) -> str:
        """The worst status over every check."""
        return worst(c.status for c in self.checks)

    def record(self) -> dict[str, Any]:
        """Record every check, the headline numbers and the watermark of the tables checked."""
        record_watermarks(self.wb, [t for t in self.planned_tables()])
        for c in self.checks:
            record.check(c.id, c.status, detail=c.finding)
        results: dict[str, Any] = {
            "status": self.status(),
            "breached": [c.id for c in self.checks if c.status == "red"],
            "latency_p95_ms": {la.endpoint: la.p(95) for la in self._latency},
        }
        for k, v in results.items():
            record.result(k, v)
        return results
