"""``$apply`` on Dataverse entity sets: the aggregation subset the Web API documents (query/aggregate-data.md).

Served transformations, joined with ``/``: any number of ``filter(<$filter expression>)`` first, then one
``groupby((<properties>))``, ``groupby((<properties>),aggregate(...))`` or ``aggregate(...)``. Aggregates are
``<property> with sum|average|min|max|countdistinct as <alias>`` and ``$count as <alias>``; properties may
be columns (``statuscode``, ``_ownerid_value``) or a related table's column through a single-valued
navigation property (``primarycontactid/fullname``, answered as ``contact_fullname``).

The answer has ``@odata.context`` ``<root>/$metadata#<set>`` and one row per group holding only the group
properties and the aliases; null values are left out, as in the service's examples. With
``Prefer: odata.include-annotations`` the rows carry FormattedValue annotations. Anything else (other
transformations, grouping by a date-time column, ordering by an aggregate, more than 50,000 source rows)
is refused with the service's error shape, never answered with a partial result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bridgekit.emulator.dataverse.common import (
    FORMATTED,
    DvError,
    Reply,
    annotation_filter,
    edm_type,
    formatted_value,
    nav_props,
    unknown_property,
)
from bridgekit.emulator.dataverse.query import (
    QueryOptions,
    ReadContext,
    Reader,
    resolver,
    split_top,
    table_filter,
)
from bridgekit.emulator.odata_filter import FOLD_FUNCTION, FilterError, register_functions
from bridgekit.emulator.schema import Column, Table
from bridgekit.emulator.store import Store

__all__ = ["AGGREGATE_LIMIT", "read_apply"]

#: Aggregations run over at most this many source rows (AggregateQueryRecordLimitExceeded, §1.6).
AGGREGATE_LIMIT = 50_000
_METHODS = ("sum", "average", "min", "max", "countdistinct")
_NUMERIC = ("Edm.Int32", "Edm.Int64", "Edm.Decimal", "Edm.Double")
_DATES = ("Edm.DateTimeOffset", "Edm.Date")
_STEP = re.compile(r"([A-Za-z]+)\s*\((.*)\)", re.S)
_COUNT = re.compile(r"\$count\s+as\s+([A-Za-z_][A-Za-z0-9_]*)", re.S)
_WITH = re.compile(r"([A-Za-z0-9_/]+)\s+with\s+([A-Za-z]+)\s+as\s+([A-Za-z_][A-Za-z0-9_]*)", re.S)


def _bad(message: str) -> DvError:
    return DvError(400, "0x80060888", message)


@dataclass(frozen=True)
class _Prop:
    """A grouped or aggregated property: its answer name, SQL, column and path as written."""

    name: str
    sql: str
    col: Column
    path: str
    text: bool


@dataclass(frozen=True)
class _Agg:
    alias: str
    method: str  # count (for $count) or one of _METHODS
    prop: _Prop | None


def _prop(table: Table, tables: Mapping[str, Table], path: str) -> _Prop:
    try:
        ref = resolver(table, tables)(path)
    except FilterError as exc:
        raise _bad(exc.message) from None
    if "/" in path:
        nav_name, _, rest = path.partition("/")
        nav = nav_props(table)[nav_name]
        target = tables[nav.targets[0]]
        col = target.column(rest)
        assert col is not None
        # The service names a related column <table>_<column> (aggregate-data.md).
        name = f"{target.logical_name}_{col.json_name}"
    else:
        found = next((c for c in table.columns if c.json_name == path), None)
        assert found is not None
        col, name = found, found.json_name
    return _Prop(name, ref.sql, col, path, ref.edm in ("Edm.String", "Edm.Guid"))


def _aggregates(table: Table, tables: Mapping[str, Table], text: str) -> list[_Agg]:
    out: list[_Agg] = []
    for item in split_top(text):
        m = _COUNT.fullmatch(item)
        if m:
            out.append(_Agg(m.group(1), "count", None))
            continue
        m = _WITH.fullmatch(item)
        if m is None:
            raise _bad(f"Syntax error in the aggregate expression '{item}' of $apply.")
        path, method, alias = m.group(1), m.group(2), m.group(3)
        if method not in _METHODS:
            raise _bad(f"The aggregation method '{method}' is not supported; use sum, average, min, max or "
                       "countdistinct (or $count as <alias>).")
        prop = _prop(table, tables, path)
        edm = edm_type(prop.col)
        if method in ("sum", "average") and edm not in _NUMERIC:
            raise _bad(f"The aggregation method '{method}' needs a numeric property; '{path}' is {edm}.")
        if method in ("min", "max") and edm not in _NUMERIC and edm not in _DATES:
            raise _bad(f"The aggregation method '{method}' needs a numeric or date and time property; "
                       f"'{path}' is {edm}.")
        out.append(_Agg(alias, method, prop))
    if not out:
        raise _bad("aggregate() in $apply needs at least one aggregate expression.")
    return out


@dataclass
class _Plan:
    where: list[str]
    params: list[Any]
    groups: list[_Prop]
    aggs: list[_Agg]


def _plan(table: Table, tables: Mapping[str, Table], text: str, aliases: Mapping[str, str]) -> _Plan:
    plan = _Plan([], [], [], [])
    steps = split_top(text, "/")
    if not steps:
        raise _bad("The $apply query option is empty.")
    done = False
    for step in steps:
        m = _STEP.fullmatch(step)
        if m is None:
            raise _bad(f"Syntax error in $apply at '{step}'.")
        name, arg = m.group(1), m.group(2).strip()
        if name not in ("filter", "groupby", "aggregate"):
            raise _bad(f"The $apply transformation '{name}' is not supported: Dataverse supports filter, "
                       "groupby and aggregate.")
        if done:
            raise _bad(f"The $apply transformation '{name}' after groupby or aggregate is not supported.")
        if name == "filter":
            where, params = table_filter(table, tables, arg, aliases)
            plan.where.append(f"({where})")
            plan.params += params
        elif name == "aggregate":
            plan.aggs = _aggregates(table, tables, arg)
            done = True
        else:
            parts = split_top(arg)
            if not parts or not (parts[0].startswith("(") and parts[0].endswith(")")) or len(parts) > 2:
                raise _bad(f"Syntax error in groupby at '{arg}': use groupby((col1,col2)) or "
                           "groupby((col1),aggregate(...)).")
            for path in split_top(parts[0][1:-1]):
                prop = _prop(table, tables, path)
                if edm_type(prop.col) in _DATES:
                    raise _bad(f"groupby with datetime values is not supported ('{path}').")
                plan.groups.append(prop)
            if not plan.groups:
                raise _bad("groupby needs at least one property.")
            if len(parts) == 2:
                m2 = _STEP.fullmatch(parts[1])
                if m2 is None or m2.group(1) != "aggregate":
                    raise _bad(f"Syntax error in groupby at '{parts[1]}': only aggregate(...) may follow the "
                               "grouping properties.")
                plan.aggs = _aggregates(table, tables, m2.group(2))
            done = True
    if not done:
        raise _bad("$apply with only filter() is not supported: add groupby or aggregate, or use $filter.")
    names = [g.name for g in plan.groups] + [a.alias for a in plan.aggs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _bad(f"The property or alias '{dupes[0]}' appears more than once in $apply.")
    return plan


def _agg_sql(agg: _Agg) -> str:
    if agg.prop is None:
        return "count(*)"
    sql = agg.prop.sql
    if agg.method == "countdistinct":
        # Dataverse compares strings case-insensitively.
        return f"count(DISTINCT {FOLD_FUNCTION}({sql}))" if agg.prop.text else f"count(DISTINCT {sql})"
    return {"sum": "sum", "average": "avg", "min": "min", "max": "max"}[agg.method] + f"({sql})"


def read_apply(reader: Reader, table: Table, opts: QueryOptions, rc: ReadContext) -> Reply:
    """Answer ``GET <set>?$apply=...`` (with optional ``$orderby`` on group properties and ``$top``)."""
    plan = _plan(table, reader.tables, opts.raw["$apply"], opts.aliases)
    order: list[str] = []
    for item in split_top(opts.raw.get("$orderby", "")):
        name, _, direction = item.partition(" ")
        direction = direction.strip().lower() or "asc"
        if direction not in ("asc", "desc"):
            raise _bad(f"Syntax error at position {len(name) + 1} in '{item}'.")
        if any(a.alias == name for a in plan.aggs):
            # aggregate-data.md: ordering by an aggregate value is not supported.
            raise _bad("The query node SingleValueOpenPropertyAccess is not supported.")
        group = next((g for g in plan.groups if name in (g.path, g.name)), None)
        if group is None:
            raise unknown_property(name, table.logical_name)
        order.append(f"{group.sql}{' COLLATE NOCASE' if group.text else ''} {direction.upper()}")
    group_sql = [f"{g.sql}{' COLLATE NOCASE' if g.text else ''}" for g in plan.groups]
    if not order:
        order = [f"{g} ASC" for g in group_sql]
    coll = Store.table_sql(table.logical_name)
    where = f" WHERE {' AND '.join(plan.where)}" if plan.where else ""
    select = [g.sql for g in plan.groups] + [_agg_sql(a) for a in plan.aggs]
    sql = (f"SELECT {', '.join(select)} FROM {coll}{where}"
           + (f" GROUP BY {', '.join(group_sql)}" if group_sql else "")
           + (f" ORDER BY {', '.join(order)}" if order else "")
           + (" LIMIT ?" if opts.top is not None else ""))
    params = [*plan.params, *([opts.top] if opts.top is not None else [])]
    wants = annotation_filter(rc.prefer.annotations)
    reader.store.ensure_collection(table.logical_name)
    with reader.store.read() as conn:
        register_functions(conn)
        source = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {coll}{where} LIMIT {AGGREGATE_LIMIT + 1})",
                              plan.params).fetchone()[0]
        if source > AGGREGATE_LIMIT:
            raise DvError(400, "0x8004E023", "The maximum record limit is exceeded. Reduce the number of records.")
        raw = conn.execute(sql, params).fetchall()
        names: dict[str, str] = {}
        if wants is not None and wants(FORMATTED):
            targets: dict[str, set[str]] = {}
            for i, g in enumerate(plan.groups):
                if g.col.is_lookup:
                    for target in g.col.targets:
                        targets.setdefault(target, set()).update(str(r[i]) for r in raw if r[i] is not None)
            names = reader.lookup_names(targets, conn)
    rows: list[dict[str, Any]] = []
    formatted = wants is not None and wants(FORMATTED)
    for r in raw:
        out: dict[str, Any] = {}
        for i, g in enumerate(plan.groups):
            value = r[i]
            if value is None:
                continue  # the service leaves null group values out (aggregate-data.md, distinct values)
            if formatted:
                text = formatted_value(g.col, value, names=names, tables=reader.tables)
                if text is not None:
                    out[f"{g.name}@{FORMATTED}"] = text
            out[g.name] = value
        for j, a in enumerate(plan.aggs):
            value = r[len(plan.groups) + j]
            if value is None:
                continue
            if a.method == "average":
                value = round(float(value), 10)
            if formatted:
                if a.prop is None or a.method == "countdistinct":
                    out[f"{a.alias}@{FORMATTED}"] = f"{int(value):,}"
                else:
                    text = formatted_value(a.prop.col, value, tables=reader.tables)
                    if text is not None:
                        out[f"{a.alias}@{FORMATTED}"] = text
            out[a.alias] = value
        rows.append(out)
    headers = {"Preference-Applied": f'odata.include-annotations="{rc.prefer.annotations}"'} \
        if rc.prefer.annotations else {}
    body = {"@odata.context": f"{rc.root}/$metadata#{table.entity_set}", "value": rows}
    return Reply(200, orjson.dumps(body), headers)
