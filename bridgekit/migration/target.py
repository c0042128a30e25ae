"""The target table as a migration sees it: live column metadata, alternate keys and lookup navigation properties.

:class:`DataverseClient.columns` gives types and choices; the validation also needs what it does not
read: ``MaxLength``, ``RequiredLevel``, ``IsValidForCreate``/``IsValidForUpdate``, number ``Precision``,
the DateTime ``Format`` and the navigation property behind each lookup (query-metadata-web-api.md,
protocols.md §1.14). Those are read here through the client's session, once per migration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridgekit.errors import BridgekitError, ConfigError
from bridgekit.migration.mapping import Mapping as MigrationMapping

__all__ = ["PLATFORM_DEFAULTED", "TargetColumn", "TargetSchema", "load_target"]

log = logging.getLogger("bridgekit.migration")

# Columns the platform fills in on create when a payload leaves them out (owner = caller, state = active).
PLATFORM_DEFAULTED = frozenset({"ownerid", "statecode", "statuscode", "owningbusinessunit"})
_LOOKUP_TYPES = ("Lookup", "Customer", "Owner")


@dataclass(frozen=True)
class TargetColumn:
    """One column of the target table with everything validation checks."""

    name: str
    type: str
    max_length: int | None = None
    required: bool = False
    creatable: bool = True
    updatable: bool = True
    options: Mapping[int, str] | None = None
    precision: int | None = None
    date_only: bool = False
    targets: tuple[str, ...] = ()


@dataclass
class TargetSchema:
    """Live metadata of the target table (and the entity sets of tables its lookups point at)."""

    table: str
    entity_set: str
    primary_id: str
    columns: dict[str, TargetColumn]
    keys: list[tuple[str, ...]]
    navs: dict[tuple[str, str], str] = field(default_factory=dict)  # (lookup column, target table) -> nav
    entity_sets: dict[str, str] = field(default_factory=dict)

    def nav(self, column: str, table: str) -> str:
        """The navigation property to bind lookup ``column`` to a row of ``table``."""
        return self.navs.get((column, table)) or self.navs.get((column, "")) or column


def _casts(session: Any, table: str, cast: str, prop: str) -> dict[str, Any]:
    try:
        body = session.get_json(f"EntityDefinitions(LogicalName='{table}')/Attributes/"
                                f"Microsoft.Dynamics.CRM.{cast}?$select=LogicalName,{prop}")
    except BridgekitError as exc:  # optional detail: validation falls back to the type alone
        log.debug("%s: %s.%s unavailable (%s)", table, cast, prop, exc)
        return {}
    return {item["LogicalName"]: item.get(prop) for item in body.get("value", [])}


def load_target(client: Any, mapping: MigrationMapping) -> TargetSchema:
    """Read the target table's metadata and check the mapping against it.

    Raises:
        ConfigError: unknown table or columns, read-only columns, a key that is not an alternate key of
            the table, lookups on non-lookup columns, or a required column left unmapped. All problems
            are listed in one message.
        NotFoundError: the table does not exist.
    """
    info = client.table(mapping.target)
    base = f"EntityDefinitions(LogicalName='{info.logical_name}')/Attributes"
    session = client.session
    flags = {item["LogicalName"]: item for item in session.get_json(
        f"{base}?$select=LogicalName,RequiredLevel,IsValidForCreate,IsValidForUpdate").get("value", [])}
    lengths = _casts(session, info.logical_name, "StringAttributeMetadata", "MaxLength") | _casts(
        session, info.logical_name, "MemoAttributeMetadata", "MaxLength")
    cols_meta = client.columns(info.logical_name)
    precision: dict[str, Any] = {}
    if any(c.type in ("Money", "Decimal", "Double") for c in cols_meta):
        for cast in ("MoneyAttributeMetadata", "DecimalAttributeMetadata", "DoubleAttributeMetadata"):
            precision |= _casts(session, info.logical_name, cast, "Precision")
    formats = _casts(session, info.logical_name, "DateTimeAttributeMetadata", "Format") if any(
        c.type == "DateTime" for c in cols_meta) else {}
    columns: dict[str, TargetColumn] = {}
    for c in cols_meta:
        if c.attribute_of:
            continue
        flag = flags.get(c.name, {})
        level = (flag.get("RequiredLevel") or {}).get("Value", "None")
        columns[c.name] = TargetColumn(
            name=c.name, type=c.type, max_length=lengths.get(c.name),
            required=(level in ("ApplicationRequired", "SystemRequired") and not c.is_primary_id
                      and c.name not in PLATFORM_DEFAULTED),
            creatable=bool(flag.get("IsValidForCreate", True)), updatable=bool(flag.get("IsValidForUpdate", True)),
            options=c.options, precision=None if precision.get(c.name) is None else int(precision[c.name]),
            date_only=formats.get(c.name) == "DateOnly", targets=tuple(c.targets))
    navs: dict[tuple[str, str], str] = {}
    try:
        rels = session.get_json(f"EntityDefinitions(LogicalName='{info.logical_name}')/ManyToOneRelationships"
                                "?$select=ReferencingAttribute,ReferencedEntity,"
                                "ReferencingEntityNavigationPropertyName").get("value", [])
        for r in rels:
            navs[(r["ReferencingAttribute"], r["ReferencedEntity"])] = r["ReferencingEntityNavigationPropertyName"]
    except BridgekitError as exc:  # single-target lookups bind through a property named like the column
        log.debug("%s: relationships unavailable (%s)", info.logical_name, exc)
    schema = TargetSchema(info.logical_name, info.entity_set, info.primary_id, columns,
                          client.alternate_keys(info.logical_name), navs)
    _check(schema, mapping)
    for lk in mapping.lookups:
        schema.entity_sets[lk.table] = client.table(lk.table).entity_set
    return schema


def _check(schema: TargetSchema, mapping: MigrationMapping) -> None:
    problems: list[str] = []
    mapped = {c.target for c in mapping.columns} | {lk.target for lk in mapping.lookups}
    for cm in mapping.columns:
        col = schema.columns.get(cm.target)
        if col is None:
            problems.append(f"'{cm.target}' is not a column of {schema.table}")
            continue
        if col.type in _LOOKUP_TYPES:
            problems.append(f"'{cm.target}' is a lookup: map it under lookups (from, table, key|match)")
        elif not col.creatable and not col.updatable:
            problems.append(f"'{cm.target}' is read-only (set by the platform)")
        if cm.choice_labels and col.type not in ("Picklist", "State", "Status"):
            problems.append(f"'{cm.target}' is {col.type}, not a choice: remove `choice: label`")
    for lk in mapping.lookups:
        col = schema.columns.get(lk.target)
        if col is None or col.type not in _LOOKUP_TYPES:
            problems.append(f"lookups.{lk.target}: not a lookup column of {schema.table}")
        elif col.targets and lk.table not in col.targets:
            problems.append(f"lookups.{lk.target}: points at {', '.join(col.targets)}, not {lk.table}")
    if set(mapping.key) not in [set(k) for k in schema.keys]:
        known = "; ".join(", ".join(k) for k in schema.keys) or "none"
        problems.append(f"key ({', '.join(mapping.key)}) is not an alternate key of {schema.table} "
                        f"(alternate keys: {known})")
    for col in schema.columns.values():
        if col.required and col.creatable and col.name not in mapped:
            problems.append(f"required column '{col.name}' is not mapped (creates would fail)")
    if problems:
        raise ConfigError(f"mapping does not fit {schema.table}: " + "; ".join(problems), key=mapping.target,
                          hint="fix the mapping against the table's metadata "
                               "(bridgekit sql: select * from duckdb_columns(), or the maker portal)")
