"""Shared pieces of the emulated Dataverse Web API: errors, replies, Prefer parsing, EDM types, annotations.

Everything here is pure (no store, no HTTP framework) so the query engine, the metadata endpoints and
``$batch`` can share it. Facts cited as ``§1.x`` are in ``shared/reference/protocols.md``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from bridgekit.emulator.schema import Column, Table

__all__ = [
    "CRM",
    "EDM_TYPES",
    "JSON_CT",
    "DvError",
    "NavProp",
    "Prefer",
    "Reply",
    "annotation_filter",
    "edm_type",
    "formatted_value",
    "json_reply",
    "nav_props",
    "parse_prefer",
    "unknown_property",
]

CRM = "Microsoft.Dynamics.CRM"
#: Content type of every JSON answer (§1.2).
JSON_CT = "application/json; odata.metadata=minimal"

FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOOKUP_NAME = f"{CRM}.lookuplogicalname"
NAV_NAME = f"{CRM}.associatednavigationproperty"


class DvError(Exception):
    """A Dataverse error answer: HTTP status plus ``{"error": {"code": "0x...", "message": ...}}`` (§1.9)."""

    def __init__(self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


@dataclass
class Reply:
    """A response before it becomes a Starlette response or a ``$batch`` part."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = JSON_CT
    #: URL of the entity a write created or changed (``$batch`` Content-ID references resolve to it).
    entity_url: str | None = None


def json_reply(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON reply (orjson, OData minimal metadata)."""
    return Reply(status, orjson.dumps(data), dict(headers or {}))


def error_body(err: DvError, *, detailed: bool = False) -> bytes:
    """The error JSON; with ``detailed`` also the ``Microsoft.PowerApps.CDS`` detail annotations (§1.9)."""
    inner: dict[str, Any] = {"code": err.code, "message": err.message}
    if detailed:
        hexcode = err.code[2:] if err.code.startswith("0x") else err.code
        inner.update({
            "@Microsoft.PowerApps.CDS.ErrorDetails.OperationStatus": "0",
            "@Microsoft.PowerApps.CDS.ErrorDetails.SubErrorCode": "-2146233088",
            "@Microsoft.PowerApps.CDS.HelpLink": "http://go.microsoft.com/fwlink/?LinkID=398563&error="
                                                 f"Microsoft.Crm.CrmException%3a{hexcode}&client=platform",
            "@Microsoft.PowerApps.CDS.TraceText": "",
            "@Microsoft.PowerApps.CDS.InnerError.Message": err.message,
        })
    return orjson.dumps({"error": inner})


def unknown_property(name: str, table: str) -> DvError:
    """The 0x80060888 error for a property the table does not have (§1.4)."""
    return DvError(400, "0x80060888",
                   f"Could not find a property named '{name}' on type '{CRM}.{table}'.")


# -- Prefer ---------------------------------------------------------------------------------------------

_PREF_SPLIT = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')


@dataclass
class Prefer:
    """The parsed ``Prefer`` header(s) (§1.5)."""

    return_representation: bool = False
    maxpagesize: int | None = None
    annotations: str | None = None
    track_changes: bool = False
    continue_on_error: bool = False


def parse_prefer(values: list[str]) -> Prefer:
    """Parse every ``Prefer`` header value (comma-joined or repeated; commas inside quotes are kept)."""
    pref = Prefer()
    for value in values:
        for part in _PREF_SPLIT.split(value):
            key, _, arg = part.strip().partition("=")
            key = key.strip().lower()
            arg = arg.strip().strip('"')
            if key == "return" and arg == "representation":
                pref.return_representation = True
            elif key == "odata.maxpagesize":
                try:
                    pref.maxpagesize = int(arg)
                except ValueError:
                    raise DvError(400, "0x80060888", f"The value '{arg}' of odata.maxpagesize is not a "
                                                     "valid integer.") from None
            elif key == "odata.include-annotations":
                pref.annotations = arg
            elif key == "odata.track-changes":
                pref.track_changes = True
            elif key == "odata.continue-on-error":
                pref.continue_on_error = True
    return pref


def annotation_filter(spec: str | None) -> Callable[[str], bool] | None:
    """A predicate telling whether an annotation term was asked for, or None when none was.

    ``spec`` is the ``odata.include-annotations`` list: ``*``, exact terms, ``Namespace.*`` prefixes
    and ``-term`` exclusions (OData 4.0 §8.2.8.4).
    """
    if not spec:
        return None
    include: list[str] = []
    exclude: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if item:
            (exclude if item.startswith("-") else include).append(item.lstrip("-"))

    def matches(term: str, patterns: list[str]) -> bool:
        return any(p == "*" or p == term or (p.endswith(".*") and term.startswith(p[:-1])) for p in patterns)

    seen: dict[str, bool] = {}  # asked once per key per served row: remember the answer

    def wants(term: str) -> bool:
        hit = seen.get(term)
        if hit is None:
            hit = seen[term] = matches(term, include) and not matches(term, exclude)
        return hit

    return wants


# -- schema helpers -------------------------------------------------------------------------------------

#: The EDM type of each column type (a date-only DateTime is Edm.Date: see :func:`edm_type`).
EDM_TYPES = {
    "String": "Edm.String", "Memo": "Edm.String", "EntityName": "Edm.String",
    "Integer": "Edm.Int32", "Picklist": "Edm.Int32", "State": "Edm.Int32", "Status": "Edm.Int32",
    "BigInt": "Edm.Int64", "Decimal": "Edm.Decimal", "Money": "Edm.Decimal", "Double": "Edm.Double",
    "Boolean": "Edm.Boolean", "DateTime": "Edm.DateTimeOffset", "Uniqueidentifier": "Edm.Guid",
    "Lookup": "Edm.Guid", "Customer": "Edm.Guid", "Owner": "Edm.Guid",
}


def edm_type(col: Column) -> str:
    """The EDM type a column is served and filtered as."""
    if col.type == "DateTime" and col.date_only:
        return "Edm.Date"
    return EDM_TYPES.get(col.type, "Edm.String")


@dataclass(frozen=True)
class NavProp:
    """A single-valued navigation property: the lookup it binds and the table(s) it may point at."""

    name: str
    column: Column
    targets: tuple[str, ...]


def nav_props(table: Table) -> dict[str, NavProp]:
    """Single-valued navigation properties of a table, by name (§1.4).

    One per target for polymorphic lookups (``parentcustomerid_account``; regarding lookups add the
    activity table: ``regardingobjectid_account_task``); Owner lookups keep one ``ownerid`` property.
    """
    out: dict[str, NavProp] = {}
    for col in table.columns:
        if not col.is_lookup:
            continue
        if col.type == "Owner" or len(col.targets) == 1:
            out[col.name] = NavProp(col.name, col, col.targets)
            continue
        for target in col.targets:
            name = f"{col.name}_{target}"
            if col.name == "regardingobjectid":
                name += f"_{table.logical_name}"
            out[name] = NavProp(name, col, (target,))
    return out


def nav_for_value(table: Table, col: Column, target: str | None) -> str:
    """The navigation property a stored lookup value is associated through (annotation value)."""
    if col.type == "Owner" or len(col.targets) == 1:
        return col.name
    name = f"{col.name}_{target or col.targets[0]}"
    return name + (f"_{table.logical_name}" if col.name == "regardingobjectid" else "")


def lookup_target(col: Column, record: Mapping[str, Any]) -> str | None:
    """The logical name of the table a lookup value points at (polymorphic ones keep it internally)."""
    stored = record.get(f"@emu.{col.json_name}.type")
    if isinstance(stored, str):
        return stored
    return col.targets[0] if col.targets else None


def _label(col: Column, value: Any) -> str | None:
    if col.options is None:
        return None
    key = int(value) if isinstance(value, bool | int | float) else None
    return col.options.options.get(key) if key is not None else None


def _format_datetime(text: str, date_only: bool) -> str:
    # Formatted dates follow the user's locale and time zone (§1.4); the emulator's user is en-US, UTC.
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    day = f"{dt.month}/{dt.day}/{dt.year}"
    if date_only or len(text) == 10:
        return day
    hour = dt.hour % 12 or 12
    return f"{day} {hour}:{dt.minute:02d} {'AM' if dt.hour < 12 else 'PM'}"


def formatted_value(col: Column, value: Any, *, names: Mapping[str, str] | None = None,
                    currency: str = "$", tables: Mapping[str, Table] | None = None) -> str | None:
    """The ``FormattedValue`` annotation of a column value, or None when the type has none (§1.4)."""
    if value is None:
        return None
    t = col.type
    if t in ("Picklist", "State", "Status", "Boolean"):
        if t == "Boolean" and col.options is None:
            return "Yes" if value else "No"
        return _label(col, value)
    if col.is_lookup:
        return (names or {}).get(str(value))
    if t == "Money":
        return f"{currency}{float(value):,.2f}" if float(value) >= 0 else f"-{currency}{-float(value):,.2f}"
    if t == "Integer":
        return f"{int(value):,}"
    if t in ("Decimal", "Double"):
        return f"{float(value):,.{col.precision if col.precision is not None else 2}f}"
    if t == "DateTime":
        return _format_datetime(str(value), col.date_only)
    if t == "EntityName" and tables is not None:
        target = tables.get(str(value))
        return (target.display or target.logical_name) if target else str(value)
    return None


def is_guid(text: str) -> bool:
    """True when ``text`` is a GUID (with or without braces)."""
    try:
        uuid.UUID(text.strip("{}"))
    except ValueError:
        return False
    return True
