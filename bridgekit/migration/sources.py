"""Migration sources: CSV and Parquet files, a table or query in a warehouse, another profile's synced warehouse.

Every source streams rows as plain dicts in batches (memory stays one batch) and can say which columns
it has before any row is read, so a mapping naming a missing column fails before validation starts.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bridgekit.errors import ConfigError

__all__ = ["CsvSource", "ParquetSource", "Source", "WarehouseSource", "open_source"]


class Source(Protocol):
    """Rows to migrate, streamed in batches."""

    @property
    def description(self) -> str:
        """What the source is, for reports (a path or ``profile:table``; never a secret)."""
        ...

    def columns(self) -> list[str]:
        """The source's column names."""
        ...

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """Yield lists of at most ``size`` rows, in a stable order."""
        ...


def _missing(path: Path) -> ConfigError:
    return ConfigError(f"source file {path} does not exist", path=str(path),
                       hint="check the path; relative paths in a mapping start at the mapping's folder")


@dataclass(frozen=True)
class CsvSource:
    """A CSV file with a header row (UTF-8, a BOM is fine). Empty cells read as None."""

    path: Path
    delimiter: str = ","
    encoding: str = "utf-8-sig"

    @property
    def description(self) -> str:
        return f"csv:{self.path}"

    def columns(self) -> list[str]:
        if not self.path.is_file():
            raise _missing(self.path)
        with self.path.open(newline="", encoding=self.encoding) as fh:
            header = next(csv.reader(fh, delimiter=self.delimiter), [])
        return [h.strip() for h in header]

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        names = self.columns()
        batch: list[dict[str, Any]] = []
        with self.path.open(newline="", encoding=self.encoding) as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            next(reader, None)
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                batch.append({n: (cells[i] if i < len(cells) and cells[i] != "" else None)
                              for i, n in enumerate(names)})
                if len(batch) >= size:
                    yield batch
                    batch = []
        if batch:
            yield batch


@dataclass(frozen=True)
class ParquetSource:
    """A Parquet file, read one record batch at a time."""

    path: Path

    @property
    def description(self) -> str:
        return f"parquet:{self.path}"

    def columns(self) -> list[str]:
        import pyarrow.parquet as pq

        if not self.path.is_file():
            raise _missing(self.path)
        return list(pq.ParquetFile(self.path).schema_arrow.names)

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        import pyarrow.parquet as pq

        if not self.path.is_file():
            raise _missing(self.path)
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=size):
            yield batch.to_pylist()


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class WarehouseSource:
    """A table (``dataverse.contact``) or a read-only query in a bridgekit warehouse.

    Rows are read in pages of a stable order (``ORDER BY`` the given columns, else every column), each
    page through its own short read-only connection, so a long migration never holds the warehouse
    against a sync's merge.

    Args:
        warehouse: A :class:`~bridgekit.warehouse.Warehouse` (e.g. ``wb.warehouse`` of another profile).
        table: ``schema.table`` to read; or give ``query``.
        query: A SELECT to read instead of a table.
        where: A SQL condition added to the table read (trusted text from the operator, not data).
        order_by: Columns giving a stable order.
        label: How reports name the source (a profile name, never a secret).
    """

    def __init__(self, warehouse: Any, *, table: str | None = None, query: str | None = None,
                 where: str | None = None, order_by: str | None = None, label: str = "") -> None:
        if (table is None) == (query is None):
            raise ConfigError("a warehouse source needs exactly one of table or query",
                              hint="e.g. {kind: warehouse, table: dataverse.contact}")
        if table is not None and not _NAME.match(table):
            raise ConfigError(f"not a table name: {table!r}", hint="write schema.table, e.g. dataverse.contact")
        self.warehouse = warehouse
        self.table, self.query, self.where, self.order_by = table, query, where, order_by
        self.label = label

    @property
    def description(self) -> str:
        what = self.table or "query"
        return f"warehouse:{self.label + ':' if self.label else ''}{what}"

    def _select(self) -> str:
        if self.query is not None:
            return f"SELECT * FROM ({self.query}) AS q"
        schema, _, name = str(self.table).rpartition(".")
        from bridgekit.warehouse import quote

        sql = f"SELECT * FROM {quote(schema)}.{quote(name)}" if schema else f"SELECT * FROM {quote(name)}"
        return sql + (f" WHERE {self.where}" if self.where else "")

    def columns(self) -> list[str]:
        table = self.warehouse.arrow(f"SELECT * FROM ({self._select()}) AS s LIMIT 0")
        return list(table.column_names)

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        order = self.order_by or "ALL"
        offset = 0
        while True:
            page = self.warehouse.arrow(f"SELECT * FROM ({self._select()}) AS s ORDER BY {order} "
                                        f"LIMIT {int(size)} OFFSET {int(offset)}")
            rows: list[dict[str, Any]] = page.to_pylist()
            if not rows:
                return
            yield rows
            if len(rows) < size:
                return
            offset += len(rows)


def open_source(spec: str | Mapping[str, Any] | Source, *, base_dir: str | Path = ".",
                workbench: Any = None) -> Source:
    """A :class:`Source` from a spec.

    Specs: a path ending ``.csv`` or ``.parquet``; ``warehouse:<schema.table>`` (the target profile's
    warehouse); ``profile:<name>:<schema.table>`` (another profile's synced warehouse); or a mapping
    ``{kind: csv|parquet|warehouse, path: ..., table: ..., query: ..., where: ..., profile: ...}``.
    A :class:`Source` object is returned as is.

    Raises:
        ConfigError: the spec is not understood or names a missing file.
    """
    if not isinstance(spec, str | Mapping):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("warehouse:"):
            spec = {"kind": "warehouse", "table": text.removeprefix("warehouse:")}
        elif text.startswith("profile:"):
            _, profile, table = ([*text.split(":", 2), "", ""])[:3]
            spec = {"kind": "warehouse", "profile": profile, "table": table}
        else:
            suffix = Path(text).suffix.lower()
            spec = {"kind": {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, ""), "path": text}
    kind = str(spec.get("kind") or "")
    if kind in ("csv", "parquet"):
        if not spec.get("path"):
            raise ConfigError(f"a {kind} source needs a path", hint=f"{{kind: {kind}, path: file.{kind}}}")
        path = Path(str(spec["path"])).expanduser()
        if not path.is_absolute():
            path = Path(base_dir) / path
        if kind == "csv":
            return CsvSource(path, delimiter=str(spec.get("delimiter", ",")))
        return ParquetSource(path)
    if kind == "warehouse":
        named = spec.get("profile")
        if named and workbench is not None:
            wb: Any = workbench.other(str(named))
            label = str(named)
        elif workbench is not None:
            wb = workbench
            label = str(getattr(getattr(workbench, "profile", None), "name", ""))
        else:
            raise ConfigError("a warehouse source needs a profile (or the target workbench)",
                              hint="write {kind: warehouse, profile: <name>, table: dataverse.contact}")
        return WarehouseSource(wb.warehouse, table=spec.get("table"), query=spec.get("query"),
                               where=spec.get("where"), order_by=spec.get("order_by"), label=label)
    raise ConfigError(f"unknown source {spec!r}",
                      hint="use a .csv/.parquet path, warehouse:<schema.table>, profile:<name>:<schema.table>, "
                           "or {kind: csv|parquet|warehouse, ...}")
