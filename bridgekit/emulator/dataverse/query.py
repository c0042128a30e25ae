"""Reads of the emulated Dataverse Web API: entity-set queries, keyset paging, change tracking, shaping.

Paging uses a keyset, not an offset: the ``$skiptoken`` paging cookie (§1.7) carries the last row's
sort-key values and id, so a page starts strictly after the previous one and rows written by other
clients between pages can neither shift a row into a page twice nor push one out. A change-tracking
full read additionally pins the store version seen by its first page (``version <= snapshot``), so the
pages form one consistent snapshot and the delta link (token = snapshot) picks up everything after it.
"""

from __future__ import annotations

import html
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import orjson

from bridgekit.emulator.dataverse.common import (
    CRM,
    FORMATTED,
    LOOKUP_NAME,
    NAV_NAME,
    DvError,
    NavProp,
    Prefer,
    Reply,
    annotation_filter,
    edm_type,
    formatted_value,
    lookup_target,
    nav_for_value,
    nav_props,
    unknown_property,
)
from bridgekit.emulator.dataverse.metadata import CollectionNav, collection_navs, many_to_many_names
from bridgekit.emulator.odata_filter import (
    FieldRef,
    FilterError,
    Lambda,
    LambdaCompiler,
    compile_filter,
    register_functions,
)
from bridgekit.emulator.schema import Column, Table
from bridgekit.emulator.store import Store

__all__ = ["MAX_PAGE", "QueryOptions", "Reader", "parse_options", "table_filter"]

#: Characters left as they are in the query options of a ``<nav>@odata.nextLink``.
_LINK_SAFE = ",'()$/"
#: Dataverse's maximum (and default) page size (§1.7) and the cap of ``$count`` (§1.6).
MAX_PAGE = 5000
_SUPPORTED = {"$select", "$filter", "$orderby", "$top", "$expand", "$count", "$skiptoken", "$deltatoken", "$apply"}
_REJECTED = {"$skip", "$search", "$format"}
#: Dataverse query parameters without a ``$`` that the emulator does not serve (``fetchXml`` is routed to
#: :mod:`.fetchxml` before options are parsed): refused rather than ignored.
_REFUSED_CUSTOM = {"fetchXml", "sql", "savedQuery", "userQuery"}
_TRACKING_REJECTS = ("$filter", "$orderby", "$expand", "$top")


def _check_tracking(table: Table, opts: QueryOptions) -> None:
    """A tracked read (first or delta) needs change tracking on the table and none of the options it excludes."""
    if not table.change_tracking:
        raise DvError(400, "0x80072491", f"Entity {table.logical_name} isn't enabled for change tracking.")
    for opt in _TRACKING_REJECTS:
        if opt in opts.raw:
            raise DvError(400, "0x80060888",
                          f'The "{opt}" query parameter isn\'t supported when Change Tracking is enabled.')
#: Error for an expired or forcibly invalidated delta token. The Web API code is not documented (§1.11,
#: §6). Dataverse's RetrieveEntityChanges (the SDK message behind change tracking) reports an old
#: version stamp as ExpiredVersionStamp 0x80044352, "Version stamp associated with the client has
#: expired. Please perform a full sync." (seen in third-party sync code), so the emulator answers 400
#: with that code and message, plus a hint to re-initialise with Prefer: odata.track-changes.
DELTA_EXPIRED_CODE = "0x80044352"
_DELTA_DATE = "%m/%d/%Y %H:%M:%S"


@dataclass
class Expand:
    """One ``$expand`` item: a single-valued navigation property, optionally with ``$select``/``$ref``."""

    nav: NavProp
    target: Table
    select: list[Column] | None = None
    ref: bool = False


@dataclass
class CollectionExpand:
    """One ``$expand`` of a collection-valued navigation property with its own query options."""

    nav: CollectionNav
    select: list[Column] | None = None
    where: str = ""
    params: list[Any] = field(default_factory=list)
    orderby: list[tuple[Column, bool]] = field(default_factory=list)
    top: int | None = None
    #: The options as sent (``$select=fullname``...), for the ``<nav>@odata.nextLink`` URL.
    options: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Scope:
    """A filtered collection (``accounts(<id>)/contact_customer_accounts``): the rows of one record's collection."""

    nav: CollectionNav
    parent_id: str
    #: The resource path, as ``@odata.nextLink`` repeats it.
    path: str


@dataclass
class QueryOptions:
    """Parsed system query options of one request."""

    raw: dict[str, str] = field(default_factory=dict)
    select: list[Column] | None = None
    where: str = ""
    params: list[Any] = field(default_factory=list)
    orderby: list[tuple[Column, bool]] = field(default_factory=list)
    top: int | None = None
    expand: list[Expand] = field(default_factory=list)
    collections: list[CollectionExpand] = field(default_factory=list)
    #: ``$expand`` items as ``@odata.context`` lists them (request order).
    expand_ctx: list[str] = field(default_factory=list)
    count: bool = False
    #: Parameter aliases (``@p1``) of the request (``$apply``'s ``filter(...)`` may use them).
    aliases: dict[str, str] = field(default_factory=dict)


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses and quotes."""
    out: list[str] = []
    buf: list[str] = []
    depth, quoted = 0, False
    for ch in text:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return [s.strip() for s in out if s.strip()]


def _select(table: Table, text: str) -> list[Column]:
    cols: list[Column] = []
    for name in split_top(text):
        col = next((c for c in table.columns if c.json_name == name), None)
        if col is None:
            # Lookups must be selected as _x_value; the bare name or the navigation property fails (§1.4).
            raise unknown_property(name, table.logical_name)
        if col not in cols:
            cols.append(col)
    return cols


def parse_options(table: Table, tables: Mapping[str, Table], query: Sequence[tuple[str, str]]) -> QueryOptions:
    """Validate and parse ``$select``/``$filter``/``$orderby``/``$top``/``$expand``/``$count``.

    Raises:
        DvError: 0x80060888 for unknown properties, syntax errors and unsupported options.
    """
    opts = QueryOptions()
    aliases: dict[str, str] = {}
    for key, value in query:
        if key.startswith("@"):
            aliases[key] = value
        elif key in _REFUSED_CUSTOM:
            # These change what a query means; ignoring one would answer a different question.
            raise DvError(400, "0x80060888", f"The query parameter {key} is not supported by the emulator.")
        elif key.startswith("$"):
            if key in _REJECTED:
                raise DvError(400, "0x80060888", f"The query parameter {key} is not supported")
            if key not in _SUPPORTED:
                raise DvError(400, "0x80060888", f"The query parameter {key} is not supported")
            opts.raw[key] = value
    if "$apply" in opts.raw:
        # The aggregation is parsed and run by .apply; only $orderby (group properties) and $top go with it.
        for key in opts.raw:
            if key not in ("$apply", "$orderby", "$top"):
                raise DvError(400, "0x80060888", f"The query parameter {key} is not supported together with "
                                                 "$apply by the emulator: put a filter(...) transformation first "
                                                 "in $apply instead.")
        if "$top" in opts.raw:
            opts.top = _top(opts.raw["$top"])
        opts.aliases = aliases
        return opts
    if "$select" in opts.raw:
        opts.select = _select(table, opts.raw["$select"])
    if "$filter" in opts.raw:
        opts.where, opts.params = table_filter(table, tables, opts.raw["$filter"], aliases)
    if "$orderby" in opts.raw:
        opts.orderby = _orderby(table, opts.raw["$orderby"])
    if "$top" in opts.raw:
        opts.top = _top(opts.raw["$top"])
    if "$count" in opts.raw:
        value = opts.raw["$count"].lower()
        if value not in ("true", "false"):
            raise DvError(400, "0x80060888", f"'{opts.raw['$count']}' is not a valid count option.")
        opts.count = value == "true"
    if "$expand" in opts.raw:
        _expand(table, tables, opts.raw["$expand"], opts)
    return opts


def table_filter(table: Table, tables: Mapping[str, Table], text: str, aliases: Mapping[str, str]) -> tuple[str, list[Any]]:
    """``$filter`` compiled for ``table`` (lambdas over its collection-valued navigation properties included)."""
    try:
        return compile_filter(text, resolver(table, tables), aliases, lambdas=lambdas(table, tables))
    except FilterError as exc:
        raise DvError(400, "0x80060888", exc.message) from None


def _orderby(table: Table, text: str) -> list[tuple[Column, bool]]:
    out: list[tuple[Column, bool]] = []
    for item in split_top(text):
        name, _, direction = item.partition(" ")
        direction = direction.strip().lower() or "asc"
        col = next((c for c in table.columns if c.json_name == name.strip()), None)
        if col is None:
            raise unknown_property(name.strip(), table.logical_name)
        if direction not in ("asc", "desc"):
            raise DvError(400, "0x80060888", f"Syntax error at position {len(name) + 1} in '{item}'.")
        out.append((col, direction == "desc"))
    return out


def _top(text: str) -> int:
    try:
        top = int(text)
    except ValueError:
        raise DvError(400, "0x80060888", f"Invalid value '{text}' for $top query option found. "
                      "The $top query option requires a non-negative integer value.") from None
    if top < 0:
        raise DvError(400, "0x80060888", f"Invalid value '{top}' for $top query option found. "
                      "The $top query option requires a non-negative integer value.")
    return top


def _collection_expand(nav: CollectionNav, tables: Mapping[str, Table], inner: str) -> CollectionExpand:
    """Options inside a collection-valued ``$expand``: ``$select``, ``$filter``, ``$orderby``, ``$top``."""
    exp = CollectionExpand(nav)
    target = nav.source
    for opt in split_top(inner, ";"):
        key, _, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if key == "$select":
            exp.select = _select(target, value)
        elif key == "$filter":
            exp.where, exp.params = table_filter(target, tables, value, {})
        elif key == "$orderby":
            exp.orderby = _orderby(target, value)
        elif key == "$top":
            exp.top = _top(value)
        elif key == "$expand":
            # With a nested $expand the service pages every expanded collection (join-tables.md); the
            # emulator does not implement that mode.
            raise DvError(400, "0x80060888", "A nested $expand inside a collection-valued navigation property "
                                             "is not supported by the emulator.")
        else:
            # $skip, $count, $search and $levels are not supported inside $expand (join-tables.md).
            raise DvError(400, "0x80060888", f"The query option '{key}' is not supported inside $expand.")
        exp.options.append((key, value))
    return exp


def _expand(table: Table, tables: Mapping[str, Table], text: str, opts: QueryOptions) -> None:
    navs = nav_props(table)
    out: list[Expand] = opts.expand
    items = split_top(text)
    if len(items) > 15:
        raise DvError(400, "0x80060888", "The number of $expand options exceeds the limit of 15.")
    for item in items:
        m = re.fullmatch(r"([A-Za-z0-9_]+)(/\$ref)?\s*(?:\((.*)\))?", item, re.S)
        if not m:
            raise DvError(400, "0x80060888", f"Syntax error in $expand at '{item}'.")
        name, ref, inner = m.group(1), bool(m.group(2)), m.group(3)
        nav = navs.get(name)
        coll = collection_navs(table, tables).get(name) if nav is None else None
        if coll is not None:
            if ref:
                raise DvError(400, "0x80060888", "Expand with $ref is only supported on lookup type navigation "
                                                 "property.")
            cexp = _collection_expand(coll, tables, inner or "")
            opts.collections.append(cexp)
            opts.expand_ctx.append(f"{name}({','.join(c.json_name for c in cexp.select or [])})")
            continue
        if nav is None and name in many_to_many_names(table, tables):
            raise DvError(400, "0x80060888", f"The many-to-many navigation property '{name}' cannot be expanded "
                                             "by the emulator (it keeps no intersect rows).")
        if nav is None:
            raise unknown_property(name, table.logical_name)
        target = tables.get(nav.targets[0]) if len(nav.targets) == 1 else None
        if target is None:
            # ownerid points at systemuser or team (principal): expand with the first known target.
            target = next((tables[t] for t in nav.targets if t in tables), None)
        if target is None:
            raise DvError(400, "0x80060888", f"The navigation property '{name}' cannot be expanded by the emulator.")
        exp = Expand(nav, target, ref=ref)
        for opt in split_top(inner or "", ";"):
            key, _, value = opt.partition("=")
            if key.strip() == "$select":
                exp.select = _select(target, value)
            else:
                raise DvError(400, "0x80060888", f"The query option '{key.strip()}' is not supported inside "
                                                 "$expand by the emulator.")
        out.append(exp)
        opts.expand_ctx.append(f"{name}({','.join(c.json_name for c in exp.select or [])})")


def resolver(table: Table, tables: Mapping[str, Table], alias: str = "") -> Callable[[str], FieldRef]:
    """The ``$filter`` property resolver for ``table`` (columns, ``_x_value`` lookups, ``nav/column``).

    With ``alias`` every column is read from that alias's row (inside a lambda's subquery).
    """
    navs = nav_props(table)
    outer = alias or Store.table_sql(table.logical_name)

    def resolve(path: str) -> FieldRef:
        if "/" in path:
            nav_name, _, rest = path.partition("/")
            nav = navs.get(nav_name)
            target = tables.get(nav.targets[0]) if nav and nav.targets else None
            col = target.column(rest) if target and "/" not in rest else None
            if nav is None or target is None or col is None or (col.is_lookup and rest == col.name):
                raise FilterError(f"Could not find a property named '{rest if nav else nav_name}' on type "
                                  f"'{CRM}.{target.logical_name if target else table.logical_name}'.")
            # Lookup traversal (filter-rows.md): a correlated subquery on the target table; the outer
            # table is qualified because both tables have a "data" column.
            inner_field = Store.field(col.json_name).replace("data", "t.data", 1)
            link = Store.field(nav.column.json_name).replace("data", f"{outer}.data", 1)
            sql = (f"(SELECT {inner_field} FROM {Store.table_sql(target.logical_name)} t "
                   f"WHERE t.id = {link})")
            return FieldRef(sql, edm_type(col), path)
        col = next((c for c in table.columns if c.json_name == path), None)
        if col is None:
            raise FilterError(f"Could not find a property named '{path}' on type '{CRM}.{table.logical_name}'.")
        if col.name == table.primary_id:
            return FieldRef(f"{alias}.id" if alias else "id", "Edm.Guid", path)
        sql = Store.field(col.json_name)
        return FieldRef(sql.replace("data", f"{alias}.data", 1) if alias else sql, edm_type(col), path)

    return resolve


def lambdas(table: Table, tables: Mapping[str, Table], alias: str = "", var: str = "",
            counter: list[int] | None = None) -> LambdaCompiler:
    """Compiles ``nav/any(c:...)`` and ``nav/all(c:...)`` over ``table``'s collection-valued navigation
    properties (filter-rows.md, lambda operators) into correlated ``EXISTS`` subqueries.

    ``alias`` is the SQL alias of ``table``'s row (the collection table itself when empty); inside a lambda
    body ``var`` is the enclosing variable, which nested lambda paths start with (``c/Account_Tasks``).
    """
    navs = collection_navs(table, tables)
    parent = f"{alias or Store.table_sql(table.logical_name)}.id"
    seq = counter if counter is not None else [0]

    def compile_lambda(compiler: Any, node: Lambda) -> str:
        path = node.path
        if var:
            head, _, path = path.partition("/")
            if head != var:
                raise FilterError(f"The lambda operator '{node.op}' at position {node.pos} must apply to a property "
                                  f"of '{var}' here: properties of the outer table inside a lambda are not "
                                  "supported by the emulator.")
        nav = navs.get(path)
        if nav is None:
            if path in many_to_many_names(table, tables):
                raise FilterError(f"The lambda operator '{node.op}' over the many-to-many relationship '{path}' "
                                  "is not supported by the emulator.")
            if path in nav_props(table) or "/" in path:
                raise FilterError(f"The lambda operator '{node.op}' at position {node.pos} applies to a "
                                  f"collection-valued navigation property; '{path}' is not one.")
            raise FilterError(f"Could not find a property named '{path}' on type '{CRM}.{table.logical_name}'.")
        seq[0] += 1
        inner = f"l{seq[0]}"
        source = f"{Store.table_sql(nav.source.logical_name)} {inner}"
        link = nav.link_sql(inner, parent)
        if node.body is None:
            return f"(EXISTS (SELECT 1 FROM {source} WHERE {link}))"
        own = resolver(nav.source, tables, inner)

        def resolve(name: str) -> FieldRef:
            head, _, rest = name.partition("/")
            if head != node.var or not rest:
                raise FilterError(f"The property '{name}' inside the lambda operator '{node.op}' does not start "
                                  f"with its variable '{node.var}/': properties of the outer table inside a "
                                  "lambda are not supported by the emulator.")
            return own(rest)

        body = compiler.nested(resolve, lambdas(nav.source, tables, inner, node.var, seq)).node(node.body)
        if node.op == "any":
            return f"(EXISTS (SELECT 1 FROM {source} WHERE {link} AND {body}))"
        return f"(NOT EXISTS (SELECT 1 FROM {source} WHERE {link} AND NOT coalesce({body}, 0)))"

    return compile_lambda


# -- paging cookie ----------------------------------------------------------------------------------------

_ATTR = re.compile(r'([\w.-]+)="([^"]*)"')


def _attrs(text: str) -> dict[str, str]:
    return {k: html.unescape(v) for k, v in _ATTR.findall(text)}


def _xml_attr(value: str) -> str:
    return html.escape(value, quote=True)


@dataclass
class Cookie:
    """Position of the next page: the paging cookie of §1.7 plus the emulator's keyset and snapshot."""

    page: int = 1
    last: list[Any] = field(default_factory=list)  # sort-key values of the last row served
    last_id: str = ""
    first_id: str = ""
    tracking: bool = False
    snapshot: int | None = None  # store version pinned by a tracked full read / a delta feed
    at: float | None = None  # when the snapshot was taken (becomes the delta token's date)
    last_version: int | None = None  # delta feeds page by (version, id)


def encode_cookie(c: Cookie, pk: str, sort_names: Sequence[str]) -> str:
    """The decoded-once ``$skiptoken``: ``<cookie pagenumber=.. pagingcookie=.. istracking=.. />`` (§1.7)."""
    extra = ""
    if c.snapshot is not None:
        extra += f' snapshot="{c.snapshot}" at="{c.at or 0:.3f}"'
    if c.last_version is not None:
        extra += f' lastversion="{c.last_version}"'
    inner = f'<cookie page="{c.page}"{extra}>'
    for name, value in zip(sort_names, c.last, strict=True):
        if name == pk:
            continue  # the primary key is written once, below (it is the cookie's last/first element)
        # Sort values keep their JSON type so the next page binds them exactly as compared.
        inner += f'<{name} last="{_xml_attr(orjson.dumps(value).decode())}" />'
    inner += (f'<{pk} last="{{{c.last_id.upper()}}}" first="{{{c.first_id.upper()}}}" /></cookie>')
    return (f'<cookie pagenumber="{c.page + 1}" pagingcookie="{quote(inner, safe="")}" '
            f'istracking="{"True" if c.tracking else "False"}" />')


def decode_cookie(token: str, pk: str, sort_names: Sequence[str]) -> Cookie:
    """Parse a ``$skiptoken`` produced by :func:`encode_cookie` (raises DvError when it is not one)."""
    bad = DvError(400, "0x80060888", "The $skiptoken value is not a valid paging cookie for this query. "
                                     "Use @odata.nextLink unchanged, with the same query options.")
    outer = _attrs(token)
    if "pagingcookie" not in outer:
        raise bad
    inner = unquote(outer["pagingcookie"])
    head = re.match(r"<cookie\s([^>]*)>", inner)
    elems = dict(re.findall(r"<([\w.]+)\s([^>]*?)/>", inner))
    if head is None or pk not in elems:
        raise bad
    h = _attrs(head.group(1))
    try:
        c = Cookie(page=int(h.get("page", "1")) + 1, tracking=outer.get("istracking") == "True")
        if "snapshot" in h:
            c.snapshot, c.at = int(h["snapshot"]), float(h["at"])
        if "lastversion" in h:
            c.last_version = int(h["lastversion"])
        pk_attrs = _attrs(elems[pk])
        c.last_id = pk_attrs["last"].strip("{}").lower()
        c.first_id = pk_attrs.get("first", "").strip("{}").lower()
        for name in sort_names:
            if name == pk:
                # Ordering by the primary key (a tie-breaker such as "modifiedon asc,accountid asc").
                c.last.append(c.last_id)
                continue
            if name not in elems:
                raise bad
            c.last.append(orjson.loads(_attrs(elems[name])["last"]))
    except (KeyError, ValueError, orjson.JSONDecodeError):
        raise bad from None
    return c


def _keyset(sort: Sequence[tuple[str, bool, bool]], values: Sequence[Any], last_id: str) -> tuple[str, list[Any]]:
    """SQL for "strictly after this row" under ORDER BY sort..., id (nulls first ascending, as SQLite)."""
    ors: list[str] = []
    params: list[Any] = []
    prefix: list[str] = []
    prefix_params: list[Any] = []
    for (expr, desc, text), value in zip(sort, values, strict=True):
        coll = " COLLATE NOCASE" if text else ""
        if value is None:
            after, after_p = ("0", []) if desc else (f"{expr} IS NOT NULL", [])
            equal, equal_p = f"{expr} IS NULL", []
        else:
            after = f"({expr} < ?{coll} OR {expr} IS NULL)" if desc else f"{expr} > ?{coll}"
            after_p = [value]
            equal, equal_p = f"{expr} = ?{coll}", [value]
        ors.append("(" + " AND ".join([*prefix, after]) + ")")
        params += prefix_params + after_p
        prefix.append(equal)
        prefix_params += equal_p
    ors.append("(" + " AND ".join([*prefix, "id > ?"]) + ")")
    params += [*prefix_params, last_id]
    return "(" + " OR ".join(ors) + ")", params


def delta_token(version: int, at: float) -> str:
    """``<version>!<MM/dd/yyyy HH:mm:ss>`` (§1.11)."""
    return f"{version}!{datetime.fromtimestamp(at, UTC).strftime(_DELTA_DATE)}"


def parse_delta_token(token: str) -> tuple[int, float]:
    """(version, epoch seconds) of a delta token; DvError when malformed."""
    version, _, stamp = token.partition("!")
    try:
        when = datetime.strptime(stamp, _DELTA_DATE).replace(tzinfo=UTC).timestamp()
        return int(version), when
    except ValueError:
        raise DvError(400, "0x80060888", f"The delta token '{token}' is not valid.") from None


# -- the reader ---------------------------------------------------------------------------------------------


@dataclass
class ReadContext:
    """What a read needs besides the query: the service root URL, settings and the fault flag."""

    root: str
    prefer: Prefer
    max_delta_age_s: float
    force_delta_expiry: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


def _by_ids(conn: sqlite3.Connection, coll: str, columns: str, ids: Iterable[str]) -> Iterator[tuple[Any, ...]]:
    """``(id, *columns)`` of the stored records with these ids, asked 500 ids at a time (SQLite's
    bound-parameter limit)."""
    id_list = sorted(ids)
    for i in range(0, len(id_list), 500):
        chunk = id_list[i:i + 500]
        sql = f"SELECT id, {columns} FROM {Store.table_sql(coll)} WHERE id IN ({', '.join('?' * len(chunk))})"
        yield from conn.execute(sql, chunk)


class Reader:
    """Serves entity-set reads, single-record reads and change-tracking feeds from the store."""

    def __init__(self, store: Store, tables: Mapping[str, Table]) -> None:
        self.store = store
        self.tables = tables
        self._fast_strip: dict[str, list[str]] = {}
        self._internal: dict[str, list[str]] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def _internal_keys(self, table: Table) -> list[str]:
        """Internal keys a table's records may carry (polymorphic lookup types)."""
        keys = self._internal.get(table.logical_name)
        if keys is None:
            keys = [f"@emu.{c.json_name}.type" for c in table.columns
                    if c.is_lookup and (len(c.targets) > 1 or c.type in ("Customer", "Owner"))]
            self._internal.setdefault(table.logical_name, keys)
        return keys

    @staticmethod
    def _context(root: str, table: Table, opts: QueryOptions, suffix: str = "") -> str:
        parts = [c.json_name for c in opts.select] if opts.select else []
        parts += opts.expand_ctx
        sel = f"({','.join(parts)})" if parts else ""
        return f"{root}/$metadata#{table.entity_set}{sel}{suffix}"

    def _projection(self, table: Table, select: list[Column]) -> str:
        """SQL building the served JSON of a ``$select`` in SQLite (no per-row Python work)."""
        names = [c.json_name for c in select]
        if table.primary_id not in names:
            names.append(table.primary_id)
        if any(c.type == "Money" for c in select) and table.column("transactioncurrencyid") is not None \
                and "_transactioncurrencyid_value" not in names:
            # Money columns bring the currency lookup along (§1.4).
            names.append("_transactioncurrencyid_value")
        args = ["'@odata.etag'", "'W/\"' || version || '\"'"]
        for n in names:
            safe = n.replace("'", "").replace('"', "")
            args += [f"'{safe}'", f"data -> '$.\"{safe}\"'"]
        return f"json_object({', '.join(args)})"

    def _fast_rows(self, table: Table, rows: Iterable[tuple[str, int, str]]) -> list[str]:
        """Rows of stored JSON text with the etag spliced in and internal keys removed (the hot path)."""
        return [self._fast_one(version, data) for _rid, version, data in rows]

    def _lookup_annotated(self, table: Table, rows: Sequence[tuple[str, int, str]],
                          wants: Callable[[str], bool]) -> list[str]:
        """All columns plus lookup annotations only (what a sync asks for): no per-column formatting.

        Same output as :meth:`shape` when FormattedValue is not wanted, but only the lookup columns are
        visited, which keeps annotated change-tracking pages close to the speed of plain ones.
        """
        lookups = [(c, c.json_name) for c in table.columns if c.is_lookup]
        want_nav, want_name = wants(NAV_NAME), wants(LOOKUP_NAME)
        out: list[str] = []
        for _rid, version, data in rows:
            rec = orjson.loads(data)
            served: dict[str, Any] = {"@odata.etag": f'W/"{version}"'}
            for col, key in lookups:
                if rec.get(key) is None:
                    continue
                target = lookup_target(col, rec)
                if want_nav:
                    served[f"{key}@{NAV_NAME}"] = nav_for_value(table, col, target)
                if want_name and target:
                    served[f"{key}@{LOOKUP_NAME}"] = target
            for key, value in rec.items():
                if not key.startswith("@emu."):
                    served[key] = value
            out.append(orjson.dumps(served).decode())
        return out

    @staticmethod
    def _fast_one(version: int, data: str) -> str:
        if '"@emu.' in data:
            rec = orjson.loads(data)
            data = orjson.dumps({k: v for k, v in rec.items() if not k.startswith("@emu.")}).decode()
        if len(data) > 2:
            return f'{{"@odata.etag":"W/\\"{version}\\"",{data[1:]}'
        return f'{{"@odata.etag":"W/\\"{version}\\""}}'

    def _fast_page(self, rows: Sequence[tuple[str, int, bytes]]) -> bytes:
        """Stored records as served, comma-joined: the hot path of full reads (UTF-8 bytes, no parsing).

        The etag is spliced in as text. Stores append internal ``@emu.`` keys after the served columns,
        so they are cut off when everything after the first ``,"@emu.`` is internal keys (as many ``":``
        as ``,"@emu.``); any other row is parsed and cleaned. A JSON string cannot contain ``,"@emu.``
        (its quote would be escaped), so ``find`` only finds keys.
        """
        out: list[bytes] = []
        append = out.append
        for _rid, version, data in rows:
            pos = data.find(b',"@emu.')
            if pos >= 0:
                tail = data[pos:]
                data = data[:pos] + b"}" if tail.count(b'":') == tail.count(b',"@emu.') else self._clean(data)
            elif data.startswith(b'{"@emu.'):
                data = self._clean(data)
            if len(data) > 2:
                append(b'{"@odata.etag":"W/\\"%d\\"",%s' % (version, data[1:]))
            else:
                append(b'{"@odata.etag":"W/\\"%d\\""}' % version)
        return b",".join(out)

    @staticmethod
    def _clean(data: bytes) -> bytes:
        rec = orjson.loads(data)
        return orjson.dumps({k: v for k, v in rec.items() if not k.startswith("@emu.")})

    def lookup_names(self, targets: Mapping[str, set[str]], conn: sqlite3.Connection) -> dict[str, str]:
        """Primary names of referenced records, by id (one query per target table)."""
        names: dict[str, str] = {}
        c = conn
        for logical, ids in targets.items():
            target = self.tables.get(logical)
            if target is None or not ids or logical not in self.store.collections():
                continue
            for rid, name in _by_ids(c, logical, Store.field(target.primary_name), ids):
                if name is not None:
                    names[rid] = str(name)
        return names

    def shape(self, table: Table, rec: dict[str, Any], version: int, *, select: list[Column] | None,
              wants: Callable[[str], bool] | None, names: Mapping[str, str],
              expands: Sequence[Expand] = (), expanded: Mapping[str, dict[str, Any]] | None = None,
              root: str = "", etag: bool = True) -> dict[str, Any]:
        """One served record: etag, selected columns with requested annotations, expanded lookups."""
        out: dict[str, Any] = {"@odata.etag": f'W/"{version}"'} if etag else {}
        if select is None:
            keys = [k for k in rec if not k.startswith("@emu.")]
        else:
            keys = [c.json_name for c in select]
            if table.primary_id not in keys:
                keys.append(table.primary_id)
            if any(c.type == "Money" for c in select) and table.column("transactioncurrencyid") \
                    and "_transactioncurrencyid_value" not in keys:
                keys.append("_transactioncurrencyid_value")
        for key in keys:
            value = rec.get(key)
            col = table.column(key) if wants else None
            if col is not None and wants is not None and value is not None:
                if col.is_lookup:
                    target = lookup_target(col, rec)
                    if wants(FORMATTED) and str(value) in names:
                        out[f"{key}@{FORMATTED}"] = names[str(value)]
                    if wants(NAV_NAME):
                        out[f"{key}@{NAV_NAME}"] = nav_for_value(table, col, target)
                    if wants(LOOKUP_NAME) and target:
                        out[f"{key}@{LOOKUP_NAME}"] = target
                elif wants(FORMATTED):
                    text = formatted_value(col, value, tables=self.tables)
                    if text is not None:
                        out[f"{key}@{FORMATTED}"] = text
            out[key] = value
        for exp in expands:
            col = exp.nav.column
            rid = rec.get(col.json_name)
            target_ok = rid is not None and lookup_target(col, rec) in exp.nav.targets
            hit = (expanded or {}).get(str(rid)) if target_ok else None
            if exp.ref:
                out[exp.nav.name] = ({"@odata.id": f"{root}/{exp.target.entity_set}({rid})"}
                                     if hit is not None else None)
            elif hit is None:
                out[exp.nav.name] = None
            else:
                inner = self.shape(exp.target, hit["data"], hit["version"], select=exp.select, wants=wants,
                                   names={}, root=root)
                out[exp.nav.name] = inner
        return out

    def _expanded(self, expands: Sequence[Expand], recs: Sequence[dict[str, Any]],
                  conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for exp in expands:
            ids = {str(r[exp.nav.column.json_name]) for r in recs if r.get(exp.nav.column.json_name)}
            logical = exp.target.logical_name
            if not ids or logical not in self.store.collections():
                continue
            for rid, version, data in _by_ids(conn, logical, "version, data", ids):
                found[rid] = {"version": version, "data": orjson.loads(data)}
        return found

    def _lookup_ids(self, table: Table, recs: Sequence[dict[str, Any]], select: list[Column] | None
                    ) -> dict[str, set[str]]:
        # All lookups, not only the selected ones: a money column brings its currency lookup along.
        cols = [c for c in table.columns if c.is_lookup]
        targets: dict[str, set[str]] = {}
        for rec in recs:
            for col in cols:
                value = rec.get(col.json_name)
                if value:
                    target = lookup_target(col, rec)
                    if target:
                        targets.setdefault(target, set()).add(str(value))
        return targets

    def render(self, table: Table, rows: Sequence[tuple[str, int, str]], opts: QueryOptions,
               wants: Callable[[str], bool] | None, root: str, conn: sqlite3.Connection, *,
               projected: bool = False) -> list[str]:
        """JSON text of each row; ``rows`` hold stored data, or the SQL projection when ``projected``."""
        if projected:
            return [data for _, _, data in rows]
        plain = not opts.expand and not opts.collections
        if wants is None and plain and opts.select is None:
            return self._fast_rows(table, rows)
        if wants is not None and plain and opts.select is None and not wants(FORMATTED):
            return self._lookup_annotated(table, rows, wants)
        recs = [orjson.loads(data) for _, _, data in rows]
        names = self.lookup_names(self._lookup_ids(table, recs, opts.select), conn) \
            if wants is not None and wants(FORMATTED) else {}
        expanded = self._expanded(opts.expand, recs, conn) if opts.expand else {}
        ids = [rid for rid, _, _ in rows]
        children = [self._children(exp, ids, wants, root, conn) for exp in opts.collections]
        out: list[str] = []
        for rec, (rid, version, _) in zip(recs, rows, strict=True):
            shaped = self.shape(table, rec, version, select=opts.select, wants=wants, names=names,
                                expands=opts.expand, expanded=expanded, root=root)
            for exp, found in zip(opts.collections, children, strict=True):
                # Single-level expands are not paged: the link is the filtered collection with the
                # expand's options, without paging information (join-tables.md).
                shaped[exp.nav.name] = found.get(rid, [])
                qs = "&".join(f"{k}={quote(v, safe=_LINK_SAFE)}" for k, v in exp.options)
                shaped[f"{exp.nav.name}@odata.nextLink"] = (f"{root}/{table.entity_set}({rid})/{exp.nav.name}"
                                                             + (f"?{qs}" if qs else ""))
            out.append(orjson.dumps(shaped).decode())
        return out

    def _children(self, exp: CollectionExpand, parent_ids: Sequence[str], wants: Callable[[str], bool] | None,
                  root: str, conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
        """The expanded rows of one collection-valued navigation property for each parent id (at most
        ``$top``, and 5,000, per parent), shaped."""
        src = exp.nav.source
        found: dict[str, list[dict[str, Any]]] = {}
        if not parent_ids or src.logical_name not in self.store.collections():
            return found
        link = exp.nav.field_sql()
        sort = [(Store.field(c.json_name) if c.name != src.primary_id else "id", desc,
                 edm_type(c) in ("Edm.String", "Edm.Guid")) for c, desc in exp.orderby]
        order = "".join(f"{e}{' COLLATE NOCASE' if text else ''} {'DESC' if d else 'ASC'}, " for e, d, text in sort)
        cap = min(exp.top, MAX_PAGE) if exp.top is not None else MAX_PAGE
        where = f" AND ({exp.where})" if exp.where else ""
        raw: list[tuple[str, int, str, str]] = []
        ids = sorted(set(parent_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            sql = (f"SELECT id, version, data, pid FROM (SELECT id, version, data, {link} AS pid, "
                   f"row_number() OVER (PARTITION BY {link} ORDER BY {order}id ASC) AS rn "
                   f"FROM {Store.table_sql(src.logical_name)} WHERE {link} IN ({', '.join('?' * len(chunk))})"
                   f"{exp.nav.kind_sql()}{where}) WHERE rn <= ? ORDER BY pid, rn")
            raw += conn.execute(sql, [*chunk, *exp.params, cap]).fetchall()
        recs = [orjson.loads(data) for _, _, data, _ in raw]
        names = self.lookup_names(self._lookup_ids(src, recs, exp.select), conn) \
            if wants is not None and wants(FORMATTED) else {}
        select = exp.select
        if select is not None and exp.nav.column not in select:
            # The service returns the lookup that ties each row to its parent (join-tables.md examples).
            select = [*select, exp.nav.column]
        for rec, (_rid, version, _data, pid) in zip(recs, raw, strict=True):
            found.setdefault(pid, []).append(self.shape(src, rec, version, select=select, wants=wants,
                                                        names=names, root=root))
        return found

    # -- collection reads --------------------------------------------------------------------------
    def read_collection(self, table: Table, query: Sequence[tuple[str, str]], rc: ReadContext, *,
                        count_only: bool = False, scope: Scope | None = None) -> Reply:
        """``GET <set>`` (and ``GET <set>/$count``): filter, order, page, count, annotate, track.

        With ``scope``, the filtered collection of one record (``accounts(<id>)/contact_customer_accounts``).
        """
        opts = parse_options(table, self.tables, query)
        if "$apply" in opts.raw:
            if count_only or scope is not None or rc.prefer.track_changes:
                raise DvError(400, "0x80060888", "The query parameter $apply is only supported on an entity set "
                                                 "without change tracking.")
            from bridgekit.emulator.dataverse.apply import read_apply

            return read_apply(self, table, opts, rc)
        pref = rc.prefer
        wants = annotation_filter(pref.annotations)
        applied: list[str] = []
        if "$deltatoken" in opts.raw:
            return self.read_delta(table, opts, rc, count_only=count_only)
        sort_names = [c.json_name for c, _ in opts.orderby]
        cookie = decode_cookie(opts.raw["$skiptoken"], table.primary_id, sort_names) \
            if "$skiptoken" in opts.raw else None
        tracking = pref.track_changes or bool(cookie and cookie.tracking)
        if tracking and scope is not None:
            raise DvError(400, "0x80060888", "Change tracking is not supported on a navigation property's "
                                             "collection.")
        if tracking:
            _check_tracking(table, opts)
            applied.append("odata.track-changes")
        page_size = MAX_PAGE
        if pref.maxpagesize is not None:
            page_size = max(1, min(pref.maxpagesize, MAX_PAGE))
            applied.append(f"odata.maxpagesize={page_size}")
        paged = True
        if opts.top is not None and pref.maxpagesize is None:
            # $top limits the total; with odata.maxpagesize it is ignored (page-results.md, 2024).
            page_size, paged = min(opts.top, MAX_PAGE), False
        if pref.annotations:
            applied.append(f'odata.include-annotations="{pref.annotations}"')

        coll = Store.table_sql(table.logical_name)
        sort = [(Store.field(c.json_name) if c.name != table.primary_id else "id", desc,
                 edm_type(c) in ("Edm.String", "Edm.Guid")) for c, desc in opts.orderby]
        order_sql = ", ".join(f"{e}{' COLLATE NOCASE' if text else ''} {'DESC' if d else 'ASC'}"
                              for e, d, text in sort)
        order_sql = (order_sql + ", " if order_sql else "") + "id ASC"
        conds = [f"({opts.where})"] if opts.where else []
        params: list[Any] = list(opts.params)
        if scope is not None:
            conds.insert(0, f"({scope.nav.link_sql('', '?')})")
            params.insert(0, scope.parent_id)

        self.store.ensure_collection(table.logical_name)
        with self.store.read() as conn:
            register_functions(conn)
            snapshot = at = None
            if tracking:
                if cookie is not None and cookie.snapshot is not None:
                    snapshot, at = cookie.snapshot, cookie.at
                else:
                    snapshot, at = self.store.current_version(conn), time.time()
                conds.append("version <= ?")
                params.append(snapshot)
            base_conds, base_params = list(conds), list(params)
            if count_only:
                n = conn.execute(f"SELECT count(*) FROM {coll}" +
                                 (f" WHERE {' AND '.join(conds)}" if conds else ""), params).fetchone()[0]
                # /$count answers a bare number as text/plain, capped like $count (count-rows.md).
                return Reply(200, str(min(int(n), MAX_PAGE)).encode(), content_type="text/plain")
            if cookie is not None:
                ks, ks_params = _keyset(sort, cookie.last, cookie.last_id)
                conds.append(ks)
                params += ks_params
            plain = not opts.expand and not opts.collections
            projected = opts.select is not None and wants is None and plain
            fast = opts.select is None and wants is None and plain
            if projected:
                cols = self._projection(table, opts.select or [])
            elif fast:
                cols = "CAST(data AS BLOB)"
            else:
                cols = "data"
            sort_cols = "".join(f", {e}" for e, _, _ in sort)
            sql = (f"SELECT id, version, {cols}{sort_cols} FROM {coll}"
                   + (f" WHERE {' AND '.join(conds)}" if conds else "")
                   + f" ORDER BY {order_sql} LIMIT ?")
            raw = conn.execute(sql, [*params, page_size + 1 if paged else page_size]).fetchall()
            more = paged and len(raw) > page_size
            raw = raw[:page_size]
            total = None
            if opts.count or (wants and wants(f"{CRM}.totalrecordcount")):
                total = int(conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {coll}"
                                         + (f" WHERE {' AND '.join(base_conds)}" if base_conds else "")
                                         + f" LIMIT {MAX_PAGE + 1})", base_params).fetchone()[0])
            if fast:
                rows_json: list[str] | list[bytes] = [self._fast_page(raw)] if raw else []
            else:
                rows_json = [r.encode() for r in self.render(
                    table, [(r[0], r[1], r[2]) for r in raw], opts, wants, rc.root, conn, projected=projected)]

        head: dict[str, Any] = {"@odata.context": self._context(rc.root, table, opts)}
        if total is not None:
            if wants and wants(f"{CRM}.totalrecordcount"):
                head[f"@{CRM}.totalrecordcount"] = min(total, MAX_PAGE) if opts.count else -1
            if wants and wants(f"{CRM}.totalrecordcountlimitexceeded"):
                head[f"@{CRM}.totalrecordcountlimitexceeded"] = total > MAX_PAGE
            if opts.count:
                head["@odata.count"] = min(total, MAX_PAGE)
        tail: dict[str, Any] = {}
        if more:
            last = raw[-1]
            nxt = Cookie(page=cookie.page if cookie else 1, last=list(last[3:]), last_id=last[0],
                         first_id=raw[0][0], tracking=tracking, snapshot=snapshot, at=at)
            tail["@odata.nextLink"] = self._link(rc.root, table, query, skiptoken=encode_cookie(
                nxt, table.primary_id, sort_names), path=scope.path if scope else None)
        elif tracking:
            assert snapshot is not None and at is not None
            tail["@odata.deltaLink"] = self._link(rc.root, table, query, deltatoken=delta_token(snapshot, at))
        return self._page(head, rows_json, tail, applied)

    @staticmethod
    def _page(head: dict[str, Any], rows: Sequence[str] | Sequence[bytes], tail: dict[str, Any],
              applied: list[str]) -> Reply:
        joined = b",".join(r if isinstance(r, bytes) else r.encode() for r in rows)
        body = (orjson.dumps(head)[:-1] + b',"value":[' + joined + b"]"
                + (b"," + orjson.dumps(tail)[1:] if tail else b"}"))
        headers = {"Preference-Applied": ",".join(applied)} if applied else {}
        return Reply(200, body, headers)

    @staticmethod
    def _link(root: str, table: Table, query: Sequence[tuple[str, str]], *, skiptoken: str | None = None,
              deltatoken: str | None = None, path: str | None = None) -> str:
        keep = [(k, v) for k, v in query if k not in ("$skiptoken", "$deltatoken")]
        if deltatoken is not None:
            keep.append(("$deltatoken", deltatoken))
        if skiptoken is not None:
            keep.append(("$skiptoken", skiptoken))
        qs = "&".join(f"{quote(k, safe='$@')}={quote(v, safe='')}" for k, v in keep)
        return f"{root}/{path or table.entity_set}" + (f"?{qs}" if qs else "")

    # -- change tracking ---------------------------------------------------------------------------
    def read_delta(self, table: Table, opts: QueryOptions, rc: ReadContext, *, count_only: bool = False) -> Reply:
        """``GET <set>?$deltatoken=..``: rows changed since the token and ``$deletedEntity`` entries (§1.11)."""
        _check_tracking(table, opts)
        since, issued = parse_delta_token(opts.raw["$deltatoken"])
        if rc.force_delta_expiry or time.time() - issued > rc.max_delta_age_s:
            raise DvError(400, DELTA_EXPIRED_CODE,
                          "Version stamp associated with the client has expired. Please perform a full sync. "
                          "(The change-tracking token is older than the organization's change-tracking "
                          "retention: re-initialise with a full read sent with Prefer: odata.track-changes.)")
        cookie = decode_cookie(opts.raw["$skiptoken"], table.primary_id, []) if "$skiptoken" in opts.raw else None
        pref = rc.prefer
        page_size = MAX_PAGE
        applied: list[str] = ["odata.track-changes"] if pref.track_changes else []
        if pref.maxpagesize is not None:
            page_size = max(1, min(pref.maxpagesize, MAX_PAGE))
            applied.append(f"odata.maxpagesize={page_size}")
        wants = annotation_filter(pref.annotations)
        if pref.annotations:
            applied.append(f'odata.include-annotations="{pref.annotations}"')
        self.store.ensure_collection(table.logical_name)
        with self.store.read() as conn:
            current = self.store.current_version(conn)
            if since > current:
                raise DvError(400, "0x80060888", f"The delta token '{opts.raw['$deltatoken']}' is not valid.")
            if cookie is not None and cookie.snapshot is not None:
                upto, at = cookie.snapshot, cookie.at or time.time()
                after = (cookie.last_version or since, cookie.last_id)
            else:
                upto, at, after = current, time.time(), None
            if count_only:
                n = len(self.store.changes_since(table.logical_name, since, upto=upto, limit=MAX_PAGE, conn=conn))
                return Reply(200, str(n).encode(), content_type="text/plain")
            changes = self.store.changes_since(table.logical_name, since, upto=upto, after=after,
                                               limit=page_size + 1, conn=conn)
            more = len(changes) > page_size
            changes = changes[:page_size]
            live = [(ch.id, ch.version, ch.row.data) for ch in changes if ch.row is not None]
            shaped = self.render(table, live, opts, wants, rc.root, conn)
        by_id = dict(zip((r[0] for r in live), shaped, strict=True))
        deleted_ctx = orjson.dumps(f"{rc.root}/$metadata#{table.entity_set}/$deletedEntity").decode()
        rows_json = []
        for ch in changes:
            if ch.row is not None:
                rows_json.append(by_id[ch.id])
            else:
                rows_json.append(f'{{"@odata.context":{deleted_ctx},"id":"{ch.id}","reason":"deleted"}}')
        head = {"@odata.context": self._context(rc.root, table, opts, "/$delta")}
        query = [(k, v) for k, v in opts.raw.items() if k == "$select"]
        tail: dict[str, Any] = {}
        if more:
            last = changes[-1]
            nxt = Cookie(page=cookie.page if cookie else 1, last_id=last.id, first_id=changes[0].id,
                         tracking=True, snapshot=upto, at=at, last_version=last.version)
            tail["@odata.nextLink"] = self._link(rc.root, table, query, deltatoken=opts.raw["$deltatoken"],
                                                 skiptoken=encode_cookie(nxt, table.primary_id, []))
        else:
            tail["@odata.deltaLink"] = self._link(rc.root, table, query, deltatoken=delta_token(upto, at))
        return self._page(head, rows_json, tail, applied)

    # -- single records ----------------------------------------------------------------------------
    def read_one(self, table: Table, rid: str, query: Sequence[tuple[str, str]], rc: ReadContext) -> Reply:
        """``GET <set>(<key>)``: one record, 304 when ``If-None-Match`` matches (§1.8)."""
        opts = parse_options(table, self.tables, query)
        for opt in ("$filter", "$orderby", "$top", "$skiptoken", "$deltatoken", "$apply"):
            if opt in opts.raw:
                raise DvError(400, "0x80060888", f"The query parameter {opt} is not supported on a single record")
        row = self.store.get(table.logical_name, rid)
        if row is None:
            raise DvError(404, "0x80040217", f"{table.logical_name} With Id = {rid} Does Not Exist")
        etag = f'W/"{row.version}"'
        wants = annotation_filter(rc.prefer.annotations)
        inm = rc.headers.get("if-none-match")
        # Never 304 with $expand or annotations (§1.5, §1.8).
        if inm and inm.strip() == etag and wants is None and not opts.expand and not opts.collections:
            return Reply(304, b"", {"ETag": etag}, content_type=None)
        with self.store.read() as conn:
            body = self.render(table, [(row.id, row.version, row.data)], opts, wants, rc.root, conn)[0]
        ctx = orjson.dumps(self._context(rc.root, table, opts, "/$entity"))
        applied = {"Preference-Applied": f'odata.include-annotations="{rc.prefer.annotations}"'} \
            if rc.prefer.annotations else {}
        return Reply(200, b'{"@odata.context":' + ctx + b"," + body.encode()[1:], {"ETag": etag, **applied})
