"""Metadata of the emulated Dataverse Web API: service document, CSDL ``$metadata`` and ``EntityDefinitions``.

Everything is derived from :mod:`bridgekit.emulator.schema`, so a column exists in one place. Shapes
follow protocols.md §1.1 and §1.14 (EntityMetadata, AttributeMetadata with its derived types, option
sets through the cast paths, alternate keys, relationships). Metadata queries are not paged.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridgekit.emulator.dataverse.common import CRM, DvError, Reply, edm_type, json_reply, nav_props
from bridgekit.emulator.odata_filter import (
    Compare,
    FilterError,
    Literal,
    Logical,
    Member,
    Node,
    Not,
    parse_filter,
)
from bridgekit.emulator.schema import Column, OptionSet, Table

__all__ = ["CollectionNav", "MetadataService", "collection_navs", "many_to_many_names"]

_NS = uuid.UUID("0b5e7d6a-2f0c-4d8e-9a51-3c1f6e2b7a90")
_SCHEMA_NAMES = {"activitypointer": "ActivityPointer", "systemuser": "SystemUser", "businessunit": "BusinessUnit",
                 "transactioncurrency": "TransactionCurrency", "phonecall": "PhoneCall"}
_ATTR_TYPES = {
    "String": "StringAttributeMetadata", "Memo": "MemoAttributeMetadata", "Integer": "IntegerAttributeMetadata",
    "BigInt": "BigIntAttributeMetadata", "Decimal": "DecimalAttributeMetadata", "Double": "DoubleAttributeMetadata",
    "Money": "MoneyAttributeMetadata", "Boolean": "BooleanAttributeMetadata",
    "DateTime": "DateTimeAttributeMetadata", "Lookup": "LookupAttributeMetadata",
    "Customer": "LookupAttributeMetadata", "Owner": "LookupAttributeMetadata",
    "Picklist": "PicklistAttributeMetadata", "State": "StateAttributeMetadata", "Status": "StatusAttributeMetadata",
    "Uniqueidentifier": "UniqueIdentifierAttributeMetadata", "EntityName": "EntityNameAttributeMetadata",
}
_ENUM_TYPES = {"PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata",
               "BooleanAttributeMetadata", "MultiSelectPicklistAttributeMetadata"}
_ENUM_LITERAL = re.compile(r"Microsoft\.Dynamics\.CRM\.\w+'(\w+)'")


def _mid(*parts: str) -> str:
    return str(uuid.uuid5(_NS, ":".join(parts)))


def label(text: str, *parts: str) -> dict[str, Any]:
    """A Label complex value (LocalizedLabels + UserLocalizedLabel, LCID 1033)."""
    if not text:
        return {"LocalizedLabels": [], "UserLocalizedLabel": None}
    loc = {"Label": text, "LanguageCode": 1033, "IsManaged": True, "MetadataId": _mid("label", *parts, text),
           "HasChanged": None}
    return {"LocalizedLabels": [loc], "UserLocalizedLabel": dict(loc)}


def _managed(value: bool, name: str) -> dict[str, Any]:
    return {"Value": value, "CanBeChanged": False, "ManagedPropertyLogicalName": name}


#: Schema names of the standard relationships behind the emulator's lookups (the referenced table's
#: collection-valued navigation property has the same name), as a tenant's CRM solution defines them.
_RELATIONSHIPS = {
    ("account", "primarycontactid", "contact"): "account_primary_contact",
    ("account", "parentaccountid", "account"): "account_parent_account",
    ("contact", "parentcustomerid", "account"): "contact_customer_accounts",
    ("contact", "parentcustomerid", "contact"): "contact_customer_contacts",
    ("lead", "parentaccountid", "account"): "lead_parent_account",
    ("lead", "parentcontactid", "contact"): "lead_parent_contact",
    ("lead", "customerid", "account"): "lead_customer_accounts",
    ("lead", "customerid", "contact"): "lead_customer_contacts",
    ("lead", "qualifyingopportunityid", "opportunity"): "lead_qualifying_opportunity",
    ("opportunity", "parentaccountid", "account"): "opportunity_parent_account",
    ("opportunity", "parentcontactid", "contact"): "opportunity_parent_contact",
    ("opportunity", "customerid", "account"): "opportunity_customer_accounts",
    ("opportunity", "customerid", "contact"): "opportunity_customer_contacts",
    ("opportunity", "originatingleadid", "lead"): "opportunity_originating_lead",
    ("systemuser", "businessunitid", "businessunit"): "business_unit_system_users",
    ("systemuser", "parentsystemuserid", "systemuser"): "user_parent_user",
    ("team", "businessunitid", "businessunit"): "business_unit_teams",
    ("team", "administratorid", "systemuser"): "lk_teambase_administratorid",
    ("businessunit", "parentbusinessunitid", "businessunit"): "business_unit_parent_business_unit",
}
_ACTIVITY_SETS = {"activitypointer": "ActivityPointers", "email": "Emails", "task": "Tasks",
                  "phonecall": "Phonecalls", "appointment": "Appointments"}


def relationship_name(referencing: str, column: str, target: str) -> str:
    """The schema name of the relationship behind ``referencing.column`` pointing at ``target``."""
    known = _RELATIONSHIPS.get((referencing, column, target))
    if known:
        return known
    if column == "regardingobjectid" and referencing in _ACTIVITY_SETS:
        return f"{schema_name(target)}_{_ACTIVITY_SETS[referencing]}"  # e.g. Account_Tasks
    if column in ("createdby", "modifiedby", "createdonbehalfby", "modifiedonbehalfby"):
        return f"lk_{referencing}_{column}"
    if column == "owninguser":
        return f"user_{referencing}"
    if column == "owningteam":
        return f"team_{referencing}"
    if column == "owningbusinessunit":
        return f"business_unit_{referencing}"
    if column == "transactioncurrencyid":
        return f"TransactionCurrency_{schema_name(referencing)}"
    if column == "ownerid":
        return f"owner_{referencing}s" if target == "systemuser" else f"{target}_{referencing}s"
    return f"{referencing}_{column}_{target}"


def schema_name(logical: str) -> str:
    """PascalCase schema name of a standard table or column."""
    return _SCHEMA_NAMES.get(logical, logical[:1].upper() + logical[1:])


@dataclass(frozen=True)
class CollectionNav:
    """A collection-valued navigation property of ``target`` (a one-to-many relationship).

    Its rows are the ``source`` table's records whose lookup ``column`` points at a ``target`` record;
    the property's name is the relationship's schema name (``contact_customer_accounts``), as
    ``ReferencedEntityNavigationPropertyName`` says.
    """

    name: str
    source: Table
    column: Column
    target: str

    def field_sql(self, alias: str = "") -> str:
        """SQL reading the lookup of an ``alias`` row of ``source`` (unqualified when ``alias`` is empty)."""
        return f"json_extract({alias + '.' if alias else ''}data, '$.\"{self.column.json_name}\"')"

    def kind_sql(self, alias: str = "") -> str:
        """`` AND ...`` limiting a polymorphic lookup to ``target`` ("" for a single-target lookup).

        Polymorphic lookups keep the target table internally (``@emu.<lookup>.type``; missing means the
        first target), so ``contact_customer_accounts`` never lists a contact whose parent is a contact.
        """
        if len(self.column.targets) < 2:
            return ""
        kind = f"json_extract({alias + '.' if alias else ''}data, '$.\"@emu.{self.column.json_name}.type\"')"
        first = self.column.targets[0].replace("'", "")
        return f" AND coalesce({kind}, '{first}') = '{self.target.replace(chr(39), '')}'"

    def link_sql(self, alias: str, parent: str) -> str:
        """SQL: the ``alias`` row of ``source`` is in the collection of the record whose id is ``parent``."""
        return f"{self.field_sql(alias)} = {parent}{self.kind_sql(alias)}"


#: Derived navigation properties by (id of the tables mapping, table); the mapping is kept so an id is never reused.
_COLLECTIONS: dict[tuple[int, str], tuple[Mapping[str, Table], dict[str, CollectionNav]]] = {}


def collection_navs(table: Table, tables: Mapping[str, Table]) -> dict[str, CollectionNav]:
    """The one-to-many collection-valued navigation properties of ``table``, by name (join-tables.md).

    Derived from the same relationships as ``OneToManyRelationships``: one per lookup of a served table
    that can point at ``table``.
    """
    key = (id(tables), table.logical_name)
    cached = _COLLECTIONS.get(key)
    if cached is not None and cached[0] is tables:
        return cached[1]
    found: dict[str, CollectionNav] = {}
    for other in tables.values():
        for nav in nav_props(other).values():
            for target in nav.targets:
                if target == table.logical_name:
                    name = relationship_name(other.logical_name, nav.column.name, target)
                    found.setdefault(name, CollectionNav(name, other, nav.column, target))
    _COLLECTIONS[key] = (tables, found)
    return found


def many_to_many_names(table: Table, tables: Mapping[str, Table]) -> set[str]:
    """Collection-valued navigation properties of ``table`` backed by N:N relationships."""
    if "systemuser" in tables and "team" in tables and table.logical_name in ("systemuser", "team"):
        return {"teammembership_association"}
    return set()


class MetadataService:
    """Answers ``GET /``, ``GET $metadata`` and ``GET EntityDefinitions...`` from the schema."""

    def __init__(self, tables: Mapping[str, Table]) -> None:
        self.tables = tables

    # -- service document and CSDL -----------------------------------------------------------------
    def service_document(self, root: str) -> Reply:
        sets = [{"name": t.entity_set, "kind": "EntitySet", "url": t.entity_set} for t in self.tables.values()]
        for name in ("EntityDefinitions", "RelationshipDefinitions", "GlobalOptionSetDefinitions"):
            sets.append({"name": name, "kind": "EntitySet", "url": name})
        return json_reply({"@odata.context": f"{root}/$metadata", "value": sets})

    def csdl(self, *, annotations: bool) -> Reply:
        """Minimal CSDL: entity types with keys, properties and lookup navigation properties; entity sets."""
        out = ['<?xml version="1.0" encoding="utf-8"?>',
               '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
               '<edmx:DataServices>',
               f'<Schema Namespace="{CRM}" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">',
               '<EntityType Name="crmbaseentity" Abstract="true" />']
        for t in self.tables.values():
            out.append(f'<EntityType Name="{t.logical_name}" BaseType="mscrm.crmbaseentity">')
            out.append(f'<Key><PropertyRef Name="{t.primary_id}" /></Key>')
            for c in t.columns:
                out.append(f'<Property Name="{c.json_name}" Type="{edm_type(c)}"'
                           + (' Unicode="false"' if edm_type(c) == "Edm.String" else "") + " />")
            for nav in nav_props(t).values():
                target = nav.targets[0] if len(nav.targets) == 1 else "principal"
                out.append(f'<NavigationProperty Name="{nav.name}" Type="mscrm.{target}" />')
            for coll in collection_navs(t, self.tables).values():
                out.append(f'<NavigationProperty Name="{coll.name}" Type="Collection(mscrm.{coll.source.logical_name})" />')
            out.append("</EntityType>")
        out.append('<EntityType Name="principal" BaseType="mscrm.crmbaseentity" Abstract="true" />')
        out.append('<ComplexType Name="WhoAmIResponse"><Property Name="BusinessUnitId" Type="Edm.Guid" '
                   'Nullable="false" /><Property Name="UserId" Type="Edm.Guid" Nullable="false" />'
                   '<Property Name="OrganizationId" Type="Edm.Guid" Nullable="false" /></ComplexType>')
        out.append('<Function Name="WhoAmI"><ReturnType Type="mscrm.WhoAmIResponse" Nullable="false" /></Function>')
        out.append('<Function Name="RetrieveTotalRecordCount"><Parameter Name="EntityNames" '
                   'Type="Collection(Edm.String)" Nullable="false" /><ReturnType '
                   'Type="mscrm.RetrieveTotalRecordCountResponse" Nullable="false" /></Function>')
        out.append('<EntityContainer Name="System">')
        for t in self.tables.values():
            out.append(f'<EntitySet Name="{t.entity_set}" EntityType="{CRM}.{t.logical_name}">')
            for nav in nav_props(t).values():
                bound = self.tables.get(nav.targets[0])
                if len(nav.targets) == 1 and bound is not None:
                    out.append(f'<NavigationPropertyBinding Path="{nav.name}" Target="{bound.entity_set}" />')
            if annotations:
                # Tables with change tracking carry the Capabilities annotation (§1.11).
                out.append('<Annotation Term="Org.OData.Capabilities.V1.ChangeTracking"><Record>'
                           f'<PropertyValue Property="Supported" Bool="{"true" if t.change_tracking else "false"}" />'
                           '</Record></Annotation>')
            out.append("</EntitySet>")
        out.append('<FunctionImport Name="WhoAmI" Function="mscrm.WhoAmI" />')
        out.append('<FunctionImport Name="RetrieveTotalRecordCount" Function="mscrm.RetrieveTotalRecordCount" />')
        out += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
        return Reply(200, "\n".join(out).encode(), content_type="application/xml")

    # -- metadata objects --------------------------------------------------------------------------
    def entity(self, t: Table) -> dict[str, Any]:
        """EntityMetadata of a table (§1.14)."""
        return {
            "@odata.type": "#Microsoft.Dynamics.CRM.EntityMetadata",
            "MetadataId": _mid("entity", t.logical_name),
            "LogicalName": t.logical_name, "SchemaName": schema_name(t.logical_name),
            "EntitySetName": t.entity_set, "LogicalCollectionName": t.entity_set,
            "CollectionSchemaName": schema_name(t.entity_set),
            "PrimaryIdAttribute": t.primary_id, "PrimaryNameAttribute": t.primary_name,
            "ObjectTypeCode": t.object_type_code, "OwnershipType": t.ownership,
            "ChangeTrackingEnabled": t.change_tracking,
            "CanChangeTrackingBeEnabled": _managed(True, "canchangetrackingbeenabled"),
            "IsCustomEntity": False, "IsManaged": True, "IsActivity": t.is_activity, "IsIntersect": False,
            "IsOptimisticConcurrencyEnabled": True, "IsValidForAdvancedFind": True, "IsLogicalEntity": False,
            "CanCreateAttributes": _managed(True, "cancreateattributes"),
            # Properties the Dataverse SDK filters and selects on (tables.list: IsPrivate eq false).
            "IsPrivate": False, "TableType": "Standard", "IsVirtualEntity": False, "IsBPFEntity": False,
            "IsAvailableOffline": True, "HasActivities": not t.is_activity, "HasNotes": True,
            "IsAuditEnabled": _managed(True, "canmodifyauditsettings"),
            "IsCustomizable": _managed(True, "iscustomizable"),
            "IsRenameable": _managed(False, "isrenameable"), "IsMappable": _managed(True, "ismappable"),
            "IsDuplicateDetectionEnabled": _managed(False, "canmodifyduplicatedetectionsettings"),
            "DisplayName": label(t.display, t.logical_name, "display"),
            "DisplayCollectionName": label(t.display_collection, t.logical_name, "displaycollection"),
            "Description": label(t.description, t.logical_name, "description"),
        }

    def attribute(self, t: Table, c: Column) -> dict[str, Any]:
        """AttributeMetadata (with the fields of its derived type) of a column (§1.14)."""
        kind = _ATTR_TYPES.get(c.type, "AttributeMetadata")
        if c.name == t.primary_id:
            required = "SystemRequired"
        elif c.required:
            required = "ApplicationRequired"
        else:
            required = "None"
        a: dict[str, Any] = {
            "@odata.type": f"#{CRM}.{kind}",
            "MetadataId": _mid("attribute", t.logical_name, c.name),
            "LogicalName": c.name, "SchemaName": schema_name(c.name), "EntityLogicalName": t.logical_name,
            "AttributeType": c.type,
            "AttributeTypeName": {"Value": ("UniqueidentifierType" if c.type == "Uniqueidentifier"
                                            else f"{c.type}Type")},
            "AttributeOf": None, "IsPrimaryId": c.name == t.primary_id, "IsPrimaryName": c.name == t.primary_name,
            "IsCustomAttribute": False, "IsManaged": True, "IsLogical": False, "IsValidForRead": True,
            "IsValidForCreate": not c.read_only or c.name == t.primary_id, "IsValidForUpdate": not c.read_only,
            "RequiredLevel": {"Value": required, "CanBeChanged": c.name != t.primary_id,
                              "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings"},
            "DisplayName": label(c.display, t.logical_name, c.name, "display"),
            "Description": label(c.description, t.logical_name, c.name, "description"),
        }
        if c.type in ("String", "Memo"):
            a["MaxLength"] = c.max_length
            a["Format"] = "Text" if c.type == "String" else "TextArea"
            a["FormatName"] = {"Value": a["Format"]}
        if c.is_lookup:
            a["Targets"] = list(c.targets)
        if c.type in ("Money", "Decimal", "Double"):
            a["Precision"] = c.precision
        if c.type == "Integer":
            a.update({"MinValue": -2147483648, "MaxValue": 2147483647, "Format": "None"})
        if c.type == "DateTime":
            a["Format"] = "DateOnly" if c.date_only else "DateAndTime"
            a["DateTimeBehavior"] = {"Value": "DateOnly" if c.date_only else "UserLocal"}
        if c.type in ("Picklist", "State", "Status", "Boolean"):
            a["DefaultFormValue"] = None if c.type != "Boolean" else 0
        return a

    def option_set(self, t: Table, c: Column) -> dict[str, Any] | None:
        """OptionSetMetadata of a choice column (``BooleanOptionSetMetadata`` for two-option columns)."""
        opts: OptionSet | None = c.options
        if opts is None:
            if c.type != "Boolean":
                return None
            opts = OptionSet(c.name, {0: "No", 1: "Yes"})
        base = {"MetadataId": _mid("optionset", t.logical_name if not opts.is_global else "", opts.name),
                "Name": opts.name, "IsGlobal": opts.is_global, "IsCustomOptionSet": False, "IsManaged": True,
                "DisplayName": label(c.display, opts.name), "Description": label("", opts.name)}

        def option(value: int, text: str, kind: str = "OptionMetadata") -> dict[str, Any]:
            o: dict[str, Any] = {"@odata.type": f"#{CRM}.{kind}", "Value": value,
                                 "Label": label(text, opts.name, str(value)), "Description": label("", ""),
                                 "Color": None, "IsManaged": True, "ExternalValue": None, "MetadataId": None,
                                 "HasChanged": None}
            if kind == "StateOptionMetadata":
                o["DefaultStatus"] = opts.default_status.get(value)
                o["InvariantName"] = text
            if kind == "StatusOptionMetadata":
                o["State"] = opts.state_of.get(value)
            return o

        if c.type == "Boolean":
            return {"@odata.type": f"#{CRM}.BooleanOptionSetMetadata", **base, "OptionSetType": "Boolean",
                    "TrueOption": option(1, opts.options.get(1, "Yes")),
                    "FalseOption": option(0, opts.options.get(0, "No"))}
        kind = {"State": "StateOptionMetadata", "Status": "StatusOptionMetadata"}.get(c.type, "OptionMetadata")
        return {"@odata.type": f"#{CRM}.OptionSetMetadata", **base,
                "OptionSetType": {"State": "State", "Status": "Status"}.get(c.type, "Picklist"),
                "Options": [option(v, lab, kind) for v, lab in opts.options.items()]}

    def keys(self, t: Table) -> list[dict[str, Any]]:
        """EntityKeyMetadata of the table's alternate keys."""
        return [{"MetadataId": _mid("key", t.logical_name, *k), "LogicalName": "_".join(k) + "_key",
                 "SchemaName": schema_name("_".join(k)) + "Key", "KeyAttributes": list(k),
                 "EntityLogicalName": t.logical_name, "EntityKeyIndexStatus": "Active", "IsManaged": True,
                 "DisplayName": label(" ".join(k) + " key", t.logical_name, *k)} for k in t.alternate_keys]

    def many_to_one(self, t: Table) -> list[dict[str, Any]]:
        """OneToManyRelationshipMetadata for each lookup of the table (it is the referencing side)."""
        out = []
        for nav in nav_props(t).values():
            for target in nav.targets:
                ref = self.tables.get(target)
                name = relationship_name(t.logical_name, nav.column.name, target)
                out.append({
                    "@odata.type": f"#{CRM}.OneToManyRelationshipMetadata",
                    "MetadataId": _mid("rel", t.logical_name, nav.name, target),
                    "SchemaName": name, "RelationshipType": "OneToManyRelationship",
                    "ReferencedEntity": target, "ReferencedAttribute": ref.primary_id if ref else f"{target}id",
                    "ReferencingEntity": t.logical_name, "ReferencingAttribute": nav.column.name,
                    "ReferencingEntityNavigationPropertyName": nav.name,
                    "ReferencedEntityNavigationPropertyName": name,
                    "IsHierarchical": target == t.logical_name, "SecurityTypes": "None",
                    "IsCustomRelationship": False, "IsCustomizable": _managed(False, "iscustomizable"),
                    "IsValidForAdvancedFind": True, "IsManaged": True,
                    "CascadeConfiguration": {"Assign": "NoCascade", "Delete": "RemoveLink", "Merge": "NoCascade",
                                             "Reparent": "NoCascade", "Share": "NoCascade", "Unshare": "NoCascade",
                                             "RollupView": "NoCascade"}})
        return out

    def one_to_many(self, t: Table) -> list[dict[str, Any]]:
        """Relationships where other tables' lookups point at ``t``."""
        return [r for other in self.tables.values() for r in self.many_to_one(other)
                if r["ReferencedEntity"] == t.logical_name]

    def many_to_many(self, t: Table | None = None) -> list[dict[str, Any]]:
        """ManyToManyRelationshipMetadata: team membership (systemuser N:N team) when both tables are served."""
        out: list[dict[str, Any]] = []
        if "systemuser" in self.tables and "team" in self.tables and (t is None or t.logical_name in
                                                                        ("systemuser", "team")):
            out.append({
                "@odata.type": f"#{CRM}.ManyToManyRelationshipMetadata",
                "MetadataId": _mid("rel", "teammembership_association"),
                "SchemaName": "teammembership_association", "RelationshipType": "ManyToManyRelationship",
                "Entity1LogicalName": "systemuser", "Entity2LogicalName": "team",
                "Entity1IntersectAttribute": "systemuserid", "Entity2IntersectAttribute": "teamid",
                "IntersectEntityName": "teammembership",
                "Entity1NavigationPropertyName": "teammembership_association",
                "Entity2NavigationPropertyName": "teammembership_association",
                "IsCustomRelationship": False, "IsCustomizable": _managed(False, "iscustomizable"),
                "IsValidForAdvancedFind": True, "IsManaged": True, "SecurityTypes": "None"})
        return out

    def relationships(self) -> list[dict[str, Any]]:
        """Every relationship (``RelationshipDefinitions``)."""
        return [r for t in self.tables.values() for r in self.many_to_one(t)] + self.many_to_many()

    def global_option_sets(self) -> list[dict[str, Any]]:
        """OptionSetMetadata of every global choice (``GlobalOptionSetDefinitions``), once each."""
        seen: dict[str, dict[str, Any]] = {}
        for t in self.tables.values():
            for c in t.columns:
                if c.options is not None and c.options.is_global and c.options.name not in seen:
                    opts = self.option_set(t, c)
                    if opts is not None:
                        seen[c.options.name] = opts
        return list(seen.values())

    def relationship_definitions(self, segments: Sequence[str], query: Mapping[str, str], root: str) -> Reply:
        """``RelationshipDefinitions[(id|SchemaName='x')][/<cast>]`` with ``$filter``/``$select``."""
        m = re.fullmatch(r"RelationshipDefinitions(?:\((.*)\))?", segments[0], re.S)
        if m is None:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{segments[0]}'.")
        rows = self.relationships()
        ctx = f"{root}/$metadata#RelationshipDefinitions"
        casts = {f"{CRM}.OneToManyRelationshipMetadata": "OneToManyRelationship",
                 f"{CRM}.ManyToManyRelationshipMetadata": "ManyToManyRelationship"}
        rest = list(segments[1:])
        if rest and rest[0] in casts:
            rows = [r for r in rows if r["RelationshipType"] == casts[rest[0]]]
            ctx += f"/{rest[0]}"
            rest = rest[1:]
        if rest:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{rest[0]}'.")
        if m.group(1) is not None:
            key = m.group(1).strip()
            sm = re.fullmatch(r"SchemaName\s*=\s*'([^']*)'", key)
            hit = [r for r in rows if (sm and r["SchemaName"] == sm.group(1)) or r["MetadataId"] == key.strip("'{}")]
            if not hit:
                raise DvError(404, "0x80040217", f"Could not find a relationship with key {key}.")
            data = self._select(hit[0], query.get("$select"), always=("MetadataId", "@odata.type"))
            return json_reply({"@odata.context": f"{ctx}/$entity", **data})
        rows = self._filter(rows, query.get("$filter"), "RelationshipMetadataBase")
        rows = [self._select(r, query.get("$select"), always=("MetadataId", "@odata.type")) for r in rows]
        return json_reply({"@odata.context": ctx + self._sel_ctx(query), "value": rows})

    def global_option_set_definitions(self, segments: Sequence[str], query: Mapping[str, str], root: str) -> Reply:
        """``GlobalOptionSetDefinitions[(id|Name='x')]``."""
        m = re.fullmatch(r"GlobalOptionSetDefinitions(?:\((.*)\))?", segments[0], re.S)
        if m is None or len(segments) > 1:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{segments[-1]}'.")
        rows = self.global_option_sets()
        ctx = f"{root}/$metadata#GlobalOptionSetDefinitions"
        if m.group(1) is not None:
            key = m.group(1).strip()
            nm = re.fullmatch(r"Name\s*=\s*'([^']*)'", key)
            hit = [r for r in rows if (nm and r["Name"] == nm.group(1)) or r["MetadataId"] == key.strip("'{}")]
            if not hit:
                raise DvError(404, "0x80040217", f"Could not find optionset with key {key}.")
            data = self._select(hit[0], query.get("$select"), always=("MetadataId", "@odata.type"))
            return json_reply({"@odata.context": f"{ctx}/$entity", **data})
        rows = self._filter(rows, query.get("$filter"), "OptionSetMetadataBase")
        rows = [self._select(r, query.get("$select"), always=("MetadataId", "@odata.type")) for r in rows]
        return json_reply({"@odata.context": ctx + self._sel_ctx(query), "value": rows})

    # -- EntityDefinitions requests ----------------------------------------------------------------
    def entity_definitions(self, segments: Sequence[str], query: Mapping[str, str], root: str) -> Reply:
        """Serve ``EntityDefinitions[(key)][/Attributes[(key)][/cast]|/Keys|/...Relationships]``."""
        head = segments[0]
        m = re.fullmatch(r"EntityDefinitions(?:\((.*)\))?", head, re.S)
        if m is None:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{head}'.")
        ctx_base = f"{root}/$metadata#EntityDefinitions"
        if m.group(1) is None:
            if len(segments) > 1:
                raise DvError(404, "0x8006088a", f"Resource not found for the segment '{segments[1]}'.")
            rows = [self._entity_with_expand(t, query) for t in self.tables.values()]
            rows = self._filter(rows, query.get("$filter"), "EntityMetadata")
            rows = [self._select(r, query.get("$select"), always=("MetadataId",)) for r in rows]
            return json_reply({"@odata.context": ctx_base + self._sel_ctx(query), "value": rows})
        table = self._find_table(m.group(1))
        if len(segments) == 1:
            data = self._select(self._entity_with_expand(table, query), query.get("$select"), always=("MetadataId",))
            return json_reply({"@odata.context": f"{ctx_base}{self._sel_ctx(query)}/$entity", **data})
        sub = segments[1]
        ent_ctx = f"{ctx_base}({_mid('entity', table.logical_name)})"
        if sub == "Keys":
            return json_reply({"@odata.context": f"{ent_ctx}/Keys", "value": self.keys(table)})
        if sub in ("OneToManyRelationships", "ManyToOneRelationships", "ManyToManyRelationships"):
            rels = {"OneToManyRelationships": self.one_to_many, "ManyToOneRelationships": self.many_to_one,
                    "ManyToManyRelationships": self.many_to_many}[sub](table)
            rels = self._filter(rels, query.get("$filter"), "RelationshipMetadataBase")
            rels = [self._select(r, query.get("$select"), always=("MetadataId", "@odata.type")) for r in rels]
            return json_reply({"@odata.context": f"{ent_ctx}/{sub}", "value": rels})
        am = re.fullmatch(r"Attributes(?:\((.*)\))?", sub, re.S)
        if am is None:
            raise DvError(404, "0x8006088a", f"Resource not found for the segment '{sub}'.")
        cast = segments[2] if len(segments) > 2 else None
        if cast is not None:
            cast_name = cast.removeprefix(f"{CRM}.")
            if not cast.startswith(f"{CRM}.") or cast_name not in set(_ATTR_TYPES.values()) | _ENUM_TYPES:
                raise DvError(400, "0x80060888", f"The type '{cast}' is not valid for the Attributes segment.")
        else:
            cast_name = None
        cols = [c for c in table.columns
                if cast_name is None or _ATTR_TYPES.get(c.type) == cast_name]
        if am.group(1) is not None:
            key = am.group(1).strip()
            lm = re.fullmatch(r"LogicalName='([^']*)'", key)
            cols = [c for c in cols if (lm and c.name == lm.group(1))
                    or _mid("attribute", table.logical_name, c.name) == key.strip("'")]
            if not cols:
                raise DvError(404, "0x80040217", f"Could not find attribute {key} on entity {table.logical_name}.")
        attrs = [self._attribute_with_expand(table, c, query) for c in cols]
        attrs = self._filter(attrs, query.get("$filter"), "AttributeMetadata")
        attrs = [self._select(a, query.get("$select"), always=("MetadataId", "@odata.type"),
                              expanded=self._expand_names(query)) for a in attrs]
        ctx = f"{ent_ctx}/Attributes" + (f"/{cast}" if cast else "")
        if am.group(1) is not None:
            return json_reply({"@odata.context": ctx + "/$entity", **attrs[0]})
        return json_reply({"@odata.context": ctx, "value": attrs})

    def _find_table(self, key: str) -> Table:
        key = key.strip()
        lm = re.fullmatch(r"LogicalName\s*=\s*'([^']*)'", key)
        for t in self.tables.values():
            if (lm and t.logical_name == lm.group(1)) or _mid("entity", t.logical_name) == key.strip("'"):
                return t
        raise DvError(404, "0x80040217", f"Could not find an entity with key {key}.")

    @staticmethod
    def _expand_names(query: Mapping[str, str]) -> list[str]:
        return [re.split(r"[(/]", e.strip(), maxsplit=1)[0] for e in _split(query.get("$expand", ""))]

    def _entity_with_expand(self, t: Table, query: Mapping[str, str]) -> dict[str, Any]:
        data = self.entity(t)
        for item in _split(query.get("$expand", "")):
            name, inner = _expand_item(item)
            if name == "Attributes":
                attrs = [self._attribute_with_expand(t, c, inner) for c in t.columns]
                attrs = self._filter(attrs, inner.get("$filter"), "AttributeMetadata")
                data["Attributes"] = [self._select(a, inner.get("$select"), always=("MetadataId", "@odata.type"))
                                      for a in attrs]
            elif name == "Keys":
                data["Keys"] = self.keys(t)
            elif name == "ManyToOneRelationships":
                data["ManyToOneRelationships"] = self.many_to_one(t)
            elif name == "OneToManyRelationships":
                data["OneToManyRelationships"] = self.one_to_many(t)
            elif name == "ManyToManyRelationships":
                data["ManyToManyRelationships"] = self.many_to_many(t)
            else:
                raise DvError(400, "0x80060888", f"Could not find a property named '{name}' on type "
                                                 f"'{CRM}.EntityMetadata'.")
        return data

    def _attribute_with_expand(self, t: Table, c: Column, query: Mapping[str, str]) -> dict[str, Any]:
        data = self.attribute(t, c)
        for item in _split(query.get("$expand", "")):
            name, inner = _expand_item(item)
            if name not in ("OptionSet", "GlobalOptionSet"):
                raise DvError(400, "0x80060888", f"Could not find a property named '{name}' on type "
                                                 f"'{CRM}.AttributeMetadata'.")
            opts = self.option_set(t, c)
            if name == "GlobalOptionSet" and (c.options is None or not c.options.is_global):
                opts = None
            data[name] = self._select(opts, inner.get("$select"), always=("MetadataId",)) if opts else None
        return data

    @staticmethod
    def _sel_ctx(query: Mapping[str, str]) -> str:
        sel = query.get("$select")
        return f"({sel})" if sel else ""

    @staticmethod
    def _select(data: dict[str, Any], select: str | None, *, always: Sequence[str] = (),
                expanded: Sequence[str] = ()) -> dict[str, Any]:
        if not select:
            return data
        names = [s.strip() for s in select.split(",") if s.strip()]
        out = {k: data[k] for k in always if k in data}
        for name in names:
            # Properties the emulator does not model come back as null rather than failing the request.
            out[name] = data.get(name)
        for k in ("Attributes", "Keys", "ManyToOneRelationships", "OneToManyRelationships",
                  "ManyToManyRelationships", "OptionSet",
                  "GlobalOptionSet", *expanded):
            if k in data:
                out[k] = data[k]
        return out

    def _filter(self, rows: list[dict[str, Any]], text: str | None, type_name: str) -> list[dict[str, Any]]:
        if not text:
            return rows
        if re.search(r"\b(startswith|endswith|contains)\s*\(", text):
            raise DvError(501, "0x8006088a", "The 'startswith' function isn't supported for Metadata Entities"
                          if "startswith" in text else "String functions aren't supported for Metadata Entities")
        # Enum literals (Microsoft.Dynamics.CRM.OwnershipTypes'UserOwned') compare as their member name.
        try:
            tree = parse_filter(_ENUM_LITERAL.sub(r"'\1'", text))
        except FilterError as exc:
            raise DvError(400, "0x80060888", exc.message) from None
        return [r for r in rows if _evaluate(tree, r, type_name)]


def _split(text: str) -> list[str]:
    out: list[str] = []
    buf: list[str] = []
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append("".join(buf).strip())
            buf = []
        else:
            buf.append(ch)
    if "".join(buf).strip():
        out.append("".join(buf).strip())
    return [s for s in out if s]


def _expand_item(item: str) -> tuple[str, dict[str, str]]:
    m = re.fullmatch(r"(\w+)\s*(?:\((.*)\))?", item.strip(), re.S)
    if m is None:
        raise DvError(400, "0x80060888", f"Syntax error in $expand at '{item}'.")
    inner: dict[str, str] = {}
    for opt in (m.group(2) or "").split(";"):
        key, _, value = opt.partition("=")
        if key.strip():
            inner[key.strip()] = value.strip()
    return m.group(1), inner


def _value_of(path: str, row: Mapping[str, Any], type_name: str) -> Any:
    cur: Any = row
    for part in path.split("/"):
        if not isinstance(cur, Mapping) or part not in cur:
            raise DvError(400, "0x80060888", f"Could not find a property named '{part}' on type '{CRM}.{type_name}'.")
        cur = cur[part]
    return cur


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and b is not None and a > b,
    "ge": lambda a, b: a is not None and b is not None and a >= b,
    "lt": lambda a, b: a is not None and b is not None and a < b,
    "le": lambda a, b: a is not None and b is not None and a <= b,
}


def _evaluate(node: Node, row: Mapping[str, Any], type_name: str) -> bool:
    """Evaluate a parsed metadata ``$filter`` against one metadata object (metadata is small: no SQL)."""
    if isinstance(node, Logical):
        left = _evaluate(node.left, row, type_name)
        right = _evaluate(node.right, row, type_name)
        return (left and right) if node.op == "and" else (left or right)
    if isinstance(node, Not):
        return not _evaluate(node.operand, row, type_name)
    if isinstance(node, Compare):
        def operand(n: Node) -> Any:
            if isinstance(n, Member):
                return _value_of(n.path, row, type_name)
            if isinstance(n, Literal):
                return n.value
            raise DvError(400, "0x80060888", "Unsupported expression in a metadata $filter.")
        a, b = operand(node.left), operand(node.right)
        if isinstance(a, str) and isinstance(b, str):
            a, b = a.lower(), b.lower()
        return _OPS[node.op](a, b)
    if isinstance(node, Member):
        return bool(_value_of(node.path, row, type_name))
    raise DvError(400, "0x80060888", "Unsupported expression in a metadata $filter.")
