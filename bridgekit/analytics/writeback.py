"""Write-back of analytics results (scores, health, forecasts) to the warehouse schema ``analytics``.

The warehouse module owns the mirrored schemas (``dataverse``, ``graph``, ``bridgekit``); analytics owns
``analytics`` and only ever replaces its own tables. Each write is one short read-write transaction: a
DuckDB file has one writer process at a time (https://duckdb.org/docs/connect/concurrency), so, like a
sync merge, it retries while a reader or a merge holds the file, and readers see the old table or the new
one, never half of it.

Identifier columns that hold GUIDs are stored as ``UUID`` so they join with the mirrored tables
(``JOIN dataverse.opportunity USING (opportunityid)``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from bridgekit.errors import WarehouseError
from bridgekit.warehouse import confine

__all__ = ["ANALYTICS_SCHEMA", "analytics_tables", "read_only_connection", "read_table", "write_table"]

ANALYTICS_SCHEMA = "analytics"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_LOCK_WAIT_S = 60.0


def _path(target: Any) -> Path:
    """The warehouse file of a Workbench, a Warehouse or a path."""
    wh = getattr(target, "warehouse", target)
    return Path(getattr(wh, "path", wh))


def _connect(path: Path) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + _LOCK_WAIT_S
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path))
        except duckdb.Error as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise WarehouseError(f"cannot open warehouse {path} for writing: {exc}", path=str(path),
                                     hint="a sync merge or another writer holds it; retry when it is done") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _prepare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A copy DuckDB can ingest: GUIDs as text (cast back to UUID), lists/dicts as text, and the UUID columns."""
    out = frame.copy()
    uuids = []
    for col in out.columns:
        s = out[col]
        if s.dtype != object:
            continue
        values = s.dropna()
        if len(values) and all(isinstance(v, uuid.UUID) for v in values):
            uuids.append(col)
            out[col] = s.map(lambda v: None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
        elif len(values) and any(isinstance(v, list | dict | tuple | set) for v in values):
            out[col] = s.map(lambda v: "; ".join(map(str, v)) if isinstance(v, list | tuple | set) else
                             (None if v is None else str(v)))
    return out, uuids


def write_table(target: Any, name: str, frame: pd.DataFrame, *, model: str = "") -> str:
    """Replace ``analytics.<name>`` with ``frame`` plus ``_bk_scored_at`` (UTC) and ``_bk_model``.

    Args:
        target: a Workbench, a Warehouse or the warehouse file path.
        name: the table name (lower-case letters, digits, underscores).
        frame: the rows to store.
        model: a short description of what produced them (model name, split date, metrics).

    Returns:
        The qualified table name, ``analytics.<name>``.

    Raises:
        ValueError: a bad table name.
        WarehouseError: the warehouse does not exist or stayed locked.

    Example:
        >>> write_table(wb, "win_scores", scored[["opportunityid", "win_probability"]])  # doctest: +SKIP
        'analytics.win_scores'
    """
    if not _NAME.match(name):
        raise ValueError(f"bad analytics table name {name!r}: use lower-case letters, digits and underscores")
    path = _path(target)
    if not path.exists():
        raise WarehouseError(f"no warehouse at {path} yet", path=str(path), hint="run `bridgekit sync` first")
    data, uuid_cols = _prepare(frame)
    data["_bk_scored_at"] = pd.Timestamp(dt.datetime.now(dt.UTC))
    data["_bk_model"] = model
    select = ", ".join(f'TRY_CAST("{c}" AS UUID) AS "{c}"' if c in uuid_cols else f'"{c}"' for c in data.columns)
    conn = _connect(path)
    try:
        conn.register("__bk_frame", data)
        # Qualified by catalog: a warehouse file called analytics.duckdb has a catalog named "analytics" too.
        row = conn.execute("SELECT current_database()").fetchone()
        catalog = str(row[0]).replace('"', '""') if row else "memory"
        conn.execute("BEGIN")
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{catalog}".{ANALYTICS_SCHEMA}')
        conn.execute(f'CREATE OR REPLACE TABLE "{catalog}".{ANALYTICS_SCHEMA}."{name}" AS SELECT {select} FROM __bk_frame')
        conn.execute("COMMIT")
    except duckdb.Error as exc:
        with contextlib.suppress(duckdb.Error):
            conn.execute("ROLLBACK")
        raise WarehouseError(f"writing {ANALYTICS_SCHEMA}.{name} failed: {exc}", path=str(path)) from exc
    finally:
        conn.close()
    return f"{ANALYTICS_SCHEMA}.{name}"


def read_table(source: Any, name: str) -> pd.DataFrame:
    """``analytics.<name>`` as a DataFrame (through the source's read-only ``sql``)."""
    if not _NAME.match(name):
        raise ValueError(f"bad analytics table name {name!r}")
    return source.sql(f'SELECT * FROM {ANALYTICS_SCHEMA}."{name}"')


def analytics_tables(source: Any) -> list[str]:
    """The tables in schema ``analytics`` (empty before the first write-back)."""
    df = source.sql("SELECT table_name FROM duckdb_tables() WHERE schema_name = ? ORDER BY 1", [ANALYTICS_SCHEMA])
    return [str(t) for t in df["table_name"].tolist()]


def read_only_connection(target: Any) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection to the warehouse for interactive SQL (jupysql: ``%sql conn``).

    It opens the file the way :meth:`bridgekit.warehouse.Warehouse.sql` does, so both can be used in one
    process, and reaches nothing but the warehouse (no files, other databases or extensions, for the rest of
    the session: see :func:`bridgekit.warehouse.confine`). Close it when done: while it is open, a sync's
    merge waits for it.

    Raises:
        WarehouseError: the warehouse does not exist yet.
    """
    path = _path(target)
    if not path.exists():
        raise WarehouseError(f"no warehouse at {path} yet", path=str(path), hint="run `bridgekit sync` first")
    try:
        conn = duckdb.connect(str(path), read_only=True)
        confine(conn)  # interactive SQL reaches the warehouse only, as `bridgekit sql` does
        return conn
    except duckdb.Error as exc:
        raise WarehouseError(f"cannot open warehouse {path}: {exc}", path=str(path)) from exc
