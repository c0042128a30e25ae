"""What the two services allow and what bridgekit can mirror: the service limits and the Graph resource catalogue.

Every limit a client, the sync, the profile checks or the assessment needs is defined here once, with its source;
adding a Graph resource is one :class:`GraphResource` entry (columns, scope, page size, permissions, delta shape),
read by the profile (the default plan), the Graph client (``$top``), the Graph source and the assessment.
Imports nothing of bridgekit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "DATAVERSE_COUNT_CAP",
    "DATAVERSE_EXECUTION_S_PER_WINDOW",
    "DATAVERSE_MAX_CONCURRENCY",
    "DATAVERSE_MAX_PAGE",
    "DATAVERSE_REQUESTS_PER_WINDOW",
    "DATAVERSE_WINDOW_S",
    "DEFAULT_GRAPH_RESOURCES",
    "EVENTS_WINDOW",
    "GRAPH_BATCH_LIMIT",
    "GRAPH_MAILBOX_CONCURRENCY",
    "GRAPH_RESOURCES",
    "PLATFORM_TABLES",
    "GraphResource",
    "graph_max_top",
]

# -- Dataverse (protocols.md §1: service protection limits, paging) ------------------------------------------

#: Rows per page: ``odata.maxpagesize`` is honoured up to 5,000 (query-data-web-api, "Page results").
DATAVERSE_MAX_PAGE = 5000
#: Rows per page a sync asks for unless the plan says otherwise (``[profiles.X.sync] page_size``). A full load
#: reads 4 partitions at once, each holding its page while it arrives: on the large tenant (1M rows) 5,000-row
#: pages peaked at 356 MB, 2,500-row pages at 285 MB, in the same time (bench_sync, 2026-12-07).
DEFAULT_SYNC_PAGE = 2500
#: ``$count`` answers at most this many (count-rows.md; protocols.md §1.6).
DATAVERSE_COUNT_CAP = 5000
#: Concurrent requests per user (service protection limits: 52 concurrent requests).
DATAVERSE_MAX_CONCURRENCY = 52
#: Requests per user in the sliding window, and the window (6,000 requests per 300 s).
DATAVERSE_REQUESTS_PER_WINDOW = 6000
DATAVERSE_WINDOW_S = 300.0
#: Combined execution time per user in the same window (1,200 s per 300 s).
DATAVERSE_EXECUTION_S_PER_WINDOW = 1200.0

#: The ``platform`` group of the sync plan: the Dataverse tables that hold the integration layer (plug-in steps,
#: service endpoints, flows, system jobs, trace logs, connection references, environment variables, security roles,
#: organization settings). Off by default (``platform = true`` under ``[profiles.X.sync]``); the assessment's
#: integration area reads them (docs/integration-surface.md).
PLATFORM_TABLES: tuple[str, ...] = (
    "solution", "pluginassembly", "plugintype", "sdkmessage", "sdkmessagefilter", "sdkmessageprocessingstep",
    "serviceendpoint", "workflow", "connectionreference", "environmentvariabledefinition",
    "environmentvariablevalue", "asyncoperation", "plugintracelog", "role", "systemuserroles", "organization",
)

# -- Microsoft Graph (protocols.md §2) ------------------------------------------------------------------------

#: Requests per JSON batch (json-batching.md).
GRAPH_BATCH_LIMIT = 20
#: Outlook: 4 concurrent requests per app and mailbox (throttling-limits, Outlook service limits; §2.4).
GRAPH_MAILBOX_CONCURRENCY = 4
#: Graph requests one client keeps in flight (profile ``graph_concurrency``) and the most it may ask for. Graph
#: limits concurrency only per mailbox (above, which the client keeps whatever this is) and meters the rest as
#: requests per window (§2.4); a ``$batch`` of 20 counts as 20. A watcher of hundreds of mailboxes sends one
#: batch per 20 of them each poll: on a 150 ms link, 8 in flight made a poll of 600 mailboxes 12 round trips.
GRAPH_DEFAULT_CONCURRENCY = 32
GRAPH_MAX_CONCURRENCY = 64
#: Users and groups per directory delta page asked for (``Prefer: odata.maxpagesize``): the directory sends 100
#: unless asked and at most 200 objects a page (protocols.md §2.2).
DIRECTORY_DELTA_PAGE = 200
#: The calendarView window mirrored for events (the window is part of the delta token, protocols.md §2.2).
EVENTS_WINDOW = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))

def _prop(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda item: item.get(name)


def _json_prop(name: str) -> Callable[[dict[str, Any]], Any]:
    import orjson

    def get(item: dict[str, Any]) -> Any:
        v = item.get(name)
        return None if v is None else orjson.dumps(v).decode()
    return get


def _address(name: str) -> Callable[[dict[str, Any]], Any]:
    def get(item: dict[str, Any]) -> Any:
        v = item.get(name) or {}
        return (v.get("emailAddress") or {}).get("address") if isinstance(v, dict) else None
    return get


def _addresses(name: str) -> Callable[[dict[str, Any]], Any]:
    def get(item: dict[str, Any]) -> Any:
        v = item.get(name)
        if v is None:
            return None
        return [str((r.get("emailAddress") or {}).get("address")) for r in v if isinstance(r, dict)]
    return get


def _utc(name: str) -> Callable[[dict[str, Any]], Any]:
    """A ``dateTimeTimeZone`` as UTC text (Graph answers in UTC unless ``Prefer: outlook.timezone``)."""
    def get(item: dict[str, Any]) -> Any:
        v = item.get(name)
        if not isinstance(v, dict) or not v.get("dateTime"):
            return None
        text, zone = str(v["dateTime"]), str(v.get("timeZone") or "UTC")
        if zone.upper() in ("UTC", "ETC/UTC", "Z"):
            return text + "Z" if not text.endswith("Z") else text
        from zoneinfo import ZoneInfo

        local = datetime.fromisoformat(text[:26]).replace(tzinfo=ZoneInfo(zone))
        return local.astimezone(UTC).isoformat()
    return get


@dataclass(frozen=True)
class GraphResource:
    """How a Graph resource becomes a table: columns (name, type, extractor) and where its delta lives."""

    name: str
    columns: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...]
    select: tuple[str, ...]  # $select sent on the delta's first request (empty: the resource allows none)
    per_user: str | None = None  # "folders" (message delta is per mail folder), "calendar", "contacts"
    permissions: tuple[str, ...] = ()  # application permissions that allow the read, least privileged first
    max_top: int = 999  # the largest $top (or odata.maxpagesize) the collection accepts
    delta_page: int = 100  # rows per delta page the service sends (what a sync's request count grows with)
    default: bool = True  # in the default sync plan


def _cols(*specs: tuple[str, str] | tuple[str, str, Callable[[dict[str, Any]], Any]]) -> tuple[
        tuple[str, str, Callable[[dict[str, Any]], Any]], ...]:
    out = []
    for spec in specs:
        if len(spec) == 2:
            name, typ = spec
            out.append((name, typ, _json_prop(name) if typ == "JSON" else _prop(name)))
        else:
            out.append(spec)
    return tuple(out)


_V, _TS, _B, _L, _J = "VARCHAR", "TIMESTAMPTZ", "BOOLEAN", "VARCHAR[]", "JSON"
# Types follow the Graph v1.0 $metadata (Edm.String/Boolean/DateTimeOffset, collections, complex types as
# JSON with the commonly queried fields flattened next to them).
GRAPH_RESOURCES: dict[str, GraphResource] = {r.name: r for r in (
    GraphResource("users", _cols(
        ("id", _V), ("displayName", _V), ("givenName", _V), ("surname", _V), ("mail", _V),
        ("userPrincipalName", _V), ("accountEnabled", _B), ("jobTitle", _V), ("department", _V),
        ("officeLocation", _V), ("businessPhones", _L), ("mobilePhone", _V), ("preferredLanguage", _V),
        ("createdDateTime", _TS)), select=(
        "id", "displayName", "givenName", "surname", "mail", "userPrincipalName", "accountEnabled", "jobTitle",
        "department", "officeLocation", "businessPhones", "mobilePhone", "preferredLanguage", "createdDateTime"),
        permissions=("User.Read.All", "Directory.Read.All"), max_top=999, delta_page=DIRECTORY_DELTA_PAGE),
    GraphResource("groups", _cols(
        ("id", _V), ("displayName", _V), ("description", _V), ("mail", _V), ("mailEnabled", _B),
        ("mailNickname", _V), ("securityEnabled", _B), ("groupTypes", _L), ("visibility", _V),
        ("createdDateTime", _TS)), select=(
        "id", "displayName", "description", "mail", "mailEnabled", "mailNickname", "securityEnabled",
        "groupTypes", "visibility", "createdDateTime"),
        permissions=("GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"), max_top=999,
        delta_page=DIRECTORY_DELTA_PAGE),
    GraphResource("messages", _cols(
        ("id", _V), ("user_id", _V, _prop("@bk.user")), ("subject", _V), ("bodyPreview", _V), ("body", _J),
        ("from", _J), ("from_address", _V, _address("from")), ("sender", _J),
        ("sender_address", _V, _address("sender")), ("toRecipients", _J),
        ("to_addresses", _L, _addresses("toRecipients")), ("ccRecipients", _J),
        ("cc_addresses", _L, _addresses("ccRecipients")), ("receivedDateTime", _TS), ("sentDateTime", _TS),
        ("createdDateTime", _TS), ("lastModifiedDateTime", _TS), ("isRead", _B), ("isDraft", _B),
        ("importance", _V), ("conversationId", _V), ("internetMessageId", _V), ("parentFolderId", _V),
        ("hasAttachments", _B), ("categories", _L)), select=(
        "id", "subject", "bodyPreview", "body", "from", "sender", "toRecipients", "ccRecipients",
        "receivedDateTime", "sentDateTime", "createdDateTime", "lastModifiedDateTime", "isRead", "isDraft",
        "importance", "conversationId", "internetMessageId", "parentFolderId", "hasAttachments", "categories"),
        per_user="folders",
        permissions=("Mail.Read", "Mail.ReadWrite"), max_top=1000, delta_page=1000),
    GraphResource("events", _cols(
        ("id", _V), ("user_id", _V, _prop("@bk.user")), ("subject", _V), ("bodyPreview", _V), ("start", _J),
        ("start_utc", _TS, _utc("start")), ("end", _J), ("end_utc", _TS, _utc("end")), ("organizer", _J),
        ("organizer_address", _V, _address("organizer")), ("attendees", _J),
        ("attendee_addresses", _L, _addresses("attendees")), ("location", _J),
        ("location_name", _V, lambda i: (i.get("location") or {}).get("displayName")),
        ("isOnlineMeeting", _B), ("isCancelled", _B), ("isAllDay", _B), ("showAs", _V), ("importance", _V),
        ("iCalUId", _V), ("type", _V), ("createdDateTime", _TS), ("lastModifiedDateTime", _TS)),
        select=(), per_user="calendar",
        permissions=("Calendars.Read", "Calendars.ReadWrite"), max_top=1000, delta_page=100),
    GraphResource("contacts", _cols(
        ("id", _V), ("user_id", _V, _prop("@bk.user")), ("displayName", _V), ("givenName", _V), ("surname", _V),
        ("emailAddresses", _J), ("email_addresses", _L, lambda i: None if i.get("emailAddresses") is None else
                                 [str(e.get("address")) for e in i["emailAddresses"] if isinstance(e, dict)]),
        ("companyName", _V), ("jobTitle", _V), ("businessPhones", _L), ("mobilePhone", _V),
        ("createdDateTime", _TS), ("lastModifiedDateTime", _TS)), select=(
        "id", "displayName", "givenName", "surname", "emailAddresses", "companyName", "jobTitle",
        "businessPhones", "mobilePhone", "createdDateTime", "lastModifiedDateTime"), per_user="contacts",
        permissions=("Contacts.Read", "Contacts.ReadWrite"), max_top=1000, delta_page=1000, default=False),
)}

#: The resources the default sync plan mirrors.
DEFAULT_GRAPH_RESOURCES: tuple[str, ...] = tuple(r.name for r in GRAPH_RESOURCES.values() if r.default)

# Largest $top of the collections that are not resources of their own (graph/paging).
_OTHER_MAX_TOP = {"members": 999, "transitiveMembers": 999, "memberOf": 999, "calendarView": 1000,
                  "mailFolders": 1000}


def graph_max_top(path: str) -> int | None:
    """The largest ``$top`` Graph accepts for the collection at ``path`` (None when unknown)."""
    segment = path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    res = GRAPH_RESOURCES.get(segment)
    return res.max_top if res is not None else _OTHER_MAX_TOP.get(segment)
