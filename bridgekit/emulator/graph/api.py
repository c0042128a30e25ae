"""The emulator's Microsoft Graph v1.0: users, groups, mail, calendar, contacts, delta queries and JSON $batch.

Served under ``<graph_url>/v1.0`` (``app.py`` mounts :func:`routes`). Records come from the store
collections ``graph.users``, ``graph.groups``, ``graph.messages``, ``graph.events`` and ``graph.contacts``;
keys starting with ``@emu.`` (mailbox owner, folder, group members) are internal and never served.

Paging is keyset paging: ``$skiptoken`` is an opaque, signed position (the last row's sort keys and id)
plus the original query options, so a reader sees every row that exists throughout its read exactly once
while other writers change the data. Delta tokens hold the store's row version at the start of the round
that produced them: the next round is exactly ``changes_since(version)``, and changes committed during a
round land in the following one. Facts and sources: ``shared/reference/protocols.md`` §2.
"""

from __future__ import annotations

import base64
import logging
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridgekit.emulator.context import GRAPH_APP_ID, EmulatorContext, RoleMissing, TokenRejected
from bridgekit.emulator.faults import _MAILBOX, graph_error_body
from bridgekit.emulator.graph.query import (
    DIRECTORY,
    OUTLOOK,
    Order,
    QueryError,
    TokenCodec,
    json_path,
    parse_filter,
    parse_orderby,
    parse_select,
    parse_top,
)
from bridgekit.emulator.schema import GRAPH_RESOURCES, GraphResource
from bridgekit.emulator.store import Row, Store
from bridgekit.emulator.synth import folder_id as synth_folder_id

__all__ = ["GraphRequest", "GraphResponse", "GraphService", "routes"]

log = logging.getLogger("bridgekit.emulator.graph.api")

JSON_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
MAX_BATCH = 20  # protocols.md §2.3
#: The most objects a users or groups delta page holds, even when a larger page is asked for (protocols.md §2.2).
_DIRECTORY_DELTA_MAX = 200
_DELTA_SEGMENTS = ("delta", "delta()", "microsoft.graph.delta", "microsoft.graph.delta()")
_MEMBERS_SNAPSHOT = "graph.members@"
_USER = Store.field("@emu.user")
_FOLDER = Store.field("@emu.folder")
_FOLDERS = {"inbox": "Inbox", "sentitems": "Sent Items"}
#: Groups whose members include the bound user id.
_MEMBER_OF = "EXISTS (SELECT 1 FROM json_each(data, '$.\"@emu.members\"') m WHERE m.value = ?)"
#: OData type-cast segments on directory-object collections (both spellings the SDKs send).
_CASTS = {f"{p}{t}": t for p in ("microsoft.graph.", "graph.") for t in ("user", "group")}
#: Graph returns at most 20 objects for an expanded directory relationship (query-parameters.md, $expand).
_EXPAND_LIMIT = 20

# Application permissions (or delegated scopes) that let a caller read each kind of resource; the
# context also accepts the matching *.ReadWrite.* grants (protocols.md §2.1, Graph permissions reference).
_ROLES: dict[str, tuple[str, ...]] = {
    "users": ("User.Read.All", "User.ReadBasic.All", "Directory.Read.All"),
    "groups": ("Group.Read.All", "GroupMember.Read.All", "Directory.Read.All"),
    "members": ("GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"),
    "messages": ("Mail.Read", "Mail.ReadBasic.All", "Mail.ReadBasic"),
    "events": ("Calendars.Read", "Calendars.ReadBasic"),
    "contacts": ("Contacts.Read",),
}
_ORDERABLE: dict[str, tuple[str, ...]] = {
    "users": ("displayName", "userPrincipalName"),
    "users+": ("displayName", "userPrincipalName", "givenName", "surname", "mail", "jobTitle", "createdDateTime",
               "department", "id"),
    "groups": ("displayName",),
    "groups+": ("displayName", "mail", "createdDateTime", "mailNickname", "id"),
    "messages": ("receivedDateTime", "sentDateTime", "createdDateTime", "lastModifiedDateTime", "subject",
                 "importance", "from/emailAddress/address", "from/emailAddress/name"),
    "events": ("start/dateTime", "end/dateTime", "subject", "createdDateTime", "lastModifiedDateTime"),
    "contacts": ("displayName", "givenName", "surname", "companyName", "createdDateTime", "lastModifiedDateTime"),
}
_TYPES = {"users": "microsoft.graph.user", "groups": "microsoft.graph.group", "messages": "microsoft.graph.message",
          "events": "microsoft.graph.event", "contacts": "microsoft.graph.contact"}


# -- request / response / errors -----------------------------------------------------------------------

@dataclass
class GraphRequest:
    """One Graph call, from HTTP or from inside a ``$batch``: path relative to ``/v1.0``, decoded query."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def client_request_id(self) -> str:
        # Graph echoes the caller's client-request-id, else reuses its own request-id (protocols.md §2.6).
        return self.headers.get("client-request-id") or self.request_id

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass
class GraphResponse:
    """A response before it becomes HTTP (or a ``$batch`` item)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = JSON_TYPE

    def json_body(self) -> Any:
        """The body for a batch item: parsed JSON, or base64 text for other content."""
        if not self.body:
            return None
        if self.media_type.startswith("application/json"):
            return orjson.loads(self.body)
        return base64.b64encode(self.body).decode()


class GraphError(Exception):
    """An error answer in Graph's shape; raised anywhere in a handler."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _ok(payload: dict[str, Any], headers: dict[str, str] | None = None) -> GraphResponse:
    return GraphResponse(200, orjson.dumps(payload), headers or {})


def _error_body(req: GraphRequest, code: str, message: str) -> bytes:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return orjson.dumps({"error": {"code": code, "message": message, "innerError": {
        "date": now, "request-id": req.request_id, "client-request-id": req.client_request_id}}})


def _bad_segment(segment: str) -> GraphError:
    # Graph answers an unknown path segment with 400, not 404 (protocols.md §2.6).
    return GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")


def _utc_window_value(raw: str, name: str) -> str:
    """A startDateTime/endDateTime parameter as UTC ``YYYY-MM-DDTHH:MM:SS`` (the records' sortable form)."""
    try:
        parsed = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise GraphError(400, "ErrorInvalidParameter",
                         f"The value '{raw}' of parameter '{name}' is not a valid DateTime.") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed.strftime("%Y-%m-%dT%H:%M:%S")


#: System query options Graph reads without their ``$`` on some v1.0 APIs (query-parameters.md).
_DOLLARLESS = {"select", "expand", "filter", "orderby", "top", "skip", "count", "search", "format", "skiptoken"}


def _split_commas(text: str) -> list[str]:
    out: list[str] = []
    buf: list[str] = []
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return [o for o in out if o.strip()]


def _check_options(req: GraphRequest, allowed: tuple[str, ...], resource: str) -> None:
    """Refuse query options a single-object read does not serve, instead of ignoring them."""
    for key in req.query:
        name = key if key.startswith("$") else ("$" + key if key.lower() in _DOLLARLESS else None)
        if name is not None and name not in allowed:
            raise GraphError(400, "Request_BadRequest",
                             f"Query option '{name}' is not supported on a single {resource} by the emulator "
                             f"(supported: {', '.join(allowed)}).")


# -- rendering -------------------------------------------------------------------------------------------

def _public(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("@emu.")}


def _value_at(rec: dict[str, Any], path: str) -> Any:
    cur: Any = rec
    for part in path.split("/"):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _sort_value(rec: dict[str, Any], path: str) -> Any:
    """The value ``coalesce(json_extract(...), '')`` gives in SQL, for keyset cursors."""
    v = _value_at(rec, path)
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, dict | list):
        return orjson.dumps(v).decode()
    return v


@dataclass(frozen=True)
class _Shape:
    """How records of one collection are served: which properties, and which always."""

    select: tuple[str, ...] | None
    default: tuple[str, ...]
    directory: bool
    always: tuple[str, ...] = ()

    def render(self, data: str) -> dict[str, Any]:
        rec: dict[str, Any] = orjson.loads(data)
        keys = self.select or self.default
        if keys:
            # Directory objects serve every selected property, null when unset; Outlook items only set ones.
            out = {k: rec.get(k) for k in keys} if self.directory else {k: rec[k] for k in keys if k in rec}
            for k in self.always:
                if k in rec:
                    out[k] = rec[k]
            return out
        return _public(rec)


def _keyset(keys: list[tuple[str, bool]], values: list[Any]) -> tuple[str, list[Any]]:
    """SQL for "sorts after this row" given sort keys (expression, descending) and the row's values."""
    ors: list[str] = []
    params: list[Any] = []
    for i, (expr, desc) in enumerate(keys):
        parts = [f"{keys[j][0]} = ?" for j in range(i)]
        params.extend(values[:i])
        parts.append(f"{expr} {'<' if desc else '>'} ?")
        params.append(values[i])
        ors.append("(" + " AND ".join(parts) + ")")
    return "(" + " OR ".join(ors) + ")", params


@dataclass(frozen=True)
class _Listing:
    """One collection endpoint: what to read and how to describe it."""

    kind: str  # users | groups | members | memberOf | messages | events | contacts
    coll: str
    res: GraphResource
    context: str  # the @odata.context fragment after "$metadata#"
    link_path: str  # path for nextLink, relative to /v1.0
    scope: tuple[str, tuple[Any, ...]] = ("", ())
    default_order: tuple[tuple[str, bool], ...] = ()
    odata_type: str = ""
    #: calendarView: the startDateTime/endDateTime window is part of the query (and of its skiptokens).
    window: bool = False

    @property
    def dialect(self) -> str:
        return DIRECTORY if self.kind in ("users", "groups", "members", "memberOf") else OUTLOOK


@dataclass(frozen=True)
class _DeltaSpec:
    """One delta endpoint: its collection, scope (mailbox / folder / window) and how removals read."""

    kind: str  # users | groups | messages | events
    coll: str
    res: GraphResource
    link_path: str
    scope_key: list[Any]
    scope: tuple[str, tuple[Any, ...]]
    context: str
    reason: str
    odata_type: str


class GraphService:
    """The Graph v1.0 request handlers, independent of HTTP so ``$batch`` items run the same code.

    Args:
        ctx: The emulator context (store, settings, faults, token validation).

    Example:
        >>> svc = GraphService(ctx)                                                 # doctest: +SKIP
        >>> svc.handle(GraphRequest("GET", "users", {"$top": "5"}, headers)).status  # doctest: +SKIP
        200
    """

    def __init__(self, ctx: EmulatorContext) -> None:
        self.ctx = ctx
        self.store: Store = ctx.store
        # Per-mailbox reads filter on the owner (and folder): index them so a mailbox page costs the
        # mailbox, not the tenant.
        self.store.ensure_index("graph.messages", "mailbox", ["@emu.user", "@emu.folder"], feed=True)
        self.store.ensure_index("graph.events", "owner", ["@emu.user"], feed=True)
        self.store.ensure_index("graph.contacts", "owner", ["@emu.user"], feed=True)
        self.store.ensure_index("graph.users", "upn", ["userPrincipalName"])
        #: Per-item throttling for $batch: an error response (a 429 with Retry-After) for an item, or None;
        #: ``done`` is called when an admitted item has been answered.
        self.item_fault: _ItemThrottle | None = None

    # -- entry points ------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return self.ctx.graph_url + "/v1.0"

    def handle(self, req: GraphRequest) -> GraphResponse:
        """Authenticate, route and answer one request; every failure becomes Graph's error JSON."""
        try:
            claims = self._authenticate(req)
            if req.path.strip("/") == "$batch":
                return self._batch(req, claims)
            return self._dispatch(req, claims)
        except GraphError as exc:
            return GraphResponse(exc.status, _error_body(req, exc.code, exc.message), dict(exc.headers))
        except QueryError as exc:
            return GraphResponse(exc.status, _error_body(req, exc.code, exc.message))

    def _authenticate(self, req: GraphRequest) -> dict[str, Any]:
        try:
            return self.ctx.verify_token(req.headers.get("authorization"), "graph")
        except TokenRejected as exc:
            messages = {
                "missing_token": "Access token is empty.",
                "expired": "Access token has expired or is not yet valid.",
                "not_yet_valid": "Access token has expired or is not yet valid.",
                "invalid_audience": "Access token validation failure. Invalid audience.",
            }
            challenge = (f'Bearer realm="", authorization_uri="{self.ctx.base_url}/{self.ctx.tenant_id}'
                         f'/oauth2/authorize", client_id="{GRAPH_APP_ID}"')
            raise GraphError(401, "InvalidAuthenticationToken",
                             messages.get(exc.code, "Access token validation failure."),
                             {"WWW-Authenticate": challenge}) from None

    def _require(self, claims: dict[str, Any], kind: str, *also: str) -> None:
        try:
            self.ctx.require_role(claims, *_ROLES[kind], *also)
        except RoleMissing:
            if kind in ("users", "groups", "members"):
                raise GraphError(403, "Authorization_RequestDenied",
                                 "Insufficient privileges to complete the operation.") from None
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.") from None

    # -- routing -----------------------------------------------------------------------------------
    def _dispatch(self, req: GraphRequest, claims: dict[str, Any]) -> GraphResponse:
        segs = [s for s in req.path.strip("/").split("/") if s]
        if not segs:
            raise GraphError(400, "BadRequest", "Invalid request: no resource was named.")
        if segs[0].lower() == "me":
            if "scp" not in claims:
                raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
            segs = ["users", str(claims.get("oid", "")), *segs[1:]]
        if req.method != "GET":
            raise self._write_refused(req, claims, segs)
        head = segs[0]
        if head == "users":
            return self._users(req, claims, segs[1:])
        if head == "groups":
            return self._groups(req, claims, segs[1:])
        raise _bad_segment(head)

    def _write_refused(self, req: GraphRequest, claims: dict[str, Any], segs: list[str]) -> GraphError:
        """The answer to a write: 403 without a write permission (as the service), else 501 (not emulated).

        The service checks the app's permissions before anything else, so an app with read-only grants
        gets 403 ``Authorization_RequestDenied`` (directory) or ``ErrorAccessDenied`` (Outlook) whatever
        it writes; with a write grant the emulator cannot carry the write out and says so with 501.
        """
        low = [x.lower() for x in segs]
        if low[0] == "groups" and len(low) > 2 and low[2] == "members":
            needed: tuple[str, ...] = ("GroupMember.ReadWrite.All", "Group.ReadWrite.All", "Directory.ReadWrite.All")
        elif low[0] == "groups":
            needed = ("Group.ReadWrite.All", "Directory.ReadWrite.All")
        elif low[0] == "users" and len(low) > 2 and low[2] in ("messages", "mailfolders", "sendmail"):
            needed = ("Mail.ReadWrite", "Mail.Send") if low[2] == "sendmail" else ("Mail.ReadWrite",)
        elif low[0] == "users" and len(low) > 2 and low[2] in ("events", "calendarview", "calendar"):
            needed = ("Calendars.ReadWrite",)
        elif low[0] == "users" and len(low) > 2 and low[2] == "contacts":
            needed = ("Contacts.ReadWrite",)
        elif low[0] == "users":
            needed = ("User.ReadWrite.All", "Directory.ReadWrite.All")
        else:
            return _bad_segment(segs[0])
        have = set(self.ctx.granted(claims))
        if not have & set(needed):
            if low[0] == "groups" or (low[0] == "users" and (len(low) <= 2 or low[2] in ("manager", "memberof"))):
                return GraphError(403, "Authorization_RequestDenied",
                                  "Insufficient privileges to complete the operation.")
            return GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return GraphError(501, "NotImplemented", f"The emulator does not implement {req.method} on this resource; "
                          "it serves Graph reads only.")

    def _users(self, req: GraphRequest, claims: dict[str, Any], rest: list[str]) -> GraphResponse:
        users = GRAPH_RESOURCES["users"]
        if not rest:
            self._require(claims, "users")
            return self._list(req, _Listing("users", "graph.users", users, "users", "users",
                                            default_order=(("id", False),)))
        if rest == ["$count"]:
            self._require(claims, "users")
            return self._count_segment(req, "graph.users", DIRECTORY, "", ())
        if rest[0].lower() in _DELTA_SEGMENTS and len(rest) == 1:
            self._require(claims, "users")
            return self._delta(req, _DeltaSpec("users", "graph.users", users, "users/delta", ["users"],
                                               ("", ()), "users", "changed", "#microsoft.graph.user"))
        key = rest[0]
        if len(rest) == 1:
            # Delegated User.Read reads the signed-in user's own profile (/me).
            self._require(claims, "users", *(("User.Read",) if key == claims.get("oid") and "scp" in claims else ()))
            row = self._find_user(key)
            if row is None:
                raise GraphError(404, "Request_ResourceNotFound", f"Resource '{key}' does not exist or one of "
                                 "its queried reference-property objects are not present.")
            _check_options(req, ("$select", "$expand"), "user")
            select = parse_select(req.query.get("$select"), fields=users.fields, type_name=_TYPES["users"])
            expands = self._parse_expand(req.query.get("$expand"), "users")
            shape = _Shape(select, users.default_select, directory=True)
            sel = f"({','.join(select)})" if select else ""
            item = shape.render(row.data)
            self._apply_expand([item], [row.load()], expands)
            return _ok({"@odata.context": f"{self.base}/$metadata#users{sel}/$entity", **item})
        if rest[1] in ("manager", "memberOf"):
            self._require(claims, "users" if rest[1] == "manager" else "members")
            row = self._find_user(key)
            if row is None:
                raise GraphError(404, "Request_ResourceNotFound", f"Resource '{key}' does not exist or one of "
                                 "its queried reference-property objects are not present.")
            if rest[1] == "manager":
                return self._manager(req, row, rest[2:])
            return self._member_of(req, row, rest[2:])
        return self._mailbox(req, claims, key, rest[1:])

    # -- directory relationships -----------------------------------------------------------------
    def _manager(self, req: GraphRequest, row: Row, tail: list[str]) -> GraphResponse:
        """``/users/{id}/manager``: the manager as a directoryObject (404 when the user has none)."""
        if tail:
            raise _bad_segment(tail[0])
        _check_options(req, ("$select", "$expand"), "manager")
        if req.query.get("$expand"):
            raise GraphError(400, "Request_BadRequest", "Query option '$expand' is not supported on manager by "
                             "the emulator.")
        mid = row.load().get("@emu.manager")
        mgr = self.store.get("graph.users", str(mid)) if mid else None
        if mgr is None:
            raise GraphError(404, "Request_ResourceNotFound", "Resource 'manager' does not exist or one of its "
                             "queried reference-property objects are not present.")
        select = parse_select(req.query.get("$select"), fields=GRAPH_RESOURCES["users"].fields,
                              type_name=_TYPES["users"])
        shape = _Shape(select, GRAPH_RESOURCES["users"].default_select, directory=True)
        return _ok({"@odata.context": f"{self.base}/$metadata#directoryObjects/$entity",
                    "@odata.type": "#microsoft.graph.user", **shape.render(mgr.data)})

    def _member_of(self, req: GraphRequest, row: Row, tail: list[str]) -> GraphResponse:
        """``/users/{id}/memberOf[/microsoft.graph.group][/$count]``: the groups the user is a direct member of."""
        cast = None
        if tail and tail[0] in _CASTS:
            cast, tail = _CASTS[tail[0]], tail[1:]
        # The emulator's users are members of groups only: a cast to user selects nothing.
        where, params = (_MEMBER_OF, (row.id,)) if cast in (None, "group") else ("0", ())
        if tail == ["$count"]:
            return self._count_segment(req, "graph.groups", DIRECTORY, where, params)
        if tail:
            raise _bad_segment(tail[0])
        context = "groups" if cast == "group" else ("users" if cast == "user" else "directoryObjects")
        link = f"users/{row.id}/memberOf" + (f"/microsoft.graph.{cast}" if cast else "")
        return self._list(req, _Listing("memberOf", "graph.groups", GRAPH_RESOURCES["groups"], context, link,
                                        (where, params), default_order=(("id", False),),
                                        odata_type="" if cast else "#microsoft.graph.group"))

    _EXPANDABLE = {"users": ("manager", "memberOf"), "groups": ("members",)}

    def _parse_expand(self, raw: str | None, kind: str) -> list[tuple[str, tuple[str, ...] | None]]:
        """``$expand`` items of a user or group read: (relationship, inner $select or None)."""
        if raw is None or not raw.strip():
            return []
        out: list[tuple[str, tuple[str, ...] | None]] = []
        for item in _split_commas(raw):
            m = re.fullmatch(r"([A-Za-z]+)\s*(?:\((.*)\))?", item.strip(), re.S)
            name = m.group(1) if m else item.strip()
            if m is None or name not in self._EXPANDABLE.get(kind, ()):
                raise GraphError(400, "Request_BadRequest", f"Could not find a navigation property named '{name}' "
                                 f"on type '{_TYPES[kind]}' that the emulator can expand "
                                 f"(supported: {', '.join(self._EXPANDABLE.get(kind, ()))}).")
            select: tuple[str, ...] | None = None
            for opt in (o for o in (m.group(2) or "").split(";") if o.strip()):
                k, _, v = opt.partition("=")
                if k.strip() != "$select":
                    raise GraphError(400, "Request_BadRequest", f"Query option '{k.strip()}' is not supported inside "
                                     "$expand by the emulator (only $select is).")
                target = "groups" if name == "memberOf" else "users"
                select = parse_select(v, fields=GRAPH_RESOURCES[target].fields, type_name=_TYPES[target])
            out.append((name, select))
        return out

    def _apply_expand(self, items: list[dict[str, Any]], recs: list[dict[str, Any]],
                      expands: list[tuple[str, tuple[str, ...] | None]]) -> None:
        """Attach expanded relationships to rendered items (directory objects: at most 20 each)."""
        for name, select in expands:
            for item, rec in zip(items, recs, strict=True):
                if name == "manager":
                    mid = rec.get("@emu.manager")
                    mgr = self.store.get("graph.users", str(mid)) if mid else None
                    if mgr is not None:
                        shape = _Shape(select, (), directory=True)
                        item["manager"] = {"@odata.type": "#microsoft.graph.user", **shape.render(mgr.data)}
                elif name == "members":
                    ids = list(rec.get("@emu.members", []))[:_EXPAND_LIMIT]
                    rows = self.store.query("graph.users", where="id IN (SELECT value FROM json_each(?))",
                                            params=(orjson.dumps(ids).decode(),), order_by=[("id", False)])
                    shape = _Shape(select, (), directory=True)
                    item["members"] = [{"@odata.type": "#microsoft.graph.user", **shape.render(r.data)} for r in rows]
                else:  # memberOf
                    rows = self.store.query("graph.groups", where=_MEMBER_OF, params=(str(rec.get("id")),),
                                            order_by=[("id", False)], limit=_EXPAND_LIMIT)
                    shape = _Shape(select, (), directory=True)
                    item["memberOf"] = [{"@odata.type": "#microsoft.graph.group", **shape.render(r.data)}
                                        for r in rows]

    def _find_user(self, key: str) -> Row | None:
        row = self.store.get("graph.users", key)
        if row is None and "@" in key:
            hits = self.store.query("graph.users", where=f"{Store.field('userPrincipalName')} = ?", params=(key,),
                                    limit=1)
            if not hits:
                hits = self.store.query("graph.users", where=f"{Store.field('userPrincipalName')} = ? COLLATE NOCASE",
                                        params=(key,), limit=1)
            row = hits[0] if hits else None
        return row

    def _mailbox(self, req: GraphRequest, claims: dict[str, Any], key: str, rest: list[str]) -> GraphResponse:
        """``/users/{id|upn}/messages|mailFolders|events|calendarView|contacts...``."""
        kinds = {"messages": "messages", "mailfolders": "messages", "events": "events",
                 "calendarview": "events", "contacts": "contacts"}
        what = rest[0].lower()
        if what not in kinds:
            raise _bad_segment(rest[0])
        self._require(claims, kinds[what])
        row = self._find_user(key)
        if row is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{key}' is invalid.")
        uid = row.id
        if "scp" in claims and uid != claims.get("oid"):
            # Delegated Mail.Read / Calendars.Read / Contacts.Read reach the signed-in user's own mailbox only.
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        tail = rest[1:]
        if what == "messages":
            return self._messages(req, uid, None, f"users('{uid}')/messages", f"users/{uid}/messages", tail)
        if what == "mailfolders":
            return self._folders(req, uid, tail)
        if what == "contacts":
            return self._simple(req, "contacts", uid, "contacts", tail)
        if what == "events":
            return self._simple(req, "events", uid, "events", tail)
        return self._calendar_view(req, uid, tail)

    def _messages(self, req: GraphRequest, uid: str, folder: str | None, context: str, link_path: str,
                  tail: list[str]) -> GraphResponse:
        res = GRAPH_RESOURCES["messages"]
        where = f"{_USER} = ?" + (f" AND {_FOLDER} = ?" if folder else "")
        params: tuple[Any, ...] = (uid, folder) if folder else (uid,)
        if tail == ["$count"]:
            return self._count_segment(req, "graph.messages", OUTLOOK, where, params)
        if len(tail) == 1 and tail[0].lower() in _DELTA_SEGMENTS:
            if folder is None:
                # Message delta is per folder (protocols.md §2.2).
                raise GraphError(400, "ErrorInvalidRequest",
                                 "Delta is supported on a mail folder's messages: use mailFolders/{id}/messages/delta.")
            return self._delta(req, _DeltaSpec(
                "messages", "graph.messages", res, f"users/{uid}/mailFolders/{folder}/messages/delta",
                ["messages", uid, folder], (where, params), "Collection(message)", "deleted",
                "#microsoft.graph.message"))
        if len(tail) == 1:
            return self._item(req, "messages", uid, tail[0], context)
        if tail:
            raise _bad_segment(tail[1])
        return self._list(req, _Listing("messages", "graph.messages", res, context, link_path, (where, params),
                                        default_order=(("receivedDateTime", True), ("id", True))))

    def _folders(self, req: GraphRequest, uid: str, tail: list[str]) -> GraphResponse:
        if not tail:
            folders = [self._folder_entity(uid, f) for f in _FOLDERS]
            return _ok({"@odata.context": f"{self.base}/$metadata#users('{uid}')/mailFolders", "value": folders})
        folder = self._resolve_folder(uid, tail[0])
        if len(tail) == 1:
            return _ok({"@odata.context": f"{self.base}/$metadata#users('{uid}')/mailFolders/$entity",
                        **self._folder_entity(uid, folder)})
        if tail[1] != "messages":
            raise _bad_segment(tail[1])
        return self._messages(req, uid, folder, f"users('{uid}')/mailFolders('{tail[0]}')/messages",
                              f"users/{uid}/mailFolders/{tail[0]}/messages", tail[2:])

    def _folder_id(self, uid: str, folder: str) -> str:
        # The synthetic company names folders with synth.folder_id (GUID user ids); other ids fall back
        # to whatever parentFolderId the mailbox's messages carry.
        try:
            return synth_folder_id(uid, folder)
        except ValueError:
            pass
        hits = self.store.query("graph.messages", where=f"{_USER} = ? AND {_FOLDER} = ?", params=(uid, folder),
                                limit=1)
        pid = hits[0].load().get("parentFolderId") if hits else None
        return str(pid) if pid else "AAMkAF" + base64.urlsafe_b64encode(f"{uid}/{folder}".encode()).decode().rstrip("=")

    def _folder_entity(self, uid: str, folder: str) -> dict[str, Any]:
        total, unread = self.store.aggregate(
            "graph.messages", f"count(*), coalesce(sum({json_path('isRead')} = 0), 0)",
            f"{_USER} = ? AND {_FOLDER} = ?", (uid, folder))
        return {"id": self._folder_id(uid, folder), "displayName": _FOLDERS[folder], "parentFolderId": None,
                "childFolderCount": 0, "unreadItemCount": unread, "totalItemCount": total, "isHidden": False}

    def _resolve_folder(self, uid: str, key: str) -> str:
        if key.lower() in _FOLDERS:
            return key.lower()
        hits = self.store.query("graph.messages", where=f"{_USER} = ? AND {json_path('parentFolderId')} = ?",
                                params=(uid, key), limit=1)
        if hits:
            return str(hits[0].load().get("@emu.folder"))
        for folder in _FOLDERS:
            if self._folder_id(uid, folder) == key:
                return folder
        raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")

    def _simple(self, req: GraphRequest, kind: str, uid: str, segment: str, tail: list[str]) -> GraphResponse:
        """``/users/{id}/events`` and ``/users/{id}/contacts`` (list, $count, one item)."""
        res = GRAPH_RESOURCES[kind]
        where, params = f"{_USER} = ?", (uid,)
        context = f"users('{uid}')/{segment}"
        if tail == ["$count"]:
            return self._count_segment(req, f"graph.{kind}", OUTLOOK, where, params)
        if len(tail) == 1:
            return self._item(req, kind, uid, tail[0], context)
        if tail:
            raise _bad_segment(tail[1])
        return self._list(req, _Listing(kind, f"graph.{kind}", res, context, f"users/{uid}/{segment}",
                                        (where, params), default_order=(("id", False),)))

    def _calendar_view(self, req: GraphRequest, uid: str, tail: list[str]) -> GraphResponse:
        res = GRAPH_RESOURCES["events"]
        if len(tail) == 1 and tail[0].lower() in _DELTA_SEGMENTS:
            return self._delta(req, _DeltaSpec(
                "events", "graph.events", res, f"users/{uid}/calendarView/delta", ["events", uid],
                (f"{_USER} = ?", (uid,)), "Collection(event)", "deleted", "#microsoft.graph.event"))
        if tail:
            raise _bad_segment(tail[0])
        listing = _Listing("events", "graph.events", res, f"users('{uid}')/calendarView",
                           f"users/{uid}/calendarView", (f"{_USER} = ?", (uid,)), default_order=(("id", False),),
                           window=True)
        return self._list(req, listing)

    @staticmethod
    def _window(query: Mapping[str, str]) -> tuple[str, str]:
        start, end = query.get("startDateTime"), query.get("endDateTime")
        if not start or not end:
            # The message Exchange gives for a calendarView without its window.
            raise GraphError(400, "ErrorInvalidParameter", "This request requires a time window specified by the "
                             "query string parameters StartDateTime and EndDateTime.")
        return _utc_window_value(start, "startDateTime"), _utc_window_value(end, "endDateTime")

    @staticmethod
    def _window_sql(window: tuple[str, str]) -> tuple[str, tuple[Any, ...]]:
        # An event is in the view when it overlaps [start, end); the records keep UTC wall times.
        return (f"substr({json_path('start/dateTime')}, 1, 19) < ? AND "
                f"substr({json_path('end/dateTime')}, 1, 19) > ?", (window[1], window[0]))

    @staticmethod
    def _in_window(rec: dict[str, Any], window: tuple[str, str]) -> bool:
        start = str(_value_at(rec, "start/dateTime") or "")[:19]
        end = str(_value_at(rec, "end/dateTime") or "")[:19]
        return start < window[1] and end > window[0]

    def _item(self, req: GraphRequest, kind: str, uid: str, item_id: str, context: str) -> GraphResponse:
        row = self.store.get(f"graph.{kind}", item_id)
        if row is None or row.load().get("@emu.user") != uid:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        res = GRAPH_RESOURCES[kind]
        select = parse_select(req.query.get("$select"), fields=res.fields, type_name=_TYPES[kind])
        shape = _Shape(select, (), directory=False, always=("id", "@odata.etag"))
        return _ok({"@odata.context": f"{self.base}/$metadata#{context}/$entity", **shape.render(row.data)})

    def _groups(self, req: GraphRequest, claims: dict[str, Any], rest: list[str]) -> GraphResponse:
        groups = GRAPH_RESOURCES["groups"]
        if not rest:
            self._require(claims, "groups")
            return self._list(req, _Listing("groups", "graph.groups", groups, "groups", "groups",
                                            default_order=(("id", False),)))
        if rest == ["$count"]:
            self._require(claims, "groups")
            return self._count_segment(req, "graph.groups", DIRECTORY, "", ())
        if len(rest) == 1 and rest[0].lower() in _DELTA_SEGMENTS:
            self._require(claims, "groups")
            return self._delta(req, _DeltaSpec("groups", "graph.groups", groups, "groups/delta", ["groups"],
                                               ("", ()), "groups", "changed", "#microsoft.graph.group"))
        gid = rest[0]
        self._require(claims, "members" if len(rest) > 1 else "groups")
        row = self.store.get("graph.groups", gid)
        if row is None:
            raise GraphError(404, "Request_ResourceNotFound", f"Resource '{gid}' does not exist or one of its "
                             "queried reference-property objects are not present.")
        if len(rest) == 1:
            _check_options(req, ("$select", "$expand"), "group")
            select = parse_select(req.query.get("$select"), fields=groups.fields, type_name=_TYPES["groups"])
            expands = self._parse_expand(req.query.get("$expand"), "groups")
            sel = f"({','.join(select)})" if select else ""
            shape = _Shape(select, (), directory=True)
            item = shape.render(row.data)
            self._apply_expand([item], [row.load()], expands)
            return _ok({"@odata.context": f"{self.base}/$metadata#groups{sel}/$entity", **item})
        if rest[1] != "members":
            raise _bad_segment(rest[1])
        tail = rest[2:]
        cast = None
        if tail and tail[0] in _CASTS:
            # Every member the emulator stores is a user: a cast to user keeps them all, to group none.
            cast, tail = _CASTS[tail[0]], tail[1:]
        members = orjson.dumps(row.load().get("@emu.members", []) if cast in (None, "user") else []).decode()
        where, params = "id IN (SELECT value FROM json_each(?))", (members,)
        if tail == ["$count"]:
            return self._count_segment(req, "graph.users", DIRECTORY, where, params)
        if tail:
            raise _bad_segment(tail[0])
        if cast == "group":
            return _ok({"@odata.context": f"{self.base}/$metadata#groups", "value": []})
        return self._list(req, _Listing("members", "graph.users", GRAPH_RESOURCES["users"],
                                        "users" if cast else "directoryObjects",
                                        f"groups/{gid}/members" + ("/microsoft.graph.user" if cast else ""),
                                        (where, params), default_order=(("id", False),),
                                        odata_type="" if cast else "#microsoft.graph.user"))

    # -- collections -------------------------------------------------------------------------------
    @staticmethod
    def _eventual(req: GraphRequest) -> bool:
        return req.header("ConsistencyLevel").strip().lower() == "eventual"

    def _count_segment(self, req: GraphRequest, coll: str, dialect: str, where: str,
                       params: tuple[Any, ...]) -> GraphResponse:
        """``…/$count``: a text/plain number; directory objects need ``ConsistencyLevel: eventual`` (§2.5)."""
        if dialect == DIRECTORY and not self._eventual(req):
            raise GraphError(400, "Request_BadRequest", "$count is not currently supported.")
        fields = GRAPH_RESOURCES[coll.split(".", 1)[1]].fields
        flt = req.query.get("$filter")
        if flt:
            f_sql, f_params = parse_filter(flt, fields=fields, dialect=dialect, advanced=True)
            where = f"({where}) AND {f_sql}" if where else f_sql
            params = (*params, *f_params)
        n = self.store.count(coll, where, params)
        return GraphResponse(200, str(n).encode(), {}, "text/plain;charset=utf-8")

    def _list(self, req: GraphRequest, lst: _Listing) -> GraphResponse:
        """One page of a collection: $filter, $select, $orderby, $top, $count, $search, $skiptoken."""
        res = lst.res
        type_name = _TYPES[{"members": "users", "memberOf": "groups"}.get(lst.kind, lst.kind)]
        token = req.query.get("$skiptoken")
        cursor: list[Any] | None = None
        if token is not None:
            state = self._codec().decode(token)
            if state is None or state.get("k") != "page" or state.get("p") != lst.link_path:
                raise GraphError(400, "Request_BadRequest" if lst.dialect == DIRECTORY else "BadRequest",
                                 "The $skiptoken is invalid or does not belong to this request.")
            opts: dict[str, str] = state["q"]
            cursor = state["a"]
            eventual = bool(state.get("ev"))
            skip = 0
        else:
            window_keys = ("startDateTime", "endDateTime") if lst.window else ()
            opts = {k: v for k, v in req.query.items() if k.startswith("$") or k in window_keys}
            eventual = self._eventual(req)
            skip = self._skip(opts, lst.dialect)
        expandable = lst.kind in ("users", "groups")
        unsupported = set(opts) - {"$top", "$select", "$filter", "$orderby", "$count", "$search", "$skip",
                                   "startDateTime", "endDateTime", *(("$expand",) if expandable else ())}
        if unsupported:
            raise GraphError(400, "Request_BadRequest" if lst.dialect == DIRECTORY else "BadRequest",
                             f"The query option '{sorted(unsupported)[0]}' is not supported by the emulator "
                             "on this resource.")
        count = opts.get("$count", "").lower() == "true"
        directory = lst.dialect == DIRECTORY
        if directory and count and not eventual:
            raise GraphError(400, "Request_BadRequest", "$count is not currently supported.")
        advanced = directory and eventual and count
        top = parse_top(opts.get("$top"), default=res.default_top, maximum=res.max_top, dialect=lst.dialect)
        select = parse_select(opts.get("$select"), fields=res.fields, type_name=type_name)

        where, params = lst.scope[0], list(lst.scope[1])
        conds = [where] if where else []
        if lst.window:
            w_sql, w_params = self._window_sql(self._window(opts))
            conds.append(w_sql)
            params += w_params
        flt = opts.get("$filter")
        if flt:
            f_sql, f_params = parse_filter(flt, fields=res.fields, dialect=lst.dialect, advanced=advanced,
                                           type_name=type_name)
            conds.append(f_sql)
            params += f_params
        search = opts.get("$search")
        if search:
            s_sql, s_params = self._search(search, lst, eventual)
            conds.append(s_sql)
            params += s_params
        base_where = " AND ".join(f"({c})" for c in conds)
        base_params = list(params)

        orderable_key = {"members": "users", "memberOf": "groups"}.get(lst.kind, lst.kind)
        allowed = _ORDERABLE.get(orderable_key + "+" if advanced else orderable_key, ())
        orders = parse_orderby(opts.get("$orderby"), allowed=allowed, dialect=lst.dialect, type_name=type_name)
        if orders and flt and directory and not advanced:
            # $filter with $orderby is an advanced query on directory objects (protocols.md §2.5).
            raise GraphError(400, "Request_UnsupportedQuery", "Sorting and filtering together require "
                             "ConsistencyLevel: eventual and $count=true.")
        keys: list[tuple[str, bool]]
        paths: list[str]
        if orders:
            keys = [(o.sql, o.desc) for o in orders] + [("id", False)]
            paths = [o.prop for o in orders]
        else:
            keys = [(("id" if p == "id" else Order(p, d).sql), d) for p, d in lst.default_order]
            paths = [p for p, _ in lst.default_order if p != "id"]
        if cursor is not None:
            k_sql, k_params = _keyset(keys, cursor)
            conds.append(k_sql)
            params += k_params
        where_all = " AND ".join(f"({c})" for c in conds)

        rows = self.store.query(lst.coll, where=where_all, params=params, order_by=keys, limit=top + 1 + skip)
        rows = rows[skip:]
        more = len(rows) > top
        rows = rows[:top]
        directory_shape = lst.kind in ("users", "groups", "members", "memberOf")
        default = res.default_select if lst.kind in ("users", "members") else ()
        shape = _Shape(select, default, directory=directory_shape,
                       always=() if directory_shape else ("id", "@odata.etag"))
        render = shape.render
        items = [render(r.data) for r in rows]
        if expandable and opts.get("$expand"):
            self._apply_expand(items, [r.load() for r in rows], self._parse_expand(opts["$expand"], lst.kind))
        if lst.odata_type:
            items = [{"@odata.type": lst.odata_type, **it} for it in items]

        sel = f"({','.join(select)})" if select and directory_shape else ""
        payload: dict[str, Any] = {"@odata.context": f"{self.base}/$metadata#{lst.context}{sel}"}
        if count and cursor is None:
            payload["@odata.count"] = self.store.count(lst.coll, base_where, base_params)
        if more:
            last = rows[-1].load()
            after = [_sort_value(last, p) for p in paths] + [rows[-1].id]
            tok = self._codec().encode({"k": "page", "p": lst.link_path, "q": opts, "a": after, "ev": eventual})
            payload["@odata.nextLink"] = f"{self.base}/{lst.link_path}?$skiptoken={tok}"
        payload["value"] = items
        return _ok(payload)

    @staticmethod
    def _skip(opts: Mapping[str, str], dialect: str) -> int:
        raw = opts.get("$skip")
        if raw is None:
            return 0
        if dialect == DIRECTORY:
            # /users and /groups page only by $skiptoken (protocols.md §2.1).
            raise GraphError(400, "Request_BadRequest", "'$skip' is not supported by the service.")
        try:
            skip = int(raw)
        except ValueError:
            raise GraphError(400, "BadRequest", f"Invalid value '{raw}' for query option '$skip'.") from None
        if skip < 0:
            raise GraphError(400, "BadRequest", f"Invalid value '{raw}' for query option '$skip'.")
        return skip

    def _search(self, raw: str, lst: _Listing, eventual: bool) -> tuple[str, list[Any]]:
        """``$search``: ``"prop:words"`` clauses (directory, needs ConsistencyLevel) or free words (Outlook)."""
        if lst.dialect == DIRECTORY and not eventual:
            raise GraphError(400, "Request_UnsupportedQuery", "Request with $search query parameter only works "
                             "through MSGraph with a special request header: 'ConsistencyLevel: eventual'")
        text = raw.strip()
        if len(text) < 2 or text[0] != '"' or text[-1] != '"':
            raise GraphError(400, "Request_UnsupportedQuery" if lst.dialect == DIRECTORY else "BadRequest",
                             "Syntax error: the $search value must be enclosed in double quotes.")
        sql: list[str] = []
        params: list[Any] = []
        joiner = " AND "
        for clause in re.split(r'"\s+(AND|OR)\s+"', text[1:-1]):
            if clause in ("AND", "OR"):
                joiner = f" {clause} "
                continue
            prop, sep, words = clause.partition(":")
            props = [prop] if sep else (["displayName", "mail", "userPrincipalName"] if lst.dialect == DIRECTORY
                                        else ["subject", "bodyPreview"])
            term = words if sep else clause
            if sep and lst.res.fields and prop not in lst.res.fields:
                raise GraphError(400, "Request_UnsupportedQuery", f"Search on property '{prop}' is not supported.")
            escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql.append("(" + " OR ".join(f"{json_path(p)} LIKE ? ESCAPE '\\'" for p in props) + ")")
            params += ["%" + escaped + "%"] * len(props)
        return "(" + joiner.join(sql) + ")", params

    # -- tokens ------------------------------------------------------------------------------------
    def _codec(self) -> TokenCodec:
        # The key lives in store meta, so a data reset (which clears meta) invalidates every old token,
        # as a tenant rebuilt from scratch would; read each time because a reset can happen at any moment.
        key = self.store.get_meta("graph.token_key")
        if not key:
            with self.store.write() as conn:
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('graph.token_key', ?)",
                             (orjson.dumps(secrets.token_hex(32)).decode(),))
            key = self.store.get_meta("graph.token_key")
        return TokenCodec(bytes.fromhex(str(key)))

    # -- delta -------------------------------------------------------------------------------------
    def _page_size(self, req: GraphRequest, spec: _DeltaSpec, fallback: int | None) -> tuple[int, dict[str, str]]:
        m = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", req.header("Prefer"))
        if m:
            # A directory delta page holds at most 200 objects whatever is asked (protocols.md §2.2).
            cap = min(spec.res.max_top, _DIRECTORY_DELTA_MAX) if spec.kind in ("users", "groups") else spec.res.max_top
            size = max(1, min(int(m.group(1)), cap))
            return size, {"Preference-Applied": f"odata.maxpagesize={size}"}
        return fallback or spec.res.default_top, {}

    def _delta_options(self, req: GraphRequest, spec: _DeltaSpec) -> dict[str, Any]:
        """Validate a first delta call's query options; the result is what the tokens carry."""
        q = {k: v for k, v in req.query.items() if k.startswith("$") and k != "$deltatoken"}
        directory = spec.kind in ("users", "groups")
        state: dict[str, Any] = {"s": None, "ids": None, "w": None, "ps": None, "m": False}
        allowed = {"users": {"$select", "$filter"}, "groups": {"$select", "$filter"},
                   "messages": {"$select", "$filter", "$orderby", "$top"}, "events": set()}[spec.kind]
        bad = sorted(set(q) - allowed)
        if bad:
            # user/group delta: no $expand/$top/$orderby; calendarView delta: no $select/$filter/... (§2.2)
            raise GraphError(400, "Request_UnsupportedQuery" if directory else "ErrorInvalidUrlQuery",
                             f"The query option '{bad[0]}' is not supported with delta queries on this resource.")
        type_name = _TYPES[spec.kind]
        select = parse_select(q.get("$select"), fields=spec.res.fields, type_name=type_name,
                              extra=("members",) if spec.kind == "groups" else ())
        state["s"] = list(select) if select else None
        if spec.kind == "groups":
            state["m"] = select is None or "members" in select
        flt = q.get("$filter")
        if flt and directory:
            ids = re.findall(r"id\s+eq\s+'([^']*)'", flt)
            rebuilt = " or ".join(f"id eq '{i}'" for i in ids)
            if not ids or len(ids) > 50 or re.sub(r"\s+", " ", flt.strip()) != rebuilt:
                raise GraphError(400, "Request_UnsupportedQuery", "Delta queries support only $filter=id eq "
                                 "'{id}' clauses joined with 'or' (at most 50).")
            state["ids"] = ids
        elif flt:
            if not re.fullmatch(r"\s*receivedDateTime\s+(ge|gt)\s+\S+\s*", flt):
                raise GraphError(400, "ErrorInvalidUrlQueryFilter",
                                 "Message delta supports only $filter=receivedDateTime ge|gt {value}.")
            state["f"] = flt
        if spec.kind == "messages":
            if q.get("$orderby") and re.sub(r"\s+", " ", q["$orderby"].strip()) != "receivedDateTime desc":
                raise GraphError(400, "ErrorInvalidUrlQuery", "Message delta supports only $orderby=receivedDateTime desc.")
            if q.get("$top"):
                state["ps"] = parse_top(q["$top"], default=spec.res.default_top, maximum=spec.res.max_top,
                                        dialect=OUTLOOK)
        if spec.kind == "events":
            state["w"] = list(self._window(req.query))
        return state

    def _delta(self, req: GraphRequest, spec: _DeltaSpec) -> GraphResponse:
        """A delta page: initial round, change round, or ``$deltatoken=latest`` (protocols.md §2.2)."""
        codec = self._codec()
        dtoken = req.query.get("$deltatoken")
        stoken = req.query.get("$skiptoken")
        if stoken is not None:
            state = codec.decode(stoken)
            if state is None or state.get("k") != "dpage" or state.get("sc") != spec.scope_key:
                raise self._expired(spec, "The $skiptoken is not valid for this delta query.")
        elif dtoken:
            if dtoken == "latest":
                state = self._delta_options(req, spec)
                state.update(k="dpage", sc=spec.scope_key)
                version = self._round_start(bool(state.get("m")))
                return self._delta_link_page(req, spec, state, version, [], initial=True)
            state = codec.decode(dtoken)
            if state is None or state.get("k") != "delta" or state.get("sc") != spec.scope_key:
                raise self._expired(spec)
            if self.ctx.faults.force_delta_expiry:
                raise self._resync(spec, state)
            if time.time() - float(state.get("t", 0)) > self.ctx.settings.delta_token_max_age_s:
                raise self._expired(spec)
            if state.get("m") and self.store.get_meta(f"{_MEMBERS_SNAPSHOT}{state['v']}") is None:
                raise self._expired(spec)
            state.update(k="dpage", a=None, hi=None)
        else:
            state = self._delta_options(req, spec)
            state.update(k="dpage", sc=spec.scope_key, v=None, a=None, hi=None)
        ps, pref = self._page_size(req, spec, state.get("ps"))
        if state.get("hi") is None:
            # Start of a round: fix the upper version so changes committed while the client pages land in
            # the next round, exactly once.
            state["hi"] = self._round_start(bool(state.get("m")))
        if state.get("v") is None:
            return self._delta_initial(req, spec, state, ps, pref)
        return self._delta_changes(req, spec, state, ps, pref)

    def _delta_where(self, spec: _DeltaSpec, state: dict[str, Any]) -> tuple[str, list[Any]]:
        conds = [spec.scope[0]] if spec.scope[0] else []
        params: list[Any] = list(spec.scope[1])
        if state.get("ids"):
            conds.append("id IN (SELECT value FROM json_each(?))")
            params.append(orjson.dumps(state["ids"]).decode())
        if state.get("f"):
            f_sql, f_params = parse_filter(state["f"], fields=spec.res.fields, dialect=OUTLOOK)
            conds.append(f_sql)
            params += f_params
        return " AND ".join(f"({c})" for c in conds), params

    def _delta_shape(self, spec: _DeltaSpec, state: dict[str, Any]) -> _Shape:
        select = tuple(s for s in (state.get("s") or ()) if s != "members") or None
        if select is not None and "id" not in select:
            select = (*select, "id")
        if spec.kind == "users":
            return _Shape(select, spec.res.default_select, directory=True)
        if spec.kind == "groups":
            return _Shape(select, (), directory=True)
        return _Shape(select, (), directory=False, always=("id", "@odata.etag"))

    def _delta_initial(self, req: GraphRequest, spec: _DeltaSpec, state: dict[str, Any], ps: int,
                       pref: dict[str, str]) -> GraphResponse:
        where, params = self._delta_where(spec, state)
        conds = [where] if where else []
        if state.get("w"):
            w_sql, w_params = self._window_sql((state["w"][0], state["w"][1]))
            conds.append(w_sql)
            params += w_params
        if state.get("a"):
            conds.append("id > ?")
            params.append(state["a"])
        rows = self.store.query(spec.coll, where=" AND ".join(f"({c})" for c in conds), params=params,
                                order_by=[("id", False)], limit=ps + 1)
        more = len(rows) > ps
        rows = rows[:ps]
        shape = self._delta_shape(spec, state)
        items: list[dict[str, Any]] = []
        for r in rows:
            item = shape.render(r.data)
            if state.get("m"):
                members = r.load().get("@emu.members", [])
                item["members@delta"] = [{"@odata.type": "#microsoft.graph.user", "id": m} for m in members]
            items.append(item)
        if more:
            state["a"] = rows[-1].id
            return self._next_page(req, spec, state, items, pref, initial=True)
        return self._delta_link_page(req, spec, state, int(state["hi"]), items, pref, initial=True)

    def _delta_changes(self, req: GraphRequest, spec: _DeltaSpec, state: dict[str, Any], ps: int,
                       pref: dict[str, str]) -> GraphResponse:
        where, params = self._delta_where(spec, state)
        after = tuple(state["a"]) if state.get("a") else None
        changes = self.store.changes_since(spec.coll, int(state["v"]), upto=int(state["hi"]), after=after,
                                           limit=ps + 1, where=where, params=params)
        more = len(changes) > ps
        changes = changes[:ps]
        shape = self._delta_shape(spec, state)
        before: dict[str, list[str]] = {}
        if state.get("m"):
            before = self.store.get_meta(f"{_MEMBERS_SNAPSHOT}{state['v']}", {}).get("m", {})
        window = (state["w"][0], state["w"][1]) if state.get("w") else None
        items: list[dict[str, Any]] = []
        for ch in changes:
            removed = {"@odata.type": spec.odata_type, "id": ch.id, "@removed": {"reason": spec.reason}}
            if ch.row is None:
                items.append(removed)
                continue
            if window is not None and not self._in_window(ch.row.load(), window):
                # Events that changed outside the window are reported as removed (protocols.md §2.2).
                items.append(removed)
                continue
            item = shape.render(ch.row.data)
            if state.get("m"):
                now = ch.row.load().get("@emu.members", [])
                was = before.get(ch.id, [])
                delta = [{"@odata.type": "#microsoft.graph.user", "id": m} for m in now if m not in set(was)]
                gone = set(now)
                delta += [{"@odata.type": "#microsoft.graph.user", "id": m, "@removed": {"reason": "deleted"}}
                          for m in was if m not in gone]
                if delta:
                    item["members@delta"] = delta
            items.append(item)
        if more:
            state["a"] = [changes[-1].version, changes[-1].id]
            return self._next_page(req, spec, state, items, pref, initial=False)
        return self._delta_link_page(req, spec, state, int(state["hi"]), items, pref, initial=False)

    def _delta_context(self, spec: _DeltaSpec, state: dict[str, Any], initial: bool) -> str:
        sel = ""
        if initial and spec.kind in ("users", "groups") and state.get("s"):
            sel = f"({','.join(state['s'])})"
        return f"{self.base}/$metadata#{spec.context}{sel}"

    def _next_page(self, req: GraphRequest, spec: _DeltaSpec, state: dict[str, Any], items: list[dict[str, Any]],
                   pref: dict[str, str], *, initial: bool) -> GraphResponse:
        tok = self._codec().encode(state)
        return _ok({"@odata.context": self._delta_context(spec, state, initial),
                    "@odata.nextLink": f"{self.base}/{spec.link_path}?$skiptoken={tok}", "value": items}, pref)

    def _delta_link_page(self, req: GraphRequest, spec: _DeltaSpec, state: dict[str, Any], version: int,
                         items: list[dict[str, Any]], pref: dict[str, str] | None = None, *,
                         initial: bool) -> GraphResponse:
        link_state = {k: state[k] for k in ("sc", "s", "ids", "w", "ps", "m", "f") if state.get(k)}
        link_state.update(k="delta", v=version, t=time.time())
        tok = self._codec().encode(link_state)
        return _ok({"@odata.context": self._delta_context(spec, state, initial),
                    "@odata.deltaLink": f"{self.base}/{spec.link_path}?$deltatoken={tok}", "value": items}, pref)

    def _expired(self, spec: _DeltaSpec, message: str = "") -> GraphError:
        # Directory tokens expire after 7 days with 400 syncStateNotFound (protocols.md §2.2).
        return GraphError(400, "syncStateNotFound", message or "The sync state generation is not found. The delta "
                          "token is expired and data must be synchronized again.")

    def _resync(self, spec: _DeltaSpec, state: dict[str, Any]) -> GraphError:
        """410 Gone with the initial delta URL (and an empty $deltatoken) in Location (protocols.md §2.2)."""
        query: list[str] = []
        if state.get("s"):
            query.append("$select=" + ",".join(state["s"]))
        if state.get("ids"):
            query.append("$filter=" + " or ".join(f"id eq '{i}'" for i in state["ids"]))
        if state.get("f"):
            query.append("$filter=" + str(state["f"]))
        if state.get("w"):
            query += [f"startDateTime={state['w'][0]}Z", f"endDateTime={state['w'][1]}Z"]
        query.append("$deltatoken=")
        location = f"{self.base}/{spec.link_path}?" + "&".join(query)
        return GraphError(410, "resyncRequired", "The delta token is no longer valid, and the app must reset the "
                          "sync state.", {"Location": location})

    def _round_start(self, members: bool) -> int:
        """The store version a round runs up to; with ``members``, also remember every group's members then.

        Version and members are read in one snapshot: the next round reports member changes as the
        difference from exactly this state (protocols.md §2.2, ``members@delta``).
        """
        with self.store.read() as conn:
            version = self.store.current_version(conn)
            rows = self.store.query("graph.groups", conn=conn) if members else []
        key = f"{_MEMBERS_SNAPSHOT}{version}"
        if not members or self.store.get_meta(key) is not None:
            return version
        snapshot = {r.id: r.load().get("@emu.members", []) for r in rows}
        now = time.time()
        horizon = now - self.ctx.settings.delta_token_max_age_s
        with self.store.write() as conn:
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                         (key, orjson.dumps({"t": now, "m": snapshot}).decode()))
            # Snapshots older than the token lifetime can no longer be asked for.
            conn.execute("DELETE FROM meta WHERE k LIKE ? AND CAST(json_extract(v, '$.t') AS REAL) < ?",
                         (_MEMBERS_SNAPSHOT + "%", horizon))
        return version

    # -- $batch ------------------------------------------------------------------------------------
    def _batch(self, req: GraphRequest, claims: dict[str, Any]) -> GraphResponse:
        """JSON batching: ≤ 20 items, dependsOn ordering, 424 for dependents of failures (protocols.md §2.3)."""
        if req.method != "POST":
            raise GraphError(405, "BadRequest", "$batch accepts only POST.")
        try:
            body = orjson.loads(req.body or b"null")
        except orjson.JSONDecodeError:
            raise GraphError(400, "BadRequest", "Invalid batch payload format: the body is not JSON.") from None
        items = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise GraphError(400, "BadRequest", "Invalid batch payload format: 'requests' must be a non-empty array.")
        if len(items) > MAX_BATCH:
            raise GraphError(400, "BadRequest",
                             f"The batch contains {len(items)} requests; the limit is {MAX_BATCH}.")
        by_id: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        for item in items:
            if not isinstance(item, dict) or not item.get("id") or not item.get("method") or not item.get("url"):
                raise GraphError(400, "BadRequest", "Invalid batch payload format: every request needs id, method "
                                 "and url.")
            rid = str(item["id"]).lower()  # ids compare case-insensitively (§2.3)
            if rid in by_id:
                raise GraphError(400, "BadRequest", f"Batch request ids must be unique; '{item['id']}' repeats.")
            if item.get("body") is not None and not isinstance(item.get("headers"), dict):
                raise GraphError(400, "BadRequest", f"Request '{item['id']}' has a body but no headers.")
            by_id[rid] = item
            order.append(rid)
        deps: dict[str, list[str]] = {}
        for rid in order:
            raw = by_id[rid].get("dependsOn") or []
            if not isinstance(raw, list):
                raise GraphError(400, "BadRequest", "dependsOn must be an array of request ids.")
            deps[rid] = [str(d).lower() for d in raw]
            for d in deps[rid]:
                if d not in by_id or d == rid:
                    raise GraphError(400, "BadRequest", f"Request '{by_id[rid]['id']}' depends on unknown request '{d}'.")
        done: dict[str, int] = {}
        responses: list[dict[str, Any]] = []
        pending = list(order)
        while pending:
            ready = [rid for rid in pending if all(d in done for d in deps[rid])]
            if not ready:
                raise GraphError(400, "BadRequest", "The dependsOn graph of the batch has a cycle.")
            for rid in ready:
                pending.remove(rid)
                item = by_id[rid]
                if any(not 200 <= done[d] < 300 for d in deps[rid]):
                    sub = GraphResponse(424, _error_body(req, "FailedDependency",
                                                         "The request depends on a request that failed."))
                else:
                    sub = self._batch_item(req, claims, item)
                done[rid] = sub.status
                headers = {"Content-Type": sub.media_type, **sub.headers}
                entry: dict[str, Any] = {"id": str(item["id"]), "status": sub.status, "headers": headers}
                if sub.body:
                    entry["body"] = sub.json_body()
                responses.append(entry)
        return _ok({"responses": responses})

    def _batch_item(self, outer: GraphRequest, claims: dict[str, Any], item: dict[str, Any]) -> GraphResponse:
        url = str(item["url"])
        headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        # The outer request's credentials authenticate every item (§2.3).
        headers["authorization"] = outer.headers.get("authorization", "")
        sub = GraphRequest(str(item["method"]).upper(), "", {}, headers,
                           orjson.dumps(item["body"]) if item.get("body") is not None else b"")
        if urlsplit(url).scheme:
            return GraphResponse(400, _error_body(sub, "BadRequest", "Batch request URLs must be relative to the "
                                                  "version root, e.g. '/users'."))
        parts = urlsplit(url)
        path = parts.path.strip("/")
        if path.lower().startswith("v1.0/"):
            path = path[5:]
        sub.path = path
        sub.query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if path == "$batch":
            return GraphResponse(400, _error_body(sub, "BadRequest", "A batch cannot contain another batch."))
        if self.item_fault is None:
            return self.handle(sub)
        faulted = self.item_fault(sub, claims)
        if faulted is not None:
            return faulted
        try:
            return self.handle(sub)
        finally:
            self.item_fault.done(sub, claims)


# -- HTTP adapter -----------------------------------------------------------------------------------------

class _ItemThrottle:
    """Throttling for each ``$batch`` item (protocols.md §2.3: items are throttled one by one).

    The fault middleware sees a batch as one request; this applies the same two rules to every item:
    injected throttles (``ctx.faults.throttle_rate``) and the per-app request window and per-mailbox
    concurrency the middleware keeps in ``ctx.limiter`` (under its lock, from the worker thread).
    """

    def __init__(self, ctx: EmulatorContext) -> None:
        self.ctx = ctx
        self._rng = random.Random()  # noqa: S311 - fault dice, not secrets
        self._seed: int | None = None
        self._dice = threading.Lock()

    def __call__(self, sub: GraphRequest, claims: dict[str, Any]) -> GraphResponse | None:
        f = self.ctx.faults
        if "graph" in f.services and f.throttle_rate:
            with self._dice:
                if f.seed != self._seed:
                    self._rng, self._seed = random.Random(f.seed), f.seed  # noqa: S311
                roll = self._rng.random()
            if roll < f.throttle_rate:
                return self._too_many(sub, f.retry_after_s)
        limiter = getattr(self.ctx, "limiter", None)
        if limiter is None:
            return None
        app = str(claims.get("azp") or claims.get("appid"))
        # The batch itself was admitted by the middleware; each item counts as one request too, against the
        # app's window or, for an Outlook item, against its mailbox (4 at once, other batches and direct calls
        # included: Graph runs at most 4 items of a batch against one mailbox at a time).
        with limiter.lock:
            wait = limiter.admit_graph(app, self._mailbox(sub, claims), self.ctx.settings)
        if wait is not None:
            return self._too_many(sub, max(1, math.ceil(wait)))
        return None

    def done(self, sub: GraphRequest, claims: dict[str, Any]) -> None:
        """Release the mailbox slot an admitted item held."""
        limiter = getattr(self.ctx, "limiter", None)
        box = self._mailbox(sub, claims)
        if limiter is not None and box is not None:
            limiter.release_mailbox(box)

    def _mailbox(self, sub: GraphRequest, claims: dict[str, Any]) -> tuple[str, str] | None:
        m = _MAILBOX.match("/graph/v1.0/" + sub.path.strip("/"))
        return (str(claims.get("azp") or claims.get("appid")), m.group(1).lower()) if m else None

    @staticmethod
    def _too_many(sub: GraphRequest, retry_after: int) -> GraphResponse:
        body = graph_error_body("TooManyRequests", "Please retry again later.", status=429,
                                client_request_id=sub.client_request_id)
        return GraphResponse(429, body, {"Retry-After": str(retry_after)})


def routes(ctx: EmulatorContext) -> list[BaseRoute]:
    """The Graph v1.0 routes, to be mounted at ``/graph/v1.0``."""
    service = GraphService(ctx)
    service.item_fault = _ItemThrottle(ctx)

    async def endpoint(request: Request) -> Response:
        body = await request.body() if request.method in ("POST", "PATCH", "PUT") else b""
        headers = {k.lower(): v for k, v in request.headers.items()}
        req = GraphRequest(request.method, request.path_params.get("path", ""), dict(request.query_params),
                           headers, body)
        resp = await run_in_threadpool(ctx.serve, service.handle, req)
        out_headers = {"request-id": req.request_id, "client-request-id": req.client_request_id,
                       "OData-Version": "4.0", "Cache-Control": "no-store", **resp.headers}
        return Response(resp.body, status_code=resp.status, headers=out_headers, media_type=resp.media_type)

    return [Route("/{path:path}", endpoint, methods=["GET", "POST", "PATCH", "PUT", "DELETE"])]
