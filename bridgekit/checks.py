"""What assess and monitor share: the scored :class:`Check`, a :class:`Section` of checks, and the measures
behind them (endpoint latency, TLS, the data watermark of each mirrored table).

A new check is a method of :class:`bridgekit.assess.Assessment` or :class:`bridgekit.monitor.Monitor` that
returns a :class:`Section`; a measure both need lives here.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bridgekit import record, report
from bridgekit.errors import ApiError, AuthError, ConfigError, TransientError

__all__ = [
    "STATUS_COLOUR",
    "STATUS_ORDER",
    "Check",
    "Endpoint",
    "Latency",
    "Section",
    "delta_position",
    "endpoints",
    "frame",
    "measure",
    "percentile",
    "record_watermarks",
    "tls_probe",
    "watermarks",
    "worst",
]

STATUS_ORDER = {"green": 0, "amber": 1, "red": 2}
STATUS_COLOUR = {"green": "#2ca02c", "amber": "#ff9f1c", "red": "#d62728"}

#: Dataverse service protection per user and web server (api-limits.md, protocols.md §1.12).
_DV_TOKEN = re.compile(r"^(\d+)")


# --------------------------------------------------------------------------------------------------
# Checks and sections
# --------------------------------------------------------------------------------------------------

@dataclass
class Check:
    """One scored check.

    Attributes:
        id: Stable name, ``area.topic`` (``quality.contacts_missing_email``); the manifest's check name.
        area: The area heading (connectivity, identity, change tracking, ...).
        title: What was checked, for people.
        status: ``green``, ``amber`` or ``red``.
        finding: What was found, one sentence with the numbers.
        recommendation: What to do about it (empty when green and nothing to do).
        count: How many records or items the finding concerns (0 when not countable).
        rate: ``count`` as a share of the population checked, when there is one.
        ids: The affected record ids, when the finding is exact.
        measures: The numbers behind the status.
    """

    id: str
    area: str
    title: str
    status: str
    finding: str
    recommendation: str = ""
    count: int = 0
    rate: float | None = None
    ids: list[str] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, with_ids: bool = False) -> dict[str, Any]:
        """JSON form (ids only when asked: they can be many)."""
        out = {"id": self.id, "area": self.area, "title": self.title, "status": self.status,
               "finding": self.finding, "recommendation": self.recommendation, "count": self.count,
               "rate": self.rate, "measures": self.measures}
        if with_ids:
            out["ids"] = list(self.ids)
        return out


def worst(statuses: Iterable[str]) -> str:
    """The worst of some statuses (green when there are none)."""
    return max(statuses, key=lambda s: STATUS_ORDER[s], default="green")


def frame(checks: Sequence[Check]) -> Any:
    """The checks as a pandas DataFrame (one row per check)."""
    import pandas as pd

    return pd.DataFrame([{"check": c.id, "status": c.status, "finding": c.finding,
                          "recommendation": c.recommendation, "count": c.count,
                          "rate": None if c.rate is None else round(c.rate, 4)} for c in checks])


def _checks_html(checks: Sequence[Check]) -> str:
    rows = [{"status": c.status, "check": f"<b>{html.escape(c.title)}</b>", "finding": html.escape(c.finding),
             "recommendation": html.escape(c.recommendation) if c.status != "green" else ""} for c in checks]
    return report.table(rows, formats={"check": "html", "finding": "html", "recommendation": "html"})


@dataclass
class Section:
    """One area of the assessment: its checks, the measures behind them, and a chart (or None)."""

    title: str
    checks: list[Check]
    data: Any = None
    figure: Any = None

    @property
    def status(self) -> str:
        """The worst status of the section's checks."""
        return worst(c.status for c in self.checks)

    def frame(self) -> Any:
        """The checks as a DataFrame."""
        return frame(self.checks)

    def parts(self) -> list[Any]:
        """The section for a report (its heading, rating and checks), then its chart when it has one."""
        block = report.section(self.title, f"<p><b>Rating:</b> {report.badge(self.status)}</p>",
                               _checks_html(self.checks))
        return [block] + ([self.figure] if self.figure is not None else [])

    def _repr_html_(self) -> str:
        return (f"<p><b>{html.escape(self.title)}:</b> {report.badge(self.status)}</p>"
                f"{_checks_html(self.checks)}")

    def __repr__(self) -> str:
        lines = [f"{self.title}: {self.status}"]
        lines += [f"  {c.status:<5} {c.id}: {c.finding}" for c in self.checks]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Measurements shared with bridgekit.monitor
# --------------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass
class Endpoint:
    """A service endpoint bridgekit calls, and how to call it cheaply.

    ``call`` sends one small request and returns the response headers (for the rate-limit headers).
    """

    name: str
    url: str
    call: Callable[[], Mapping[str, str]]


@dataclass
class Latency:
    """Latency samples of one endpoint (milliseconds) and what went wrong, if anything."""

    endpoint: str
    url: str
    samples_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def p(self, q: float) -> float | None:
        """The ``q``-th percentile in ms."""
        return percentile(self.samples_ms, q)


def endpoints(wb: Any) -> list[Endpoint]:
    """The three endpoints of a profile: Entra ID (token endpoint host), Dataverse and Graph.

    Entra is measured with OIDC discovery on the authority (same host and front door as the token
    endpoint): asking for tokens N times would log N sign-ins, and a credential-less POST would log failures.
    """
    from bridgekit.http import tls_session

    prof = wb.profile
    authority = f"{prof.authority_host.rstrip('/')}/{prof.tenant_id}"
    discovery = f"{authority}/v2.0/.well-known/openid-configuration"
    plain = tls_session(prof.ca_bundle, timeout=(10.0, 30.0))

    def identity() -> Mapping[str, str]:
        try:
            resp = plain.get(discovery)
        except Exception as exc:  # the seam: requests' errors become bridgekit's
            raise TransientError(f"identity: cannot reach {urlsplit(discovery).netloc} ({type(exc).__name__})",
                                 service="identity") from exc
        if resp.status_code >= 400:
            raise TransientError(f"identity: OIDC discovery answered HTTP {resp.status_code}", service="identity",
                                 status=resp.status_code)
        return dict(resp.headers)

    def dataverse() -> Mapping[str, str]:
        return dict(wb.dataverse.session.request("GET", "WhoAmI").headers)

    def graph() -> Mapping[str, str]:
        return dict(wb.graph.session.request("GET", "users?$top=1&$select=id").headers)

    out = [Endpoint("identity", f"{authority}/oauth2/v2.0/token", identity)]
    if prof.dataverse_url:
        out.append(Endpoint("dataverse", prof.dataverse_url, dataverse))
    out.append(Endpoint("graph", prof.graph_url, graph))
    return out


def measure(targets: Sequence[Endpoint], calls: int = 20) -> list[Latency]:
    """Call each endpoint ``calls`` times (after one warm-up call that pays for TLS and the token).

    Transport failures are counted as errors; an authentication failure propagates (nothing can be
    assessed without a token, and the runner reports it with its own exit code).
    """
    out: list[Latency] = []
    for ep in targets:
        lat = Latency(ep.name, ep.url)
        for i in range(calls + 1):
            started = time.perf_counter()
            try:
                headers = ep.call()
            except AuthError:
                raise
            except (ApiError, ConfigError) as exc:
                lat.errors.append(f"{type(exc).__name__}: {exc.message}")
                if i == 0:
                    break  # unreachable: no point timing N more failures
                continue
            elapsed = (time.perf_counter() - started) * 1000.0
            if i > 0:
                lat.samples_ms.append(elapsed)
                lat.headers.append({k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ms-")})
        out.append(lat)
    return out


def tls_probe(url: str, ca_bundle: str | None, *, timeout: float = 10.0) -> dict[str, Any]:
    """Connect to ``url``'s host with TLS (verifying against ``ca_bundle``) and report what was negotiated.

    Returns:
        ``host``, ``port``, ``version`` (``TLSv1.3``), ``cipher``, ``bits``, ``forward_secrecy`` and
        ``error`` (None when the handshake succeeded).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    info: dict[str, Any] = {"host": host, "port": port, "version": None, "cipher": None, "bits": None,
                            "forward_secrecy": None, "error": None}
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            version = tls.version()
            cipher = tls.cipher()
    except (OSError, ssl.SSLError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info
    info["version"] = version
    if cipher:
        info["cipher"], _proto, info["bits"] = cipher
    # TLS 1.3 key exchange is always ephemeral (RFC 8446); in 1.2 only (EC)DHE suites give forward secrecy.
    name = str(info["cipher"] or "")
    info["forward_secrecy"] = version == "TLSv1.3" or name.startswith(("ECDHE", "DHE"))
    return info


# --------------------------------------------------------------------------------------------------
# Data watermarks
# --------------------------------------------------------------------------------------------------

def delta_position(link: str | None) -> str | int | None:
    """A printable position for a stored delta link, never the link or token itself.

    Dataverse delta tokens start with the row version reached (``919042!08/22/2017 ...``, protocols.md
    §1.11): that number is the position. Graph delta tokens are opaque, and per-mailbox resources keep one
    link per scope, so their position is a short fingerprint (``sha256:<12 hex>``) that changes when they do.
    """
    if not link:
        return None
    if link.lstrip().startswith("{"):
        try:
            links = json.loads(link)
        except ValueError:
            links = None
        if isinstance(links, dict):
            text = json.dumps(links, sort_keys=True)
            return f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    query = parse_qs(urlsplit(link).query)
    token = (query.get("$deltatoken") or query.get("deltatoken") or [""])[0]
    if "/api/data/" in link and token:
        m = _DV_TOKEN.match(token)
        if m:
            return int(m.group(1))
    return f"sha256:{hashlib.sha256(link.encode()).hexdigest()[:12]}"


def watermarks(warehouse: Any, tables: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per mirrored table: the sync run that last wrote it, the delta position reached and the row count.

    Args:
        warehouse: A :class:`~bridgekit.warehouse.Warehouse`.
        tables: ``schema.table`` names to report (default: every table in ``bridgekit.sync_state``).
    """
    state = warehouse.state()
    out = []
    for table in tables if tables is not None else sorted(state):
        st = state.get(table)
        if st is None:
            continue
        out.append({"table": table, "sync_run_id": st.get("last_run_id"),
                    "position": delta_position(st.get("delta_link")),
                    "rows": None if st.get("row_count") is None else int(st["row_count"]),
                    "last_status": st.get("last_status"), "last_ended_at": st.get("last_ended_at")})
    return out


def record_watermarks(wb: Any, tables: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """:func:`watermarks` of ``wb``'s warehouse, each recorded with :func:`bridgekit.record.watermark`."""
    marks = watermarks(wb.warehouse, tables)
    for w in marks:
        record.watermark(w["table"], sync_run_id=w["sync_run_id"], position=w["position"], rows=w["rows"])
    return marks
