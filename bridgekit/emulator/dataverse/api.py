"""The emulator's Dataverse Web API v9.2: authentication, routing, writes, functions and ``$batch``.

The app mounts :func:`routes` at ``/org/api/data/v9.2``. Reads live in :mod:`.query`, writes in
:mod:`.write`, metadata in :mod:`.metadata`, multipart parsing in :mod:`.batch`; this module
turns HTTP requests into calls on them and every failure into Dataverse's error shape
``{"error": {"code": "0x...", "message": "..."}}`` (protocols.md §1.9).

Example:
    >>> from starlette.applications import Starlette                  # doctest: +SKIP
    >>> from starlette.routing import Mount                           # doctest: +SKIP
    >>> app = Starlette(routes=[Mount("/org/api/data/v9.2", routes=routes(ctx))])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bridgekit.emulator import schema
from bridgekit.emulator.context import DATAVERSE_ROLE, EmulatorContext, RoleMissing, TokenRejected
from bridgekit.emulator.dataverse.batch import BatchRequest, ChangeSet, PartResult, format_batch, parse_batch
from bridgekit.emulator.dataverse.common import (
    CRM,
    DvError,
    Prefer,
    Reply,
    annotation_filter,
    error_body,
    json_reply,
    nav_props,
    parse_prefer,
)
from bridgekit.emulator.dataverse.fetchxml import bulk_query, run_fetchxml
from bridgekit.emulator.dataverse.metadata import MetadataService, collection_navs
from bridgekit.emulator.dataverse.query import (
    QueryOptions,
    ReadContext,
    Reader,
    Scope,
    parse_options,
    split_top,
)
from bridgekit.emulator.dataverse.write import Caller, Writer, not_found, parse_key, payload_error
from bridgekit.emulator.schema import Table

__all__ = ["API_PATH", "DataverseService", "routes"]

log = logging.getLogger("bridgekit.emulator.dataverse.api")

#: Path of the Web API under the organisation URL.
API_PATH = "/api/data/v9.2"
_METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE"]
_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(?:\((.*)\))?", re.S)
_ETAG = re.compile(r'^W/"(\d+)"$')
_NS = uuid.UUID("9d1c2f55-8a3e-4b7d-b0c6-51e2f3a4d8c7")


@dataclass
class DvRequest:
    """One Web API request, from HTTP or from a ``$batch`` part."""

    method: str
    path: str  # decoded, after the service root, no leading slash
    query: list[tuple[str, str]]
    headers: Mapping[str, str]  # lower-case names
    prefer: Prefer
    body: bytes
    root: str  # service root URL as the caller addressed it
    claims: Mapping[str, Any] = field(default_factory=dict)
    content_ids: dict[str, str] = field(default_factory=dict)
    # The systemuser behind the token, resolved once per HTTP request (a batch's parts share it).
    caller: Caller | None = None


def split_path(path: str) -> list[str]:
    """Split a resource path on ``/`` outside quotes and parentheses (keys may contain slashes)."""
    if "/" not in path:  # the common case, e.g. accounts(accountnumber='A-1')
        segment = path.strip()
        return [segment] if segment else []
    return split_top(path, "/")


def _json_body(table: Table, body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise payload_error(table.logical_name, f"Invalid JSON. {exc}") from None
    if not isinstance(data, dict):
        raise payload_error(table.logical_name, "The request body must be a JSON object.")
    return data


def _expect_version(if_match: str | None) -> int | None:
    """The row version an ``If-Match`` demands (None for absent or ``*``); -1 when it cannot match."""
    if not if_match or if_match.strip() == "*":
        return None
    m = _ETAG.match(if_match.strip())
    return int(m.group(1)) if m else -1


class DataverseService:
    """The Dataverse Web API over the emulator's store.

    Args:
        ctx: The emulator context (store, token validation, settings, faults, URLs).
        tables: Tables to serve (default: :data:`bridgekit.emulator.schema.TABLES`).
    """

    def __init__(self, ctx: EmulatorContext, tables: Mapping[str, Table] | None = None) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.tables: Mapping[str, Table] = tables if tables is not None else schema.TABLES
        self.by_set = {t.entity_set: t for t in self.tables.values()}
        for t in self.tables.values():
            self.store.ensure_collection(t.logical_name)
        self.reader = Reader(self.store, self.tables)
        self.writer = Writer(self.store, self.tables)
        self.metadata = MetadataService(self.tables)
        self._callers: dict[str, Caller] = {}

    # -- HTTP ----------------------------------------------------------------------------------------
    async def endpoint(self, request: Request) -> Response:
        """The Starlette endpoint for every path under the service root."""
        body = await request.body()
        root = self.ctx.host_url_for(request.headers.get("host")) + "/org" + API_PATH
        headers = {k.lower(): v for k, v in request.headers.items()}
        req = DvRequest(method=request.method, path=request.path_params.get("path", ""),
                        query=parse_qsl(request.url.query, keep_blank_values=True), headers=headers,
                        prefer=Prefer(), body=body, root=root)
        prefer_values = request.headers.getlist("prefer")
        reply = await run_in_threadpool(self.ctx.serve, self.handle, req, request.headers.get("authorization"),
                                        prefer_values)
        out_headers = {"OData-Version": "4.0", "REQ_ID": str(uuid.uuid4()), **reply.headers}
        return Response(reply.body if reply.status not in (204, 304) else b"", status_code=reply.status,
                        headers=out_headers, media_type=reply.content_type if reply.body else None)

    def handle(self, req: DvRequest, authorization: str | None, prefer_values: Sequence[str]) -> Reply:
        """Authenticate, then serve one request; every failure becomes a Dataverse error reply."""
        detailed = False
        try:
            req.prefer = parse_prefer(list(prefer_values))
            detailed = bool((w := annotation_filter(req.prefer.annotations)) and
                            w("Microsoft.PowerApps.CDS.ErrorDetails.OperationStatus"))
            req.claims = self.authenticate(authorization)
            return self.dispatch(req)
        except DvError as err:
            return Reply(err.status, error_body(err, detailed=detailed), err.headers)
        except Exception:
            log.exception("unexpected error serving %s %s", req.method, req.path.split("(")[0])
            return Reply(500, error_body(DvError(500, "0x80040216", "An unexpected error occurred.")))

    def authenticate(self, authorization: str | None) -> dict[str, Any]:
        """Validate the bearer token (aud = the organisation URL) and the Dataverse role."""
        try:
            claims = self.ctx.verify_token(authorization, "dataverse")
        except TokenRejected as exc:
            # §1.10: 401 plus the WWW-Authenticate challenge clients use to discover the tenant.
            challenge = (f"Bearer authorization_uri={self.ctx.base_url}/{self.ctx.tenant_id}/oauth2/authorize, "
                         f"resource_id={self.ctx.dataverse_url}/")
            raise DvError(401, "0x8005F101", f"The requested resource requires authentication. ({exc.reason})",
                          headers={"WWW-Authenticate": challenge}) from None
        try:
            self.ctx.require_role(claims, DATAVERSE_ROLE)
        except RoleMissing:
            raise DvError(403, "0x80072560", "The user is not a member of the organization.") from None
        return claims

    # -- routing -------------------------------------------------------------------------------------
    def dispatch(self, req: DvRequest) -> Reply:
        """Route an authenticated request."""
        segs = split_path(req.path)
        method = req.method
        if not segs:
            self._only(method, "GET")
            return self.metadata.service_document(req.root)
        first = segs[0]
        if first == "$metadata":
            self._only(method, "GET")
            return self.metadata.csdl(annotations=dict(req.query).get("annotations") == "true")
        if first == "$batch":
            self._only(method, "POST")
            return self.batch(req)
        if first in ("WhoAmI", "WhoAmI()"):
            self._only(method, "GET")
            return self.who_am_i(req)
        if first.startswith("RetrieveTotalRecordCount"):
            self._only(method, "GET")
            return self.total_record_count(req, first)
        if first.startswith("EntityDefinitions"):
            self._only(method, "GET")
            return self.metadata.entity_definitions(segs, dict(req.query), req.root)
        if first.startswith("RelationshipDefinitions"):
            self._only(method, "GET")
            return self.metadata.relationship_definitions(segs, dict(req.query), req.root)
        if first.startswith("GlobalOptionSetDefinitions"):
            self._only(method, "GET")
            return self.metadata.global_option_set_definitions(segs, dict(req.query), req.root)
        if first == "BulkDelete" and len(segs) == 1:
            self._only(method, "POST")
            return self.bulk_delete(req)
        m = _SEGMENT.fullmatch(first)
        table = self.by_set.get(m.group(1)) if m else None
        if m is None or table is None:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{first.split('(')[0]}'.")
        key = m.group(2)
        rc = self._read_context(req)
        if key is None:
            if len(segs) == 1:
                if method == "GET" and any(k == "fetchXml" for k, _ in req.query):
                    return self.fetchxml(table, req)
                if method == "GET":
                    return self.reader.read_collection(table, req.query, rc)
                if method == "POST":
                    return self.create(table, req)
                raise self._not_allowed(method)
            action = segs[1]
            if action == "$count" and len(segs) == 2:
                self._only(method, "GET")
                return self.reader.read_collection(table, req.query, rc, count_only=True)
            if action in (f"{CRM}.CreateMultiple", f"{CRM}.UpdateMultiple", f"{CRM}.UpsertMultiple"):
                self._only(method, "POST")
                return self.multiple(table, req, action.rsplit(".", 1)[1])
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{action}'.")
        rid, alt = parse_key(table, key)
        if len(segs) == 1:
            if method == "GET":
                found, _ = self.writer.find(table, rid, alt)
                if found is None:
                    raise self._missing(table, rid, key)
                return self.reader.read_one(table, found, req.query, rc)
            if method == "PATCH":
                return self.upsert(table, req, rid, alt, key)
            if method == "DELETE":
                return self.delete(table, req, rid, alt, key)
            raise self._not_allowed(method)
        return self.property_op(table, req, rid, alt, key, segs[1:])

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed:
            raise DataverseService._not_allowed(method)

    @staticmethod
    def _not_allowed(method: str) -> DvError:
        return DvError(405, "0x80060888", f"The HTTP method '{method}' is not allowed on this resource.")

    @staticmethod
    def _missing(table: Table, rid: str | None, key: str) -> DvError:
        if rid is not None:
            return not_found(table.logical_name, rid)
        return DvError(404, "0x80040217",
                       f"A record with the specified key values does not exist in {table.logical_name} entity")

    def _read_context(self, req: DvRequest) -> ReadContext:
        return ReadContext(root=req.root, prefer=req.prefer,
                           max_delta_age_s=float(self.ctx.settings.delta_token_max_age_s),
                           force_delta_expiry=bool(self.ctx.faults.force_delta_expiry), headers=req.headers)

    # -- identity ------------------------------------------------------------------------------------
    def caller(self, claims: Mapping[str, Any]) -> Caller:
        """The systemuser behind a token: matched on ``azureactivedirectoryobjectid``, else a stable GUID."""
        oid = str(claims.get("oid") or claims.get("appid") or "anonymous")
        cached = self._callers.get(oid)
        if cached is not None:
            return cached
        user_id, bu = None, None
        if "systemuser" in self.tables:
            rows = self.store.query("systemuser", where=f"{self.store.field('azureactivedirectoryobjectid')} = ? "
                                    "COLLATE NOCASE", params=[oid], limit=1)
            if rows:
                rec = rows[0].load()
                user_id, bu = rows[0].id, rec.get("_businessunitid_value")
        if bu is None and "businessunit" in self.tables:
            roots = self.store.query("businessunit", where=f"{self.store.field('_parentbusinessunitid_value')} IS NULL",
                                     limit=1)
            bu = roots[0].id if roots else None
        caller = Caller(user_id or str(uuid.uuid5(_NS, f"systemuser:{self.ctx.tenant_id}:{oid}")),
                        bu or str(uuid.uuid5(_NS, f"businessunit:{self.ctx.tenant_id}")))
        if user_id is not None:
            self._callers[oid] = caller  # only cache real matches: synthetic data may arrive later
        return caller

    def caller_of(self, req: DvRequest) -> Caller:
        """:meth:`caller` for a request's token, resolved once per HTTP request (``$batch`` parts share it)."""
        if req.caller is None:
            req.caller = self.caller(req.claims)
        return req.caller

    def who_am_i(self, req: DvRequest) -> Reply:
        """``WhoAmI`` (§1.15)."""
        caller = self.caller_of(req)
        return json_reply({"@odata.context": f"{req.root}/$metadata#{CRM}.WhoAmIResponse",
                           "BusinessUnitId": caller.business_unit_id, "UserId": caller.user_id,
                           "OrganizationId": str(uuid.uuid5(_NS, f"organization:{self.ctx.tenant_id}"))})

    def total_record_count(self, req: DvRequest, segment: str) -> Reply:
        """``RetrieveTotalRecordCount(EntityNames=[...])`` (also with a ``@p1`` alias) (§1.15)."""
        m = re.fullmatch(r"RetrieveTotalRecordCount\(\s*EntityNames\s*=\s*(.+)\)", segment, re.S)
        if m is None:
            raise DvError(400, "0x80060888", "RetrieveTotalRecordCount needs the EntityNames parameter.")
        raw = m.group(1).strip()
        if raw.startswith("@"):
            raw = dict(req.query).get(raw, "")
        try:
            names = orjson.loads(raw.replace("'", '"'))
        except orjson.JSONDecodeError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DvError(400, "0x80060888", f"The EntityNames value '{raw}' is not a list of table names.")
        values = []
        for name in names:
            if name not in self.tables:
                raise DvError(404, "0x80040217", f"Could not find an entity with logical name {name}.")
            values.append(self.store.count(name))
        return json_reply({"@odata.context": f"{req.root}/$metadata#{CRM}.RetrieveTotalRecordCountResponse",
                           "EntityRecordCountCollection": {"Count": len(names), "IsReadOnly": False,
                                                           "Keys": names, "Values": values}})

    # -- FetchXML and BulkDelete ---------------------------------------------------------------------
    def fetchxml(self, table: Table, req: DvRequest) -> Reply:
        """``GET <set>?fetchXml=<FetchXML>``: the FetchXML subset of :mod:`.fetchxml`."""
        others = sorted(k for k, _ in req.query if k != "fetchXml")
        if others:
            raise DvError(400, "0x80060888", f"The query parameter {others[0]} can't be combined with fetchXml.")
        text = next(v for k, v in req.query if k == "fetchXml")
        entity = re.search(r"<entity\s+name\s*=\s*[\"']([^\"']+)", text)
        if entity is not None and entity.group(1) != table.logical_name:
            raise DvError(400, "0x80040203", f"The FetchXML <entity> must be '{table.logical_name}' for the "
                                             f"{table.entity_set} entity set.")
        caller = self.caller_of(req)
        return run_fetchxml(self.store, self.tables, text, root=req.root, prefer_annotations=req.prefer.annotations,
                            maxpagesize=req.prefer.maxpagesize,
                            caller=(caller.user_id, caller.business_unit_id or ""), render=self._render_plain(req))

    def _render_plain(self, req: DvRequest) -> Any:
        wants = annotation_filter(req.prefer.annotations)

        def render(table: Table, rows: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
            with self.store.read() as conn:
                recs = self.reader.render(table, rows, QueryOptions(), wants, req.root, conn)
            return [orjson.loads(r) for r in recs]
        return render

    def bulk_delete(self, req: DvRequest) -> Reply:
        """``POST BulkDelete``: deletes the rows each QueryExpression of ``QuerySet`` matches.

        The service queues an asynchronous system job and answers its JobId; the emulator runs the job
        before answering (so the rows are gone when the client reads the JobId) and answers the same shape.
        """
        try:
            body = orjson.loads(req.body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise DvError(400, "0x80040203", f"Invalid JSON. {exc}") from None
        if not isinstance(body, dict):
            raise DvError(400, "0x80040203", "The request body must be a JSON object.")
        missing = [p for p in ("JobName", "QuerySet", "SendEmailNotification", "ToRecipients", "CCRecipients",
                               "RecurrencePattern", "StartDateTime") if p not in body]
        if missing:
            raise DvError(400, "0x80040203", f"The BulkDelete parameter '{missing[0]}' is required.")
        queries = body["QuerySet"]
        if not isinstance(queries, list) or not queries:
            raise DvError(400, "0x80040203", "QuerySet must be a non-empty list of QueryExpression.")
        caller = self.caller_of(req)
        with self.store.write():
            for qe in queries:
                table, where, params = bulk_query(self.tables, qe, (caller.user_id, caller.business_unit_id or ""))
                self._writable(table)
                ids = [r.id for r in self.store.query(table.logical_name, where=where, params=params)]
                for rid in ids:
                    self.writer.delete(table, rid)
        return json_reply({"@odata.context": f"{req.root}/$metadata#{CRM}.BulkDeleteResponse",
                           "JobId": str(uuid.uuid4())})

    # -- writes --------------------------------------------------------------------------------------
    def _writable(self, table: Table) -> None:
        if table.logical_name == "activitypointer":
            # activitypointer rows mirror the concrete activity tables; Dataverse refuses direct writes.
            raise DvError(400, "0x80040203", "The activitypointer table cannot be written directly; write the "
                                             "specific activity table (emails, tasks, ...).")

    def _representation(self, table: Table, req: DvRequest, rid: str, status: int, url: str,
                        extra: Mapping[str, str] | None = None) -> Reply:
        row = self.store.get(table.logical_name, rid)
        if row is None:
            raise not_found(table.logical_name, rid)
        reply = self.reader.read_one(table, rid, [(k, v) for k, v in req.query if k == "$select"],
                                     self._read_context(req))
        reply.status = status
        reply.headers["Preference-Applied"] = ",".join(
            ["return=representation"] + ([reply.headers["Preference-Applied"]]
                                         if "Preference-Applied" in reply.headers else []))
        reply.headers.update(extra or {})
        reply.entity_url = url
        return reply

    def create(self, table: Table, req: DvRequest) -> Reply:
        """``POST <set>``: 204 + OData-EntityId, or 201 + body with ``return=representation`` (§1.8)."""
        self._writable(table)
        if req.prefer.return_representation:
            parse_options(table, self.tables, [(k, v) for k, v in req.query if k == "$select"])
        values = self.writer.changes(table, _json_body(table, req.body), req.content_ids, creating=True)
        rid, _version, _rec = self.writer.create(table, values, self.caller_of(req))
        url = f"{req.root}/{table.entity_set}({rid})"
        if req.prefer.return_representation:
            return self._representation(table, req, rid, 201, url, {"Location": url})
        return Reply(204, b"", {"OData-EntityId": url, "Location": url}, content_type=None, entity_url=url)

    def upsert(self, table: Table, req: DvRequest, rid: str | None, alt: dict[str, Any] | None, key: str) -> Reply:
        """``PATCH <set>(<key>)``: update, or create when missing, honouring If-Match/If-None-Match (§1.8)."""
        self._writable(table)
        body = _json_body(table, req.body)
        values = self.writer.changes(table, body, req.content_ids, creating=False)
        if_match = req.headers.get("if-match")
        if_none_match = (req.headers.get("if-none-match") or "").strip()
        caller = self.caller_of(req)
        created = False
        with self.store.write():
            found, row = self.writer.find(table, rid, alt)
            if row is None or found is None:
                if if_match:
                    raise self._missing(table, rid, key)
                if alt:
                    # Key values in the URL are copied into the new row when the body lacks them.
                    values.update({k: v for k, v in alt.items() if k not in values})
                if rid is not None:
                    values[table.primary_id] = rid
                found, _v, _r = self.writer.create(table, values, caller, rid=rid, known_absent=alt)
                created = True
            else:
                if if_none_match == "*":
                    raise DvError(412, "0x80040237", "A record with matching key values already exists.")
                if alt:
                    values = {k: v for k, v in values.items() if k not in alt}
                self.writer.update(table, found, values, caller, expect_version=_expect_version(if_match))
        url = f"{req.root}/{table.entity_set}({key})"
        if req.prefer.return_representation:
            return self._representation(table, req, found, 201 if created else 200, url)
        return Reply(204, b"", {"OData-EntityId": url}, content_type=None, entity_url=url)

    def delete(self, table: Table, req: DvRequest, rid: str | None, alt: dict[str, Any] | None, key: str) -> Reply:
        """``DELETE <set>(<key>)``: 204, 404 when missing, 412 on an If-Match mismatch."""
        self._writable(table)
        found, _ = self.writer.find(table, rid, alt)
        if found is None:
            raise self._missing(table, rid, key)
        self.writer.delete(table, found, expect_version=_expect_version(req.headers.get("if-match")))
        return Reply(204, b"", content_type=None)

    def property_op(self, table: Table, req: DvRequest, rid: str | None, alt: dict[str, Any] | None, key: str,
                    rest: Sequence[str]) -> Reply:
        """``<set>(<key>)/<column>`` (GET/PUT/DELETE), ``<set>(<key>)/<nav>/$ref`` (PUT/DELETE) and
        ``<set>(<key>)/<collection nav>`` (GET)."""
        found, row = self.writer.find(table, rid, alt)
        if row is None or found is None:
            raise self._missing(table, rid, key)
        name = rest[0]
        navs = nav_props(table)
        if len(rest) == 2 and rest[1] == "$ref" and name in navs:
            self._writable(table)
            col = navs[name].column
            if req.method == "DELETE":
                values: dict[str, Any] = {col.json_name: None, f"@emu.{col.json_name}.type": None}
            elif req.method == "PUT":
                ref = _json_body(table, req.body).get("@odata.id")
                values = self.writer.changes(table, {f"{name}@odata.bind": ref}, req.content_ids, creating=False)
            else:
                raise self._not_allowed(req.method)
            self.writer.update(table, found, values, self.caller_of(req))
            return Reply(204, b"", content_type=None)
        coll = collection_navs(table, self.tables).get(name)
        if coll is not None and len(rest) == 1:
            # The filtered collection a <nav>@odata.nextLink points at (query/overview.md).
            self._only(req.method, "GET")
            return self.reader.read_collection(coll.source, req.query, self._read_context(req),
                                               scope=Scope(coll, found, f"{table.entity_set}({found})/{name}"))
        column = next((c for c in table.columns if c.json_name == name), None)
        if column is None or len(rest) != 1:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{name}'.")
        if req.method == "GET":
            value = row.load().get(column.json_name)
            if value is None:
                return Reply(204, b"", content_type=None)
            return json_reply({"@odata.context": f"{req.root}/$metadata#{table.entity_set}({found})/{name}",
                               "value": value})
        self._writable(table)
        if column.is_lookup:
            raise DvError(400, "0x80060888", f"The lookup '{name}' is set through its navigation property.")
        if req.method == "PUT":
            value = _json_body(table, req.body).get("value")
        elif req.method == "DELETE":
            value = None
        else:
            raise self._not_allowed(req.method)
        values = self.writer.changes(table, {column.name: value}, req.content_ids, creating=False)
        self.writer.update(table, found, values, self.caller_of(req))
        return Reply(204, b"", content_type=None)

    def multiple(self, table: Table, req: DvRequest, action: str) -> Reply:
        """``CreateMultiple``/``UpdateMultiple``/``UpsertMultiple`` (all or nothing) (§1.8)."""
        self._writable(table)
        targets = _json_body(table, req.body).get("Targets")
        if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
            raise payload_error(table.logical_name, "The Targets parameter must be a list of entities.")
        caller = self.caller_of(req)
        ids: list[str] = []
        results: list[dict[str, Any]] = []
        with self.store.write():
            for target in targets:
                odata_id = target.get("@odata.id")
                body = {k: v for k, v in target.items() if k not in ("@odata.type", "@odata.id")}
                values = self.writer.changes(table, body, req.content_ids, creating=True)
                rid: str | None = values.get(table.primary_id)
                alt: dict[str, Any] | None = None
                if isinstance(odata_id, str):
                    m = _SEGMENT.fullmatch(odata_id.rsplit("/", 1)[-1])
                    if m is None or m.group(2) is None:
                        raise payload_error(table.logical_name, f"'{odata_id}' is not an entity reference.")
                    rid, alt = parse_key(table, m.group(2))
                if action == "CreateMultiple":
                    new_id, _, _ = self.writer.create(table, values, caller)
                    ids.append(new_id)
                    continue
                found, row = self.writer.find(table, rid, alt) if (rid or alt) else (None, None)
                if row is not None and found is not None:
                    self.writer.update(table, found, values, caller)
                    ids.append(found)
                    results.append({"RecordCreated": False, "Id": found})
                elif action == "UpdateMultiple":
                    raise not_found(table.logical_name, str(rid))
                else:
                    if alt:
                        values.update({k: v for k, v in alt.items() if k not in values})
                    new_id, _, _ = self.writer.create(table, values, caller, rid=rid)
                    ids.append(new_id)
                    results.append({"RecordCreated": True, "Id": new_id})
        if action == "CreateMultiple":
            return json_reply({"@odata.context": f"{req.root}/$metadata#{CRM}.CreateMultipleResponse", "Ids": ids})
        if action == "UpsertMultiple":
            return json_reply({"@odata.context": f"{req.root}/$metadata#{CRM}.UpsertMultipleResponse",
                               "Results": results})
        return Reply(204, b"", content_type=None)

    # -- $batch --------------------------------------------------------------------------------------
    def batch(self, req: DvRequest) -> Reply:
        """``POST $batch`` (§1.13)."""
        ctype = req.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/mixed"):
            raise DvError(400, "0x80060888", "The batch request must have a Content-Type of multipart/mixed.")
        service_path = urlsplit(req.root).path
        parts = parse_batch(req.body, ctype, service_path)
        keep_going = req.prefer.continue_on_error
        results: list[PartResult] = []
        # One store transaction for the whole batch: each part (a change set, or a request on its own)
        # is a savepoint inside it, so a failing part undoes exactly its own writes, and the batch pays
        # for one commit instead of one per part. Nothing is visible to other readers before the batch
        # commits, so no reader sees a state that the per-part commits would not also have shown.
        with self.store.write():
            for part in parts:
                if isinstance(part, ChangeSet):
                    ok, replies = self._atomic(req, part.requests, {})
                    results.append(PartResult(changeset=replies))
                    if not ok and not keep_going:
                        return self._batch_reply([PartResult(changeset=replies)], replies[-1][1].status)
                else:
                    ok, replies = self._atomic(req, [part], None)
                    reply = replies[0][1]
                    results.append(PartResult(reply=reply))
                    if not ok and not keep_going:
                        return self._batch_reply([PartResult(reply=reply)], reply.status)
        return self._batch_reply(results, 200,
                                 {"Preference-Applied": "odata.continue-on-error"} if keep_going else None)

    @staticmethod
    def _batch_reply(results: list[PartResult], status: int, headers: Mapping[str, str] | None = None) -> Reply:
        ctype, body = format_batch(results)
        return Reply(status, body, dict(headers or {}), content_type=ctype)

    class _Rollback(Exception):
        pass

    def _atomic(self, outer: DvRequest, requests: Sequence[BatchRequest], content_ids: dict[str, str] | None
                ) -> tuple[bool, list[tuple[str | None, Reply]]]:
        """Run requests as one atomic unit (a change set when ``content_ids`` is a dict, else a lone part).

        On the first failure its writes are rolled back and only the failing reply is returned.
        """
        replies: list[tuple[str | None, Reply]] = []
        failed: tuple[str | None, Reply] | None = None
        try:
            with self.store.savepoint():
                for sub in requests:
                    reply = self._execute(outer, sub, content_ids if content_ids is not None else {})
                    if reply.status >= 400:
                        failed = (sub.content_id, reply)
                        raise self._Rollback
                    replies.append((sub.content_id, reply))
                    if content_ids is not None and sub.content_id and reply.entity_url:
                        content_ids[f"${sub.content_id}"] = reply.entity_url
        except self._Rollback:
            assert failed is not None
            return False, [failed]
        return True, replies

    def _execute(self, outer: DvRequest, sub: BatchRequest, content_ids: dict[str, str]) -> Reply:
        target = sub.target
        if target.startswith("$"):
            ref, _, rest = target.partition("/")
            base = content_ids.get(ref.split("?")[0])
            if base is None:
                return Reply(400, error_body(DvError(400, "0x80060888", f"Content-ID Reference: '{ref}' does not "
                                                                        "exist in the batch context.")))
            target = base.split(API_PATH + "/", 1)[-1] + (f"/{rest}" if rest else "")
        path, _, query = target.partition("?")
        req = DvRequest(method=sub.method, path=unquote(path), query=parse_qsl(query, keep_blank_values=True),
                        headers=sub.headers, prefer=Prefer(), body=sub.body, root=outer.root, claims=outer.claims,
                        content_ids=content_ids, caller=self.caller_of(outer))
        try:
            req.prefer = parse_prefer([v for k, v in sub.headers.items() if k == "prefer"])
            if req.path.partition("/")[0] == "$batch":
                raise DvError(400, "0x80060888", "Batches cannot be nested.")
            return self.dispatch(req)
        except DvError as err:
            return Reply(err.status, error_body(err), err.headers)
        except Exception:
            # As the service does, a part that breaks unexpectedly answers 500 on its own: its change set
            # is rolled back, and change sets before it stay committed.
            log.exception("unexpected error serving a $batch part %s %s", sub.method, path.split("(")[0])
            return Reply(500, error_body(DvError(500, "0x80040216", "An unexpected error occurred.")))


def routes(ctx: EmulatorContext) -> list[BaseRoute]:
    """The Dataverse routes, to be mounted at ``/org/api/data/v9.2``."""
    service = DataverseService(ctx)
    return [Route("/{path:path}", service.endpoint, methods=_METHODS)]
