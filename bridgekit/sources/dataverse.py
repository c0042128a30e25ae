"""A Dataverse table as resumable pages for the sync engine, over :class:`bridgekit.dataverse.DataverseClient`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from bridgekit.catalog import DATAVERSE_COUNT_CAP, DATAVERSE_MAX_PAGE
from bridgekit.dataverse import DataverseClient
from bridgekit.errors import ApiError, BridgekitError, ResyncRequired, SyncError
from bridgekit.sources.base import FullPlan, Page, RawPage
from bridgekit.warehouse import TableSpec, carrier

__all__ = ["DataverseSource"]

log = logging.getLogger("bridgekit.sync")

_LOOKUP_TYPES = ("Lookup", "Customer", "Owner")
_CHOICE_TYPES = ("Picklist", "State", "Status")
_DV_TYPES = {
    "Uniqueidentifier": "UUID", "String": "VARCHAR", "Memo": "VARCHAR", "EntityName": "VARCHAR",
    "Integer": "INTEGER", "BigInt": "BIGINT", "Double": "DOUBLE", "Boolean": "BOOLEAN",
    "Picklist": "INTEGER", "State": "INTEGER", "Status": "INTEGER", "MultiSelectPicklist": "VARCHAR",
}
_LOOKUP_NAME = "@Microsoft.Dynamics.CRM.lookuplogicalname"
# Tracked reads, range reads and delta reads need different Prefer headers; a position records which.
_TRACKED, _PLAIN, _DELTA = "T|", "P|", "D|"


_NEXT_LINK_KEY = b'"@odata.nextLink"'


def _scan_next_link(raw: bytes) -> str | None:
    """The page's ``@odata.nextLink`` found without decoding the page, or None when unsure.

    Inside a JSON string every ``"`` is escaped, so ``"@odata.nextLink"`` followed by ``:`` can only be
    a member name; Dataverse rows have no member of that exact name (an expanded collection's is
    ``<navigation>@odata.nextLink``), and the page's own comes after ``value`` (protocols.md §1.7), so
    the last one is the page's. A link with an escape in it is left to the decoder. The decoded link
    is still compared with it before the page is staged (:meth:`DataverseSource.shape`).
    """
    i = raw.rfind(_NEXT_LINK_KEY)
    if i < 0:
        return None
    j = i + len(_NEXT_LINK_KEY)
    tail = raw[j:j + 8192].lstrip()
    if not tail.startswith(b":"):
        return None
    tail = tail[1:].lstrip()
    if not tail.startswith(b'"'):
        return None
    end = tail.find(b'"', 1)
    if end < 0 or b"\\" in tail[1:end]:
        return None
    try:
        return tail[1:end].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _row_version(row: Mapping[str, Any]) -> str | None:
    """The row's version: its ``@odata.etag`` (``W/"<versionnumber>"``, protocols.md §1.3), else versionnumber."""
    etag = row.get("@odata.etag")
    if isinstance(etag, str) and etag:
        return etag.removeprefix("W/").strip('"')
    v = row.get("versionnumber")
    return None if v is None else str(v)


class DataverseSource:
    """A Dataverse table as resumable pages, over :class:`bridgekit.dataverse.DataverseClient`.

    Metadata comes from the client (``table``, ``columns``) plus the precision/format casts it does not
    read (Money/Decimal ``Precision``, DateTime ``Format``; query-metadata-web-api.md). Pages are fetched
    by link through the client's session so each position can be checkpointed, asking for the
    ``lookuplogicalname`` annotation that names a polymorphic lookup's target table (protocols.md §1.4).

    A small table is read with one tracked read (the delta link arrives on its last page). A larger one
    first takes a delta link with a key-only tracked read, then reads the rows in concurrent
    ``createdon`` ranges (:meth:`DataverseClient.partitions`); the next delta replays what changed
    meanwhile, which upserts and deletes make harmless.
    """

    def __init__(self, client: DataverseClient, name: str, *, page_size: int = DATAVERSE_MAX_PAGE, single_read_below: int | None = None) -> None:
        self.client = client
        self.name = name
        self.table = f"dataverse.{name}"
        self.page_size = max(1, min(page_size, DATAVERSE_MAX_PAGE))
        self.single_read_below = single_read_below if single_read_below is not None else 2 * self.page_size
        self._info = client.table(name)
        self._spec: TableSpec | None = None
        self._plan: list[tuple[str, str, Any]] = []  # (column, kind, extra)
        self._select = ""
        self._schema: pa.Schema | None = None
        self._has_text = False

    @property
    def tracked(self) -> bool:
        return bool(self._info.change_tracking)

    def _casts(self, cast: str, field_name: str) -> dict[str, Any]:
        base = f"EntityDefinitions(LogicalName='{self._info.logical_name}')/Attributes/Microsoft.Dynamics.CRM.{cast}"
        try:
            body = self.client.session.get_json(f"{base}?$select=LogicalName,{field_name}")
        except BridgekitError as exc:
            log.debug("%s: %s metadata unavailable (%s)", self.table, cast, exc)
            return {}
        return {item["LogicalName"]: item.get(field_name) for item in body.get("value", [])}

    def spec(self) -> TableSpec:
        """Columns and DuckDB types from attribute metadata (lookups + ``_entitytype``, choices + ``_label``)."""
        if self._spec is not None:
            return self._spec
        from bridgekit.warehouse import Column

        cols_meta = [c for c in self.client.columns(self.name) if not c.attribute_of]
        precision: dict[str, Any] = {}
        if any(c.type in ("Money", "Decimal") for c in cols_meta):
            precision = self._casts("MoneyAttributeMetadata", "Precision") | self._casts("DecimalAttributeMetadata",
                                                                                          "Precision")
        formats = self._casts("DateTimeAttributeMetadata", "Format") if any(
            c.type == "DateTime" for c in cols_meta) else {}
        columns: list[Column] = []
        labels: dict[str, dict[int, str]] = {}
        plan: list[tuple[str, str, Any]] = []
        select: list[str] = []
        for c in cols_meta:
            if c.type in _LOOKUP_TYPES:
                columns += [Column(c.name, "UUID"), Column(f"{c.name}_entitytype", "VARCHAR")]
                plan.append((c.name, "lookup", c.targets[0] if len(c.targets) == 1 else None))
                select.append(f"_{c.name}_value")
                continue
            if c.type == "DateTime":
                typ = "DATE" if formats.get(c.name) == "DateOnly" else "TIMESTAMPTZ"
            elif c.type == "Money":
                typ = f"DECIMAL(38,{int(precision.get(c.name) or 4)})"
            elif c.type == "Decimal":
                typ = f"DECIMAL(38,{int(precision.get(c.name) or 10)})"
            else:
                typ = _DV_TYPES.get(c.type, "VARCHAR")
            columns.append(Column(c.name, typ))
            select.append(c.name)
            if c.type in _CHOICE_TYPES:
                opts = dict(c.options or {})
                labels[c.name] = opts
                columns.append(Column(f"{c.name}_label", "VARCHAR"))
                plan.append((c.name, "choice", opts))
            elif typ == "VARCHAR" and c.type not in ("String", "Memo", "EntityName"):
                plan.append((c.name, "text", None))
            else:
                plan.append((c.name, "value", None))
        key = self._info.primary_id
        if key not in {c.name for c in columns}:
            columns.insert(0, Column(key, "UUID"))
            plan.insert(0, (key, "value", None))
            select.insert(0, key)
        self._plan, self._select = plan, ",".join(select)
        self._has_text = any(kind == "text" for _n, kind, _e in plan)
        self._spec = TableSpec("dataverse", self.name, key, tuple(columns), labels)
        return self._spec

    def _url(self, extra: Mapping[str, Any] | None = None) -> str:
        from bridgekit.odata import with_query

        self.spec()
        return str(with_query(self._info.entity_set, {"$select": self._select, **(extra or {})}))

    def plan_full(self, partitions: int) -> FullPlan:
        from bridgekit.odata import with_query

        filters, estimate = self._ranges(partitions)
        if not self.tracked:
            return FullPlan([_PLAIN + self._url({"$filter": f}) for f in filters], None, estimate)
        if len(filters) <= 1:
            return FullPlan([_TRACKED + self._url()], estimate=estimate)
        # Take the delta link first (a key-only tracked read: its snapshot is taken at its first page),
        # so every change made while the ranges are read comes back in the catch-up delta.
        url: str | None = with_query(self._info.entity_set, {"$select": self._info.primary_id})
        token = None
        while url is not None:
            body = self.client.session.get_json(url, headers=self._headers(track=True, page_size=DATAVERSE_MAX_PAGE,
                                                                            annotations=False))
            url, token = body.get("@odata.nextLink"), body.get("@odata.deltaLink")
        if token is None:
            raise SyncError(f"{self.table}: the tracked read ended without a delta link", table=self.table)
        return FullPlan([_PLAIN + self._url({"$filter": f}) for f in filters], self._with_select(token),
                        estimate=estimate)

    def _with_select(self, link: str) -> str:
        """``link`` with the table's full ``$select``: a delta link repeats the query it came from, and the
        key-only read's would make every later delta return keys only. The token itself
        (``<rowversion>!<time>``, protocols.md §1.11) does not depend on the columns."""
        from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

        parts = urlsplit(link)
        query = [(k, self._select if k == "$select" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        return urlunsplit(parts._replace(query=urlencode(query, safe="$,!", quote_via=quote)))

    def _ranges(self, partitions: int) -> tuple[list[Any], int | None]:
        """The ``$filter`` of each partition (``[None]``: one read) and the rows expected, when counted."""
        if partitions <= 1:
            return [None], None
        estimate: int | None = None
        try:
            estimate, exact = self._count()
            if exact and estimate < self.single_read_below:
                return [None], estimate
        except BridgekitError as exc:  # a count is an optimisation only
            log.debug("%s: count failed (%s); reading in ranges", self.table, exc)
        return list(self.client.partitions(self.name, partitions)), estimate

    def _count(self) -> tuple[int, bool]:
        """How many rows the table has, and whether that is the number or only "at least" it.

        ``$count`` stops at 5,000 (count-rows.md), so a capped answer is completed with
        ``RetrieveTotalRecordCount``, which is not capped but may be up to 24 hours old: fine for
        choosing how to read the table and for a progress bar.
        """
        n = int(self.client.count(self.name))
        if n < DATAVERSE_COUNT_CAP:
            return n, True
        try:
            snapshot = self.client.total_record_counts([self.name]).get(self._info.logical_name)
        except BridgekitError as exc:
            log.debug("%s: total record count unavailable (%s)", self.table, exc)
            snapshot = None
        if snapshot is None or snapshot < 0:
            return n, False
        return max(n, snapshot), True

    def delta_start(self, token: str) -> list[str]:
        return [_DELTA + token]

    def join_tokens(self, tokens: list[str]) -> str:
        return tokens[0]

    def _headers(self, *, track: bool, page_size: int | None = None, annotations: bool = True) -> dict[str, str]:
        from bridgekit.odata import prefer

        value = prefer(maxpagesize=page_size or self.page_size, track_changes=track,
                       include_annotations="Microsoft.Dynamics.CRM.lookuplogicalname" if annotations else None)
        return {"Prefer": value} if value else {}

    def page(self, cursor: str) -> Page:
        return self.shape(self.fetch(cursor))

    def fetch(self, cursor: str) -> RawPage:
        kind, url = cursor[:2], cursor[2:]
        self.spec()
        try:
            raw = self.client.page_bytes(url, headers=self._headers(track=kind == _TRACKED),
                                         table=self.name, delta=kind == _DELTA)
        except ResyncRequired as exc:
            exc.table = self.table
            raise
        # The next link read off the raw page lets the fetcher ask for the next page at once and leave
        # decoding to the writer thread (the service is the bottleneck: it should never wait for us).
        hint = _scan_next_link(raw)
        if hint is not None:
            return RawPage(raw, kind + hint, cursor)
        body = self._decode(raw, url)  # no link found by scanning: decode here to be sure there is none
        nxt = body.get("@odata.nextLink")
        return RawPage(body, (kind + nxt) if nxt else None, cursor)

    def _decode(self, raw: bytes, url: str) -> dict[str, Any]:
        body = self.client.session.decode_json(raw, url)
        if not isinstance(body, dict):
            raise ApiError("dataverse answered a page that is not a JSON object", service="dataverse")
        return body

    def _check_next(self, raw: RawPage, link: str | None) -> None:
        """Stop before staging a page whose own next link is not the one read ahead from its bytes.

        Never seen from Dataverse; the page is not staged, so the checkpoint still points at it and the
        next run reads on from there.
        """
        if (raw.cursor[:2] + link if link else None) != raw.next:
            raise SyncError(f"{self.table}: the next-page link read ahead differs from the page's own",
                            table=self.table, hint="run the sync again; it resumes from this page")

    def shape(self, raw: RawPage) -> Page:
        spec = self.spec()
        if isinstance(raw.body, bytes) and raw.cursor[:2] in (_TRACKED, _PLAIN) and not self._has_text:
            # Pages of a full read hold current rows only (no deletes): decoded by Arrow's JSON
            # reader, which neither builds Python objects nor holds the GIL.
            return self._shape_arrow(spec, raw)
        body = raw.body if isinstance(raw.body, dict) else self._decode(raw.body, raw.cursor[2:])
        self._check_next(raw, body.get("@odata.nextLink"))
        upserts: list[dict[str, Any]] = []
        deletes: list[str] = []
        for item in body.get("value", []):
            if str(item.get("@odata.context", "")).endswith("$deletedEntity") or item.keys() <= {
                    "id", "reason", "@odata.context"}:
                deletes.append(str(item["id"]))
            else:
                upserts.append(item)
        return Page(rows=self._shape(spec, upserts), deletes=deletes,
                    versions=[_row_version(r) for r in upserts], next=raw.next, token=body.get("@odata.deltaLink"))

    def _shape_arrow(self, spec: TableSpec, raw: RawPage) -> Page:
        """Shape a full-read page from its bytes with Arrow (the same values as :meth:`_shape`)."""
        import pyarrow.compute as pc
        import pyarrow.json as pj

        data: bytes = raw.body
        if b"\n" in data or b"\r" in data:
            # Outside strings (where they are escaped) line breaks are only white space; the reader
            # wants the whole page as one line.
            data = data.replace(b"\r", b" ").replace(b"\n", b" ")
        try:
            table = pj.read_json(pa.BufferReader(data),
                                 read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
                                 parse_options=pj.ParseOptions(explicit_schema=self._page_schema(),
                                                               unexpected_field_behavior="ignore"))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SyncError(f"{spec.id}: a value does not fit its column's type: {exc}", table=spec.id,
                            hint="the table's metadata may have changed during the sync; run it again") from exc
        top = table.select(["@odata.nextLink", "@odata.deltaLink"]).to_pylist()[0] if table.num_rows == 1 else {}
        self._check_next(raw, top.get("@odata.nextLink"))
        items = table.column("value").combine_chunks().flatten() if table.num_rows else None
        if items is None or not len(items):
            return Page(rows=[], next=raw.next, token=top.get("@odata.deltaLink"))
        field = {f.name: items.field(i) for i, f in enumerate(items.type)}
        arrays: dict[str, pa.Array] = {}
        for name, kind, extra in self._plan:
            if kind == "lookup":
                values = field[f"_{name}_value"]
                ann = field[f"_{name}_value{_LOOKUP_NAME}"]
                named = pc.if_else(pc.fill_null(pc.not_equal(ann, ""), False), ann, pa.scalar(extra, pa.string()))
                arrays[name] = values
                arrays[f"{name}_entitytype"] = pc.if_else(pc.is_valid(values), named, pa.scalar(None, pa.string()))
                continue
            arrays[name] = field[name]
            if kind == "choice":
                keys = pa.array(list(extra), pa.int64())
                labels = pa.array([extra[k] for k in extra], pa.string())
                arrays[f"{name}_label"] = pc.take(labels, pc.index_in(pc.cast(field[name], pa.int64()), value_set=keys))
        etag = field["@odata.etag"]
        has_etag = pc.fill_null(pc.not_equal(etag, ""), False)
        stripped = pc.utf8_trim(pc.replace_substring_regex(etag, "^W/", ""), '"')
        fallback = pc.cast(field["versionnumber"], pa.string()) if "versionnumber" in field else pa.scalar(
            None, pa.string())
        versions = pc.if_else(has_etag, stripped, fallback)
        rows = pa.Table.from_arrays([arrays[c.name] for c in spec.columns], names=[c.name for c in spec.columns])
        return Page(rows=rows, versions=versions, next=raw.next, token=top.get("@odata.deltaLink"))

    def _page_schema(self) -> pa.Schema:
        """The explicit schema of a full-read page for Arrow's JSON reader (rows typed as carriers)."""
        if self._schema is None:
            types = {c.name: c.type for c in self.spec().columns}
            fields: list[pa.Field] = []
            for name, kind, _extra in self._plan:
                if kind == "lookup":
                    fields += [pa.field(f"_{name}_value", pa.string()),
                               pa.field(f"_{name}_value{_LOOKUP_NAME}", pa.string())]
                else:
                    fields.append(pa.field(name, carrier(types[name])))
            fields.append(pa.field("@odata.etag", pa.string()))
            if "versionnumber" not in types:
                fields.append(pa.field("versionnumber", pa.int64()))
            self._schema = pa.schema([pa.field("value", pa.list_(pa.struct(fields))),
                                      pa.field("@odata.nextLink", pa.string()),
                                      pa.field("@odata.deltaLink", pa.string())])
        return self._schema

    def _shape(self, spec: TableSpec, raw: list[dict[str, Any]]) -> pa.Table:
        """Build the page's Arrow columns straight from the JSON rows (no per-row dicts)."""
        arrays: dict[str, pa.Array] = {}
        types = {c.name: c.type for c in spec.columns}
        for name, kind, extra in self._plan:
            if kind == "lookup":
                prop = f"_{name}_value"
                values = [r.get(prop) for r in raw]
                arrays[name] = pa.array(values, pa.string())
                ann = prop + _LOOKUP_NAME
                arrays[f"{name}_entitytype"] = pa.array(
                    [(r.get(ann) or extra) if v is not None else None for r, v in zip(raw, values, strict=True)],
                    pa.string())
                continue
            values = [r.get(name) for r in raw]
            if kind == "choice":
                arrays[f"{name}_label"] = pa.array([None if v is None else extra.get(v) for v in values], pa.string())
            elif kind == "text":
                values = [None if v is None else str(v) for v in values]
            try:
                arrays[name] = pa.array(values, carrier(types[name]))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise SyncError(f"{spec.id}.{name}: a value does not fit {types[name]}: {exc}", table=spec.id,
                                hint="the table's metadata may have changed during the sync; run it again") from exc
        return pa.Table.from_arrays([arrays[c.name] for c in spec.columns], names=[c.name for c in spec.columns])
