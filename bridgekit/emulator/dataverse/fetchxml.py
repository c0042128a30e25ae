"""FetchXML for the emulated Dataverse Web API (``GET <set>?fetchXml=...``) and the conditions BulkDelete uses.

The subset served (fetchxml/overview.md, fetchxml/reference): ``<fetch>`` with ``top``, ``count``, ``page``,
``paging-cookie``, ``distinct``, ``aggregate``, ``returntotalrecordcount``; ``<entity>`` with
``<attribute>`` (``alias``, ``aggregate`` = count | countcolumn | sum | avg | min | max, ``groupby``,
``distinct``), ``<all-attributes>``, ``<order>`` (``attribute`` or ``alias``, ``descending``), ``<filter>``
(``type`` and | or, nested) with ``<condition>`` (the operators in :data:`OPERATORS` plus the date
operators of :data:`bridgekit.emulator.odata_filter.DATE_OPERATORS`, ``entityname`` for link-entity
columns, ``<value>`` children) and ``<link-entity>`` (``name``, ``from``, ``to``, ``alias``, ``link-type``
inner | outer, nested). Anything else is refused with 400 rather than ignored.

Results follow the Web API: main-table columns by logical name (lookups as ``_x_value``), link-entity
columns as ``alias.column``, aggregates by alias; with ``Prefer: odata.include-annotations`` the page
carries ``@Microsoft.Dynamics.CRM.fetchxmlpagingcookie`` and ``@Microsoft.Dynamics.CRM.morerecords``.
Paging is by page number and count (the cookie is checked and echoed), like the service without a cookie.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import orjson

from bridgekit.emulator.dataverse.common import CRM, DvError, Reply, annotation_filter, edm_type
from bridgekit.emulator.odata_filter import (
    DATE_OPERATORS,
    FilterError,
    date_window,
    register_functions,
    window_sql,
)
from bridgekit.emulator.schema import Column, Table
from bridgekit.emulator.store import Store

__all__ = ["OPERATORS", "FetchXml", "condition_sql", "run_fetchxml"]

_MAX_PAGE = 5000
#: Non-date condition operators served.
OPERATORS = {"eq", "ne", "neq", "gt", "ge", "lt", "le", "like", "not-like", "begins-with", "not-begin-with",
             "ends-with", "not-end-with", "in", "not-in", "null", "not-null", "between", "not-between",
             "eq-userid", "ne-userid", "eq-businessid", "ne-businessid"}
_COMPARE = {"eq": "=", "ne": "!=", "neq": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_AGGREGATES = {"count", "countcolumn", "sum", "avg", "min", "max"}


def _bad(message: str) -> DvError:
    # FetchXML that cannot be parsed or is not valid for the table (0x80041103 QueryBuilderNoAttribute is the
    # service's code for unknown attributes; malformed or unsupported queries use the generic 0x80040203).
    return DvError(400, "0x80040203", message)


def _column(table: Table, name: str | None) -> Column:
    col = table.column(name) if name else None
    if col is None:
        raise DvError(400, "0x80041103", f"'{table.logical_name}' entity doesn't contain attribute with Name = "
                                         f"'{name}'.")
    return col


def column_sql(alias: str, table: Table, col: Column) -> str:
    """SQL reading ``col`` of the row aliased ``alias``."""
    if col.name == table.primary_id:
        return f"{alias}.id"
    return Store.field(col.json_name).replace("json_extract(data", f"json_extract({alias}.data", 1)


def _typed(col: Column, raw: Any) -> Any:
    """A condition value (text from XML or JSON) as the column stores it."""
    if raw is None:
        return None
    edm = edm_type(col)
    text = str(raw).strip()
    try:
        if edm in ("Edm.Int32", "Edm.Int64"):
            return int(text)
        if edm in ("Edm.Decimal", "Edm.Double"):
            return float(text)
        if edm == "Edm.Boolean":
            return 1 if text.lower() in ("1", "true") else 0
        if edm == "Edm.Guid":
            return str(uuid.UUID(text.strip("{}")))
        if edm == "Edm.DateTimeOffset":
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if edm == "Edm.Date":
            return text[:10]
    except ValueError:
        raise _bad(f"The value '{text}' is not valid for attribute '{col.name}' of type {edm}.") from None
    return text


def condition_sql(sql: str, table: Table, col: Column, op: str, values: Sequence[Any], params: list[Any],
                  caller: tuple[str, str] | None = None) -> str:
    """SQL for one FetchXML condition on the column read by ``sql`` (values bound into ``params``)."""
    edm = edm_type(col)
    text = edm in ("Edm.String", "Edm.Guid")
    coll = " COLLATE NOCASE" if text else ""
    if op in DATE_OPERATORS:
        if edm not in ("Edm.DateTimeOffset", "Edm.Date"):
            raise _bad(f"The operator '{op}' applies to date and time columns; '{col.name}' is {edm}.")
        try:
            return window_sql(sql, edm, date_window(op, values[0] if values else None, datetime.now(UTC)), params)
        except FilterError as exc:
            raise _bad(exc.message) from None
    if op not in OPERATORS:
        raise _bad(f"The condition operator '{op}' is not supported by the emulator.")
    if op == "null":
        return f"({sql} IS NULL)"
    if op == "not-null":
        return f"({sql} IS NOT NULL)"
    if op in ("eq-userid", "ne-userid", "eq-businessid", "ne-businessid"):
        if caller is None:
            raise _bad(f"The operator '{op}' needs a calling user.")
        params.append(caller[0] if "userid" in op else caller[1])
        return f"({sql} = ? COLLATE NOCASE)" if op.startswith("eq") else f"({sql} != ? COLLATE NOCASE OR {sql} IS NULL)"
    typed = [_typed(col, v) for v in values]
    if op in ("in", "not-in"):
        if not typed:
            raise _bad(f"The operator '{op}' needs at least one value.")
        params += typed
        expr = f"({sql}{coll} IN ({', '.join('?' * len(typed))}))"
        return expr if op == "in" else f"(NOT coalesce({expr}, 0))"
    if op in ("between", "not-between"):
        if len(typed) != 2:
            raise _bad(f"The operator '{op}' needs exactly two values.")
        params += typed
        expr = f"({sql} BETWEEN ? AND ?)"
        return expr if op == "between" else f"(NOT coalesce({expr}, 0))"
    if len(typed) != 1:
        raise _bad(f"The operator '{op}' needs exactly one value.")
    value = typed[0]
    if op in ("like", "not-like", "begins-with", "not-begin-with", "ends-with", "not-end-with"):
        if not text:
            raise _bad(f"The operator '{op}' applies to text columns; '{col.name}' is {edm}.")
        pattern = {"like": value, "not-like": value, "begins-with": f"{value}%", "not-begin-with": f"{value}%",
                   "ends-with": f"%{value}", "not-end-with": f"%{value}"}[op]
        params.append(pattern)
        expr = f"({sql} LIKE ?)"
        return expr if not op.startswith("not") else f"(NOT coalesce({expr}, 0))"
    params.append(value)
    expr = f"{sql} {_COMPARE[op]} ?{coll}"
    return f"({expr} OR {sql} IS NULL)" if op in ("ne", "neq") else f"({expr})"


# -- parsing --------------------------------------------------------------------------------------------


@dataclass
class _Attr:
    alias_of: str  # entity alias ("" for the main entity)
    col: Column
    name: str  # output key
    aggregate: str | None = None
    groupby: bool = False
    distinct: bool = False


@dataclass
class _Link:
    table: Table
    alias: str
    sql_alias: str
    join: str
    join_params: list[Any] = field(default_factory=list)


@dataclass
class FetchXml:
    """A parsed FetchXML query."""

    table: Table
    attrs: list[_Attr] = field(default_factory=list)
    all_main: bool = False
    links: list[_Link] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    orders: list[tuple[str, bool]] = field(default_factory=list)
    top: int | None = None
    count: int | None = None
    page: int = 1
    cookie: str | None = None
    distinct: bool = False
    aggregate: bool = False
    total: bool = False


def _int_attr(el: ET.Element, name: str) -> int | None:
    raw = el.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _bad(f"The '{name}' attribute of <{el.tag}> must be a whole number, not '{raw}'.") from None
    if value < 1:
        raise _bad(f"The '{name}' attribute of <{el.tag}> must be at least 1.")
    return value


class _Parser:
    def __init__(self, tables: Mapping[str, Table], caller: tuple[str, str] | None) -> None:
        self.tables = tables
        self.caller = caller
        self.aliases: dict[str, tuple[Table, str]] = {}  # fetch alias -> (table, sql alias)
        self.n = 0

    def table(self, name: str | None) -> Table:
        t = self.tables.get(name or "")
        if t is None:
            raise DvError(404, "0x80040217", f"The entity with a name = '{name}' with namemapping = 'Logical' "
                                             "was not found in the MetadataCache.")
        return t

    def parse(self, text: str) -> FetchXml:
        try:
            root = ET.fromstring(text)  # noqa: S314 - ElementTree resolves no external entities
        except ET.ParseError as exc:
            raise _bad(f"The FetchXML is not well-formed XML: {exc}.") from None
        if root.tag != "fetch":
            raise _bad(f"The FetchXML root element must be <fetch>, not <{root.tag}>.")
        known = {"version", "mapping", "count", "page", "paging-cookie", "top", "distinct", "aggregate",
                 "returntotalrecordcount", "no-lock", "output-format", "latematerialize", "useraworderby",
                 "options", "datasource"}
        for key in root.attrib:
            if key not in known:
                raise _bad(f"The attribute '{key}' of <fetch> is not valid.")
        entities = [c for c in root if c.tag == "entity"]
        if len(entities) != 1 or len(root) != 1:
            raise _bad("<fetch> must contain exactly one <entity> element.")
        main = self.table(entities[0].get("name"))
        q = FetchXml(main)
        q.top, q.count, q.page = _int_attr(root, "top"), _int_attr(root, "count"), _int_attr(root, "page") or 1
        if q.top is not None and (q.count is not None or root.get("page") or root.get("paging-cookie")):
            raise _bad("The top attribute can't be specified with paging attribute page or count.")
        if q.top is not None and q.top > _MAX_PAGE:
            raise _bad(f"The top attribute must be at most {_MAX_PAGE}.")
        q.cookie = root.get("paging-cookie")
        q.distinct = root.get("distinct", "false").lower() == "true"
        q.aggregate = root.get("aggregate", "false").lower() == "true"
        q.total = root.get("returntotalrecordcount", "false").lower() == "true"
        self.aliases[""] = (main, "t0")
        self.entity(entities[0], main, "", "t0", q)
        if q.aggregate:
            if not q.attrs or any(a.aggregate is None and not a.groupby for a in q.attrs) or q.all_main:
                raise _bad("An aggregate query's attributes must each have an aggregate or groupby=\"true\".")
        elif any(a.aggregate or a.groupby for a in q.attrs):
            raise _bad("Aggregate attributes need aggregate=\"true\" on <fetch>.")
        if not q.attrs and not q.all_main:
            # A fetch without attributes returns the primary key only.
            q.attrs.append(_Attr("", _column(main, main.primary_id), main.primary_id))
        return q

    def entity(self, el: ET.Element, table: Table, alias: str, sql_alias: str, q: FetchXml) -> None:
        for child in el:
            tag = child.tag
            if tag == "attribute":
                self.attribute(child, table, alias, q)
            elif tag == "all-attributes":
                if alias:
                    for col in table.columns:
                        q.attrs.append(_Attr(alias, col, f"{alias}.{col.json_name}"))
                else:
                    q.all_main = True
            elif tag == "order":
                self.order(child, table, sql_alias, q)
            elif tag == "filter":
                q.where.append(self.filter(child, table, sql_alias, q.params))
            elif tag == "link-entity":
                self.link(child, table, sql_alias, q)
            else:
                raise _bad(f"The element <{tag}> is not supported inside <{el.tag}> by the emulator.")

    def attribute(self, el: ET.Element, table: Table, alias: str, q: FetchXml) -> None:
        col = _column(table, el.get("name"))
        agg = el.get("aggregate")
        if agg is not None and agg not in _AGGREGATES:
            raise _bad(f"The aggregate '{agg}' is not valid (count, countcolumn, sum, avg, min, max).")
        if el.get("dategrouping"):
            raise _bad("dategrouping is not supported by the emulator.")
        out = el.get("alias") or (f"{alias}.{col.json_name}" if alias else col.json_name)
        if (agg or el.get("groupby") == "true") and not el.get("alias"):
            raise _bad("An aggregate or groupby attribute needs an alias.")
        q.attrs.append(_Attr(alias, col, out, agg, el.get("groupby", "false") == "true",
                             el.get("distinct", "false") == "true"))

    def order(self, el: ET.Element, table: Table, sql_alias: str, q: FetchXml) -> None:
        desc = el.get("descending", "false").lower() == "true"
        if el.get("alias"):
            q.orders.append((f'"{el.get("alias", "").replace(chr(34), "")}"', desc))
            return
        col = _column(table, el.get("attribute"))
        q.orders.append((column_sql(sql_alias, table, col), desc))

    def filter(self, el: ET.Element, table: Table, sql_alias: str, params: list[Any]) -> str:
        kind = el.get("type", "and").lower()
        if kind not in ("and", "or"):
            raise _bad(f"The filter type '{kind}' is not valid (and, or).")
        parts: list[str] = []
        for child in el:
            if child.tag == "condition":
                parts.append(self.condition(child, table, sql_alias, params))
            elif child.tag == "filter":
                parts.append(self.filter(child, table, sql_alias, params))
            else:
                raise _bad(f"The element <{child.tag}> is not valid inside <filter>.")
        return "(" + f" {kind.upper()} ".join(parts or ["1"]) + ")"

    def condition(self, el: ET.Element, table: Table, sql_alias: str, params: list[Any]) -> str:
        if el.get("valueof"):
            raise _bad("Conditions comparing columns (valueof) are not supported by the emulator.")
        entity = el.get("entityname")
        if entity:
            if entity not in self.aliases:
                raise _bad(f"The entityname '{entity}' does not name a link-entity alias.")
            table, sql_alias = self.aliases[entity]
        col = _column(table, el.get("attribute"))
        op = (el.get("operator") or "").lower()
        values = [v.text or "" for v in el if v.tag == "value"]
        if el.get("value") is not None:
            values.insert(0, el.get("value") or "")
        return condition_sql(column_sql(sql_alias, table, col), table, col, op, values, params, self.caller)

    def link(self, el: ET.Element, parent: Table, parent_sql: str, q: FetchXml) -> None:
        target = self.table(el.get("name"))
        kind = el.get("link-type", "inner").lower()
        if kind not in ("inner", "outer"):
            raise _bad(f"The link-type '{kind}' is not supported by the emulator (inner, outer).")
        if el.get("intersect") == "true":
            raise _bad("Intersect (many-to-many) link-entities are not supported by the emulator.")
        from_col = _column(target, el.get("from"))
        to_col = _column(parent, el.get("to"))
        self.n += 1
        sql_alias = f"t{self.n}"
        alias = el.get("alias") or f"{target.logical_name}{self.n}"
        if alias in self.aliases:
            raise _bad(f"The link-entity alias '{alias}' is used twice.")
        self.aliases[alias] = (target, sql_alias)
        on = [f"{column_sql(sql_alias, target, from_col)} = {column_sql(parent_sql, parent, to_col)} COLLATE NOCASE"]
        # Conditions inside a link-entity's own filter restrict the joined rows (they are part of the join).
        inner = [c for c in el if c.tag == "filter"]
        join_params: list[Any] = []
        for f in inner:
            on.append(self.filter(f, target, sql_alias, join_params))
        # The join's parameters come before the WHERE's in the SQL text.
        q.links.append(_Link(target, alias, sql_alias,
                             f"{'LEFT ' if kind == 'outer' else ''}JOIN {Store.table_sql(target.logical_name)} "
                             f"{sql_alias} ON {' AND '.join(on)}", join_params))
        rest = ET.Element(el.tag, el.attrib)
        rest.extend([c for c in el if c.tag != "filter"])
        self.entity(rest, target, alias, sql_alias, q)


# -- running --------------------------------------------------------------------------------------------


def _cookie(page: int, first: str, last: str, pk: str) -> str:
    inner = f'<cookie page="{page}"><{pk} last="{{{last.upper()}}}" first="{{{first.upper()}}}" /></cookie>'
    return f'<cookie pagenumber="{page + 1}" pagingcookie="{quote(quote(inner, safe=""), safe="")}" ' \
           'istracking="False" />'


def run_fetchxml(store: Store, tables: Mapping[str, Table], text: str, *, root: str, prefer_annotations: str | None,
                 maxpagesize: int | None, caller: tuple[str, str] | None,
                 render: Callable[[Table, list[tuple[str, int, str]]], list[dict[str, Any]]]) -> Reply:
    """Run a FetchXML query and answer as the Web API does (``value`` rows plus paging annotations)."""
    if maxpagesize is not None:
        raise _bad("The odata.maxpagesize preference can't be used with FetchXML: page with count and page.")
    q = _Parser(tables, caller).parse(text)
    if q.cookie:
        decoded = unquote(unquote(q.cookie)) if "%" in q.cookie else q.cookie
        try:
            ET.fromstring(decoded)  # noqa: S314
        except ET.ParseError:
            raise _bad("The paging-cookie attribute is not a paging cookie this service returned.") from None
    main = q.table
    pk = main.primary_id
    joins = " ".join(link.join for link in q.links)
    join_params = [p for link in q.links for p in link.join_params]
    where = " AND ".join(q.where)
    base = f"FROM {Store.table_sql(main.logical_name)} t0 {joins}" + (f" WHERE {where}" if where else "")
    params = join_params + q.params
    wants = annotation_filter(prefer_annotations)
    size = q.top or q.count or _MAX_PAGE
    offset = 0 if q.top else (q.page - 1) * size
    with store.read() as conn:
        register_functions(conn)
        if q.aggregate:
            rows = _aggregate(conn, q, base, params, size, offset)
            more = False
            total = None
        else:
            link_cols = [(a, tables_alias(q, a.alias_of)) for a in q.attrs if a.alias_of]
            select = ["t0.id", "t0.version", "t0.data"] + [column_sql(s, t, a.col) for a, (t, s) in link_cols]
            order = [f"{e} {'DESC' if d else 'ASC'}" for e, d in q.orders] + ["t0.id ASC"]
            distinct = "DISTINCT " if q.distinct else ""
            sql = f"SELECT {distinct}{', '.join(select)} {base} ORDER BY {', '.join(order)} LIMIT ? OFFSET ?"
            try:
                raw = conn.execute(sql, [*params, size + (0 if q.top else 1), offset]).fetchall()
            except Exception as exc:  # a bad alias in <order alias=...> and the like
                raise _bad(f"The FetchXML query could not be run: {exc}.") from None
            more = not q.top and len(raw) > size
            raw = raw[:size]
            shaped = render(main, [(r[0], r[1], r[2]) for r in raw])
            rows = []
            main_attrs = [a for a in q.attrs if not a.alias_of]
            for r, rec in zip(raw, shaped, strict=True):
                out: dict[str, Any] = {"@odata.etag": rec.get("@odata.etag")}
                if q.all_main:
                    out.update({k: v for k, v in rec.items() if k != "@odata.etag"})
                for a in main_attrs:
                    out[a.name] = rec.get(a.col.json_name)
                    for k, v in rec.items():
                        if k.startswith(a.col.json_name + "@"):
                            out[a.name + k[len(a.col.json_name):]] = v
                out[pk] = r[0]
                for (a, _), value in zip(link_cols, r[3:], strict=True):
                    out[a.name] = value
                rows.append(out)
            total = None
            if q.total:
                total = int(conn.execute(f"SELECT count(*) FROM (SELECT {distinct}t0.id {base} LIMIT {_MAX_PAGE + 1})",
                                         params).fetchone()[0])
    head: dict[str, Any] = {"@odata.context": f"{root}/$metadata#{main.entity_set}"}
    if total is not None:
        head[f"@{CRM}.totalrecordcount"] = min(total, _MAX_PAGE)
        head[f"@{CRM}.totalrecordcountlimitexceeded"] = total > _MAX_PAGE
    if wants is not None and wants(f"{CRM}.fetchxmlpagingcookie") and more and rows:
        head[f"@{CRM}.fetchxmlpagingcookie"] = _cookie(q.page, str(rows[0][pk]), str(rows[-1][pk]), pk)
    if wants is not None and wants(f"{CRM}.morerecords"):
        head[f"@{CRM}.morerecords"] = more
    head["value"] = rows
    headers = {"Preference-Applied": f'odata.include-annotations="{prefer_annotations}"'} if prefer_annotations else {}
    return Reply(200, orjson.dumps(head), headers)


def tables_alias(q: FetchXml, alias: str) -> tuple[Table, str]:
    for link in q.links:
        if link.alias == alias:
            return link.table, link.sql_alias
    raise _bad(f"Unknown link-entity alias '{alias}'.")


def _aggregate(conn: Any, q: FetchXml, base: str, params: list[Any], size: int, offset: int) -> list[dict[str, Any]]:
    exprs: list[str] = []
    groups: list[str] = []
    for a in q.attrs:
        table, sql_alias = (q.table, "t0") if not a.alias_of else tables_alias(q, a.alias_of)
        col = column_sql(sql_alias, table, a.col)
        if a.groupby:
            expr = col
            groups.append(col)
        elif a.aggregate == "count":
            expr = f"count({'DISTINCT ' if a.distinct else ''}{sql_alias}.id)"
        elif a.aggregate == "countcolumn":
            expr = f"count({'DISTINCT ' if a.distinct else ''}{col})"
        else:
            edm = edm_type(a.col)
            if a.aggregate in ("sum", "avg") and edm not in ("Edm.Int32", "Edm.Int64", "Edm.Decimal", "Edm.Double"):
                raise _bad(f"The aggregate '{a.aggregate}' needs a numeric column; '{a.col.name}' is {edm}.")
            expr = f"{a.aggregate}({'DISTINCT ' if a.distinct else ''}{col})"
        exprs.append(f'{expr} AS "{a.name.replace(chr(34), "")}"')
    order = [f"{e} {'DESC' if d else 'ASC'}" for e, d in q.orders]
    sql = (f"SELECT {', '.join(exprs)} {base}" + (f" GROUP BY {', '.join(groups)}" if groups else "")
           + (f" ORDER BY {', '.join(order)}" if order else (f" ORDER BY {', '.join(groups)}" if groups else ""))
           + " LIMIT ? OFFSET ?")
    try:
        cur = conn.execute(sql, [*params, size, offset])
    except Exception as exc:
        raise _bad(f"The aggregate query could not be run: {exc}.") from None
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        rec = dict(zip(names, row, strict=True))
        for a in q.attrs:
            if a.aggregate == "avg" and rec.get(a.name) is not None:
                rec[a.name] = round(float(rec[a.name]), 10)
        out.append(rec)
    return out


# -- BulkDelete's QueryExpression -------------------------------------------------------------------------

#: ConditionOperator names of QueryExpression (the SDK's enum) -> FetchXML operators.
_QE_OPERATORS = {"Equal": "eq", "NotEqual": "ne", "GreaterThan": "gt", "GreaterEqual": "ge", "LessThan": "lt",
                 "LessEqual": "le", "Like": "like", "NotLike": "not-like", "In": "in", "NotIn": "not-in",
                 "Null": "null", "NotNull": "not-null", "Between": "between", "NotBetween": "not-between",
                 "BeginsWith": "begins-with", "EndsWith": "ends-with", "EqualUserId": "eq-userid",
                 "NotEqualUserId": "ne-userid", "Today": "today", "Yesterday": "yesterday", "LastXDays": "last-x-days",
                 "OlderThanXDays": "olderthan-x-days", "On": "on", "OnOrAfter": "on-or-after",
                 "OnOrBefore": "on-or-before", "ThisMonth": "this-month", "LastMonth": "last-month"}


def bulk_query(tables: Mapping[str, Table], qe: Any, caller: tuple[str, str] | None) -> tuple[Table, str, list[Any]]:
    """The table and WHERE clause (over the bare collection) of one BulkDelete QueryExpression."""
    if not isinstance(qe, dict):
        raise _bad("Each QuerySet item must be a QueryExpression object.")
    table = _Parser(tables, caller).table(qe.get("EntityName"))
    if qe.get("LinkEntities"):
        raise _bad("QueryExpression LinkEntities are not supported by the emulator's BulkDelete.")
    params: list[Any] = []

    def criteria(fe: Any) -> str:
        if fe is None:
            return "1"
        if not isinstance(fe, dict):
            raise _bad("Criteria must be a FilterExpression object.")
        kind = str(fe.get("FilterOperator", "And")).lower()
        if kind not in ("and", "or"):
            raise _bad(f"FilterOperator '{fe.get('FilterOperator')}' is not valid (And, Or).")
        parts = []
        for cond in fe.get("Conditions") or []:
            col = _column(table, cond.get("AttributeName"))
            name = str(cond.get("Operator"))
            op = _QE_OPERATORS.get(name)
            if op is None:
                raise _bad(f"The condition operator '{name}' is not supported by the emulator.")
            values = [v.get("Value") if isinstance(v, dict) else v for v in cond.get("Values") or []]
            sql = column_sql("t0", table, col).replace("t0.", "")
            parts.append(condition_sql(sql, table, col, op, values, params, caller))
        for sub in fe.get("Filters") or []:
            parts.append(criteria(sub))
        return "(" + f" {kind.upper()} ".join(parts or ["1"]) + ")"

    where = criteria(qe.get("Criteria"))
    return table, where, params
