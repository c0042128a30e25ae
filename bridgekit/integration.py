"""The assessment's integration area: the integration layer of a Dataverse environment (plug-in steps, service
endpoints, flows, system jobs, trace logs, connection references, environment variables, roles, organization
settings), scored red/amber/green, and a map of it.

:class:`bridgekit.assess.Assessment` calls :func:`assess_integration` (``Assessment.integration()``). The area reads
the platform tables (:data:`bridgekit.catalog.PLATFORM_TABLES`) from the warehouse when a sync plan with the
``platform`` group (off by default) keeps them there and they are fresh; otherwise it reads from Dataverse only what
the checks use (their columns, the window's system jobs and trace logs), all tables at once, and queries those rows
next to the warehouse's tables without writing them to it. Every check names its yardstick and its source;
docs/integration-surface.md lists them with the
documented columns and option values the checks rely on.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bridgekit.catalog import PLATFORM_TABLES
from bridgekit.checks import STATUS_COLOUR, Check, Section, percentile, worst

__all__ = [
    "PLANTED_CHECKS",
    "assess_integration",
    "integration_map",
]

AREA = "integration"

#: Planted integration defect (emulator store meta ``planted_defects``) -> the check that must find it.
PLANTED_CHECKS = {
    "sync_steps_on_hot_paths": "integration.sync_steps_on_hot_paths",
    "update_steps_without_filtering": "integration.update_steps_without_filtering",
    "endpoints_plain_http": "integration.endpoints_plain_http",
    "endpoints_key_in_url": "integration.endpoints_key_in_url",
    "endpoints_shared_key": "integration.endpoints_shared_key",
    "endpoints_failing_jobs": "integration.endpoint_job_failures",
    "failed_system_jobs": "integration.system_job_failures",
    "system_job_backlog": "integration.system_job_backlog",
    "succeeded_jobs_retained": "integration.succeeded_jobs_retained",
    "flows_owned_by_disabled_users": "integration.flows_owned_by_disabled_users",
    "flows_off_or_suspended": "integration.flows_off_or_suspended",
    "flows_unfiltered_triggers": "integration.flows_unfiltered_triggers",
    "flows_insecure_http": "integration.flows_insecure_http",
    "connection_references_unbound": "integration.connection_references_unbound",
    "environment_variables_without_value": "integration.environment_variables_without_value",
    "unmanaged_customisations": "integration.unmanaged_customisations",
    "app_user_system_administrator": "integration.app_user_system_administrator",
    "auditing_off": "integration.auditing",
    "change_tracking_retention_short": "integration.change_tracking_retention",
}

_DOCS = "https://learn.microsoft.com/power-apps/developer/data-platform"
# Yardsticks and where they come from (docs/integration-surface.md has the longer list).
_SRC_PLUGIN_PRACTICE = f"{_DOCS}/best-practices/business-logic/"
_SRC_FILTERING = f"{_DOCS}/best-practices/business-logic/include-filtering-attributes-plugin-registration"
_SRC_RETRIEVE = f"{_DOCS}/best-practices/business-logic/limit-registration-plugins-retrieve-retrievemultiple"
_SRC_WEBHOOK = f"{_DOCS}/register-web-hook"
_SRC_SERVICE_BUS = f"{_DOCS}/azure-integration"
_SRC_ASYNC = f"{_DOCS}/asynchronous-service"
_SRC_FLOW_TRIGGER = "https://learn.microsoft.com/power-automate/dataverse/create-update-delete-trigger"
_SRC_LOGIC_SAS = "https://learn.microsoft.com/azure/logic-apps/logic-apps-securing-a-logic-app"
_SRC_CONNREF = "https://learn.microsoft.com/power-apps/maker/data-platform/create-connection-reference"
_SRC_ENVVAR = "https://learn.microsoft.com/power-apps/maker/data-platform/environmentvariables"
_SRC_ALM = "https://learn.microsoft.com/power-platform/alm/solution-concepts-alm"
_SRC_APP_USER = "https://learn.microsoft.com/power-platform/admin/manage-application-users"
_SRC_AUDIT = f"{_DOCS}/auditing/configure"
_SRC_CHANGE_TRACKING = f"{_DOCS}/use-change-tracking-synchronize-data-external-systems"

_SYSTEM_ADMINISTRATOR_TEMPLATE = "627090ff-40a3-4053-8790-584edc5be201"
#: Service endpoint contracts (serviceendpoint.contract) and what the map calls them.
_CONTRACT = {1: "Service Bus relay", 2: "Service Bus queue", 3: "Service Bus relay", 4: "Service Bus relay",
             5: "Service Bus topic", 6: "Service Bus queue", 7: "Event Hub", 8: "Webhook", 9: "Event Grid",
             10: "Data Lake", 11: "Storage"}
_KEY_IN_URL_AUTH = {4: "Webhook Key", 6: "Http Query String"}
_SHARED_KEY_AUTH = {2: "SAS Key", 7: "Connection String", 8: "Access Key"}
_SECRET_PARAMS = ("code", "sig", "key", "apikey", "api-key", "api_key", "token", "secret", "password")
_FAILED, _SUCCEEDED, _WAITING = 31, 30, (0, 10)
_DATAVERSE_TRIGGER = "SubscribeWebhookTrigger"


# --------------------------------------------------------------------------------------------------
# Reading the platform tables
# --------------------------------------------------------------------------------------------------

#: What the area reads of each platform table (and of systemuser, when the warehouse lacks it): the warehouse's
#: column names and DuckDB types. A lookup ``x`` is the Web API's ``_x_value``, ``x_entitytype`` its
#: lookuplogicalname annotation and ``x_label`` the FormattedValue of ``x`` (the sync's shaping of the same columns).
_U, _V, _I, _B, _T = "UUID", "VARCHAR", "INTEGER", "BOOLEAN", "TIMESTAMPTZ"
_READ: dict[str, dict[str, str]] = {
    "sdkmessageprocessingstep": {"sdkmessageprocessingstepid": _U, "name": _V, "mode": _I, "stage": _I, "rank": _I,
                                 "filteringattributes": _V, "statecode": _I, "ismanaged": _B, "eventhandler": _U,
                                 "eventhandler_entitytype": _V, "sdkmessageid": _U, "sdkmessagefilterid": _U},
    "sdkmessage": {"sdkmessageid": _U, "name": _V},
    "sdkmessagefilter": {"sdkmessagefilterid": _U, "primaryobjecttypecode": _V},
    "plugintype": {"plugintypeid": _U, "name": _V, "friendlyname": _V},
    "pluginassembly": {"pluginassemblyid": _U, "name": _V, "ismanaged": _B},
    "serviceendpoint": {"serviceendpointid": _U, "name": _V, "contract": _I, "authtype": _I, "url": _V,
                        "namespaceaddress": _V, "path": _V, "ismanaged": _B},
    "asyncoperation": {"asyncoperationid": _U, "name": _V, "operationtype": _I, "operationtype_label": _V,
                       "statecode": _I, "statuscode": _I, "message": _V, "owningextensionid": _U,
                       "workflowactivationid": _U, "createdon": _T},
    "plugintracelog": {"pluginstepid": _U, "performanceexecutionduration": _I, "exceptiondetails": _V,
                       "createdon": _T},
    "workflow": {"workflowid": _U, "name": _V, "type": _I, "category": _I, "statecode": _I, "statuscode": _I,
                 "primaryentity": _V, "clientdata": _V, "ismanaged": _B, "ownerid": _U},
    "connectionreference": {"connectionreferenceid": _U, "connectionreferencedisplayname": _V, "connectorid": _V,
                            "connectionid": _V, "statecode": _I},
    "environmentvariabledefinition": {"environmentvariabledefinitionid": _U, "schemaname": _V, "type": _I,
                                      "type_label": _V, "defaultvalue": _V, "statecode": _I},
    "environmentvariablevalue": {"environmentvariablevalueid": _U, "environmentvariabledefinitionid": _U,
                                 "value": _V},
    "role": {"roleid": _U, "name": _V, "roletemplateid": _U},
    "systemuserroles": {"systemuserroleid": _U, "systemuserid": _U, "roleid": _U},
    "organization": {"organizationid": _U, "name": _V, "isauditenabled": _B, "expirechangetrackingindays": _I},
}
_SYSTEMUSER = {"systemuserid": _U, "fullname": _V, "applicationid": _U, "isdisabled": _B,
               "azureactivedirectoryobjectid": _U}
#: Lookup columns among them (read as ``_x_value``).
_LOOKUPS = {"eventhandler", "sdkmessageid", "sdkmessagefilterid", "owningextensionid", "workflowactivationid",
            "ownerid", "environmentvariabledefinitionid"}
_LOOKUP_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
_FORMATTED = "OData.Community.Display.V1.FormattedValue"


def _property(table: str, column: str) -> str:
    """The Web API property (or annotation) a warehouse column of ``table`` is read from."""
    if column.endswith("_entitytype"):
        return f"_{column.removesuffix('_entitytype')}_value@{_LOOKUP_NAME}"
    if column.endswith("_label"):
        return f"{column.removesuffix('_label')}@{_FORMATTED}"
    if column in _LOOKUPS and column != f"{table}id":
        return f"_{column}_value"
    return column


def _job_filter(since: _dt.datetime, old: _dt.datetime) -> list[str]:
    """The system jobs the checks read, as two disjoint Web API ``$filter``s: the window's jobs and the waiting ones
    (any age: the backlog), and the succeeded jobs of a step older than the retention (those kept forever)."""
    s, o = since.strftime("%Y-%m-%dT%H:%M:%SZ"), old.strftime("%Y-%m-%dT%H:%M:%SZ")
    return [f"createdon ge {s} or statuscode eq 0 or statuscode eq 10",
            f"createdon lt {s} and statuscode eq {_SUCCEEDED} and _owningextensionid_value ne null and "
            f"createdon lt {o}"]


def _read_live(wb: Any, tables: Mapping[str, Mapping[str, str]], filters: Mapping[str, Sequence[str]]
               ) -> dict[str, list[dict[str, Any]]]:
    """Read the columns the checks use of each table from Dataverse, each with its server-side ``$filter``s (one
    read per filter, their rows together), all reads concurrently (at most the profile's ``max_concurrency``
    requests in flight); rows keyed by the warehouse's column names.

    Choice labels (``x_label``) come from the table's option-set metadata, one read per table, not from a
    FormattedValue annotation on every row: the annotations would multiply the size of a system-job page.
    """
    from concurrent.futures import ThreadPoolExecutor

    dv = wb.dataverse

    def read(task: tuple[str, str | None]) -> list[dict[str, Any]]:
        table, flt = task
        props = {c: _property(table, c) for c in tables[table] if not c.endswith("_label")}
        select = sorted({p.split("@", 1)[0] for p in props.values()})
        notes = sorted({p.split("@", 1)[1] for p in props.values() if "@" in p})
        return [{c: row.get(p) for c, p in props.items()}
                for page in dv.pages(table, select=select, filter=flt, annotations=notes or None, page_size=5000)
                for row in page.value]

    def labels(table: str) -> dict[str, dict[int, str]]:
        return dv.option_sets(table) if any(c.endswith("_label") for c in tables[table]) else {}

    tasks: list[tuple[str, str | None]] = [(t, f) for t in tables for f in filters.get(t, ())]
    tasks += [(t, None) for t in tables if not filters.get(t)]
    workers = max(1, min(int(wb.profile.max_concurrency), len(tasks)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bk-platform") as pool:
        option_sets = pool.map(labels, tables)
        rows = list(pool.map(read, tasks))
        out: dict[str, list[dict[str, Any]]] = {t: [] for t in tables}
        for (table, _), got in zip(tasks, rows, strict=True):
            out[table].extend(got)
        for table, options in zip(tables, option_sets, strict=True):
            for col in (c for c in tables[table] if c.endswith("_label")):
                names = options.get(col.removesuffix("_label"), {})
                for r in out[table]:
                    v = r.get(col.removesuffix("_label"))
                    r[col] = None if v is None else names.get(int(v), str(v))
    return out


def _mirrored(a: Any, max_age_hours: float) -> bool:
    """True when the warehouse holds every platform table the checks read, each synced within ``max_age_hours``
    of the assessment's reference time (a sync plan with ``platform = true`` keeps them so)."""
    have = set(a.warehouse_tables())
    if not all(f"dataverse.{t}" in have for t in _READ):
        return False
    state = a.wb.warehouse.state()
    fresh = a.now - _dt.timedelta(hours=max_age_hours)
    for t in _READ:
        entry = state.get(f"dataverse.{t}") or {}
        ended = _utc(entry.get("last_ended_at"))
        if ended is None or ended < fresh or entry.get("last_status") not in (None, "ok"):
            return False
    return True


def _host(url: str | None) -> str:
    return (urlsplit(url).hostname or "") if url else ""


def _secret_in_url(url: str | None) -> list[str]:
    if not url:
        return []
    query = parse_qs(urlsplit(url).query)
    return sorted(k for k in query if k.lower() in _SECRET_PARAMS)


def _utc(value: Any) -> _dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
    if hasattr(value, "to_pydatetime"):
        return _utc(value.to_pydatetime())
    return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _flow(clientdata: str | None) -> dict[str, Any]:
    """Trigger and actions of a cloud flow's ``clientdata`` (the Logic Apps workflow definition)."""
    out: dict[str, Any] = {"table": None, "message": None, "filteringattributes": None, "filterexpression": None,
                           "recurrence": False, "http": [], "connectors": []}
    try:
        definition = json.loads(clientdata or "{}").get("properties", {}).get("definition", {})
    except ValueError:
        return out
    for trig in (definition.get("triggers") or {}).values():
        inputs = trig.get("inputs") or {}
        if trig.get("type") == "Recurrence":
            out["recurrence"] = True
        elif (inputs.get("host") or {}).get("operationId") == _DATAVERSE_TRIGGER:
            p = inputs.get("parameters") or {}
            out["table"] = p.get("subscriptionRequest/entityname")
            out["message"] = p.get("subscriptionRequest/message")
            out["filteringattributes"] = p.get("subscriptionRequest/filteringattributes")
            out["filterexpression"] = p.get("subscriptionRequest/filterexpression")

    def walk(actions: Mapping[str, Any]) -> None:
        for act in actions.values():
            inputs = act.get("inputs") or {}
            if act.get("type") == "Http":
                out["http"].append(str(inputs.get("uri") or ""))
            elif act.get("type") in ("OpenApiConnection", "ApiConnection"):
                api = str((inputs.get("host") or {}).get("apiId") or "").rsplit("/", 1)[-1]
                if api:
                    out["connectors"].append(api)
            for nested in ("actions", "else"):
                child = act.get(nested)
                if isinstance(child, Mapping):
                    walk(child.get("actions", child) if nested == "else" else child)

    walk(definition.get("actions") or {})
    return out


class _Layer:
    """The platform tables of one warehouse, joined the way the checks read them."""

    def __init__(self, a: Any, q: Any, *, window_days: int, retention_days: int) -> None:
        self.q = q
        self.now: _dt.datetime = a.now
        self.since = self.now - _dt.timedelta(days=window_days)
        self.old = self.now - _dt.timedelta(days=retention_days)
        since = self.since.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.steps = q("""
            SELECT s.sdkmessageprocessingstepid::VARCHAR AS id, s.name, s.mode, s.stage, s.rank,
                   s.filteringattributes, s.statecode, s.ismanaged, s.eventhandler::VARCHAR AS handler,
                   s.eventhandler_entitytype AS handler_type, m.name AS message, f.primaryobjecttypecode AS tbl
            FROM dataverse.sdkmessageprocessingstep s
            LEFT JOIN dataverse.sdkmessage m ON m.sdkmessageid = s.sdkmessageid
            LEFT JOIN dataverse.sdkmessagefilter f ON f.sdkmessagefilterid = s.sdkmessagefilterid
            ORDER BY s.name""")
        self.types = {r["id"]: r for r in q("SELECT plugintypeid::VARCHAR AS id, name, friendlyname "
                                                       "FROM dataverse.plugintype")}
        self.endpoints = {r["id"]: r for r in q("""
            SELECT serviceendpointid::VARCHAR AS id, name, contract, authtype, url, namespaceaddress, path,
                   ismanaged FROM dataverse.serviceendpoint ORDER BY name""")}
        self.jobs: list[dict[str, Any]] = q("""
            SELECT asyncoperationid::VARCHAR AS id, name, operationtype, operationtype_label, statecode, statuscode,
                   message, owningextensionid::VARCHAR AS step, workflowactivationid::VARCHAR AS workflow,
                   createdon FROM dataverse.asyncoperation WHERE createdon >= TIMESTAMPTZ '""" + since + """'
            ORDER BY createdon, id""")
        self.traces = q("""
            SELECT pluginstepid::VARCHAR AS step, performanceexecutionduration AS ms,
                   exceptiondetails IS NOT NULL AS failed FROM dataverse.plugintracelog
            WHERE createdon >= TIMESTAMPTZ '""" + since + "'")
        self.workflows = q("""
            SELECT w.workflowid::VARCHAR AS id, w.name, w.category, w.statecode, w.statuscode, w.primaryentity,
                   w.clientdata, w.ismanaged, w.ownerid::VARCHAR AS owner FROM dataverse.workflow w
            WHERE w.type = 1 ORDER BY w.name""")
        for w in self.workflows:
            w["flow"] = _flow(w["clientdata"]) if w["category"] == 5 else None

    def handler_name(self, step: Mapping[str, Any]) -> str:
        h = step["handler"]
        if step["handler_type"] == "serviceendpoint" and h in self.endpoints:
            return str(self.endpoints[h]["name"])
        if h in self.types:
            return str(self.types[h]["friendlyname"] or self.types[h]["name"])
        return str(step["name"])

    def step_endpoint(self) -> dict[str, str]:
        return {s["id"]: s["handler"] for s in self.steps if s["handler_type"] == "serviceendpoint"}

    def window_jobs(self) -> list[dict[str, Any]]:
        return self.jobs

    def durations(self) -> dict[str, dict[str, Any]]:
        per: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        for t in self.traces:
            if t["step"] and t["ms"] is not None:
                per.setdefault(t["step"], []).append(float(t["ms"]))
                errors[t["step"]] = errors.get(t["step"], 0) + int(bool(t["failed"]))
        return {s: {"runs": len(v), "p50_ms": round(percentile(v, 50) or 0), "p95_ms": round(percentile(v, 95) or 0),
                    "exceptions": errors.get(s, 0)} for s, v in per.items()}


def _hot_tables(a: Any, share: float) -> dict[str, float]:
    """Mirrored Dataverse tables that hold at least ``share`` of the business rows (platform tables and the
    activitypointer union left out), with their share."""
    rows = {t.split(".", 1)[1]: n for t, n in a.rows().items() if t.startswith("dataverse.")
            and t.split(".", 1)[1] not in PLATFORM_TABLES and t != "dataverse.activitypointer"}
    total = sum(rows.values())
    return {t: n / total for t, n in rows.items() if total and n / total >= share}


def _check(cid: str, title: str, status: str, finding: str, rec: str, ids: Sequence[str], yardstick: str,
           source: str, *, count: int | None = None, evidence: Sequence[Mapping[str, Any]] = (),
           **measures: Any) -> Check:
    return Check(f"integration.{cid}", AREA, title, status, finding, rec if status != "green" else "",
                 count=len(ids) if count is None else count, ids=sorted(ids),
                 measures={"yardstick": yardstick, "source": source, "evidence": [dict(e) for e in evidence],
                           **measures})


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------

def _step_checks(layer: _Layer, hot: Mapping[str, float]) -> list[Check]:
    durations = layer.durations()
    enabled = [s for s in layer.steps if s["statecode"] == 0]
    flagged = []
    for s in enabled:
        if s["mode"] != 0:
            continue
        reason = ("runs on every read" if s["message"] in ("Retrieve", "RetrieveMultiple") else
                  f"{s['tbl']} holds {hot[s['tbl']]:.0%} of the rows" if s["tbl"] in hot else "")
        if reason:
            flagged.append({"id": s["id"], "step": s["name"], "message": s["message"], "table": s["tbl"],
                            "stage": s["stage"], "reason": reason, **durations.get(s["id"], {})})
    slowest = max((f.get("p95_ms", 0) for f in flagged), default=0)
    checks = [_check(
        "sync_steps_on_hot_paths", "Synchronous plug-in steps on high-volume tables or on reads",
        "red" if flagged else "green",
        f"{len(flagged)} synchronous step(s) on Retrieve/RetrieveMultiple or on tables holding "
        f"{min(hot.values(), default=0):.0%}+ of the rows" + (f"; the slowest runs {slowest} ms at p95 "
                                                               f"(trace log)" if slowest else ""),
        "make these steps asynchronous (post-operation) or move the work to Service Bus; a synchronous step adds its "
        "run time to every save (and every read, for Retrieve/RetrieveMultiple) and fails the user's operation when "
        "it fails", [f["id"] for f in flagged],
        "no synchronous step on Retrieve/RetrieveMultiple or on a table with 5% or more of the rows",
        _SRC_RETRIEVE, evidence=flagged, hot_tables={t: round(v, 3) for t, v in hot.items()})]
    unfiltered = [{"id": s["id"], "step": s["name"], "table": s["tbl"],
                   "mode": "synchronous" if s["mode"] == 0 else "asynchronous"}
                  for s in enabled if s["message"] == "Update" and not (s["filteringattributes"] or "").strip()]
    checks.append(_check(
        "update_steps_without_filtering", "Update steps without filtering attributes",
        "amber" if unfiltered else "green",
        f"{len(unfiltered)} Update step(s) run on every change of any column",
        "set filtering attributes on each Update step to the columns its logic reads", [u["id"] for u in unfiltered],
        "every Update step names its filtering attributes", _SRC_FILTERING, evidence=unfiltered))
    return checks


def _endpoint_checks(layer: _Layer, failure_red: float) -> list[Check]:
    eps = list(layer.endpoints.values())

    def address(e: Mapping[str, Any]) -> str:
        return str(e["url"] or e["namespaceaddress"] or "")

    plain = [{"id": e["id"], "endpoint": e["name"], "address": address(e)} for e in eps
             if address(e).lower().startswith("http://")]
    keyed = []
    for e in eps:
        params = _secret_in_url(e["url"])
        if e["authtype"] in _KEY_IN_URL_AUTH or params:
            keyed.append({"id": e["id"], "endpoint": e["name"], "host": _host(e["url"]),
                          "auth": _KEY_IN_URL_AUTH.get(e["authtype"], "key in the URL"), "parameters": params})
    shared = [{"id": e["id"], "endpoint": e["name"], "auth": _SHARED_KEY_AUTH[e["authtype"]],
               "namespace": _host(e["namespaceaddress"])} for e in eps if e["authtype"] in _SHARED_KEY_AUTH]
    checks = [
        _check("endpoints_plain_http", "Service endpoints over plain http", "red" if plain else "green",
               f"{len(plain)} endpoint(s) send the execution context (record data) unencrypted",
               "move the endpoint to https (TLS 1.2+); Dataverse posts the full execution context to it",
               [p["id"] for p in plain], "every endpoint address is https:// or sb://", _SRC_WEBHOOK, evidence=plain),
        _check("endpoints_key_in_url", "Service endpoints with a key in the URL", "red" if keyed else "green",
               f"{len(keyed)} endpoint(s) authenticate with a key carried in the query string",
               "use Http Header authentication (or an Entra-protected endpoint) and rotate the exposed key; query "
               "strings end up in logs and proxies", [k["id"] for k in keyed],
               "no Webhook Key / Http Query String authentication and no code=/sig=/key= in a URL", _SRC_WEBHOOK,
               evidence=keyed),
        _check("endpoints_shared_key", "Service Bus / Event Hub endpoints with a shared key",
               "amber" if shared else "green",
               f"{len(shared)} endpoint(s) hold a long-lived shared access key",
               "use a SAS token with an expiry (authtype SAS Token) scoped to send on the one entity, and rotate the "
               "namespace keys", [s["id"] for s in shared], "SAS Token rather than SAS Key / connection string",
               _SRC_SERVICE_BUS, evidence=shared),
    ]
    step_ep = layer.step_endpoint()
    stats: dict[str, dict[str, Any]] = {}
    for j in layer.window_jobs():
        ep = step_ep.get(j["step"] or "")
        if ep is None or j["statecode"] != 3:
            continue
        st = stats.setdefault(ep, {"jobs": 0, "failed": 0, "errors": {}})
        st["jobs"] += 1
        if j["statuscode"] == _FAILED:
            st["failed"] += 1
            msg = str(j["message"] or "no message")
            st["errors"][msg] = st["errors"].get(msg, 0) + 1
    rows = []
    for ep, st in stats.items():
        rate = st["failed"] / st["jobs"] if st["jobs"] else 0.0
        top = sorted(st["errors"].items(), key=lambda kv: -kv[1])[:3]
        rows.append({"id": ep, "endpoint": layer.endpoints.get(ep, {}).get("name", ep), "jobs": st["jobs"],
                     "failed": st["failed"], "failure_rate": round(rate, 4),
                     "top_errors": [{"message": m, "count": n} for m, n in top]})
    failing = [r for r in rows if r["failure_rate"] >= failure_red]
    some = [r for r in rows if 0 < r["failure_rate"] < failure_red]
    checks.append(_check(
        "endpoint_job_failures", "Service endpoints whose system jobs fail",
        "red" if failing else ("amber" if some else "green"),
        f"{len(failing)} endpoint(s) fail {failure_red:.0%}+ of their system jobs"
        + "".join(f"; {r['endpoint']}: {r['failed']} of {r['jobs']} ({r['failure_rate']:.0%}), mostly "
                  f"'{r['top_errors'][0]['message'][:80]}'" for r in failing if r["top_errors"]),
        "fix the endpoint (entity exists, SAS token valid, receiver reachable) and resubmit or clean up the failed "
        "jobs; a failed Service Bus post is not retried after its retries run out: the message is lost",
        [r["id"] for r in failing], f"under {failure_red:.0%} failed system jobs per endpoint over the window",
        _SRC_ASYNC, evidence=sorted(rows, key=lambda r: -r["failure_rate"]), by_endpoint=rows))
    return checks


def _job_checks(layer: _Layer, failure_red: float, retention_days: int) -> list[Check]:
    # Aggregated by DuckDB: the window's jobs by operation type, the backlog, the old succeeded jobs per step.
    window = f"createdon >= TIMESTAMPTZ '{layer.since:%Y-%m-%dT%H:%M:%SZ}'"
    by_type = {str(r.pop("label")): r for r in layer.q(f"""
        SELECT coalesce(nullif(operationtype_label, ''), operationtype::VARCHAR, 'None') AS label,
               count(*) AS jobs, count(*) FILTER (WHERE statuscode = {_FAILED}) AS failed,
               count(*) FILTER (WHERE statuscode IN {_WAITING}) AS waiting
        FROM dataverse.asyncoperation WHERE {window} GROUP BY 1 ORDER BY 1""")}
    failed_ids = [str(r["id"]) for r in layer.q(f"""
        SELECT asyncoperationid::VARCHAR AS id FROM dataverse.asyncoperation
        WHERE {window} AND statuscode = {_FAILED}""")]
    rates = {k: round(v["failed"] / v["jobs"], 4) for k, v in by_type.items() if v["jobs"]}
    worst_rate = max(rates.values(), default=0.0)
    status = "red" if worst_rate >= failure_red else ("amber" if failed_ids else "green")
    checks = [_check(
        "system_job_failures", "Failed system jobs by operation type", status,
        f"{len(failed_ids)} failed system job(s) over the window; " + ", ".join(
            f"{k} {by_type[k]['failed']} of {by_type[k]['jobs']} ({r:.0%})" for k, r in sorted(rates.items())),
        "read the failed jobs' messages (Settings > System jobs), fix the cause, and set up an alert on failed "
        "system jobs; nobody reads them otherwise", failed_ids,
        f"under {failure_red:.0%} failed per operation type", _SRC_ASYNC,
        evidence=[{"operation_type": k, **v, "failure_rate": rates.get(k, 0.0)} for k, v in sorted(by_type.items())],
        by_type={k: {**v, "failure_rate": rates.get(k, 0.0)} for k, v in by_type.items()})]
    stale = layer.now - _dt.timedelta(hours=24)
    waiting = layer.q(f"""
        SELECT asyncoperationid::VARCHAR AS id, name, createdon FROM dataverse.asyncoperation
        WHERE statuscode IN {_WAITING} AND createdon < TIMESTAMPTZ '{stale:%Y-%m-%dT%H:%M:%SZ}'
        ORDER BY createdon, id""")
    for j in waiting:
        j["created"] = _utc(j["createdon"])
    oldest = min((j["created"] for j in waiting), default=None)
    checks.append(_check(
        "system_job_backlog", "System jobs waiting for more than a day", "amber" if waiting else "green",
        f"{len(waiting)} system job(s) waiting for more than 24 hours"
        + (f" (oldest since {oldest:%Y-%m-%d})" if oldest else ""),
        "find why they wait (a disabled owner, a postponed retry, a suspended workflow) and resume or cancel them",
        [j["id"] for j in waiting], "no job waiting longer than 24 hours", _SRC_ASYNC,
        evidence=[{"id": j["id"], "job": j["name"], "since": str(j["created"])} for j in waiting[:50]]))
    kept = {str(r["step"]): int(r["n"]) for r in layer.q(f"""
        SELECT owningextensionid::VARCHAR AS step, count(*) AS n FROM dataverse.asyncoperation
        WHERE statuscode = {_SUCCEEDED} AND owningextensionid IS NOT NULL
          AND createdon < TIMESTAMPTZ '{layer.old:%Y-%m-%dT%H:%M:%SZ}' GROUP BY 1 ORDER BY 1""")}
    names = {s["id"]: s["name"] for s in layer.steps}
    checks.append(_check(
        "succeeded_jobs_retained", f"Succeeded system jobs kept beyond {retention_days} days",
        "amber" if kept else "green",
        f"{len(kept)} step(s) leave their succeeded jobs behind ({sum(kept.values())} jobs older than "
        f"{retention_days} days): the asyncoperation table grows without bound",
        "turn on 'Delete AsyncOperation if StatusCode = Successful' (asyncautodelete) on these steps and bulk-delete "
        "the succeeded jobs; system jobs count against database storage", list(kept),
        f"no succeeded job older than {retention_days} days", _SRC_ASYNC,
        evidence=[{"id": s, "step": names.get(s, s), "jobs": n} for s, n in sorted(kept.items())], jobs=sum(kept.values())))
    return checks


def _flow_checks(a: Any, layer: _Layer, hot: Mapping[str, float]) -> list[Check]:
    flows = [w for w in layer.workflows if w["category"] == 5]
    checks: list[Check] = []
    if "graph.users" in a.warehouse_tables():
        disabled = {str(r["id"]): r for r in layer.q("""
            SELECT s.systemuserid::VARCHAR AS id, s.fullname, u.userPrincipalName AS upn FROM dataverse.systemuser s
            JOIN graph.users u ON lower(s.azureactivedirectoryobjectid::VARCHAR) = lower(u.id)
            WHERE u.accountEnabled = false""")}
        orphaned = [{"id": f["id"], "flow": f["name"], "owner": disabled[f["owner"]]["fullname"],
                     "upn": disabled[f["owner"]]["upn"]} for f in flows if f["owner"] in disabled]
        checks.append(_check(
            "flows_owned_by_disabled_users", "Cloud flows owned by users disabled in Entra ID",
            "red" if orphaned else "green",
            f"{len(orphaned)} cloud flow(s) belong to people whose Entra account is disabled: their connections stop "
            "working and nobody gets the failure notices",
            "reassign the flows to a service account or a team (co-owners), and rebind their connections",
            [o["id"] for o in orphaned], "every flow owner is an enabled Entra user (cross-system)",
            "https://learn.microsoft.com/power-automate/change-cloud-flow-owner", evidence=orphaned))
    off = [{"id": f["id"], "flow": f["name"], "state": {0: "off (draft)", 2: "suspended"}[f["statecode"]]}
           for f in flows if f["statecode"] in (0, 2)]
    checks.append(_check(
        "flows_off_or_suspended", "Cloud flows turned off or suspended", "amber" if off else "green",
        f"{len(off)} cloud flow(s) are off or suspended",
        "turn them back on after fixing the cause (a DLP policy suspends flows), or delete them from the solution",
        [o["id"] for o in off], "every cloud flow in the solution is on", _SRC_FLOW_TRIGGER, evidence=off))
    loose = []
    for f in flows:
        trig = f["flow"] or {}
        if trig.get("table") in hot and not (trig.get("filteringattributes") or trig.get("filterexpression")):
            loose.append({"id": f["id"], "flow": f["name"], "table": trig["table"],
                          "share_of_rows": round(hot[trig["table"]], 3)})
    checks.append(_check(
        "flows_unfiltered_triggers", "Flows triggered on high-volume tables without a filter",
        "amber" if loose else "green",
        f"{len(loose)} flow(s) run on every change of a high-volume table",
        "add 'Select columns' (filteringattributes) and a 'Filter rows' expression to the trigger; every run counts "
        "against the flow's Power Platform request limits", [x["id"] for x in loose],
        "a Dataverse trigger on a table with 5% or more of the rows names columns or a filter", _SRC_FLOW_TRIGGER,
        evidence=loose))
    unsafe = []
    for f in flows:
        for uri in (f["flow"] or {}).get("http", []):
            why = ("plain http" if uri.lower().startswith("http://") else
                   "signature in the URL" if _secret_in_url(uri) else "")
            if why:
                unsafe.append({"id": f["id"], "flow": f["name"], "host": _host(uri), "reason": why})
                break
    checks.append(_check(
        "flows_insecure_http", "Flows calling http endpoints or URLs with a signature",
        "red" if unsafe else "green",
        f"{len(unsafe)} flow(s) send data over plain http or carry a shared-access signature in a URL",
        "call https endpoints only; keep Logic App trigger URLs (sig=) in a secret environment variable or Key Vault, "
        "or protect the Logic App with Entra ID", [u["id"] for u in unsafe],
        "HTTP actions use https and no signature in the URL", _SRC_LOGIC_SAS, evidence=unsafe))
    return checks


def _config_checks(q: Any, production: bool, sync_gap_hours: float) -> list[Check]:
    checks: list[Check] = []
    refs = q("SELECT connectionreferenceid::VARCHAR AS id, connectionreferencedisplayname AS name, "
                        "connectorid FROM dataverse.connectionreference WHERE statecode = 0 AND "
                        "(connectionid IS NULL OR trim(connectionid) = '') ORDER BY name")
    checks.append(_check(
        "connection_references_unbound", "Connection references without a connection", "red" if refs else "green",
        f"{len(refs)} connection reference(s) have no connection: the flows that use them cannot run",
        "bind each connection reference to a connection owned by a service account (solution import settings or "
        "Solutions > Connection references)", [r["id"] for r in refs], "every connection reference has a connection",
        _SRC_CONNREF, evidence=[{**r, "connector": str(r["connectorid"]).rsplit("/", 1)[-1]} for r in refs]))
    envs = q("""
        SELECT d.environmentvariabledefinitionid::VARCHAR AS id, d.schemaname, d.type_label AS type
        FROM dataverse.environmentvariabledefinition d
        WHERE d.statecode = 0 AND (d.defaultvalue IS NULL OR d.defaultvalue = '') AND NOT EXISTS (
            SELECT 1 FROM dataverse.environmentvariablevalue v
            WHERE v.environmentvariabledefinitionid = d.environmentvariabledefinitionid AND v.value IS NOT NULL
              AND v.value <> '') ORDER BY d.schemaname""")
    checks.append(_check(
        "environment_variables_without_value", "Environment variables without a value", "amber" if envs else "green",
        f"{len(envs)} environment variable(s) have neither a current nor a default value",
        "set a current value in this environment (or a default in the solution); flows reading them fail or use "
        "an empty string", [e["id"] for e in envs], "every environment variable resolves to a value", _SRC_ENVVAR,
        evidence=envs))
    unmanaged = q("""
        SELECT sdkmessageprocessingstepid::VARCHAR AS id, 'plug-in step' AS kind, name FROM dataverse.sdkmessageprocessingstep
        WHERE NOT ismanaged
        UNION ALL SELECT serviceendpointid::VARCHAR, 'service endpoint', name FROM dataverse.serviceendpoint
        WHERE NOT ismanaged
        UNION ALL SELECT pluginassemblyid::VARCHAR, 'plug-in assembly', name FROM dataverse.pluginassembly
        WHERE NOT ismanaged
        UNION ALL SELECT workflowid::VARCHAR, 'cloud flow', name FROM dataverse.workflow
        WHERE NOT ismanaged AND category = 5 AND type = 1 ORDER BY 2, 3""")
    checks.append(_check(
        "unmanaged_customisations", "Unmanaged integration components" + (" in production" if production else ""),
        "amber" if unmanaged and production else "green",
        f"{len(unmanaged)} unmanaged plug-in step(s), endpoint(s), assembly(ies) or flow(s)"
        + (" in a production environment" if production else " (not a production environment)"),
        "move them into a solution built in development and import it managed; unmanaged changes in production "
        "are overwritten or block the next upgrade", [u["id"] for u in unmanaged] if production else [],
        "production holds managed solutions only", _SRC_ALM, count=len(unmanaged) if production else 0,
        evidence=unmanaged))
    admins = q(f"""
        SELECT DISTINCT s.systemuserid::VARCHAR AS id, s.fullname AS name, s.applicationid::VARCHAR AS application
        FROM dataverse.systemuser s JOIN dataverse.systemuserroles ur ON ur.systemuserid = s.systemuserid
        JOIN dataverse.role r ON r.roleid = ur.roleid
        WHERE s.applicationid IS NOT NULL AND NOT s.isdisabled
          AND (r.roletemplateid::VARCHAR = '{_SYSTEM_ADMINISTRATOR_TEMPLATE}' OR r.name = 'System Administrator')
        ORDER BY name""")
    checks.append(_check(
        "app_user_system_administrator", "Application users holding System Administrator",
        "red" if admins else "green",
        f"{len(admins)} application user(s) hold System Administrator: a leaked client secret owns the environment",
        "give each application user a custom role with the privileges its integration needs (least privilege)",
        [x["id"] for x in admins], "no application user holds System Administrator", _SRC_APP_USER, evidence=admins))
    org = q("SELECT organizationid::VARCHAR AS id, name, isauditenabled, expirechangetrackingindays "
                       "FROM dataverse.organization")
    off = [o for o in org if not o["isauditenabled"]]
    checks.append(_check(
        "auditing", "Auditing", "red" if off else "green",
        "auditing is off: nobody can tell which integration changed a record" if off else "auditing is on",
        "turn on auditing for the environment (isauditenabled) and for the integrated tables",
        [o["id"] for o in off], "organization.isauditenabled is true", _SRC_AUDIT, evidence=off))
    short = [o for o in org if o["expirechangetrackingindays"] is not None
             and float(o["expirechangetrackingindays"]) * 24 < sync_gap_hours]
    days = org[0]["expirechangetrackingindays"] if org else None
    checks.append(_check(
        "change_tracking_retention", "Change-tracking retention against the sync schedule",
        "red" if short else "green",
        f"change tracking keeps deletions for {days} day(s); the sync must tolerate a gap of "
        f"{sync_gap_hours:g} hours" if days is not None else "no organization settings mirrored",
        "raise the change-tracking retention (expirechangetrackingindays) above the longest sync outage to "
        "tolerate, or a sync that resumes after it misses deletions and must reload in full",
        [o["id"] for o in short], f"retention of at least {sync_gap_hours:g} hours (the longest sync gap tolerated)",
        _SRC_CHANGE_TRACKING, evidence=short, retention_days=days))
    return checks


# --------------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------------

def _rate_colour(rate: float | None, failure_red: float) -> str:
    status = "green" if not rate else ("red" if rate >= failure_red else "amber")
    hexcol = STATUS_COLOUR[status].lstrip("#")
    r, g, b = (int(hexcol[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},0.45)"


def integration_map(layer: _Layer, *, failure_red: float = 0.05) -> tuple[Any, list[dict[str, Any]]]:
    """A Sankey diagram: tables -> the steps and flows they fire -> the endpoints and external hosts reached.

    Link widths are system jobs over the window (or 1 where nothing ran); links are coloured by their failure
    rate. Returns the figure and its edges (``source``, ``target``, ``jobs``, ``failed``, ``failure_rate``).
    """
    import plotly.graph_objects as go

    edges: dict[tuple[str, str], dict[str, Any]] = {}

    def edge(src: str, dst: str, jobs: int = 0, failed: int = 0) -> None:
        e = edges.setdefault((src, dst), {"source": src, "target": dst, "jobs": 0, "failed": 0})
        e["jobs"] += jobs
        e["failed"] += failed

    per_step: dict[str, list[int]] = {}
    for j in layer.window_jobs():
        if j["step"] and j["statecode"] == 3:
            c = per_step.setdefault(j["step"], [0, 0])
            c[0] += 1
            c[1] += int(j["statuscode"] == _FAILED)
    runs = {s: d["runs"] for s, d in layer.durations().items()}
    for s in layer.steps:
        if s["statecode"] != 0:
            continue
        jobs, failed = per_step.get(s["id"], [runs.get(s["id"], 0), 0])
        table = f"table {s['tbl']}"
        handler = layer.handler_name(s)
        contract = layer.endpoints.get(s["handler"], {}).get("contract")
        kind = "plug-in" if s["handler_type"] == "plugintype" else _CONTRACT.get(int(contract or 0), "endpoint")
        node = f"{kind}: {handler} ({'sync' if s['mode'] == 0 else 'async'} {s['message']})"
        edge(table, node, jobs, failed)
        ep = layer.endpoints.get(s["handler"]) if s["handler_type"] == "serviceendpoint" else None
        if ep:
            host = _host(ep["url"]) or _host(ep["namespaceaddress"])
            scheme = (ep["url"] or ep["namespaceaddress"] or "").split(":", 1)[0]
            edge(node, f"{scheme}://{host}" + (f"/{ep['path']}" if ep["path"] else ""), jobs, failed)
    for w in layer.workflows:
        f = w["flow"]
        if f is None or w["statecode"] != 1:
            continue
        src = f"table {f['table']}" if f["table"] else "schedule"
        node = f"flow: {w['name']}"
        edge(src, node)
        for uri in f["http"]:
            edge(node, f"{uri.split(':', 1)[0]}://{_host(uri)}")
        for api in f["connectors"]:
            edge(node, f"connector {api.removeprefix('shared_')}")
    rows = []
    for e in edges.values():
        e["failure_rate"] = round(e["failed"] / e["jobs"], 4) if e["jobs"] else None
        rows.append(e)
    labels = list(dict.fromkeys([e["source"] for e in rows] + [e["target"] for e in rows]))
    index = {n: i for i, n in enumerate(labels)}
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": labels, "pad": 12, "thickness": 14},
        link={"source": [index[e["source"]] for e in rows], "target": [index[e["target"]] for e in rows],
              "value": [max(1, e["jobs"]) for e in rows],
              "color": [_rate_colour(e["failure_rate"], failure_red) for e in rows],
              "customdata": [f"{e['jobs']} jobs, {e['failed']} failed"
                             + (f" ({e['failure_rate']:.0%})" if e["failure_rate"] is not None else "")
                             for e in rows],
              "hovertemplate": "%{source.label} → %{target.label}<br>%{customdata}<extra></extra>"}))
    fig.update_layout(title="Integration surface: tables → steps and flows → endpoints and hosts "
                            "(width: system jobs over the window; colour: failure rate)", font_size=11, height=640)
    return fig, rows


# --------------------------------------------------------------------------------------------------
# The area
# --------------------------------------------------------------------------------------------------

def assess_integration(a: Any, *, production: bool = True, hot_share: float = 0.05, window_days: int = 30,
                       failure_red: float = 0.05, retention_days: int = 30, sync_gap_hours: float = 72.0,
                       read_platform: bool = True, max_age_hours: float = 24.0) -> Section:
    """The integration area of an :class:`~bridgekit.assess.Assessment` ``a``.

    Args:
        a: The assessment (its workbench, reference time, warehouse tables and row counts).
        production: The environment is production (unmanaged components are then a finding).
        hot_share: A table holding this share of the mirrored Dataverse rows or more is high-volume.
        window_days: The look-back window for system jobs.
        failure_red: The failure rate (per endpoint, per operation type) that is red.
        retention_days: Succeeded system jobs older than this are "kept forever".
        sync_gap_hours: The longest sync outage the integration must survive (change-tracking retention).
        read_platform: Read what the checks use of the platform tables from Dataverse (only the columns they
            read, the system jobs and trace logs they score), unless the warehouse mirrors every platform table
            synced within ``max_age_hours``. False: read the warehouse's tables whatever their age.
        max_age_hours: How old the mirrored platform tables may be (their last sync) and still be read.

    Returns:
        The section: its checks, the map's edges as data and the map as figure.
    """
    tables = dict(_READ)
    if "dataverse.systemuser" not in a.warehouse_tables():
        tables["systemuser"] = _SYSTEMUSER  # flows and roles are joined to their owners and the application user
    live: dict[str, list[dict[str, Any]]] = {}
    if read_platform and a.wb.profile.dataverse_url and not _mirrored(a, max_age_hours):
        since = a.now - _dt.timedelta(days=window_days)
        jobs = _job_filter(since, a.now - _dt.timedelta(days=retention_days))
        live = _read_live(a.wb, tables, {"asyncoperation": jobs, "workflow": ["type eq 1"],
                                         "plugintracelog": [f"createdon ge {since:%Y-%m-%dT%H:%M:%SZ}"]})
    with a.wb.warehouse.overlay() as view:
        for table, rows in live.items():
            view.put(f"dataverse.{table}", tables[table], rows)
        layer = _Layer(a, view.records, window_days=window_days, retention_days=retention_days)
        hot = _hot_tables(a, hot_share)
        checks = [*_step_checks(layer, hot), *_endpoint_checks(layer, failure_red),
                  *_job_checks(layer, failure_red, retention_days), *_flow_checks(a, layer, hot),
                  *_config_checks(layer.q, production, sync_gap_hours)]
    fig, edges = integration_map(layer, failure_red=failure_red)
    section = Section("Integration surface", checks, {"edges": edges, "hot_tables": hot}, fig)
    section.data["status"] = worst(c.status for c in checks)
    return section
