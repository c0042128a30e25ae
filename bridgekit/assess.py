"""The integration readiness assessment: checks scored red/amber/green with findings and recommendations, as data.

A consultant runs ``runbooks/assess.ipynb``; the notebook is a sequence of calls on one :class:`Assessment`:

    >>> a = Assessment(bridgekit.connect("emulator"))        # doctest: +SKIP
    >>> a.connectivity(calls=20, threshold_ms=150)           # doctest: +SKIP
    >>> a.data_quality(); a.cross_system(); a.record()       # doctest: +SKIP

Each area returns a :class:`Section` (its :class:`Check` list, the measures behind them and a plotly figure).
Every check carries the affected record ids where the finding is exact, so a test can compare them with
the truth (the emulator records the defects it planted; ``Workbench.emulator_truth`` reads them).

Areas, and where the yardsticks come from:

* connectivity: p50/p95 latency per endpoint over N calls against 150 ms (Microsoft's network guidance for
  Dynamics 365 model-driven apps), TLS version and cipher per endpoint (1.2 minimum, 1.3 recommended);
* identity: the application permissions in the app's access tokens against what the sync plan needs
  (least privilege), and the expiry of the credential;
* change tracking per planned table; volumes and growth per table; the duration of a full sync under the
  Dataverse service-protection limits (6,000 requests and 1,200 s of execution time per 300 s, protocols.md §1.12);
* data quality in the warehouse and cross-system consistency between Dataverse and Entra ID / Exchange;
* infrastructure prerequisites stated as parameters (bandwidth, compute per environment, RPO, RTO).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from bridgekit import record, report
from bridgekit.catalog import (
    DATAVERSE_EXECUTION_S_PER_WINDOW,
    DATAVERSE_MAX_CONCURRENCY,
    DATAVERSE_MAX_PAGE,
    DATAVERSE_REQUESTS_PER_WINDOW,
    DATAVERSE_WINDOW_S,
    GRAPH_MAILBOX_CONCURRENCY,
    GRAPH_RESOURCES,
)
from bridgekit.checks import (
    STATUS_COLOUR,
    STATUS_ORDER,
    Check,
    Latency,
    Section,
    endpoints,
    frame,
    measure,
    record_watermarks,
    tls_probe,
    watermarks,
    worst,
)
from bridgekit.errors import NotFoundError
from bridgekit.integration import PLANTED_CHECKS as INTEGRATION_CHECKS
from bridgekit.integration import assess_integration

__all__ = [
    "EMAIL_PATTERN",
    "GUIDE",
    "Assessment",
    "AssessmentReport",
    "checks_from_run",
    "compare",
    "compare_with_planted",
    "effort",
    "guide",
    "load_previous",
]

#: The primary name column of the tables whose records a finding lists.
PRIMARY_NAME = {"account": "name", "contact": "fullname", "lead": "fullname", "opportunity": "name",
                "systemuser": "fullname", "team": "name", "businessunit": "name", "email": "subject",
                "appointment": "subject", "phonecall": "subject", "task": "subject"}
#: A user's page in the Microsoft Entra admin centre.
ENTRA_USER_LINK = "https://entra.microsoft.com/#view/Microsoft_AAD_UsersAndTenants/UserProfileMenuBlade/~/overview/userId/{id}"

#: The documented rule the emulator's malformed emails break; commas are never valid in a domain either.
EMAIL_PATTERN = re.compile(r"^[^@\s,]+@[^@\s,]+\.[^@\s,]+$")


# --------------------------------------------------------------------------------------------------
# Warehouse helpers
# --------------------------------------------------------------------------------------------------

def _count(wb: Any, sql: str, params: Sequence[Any] | None = None) -> int:
    df = wb.sql(sql, params)
    return int(df.iloc[0, 0]) if len(df) else 0


def _ids(df: Any, column: str) -> list[str]:
    return sorted(str(v) for v in df[column].tolist())


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rate_status(count: int, population: int, red_rate: float) -> str:
    if count == 0:
        return "green"
    return "red" if population and count / population >= red_rate else "amber"


def _duration(seconds: float) -> str:
    return report.duration(seconds)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


# --------------------------------------------------------------------------------------------------
# The assessment
# --------------------------------------------------------------------------------------------------

class Assessment:
    """The integration readiness assessment of one profile (its tenant and its warehouse).

    Args:
        wb: A :class:`~bridgekit.workbench.Workbench` whose warehouse has been synced.
        now: The reference time (default: the current UTC time).

    Example:
        >>> a = Assessment(bridgekit.connect("emulator"))   # doctest: +SKIP
        >>> a.data_quality().frame()                        # doctest: +SKIP
    """

    def __init__(self, wb: Any, *, now: _dt.datetime | None = None) -> None:
        self.wb = wb
        self.now = now or _dt.datetime.now(_dt.UTC)
        self.sections: dict[str, Section] = {}
        self._tables: list[str] | None = None
        self._latency: list[Latency] = []
        self._rows: dict[str, int] = {}
        self._full_sync_s: float | None = None
        self._columns: dict[str, dict[str, str]] | None = None
        #: The yardsticks each area ran with (for the report's method appendix).
        self.settings: dict[str, dict[str, Any]] = {}

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def checks(self) -> list[Check]:
        """Every check run so far, in order."""
        return [c for s in self.sections.values() for c in s.checks]

    def check(self, check_id: str) -> Check:
        """One check by id.

        Raises:
            KeyError: no such check has run.
        """
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(check_id)

    def _add(self, key: str, section: Section) -> Section:
        self.sections[key] = section
        return section

    def planned_tables(self) -> list[str]:
        """``schema.table`` for every table of the profile's sync plan."""
        plan = self.wb.profile.sync
        return [f"dataverse.{t}" for t in plan.dataverse] + [f"graph.{r}" for r in plan.graph]

    def warehouse_tables(self) -> list[str]:
        """The mirrored tables present in the warehouse."""
        if self._tables is None:
            self._tables = list(self.wb.warehouse.tables())
        return self._tables

    def columns(self, table_id: str) -> dict[str, str]:
        """Column name -> DuckDB type of a warehouse table (read once for the whole warehouse)."""
        if self._columns is None:
            df = self.wb.sql("SELECT table_schema || '.' || table_name AS t, column_name, data_type FROM "
                             "information_schema.columns WHERE table_schema IN ('dataverse', 'graph') "
                             "ORDER BY t, ordinal_position")
            self._columns = {}
            for t, c, d in zip(df["t"], df["column_name"], df["data_type"], strict=True):
                self._columns.setdefault(str(t), {})[str(c)] = str(d)
        return self._columns.get(table_id, {})

    def rows(self) -> dict[str, int]:
        """Row counts per warehouse table (cached)."""
        if not self._rows and self.warehouse_tables():
            df = self.wb.sql(" UNION ALL ".join(
                f"SELECT '{t}' AS t, count(*) AS n FROM {_q(t.split('.', 1)[0])}.{_q(t.split('.', 1)[1])}"
                for t in self.warehouse_tables()))
            self._rows = {str(t): int(n) for t, n in zip(df["t"], df["n"], strict=True)}
        return self._rows

    # -- connectivity ---------------------------------------------------------------------------

    def connectivity(self, *, calls: int = 20, threshold_ms: float = 150.0) -> Section:
        """Latency per endpoint (p50/p95 over ``calls`` calls against ``threshold_ms``) and TLS per endpoint."""
        import plotly.graph_objects as go

        self.settings["connectivity"] = {"calls": calls, "threshold_ms": threshold_ms}
        self._latency = measure(endpoints(self.wb), calls)
        checks: list[Check] = []
        for lat in self._latency:
            p50, p95 = lat.p(50), lat.p(95)
            if p50 is None or p95 is None:
                checks.append(Check(f"connectivity.latency.{lat.endpoint}", "connectivity",
                                    f"{lat.endpoint} reachable", "red",
                                    f"{lat.endpoint} could not be reached: {lat.errors[0] if lat.errors else 'no answer'}",
                                    "check DNS, proxy and firewall rules for the endpoint from the integration host",
                                    measures={"errors": len(lat.errors)}))
                continue
            status = "green" if p95 <= threshold_ms else ("amber" if p50 <= threshold_ms else "red")
            if lat.errors:
                status = worst([status, "amber"])
            finding = (f"p50 {p50:.0f} ms, p95 {p95:.0f} ms over {len(lat.samples_ms)} calls "
                       f"(threshold {threshold_ms:.0f} ms)" + (f"; {len(lat.errors)} failed" if lat.errors else ""))
            rec = "" if status == "green" else (
                "run the integration close to the tenant's region (same Azure geography) and check for proxies or "
                "TLS inspection on the path; latency above the threshold slows every page of a sync")
            checks.append(Check(f"connectivity.latency.{lat.endpoint}", "connectivity",
                                f"{lat.endpoint} latency", status, finding, rec,
                                measures={"p50_ms": round(p50, 1), "p95_ms": round(p95, 1),
                                          "calls": len(lat.samples_ms), "errors": len(lat.errors),
                                          "threshold_ms": threshold_ms}))
        seen: set[tuple[str, int]] = set()
        for lat in self._latency:
            info = tls_probe(lat.url, self.wb.profile.ca_bundle)
            key = (info["host"], info["port"])
            label = f"{lat.endpoint} ({info['host']}:{info['port']})"
            if key in seen:
                continue
            seen.add(key)
            if info["error"]:
                checks.append(Check(f"connectivity.tls.{lat.endpoint}", "connectivity", f"TLS to {label}", "red",
                                    f"TLS handshake failed: {info['error']}",
                                    "trust the CA that signs the endpoint (ca_bundle in the profile) and allow TLS 1.2+",
                                    measures=info))
                continue
            version = str(info["version"])
            if version == "TLSv1.3":
                status, rec = "green", ""
            elif version == "TLSv1.2":
                status = "amber"
                rec = ("enable TLS 1.3 on the path (proxies, TLS inspection) for forward secrecy and faster handshakes"
                       if info["forward_secrecy"] else
                       "the negotiated TLS 1.2 cipher has no forward secrecy: prefer ECDHE suites, or TLS 1.3")
            else:
                status, rec = "red", "TLS 1.2 is the minimum Microsoft cloud services accept: upgrade the client stack"
            checks.append(Check(f"connectivity.tls.{lat.endpoint}", "connectivity", f"TLS to {label}", status,
                                f"{version} with {info['cipher']} ({info['bits']} bits), forward secrecy "
                                f"{'yes' if info['forward_secrecy'] else 'no'}", rec, measures=info))
        names = [lat.endpoint for lat in self._latency]
        fig = go.Figure([
            go.Bar(name="p50", x=names, y=[lat.p(50) for lat in self._latency]),
            go.Bar(name="p95", x=names, y=[lat.p(95) for lat in self._latency]),
        ])
        fig.add_hline(y=threshold_ms, line_dash="dash", annotation_text=f"threshold {threshold_ms:.0f} ms")
        fig.update_layout(title=f"Latency per endpoint over {calls} calls", barmode="group",
                          xaxis_title="endpoint", yaxis_title="latency (ms)")
        report.style_figure(fig)
        return self._add("connectivity", Section("Connectivity and TLS", checks, self._latency, fig))

    # -- identity ---------------------------------------------------------------------------------

    def _claims(self, resource_url: str) -> dict[str, Any]:
        import jwt

        from bridgekit.auth import TokenProvider, resource_scope

        token = TokenProvider(self.wb.profile).token(resource_scope(resource_url))
        # Reading our own token's claims to audit what was granted; the token itself is never kept or shown.
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        return claims

    def identity(self, *, expiry_warn_days: int = 60) -> Section:
        """Granted application permissions against the sync plan, and credential expiry."""
        prof = self.wb.profile
        self.settings["identity"] = {"expiry_warn_days": expiry_warn_days}
        checks: list[Check] = []
        graph_claims = self._claims(prof.graph_url)
        granted = sorted(str(r) for r in graph_claims.get("roles", []))
        used: set[str] = set()
        missing: list[str] = []
        for resource in prof.sync.graph:
            options = GRAPH_RESOURCES[resource].permissions if resource in GRAPH_RESOURCES else ()
            have = next((r for r in options if r in granted), None)
            if have:
                used.add(have)
            elif options:
                missing.append(f"{resource} needs {options[0]}")
        excess = [r for r in granted if r not in used]
        status = "red" if missing else ("amber" if excess else "green")
        finding = f"granted: {', '.join(granted) or 'none'}"
        if missing:
            finding += f"; missing: {'; '.join(missing)}"
        if excess:
            finding += f"; not needed by the sync plan: {', '.join(excess)}"
        rec = ""
        if missing:
            rec = "grant (and admin-consent) the missing application permissions; the sync of those resources fails with 403"
        elif excess:
            rec = "remove the permissions the sync plan does not use (least privilege); add them back when the plan grows"
        checks.append(Check("identity.graph_permissions", "identity", "Graph application permissions (least privilege)",
                            status, finding, rec, count=len(missing) + len(excess),
                            ids=missing + excess,
                            measures={"granted": granted, "used": sorted(used), "missing": missing,
                                      "excess": excess}))
        if prof.dataverse_url:
            dv_claims = self._claims(prof.dataverse_url)
            who = self.wb.dataverse.whoami()
            checks.append(Check("identity.dataverse_access", "identity", "Dataverse application user", "green",
                                f"token accepted; WhoAmI answers as user {who.get('UserId')} in business unit "
                                f"{who.get('BusinessUnitId')}", "",
                                measures={"user_id": who.get("UserId"),
                                          "token_roles": sorted(str(r) for r in dv_claims.get("roles", []))}))
        checks.append(self._credential_check(graph_claims, expiry_warn_days))
        return self._add("identity", Section("Identity and permissions", checks, {"granted": granted}))

    def _credential_check(self, claims: Mapping[str, Any], warn_days: int) -> Check:
        prof = self.wb.profile
        lifetime = (int(claims["exp"]) - int(claims["iat"])) // 60 if "exp" in claims and "iat" in claims else None
        life = f"; access tokens live {lifetime} min" if lifetime else ""
        if prof.auth == "certificate" and prof.certificate_path:
            from cryptography import x509

            from bridgekit.auth import load_certificate

            pem = load_certificate(prof.certificate_path).certificate_pem
            cert = x509.load_pem_x509_certificate(pem.encode())
            expires = cert.not_valid_after_utc
            days = (expires - self.now).days
            status = "red" if days < 14 else ("amber" if days < warn_days else "green")
            rec = "" if status == "green" else (
                "upload a new certificate to the app registration, switch the profile's certificate_path, then "
                "remove the old one")
            return Check("identity.credential_expiry", "identity", "Client certificate expiry", status,
                         f"certificate expires {expires.date().isoformat()} ({days} days){life}", rec,
                         measures={"expires": expires.isoformat(), "days_left": days, "kind": "certificate"})
        if prof.auth == "client_secret":
            return Check("identity.credential_expiry", "identity", "Client secret expiry", "amber",
                         f"the app authenticates with a client secret, whose expiry the app cannot read{life}",
                         "record the secret's expiry date from the app registration in your operations calendar, "
                         "or switch to a certificate (or a managed identity)", measures={"kind": "secret"})
        return Check("identity.credential_expiry", "identity", "Credential expiry", "green",
                     f"{prof.auth}: no stored credential expires{life}", measures={"kind": prof.auth})

    # -- change tracking, volumes, full-sync estimate --------------------------------------------------

    def change_tracking(self) -> Section:
        """Change tracking on every planned Dataverse table (metadata); Graph resources use delta queries."""
        prof = self.wb.profile
        rows = self.rows()
        checks: list[Check] = []
        for name in prof.sync.dataverse:
            table_id = f"dataverse.{name}"
            try:
                info = self.wb.dataverse.table(name)
            except NotFoundError:
                checks.append(Check(f"change_tracking.{name}", "change tracking", f"{name} change tracking", "red",
                                    f"table {name} does not exist in the environment",
                                    "remove it from the sync plan or fix its logical name", count=1, ids=[name]))
                continue
            n = rows.get(table_id, 0)
            if info.change_tracking:
                checks.append(Check(f"change_tracking.{name}", "change tracking", f"{name} change tracking", "green",
                                    f"enabled ({n} rows): syncs read only the changes", measures={"rows": n}))
                continue
            # Without change tracking every run reloads the table; one page is cheap, many are not.
            small = n <= prof.sync.page_size
            checks.append(Check(
                f"change_tracking.{name}", "change tracking", f"{name} change tracking",
                "amber" if small else "red",
                f"not enabled: every sync reloads all {n} rows ({math.ceil(max(n, 1) / prof.sync.page_size)} page(s))",
                "enable 'Track changes' on the table (Power Apps > Tables > Properties > Advanced options)",
                count=1, ids=[name], measures={"rows": n}))
        for resource in prof.sync.graph:
            ok = resource in GRAPH_RESOURCES  # every catalogued resource has a delta function (§2.2)
            checks.append(Check(f"change_tracking.graph.{resource}", "change tracking", f"graph {resource} delta",
                                "green" if ok else "red",
                                "delta query available: syncs read only the changes" if ok else
                                f"bridgekit has no delta reader for Graph resource {resource}",
                                "" if ok else "remove it from the sync plan", measures={}))
        return self._add("change_tracking", Section("Change tracking", checks))

    def _monthly(self, table_id: str) -> Any:
        schema, name = table_id.split(".", 1)
        cols = self.columns(table_id)
        created = next((c for c in ("createdon", "createdDateTime", "receivedDateTime") if c in cols), None)
        if created is None:
            return None
        return self.wb.sql(
            f"SELECT date_trunc('month', {_q(created)})::DATE AS month, count(*) AS created FROM "
            f"{_q(schema)}.{_q(name)} WHERE {_q(created)} IS NOT NULL GROUP BY 1 ORDER BY 1")

    def volumes(self, *, growth_months: int = 6, large_rows: int = 5_000_000) -> Section:
        """Rows per planned table and monthly growth (from ``createdon``), projected 12 months ahead."""
        import pandas as pd
        import plotly.graph_objects as go

        rows = self.rows()
        this_month = _dt.date(self.now.year, self.now.month, 1)
        first = (pd.Timestamp(this_month) - pd.DateOffset(months=growth_months)).date()
        self.settings["volumes"] = {"growth_months": growth_months, "large_rows": large_rows}
        table_rows: list[dict[str, Any]] = []
        series: dict[str, dict[Any, int]] = {}
        for t in self.planned_tables():
            if t not in rows:
                continue
            monthly = self._monthly(t)
            per_month = None
            if monthly is not None and len(monthly):
                months = [m.date() if hasattr(m, "date") else m for m in monthly["month"]]
                recent = [int(c) for m, c in zip(months, monthly["created"], strict=True) if first <= m < this_month]
                per_month = sum(recent) / growth_months
                series[t] = {m: int(c) for m, c in zip(months, monthly["created"], strict=True)}
            n = rows[t]
            growth = (per_month / n) if per_month is not None and n else None
            projected = int(n + 12 * per_month) if per_month is not None else n
            table_rows.append({"table": t, "rows": n, "new_per_month": None if per_month is None else round(per_month, 1),
                               "growth_per_month": None if growth is None else round(growth, 4),
                               "rows_in_12_months": projected})
        data = pd.DataFrame(table_rows)
        total = int(data["rows"].sum()) if len(data) else 0
        big = [r["table"] for r in table_rows if r["rows_in_12_months"] >= large_rows]
        fastest = max(table_rows, key=lambda r: r["growth_per_month"] or 0, default=None)
        finding = f"{total:,} rows in {len(table_rows)} tables"
        if fastest and fastest["growth_per_month"]:
            finding += f"; fastest growth {fastest['table']} {_pct(fastest['growth_per_month'])} per month"
        checks = [Check("volumes.growth", "volumes", "Volumes and growth", "amber" if big else "green",
                        finding + (f"; over {large_rows:,} rows within 12 months: {', '.join(big)}" if big else ""),
                        "plan archiving (retention policies) and partitioned full loads for the large tables" if big else "",
                        count=total, ids=big, measures={"total_rows": total})]
        # The seven busiest tables by name, the rest summed as "other": more lines cannot be told apart.
        axis = sorted({m for per in series.values() for m in per})
        fig = go.Figure([go.Scatter(x=axis, y=ys, mode="lines", name=name) for name, ys in report.top_n(
            {t: [per.get(m, 0) for m in axis] for t, per in series.items()}, other="other tables").items()])
        fig.update_layout(title="New rows per month (by creation date)", xaxis_title="month",
                          yaxis_title="rows created per month (count)")
        report.style_figure(fig)
        return self._add("volumes", Section("Volumes and growth", checks, data, fig))

    def full_sync_estimate(self, *, window_hours: float = 8.0, concurrency: int | None = None) -> Section:
        """How long a full sync would take under Dataverse service protection and Graph's mailbox limits.

        Model (protocols.md §1.12): each Dataverse page costs ``t0 + rows * t_row`` seconds, measured on a
        real page of the largest planned table (``t0`` from the connectivity p50); at most
        ``min(concurrency, 1200 s / 300 s = 4)`` requests can run on average (the execution-time budget) and
        at most 6,000 requests per 300 s. Graph pages cost the measured Graph p50 each, four mailboxes
        requests at a time per mailbox.
        """
        import pandas as pd
        import plotly.graph_objects as go

        prof = self.wb.profile
        self.settings["full_sync"] = {"window_hours": window_hours}
        rows = self.rows()
        page_size = min(prof.sync.page_size, DATAVERSE_MAX_PAGE)
        conc = max(1, min(concurrency or prof.max_concurrency, DATAVERSE_MAX_CONCURRENCY))
        lat = {la.endpoint: (la.p(50) or 0.0) / 1000.0 for la in self._latency}
        if not lat:
            lat = {la.endpoint: (la.p(50) or 0.0) / 1000.0 for la in measure(endpoints(self.wb), 5)}
        t0 = lat.get("dataverse", 0.1)
        dv_tables = [t for t in prof.sync.dataverse if f"dataverse.{t}" in rows]
        t_row = 0.0
        if dv_tables:
            biggest = max(dv_tables, key=lambda t: rows[f"dataverse.{t}"])
            started = time.perf_counter()
            page = next(iter(self.wb.dataverse.pages(biggest, page_size=page_size)), None)
            took = time.perf_counter() - started
            n_page = len(page.value) if page is not None else 0
            t_row = max(took - t0, 0.0) / n_page if n_page else 0.0
        dv_parallel = min(conc, int(DATAVERSE_EXECUTION_S_PER_WINDOW / DATAVERSE_WINDOW_S))
        estimates = []
        dv_requests = 0
        dv_serial = 0.0
        for t in dv_tables:
            n = rows[f"dataverse.{t}"]
            pages = max(1, math.ceil(n / page_size))
            serial = pages * t0 + n * t_row
            dv_requests += pages + 1  # +1: the metadata read
            dv_serial += serial
            estimates.append({"table": f"dataverse.{t}", "rows": n, "requests": pages + 1,
                              "minutes": serial / dv_parallel / 60.0})
        g = lat.get("graph", 0.1)
        mailboxes = max(1, rows.get("graph.users", 1))
        graph_s = 0.0
        for r in prof.sync.graph:
            t = f"graph.{r}"
            if t not in rows:
                continue
            n = rows[t]
            size = GRAPH_RESOURCES[r].delta_page if r in GRAPH_RESOURCES else 100
            per_mailbox = r in GRAPH_RESOURCES and GRAPH_RESOURCES[r].per_user is not None
            requests = (mailboxes * max(1, math.ceil(n / mailboxes / size)) if per_mailbox
                        else max(1, math.ceil(n / size)))
            parallel = min(conc, mailboxes * GRAPH_MAILBOX_CONCURRENCY) if per_mailbox else 1
            secs = requests * g / parallel
            graph_s += secs
            estimates.append({"table": t, "rows": n, "requests": requests, "minutes": secs / 60.0})
        dv_s = max(dv_serial / dv_parallel, dv_requests * DATAVERSE_WINDOW_S / DATAVERSE_REQUESTS_PER_WINDOW)
        total_s = dv_s + graph_s  # Dataverse and Graph run side by side in a sync, but report the safe sum
        self._full_sync_s = total_s
        hours = total_s / 3600.0
        status = "green" if hours <= window_hours else ("amber" if hours <= 3 * window_hours else "red")
        rec = "" if status == "green" else (
            "run the first full load over a weekend, partition the largest tables by createdon, and keep later "
            "runs incremental")
        checks = [Check("volumes.full_sync_time", "volumes", "Full sync duration under service protection", status,
                        f"about {_duration(total_s)} for {sum(e['rows'] for e in estimates):,} rows "
                        f"({dv_requests} Dataverse requests at {dv_parallel} effective in flight, page size "
                        f"{page_size}; window {window_hours:g} h)", rec,
                        measures={"seconds": round(total_s, 1), "dataverse_requests": dv_requests,
                                  "dataverse_parallel": dv_parallel, "page_latency_s": round(t0, 4),
                                  "row_cost_ms": round(t_row * 1000, 4), "graph_page_s": round(g, 4)})]
        data = pd.DataFrame(estimates)
        # One unit for the whole chart, chosen by the largest bar, so the axis reads "2.5 s", not "300µ min".
        top_s = max((e["minutes"] * 60 for e in estimates), default=0.0)
        unit, per = ("s", 1.0) if top_s < 180 else ("min", 60.0) if top_s < 3 * 3600 else ("h", 3600.0)
        fig = go.Figure(go.Bar(x=data["table"] if len(data) else [],
                               y=[m * 60 / per for m in data["minutes"]] if len(data) else []))
        fig.update_layout(title="Estimated full sync time per table", xaxis_title="table",
                          yaxis_title=f"estimated time ({unit})")
        report.style_figure(fig)
        return self._add("full_sync", Section("Full sync estimate", checks, data, fig))

    # -- data quality ------------------------------------------------------------------------------

    def _has(self, table_id: str) -> bool:
        return table_id in self.warehouse_tables()

    def duplicate_accounts(self) -> tuple[list[str], list[list[str]]]:
        """Accounts that repeat an earlier account: (duplicate ids, clusters as lists of ids, first kept).

        Two accounts are the same company when their email/web domains match and their names match up to case,
        whitespace, punctuation or a dropped last word (a legal suffix). In each cluster the earliest created
        record (then the lowest account number) is the original; the others are the duplicates.
        """
        df = self.wb.sql("SELECT accountid::VARCHAR AS id, name, emailaddress1, websiteurl, createdon, accountnumber "
                         "FROM dataverse.account")
        recs = df.to_dict("records")

        def norm(name: Any) -> str:
            return " ".join(re.sub(r"[^a-z0-9 ]", " ", str(name or "").lower()).split())

        def domain(rec: Mapping[str, Any]) -> str:
            email = str(rec.get("emailaddress1") or "")
            if "@" in email:
                return email.rsplit("@", 1)[1].lower().strip()
            web = str(rec.get("websiteurl") or "")
            host = urlsplit(web if "://" in web else f"https://{web}").hostname or ""
            return host.removeprefix("www.")

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(recs):
            key = domain(r) or f"name:{norm(r['name'])}"
            groups.setdefault(key, []).append(i)
        parent = list(range(len(recs)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for members in groups.values():
            if len(members) < 2:
                continue
            names = {i: norm(recs[i]["name"]) for i in members}
            for a_i, a in enumerate(members):
                for b in members[a_i + 1:]:
                    na, nb = names[a], names[b]
                    same = na == nb or (na and na == nb.rsplit(" ", 1)[0] and " " in nb) or \
                        (nb and nb == na.rsplit(" ", 1)[0] and " " in na)
                    if same:
                        parent[find(a)] = find(b)
        clusters: dict[int, list[int]] = {}
        for i in range(len(recs)):
            clusters.setdefault(find(i), []).append(i)
        dups: list[str] = []
        out_clusters: list[list[str]] = []
        for members in clusters.values():
            if len(members) < 2:
                continue
            ordered = sorted(members, key=lambda i: (recs[i]["createdon"], str(recs[i]["accountnumber"] or ""),
                                                     recs[i]["id"]))
            out_clusters.append([recs[i]["id"] for i in ordered])
            dups += [recs[i]["id"] for i in ordered[1:]]
        return sorted(dups), out_clusters

    def orphan_lookups(self) -> dict[tuple[str, str], list[str]]:
        """Rows whose lookup points at a record missing from the target table, by (table, lookup column).

        Only lookups whose target table is mirrored can be checked; the target comes from the lookup's
        ``<column>_entitytype`` (the ``lookuplogicalname`` annotation) and its key from the sync state.
        """
        keys: dict[str, str] = {}
        for t, st in self.wb.warehouse.state().items():
            try:
                keys[t] = json.loads(st.get("spec") or "{}").get("key") or ""
            except (TypeError, ValueError):
                keys[t] = ""
        out: dict[tuple[str, str], list[str]] = {}
        for t in self.warehouse_tables():
            schema, name = t.split(".", 1)
            if schema != "dataverse" or not keys.get(t):
                continue
            cols = self.columns(t)
            lookups = [c.removesuffix("_entitytype") for c in cols
                       if c.endswith("_entitytype") and c.removesuffix("_entitytype") in cols]
            if not lookups:
                continue
            # One query for the target tables of every lookup, one for the orphans (a query each is slow).
            targets = self.wb.sql(" UNION ALL ".join(
                f"SELECT DISTINCT '{lk}' AS lk, {_q(lk + '_entitytype')} AS target FROM dataverse.{_q(name)} "
                f"WHERE {_q(lk)} IS NOT NULL AND {_q(lk + '_entitytype')} IS NOT NULL" for lk in lookups))
            parts = []
            for lk, target in zip(targets["lk"], targets["target"], strict=True):
                tid = f"dataverse.{target}"
                if not keys.get(tid) or not self._has(tid) or not re.fullmatch(r"[a-z0-9_]+", str(target)):
                    continue
                parts.append(
                    f"SELECT '{lk}' AS lk, s.{_q(keys[t])}::VARCHAR AS id FROM dataverse.{_q(name)} s "
                    f"WHERE s.{_q(lk + '_entitytype')} = '{target}' AND s.{_q(lk)} IS NOT NULL AND NOT EXISTS "
                    f"(SELECT 1 FROM dataverse.{_q(str(target))} x WHERE x.{_q(keys[tid])} = s.{_q(lk)})")
            if not parts:
                continue
            found = self.wb.sql(" UNION ALL ".join(parts))
            for lk, rid in zip(found["lk"], found["id"], strict=True):
                out.setdefault((name, str(lk)), []).append(str(rid))
        return {k: sorted(set(v)) for k, v in out.items()}

    def data_quality(self, *, stale_days: int = 90, red_rate: float = 0.03) -> Section:
        """Duplicate accounts, missing and malformed emails, orphan lookups, stale open opportunities."""
        import plotly.graph_objects as go

        self.settings["quality"] = {"stale_days": stale_days, "red_rate": red_rate}
        rows = self.rows()
        checks: list[Check] = []
        if self._has("dataverse.account"):
            dups, clusters = self.duplicate_accounts()
            n = rows["dataverse.account"]
            checks.append(Check(
                "quality.duplicate_accounts", "data quality", "Duplicate accounts",
                _rate_status(len(dups), n, red_rate),
                f"{len(dups)} of {n} accounts ({_pct(len(dups) / n if n else None)}) repeat an earlier account "
                f"(same domain, name equal up to case, punctuation or a dropped suffix) in {len(clusters)} clusters",
                "merge the duplicates in Dynamics 365 (Merge keeps the original and re-parents contacts, "
                "opportunities and activities); enable duplicate detection rules on name and domain" if dups else "",
                count=len(dups), rate=len(dups) / n if n else None, ids=dups, measures={"clusters": len(clusters)}))
        if self._has("dataverse.contact"):
            n = rows["dataverse.contact"]
            missing = _ids(self.wb.sql("SELECT contactid::VARCHAR AS id FROM dataverse.contact WHERE "
                                       "emailaddress1 IS NULL OR trim(emailaddress1) = ''"), "id")
            present = self.wb.sql("SELECT contactid::VARCHAR AS id, emailaddress1 AS e FROM dataverse.contact "
                                  "WHERE emailaddress1 IS NOT NULL AND trim(emailaddress1) <> ''")
            bad = sorted(str(i) for i, e in zip(present["id"], present["e"], strict=True)
                         if not EMAIL_PATTERN.match(str(e).strip()))
            checks.append(Check(
                "quality.contacts_missing_email", "data quality", "Contacts without an email address",
                _rate_status(len(missing), n, red_rate),
                f"{len(missing)} of {n} contacts ({_pct(len(missing) / n if n else None)}) have no email address",
                "make email business-recommended on the contact form and backfill from mailbox traffic" if missing else "",
                count=len(missing), rate=len(missing) / n if n else None, ids=missing))
            checks.append(Check(
                "quality.contacts_malformed_email", "data quality", "Contacts with a malformed email address",
                _rate_status(len(bad), n, red_rate),
                f"{len(bad)} of {n} contacts ({_pct(len(bad) / n if n else None)}) have an email address that is not "
                "name@domain.tld (double @, missing @ or domain, spaces, commas)",
                "correct them (mail to them bounces and server-side sync cannot track it) and validate the "
                "format on entry" if bad else "",
                count=len(bad), rate=len(bad) / n if n else None, ids=bad))
        orphans = self.orphan_lookups()
        orphan_ids = sorted({i for ids in orphans.values() for i in ids})
        checked = sum(rows.get(f"dataverse.{t}", 0) for t in {t for t, _ in orphans}) or sum(
            v for k, v in rows.items() if k.startswith("dataverse."))
        by_col = {f"{t}.{c}": len(ids) for (t, c), ids in sorted(orphans.items())}
        checks.append(Check(
            "quality.orphan_lookups", "data quality", "Lookups to missing records",
            _rate_status(len(orphan_ids), checked, red_rate),
            f"{len(orphan_ids)} records point at a record that does not exist"
            + (": " + ", ".join(f"{k} {v}" for k, v in by_col.items()) if by_col else ""),
            "repair or clear the lookups (they break roll-ups, reports and the sync's joins); find the import or "
            "integration that deletes parents without cascading" if orphan_ids else "",
            count=len(orphan_ids), rate=len(orphan_ids) / checked if checked else None, ids=orphan_ids,
            measures={"by_lookup": by_col, "by_lookup_ids": {f"{t}.{c}": ids for (t, c), ids in orphans.items()}}))
        if self._has("dataverse.opportunity"):
            n_open = _count(self.wb, "SELECT count(*) FROM dataverse.opportunity WHERE statecode = 0")
            cutoff = self.now - _dt.timedelta(days=stale_days)
            stale = _ids(self.wb.sql("SELECT opportunityid::VARCHAR AS id FROM dataverse.opportunity WHERE statecode = 0 "
                                     "AND estimatedclosedate < ?", [cutoff]), "id")
            n = rows["dataverse.opportunity"]
            checks.append(Check(
                "quality.stale_open_opportunities", "data quality", "Stale open opportunities",
                _rate_status(len(stale), n, red_rate),
                f"{len(stale)} of {n_open} open opportunities were due to close more than {stale_days} days ago",
                "close them as lost or re-date them with the owners; stale deals inflate the pipeline and forecasts"
                if stale else "", count=len(stale), rate=len(stale) / n if n else None, ids=stale,
                measures={"open": n_open, "stale_days": stale_days}))
        fig = go.Figure(go.Bar(x=[c.title for c in checks],
                               y=[(c.rate or 0.0) * 100 for c in checks],
                               text=[report.status_word(c.status) for c in checks], textposition="outside",
                               marker_color=[STATUS_COLOUR[c.status] for c in checks]))
        fig.add_hline(y=red_rate * 100, line_dash="dash", annotation_text=f"red at {red_rate * 100:g}%")
        fig.update_layout(title="Data quality: affected share of each table", xaxis_title="check",
                          yaxis_title="affected rows (% of table)")
        report.style_figure(fig)
        return self._add("quality", Section("Data quality", checks, None, fig))

    # -- cross-system -------------------------------------------------------------------------------

    def cross_system(self, *, inactive_days: int = 90) -> Section:
        """Disabled Entra users who own CRM records or are still active system users; contacts nobody wrote to."""
        import pandas as pd
        import plotly.graph_objects as go

        self.settings["cross"] = {"inactive_days": inactive_days}
        checks: list[Check] = []
        owned = pd.DataFrame(columns=["table", "records"])
        if self._has("graph.users") and self._has("dataverse.systemuser"):
            disabled = self.wb.sql(
                "SELECT s.systemuserid::VARCHAR AS id, s.fullname, s.isdisabled, u.userPrincipalName AS upn "
                "FROM dataverse.systemuser s JOIN graph.users u ON lower(s.azureactivedirectoryobjectid::VARCHAR) = "
                "lower(u.id) WHERE u.accountEnabled = false")
            ids = [str(i) for i in disabled["id"]]
            counts: dict[str, int] = {}
            per_user: dict[str, int] = dict.fromkeys(ids, 0)
            if ids:
                for t in self.warehouse_tables():
                    schema, name = t.split(".", 1)
                    # Users, teams and business units own themselves: not work left behind.
                    if schema != "dataverse" or name in ("systemuser", "team", "businessunit") \
                            or "ownerid" not in self.columns(t):
                        continue
                    df = self.wb.sql(f"SELECT ownerid::VARCHAR AS o, count(*) AS n FROM dataverse.{_q(name)} "
                                     f"WHERE ownerid::VARCHAR IN (SELECT unnest(?::VARCHAR[])) GROUP BY 1", [ids])
                    if len(df):
                        counts[name] = int(df["n"].sum())
                        for o, n in zip(df["o"], df["n"], strict=True):
                            per_user[str(o)] += int(n)
            owners = sorted(u for u, n in per_user.items() if n > 0)
            total = sum(counts.values())
            owned = pd.DataFrame([{"table": k, "records": v} for k, v in sorted(counts.items())])
            checks.append(Check(
                "cross.disabled_users_owning_records", "cross-system", "Disabled Entra users who own CRM records",
                "red" if owners else "green",
                f"{len(owners)} user(s) disabled in Entra ID still own {total} CRM records"
                + (f" ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})" if counts else ""),
                "reassign their records (Reassign records on the user, or a bulk owner update) to active users or a "
                "team; nobody works these accounts and opportunities" if owners else "",
                count=len(owners), ids=owners, measures={"records": counts, "records_total": total,
                                                         "by_user": {u: per_user[u] for u in owners}}))
            active = sorted(str(i) for i, d in zip(disabled["id"], disabled["isdisabled"], strict=True) if not d)
            checks.append(Check(
                "cross.disabled_users_active_in_crm", "cross-system", "Disabled Entra users still active in Dataverse",
                "red" if active else "green",
                f"{len(active)} user(s) disabled in Entra ID are still enabled system users in Dataverse",
                "disable the system users (and remove their licences and security roles); Dataverse does not "
                "follow Entra's account state for users it already synchronised" if active else "",
                count=len(active), ids=active))
        if self._has("dataverse.contact") and (self._has("graph.messages") or self._has("graph.events")):
            since = self.now - _dt.timedelta(days=inactive_days)
            contacts = self.wb.sql("SELECT contactid::VARCHAR AS id, lower(trim(emailaddress1)) AS e FROM "
                                   "dataverse.contact WHERE statecode = 0 AND emailaddress1 IS NOT NULL")
            valid = {str(i): str(e) for i, e in zip(contacts["id"], contacts["e"], strict=True)
                     if EMAIL_PATTERN.match(str(e))}
            seen: set[str] = set()
            if self._has("graph.messages"):
                df = self.wb.sql(
                    "SELECT DISTINCT lower(a) AS a FROM (SELECT from_address AS a FROM graph.messages WHERE "
                    "receivedDateTime >= ? UNION ALL SELECT unnest(to_addresses) FROM graph.messages WHERE "
                    "receivedDateTime >= ? UNION ALL SELECT unnest(cc_addresses) FROM graph.messages WHERE "
                    "receivedDateTime >= ?) WHERE a IS NOT NULL", [since, since, since])
                seen.update(str(a) for a in df["a"])
            if self._has("graph.events"):
                df = self.wb.sql("SELECT DISTINCT lower(unnest(attendee_addresses)) AS a FROM graph.events WHERE "
                                 "start_utc >= ? AND start_utc <= ? AND NOT coalesce(isCancelled, false)",
                                 [since, self.now])
                seen.update(str(a) for a in df["a"])
            quiet = sorted(i for i, e in valid.items() if e not in seen)
            share = len(quiet) / len(valid) if valid else None
            status = "green" if not quiet or (share or 0) < 0.10 else "amber"
            checks.append(Check(
                "cross.contacts_without_engagement", "cross-system",
                f"Contacts with no mail or meeting in {inactive_days} days",
                status,
                f"{len(quiet)} of {len(valid)} active contacts with a valid address ({_pct(share)}) had no mail or "
                f"meeting in the synced mailboxes in the last {inactive_days} days",
                "review the coverage with the account owners: re-engage or deactivate these contacts; check that "
                "every seller's mailbox is in the sync plan" if quiet else "",
                count=len(quiet), rate=share, ids=quiet, measures={"active_with_email": len(valid)}))
        fig = go.Figure(go.Bar(x=owned["table"] if len(owned) else [], y=owned["records"] if len(owned) else []))
        fig.update_layout(title="CRM records owned by users disabled in Entra ID", xaxis_title="table",
                          yaxis_title="records owned (count)")
        report.style_figure(fig)
        return self._add("cross", Section("Cross-system consistency", checks, owned, fig))

    # -- integration layer -----------------------------------------------------------------------------

    def integration(self, **options: Any) -> Section:
        """Plug-in steps, service endpoints, flows, system jobs, roles and settings, with a map of the integration
        surface; options and yardsticks in :func:`bridgekit.integration.assess_integration`."""
        return self._add("integration", assess_integration(self, **options))

    # -- infrastructure -----------------------------------------------------------------------------

    def infrastructure(self, *, users: int, bandwidth_mbps_per_1000_users: float,
                       environments: Mapping[str, Mapping[str, Any]], rpo_minutes: float, rto_hours: float,
                       min_kbytes_per_user: float = 50.0, min_vcores: int = 2, min_ram_gb: float = 8.0,
                       rec_vcores: int = 4, rec_ram_gb: float = 16.0) -> Section:
        """Prerequisites stated as parameters: bandwidth, compute per environment, RPO and RTO.

        Bandwidth follows Microsoft's guidance for Dynamics 365 clients (at least 50 KB/s per user:
        400 Mbit/s per 1,000 users at full concurrency; half of that is amber). Compute is the host that runs
        syncs and the warehouse: 2 vCores / 8 GB minimum, 4 / 16 recommended. RPO at most 15 minutes and
        RTO at most 4 hours are the integration's service targets.
        """
        self.settings["infrastructure"] = {"users": users, "min_kbytes_per_user": min_kbytes_per_user,
                                           "min_vcores": min_vcores, "min_ram_gb": min_ram_gb,
                                           "rec_vcores": rec_vcores, "rec_ram_gb": rec_ram_gb}
        checks: list[Check] = []
        need = min_kbytes_per_user * 8 / 1000 * 1000  # Mbit/s per 1,000 users (50 KB/s -> 400 Mbit/s)
        status = ("green" if bandwidth_mbps_per_1000_users >= need else
                  "amber" if bandwidth_mbps_per_1000_users >= need / 2 else "red")
        total = bandwidth_mbps_per_1000_users * users / 1000
        checks.append(Check(
            "infrastructure.bandwidth", "infrastructure", "Bandwidth per 1,000 users", status,
            f"{bandwidth_mbps_per_1000_users:g} Mbit/s per 1,000 users ({total:g} Mbit/s for {users} users); "
            f"guidance {need:g} Mbit/s ({min_kbytes_per_user:g} KB/s per user)",
            "" if status == "green" else "raise the site's internet breakout capacity or plan for slower forms at peak",
            measures={"per_1000": bandwidth_mbps_per_1000_users, "needed_per_1000": need, "users": users}))
        problems: list[str] = []
        env_status = []
        for env, spec in environments.items():
            vc = float(spec.get("vcores", 0))
            ram = float(spec.get("ram_gb", 0))
            s = ("red" if vc < min_vcores or ram < min_ram_gb else
                 "amber" if vc < rec_vcores or ram < rec_ram_gb else "green")
            env_status.append(s)
            if s != "green":
                problems.append(f"{env} {vc:g} vCores / {ram:g} GB ({s})")
        status = worst(env_status) if env_status else "red"
        checks.append(Check(
            "infrastructure.compute", "infrastructure", "vCores and RAM per environment", status,
            (f"{len(environments)} environments: " + ", ".join(
                f"{e} {float(s.get('vcores', 0)):g} vCores / {float(s.get('ram_gb', 0)):g} GB"
                for e, s in environments.items())) if environments else "no environments given",
            "" if status == "green" else
            f"size each environment at {rec_vcores} vCores / {rec_ram_gb:g} GB or more "
            f"(minimum {min_vcores} / {min_ram_gb:g}): {'; '.join(problems) or 'state the environments'}",
            count=len(problems), ids=[p.split(" ", 1)[0] for p in problems],
            measures={"environments": {k: dict(v) for k, v in environments.items()}}))
        checks.append(Check(
            "infrastructure.rpo", "infrastructure", "Recovery point objective", "green" if rpo_minutes <= 15 else "red",
            f"RPO {rpo_minutes:g} minutes (target: at most 15)",
            "" if rpo_minutes <= 15 else "schedule incremental syncs (and warehouse backups) at least every 15 minutes",
            measures={"rpo_minutes": rpo_minutes}))
        status = "green" if rto_hours <= 4 else "red"
        rebuild_h = (self._full_sync_s or 0.0) / 3600.0
        rec = "" if status == "green" else "keep a standby warehouse copy or restore from backup to recover within 4 hours"
        finding = f"RTO {rto_hours:g} hours (target: at most 4)"
        if self._full_sync_s is not None:
            finding += f"; rebuilding the warehouse by a full sync takes about {_duration(self._full_sync_s)}"
            if rebuild_h > rto_hours and status == "green":
                status, rec = "amber", "a rebuild from the source is slower than the RTO: back the warehouse up"
        checks.append(Check("infrastructure.rto", "infrastructure", "Recovery time objective", status, finding, rec,
                            measures={"rto_hours": rto_hours, "rebuild_hours": round(rebuild_h, 3)}))
        return self._add("infrastructure", Section("Infrastructure prerequisites", checks))

    # -- outputs ------------------------------------------------------------------------------------

    def summary(self) -> Any:
        """Every check as a DataFrame, worst first."""
        df = frame(self.checks)
        if len(df):
            df = df.sort_values("status", key=lambda s: s.map(STATUS_ORDER), ascending=False, kind="stable")
        return df.reset_index(drop=True)

    def figure(self) -> Any:
        """A chart of how many checks are green, amber and red in each area."""
        import plotly.graph_objects as go

        areas = list(dict.fromkeys(c.area for c in self.checks))
        fig = go.Figure([go.Bar(name=s, x=areas, y=[sum(1 for c in self.checks if c.area == a and c.status == s)
                                                   for a in areas],
                                marker_color=STATUS_COLOUR[s])
                         for s in ("green", "amber", "red")])
        fig.update_layout(title="Readiness by area", barmode="stack", xaxis_title="area",
                          yaxis_title="checks (count)")
        return report.style_figure(fig)

    def record(self) -> dict[str, Any]:
        """Record every check (``bridgekit.record.check``), the key results and the data watermark.

        Returns:
            The results recorded (check statuses, finding counts, full-sync estimate).
        """
        record_watermarks(self.wb, tables=[t for t in self.planned_tables() if t in self.warehouse_tables()])
        for c in self.checks:
            record.check(c.id, c.status, detail=c.finding)
        statuses = {s: sum(1 for c in self.checks if c.status == s) for s in ("green", "amber", "red")}
        results = {"checks": statuses,
                   "findings": {c.id: c.count for c in self.checks if c.area in ("data quality", "cross-system")},
                   "full_sync_minutes": None if self._full_sync_s is None else round(self._full_sync_s / 60, 2),
                   "latency_p95_ms": {la.endpoint: la.p(95) and round(la.p(95) or 0, 1) for la in self._latency},
                   # Every check's status and count: what the next assessment compares itself with.
                   "check_counts": {c.id: c.count for c in self.checks}}
        for k, v in results.items():
            record.result(k, v)
        return results

    # -- evidence: the affected records of every exact finding ----------------------------------------

    def _key(self, table: str) -> str:
        spec = self.wb.warehouse.state().get(f"dataverse.{table}", {}).get("spec") or "{}"
        try:
            key = json.loads(spec).get("key")
        except (TypeError, ValueError):
            key = None
        return str(key or f"{table}id")

    def _records(self, table: str, ids: Sequence[str], extra: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """``id``, ``record`` (the primary name), ``owner`` (user or team name) and ``extra`` columns of some rows."""
        if not ids or not self._has(f"dataverse.{table}"):
            return []
        cols = self.columns(f"dataverse.{table}")
        name = next((c for c in (PRIMARY_NAME.get(table, ""), "name", "fullname", "subject", "title") if c in cols),
                    None)
        joins, owners = "", []
        if "ownerid" in cols:
            if self._has("dataverse.systemuser"):
                joins += " LEFT JOIN dataverse.systemuser ou ON ou.systemuserid = r.ownerid"
                owners.append("ou.fullname")
            if self._has("dataverse.team"):
                joins += " LEFT JOIN dataverse.team ot ON ot.teamid = r.ownerid"
                owners.append("ot.name")
            owners.append("r.ownerid::VARCHAR")
        key = self._key(table)
        more = "".join(f", {expr} AS {_q(alias)}" for alias, expr in (extra or {}).items())
        df = self.wb.sql(
            f"SELECT {f'r.{_q(name)}' if name else 'NULL'} AS record, r.{_q(key)}::VARCHAR AS id, "
            f"{'coalesce(' + ', '.join(owners) + ')' if owners else 'NULL'} AS owner{more} "
            f"FROM dataverse.{_q(table)} r{joins} WHERE r.{_q(key)}::VARCHAR IN (SELECT unnest(?::VARCHAR[])) "
            "ORDER BY 1, 2", [list(ids)])
        return [{**r, "table": table, "link": self.record_link(table, str(r["id"]))} for r in df.to_dict("records")]

    def record_link(self, table: str, record_id: str) -> str | None:
        """The address that opens a record in the Dynamics 365 UI (None without a Dataverse URL)."""
        base = (self.wb.profile.dataverse_url or "").rstrip("/")
        return f"{base}/main.aspx?etn={table}&id={record_id}&pagetype=entityrecord" if base else None

    def evidence(self) -> dict[str, list[dict[str, Any]]]:
        """The affected records of every exact finding that is not green, by check id.

        Each row: ``record`` (primary name), ``id``, ``table``, ``owner``, ``detail`` (what is wrong with it) and
        ``link`` (opens it in Dynamics 365); users also carry ``entra_link`` (the Entra admin centre).
        """
        out: dict[str, list[dict[str, Any]]] = {}
        by_id = {c.id: c for c in self.checks if c.status != "green" and c.ids}
        if "quality.duplicate_accounts" in by_id:
            _dups, clusters = self.duplicate_accounts()
            everyone = self._records("account", [i for cl in clusters for i in cl])
            names = {r["id"]: r["record"] for r in everyone}
            original = {d: cl[0] for cl in clusters for d in cl[1:]}
            out["quality.duplicate_accounts"] = [
                {**r, "detail": f"duplicate of {names.get(original[r['id']])} ({original[r['id']]})",
                 "original_id": original[r["id"]]} for r in everyone if r["id"] in original]
        if "quality.contacts_missing_email" in by_id:
            out["quality.contacts_missing_email"] = [
                {**r, "detail": "no email address"}
                for r in self._records("contact", by_id["quality.contacts_missing_email"].ids)]
        if "quality.contacts_malformed_email" in by_id:
            out["quality.contacts_malformed_email"] = [
                {**{k: v for k, v in r.items() if k != "email"}, "detail": f"email: {r['email']}"}
                for r in self._records("contact", by_id["quality.contacts_malformed_email"].ids,
                                       {"email": "r.emailaddress1"})]
        if "quality.orphan_lookups" in by_id:
            rows: list[dict[str, Any]] = []
            for where, ids in sorted(by_id["quality.orphan_lookups"].measures.get("by_lookup_ids", {}).items()):
                table, column = where.split(".", 1)
                rows += [{**{k: v for k, v in r.items() if k not in ("target", "target_type")},
                          "detail": f"{column} points at {r['target_type']} {r['target']}, which does not exist"}
                         for r in self._records(table, ids, {"target": f"r.{_q(column)}::VARCHAR",
                                                            "target_type": f"r.{_q(column + '_entitytype')}"})]
            out["quality.orphan_lookups"] = rows
        if "quality.stale_open_opportunities" in by_id:
            out["quality.stale_open_opportunities"] = [
                {**{k: v for k, v in r.items() if k not in ("due", "value")},
                 "detail": f"due {report.cell(r['due'])}, estimated value {report.num(r['value'])}"}
                for r in self._records("opportunity", by_id["quality.stale_open_opportunities"].ids,
                                       {"due": "r.estimatedclosedate::DATE", "value": "r.estimatedvalue"})]
        for cid in ("cross.disabled_users_owning_records", "cross.disabled_users_active_in_crm"):
            if cid in by_id:
                owned = by_id[cid].measures.get("by_user", {})
                out[cid] = [
                    {**{k: v for k, v in r.items() if k not in ("upn", "aad")}, "owner": None,
                     "detail": f"{r['upn'] or 'no sign-in name'} disabled in Entra ID"
                               + (f"; owns {owned[r['id']]:,} CRM records" if r["id"] in owned else
                                  "; still enabled in Dataverse"),
                     "entra_link": ENTRA_USER_LINK.format(id=r["aad"]) if r["aad"] else None}
                    for r in self._records("systemuser", by_id[cid].ids,
                                           {"upn": "r.domainname", "aad": "r.azureactivedirectoryobjectid::VARCHAR"})]
        if "cross.contacts_without_engagement" in by_id:
            out["cross.contacts_without_engagement"] = [
                {**{k: v for k, v in r.items() if k != "email"}, "detail": f"{r['email']}: no mail or meeting"}
                for r in self._records("contact", by_id["cross.contacts_without_engagement"].ids,
                                       {"email": "r.emailaddress1"})]
        for c in self.checks:
            if c.id.startswith("integration.") and c.id in by_id:
                # Components, not business records: their evidence rows come from the check, one per id.
                details = {str(e["id"]): e for e in c.measures.get("evidence", []) if isinstance(e, Mapping)
                           and "id" in e}
                out[c.id] = [{"record": str((details.get(i) or {}).get("name") or (details.get(i) or {}).get("step")
                                            or i),
                              "id": i, "table": (details.get(i) or {}).get("table"),
                              "detail": "; ".join(f"{k}: {report.cell(v)}" for k, v in (details.get(i) or {}).items()
                                                  if k not in ("id", "name", "table")) or c.finding}
                             for i in c.ids]
        order = ("record", "id", "table", "owner", "detail", "link", "entra_link", "original_id")
        return {k: [{c: r.get(c) for c in order if c in r} for r in v] for k, v in out.items()}

    def ground_truth(self) -> Any:
        """For an emulator profile: the defects the emulator planted against what the checks found (else None).

        This is the emulator's answer key: it belongs in the terminal and in its own file (``bridgekit demo``
        writes ``ground_truth.json``), never in the customer's report or the manifest.
        """
        truth = self.wb.emulator_truth()
        planted = (truth or {}).get("planted_defects")
        if not planted:
            return None
        return compare_with_planted(self.checks, planted)


# --------------------------------------------------------------------------------------------------
# Ground truth from the emulator
# --------------------------------------------------------------------------------------------------

#: Planted defect (emulator store meta ``planted_defects``) -> the check that must find it.
PLANTED_CHECKS = {
    "duplicate_accounts": "quality.duplicate_accounts",
    "contacts_missing_email": "quality.contacts_missing_email",
    "contacts_malformed_email": "quality.contacts_malformed_email",
    "orphan_lookups": "quality.orphan_lookups",
    "stale_open_opportunities": "quality.stale_open_opportunities",
    "disabled_users_owning_records": "cross.disabled_users_owning_records",
    "disabled_users_active_in_crm": "cross.disabled_users_active_in_crm",
    **INTEGRATION_CHECKS,
}


def _planted_ids(name: str, entry: Mapping[str, Any]) -> list[str]:
    if name == "orphan_lookups":
        return sorted({*entry.get("contact", {}).get("ids", []), *entry.get("opportunity", {}).get("ids", [])})
    return sorted(str(i) for i in entry.get("ids", []))


def checks_from_run(run_dir: Any) -> list[Check]:
    """The checks of a finished assess run, rebuilt from its manifest and ``evidence.csv`` (with their ids)."""
    import csv
    from pathlib import Path

    m = load_previous(run_dir)
    counts = (m.get("results") or {}).get("check_counts") or {}
    ids: dict[str, list[str]] = {}
    path = Path(run_dir) / EVIDENCE_CSV
    if path.is_file():
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                ids.setdefault(row["finding"], []).append(row["id"])
    return [Check(str(c["name"]), "", str(c["name"]), str(c["status"]), str(c.get("detail", "")),
                  count=int(counts.get(c["name"], 0) or 0), ids=sorted(set(ids.get(str(c["name"]), []))))
            for c in m.get("checks", [])]


def compare_with_planted(checks: Sequence[Check], planted: Mapping[str, Any]) -> Any:
    """One row per planted defect: planted count and rate, what the matching check found, matched/missed/extra ids."""
    import pandas as pd

    by_id = {c.id: c for c in checks}
    rows = []
    for name, entry in planted.items():
        check_id = PLANTED_CHECKS.get(name)
        c = by_id.get(check_id or "")
        want = set(_planted_ids(name, entry))
        got = {i.lower() for i in c.ids} if c else set()
        want_l = {i.lower() for i in want}
        rows.append({"defect": name, "check": check_id or "", "status": c.status if c else "not run",
                     "planted": int(entry.get("count", len(want))), "planted_rate": entry.get("rate"),
                     "found": c.count if c else 0, "matched": len(want_l & got),
                     "missed": len(want_l - got), "extra": len(got - want_l)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# The customer report
# --------------------------------------------------------------------------------------------------

#: Per check (longest id prefix wins): owner role, impact (3 high .. 1 low), why it matters, effort.
#: Effort is ``("record", minutes per affected record)`` or ``("fixed", "text")``.
GUIDE: dict[str, tuple[str, int, str, tuple[str, Any]]] = {
    "connectivity.latency": (
        "integration developer", 2, "Every page of every sync pays the round trip: a slow path stretches the sync "
        "window and makes long runs time out.", ("fixed", "1-2 days")),
    "connectivity.tls": (
        "integration developer", 1, "TLS protects the customer's data in flight; Microsoft's cloud services refuse "
        "anything older than TLS 1.2.", ("fixed", "about 2 h")),
    "identity.graph_permissions": (
        "Entra admin", 2, "Application permissions apply to the whole tenant: an unused one is access an attacker "
        "gets for free, a missing one makes the sync of a resource fail.", ("fixed", "about 1 h")),
    "identity.dataverse_access": (
        "Dataverse admin", 2, "Without an application user the integration cannot read Dataverse at all.",
        ("fixed", "about 1 h")),
    "identity.credential_expiry": (
        "Entra admin", 3, "When the app's credential expires every sync stops at once.", ("fixed", "about 1 h")),
    "change_tracking": (
        "Dataverse admin", 2, "Without change tracking every sync reloads the whole table: more load on the "
        "service, longer windows, more throttling.", ("fixed", "15 min per table")),
    "volumes.growth": (
        "integration developer", 1, "Large and fast-growing tables decide storage cost and how long a reload takes.",
        ("fixed", "1-2 days")),
    "volumes.full_sync_time": (
        "integration developer", 2, "The first load, and any rebuild, must fit a maintenance window under the "
        "service protection limits.", ("fixed", "1-2 days")),
    "quality.duplicate_accounts": (
        "data steward", 3, "Duplicates split contacts, opportunities and activities over two records: reports count "
        "twice and an integration updates one copy but not the other.", ("record", 10)),
    "quality.contacts_missing_email": (
        "data steward", 2, "A contact without an email cannot be matched with mailbox traffic, gets no mail from "
        "campaigns and is invisible to server-side synchronisation.", ("record", 5)),
    "quality.contacts_malformed_email": (
        "data steward", 2, "Mail to a malformed address bounces, and the contact cannot be matched with mail or "
        "meetings.", ("record", 3)),
    "quality.orphan_lookups": (
        "integration developer", 3, "A lookup to a record that no longer exists breaks roll-ups and reports, and "
        "the integration's joins drop these rows.", ("record", 5)),
    "quality.stale_open_opportunities": (
        "data steward", 2, "Deals past their close date inflate the pipeline and every forecast built on it.",
        ("record", 5)),
    "cross.disabled_users_owning_records": (
        "Dataverse admin", 3, "Nobody works the records of a person who has left: their accounts and opportunities "
        "go unattended.", ("record", 30)),
    "cross.disabled_users_active_in_crm": (
        "Dataverse admin", 3, "A person disabled in Entra ID but enabled in Dataverse keeps a licence and security "
        "roles that nobody should hold.", ("record", 15)),
    "cross.contacts_without_engagement": (
        "data steward", 1, "Contacts nobody writes to or meets are either out of date or covered by mailboxes the "
        "sync does not see.", ("record", 2)),
    "infrastructure": (
        "integration developer", 2, "The integration host, the network and the recovery design must carry the "
        "load and meet the service targets.", ("fixed", "1-3 days")),
}
_RATING = {"red": ("Not ready", "findings rated red must be resolved before go-live"),
           "amber": ("Ready with conditions", "no red findings; the amber ones need a plan"),
           "green": ("Ready", "every check passed")}
_AREA_ORDER = ("connectivity", "identity", "change_tracking", "volumes", "full_sync", "quality", "cross",
               "integration", "infrastructure")
EVIDENCE_XLSX = "evidence.xlsx"
EVIDENCE_CSV = "evidence.csv"


def guide(check_id: str) -> tuple[str, int, str, tuple[str, Any]]:
    """The owner role, impact, why-it-matters and effort of a check (longest matching id prefix)."""
    for prefix in sorted(GUIDE, key=len, reverse=True):
        if check_id == prefix or check_id.startswith(prefix + "."):
            return GUIDE[prefix]
    return ("integration developer", 1, "", ("fixed", "to be estimated"))


def effort(check: Check) -> str:
    """The effort to resolve a finding, in words (per-record work is summed; 8-hour days)."""
    kind, value = guide(check.id)[3]
    if kind != "record":
        return str(value)
    minutes = float(value) * max(check.count, 1)
    if minutes < 60:
        return f"about {minutes:.0f} min"
    if minutes < 8 * 60:
        return f"about {math.ceil(minutes / 60)} h"
    return f"about {math.ceil(minutes / 480)} days"


def load_previous(path: str | Any) -> dict[str, Any]:
    """The manifest of an earlier assessment run: its run directory or its ``manifest.json``.

    Raises:
        NotFoundError: neither is there.
    """
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise NotFoundError(f"no earlier assessment at {path}", hint="pass the earlier run's directory or its "
                            "manifest.json as compare_with")
    data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    return data


def compare(previous: Mapping[str, Any], checks: Sequence[Check]) -> list[dict[str, Any]]:
    """What changed since an earlier assessment (its manifest): one row per check that is or was not green.

    ``change`` is ``resolved`` (now green), ``new`` (was green or not checked), ``worse`` / ``better`` (the
    status, or else the number of affected records, moved) or ``unchanged``.
    """
    before = {str(c["name"]): str(c["status"]) for c in previous.get("checks", [])}
    results = previous.get("results", {})
    counts_before = results.get("check_counts") or results.get("findings") or {}
    rows = []
    now = {c.id: c for c in checks}
    for cid in list(dict.fromkeys([*before, *now])):
        was, c = before.get(cid), now.get(cid)
        is_ = c.status if c else None
        if (was in (None, "green")) and (is_ in (None, "green")):
            continue
        n_was, n_is = counts_before.get(cid), (c.count if c else None)
        if is_ in (None, "green"):
            change = "resolved"
        elif was in (None, "green"):
            change = "new"
        elif STATUS_ORDER[is_] != STATUS_ORDER[str(was)]:
            change = "worse" if STATUS_ORDER[is_] > STATUS_ORDER[str(was)] else "better"
        elif n_was is not None and n_is is not None and n_is != n_was:
            change = "worse" if n_is > n_was else "better"
        else:
            change = "unchanged"
        rows.append({"change": change, "check": cid, "title": c.title if c else cid, "before": was or "not checked",
                     "now": is_ or "not checked", "records_before": n_was, "records_now": n_is})
    order = {"resolved": 0, "better": 1, "new": 2, "worse": 3, "unchanged": 4}
    return sorted(rows, key=lambda r: (order[r["change"]], r["check"]))


class AssessmentReport:
    """The assessment as the document a consultant hands over: title block, executive summary, one section
    per area with its evidence, appendices; the affected records in Excel and CSV beside it.

    Args:
        assessment: An :class:`Assessment` whose areas have run.
        customer: The customer or tenant name for the title block.
        consultant: Who prepared the assessment.
        compare_with: An earlier assessment run (directory or manifest) for a "since the last assessment"
            section, or None.
        evidence_rows: How many affected records each finding lists in the report (all are in the workbook).

    Example:
        >>> doc = AssessmentReport(a, customer="Contoso", consultant="A. Consultant")  # doctest: +SKIP
        >>> doc.executive_summary()                                                     # doctest: +SKIP
    """

    def __init__(self, assessment: Assessment, *, customer: str = "", consultant: str = "",
                 compare_with: str | None = None, evidence_rows: int = 8) -> None:
        self.a = assessment
        self.customer = customer
        self.consultant = consultant
        self.evidence_rows = evidence_rows
        self.evidence = assessment.evidence()
        self.previous = load_previous(compare_with) if compare_with else None
        self.changes = compare(self.previous, assessment.checks) if self.previous is not None else None

    # -- pieces -------------------------------------------------------------------------------------

    def actions(self, top: int = 5) -> list[dict[str, Any]]:
        """The actions that matter most: every non-green finding, red first, then by impact and size."""
        todo = [c for c in self.a.checks if c.status != "green" and c.recommendation]
        todo.sort(key=lambda c: (-STATUS_ORDER[c.status], -guide(c.id)[1], -(c.rate or 0.0), -c.count))
        return [{"rank": i, "action": _sentence(c.recommendation.split("; ")[0]),
                 "finding": c.title, "status": c.status,
                 "records": len(self.evidence[c.id]) if c.id in self.evidence else None,
                 "owner": guide(c.id)[0], "effort": effort(c), "check": c.id} for i, c in enumerate(todo[:top], 1)]

    def _data_as_of(self) -> tuple[Any, list[str]]:
        marks = watermarks(self.a.wb.warehouse, [t for t in self.a.planned_tables() if t in self.a.warehouse_tables()])
        ended = [w["last_ended_at"] for w in marks if w.get("last_ended_at") is not None]
        runs = sorted({str(w["sync_run_id"]) for w in marks if w.get("sync_run_id")})
        return (max(ended) if ended else None), runs

    def title_block(self) -> report.Html:
        """Title, customer, consultant, date, scope, data as of the sync watermark, bridgekit version."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            bk = version("bridgekit")
        except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
            bk = "unknown"
        prof = self.a.wb.profile
        as_of, runs = self._data_as_of()
        areas = [self.a.sections[k].title for k in _AREA_ORDER if k in self.a.sections]
        scope = (f"{len(prof.sync.dataverse)} Dataverse tables and {len(prof.sync.graph)} Microsoft Graph resources"
                 + (f" ({', '.join(a[:1].lower() + a[1:] for a in areas)})" if areas else ""))
        rows = [("Customer", self.customer or f"tenant {prof.tenant_id}"),
                ("Prepared by", self.consultant or "-"),
                ("Date", self.a.now.date().isoformat()),
                ("Scope", scope),
                ("Data as of", f"{report.cell(as_of)} (sync run {', '.join(runs) or '-'})"),
                ("Tool", f"bridgekit {bk}, profile {prof.name}")]
        info = "".join(f'<dt style="font-weight:600;white-space:nowrap">{k}</dt><dd style="margin:0">'
                       f'{html.escape(str(v))}</dd>'
                       for k, v in rows)
        return report.Html(f'<header class="bk-title"><h1 style="margin-bottom:0.2em">Integration readiness '
                           f'assessment</h1><p style="font-size:1.25em;margin-top:0">'
                           f'{html.escape(self.customer or "tenant " + str(prof.tenant_id))}</p>'
                           f'<dl style="display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:0.95em">'
                           f"{info}</dl></header>")

    def executive_summary(self) -> report.Html:
        """The first screen: overall rating, counts by severity, the top actions with owner and effort."""
        checks = self.a.checks
        overall = worst(c.status for c in checks)
        label, why = _RATING[overall]
        counts = {s: sum(1 for c in checks if c.status == s) for s in ("red", "amber", "green")}
        tally = " ".join(f"{report.badge(s)}&nbsp;{n}" for s, n in counts.items())
        acts = self.actions()
        areas = [{"area": self.a.sections[k].title, "status": self.a.sections[k].status,
                  "checks": len(self.a.sections[k].checks),
                  "red": sum(1 for c in self.a.sections[k].checks if c.status == "red"),
                  "amber": sum(1 for c in self.a.sections[k].checks if c.status == "amber")}
                 for k in _AREA_ORDER if k in self.a.sections]
        body = report.join(
            f'<p style="font-size:1.2em"><b>Overall readiness:</b> {report.badge(overall)} '
            f"<b>{html.escape(label)}</b>: {html.escape(why)}.</p>",
            f"<p><b>Checks by severity:</b> {tally}</p>",
            report.heading("Top actions", 3),
            report.table(acts, ["rank", "action", "finding", "status", "records", "owner", "effort"],
                         labels={"status": "severity", "records": "records affected"})
            if acts else report.paragraph("Nothing to do: every check passed."),
            report.heading("Areas at a glance", 3),
            report.table(areas),
        )
        changes = self.changes
        if changes is not None:
            n = {k: sum(1 for r in changes if r["change"] == k) for k in ("resolved", "better", "new", "worse")}
            body = report.join(body, report.paragraph(
                f"{n['resolved']} resolved, {n['better']} better, {n['new']} new, {n['worse']} worse "
                "(see \"Since the last assessment\").", label="Since the last assessment:"))
        return report.section("Executive summary", body, page_break=False, anchor="summary")

    def progress(self) -> report.Html:
        """"Since the last assessment": findings resolved, better, new and worse, with record counts."""
        if self.changes is None or self.previous is None:
            return report.Html("")
        n = {k: sum(1 for r in self.changes if r["change"] == k)
             for k in ("resolved", "better", "new", "worse", "unchanged")}
        record.result("since_last_assessment", {k: v for k, v in n.items()})
        when = str(self.previous.get("started_at") or "")[:10]
        shown = [r for r in self.changes if r["change"] != "unchanged"]
        return report.section(
            "Since the last assessment",
            report.paragraph(f"Compared with the assessment of {when or 'an earlier date'}: "
                             + ", ".join(f"{v} {k}" for k, v in n.items()) + "."),
            report.table(shown, ["change", "title", "before", "now", "records_before", "records_now"],
                         formats={"before": "status", "now": "status"},
                         labels={"title": "finding", "records_before": "records before", "records_now": "records now"})
            if shown else report.paragraph("No finding changed."), anchor="since")

    def _evidence_block(self, c: Check) -> str:
        rows = self.evidence.get(c.id)
        if not rows:
            return ""
        cols = [k for k in ("record", "id", "owner", "detail", "link", "entra_link") if any(r.get(k) for r in rows)]
        return report.join(
            f"<p><b>Affected records:</b> {len(rows):,} (all in {EVIDENCE_XLSX}, sheet "
            f"\"{_sheet(c.id)}\", and {EVIDENCE_CSV})</p>",
            report.table(rows, cols, formats={"link": "link", "entra_link": "link", "id": "text"},
                         labels={"link": "Dynamics 365", "entra_link": "Entra admin centre"},
                         max_rows=self.evidence_rows, more=f"in {EVIDENCE_XLSX}"))

    def area(self, key: str) -> list[Any]:
        """One area's section (then its chart, when it has one), for ``display(*doc.area("quality"))``."""
        sec = self.a.sections.get(key)
        if sec is None:
            return []
        parts: list[str] = [f"<p><b>Area rating:</b> {report.badge(sec.status)}</p>"]
        for c in sec.checks:
            if c.status == "green":
                continue
            owner, _impact, why, _effort = guide(c.id)
            parts.append(report.join(
                f'<h3>{report.badge(c.status)} {html.escape(c.title)}</h3>',
                report.paragraph(c.finding, label="Finding:"),
                report.paragraph(why, label="Why it matters:") if why else "",
                report.paragraph(c.recommendation, label="Recommendation:") if c.recommendation else "",
                report.paragraph(f"{owner}; effort {effort(c)}.", label="Owner:"),
                self._evidence_block(c)))
        passed = [{"check": c.title, "finding": c.finding} for c in sec.checks if c.status == "green"]
        if passed:
            parts.append(report.join(report.heading(f"Passed ({len(passed)})", 3), report.table(passed)))
        if key == "volumes" and sec.data is not None and len(sec.data):
            parts.append(report.table(sec.data, formats={"growth_per_month": "pct"}))
        if key == "full_sync" and sec.data is not None and len(sec.data):
            data = [{"table": r["table"], "rows": r["rows"], "requests": r["requests"],
                     "estimated_time": report.duration(float(r["minutes"]) * 60)} for r in sec.data.to_dict("records")]
            parts.append(report.table(data))
        out: list[Any] = [report.section(sec.title, *parts, anchor=key)]
        if sec.figure is not None:
            out.append(sec.figure)
        return out

    def areas(self) -> list[Any]:
        """Every area's section and chart, in report order."""
        return [part for key in _AREA_ORDER for part in self.area(key)]

    def appendix(self) -> report.Html:
        """Method and yardsticks, and where the evidence files are."""
        s = self.a.settings
        con, qual = s.get("connectivity", {}), s.get("quality", {})
        rows = [
            {"area": "Connectivity and TLS", "yardstick": f"p50 and p95 latency over {con.get('calls', '-')} calls "
             f"per endpoint against {report.num(con.get('threshold_ms'))} ms (Microsoft's network guidance for "
             "model-driven apps); TLS 1.2 minimum, 1.3 recommended"},
            {"area": "Identity and permissions", "yardstick": "the application permissions in the app's tokens "
             "against what the sync plan reads (least privilege); credential expiry amber within "
             f"{s.get('identity', {}).get('expiry_warn_days', '-')} days"},
            {"area": "Change tracking", "yardstick": "enabled on every planned Dataverse table; Graph delta queries"},
            {"area": "Volumes and full sync", "yardstick": "rows and monthly growth from creation dates; a full sync "
             "under Dataverse service protection (6,000 requests and 1,200 s of execution per 300 s) within "
             f"{report.num(s.get('full_sync', {}).get('window_hours'))} h"},
            {"area": "Data quality", "yardstick": f"red when {report.pct(qual.get('red_rate'))} or more of a table is "
             f"affected; an open opportunity is stale {qual.get('stale_days', '-')} days after its close date"},
            {"area": "Cross-system consistency", "yardstick": "Entra ID account state against Dataverse users and "
             "record ownership; contacts against mail and meetings in the last "
             f"{s.get('cross', {}).get('inactive_days', '-')} days"},
            {"area": "Integration surface", "yardstick": "each check's yardstick and its Microsoft source are in its "
             "finding: synchronous steps and unfiltered triggers on high-volume tables, endpoints over http or "
             "with keys in URLs, failing or piling-up system jobs, flows owned by disabled users, least privilege, "
             "auditing and change-tracking retention"},
            {"area": "Infrastructure", "yardstick": "50 KB/s per user; 2 vCores / 8 GB minimum and 4 / 16 "
             "recommended per environment; RPO at most 15 minutes, RTO at most 4 hours"},
        ]
        return report.section(
            "Appendix A: method and yardsticks",
            report.paragraph("Each check is rated green (meets the yardstick), amber (needs a plan) or red (must be "
                             "resolved before go-live). Findings that name records are exact: every affected record "
                             f"is listed in {EVIDENCE_XLSX} (a summary sheet and one sheet per finding) and "
                             f"{EVIDENCE_CSV}, with a link that opens it in Dynamics 365 or the Entra admin centre."),
            report.table(rows), anchor="method")

    # -- files ----------------------------------------------------------------------------------------

    def write_evidence(self, directory: Any = None) -> dict[str, Any]:
        """Write ``evidence.xlsx`` (summary sheet, one sheet per finding) and ``evidence.csv`` into ``directory``
        (default: the run's directory under the runner, else the current one). Returns the paths."""
        from pathlib import Path

        where = Path(directory) if directory is not None else report.output_dir()
        by_id = {c.id: c for c in self.a.checks}
        summary = [{"finding": cid, "title": by_id[cid].title, "status": by_id[cid].status,
                    "records": len(rows), "owner_role": guide(cid)[0], "effort": effort(by_id[cid]),
                    "sheet": _sheet(cid), "what_was_found": by_id[cid].finding,
                    "recommendation": by_id[cid].recommendation} for cid, rows in self.evidence.items()]
        xlsx = report.write_workbook(where / EVIDENCE_XLSX, summary,
                                     {_sheet(cid): rows for cid, rows in self.evidence.items()},
                                     link_columns=("link", "entra_link"))
        csv = report.write_csv(where / EVIDENCE_CSV, [{"finding": cid, **r} for cid, rows in self.evidence.items()
                                                      for r in rows])
        return {"xlsx": xlsx, "csv": csv}


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:]


def _sheet(check_id: str) -> str:
    return check_id.split(".", 1)[-1][:31]
