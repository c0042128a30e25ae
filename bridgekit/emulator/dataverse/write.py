"""Writes of the emulated Dataverse Web API: payload validation, lookup binding, system columns, activities.

Every write goes through the store's write transaction, bumps ``versionnumber`` (the store's row
version) and ``modifiedon``, and keeps ``activitypointer`` in step with the concrete activity tables
(an email, appointment, phone call or task row is also served by ``activitypointers``, §1.3).
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from bridgekit.emulator.dataverse.common import CRM, EDM_TYPES, DvError, NavProp, is_guid, nav_props
from bridgekit.emulator.schema import Column, Table
from bridgekit.emulator.store import Row, Store

__all__ = ["Caller", "Writer", "parse_key", "sequential_id"]

VERSION_FIELD = "versionnumber"
_PAYLOAD_HELP = "https://go.microsoft.com/fwlink/?linkid=2195293"
_POINTER = "activitypointer"


@dataclass(frozen=True)
class Caller:
    """The systemuser a request acts as (``createdby``/``modifiedby``/default owner)."""

    user_id: str
    business_unit_id: str | None = None


_NOW: tuple[int, str] = (0, "")


_SEQ_LOCK = threading.Lock()
_SEQ_LAST = 0  # the last (milliseconds << 12 | counter) handed out


def sequential_id() -> str:
    """A new record id that sorts after every id this process generated before it.

    Dataverse assigns sequential GUIDs to records created without an id, and its best practices ask
    clients to let it, because they index better than random ones ("The Dangers of Guid.NewGuid()",
    Microsoft's CRM in the Field blog, 2015-01-19). Here the same property keeps the store's
    primary-key B-tree append-only: a random id dirties a random page per insert, and writing those
    pages out was about a quarter of a batched create's cost. The layout is RFC 9562's UUIDv7 (48-bit
    Unix milliseconds, version 7, a 12-bit counter within the millisecond, 62 random bits), so the
    text ascends in the store's (binary) key order and is still a valid GUID.
    """
    global _SEQ_LAST
    tail = int.from_bytes(os.urandom(8)) >> 2
    with _SEQ_LOCK:
        stamp = max(_SEQ_LAST + 1, int(time.time() * 1000) << 12)
        _SEQ_LAST = stamp
    ms, counter = stamp >> 12, stamp & 0xFFF
    text = f"{(ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | tail:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def now_text() -> str:
    """The current UTC time as Dataverse serves date-times (whole seconds: formatted once per second)."""
    global _NOW
    second = int(time.time())
    if _NOW[0] != second:
        _NOW = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _NOW[1]


def payload_error(table: str, inner: str) -> DvError:
    """0x80048d19: the body does not fit the entity type (undeclared property, bad literal, §1.9)."""
    return DvError(400, "0x80048d19",
                   f"Error identified in Payload provided by the user for Entity :'{table}', For more "
                   f"information on this error please follow this help link {_PAYLOAD_HELP}  ----> "
                   f"InnerException : Microsoft.OData.ODataException: {inner}")


def not_found(table: str, rid: str) -> DvError:
    """0x80040217 ObjectDoesNotExist (§1.9)."""
    return DvError(404, "0x80040217", f"{table} With Id = {rid} Does Not Exist")


def _literal(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if is_guid(text):
        return str(uuid.UUID(text.strip("{}")))
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise DvError(400, "0x80060888", f"Unrecognized literal '{text}' in the key of the request URI.") from None


def _split_key(text: str) -> list[str]:
    if "," not in text:
        return [text]
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == "'":
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def parse_key(table: Table, text: str) -> tuple[str | None, dict[str, Any] | None]:
    """The record key in ``<set>(<key>)``: ``(guid, None)`` or ``(None, {alternate key values})``."""
    body = text.strip()
    if is_guid(body.strip("'")):
        return str(uuid.UUID(body.strip("'{}"))), None
    values: dict[str, Any] = {}
    for part in _split_key(body):
        name, eq, raw = part.partition("=")
        if not eq:
            break
        values[name.strip()] = _literal(raw)
    else:
        if set(values) == {table.primary_id} and isinstance(values[table.primary_id], str) \
                and is_guid(values[table.primary_id]):
            return str(values[table.primary_id]), None
        if any(set(values) == set(key) for key in table.alternate_keys):
            return None, values
    raise DvError(400, "0x80060888",
                  f"The key in the request URI is not valid for resource '{CRM}.{table.logical_name}'. Ensure "
                  f"that the names and number of key properties match the declared or alternate key "
                  f"properties for the resource '{CRM}.{table.logical_name}'.")


def _bad_literal(table: Table, type: str, value: Any) -> DvError:
    """The payload error for a value of the wrong type (built only when raised: most values are fine)."""
    return payload_error(table.logical_name, f"Cannot convert the literal '{value}' to the expected type "
                                             f"'{EDM_TYPES.get(type, 'Edm.String')}'.")


_REF = re.compile(r"^(?:.*?/api/data/v\d+\.\d+/|/)?([A-Za-z0-9_]+)\((.+)\)$", re.S)


@dataclass(frozen=True)
class _TableInfo:
    """What every write of one table looks up, worked out once per table."""

    navs: dict[str, NavProp]  # navigation properties by name
    plain: dict[str, Column]  # non-lookup columns by logical name (first definition wins)
    template: dict[str, Any]  # a new record's columns in schema order with their defaults

    @classmethod
    def of(cls, table: Table) -> _TableInfo:
        plain: dict[str, Column] = {}
        for c in table.columns:
            if not c.is_lookup:
                plain.setdefault(c.name, c)
        template: dict[str, Any] = {c.json_name: False if c.type == "Boolean" else None for c in table.columns}
        state, status = table.column("statecode"), table.column("statuscode")
        if state is not None:
            template["statecode"] = 0
            if status is not None and state.options is not None:
                template["statuscode"] = state.options.default_status.get(0)
        if table.is_activity and "activitytypecode" in template:
            template["activitytypecode"] = table.logical_name
        return cls(nav_props(table), plain, template)


class Writer:
    """Validates payloads and writes records (create, update, delete) with Dataverse's side effects."""

    def __init__(self, store: Store, tables: Mapping[str, Table]) -> None:
        self.store = store
        self.tables = tables
        self.by_set = {t.entity_set: t for t in tables.values()}
        self._infos: dict[str, tuple[Table, _TableInfo]] = {}
        # Dataverse backs each alternate key with an index (EntityKeyIndexStatus "Active"); without one,
        # every upsert by key would scan its table. NOCASE serves find()'s case-insensitive match.
        for t in tables.values():
            for key in t.alternate_keys:
                store.ensure_index(t.logical_name, "ak_" + "_".join(key), list(key), nocase=True)

    def _info(self, table: Table) -> _TableInfo:
        cached = self._infos.get(table.logical_name)
        if cached is None or cached[0] is not table:
            cached = self._infos[table.logical_name] = (table, _TableInfo.of(table))
        return cached[1]

    # -- lookups by key ----------------------------------------------------------------------------
    def find(self, table: Table, rid: str | None, alt: Mapping[str, Any] | None) -> tuple[str | None, Any]:
        """(id, Row) of the addressed record; (id or None, None) when it does not exist."""
        if rid is not None:
            return rid, self.store.get(table.logical_name, rid)
        assert alt is not None
        conds, params = [], []
        for name, value in alt.items():
            if value is None:
                conds.append(f"{Store.field(name)} IS NULL")
            else:
                conds.append(f"{Store.field(name)} = ?" + (" COLLATE NOCASE" if isinstance(value, str) else ""))
                params.append(value)
        rows = self.store.query(table.logical_name, where=" AND ".join(conds), params=params, limit=1)
        return (rows[0].id, rows[0]) if rows else (None, None)

    def resolve_reference(self, ref: str, content_ids: Mapping[str, str]) -> tuple[Table, str]:
        """``/contacts(<id>)``, ``contacts(<id>)``, an absolute URL, an alternate key or ``$n`` -> (table, id)."""
        ref = ref.strip()
        if ref.startswith("$"):
            target = content_ids.get(ref.split("/")[0])
            if target is None:
                raise DvError(400, "0x80060888",
                              f"Content-ID Reference: '{ref.split('/')[0]}' does not exist in the batch context.")
            ref = target
        m = _REF.match(unquote(ref))
        table = self.by_set.get(m.group(1)) if m else None
        if m is None or table is None:
            raise DvError(400, "0x80060888", f"The reference '{ref}' is not a valid entity URL.")
        rid, alt = parse_key(table, m.group(2))
        found_id, row = self.find(table, rid, alt)
        if row is None or found_id is None:
            raise not_found(table.logical_name, rid or m.group(2))
        return table, found_id

    # -- validation --------------------------------------------------------------------------------
    def _value(self, table: Table, col: Column, value: Any) -> Any:
        if value is None:
            return None
        t = col.type
        if t in ("String", "Memo", "EntityName"):
            if not isinstance(value, str):
                raise _bad_literal(table, t, value)
            if col.max_length is not None and len(value) > col.max_length:
                raise DvError(400, "0x80044331",
                              f"A validation error occurred. The length of the '{col.name}' attribute of the "
                              f"'{table.logical_name}' entity exceeded the maximum allowed length of "
                              f"'{col.max_length}'.")
            return value
        if t in ("Integer", "BigInt", "Picklist", "State", "Status"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _bad_literal(table, t, value)
            if col.options is not None and value not in col.options.options:
                raise DvError(400, "0x8004431a",
                              f"A validation error occurred. The value {value} of '{col.name}' on record of type "
                              f"'{table.logical_name}' is outside the valid range. Accepted Values: "
                              f"{','.join(str(k) for k in col.options.options)}")
            return value
        if t in ("Money", "Decimal", "Double"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _bad_literal(table, t, value)
            return value
        if t == "Boolean":
            if not isinstance(value, bool):
                raise _bad_literal(table, t, value)
            return value
        if t == "DateTime":
            if not isinstance(value, str):
                raise _bad_literal(table, t, value)
            try:
                dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise _bad_literal(table, t, value) from None
            if col.date_only:
                return dt.date().isoformat()
            dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
            return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if t == "Uniqueidentifier":
            if not isinstance(value, str) or not is_guid(value):
                raise _bad_literal(table, t, value)
            return str(uuid.UUID(value.strip("{}")))
        raise _bad_literal(table, t, value)

    def changes(self, table: Table, body: Mapping[str, Any], content_ids: Mapping[str, str], *,
                creating: bool) -> dict[str, Any]:
        """Validated column values of a create/update body (lookups bound from ``@odata.bind``)."""
        info = self._info(table)
        navs = info.navs
        out: dict[str, Any] = {}
        for key, value in body.items():
            if key.endswith("@odata.bind"):
                nav = navs.get(key[: -len("@odata.bind")])
                if nav is None:
                    raise payload_error(table.logical_name,
                                        f"An undeclared property '{key[: -len('@odata.bind')]}' which only has "
                                        "property annotations in the payload but no property value was found "
                                        "in the payload. In OData, only declared navigation properties and "
                                        "declared named streams can be represented as properties without values.")
                if nav.column.read_only and nav.column.type != "Owner":
                    continue
                col = nav.column
                if value is None:
                    out[col.json_name] = None
                    out[f"@emu.{col.json_name}.type"] = None
                    continue
                if not isinstance(value, str):
                    raise payload_error(table.logical_name, f"The value of '{key}' must be an entity URL.")
                target, rid = self.resolve_reference(value, content_ids)
                if target.logical_name not in nav.targets:
                    raise DvError(400, "0x80060888",
                                  f"The navigation property '{nav.name}' cannot refer to an entity of type "
                                  f"'{CRM}.{target.logical_name}'.")
                out[col.json_name] = rid
                if len(col.targets) > 1 or col.type in ("Customer", "Owner"):
                    out[f"@emu.{col.json_name}.type"] = target.logical_name
                continue
            if key.startswith("@") or "@" in key:
                continue  # instance annotations (@odata.type, x@OData.Community...) carry no data
            plain = info.plain.get(key)
            if plain is None:
                raise payload_error(table.logical_name,
                                    f"The property '{key}' does not exist on type '{CRM}.{table.logical_name}'. "
                                    "Make sure to only use property names that are defined by the type or mark "
                                    "the type as open type.")
            if isinstance(value, dict | list):
                raise payload_error(table.logical_name,
                                    f"A value of the property '{key}' must be a primitive value.")
            if plain.read_only and not (creating and plain.name == table.primary_id):
                continue  # read-only columns (createdon, fullname, versionnumber ...) are ignored
            out[plain.json_name] = self._value(table, plain, value)
        return out

    # -- record construction -----------------------------------------------------------------------
    def _finish(self, table: Table, rec: dict[str, Any], changed: Mapping[str, Any]) -> None:
        # Platform-computed columns: fullname from first/last name; a state change moves statuscode to the
        # state's default unless the body set a status too.
        if table.column("fullname") is not None and table.column("firstname") is not None \
                and table.column("fullname").read_only:  # type: ignore[union-attr]
            rec["fullname"] = " ".join(p for p in (rec.get("firstname"), rec.get("lastname")) if p) or None
        state, status = table.column("statecode"), table.column("statuscode")
        if state is not None and status is not None and "statecode" in changed and "statuscode" not in changed:
            opts = state.options
            if opts is not None and rec.get("statecode") in opts.default_status:
                rec["statuscode"] = opts.default_status[rec["statecode"]]

    def new_record(self, table: Table, values: Mapping[str, Any], caller: Caller, rid: str) -> dict[str, Any]:
        """A full record for a create: every column in schema order, system columns set."""
        now = now_text()
        rec = dict(self._info(table).template)
        rec[table.primary_id] = rid
        for key in ("createdon", "modifiedon"):
            if key in rec:
                rec[key] = now
        for key in ("_createdby_value", "_modifiedby_value"):
            if key in rec:
                rec[key] = caller.user_id
        if "_ownerid_value" in rec:
            rec["_ownerid_value"] = caller.user_id
            rec["@emu._ownerid_value.type"] = "systemuser"
        if "_owningbusinessunit_value" in rec:
            rec["_owningbusinessunit_value"] = caller.business_unit_id
        rec.update(values)
        rec[table.primary_id] = rid
        self._finish(table, rec, values)
        # A bind to null in ``values`` leaves a type annotation of None: drop it (the template has none).
        for k in [k for k in values if k.startswith("@emu.") and rec.get(k) is None]:
            del rec[k]
        return rec

    def _check_alternate_keys(self, table: Table, rec: Mapping[str, Any], rid: str,
                              known_absent: Mapping[str, Any] | None = None) -> None:
        for key in table.alternate_keys:
            values = {k: rec.get(k) for k in key}
            if any(v is None for v in values.values()):
                continue
            if values == known_absent:
                continue  # the caller just looked these values up in this transaction and found no row
            found, _ = self.find(table, None, values)
            if found is not None and found != rid:
                names = ", ".join(key)
                raise DvError(412, "0x80060892",
                              f"A record that has the attribute values {names} already exists. The entity key "
                              f"{names} requires that this set of attributes contains unique values.")

    def _pointer(self, table: Table, rec: Mapping[str, Any]) -> dict[str, Any] | None:
        pointer = self.tables.get(_POINTER)
        if not table.is_activity or table.logical_name == _POINTER or pointer is None:
            return None
        out = {c.json_name: rec.get(c.json_name) for c in pointer.columns}
        out["activitytypecode"] = table.logical_name
        for k, v in rec.items():
            if k.startswith("@emu.") and v is not None and pointer.column(k[5:].rsplit(".", 1)[0]) is not None:
                out[k] = v
        return out

    def _store(self, table: Table, rid: str, rec: dict[str, Any], *, fresh: bool = False) -> int:
        version = self.store.put(table.logical_name, rid, rec, version_field=VERSION_FIELD, fresh=fresh)
        pointer = self._pointer(table, rec)
        if pointer is not None:
            self.store.put(_POINTER, rid, pointer, version_field=VERSION_FIELD, fresh=fresh)
        return version

    def create(self, table: Table, values: dict[str, Any], caller: Caller, *, rid: str | None = None,
               known_absent: Mapping[str, Any] | None = None) -> tuple[str, int, dict[str, Any]]:
        """Insert a record; 412 DuplicateRecord when the id exists. Returns (id, version, record).

        ``known_absent``: alternate-key values the caller has just looked up (with :meth:`find`, inside
        the same write transaction) and not found, so their uniqueness check is not repeated.
        """
        given = values.get(table.primary_id) or rid
        rid = str(given or sequential_id())
        with self.store.write():
            # An id the caller chose may be taken; one generated here is not (no lookup needed).
            if given and self.store.get(table.logical_name, rid) is not None:
                raise DvError(412, "0x80040237", "A record with matching key values already exists.")
            rec = self.new_record(table, values, caller, rid)
            self._check_alternate_keys(table, rec, rid, known_absent)
            version = self._store(table, rid, rec, fresh=not given)
        return rid, version, rec

    def _existing(self, table: Table, rid: str, expect_version: int | None) -> Row:
        """The stored row, or 404 when missing and 412 when ``expect_version`` (an If-Match) differs."""
        row = self.store.get(table.logical_name, rid)
        if row is None:
            raise not_found(table.logical_name, rid)
        if expect_version is not None and row.version != expect_version:
            raise DvError(412, "0x80060882",
                          "The version of the existing record doesn't match the RowVersion property provided.")
        return row

    def update(self, table: Table, rid: str, values: dict[str, Any], caller: Caller, *,
               expect_version: int | None = None) -> tuple[int, dict[str, Any]]:
        """Merge ``values`` into an existing record; 404 when missing, 412 on a version mismatch."""
        with self.store.write():
            row = self._existing(table, rid, expect_version)
            rec = row.load()
            values = {k: v for k, v in values.items() if k != table.primary_id}
            rec.update(values)
            rec = {k: v for k, v in rec.items() if not (k.startswith("@emu.") and v is None)}
            if "modifiedon" in rec:
                rec["modifiedon"] = now_text()
            if "_modifiedby_value" in rec:
                rec["_modifiedby_value"] = caller.user_id
            self._finish(table, rec, values)
            self._check_alternate_keys(table, rec, rid)
            version = self._store(table, rid, rec)
        return version, rec

    def delete(self, table: Table, rid: str, *, expect_version: int | None = None) -> None:
        """Delete a record (and its activitypointer row); 404 when missing, 412 on a version mismatch."""
        with self.store.write():
            self._existing(table, rid, expect_version)
            self.store.delete(table.logical_name, rid)
            if table.is_activity and table.logical_name != _POINTER:
                self.store.delete(_POINTER, rid)
