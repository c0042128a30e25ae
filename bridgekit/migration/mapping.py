"""Migration mappings: the YAML file that says how source rows become rows of one Dataverse table.

A mapping, annotated::

    target: account                  # the table's logical name
    key: [accountnumber]             # an alternate key of the table: upserts address rows by it
    source: {kind: csv, path: accounts.csv}   # optional; the runbook's `source` parameter wins
    columns:
      accountnumber: {from: AcctNo, transform: [strip, upper]}
      name: Company                  # shorthand for {from: Company}
      industrycode: {from: Industry, choice: label}     # option labels -> values through metadata
      revenue: {from: Revenue, transform: [number]}
      customertypecode: {value: 3}   # a constant
    lookups:
      primarycontactid: {from: ContactEmpNo, table: contact, key: employeeid}          # by alternate key
      ownerid: {from: OwnerEmail, table: systemuser, match: internalemailaddress,     # through the synced
                via: warehouse}                                                    # warehouse
    options: {batch_size: 100, change_set_size: 10, concurrency: 4}

Relative source paths are resolved against the mapping file's folder. Transforms are listed in
:data:`bridgekit.migration.values.TRANSFORMS` plus ``{map: {...}}`` and ``{default: v}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridgekit.errors import ConfigError
from bridgekit.migration.values import check_transforms

__all__ = ["ColumnMap", "LookupMap", "Mapping", "MigrationOptions", "load_mapping", "parse_mapping"]

_TOP = {"target", "key", "source", "columns", "lookups", "options"}
_COLUMN_KEYS = {"from", "value", "transform", "choice"}
_LOOKUP_KEYS = {"from", "table", "key", "match", "via", "profile", "transform"}
_OPTION_KEYS = {"batch_size", "change_set_size", "concurrency", "sample_size"}


@dataclass(frozen=True)
class ColumnMap:
    """One target column: where its value comes from and how it is transformed.

    Attributes:
        target: The column's logical name.
        source: The source column (None for a constant).
        value: The constant, when ``source`` is None.
        transforms: Transform steps, in order.
        choice_labels: Map option labels to values through the column's metadata.
    """

    target: str
    source: str | None = None
    value: Any = None
    transforms: tuple[Any, ...] = ()
    choice_labels: bool = False


@dataclass(frozen=True)
class LookupMap:
    """A lookup column resolved from a source value to the id of a row in another table.

    Attributes:
        target: The lookup column's logical name (``primarycontactid``).
        source: The source column holding the value to look up.
        table: The referenced table's logical name.
        key: Resolve through this alternate key of ``table`` (a live query to Dataverse).
        match: Resolve through this column of ``table`` in a synced warehouse (``via: warehouse``).
        profile: The profile whose warehouse to use (default: the target profile's).
        transforms: Transform steps applied to the source value before the lookup.
    """

    target: str
    source: str
    table: str
    key: str | None = None
    match: str | None = None
    profile: str | None = None
    transforms: tuple[Any, ...] = ()

    @property
    def via_warehouse(self) -> bool:
        """True when resolved through a synced warehouse rather than an alternate key."""
        return self.match is not None


@dataclass(frozen=True)
class MigrationOptions:
    """Execution knobs: operations per ``$batch``, per atomic change set, batches in flight, samples shown."""

    batch_size: int = 100
    change_set_size: int = 10
    concurrency: int = 4
    sample_size: int = 5


@dataclass(frozen=True)
class Mapping:
    """A parsed, syntax-checked mapping (metadata checks happen in :class:`~bridgekit.migration.Migration`).

    Attributes:
        target: The table's logical name.
        key: The alternate key's columns (target names).
        columns: Column maps, key columns included.
        lookups: Lookup maps.
        source: The mapping's default source spec (``{"kind": "csv", "path": ...}``) or None.
        options: Execution options.
        text: The mapping as written (stored with each run).
        base_dir: The folder relative paths are resolved against.
    """

    target: str
    key: tuple[str, ...]
    columns: tuple[ColumnMap, ...]
    lookups: tuple[LookupMap, ...] = ()
    source: dict[str, Any] | None = None
    options: MigrationOptions = field(default_factory=MigrationOptions)
    text: str = ""
    base_dir: str = "."

    @property
    def sha256(self) -> str:
        """Fingerprint of the mapping text (recorded with a run)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def source_columns(self) -> list[str]:
        """Every source column the mapping reads."""
        names = [c.source for c in self.columns if c.source] + [lk.source for lk in self.lookups]
        return list(dict.fromkeys(names))

    def column(self, name: str) -> ColumnMap | None:
        """The map of target column ``name``."""
        return next((c for c in self.columns if c.target == name), None)


def _bad(message: str, where: str, hint: str) -> ConfigError:
    return ConfigError(f"mapping {where}: {message}", path=where, hint=hint)


def _steps(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def parse_mapping(data: Any, *, where: str = "<mapping>", text: str = "", base_dir: str = ".") -> Mapping:
    """Build a :class:`Mapping` from parsed YAML.

    Raises:
        ConfigError: a key is unknown or missing, or a transform is not known; every problem is listed.
    """
    if not isinstance(data, MappingABC):
        raise _bad("must be a YAML mapping with target, key and columns", where, "see bridgekit.migration.mapping")
    problems: list[str] = []
    unknown = set(data) - _TOP
    if unknown:
        problems.append(f"unknown key(s) {', '.join(sorted(unknown))} (valid: {', '.join(sorted(_TOP))})")
    target = data.get("target")
    if not isinstance(target, str) or not target:
        problems.append("'target' must name the Dataverse table (logical name)")
    raw_key = data.get("key")
    key = tuple([raw_key] if isinstance(raw_key, str) else raw_key or ())
    if not key or not all(isinstance(k, str) for k in key):
        problems.append("'key' must name the alternate key column(s) used for upserts")
    columns: list[ColumnMap] = []
    raw_columns = data.get("columns") or {}
    if not isinstance(raw_columns, MappingABC) or not raw_columns:
        problems.append("'columns' must map target columns to source columns")
        raw_columns = {}
    for name, spec in raw_columns.items():
        if isinstance(spec, str):
            columns.append(ColumnMap(str(name), source=spec))
            continue
        if not isinstance(spec, MappingABC):
            problems.append(f"columns.{name}: write a source column name or {{from: ..., transform: [...]}}")
            continue
        bad = set(spec) - _COLUMN_KEYS
        if bad:
            problems.append(f"columns.{name}: unknown key(s) {', '.join(sorted(bad))}")
        if ("from" in spec) == ("value" in spec):
            problems.append(f"columns.{name}: give exactly one of 'from' (a source column) or 'value' (a constant)")
        choice = spec.get("choice")
        if choice not in (None, "label", "value"):
            problems.append(f"columns.{name}: choice must be 'label' or 'value'")
        steps = _steps(spec.get("transform"))
        problems += check_transforms(steps, f"columns.{name}")
        columns.append(ColumnMap(str(name), source=spec.get("from"), value=spec.get("value"), transforms=steps,
                                 choice_labels=choice == "label"))
    lookups: list[LookupMap] = []
    raw_lookups = data.get("lookups") or {}
    if not isinstance(raw_lookups, MappingABC):
        problems.append("'lookups' must map lookup columns to {from, table, key | match}")
        raw_lookups = {}
    for name, spec in raw_lookups.items():
        if not isinstance(spec, MappingABC):
            problems.append(f"lookups.{name}: write {{from: ..., table: ..., key: ...}}")
            continue
        bad = set(spec) - _LOOKUP_KEYS
        if bad:
            problems.append(f"lookups.{name}: unknown key(s) {', '.join(sorted(bad))}")
        if not spec.get("from") or not spec.get("table"):
            problems.append(f"lookups.{name}: 'from' (source column) and 'table' (referenced table) are required")
        via = spec.get("via", "warehouse" if spec.get("match") else "key")
        if via not in ("key", "warehouse"):
            problems.append(f"lookups.{name}: via must be 'key' (alternate key) or 'warehouse'")
        if via == "key" and not spec.get("key"):
            problems.append(f"lookups.{name}: resolving by alternate key needs 'key: <column>'")
        if via == "warehouse" and not spec.get("match"):
            problems.append(f"lookups.{name}: resolving through the warehouse needs 'match: <column>'")
        steps = _steps(spec.get("transform"))
        problems += check_transforms(steps, f"lookups.{name}")
        if name in raw_columns:
            problems.append(f"lookups.{name}: also listed under columns")
        lookups.append(LookupMap(str(name), source=str(spec.get("from") or ""), table=str(spec.get("table") or ""),
                                 key=spec.get("key") if via == "key" else None,
                                 match=spec.get("match") if via == "warehouse" else None,
                                 profile=spec.get("profile"), transforms=steps))
    for k in key:
        if isinstance(k, str) and k not in {c.target for c in columns}:
            problems.append(f"key column '{k}' must be mapped under columns")
    source = data.get("source")
    if source is not None and not isinstance(source, MappingABC):
        problems.append("'source' must be a mapping like {kind: csv, path: file.csv}")
    raw_options = data.get("options") or {}
    options = MigrationOptions()
    if not isinstance(raw_options, MappingABC) or set(raw_options) - _OPTION_KEYS:
        problems.append(f"'options' may hold {', '.join(sorted(_OPTION_KEYS))}")
    else:
        for opt, value in raw_options.items():
            if not isinstance(value, int) or value < 1:
                problems.append(f"options.{opt} must be a positive integer")
        if not problems:
            options = MigrationOptions(**{**options.__dict__, **dict(raw_options)})
            if options.batch_size > 1000:
                problems.append("options.batch_size must be at most 1000 (the $batch limit)")
    if problems:
        raise ConfigError(f"mapping {where} has {len(problems)} problem(s): " + "; ".join(problems), path=where,
                          hint="fix the mapping file; see the format in bridgekit/migration/mapping.py")
    return Mapping(target=str(target), key=key, columns=tuple(columns), lookups=tuple(lookups),
                   source=dict(source) if source else None, options=options, text=text, base_dir=base_dir)


def load_mapping(path: str | Path) -> Mapping:
    """Read and check a mapping YAML file.

    Raises:
        ConfigError: the file is missing, not YAML, or not a valid mapping.

    Example:
        >>> m = load_mapping("tests/data/migration/accounts.yaml")  # doctest: +SKIP
        >>> m.target, m.key                                           # doctest: +SKIP
        ('account', ('accountnumber',))
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read mapping {p}: {exc.strerror}", path=str(p),
                          hint="check the mapping path (relative paths start at the working directory)") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"mapping {p} is not valid YAML: {exc}", path=str(p), hint="fix the YAML syntax") from exc
    return parse_mapping(data, where=str(p), text=text, base_dir=str(p.resolve().parent))
