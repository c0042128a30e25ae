"""DataverseClient: the Dataverse Web API v9.2 seen from bridgekit: paged reads, metadata, change tracking, writes, $batch.

Example:
    >>> dv = DataverseClient(profile)                                             # doctest: +SKIP
    >>> for row in dv.rows("account", select=["name"], filter=eq("name", "O'Brien")):  # doctest: +SKIP
    ...     print(row["name"])
    >>> pages = dv.track("account", select=["name"])   # initial read; the last page has the delta link
    >>> later = dv.changes(last_page.delta_link)         # upserts and deletes since then
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests

from bridgekit.auth import TokenProvider, resource_scope
from bridgekit.catalog import DATAVERSE_MAX_PAGE
from bridgekit.config import Profile
from bridgekit.errors import (
    ApiError,
    BridgekitError,
    ChangeTrackingNotEnabled,
    ConfigError,
    NotFoundError,
    ResyncRequired,
    TransientError,
)
from bridgekit.http import ServiceSession, build_session, error_from_response, json_text, parse_retry_after
from bridgekit.odata import Expr, Page, Scalar, and_, ge, literal, lt, prefer, with_query

__all__ = [
    "BATCH_LIMIT",
    "BatchResult",
    "ChangePage",
    "ColumnInfo",
    "DataverseClient",
    "Operation",
    "TableInfo",
    "WriteResult",
    "parse_batch_response",
]

log = logging.getLogger("bridgekit.dataverse")

#: Requests per $batch (execute-batch-operations-using-web-api.md).
BATCH_LIMIT = 1000
_CT_NOT_ENABLED = "0x80072491"
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\)\s*$")
_STATUS_LINE = re.compile(r"^HTTP/\d\.\d\s+(\d{3})")
# A failed $batch without continue-on-error answers the failing part's status with a multipart body
# (execute-batch-operations); those come back as results. 401/403/429 concern the whole call: retried or raised.
_BATCH_ALLOW = tuple(s for s in range(400, 500) if s not in (401, 403, 429))
# Messages of an expired/invalid change-tracking token: the Web API code is undocumented (protocols.md
# §1.11, [U]); the known message is "Version stamp associated with the client has expired".
_RESYNC_HINTS = ("expired", "full sync", "delta token", "deltatoken", "version stamp")

Key = str | uuid.UUID | Mapping[str, Scalar]


@dataclass(frozen=True)
class ColumnInfo:
    """One column (attribute): its logical name, type, lookup targets and choice labels."""

    name: str
    type: str
    type_name: str | None = None
    display: str | None = None
    is_primary_id: bool = False
    is_primary_name: bool = False
    attribute_of: str | None = None
    targets: tuple[str, ...] = ()
    options: Mapping[int, str] | None = None

    @property
    def json_name(self) -> str:
        """The property in Web API rows (``_x_value`` for lookups)."""
        return f"_{self.name}_value" if self.type in ("Lookup", "Customer", "Owner") else self.name


@dataclass(frozen=True)
class TableInfo:
    """One table (EntityDefinition)."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None = None
    change_tracking: bool = False
    display: str | None = None
    is_activity: bool = False


@dataclass
class ChangePage:
    """One page of a change-tracking read.

    Attributes:
        upserts: New or changed rows (the selected columns and the primary key).
        deletes: Primary keys of deleted rows (``$deletedEntity`` entries).
        delta_link: Set on the last page only: keep it for the next :meth:`DataverseClient.changes`.
    """

    upserts: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    delta_link: str | None = None
    next_link: str | None = None


@dataclass(frozen=True)
class WriteResult:
    """Outcome of a create/upsert: the GUID when the service told it, the entity URL, whether it was created."""

    id: str | None
    entity_url: str | None = None
    created: bool | None = None
    etag: str | None = None
    body: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Operation:
    """One write for :meth:`DataverseClient.batch`. Build with the class methods.

    ``idempotent`` says whether repeating it is harmless (upserts and conditional updates), which lets
    a batch be retried after a 5xx. ``data`` is the JSON body: a mapping, or the text of a JSON object
    already encoded (a migration keeps each row's payload encoded in its checkpoint).
    """

    method: str
    table: str
    key: Key | None = None
    data: Mapping[str, Any] | str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotent: bool = False

    @classmethod
    def create(cls, table: str, data: Mapping[str, Any] | str) -> Operation:
        """POST a new row."""
        return cls("POST", table, None, data)

    @classmethod
    def update(cls, table: str, key: Key, data: Mapping[str, Any] | str, *, if_match: str = "*") -> Operation:
        """PATCH an existing row (``If-Match: *`` prevents creating it; an ETag adds a concurrency check)."""
        return cls("PATCH", table, key, data, {"If-Match": if_match}, idempotent=True)

    @classmethod
    def upsert(cls, table: str, key: Key, data: Mapping[str, Any] | str) -> Operation:
        """PATCH by id or alternate key: creates or updates."""
        return cls("PATCH", table, key, data, idempotent=True)

    @classmethod
    def delete(cls, table: str, key: Key) -> Operation:
        """DELETE a row."""
        return cls("DELETE", table, key)


@dataclass
class BatchResult:
    """The outcome of one :class:`Operation`, in input order.

    ``status`` is None when the service returned no response for it (the batch stopped earlier).
    """

    index: int
    status: int | None
    id: str | None = None
    entity_url: str | None = None
    error: BridgekitError | None = None
    body: Any = None

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return self.status is not None and 200 <= self.status < 300


@dataclass
class _Part:
    status: int
    headers: dict[str, str]
    body: str
    content_id: str | None


def _key_segment(key: Key) -> str:
    """``(guid)`` or ``(key1='v',key2=2)`` with values quoted as literals and the segment percent-encoded."""
    if isinstance(key, uuid.UUID):
        return f"({key})"
    if isinstance(key, str):
        return f"({uuid.UUID(key.strip('{}'))})"  # ValueError for a non-GUID: alternate keys go as a mapping
    if not key:
        raise ValueError("an alternate key needs at least one column")
    parts = []
    for name, value in key.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"not a column name: {name!r}")
        parts.append(f"{name}={literal(value)}")
    return "(" + quote(",".join(parts), safe="'=,") + ")"


def _entity_id(url: str | None) -> str | None:
    if not url:
        return None
    match = _ENTITY_ID.search(url)
    return match.group(1).lower() if match else None


def _label(value: Any) -> str | None:
    if isinstance(value, Mapping):
        user = value.get("UserLocalizedLabel")
        if isinstance(user, Mapping) and user.get("Label"):
            return str(user["Label"])
        for item in value.get("LocalizedLabels") or []:
            if item.get("Label"):
                return str(item["Label"])
    return None


def _select(select: str | Sequence[str] | None) -> str | None:
    if select is None:
        return None
    return select if isinstance(select, str) else ",".join(select)


class DataverseClient:
    """The Dataverse Web API (v9.2) client: reads stream as pages, writes return ids, metadata is cached.

    Args:
        profile: The resolved profile (``dataverse_url``, auth, CA, concurrency).
        session: The HTTP channel; built from the profile (with a bearer token for
            ``{dataverse_url}/.default``) when omitted.
        tokens: The token provider to use when building the session.
    """

    def __init__(self, profile: Profile, session: ServiceSession | None = None, *,
                 tokens: TokenProvider | None = None) -> None:
        self.profile = profile
        if session is None:
            if not profile.dataverse_url:
                raise ConfigError(f"profile '{profile.name}' has no dataverse_url", key="dataverse_url",
                                  profile=profile.name, hint='add dataverse_url = "https://<org>.crm.dynamics.com"')
            provider = tokens or TokenProvider(profile)
            session = build_session(profile, "dataverse", auth=provider.bearer(resource_scope(profile.dataverse_url)))
        self.session = session
        self.page_size = min(profile.sync.page_size, DATAVERSE_MAX_PAGE)
        self._lock = threading.Lock()
        self._tables: dict[str, TableInfo] = {}
        self._all_tables: list[TableInfo] | None = None
        self._columns: dict[str, list[ColumnInfo]] = {}
        self._keys: dict[str, list[tuple[str, ...]]] = {}

    # -- metadata -----------------------------------------------------------------------------------

    _TABLE_SELECT = ("LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,ChangeTrackingEnabled,"
                     "DisplayName,IsActivity")

    @staticmethod
    def _table_info(item: Mapping[str, Any]) -> TableInfo:
        return TableInfo(logical_name=item["LogicalName"], entity_set=item["EntitySetName"],
                         primary_id=item["PrimaryIdAttribute"], primary_name=item.get("PrimaryNameAttribute"),
                         change_tracking=bool(item.get("ChangeTrackingEnabled")),
                         display=_label(item.get("DisplayName")), is_activity=bool(item.get("IsActivity")))

    def tables(self, *, refresh: bool = False) -> list[TableInfo]:
        """Every table (metadata is not paged: one call). Cached per client."""
        with self._lock:
            if self._all_tables is not None and not refresh:
                return list(self._all_tables)
        body = self.session.get_json(with_query("EntityDefinitions", {"$select": self._TABLE_SELECT}))
        infos = [self._table_info(item) for item in body.get("value", [])]
        with self._lock:
            self._all_tables = infos
            self._tables.update({t.logical_name: t for t in infos})
        return list(infos)

    def table(self, name: str) -> TableInfo:
        """Metadata of one table by logical name (entity set names are accepted too).

        Raises:
            NotFoundError: no such table.
        """
        with self._lock:
            cached = self._tables.get(name)
        if cached:
            return cached
        path = f"EntityDefinitions(LogicalName={quote(literal(name), safe=chr(39))})"
        try:
            info = self._table_info(self.session.get_json(with_query(path, {"$select": self._TABLE_SELECT})))
        except NotFoundError:
            by_set = [t for t in self.tables() if t.entity_set == name]
            if not by_set:
                raise NotFoundError(f"Dataverse table '{name}' does not exist", status=404, service="dataverse",
                                    hint="use the table's logical name, e.g. 'account' (see `tables()`)") from None
            info = by_set[0]
        with self._lock:
            self._tables[info.logical_name] = info
            self._tables[name] = info
        return info

    def columns(self, table: str, *, refresh: bool = False) -> list[ColumnInfo]:
        """Columns of ``table`` with types, lookup targets and choice labels (Picklist/State/Status casts)."""
        info = self.table(table)
        with self._lock:
            if info.logical_name in self._columns and not refresh:
                return list(self._columns[info.logical_name])
        base = f"EntityDefinitions(LogicalName='{info.logical_name}')/Attributes"
        # Only base AttributeMetadata properties in $select; Targets/OptionSet need a cast (query-metadata-web-api.md).
        body = self.session.get_json(with_query(base, {
            "$select": "LogicalName,AttributeType,AttributeTypeName,DisplayName,IsPrimaryId,IsPrimaryName,AttributeOf"}))
        targets: dict[str, tuple[str, ...]] = {}
        lookups = self.session.get_json(with_query(f"{base}/Microsoft.Dynamics.CRM.LookupAttributeMetadata",
                                                   {"$select": "LogicalName,Targets"}))
        for item in lookups.get("value", []):
            targets[item["LogicalName"]] = tuple(item.get("Targets") or ())
        options = self.option_sets(info.logical_name)
        cols = []
        for item in body.get("value", []):
            type_name = item.get("AttributeTypeName")
            cols.append(ColumnInfo(
                name=item["LogicalName"], type=str(item.get("AttributeType") or ""),
                type_name=type_name.get("Value") if isinstance(type_name, Mapping) else None,
                display=_label(item.get("DisplayName")), is_primary_id=bool(item.get("IsPrimaryId")),
                is_primary_name=bool(item.get("IsPrimaryName")), attribute_of=item.get("AttributeOf"),
                targets=targets.get(item["LogicalName"], ()), options=options.get(item["LogicalName"])))
        with self._lock:
            self._columns[info.logical_name] = cols
        return list(cols)

    def option_sets(self, table: str) -> dict[str, dict[int, str]]:
        """Choice labels per column: ``{"industrycode": {1: "Accounting", ...}, "statecode": {...}}``."""
        info = self.table(table)
        base = f"EntityDefinitions(LogicalName='{info.logical_name}')/Attributes"
        out: dict[str, dict[int, str]] = {}
        for cast in ("PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata"):
            body = self.session.get_json(with_query(f"{base}/Microsoft.Dynamics.CRM.{cast}",
                                                    {"$select": "LogicalName", "$expand": "OptionSet"}))
            for item in body.get("value", []):
                option_set = item.get("OptionSet") or {}
                labels = {int(o["Value"]): _label(o.get("Label")) or str(o["Value"])
                          for o in option_set.get("Options") or []}
                out[item["LogicalName"]] = labels
        return out

    def alternate_keys(self, table: str) -> list[tuple[str, ...]]:
        """Alternate keys of ``table`` as tuples of column names."""
        info = self.table(table)
        with self._lock:
            if info.logical_name in self._keys:
                return list(self._keys[info.logical_name])
        body = self.session.get_json(with_query(f"EntityDefinitions(LogicalName='{info.logical_name}')/Keys",
                                                {"$select": "LogicalName,KeyAttributes"}))
        keys = [tuple(item.get("KeyAttributes") or ()) for item in body.get("value", [])]
        with self._lock:
            self._keys[info.logical_name] = keys
        return keys

    # -- reads --------------------------------------------------------------------------------------

    def _prefer_headers(self, page_size: int | None, annotations: bool | str | Sequence[str] | None,
                        track: bool = False) -> dict[str, str]:
        size = min(page_size or self.page_size, DATAVERSE_MAX_PAGE)
        names: str | Sequence[str] | None = None
        if annotations is True:
            names = "*"
        elif annotations:
            names = annotations
        value = prefer(maxpagesize=size, include_annotations=names, track_changes=track)
        return {"Prefer": value} if value else {}

    def pages(self, table: str, *, select: str | Sequence[str] | None = None, filter: Expr | str | None = None,
              orderby: str | Sequence[str] | None = None, expand: str | None = None, top: int | None = None,
              page_size: int | None = None, annotations: bool | str | Sequence[str] | None = None,
              count: bool = False) -> Iterator[Page]:
        """Yield pages of ``table`` following ``@odata.nextLink`` (memory stays one page).

        Args:
            table: Logical name (``account``).
            select: Columns (lookups as ``_x_value``); all columns when omitted.
            filter: An :class:`~bridgekit.odata.Expr` (values quoted safely) or a trusted filter string.
            orderby: ``"name asc"`` or a list of such.
            expand: A ``$expand`` expression.
            top: Total rows wanted. Dataverse ignores ``$top`` next to ``odata.maxpagesize``, so the page
                size is lowered to ``top`` and paging stops after it.
            page_size: Rows per page (≤ 5000; the profile's ``sync.page_size`` by default).
            annotations: True for all (``*``), or the annotation names (formatted values, lookup names).
            count: Ask for ``@odata.count`` (capped at 5000 by the service).
        """
        info = self.table(table)
        size = page_size or self.page_size
        if top is not None:
            size = min(size, top)
        url = with_query(info.entity_set, {"$select": _select(select), "$filter": filter,
                                           "$orderby": _select(orderby), "$expand": expand,
                                           "$count": True if count else None})
        headers = self._prefer_headers(size, annotations)
        remaining = top
        next_url: str | None = url
        seen: set[str] = set()
        while next_url is not None:
            page = Page.from_json(self.session.get_json(next_url, headers=headers))
            if remaining is not None:
                page.value = page.value[:remaining]
                remaining -= len(page.value)
                if remaining <= 0:
                    page.next_link = None
            yield page
            next_url = page.next_link
            if next_url is not None:
                if next_url in seen:
                    raise ApiError("Dataverse returned the same nextLink twice (paging cookie did not advance)",
                                   service="dataverse", status=200)
                seen.add(next_url)

    def rows(self, table: str, **options: Any) -> Iterator[dict[str, Any]]:
        """Yield the rows of ``table``, one at a time; takes the options of :meth:`pages`."""
        for page in self.pages(table, **options):
            yield from page.value

    def get(self, table: str, key: Key, *, select: str | Sequence[str] | None = None,
            annotations: bool | str | Sequence[str] | None = None) -> dict[str, Any]:
        """One row by id or alternate key. Raises :class:`NotFoundError` when absent."""
        info = self.table(table)
        url = with_query(info.entity_set + _key_segment(key), {"$select": _select(select)})
        headers = self._prefer_headers(None, annotations) if annotations else None
        body: dict[str, Any] = self.session.get_json(url, headers=headers)
        return body

    def count(self, table: str, *, filter: Expr | str | None = None) -> int:
        """``GET <set>/$count``: a live count, **capped at 5000** by Dataverse (count-rows.md)."""
        info = self.table(table)
        response = self.session.request("GET", with_query(f"{info.entity_set}/$count", {"$filter": filter}),
                                        headers={"Accept": "text/plain"})
        return int(response.text.strip().lstrip("\ufeff"))

    def total_record_counts(self, tables: Sequence[str]) -> dict[str, int]:
        """``RetrieveTotalRecordCount``: counts snapshotted within the last 24 h, not capped."""
        names = json.dumps([self.table(t).logical_name for t in tables])
        body = self.session.get_json(f"RetrieveTotalRecordCount(EntityNames=@p1)?@p1={quote(names, safe='')}")
        coll = body.get("EntityRecordCountCollection") or {}
        return {str(k): int(v) for k, v in zip(coll.get("Keys") or [], coll.get("Values") or [], strict=False)}

    def whoami(self) -> dict[str, Any]:
        """``WhoAmI``: ``UserId``, ``BusinessUnitId``, ``OrganizationId`` of the caller."""
        body: dict[str, Any] = self.session.get_json("WhoAmI")
        return {k: v for k, v in body.items() if not k.startswith("@")}

    # -- change tracking ----------------------------------------------------------------------------

    def track(self, table: str, *, select: str | Sequence[str] | None = None,
              page_size: int | None = None) -> Iterator[ChangePage]:
        """Initial change-tracking read: every current row, page by page; the last page carries the delta link.

        ``$filter``/``$orderby``/``$expand``/``$top`` cannot be combined with change tracking.

        Raises:
            ChangeTrackingNotEnabled: the table does not have change tracking on.
        """
        info = self.table(table)
        url = with_query(info.entity_set, {"$select": _select(select)})
        headers = self._prefer_headers(page_size, None, track=True)
        yield from self._change_pages(url, headers, info, initial=True)

    def changes(self, delta_link: str, *, page_size: int | None = None, table: str | None = None) -> Iterator[ChangePage]:
        """Changes since ``delta_link``: pages of upserts and deletes; the last page has the next delta link.

        Raises:
            ResyncRequired: the token expired or was invalidated; run :meth:`track` again.
            ChangeTrackingNotEnabled: tracking was turned off for the table.
        """
        info = self.table(table) if table else None
        headers = self._prefer_headers(page_size, None)
        yield from self._change_pages(delta_link, headers, info, initial=False)

    def page_bytes(self, url: str, *, headers: Mapping[str, str] | None = None, table: str | None = None,
                   delta: bool = False) -> bytes:
        """GET one page (a collection URL, next link or delta link) as the raw bytes the service sent.

        For callers that decode pages themselves (the sync shapes them with Arrow). Change-tracking errors
        are translated as in :meth:`track` and :meth:`changes`.

        Raises:
            ChangeTrackingNotEnabled: the table does not have change tracking on.
            ResyncRequired: ``delta`` is true and the delta link expired or was invalidated.
        """
        try:
            response = self.session.request("GET", url, headers=dict(headers or {}))
        except ApiError as exc:
            raise self._tracking_error(exc, table, initial=not delta) from exc
        return bytes(response.content)

    def _change_pages(self, url: str, headers: dict[str, str], info: TableInfo | None,
                      *, initial: bool) -> Iterator[ChangePage]:
        name = info.logical_name if info else None
        next_url: str | None = url
        while next_url is not None:
            try:
                body = self.session.get_json(next_url, headers=headers)
            except ApiError as exc:
                raise self._tracking_error(exc, name, initial) from exc
            page = ChangePage(next_link=body.get("@odata.nextLink"), delta_link=body.get("@odata.deltaLink"))
            for item in body.get("value", []):
                context = str(item.get("@odata.context", ""))
                if context.endswith("$deletedEntity") or set(item) <= {"id", "reason", "@odata.context"}:
                    page.deletes.append(str(item["id"]))
                else:
                    page.upserts.append(item)
            yield page
            next_url = page.next_link

    @staticmethod
    def _tracking_error(exc: ApiError, table: str | None, initial: bool) -> BridgekitError:
        if exc.service_code == _CT_NOT_ENABLED:
            return ChangeTrackingNotEnabled(f"table '{table or '?'}' is not enabled for change tracking", table=table)
        text = exc.message.lower()
        if not initial and (exc.status == 410 or (exc.status in (400, 404, 422)
                                                 and any(h in text for h in _RESYNC_HINTS))):
            return ResyncRequired(f"the change-tracking token for '{table or '?'}' is no longer valid: {exc.message}",
                                  table=table, service_code=exc.service_code)
        return exc

    # -- writes -------------------------------------------------------------------------------------

    def create(self, table: str, data: Mapping[str, Any]) -> str:
        """POST a row; return its id (from ``OData-EntityId``, else ``Location``)."""
        info = self.table(table)
        response = self.session.request("POST", info.entity_set, json=dict(data),
                                        headers={"Content-Type": "application/json"})
        url = response.headers.get("OData-EntityId") or response.headers.get("Location")
        new_id = _entity_id(url)
        if new_id is None:
            body = response.json() if response.content else {}
            new_id = body.get(info.primary_id)
        if new_id is None:
            raise ApiError(f"Dataverse created a {table} row but returned no id", service="dataverse",
                           status=response.status_code)
        return str(new_id)

    def update(self, table: str, key: Key, data: Mapping[str, Any], *, if_match: str = "*") -> None:
        """PATCH an existing row. ``If-Match: *`` (default) makes a missing row a :class:`NotFoundError`
        instead of creating it; pass an ETag for an optimistic-concurrency check (412 -> ConflictError)."""
        info = self.table(table)
        self.session.request("PATCH", info.entity_set + _key_segment(key), json=dict(data),
                             headers={"Content-Type": "application/json", "If-Match": if_match}, idempotent=True)

    def upsert(self, table: str, key: Key, data: Mapping[str, Any], *, if_match: str | None = None,
               if_none_match: str | None = None, return_representation: bool = False) -> WriteResult:
        """PATCH by id or alternate key: create or update (use-upsert-insert-update-record.md).

        ``if_none_match="*"`` only creates (412 when the row exists); ``if_match="*"`` only updates.
        With ``return_representation`` the result says whether the row was created (201) or updated (200).
        """
        info = self.table(table)
        headers = {"Content-Type": "application/json"}
        if if_match:
            headers["If-Match"] = if_match
        if if_none_match:
            headers["If-None-Match"] = if_none_match
        if return_representation:
            headers["Prefer"] = "return=representation"
        response = self.session.request("PATCH", info.entity_set + _key_segment(key), json=dict(data),
                                        headers=headers, idempotent=not if_none_match)
        url = response.headers.get("OData-EntityId") or response.headers.get("Location")
        body = response.json() if response.content else None
        new_id = _entity_id(url) or (str(body[info.primary_id]) if body and body.get(info.primary_id) else None)
        if new_id is None and isinstance(key, str | uuid.UUID):
            new_id = str(key).strip("{}").lower()
        created = {201: True, 200: False}.get(response.status_code)
        return WriteResult(id=new_id, entity_url=url, created=created, etag=response.headers.get("ETag"), body=body)

    def delete(self, table: str, key: Key, *, if_match: str | None = None) -> None:
        """DELETE a row (:class:`NotFoundError` when it does not exist)."""
        info = self.table(table)
        headers = {"If-Match": if_match} if if_match else None
        self.session.request("DELETE", info.entity_set + _key_segment(key), headers=headers)

    # -- $batch -------------------------------------------------------------------------------------

    def batch(self, operations: Iterable[Operation], *, change_set_size: int = 1, continue_on_error: bool = True,
              chunk_size: int = BATCH_LIMIT, max_rounds: int = 6) -> list[BatchResult]:
        """Run writes through ``$batch``; return one :class:`BatchResult` per operation, in input order.

        Operations are sent in batches of at most ``chunk_size`` (≤ 1000) requests, grouped into atomic
        change sets of ``change_set_size`` (each change set succeeds or fails as a whole; each part carries
        a ``Content-ID`` so results map back exactly). Items answered 429, and 5xx items of idempotent
        operations, are sent again in a later round after the service's Retry-After.

        Args:
            operations: The writes.
            change_set_size: Operations per atomic change set.
            continue_on_error: Send ``Prefer: odata.continue-on-error`` so one failure does not stop the rest.
            chunk_size: Requests per ``$batch`` call.
            max_rounds: Rounds of re-sending throttled/transient items before reporting them as failed.
        """
        ops = list(operations)
        chunk_size = max(1, min(chunk_size, BATCH_LIMIT))
        change_set_size = max(1, change_set_size)
        results: list[BatchResult | None] = [None] * len(ops)
        pending = list(range(len(ops)))
        for round_no in range(1, max_rounds + 1):
            retry: list[int] = []
            wait = 0.0
            for start in range(0, len(pending), chunk_size):
                chunk = pending[start:start + chunk_size]
                for res in self._send_batch(ops, chunk, change_set_size, continue_on_error):
                    results[res.index] = res
                    if self._retryable(res, ops[res.index]) and round_no < max_rounds:
                        retry.append(res.index)
                        after = res.error.fields.get("retry_after") if res.error else None
                        wait = max(wait, float(after or 0.0))
            if not retry:
                break
            log.debug("$batch round %d: re-sending %d throttled/transient operations", round_no, len(retry))
            if wait:
                self.session.governor.pause(wait)
            else:
                self.session.wait(self.session.policy.backoff(round_no))
            pending = sorted(retry)
        return [r if r is not None else BatchResult(i, None, error=ApiError("no result", service="dataverse"))
                for i, r in enumerate(results)]

    @staticmethod
    def _retryable(res: BatchResult, op: Operation) -> bool:
        """Throttled items were not executed; transient or unanswered ones are safe to resend if idempotent."""
        if res.ok:
            return False
        if res.status == 429:
            return True
        return (res.status is None or res.status >= 500) and op.idempotent

    def _send_batch(self, ops: Sequence[Operation], indices: Sequence[int], change_set_size: int,
                    continue_on_error: bool) -> list[BatchResult]:
        boundary = f"batch_{uuid.uuid4()}"
        lines: list[str] = []
        content_ids: dict[str, int] = {}
        set_urls: dict[str, str] = {}
        for cs_start in range(0, len(indices), change_set_size):
            group = indices[cs_start:cs_start + change_set_size]
            cs = f"changeset_{uuid.uuid4()}"
            lines += [f"--{boundary}", f'Content-Type: multipart/mixed; boundary="{cs}"', ""]
            for idx in group:
                cid = str(len(content_ids) + 1)
                content_ids[cid] = idx
                lines += [f"--{cs}", *self._part_lines(ops[idx], cid, set_urls)]
            lines += [f"--{cs}--"]
        lines += [f"--{boundary}--", ""]
        body = "\r\n".join(lines).encode("utf-8")
        headers = {"Content-Type": f'multipart/mixed; boundary="{boundary}"'}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        safe = all(ops[i].idempotent for i in indices)
        try:
            response = self.session.request("POST", "$batch", data=body, headers=headers, idempotent=safe,
                                            allow=_BATCH_ALLOW)
        except TransientError as exc:
            # The whole call failed transiently (after retries, or not safe to repeat): every item shares it.
            # Auth, permission and configuration errors concern the call itself and are raised.
            return [BatchResult(i, exc.status, error=exc) for i in indices]
        ctype = response.headers.get("Content-Type", "")
        if "multipart/mixed" not in ctype:
            err = error_from_response(response, "dataverse")
            return [BatchResult(i, response.status_code, error=err) for i in indices]
        parts = parse_batch_response(response.content, ctype)
        out: dict[int, BatchResult] = {}
        unnamed = [p for p in parts if p.content_id is None]
        for part in parts:
            named = content_ids.get(part.content_id or "")
            if named is not None:
                out[named] = self._result(named, part, response)
        if unnamed and not out and len(unnamed) == len(indices):
            out = {idx: self._result(idx, part, response) for idx, part in zip(indices, unnamed, strict=True)}
        elif unnamed and len(unnamed) == 1 and len(indices) - len(out) >= 1:
            # A change set that failed comes back as the failing part alone; it belongs to the first
            # unanswered change set.
            missing = [i for i in indices if i not in out]
            out[missing[0]] = self._result(missing[0], unnamed[0], response)
        results = []
        for i in indices:
            if i in out:
                results.append(out[i])
            else:
                results.append(BatchResult(i, None, error=ApiError(
                    "no response for this operation: the batch or its change set stopped at a failure",
                    service="dataverse", status=None)))
        return results

    def _part_lines(self, op: Operation, content_id: str, set_urls: dict[str, str]) -> list[str]:
        url = set_urls.get(op.table)
        if url is None:  # the entity set's absolute URL, once per table and batch
            url = set_urls[op.table] = self.session.url(self.table(op.table).entity_set)
        # The key segment is percent-encoded (no '/', '?' or '#'), so appending it equals resolving it.
        path = url + (_key_segment(op.key) if op.key is not None else "")
        lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary", f"Content-ID: {content_id}",
                 "", f"{op.method} {path} HTTP/1.1"]
        data = op.data
        payload = data if data is None or isinstance(data, str) else json_text(
            data if isinstance(data, dict) else dict(data))
        if payload is not None:
            lines.append("Content-Type: application/json; type=entry")
            # Some servers reject write parts without an inner Content-Length (protocols.md §1.13, [T]).
            lines.append(f"Content-Length: {len(payload.encode('utf-8'))}")
        lines += [f"{k}: {v}" for k, v in op.headers.items()]
        lines += ["", payload if payload is not None else ""]
        return lines

    @staticmethod
    def _result(idx: int, part: _Part, response: requests.Response) -> BatchResult:
        entity_url = part.headers.get("odata-entityid") or part.headers.get("location")
        body: Any = None
        if part.body.strip():
            try:
                body = json.loads(part.body)
            except ValueError:
                body = part.body
        if 200 <= part.status < 300:
            return BatchResult(idx, part.status, id=_entity_id(entity_url), entity_url=entity_url, body=body)
        fake = requests.Response()
        fake.status_code = part.status
        fake._content = part.body.encode("utf-8")
        fake.headers.update(part.headers)
        fake.request = response.request
        err = error_from_response(fake, "dataverse")
        if part.status == 429 and "retry-after" in part.headers:
            err.fields["retry_after"] = parse_retry_after(part.headers["retry-after"])
        return BatchResult(idx, part.status, entity_url=entity_url, error=err, body=body)

    # -- partitioned reads --------------------------------------------------------------------------

    def partitions(self, table: str, count: int, *, filter: Expr | str | None = None,
                   by: str = "createdon") -> list[Expr | str | None]:
        """``count`` filters that split ``table`` into disjoint ranges of ``by`` (createdon by default).

        The first range is open below and the last open above, so every row falls in exactly one
        partition even when the boundaries are uneven.
        """
        if count <= 1:
            return [filter]
        base = [filter] if filter is not None else []
        first = list(self.pages(table, select=[by], filter=filter, orderby=f"{by} asc", top=1))
        last = list(self.pages(table, select=[by], filter=filter, orderby=f"{by} desc", top=1))
        if not first or not first[0].value or not last[0].value:
            return [filter]
        lo = dt.datetime.fromisoformat(str(first[0].value[0][by]).replace("Z", "+00:00"))
        hi = dt.datetime.fromisoformat(str(last[0].value[0][by]).replace("Z", "+00:00"))
        if hi <= lo:
            return [filter]
        step = (hi - lo) / count
        bounds = [lo + step * i for i in range(1, count)]
        parts: list[Expr | str | None] = []
        for i in range(count):
            terms: list[Expr] = []
            if i > 0:
                terms.append(ge(by, bounds[i - 1]))
            if i < count - 1:
                terms.append(lt(by, bounds[i]))
            user = [Expr(f"({f})") if isinstance(f, str) else f for f in base]
            parts.append(and_(*[x for x in user if x is not None], *terms))
        return parts

    def partitioned_pages(self, table: str, *, partitions: int = 4, by: str = "createdon",
                          filter: Expr | str | None = None, workers: int | None = None,
                          **options: Any) -> Iterator[Page]:
        """Read ``table`` in ``partitions`` concurrent range queries; yield pages as they arrive (any order).

        Threads share the session's governor, so concurrency stays within the profile's budget. Memory is
        bounded: workers wait while more than two pages per worker are queued.
        """
        filters = self.partitions(table, partitions, filter=filter, by=by)
        n_workers = max(1, min(len(filters), workers or self.session.governor.max_concurrency))
        out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=n_workers * 2)
        stop = threading.Event()

        def put(item: tuple[str, Any]) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def work(part_filter: Expr | str | None) -> None:
            try:
                for page in self.pages(table, filter=part_filter, **options):
                    if not put(("page", page)):
                        return
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put(("error", exc))
            finally:
                put(("done", None))

        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="bk-partition")
        try:
            for f in filters:
                pool.submit(work, f)
            done = 0
            while done < len(filters):
                kind, item = out.get()
                if kind == "page":
                    yield item
                elif kind == "error":
                    raise item
                else:
                    done += 1
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def parse_batch_response(content: bytes, content_type: str) -> list[_Part]:
    """Split a ``multipart/mixed`` $batch response into its HTTP parts (change sets flattened)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ApiError("$batch response without a multipart boundary", service="dataverse")
    return _split(content.decode("utf-8", errors="replace"), match.group(1))


def _split(text: str, boundary: str) -> list[_Part]:
    parts: list[_Part] = []
    delimiter = f"--{boundary}"
    for chunk in text.split(delimiter)[1:]:
        if chunk.startswith("--"):
            break
        chunk = chunk.lstrip("\r\n")
        head, _, rest = _partition_blank(chunk)
        headers = _headers(head)
        ctype = headers.get("content-type", "")
        if ctype.startswith("multipart/mixed"):
            inner = re.search(r'boundary="?([^";]+)"?', ctype)
            if inner:
                parts.extend(_split(rest, inner.group(1)))
            continue
        status_line, _, http = rest.partition("\n")
        status_match = _STATUS_LINE.match(status_line.strip())
        if not status_match:
            continue
        http_head, _, http_body = _partition_blank(http)
        parts.append(_Part(status=int(status_match.group(1)), headers=_headers(http_head),
                           body=http_body.strip("\r\n"), content_id=headers.get("content-id")))
    return parts


def _partition_blank(text: str) -> tuple[str, str, str]:
    for sep in ("\r\n\r\n", "\n\n"):
        if sep in text:
            head, _, rest = text.partition(sep)
            return head, sep, rest
    return text, "", ""


def _headers(block: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out

