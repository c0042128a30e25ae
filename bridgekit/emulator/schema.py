"""Definitions of the emulated Dataverse tables (columns, types, choices, lookups) and Graph resources.

This module is data: the Dataverse metadata endpoints, the OData query engine, the synthetic company
and the live-activity generator all read it, so a column exists in exactly one place.
Attribute type names follow Dataverse's ``AttributeTypeName`` values (``StringType``, ``LookupType``,
``PicklistType``, ``MoneyType``, ...) and ``AttributeType`` codes (``String``, ``Lookup``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Column", "GraphResource", "OptionSet", "Table", "TABLES", "GRAPH_RESOURCES", "table_by_set"]


@dataclass(frozen=True)
class OptionSet:
    """A choice column's options: value -> label."""

    name: str
    options: dict[int, str]
    is_global: bool = False


@dataclass(frozen=True)
class Column:
    """One Dataverse attribute.

    ``type`` is the AttributeType (``String``, ``Memo``, ``Integer``, ``BigInt``, ``Decimal``, ``Double``,
    ``Money``, ``Boolean``, ``DateTime``, ``Lookup``, ``Customer``, ``Owner``, ``Picklist``, ``State``,
    ``Status``, ``Uniqueidentifier``, ``EntityName``). For lookups ``targets`` lists the target tables
    and the JSON property is ``_<name>_value``.
    """

    name: str
    type: str
    display: str = ""
    max_length: int | None = None
    required: bool = False
    targets: tuple[str, ...] = ()
    options: OptionSet | None = None
    read_only: bool = False

    @property
    def is_lookup(self) -> bool:
        return self.type in ("Lookup", "Customer", "Owner")

    @property
    def json_name(self) -> str:
        """The property name in Web API JSON (``_x_value`` for lookups)."""
        return f"_{self.name}_value" if self.is_lookup else self.name


@dataclass(frozen=True)
class Table:
    """One Dataverse table (EntityDefinition)."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    columns: tuple[Column, ...]
    change_tracking: bool = True
    alternate_keys: tuple[tuple[str, ...], ...] = ()
    ownership: str = "UserOwned"
    is_activity: bool = False
    display: str = ""

    def column(self, name: str) -> Column | None:
        """Column by logical name or by JSON name (``_x_value``)."""
        for c in self.columns:
            if c.name == name or c.json_name == name:
                return c
        return None


@dataclass(frozen=True)
class GraphResource:
    """One Graph collection the emulator serves (stored as collection ``graph.<name>``)."""

    name: str
    max_top: int
    default_top: int
    delta: bool
    fields: tuple[str, ...] = field(default_factory=tuple)


# Filled in by the schema author: every table the emulator serves.
TABLES: dict[str, Table] = {}
GRAPH_RESOURCES: dict[str, GraphResource] = {}


def table_by_set(entity_set: str) -> Table | None:
    """The table whose EntitySetName is ``entity_set``."""
    for t in TABLES.values():
        if t.entity_set == entity_set:
            return t
    return None
