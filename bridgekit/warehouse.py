"""The DuckDB warehouse: files, connections, schema bootstrap and migrations, staging, merges and bookkeeping.

Design (why it looks like this)
-------------------------------
DuckDB lets one *process* open a database file read-write, and a read-write connection locks the file
exclusively (readers in other processes cannot even open it read-only meanwhile). A sync that held the
warehouse open for its whole run would lock every notebook out, and a sync killed mid-run would leave
whatever it had written. So a warehouse is three files side by side::

    <name>.duckdb             the warehouse readers see: schemas ``dataverse``, ``graph``, ``bridgekit``
    <name>.staging.duckdb     owned by the running sync: the pages of the current run, checkpointed
    <name>.duckdb.sync.lock   an advisory lock (flock) holding the sync's pid: one sync per warehouse

* **Staging, page by page.** Each page a sync fetches is written to the staging file together with the
  position reached (the next link of its partition) in *one* DuckDB transaction
  (:meth:`Staging.write_page`). A sync killed at any instant (SIGKILL included) restarts from the last
  committed position: the page it was fetching is fetched again, nothing is lost or staged twice.
* **Merge, one short transaction per run.** When the tables of a run are fetched, :meth:`Staging.merge`
  attaches the warehouse read-write, applies every fetched table (a full load replaces the table, a
  delta deletes and re-inserts the touched keys), records ``bridgekit.sync_state`` (the new delta link)
  and ``bridgekit.sync_runs`` in the *same* transaction, commits and detaches. Readers see the state
  before or after a run, never half of it. The staging rows are cleared afterwards; if the process dies
  between the two, the next run sees in ``sync_state.stage_id`` that the merge already happened.
* **Readers retry.** ``bridgekit sql``, :meth:`Warehouse.sql` and notebooks open the warehouse read-only
  for the duration of one query; while a merge holds the file they back off and retry, and a merge
  that finds readers in the file retries likewise (:data:`LOCK_TIMEOUT_S` each).
* **Schema from metadata.** Tables are created from a :class:`TableSpec` (column types derived from
  Dataverse attribute metadata / Graph resource definitions by the sync engine). A new column is added,
  a widened type is widened (``ALTER COLUMN ... TYPE``), nothing is dropped.

Staged values arrive as Arrow batches in *carrier* types (strings for UUIDs, timestamps and JSON, floats
for decimals) and are cast to the column types by DuckDB on insert, so bad data fails at the page that
brought it, and Python never parses a timestamp.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from bridgekit.errors import QueryError, SyncError, SyncInterrupted, WarehouseError

__all__ = [
    "BOOKKEEPING_SCHEMA",
    "LOCK_TIMEOUT_S",
    "META_COLUMNS",
    "Column",
    "HeldReader",
    "MergeCounts",
    "RunRecord",
    "StageState",
    "StagedPage",
    "Staging",
    "SyncLock",
    "TableSpec",
    "Warehouse",
    "delta_select",
    "quote",
]

log = logging.getLogger("bridgekit.warehouse")

BOOKKEEPING_SCHEMA = "bridgekit"
#: How long a reader or a merge waits for the other side to release the warehouse file.
LOCK_TIMEOUT_S = 60.0
_STAGE_ALIAS = "__bk_warehouse"  # never a file stem, which DuckDB uses to name the main catalog
_OP_UPSERT, _OP_DELETE = 0, 1
# A slice of the table read afresh from here on (see Staging.write_page's reset): the row carries the slice's
# columns as JSON in _bk_version and a key of its own that no real row has.
_OP_RESET = 2
_RESET_KEY = "\x00reset "


def quote(name: str) -> str:
    """A DuckDB identifier, double-quoted (names come from service metadata, so never trust them)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Column:
    """One warehouse column: name and DuckDB type (``UUID``, ``VARCHAR``, ``DECIMAL(38,4)``, ``JSON`` ...)."""

    name: str
    type: str


#: bridgekit's per-row columns, after the data columns of every synced table.
META_COLUMNS: tuple[Column, ...] = (
    Column("_bk_version", "VARCHAR"),      # the row's version as served (Dataverse versionnumber / etag)
    Column("_bk_synced_at", "TIMESTAMPTZ"),  # when the merge that wrote the row committed
    Column("_bk_run_id", "VARCHAR"),       # the sync run that wrote the row
)


@dataclass(frozen=True)
class TableSpec:
    """The shape of one mirrored table.

    Attributes:
        schema: ``dataverse`` or ``graph``.
        name: The Dataverse logical name or Graph resource name.
        key: The primary-key column (unique per row).
        columns: The data columns, key included, in order (no ``_bk_`` columns).
        labels: Option-set labels per choice column (column -> value -> label), for
            ``bridgekit.option_labels``.
    """

    schema: str
    name: str
    key: str
    columns: tuple[Column, ...]
    labels: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """``schema.name``: how the bookkeeping tables and reports name the table."""
        return f"{self.schema}.{self.name}"

    def to_json(self) -> str:
        """Serialise (stored with a staged table so a resumed run uses the same shape)."""
        return json.dumps({"schema": self.schema, "name": self.name, "key": self.key,
                           "columns": [[c.name, c.type] for c in self.columns],
                           "labels": {k: {str(v): lab for v, lab in m.items()} for k, m in self.labels.items()}})

    @classmethod
    def from_json(cls, text: str) -> TableSpec:
        """The inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(d["schema"], d["name"], d["key"], tuple(Column(n, t) for n, t in d["columns"]),
                   {k: {int(v): lab for v, lab in m.items()} for k, m in d.get("labels", {}).items()})


@dataclass
class MergeCounts:
    """What a merge changed in one table."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    rows: int = 0  # rows in the table after the merge


@dataclass
class RunRecord:
    """One ``bridgekit.sync_runs`` row (one table in one run)."""

    run_id: str
    table: str
    mode: str  # full | delta | skipped
    started_at: datetime
    ended_at: datetime
    status: str  # ok | error | skipped | pending
    created: int = 0
    updated: int = 0
    deleted: int = 0
    fetched: int = 0
    pages: int = 0
    resynced: bool = False
    error: str | None = None
    message: str | None = None
    caught_up: bool = False


@dataclass
class StageState:
    """A table's in-progress fetch in the staging file."""

    table: str
    stage_id: str
    run_id: str
    mode: str  # full | delta
    resynced: bool
    spec: TableSpec
    base_token: str | None  # the delta link a delta fetch started from
    token: str | None  # the delta link to store after the merge (known once fetched)
    status: str  # fetching | fetched
    started_at: datetime
    pages: int
    fetched: int
    cursors: dict[int, str | None]  # partition -> next position (None: partition done)
    message: str | None = None
    part_tokens: dict[int, str | None] = field(default_factory=dict)  # partition -> its delta link
    digest: str | None = None  # of the staged rows, when asked for (Staging.digest)
    caught_up: bool = False  # resumed pages were followed by a catch-up round in this run
    position_at: datetime | None = None  # when the last round read began: the data is current as of then

    @property
    def done(self) -> bool:
        """True when every partition reached its end."""
        return all(c is None for c in self.cursors.values())


# -- migrations -----------------------------------------------------------------------------------------

_MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "bookkeeping tables", (
        "CREATE SCHEMA IF NOT EXISTS {b}",
        "CREATE SCHEMA IF NOT EXISTS dataverse",
        "CREATE SCHEMA IF NOT EXISTS graph",
        "CREATE TABLE IF NOT EXISTS {b}.sync_state (table_name VARCHAR NOT NULL, source VARCHAR, "
        "delta_link VARCHAR, phase VARCHAR, stage_id VARCHAR, last_run_id VARCHAR, last_status VARCHAR, "
        "last_started_at TIMESTAMPTZ, last_ended_at TIMESTAMPTZ, row_count BIGINT, spec JSON, "
        "updated_at TIMESTAMPTZ)",
        "CREATE TABLE IF NOT EXISTS {b}.sync_runs (run_id VARCHAR NOT NULL, table_name VARCHAR NOT NULL, "
        "mode VARCHAR, started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, duration_s DOUBLE, created BIGINT, "
        "updated BIGINT, deleted BIGINT, fetched BIGINT, pages BIGINT, resynced BOOLEAN, status VARCHAR, "
        "error VARCHAR, message VARCHAR)",
        "CREATE TABLE IF NOT EXISTS {b}.option_labels (table_name VARCHAR NOT NULL, column_name VARCHAR "
        "NOT NULL, value INTEGER NOT NULL, label VARCHAR)",
    )),
    (2, "catch-up rounds and the position the data reached", (
        # sync_runs.caught_up: the run resumed staged pages and replayed what changed since they were read;
        # sync_state.position_at: when the last round the merged data came from began (what freshness reads).
        "ALTER TABLE {b}.sync_runs ADD COLUMN IF NOT EXISTS caught_up BOOLEAN",
        "ALTER TABLE {b}.sync_state ADD COLUMN IF NOT EXISTS position_at TIMESTAMPTZ",
    )),
)
SCHEMA_VERSION = _MIGRATIONS[-1][0]


def _migrate(conn: duckdb.DuckDBPyConnection, db: str | None = None) -> None:
    """Apply pending migrations (in the caller's transaction) to the database ``db`` (default: main)."""
    prefix = f"{quote(db)}." if db else ""
    b = f"{prefix}{BOOKKEEPING_SCHEMA}"
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {b}")
    conn.execute(f"CREATE TABLE IF NOT EXISTS {b}._migrations (version INTEGER NOT NULL, name VARCHAR, "
                 "applied_at TIMESTAMPTZ)")
    row = conn.execute(f"SELECT max(version) FROM {b}._migrations").fetchone()
    current = int(row[0]) if row and row[0] is not None else 0
    for version, name, statements in _MIGRATIONS:
        if version <= current:
            continue
        for stmt in statements:
            sql = stmt.format(b=b)
            if db:
                # Unqualified schema names in the migration text live in the attached database.
                sql = re.sub(r"SCHEMA IF NOT EXISTS (dataverse|graph)$", rf"SCHEMA IF NOT EXISTS {prefix}\1", sql)
            conn.execute(sql)
        conn.execute(f"INSERT INTO {b}._migrations VALUES (?, ?, ?)", [version, name, _now()])


def _now() -> datetime:
    return datetime.now(UTC)


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc)
    # Another process holds the file, or (in this process) another connection has it open: a notebook
    # querying while a watcher thread merges. Both pass; the caller waits and tries again.
    return any(s in text for s in ("Could not set lock", "Conflicting lock", "Unique file handle conflict"))


#: What DuckDB says of a file that is truncated or corrupt (IO errors reading past its end, bad checksums).
_DAMAGE = ("Could not read enough bytes", "not a valid DuckDB database", "Corrupt database", "checksum",
           "corrupted", "Invalid block", "INTERNAL Error")
_DENIED = ("Permission denied", "Read-only file system", "Operation not permitted")


def _is_damage(exc: BaseException) -> bool:
    return any(s in str(exc) for s in _DAMAGE)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _open_error(path: Path, exc: BaseException, *, writing: bool) -> WarehouseError:
    """The one-line error for a warehouse file that cannot be opened: damaged, not permitted, or else."""
    if any(s in str(exc) for s in _DENIED):
        if writing:
            return WarehouseError(f"cannot write the warehouse directory {path.parent}: permission denied",
                                  path=str(path), hint="make the directory writable by this user, or point the "
                                                       "profile's warehouse at a writable path")
        return WarehouseError(f"cannot read the warehouse {path}: permission denied", path=str(path),
                              hint="make the file readable by this user")
    if _is_damage(exc):
        return WarehouseError(f"the warehouse {path} is damaged (truncated or corrupt): {_first_line(exc)}",
                              path=str(path), hint=f"set it aside and rebuild it from the services: "
                                                   f"mv '{path}' '{path}.damaged' && bridgekit sync --full")
    return WarehouseError(f"cannot open warehouse {path}: {_first_line(exc)}", path=str(path),
                          hint="check the file is a DuckDB database and readable")


def _configure(conn: duckdb.DuckDBPyConnection, memory_limit: str | None) -> None:
    # Timestamps without an offset (Graph's dateTimeTimeZone values after shaping) are UTC.
    conn.execute("SET TimeZone = 'UTC'")
    # DuckDB draws a progress bar on stdout for queries over ~2 s (a large merge): it would land in the
    # CLI's output, in notebooks and in runbook reports. Inside a Jupyter kernel without ipywidgets DuckDB
    # refuses to change the setting at all (and then draws no bar either), so a refusal is fine.
    with contextlib.suppress(duckdb.Error):
        conn.execute("SET enable_progress_bar = false")
    if memory_limit:
        conn.execute(f"SET memory_limit = '{memory_limit}'")


def confine(conn: duckdb.DuckDBPyConnection) -> None:
    """Turn off the connection's access to anything but its database: files (``read_csv``, ``COPY``),
    other databases (``ATTACH``) and extensions. One-way: DuckDB refuses to turn it back on while the
    database is open in the process."""
    conn.execute("SET enable_external_access = false")


# -- the lock ---------------------------------------------------------------------------------------------


class SyncLock:
    """An advisory, crash-safe lock on a warehouse: one sync at a time.

    ``flock`` is released by the kernel when the holder dies (even SIGKILL), so a stale lock file never
    blocks the next sync; the pid written in it only serves the error message.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`SyncError` naming the holder's pid."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _open_error(self.path, exc, writing=True) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SyncError(f"another sync (pid {holder}) is running on this warehouse ({self.path.name})",
                            hint="wait for it to finish, or stop it; readers (bridgekit sql) are not "
                                 "affected") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SyncLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- the warehouse (readers' side) -------------------------------------------------------------------------


class Warehouse:
    """A bridgekit DuckDB warehouse file and its staging and lock files.

    Example:
        >>> wh = Warehouse("/tmp/demo.duckdb")                     # doctest: +SKIP
        >>> wh.sql("select count(*) as n from dataverse.account")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, *, lock_timeout: float = LOCK_TIMEOUT_S,
                 memory_limit: str | None = "256MB", sync_memory_limit: str | None = "48MB") -> None:
        self.path = Path(path).expanduser()
        self.lock_timeout = lock_timeout
        self.memory_limit = memory_limit
        # The sync's own connection (staging and merges) gets a smaller DuckDB buffer so the sync's RSS
        # stays flat with table size; DuckDB spills merges to disk instead (measured in bench_sync:
        # 1M rows peaked at 475 MB with 256MB here, 343 MB with 96MB, and ran no slower; with 2,500-row
        # pages, 335 MB with 96MB and 285 MB with 48MB, in the same time).
        self.sync_memory_limit = sync_memory_limit

    @property
    def staging_path(self) -> Path:
        """The sync process's staging file."""
        return self.path.with_name(self.path.stem + ".staging" + (self.path.suffix or ".duckdb"))

    @property
    def lock_path(self) -> Path:
        """The one-sync-at-a-time lock file."""
        return self.path.with_name(self.path.name + ".sync.lock")

    def exists(self) -> bool:
        """True once a sync (or :meth:`bootstrap`) created the file."""
        return self.path.exists()

    def bootstrap(self) -> None:
        """Create the file and the bookkeeping tables (idempotent; takes the write lock briefly).

        Raises:
            WarehouseError: the file is damaged, or its directory cannot be written.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _open_error(self.path, exc, writing=True) from None
        with self._retry_open(read_only=False) as conn:
            try:
                conn.execute("BEGIN")
                _migrate(conn)
                conn.execute("COMMIT")
            except duckdb.Error as exc:
                raise _open_error(self.path, exc, writing=True) from None

    @contextlib.contextmanager
    def _retry_open(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                conn = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise _open_error(self.path, exc, writing=not read_only) from None
                if time.monotonic() >= deadline:
                    raise WarehouseError(f"warehouse {self.path} stayed locked for {self.lock_timeout:.0f}s",
                                         path=str(self.path),
                                         hint="a sync merge or another writer holds it; retry, or stop "
                                              "the other process") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        try:
            _configure(conn, self.memory_limit)
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def reader(self, *, confined: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-only connection; waits (with backoff) while a sync merge holds the file.

        Keep it brief: while it is open, a sync's merge waits for it. ``confined``: the connection reaches
        nothing but the warehouse (no files, no other databases, no extensions). DuckDB shares one database
        instance per file in a process and cannot turn external access back on, so confinement lasts for
        the process: meant for a process that only queries (``bridgekit sql``, an interactive session).

        Raises:
            WarehouseError: the warehouse does not exist yet, or stayed locked past ``lock_timeout``.
        """
        if not self.exists():
            raise WarehouseError(f"no warehouse at {self.path} yet", path=str(self.path),
                                 hint="run `bridgekit sync` first")
        with self._retry_open(read_only=True) as conn:
            if confined:
                confine(conn)
            yield conn

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None, *,
            confined: bool = False) -> Any:
        """Run a read-only query and return a pandas DataFrame.

        ``confined``: the query reaches the warehouse and nothing else (see :meth:`reader`), for SQL a user
        typed (``bridgekit sql``).

        Raises:
            QueryError: the query is wrong, writes, or (confined) reaches beyond the warehouse.
            WarehouseError: the warehouse does not exist or stayed locked.
        """
        with self.reader(confined=confined) as conn:
            try:
                return conn.execute(query, params).df()
            except duckdb.Error as exc:
                if _is_damage(exc):
                    raise _open_error(self.path, exc, writing=False) from None
                raise _query_error(exc, str(self.path)) from exc

    def arrow(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Like :meth:`sql` but returns an Arrow table."""
        with self.reader() as conn:
            try:
                # A relation, not a DB-API result: DuckDB hands its batches to Arrow without another copy.
                result: pa.Table = conn.sql(query, params=params).to_arrow_table()
            except duckdb.Error as exc:
                if _is_damage(exc):
                    raise _open_error(self.path, exc, writing=False) from None
                raise _query_error(exc, str(self.path)) from exc
            return result

    @contextlib.contextmanager
    def overlay(self) -> Iterator[Overlay]:
        """A private in-memory database that sees the mirrored tables (read-only, by their usual names) and can
        hold more tables next to them or in their place (:meth:`Overlay.put`), for one feature's queries over
        rows read live. Nothing is written to the warehouse; its file is attached only while the overlay is open.

        Raises:
            WarehouseError: the warehouse stayed locked past ``lock_timeout``, or is damaged.
        """
        conn = duckdb.connect(":memory:")
        try:
            _configure(conn, self.memory_limit)
            schemas = ("dataverse", "graph")
            for schema in schemas:
                conn.execute(f"CREATE SCHEMA {schema}")
            if self.exists():
                self._attach(conn)
                rows = conn.execute("SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = "
                                    "'wh' AND schema_name IN ('dataverse', 'graph')").fetchall()
                for schema, table in rows:
                    conn.execute(f'CREATE VIEW {schema}."{table}" AS SELECT * FROM wh.{schema}."{table}"')
            yield Overlay(conn, str(self.path))
        finally:
            conn.close()

    def _attach(self, conn: duckdb.DuckDBPyConnection) -> None:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                conn.execute(f"ATTACH '{_sql_string(str(self.path))}' AS wh (READ_ONLY)")
                return
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise _open_error(self.path, exc, writing=False) from None
                if time.monotonic() >= deadline:
                    raise WarehouseError(f"warehouse {self.path} stayed locked for {self.lock_timeout:.0f}s",
                                         path=str(self.path), hint="a sync merge holds it; retry") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def held_reader(self, hold_s: float = 1.0) -> HeldReader:
        """A read-only connection shared by a run of short queries, held at most ``hold_s`` (see :class:`HeldReader`)."""
        return HeldReader(self, hold_s)

    def tables(self) -> list[str]:
        """``schema.table`` of every mirrored table."""
        with self.reader() as conn:
            rows = conn.execute("SELECT schema_name, table_name FROM duckdb_tables() "
                                "WHERE schema_name IN ('dataverse', 'graph') ORDER BY 1, 2").fetchall()
        return [f"{s}.{t}" for s, t in rows]

    def state(self) -> dict[str, dict[str, Any]]:
        """``bridgekit.sync_state`` by table (empty before the first sync)."""
        if not self.exists():
            return {}
        with self.reader() as conn:
            has = conn.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = ? AND "
                               "table_name = 'sync_state'", [BOOKKEEPING_SCHEMA]).fetchone()
            if not has or not has[0]:
                return {}
            cur = conn.execute(f"SELECT * FROM {BOOKKEEPING_SCHEMA}.sync_state")
            names = [d[0] for d in cur.description]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

    def export(self, to: str | Path, *, format: str = "parquet", tables: Sequence[str] | None = None) -> list[Path]:
        """Write each mirrored table to ``to/<schema>/<table>`` as Parquet or a Delta table.

        Tables stream out as Arrow record batches, so memory stays flat.

        Returns:
            The paths written.
        """
        if format not in ("parquet", "delta"):
            raise WarehouseError(f"unknown export format {format!r}", hint="use parquet or delta")
        out = Path(to).expanduser()
        names = list(tables) if tables else self.tables()
        written: list[Path] = []
        for name in names:
            schema, _, table = name.partition(".")
            target = out / schema / (table + (".parquet" if format == "parquet" else ""))
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.reader() as conn:
                select = f"SELECT * FROM {quote(schema)}.{quote(table)}"
                if format == "parquet":
                    conn.execute(f"COPY ({select}) TO '{_sql_string(str(target))}' (FORMAT parquet)")
                else:
                    from deltalake import write_deltalake

                    # Streamed batch by batch (a DB-API result would first copy the whole table).
                    reader: Any = conn.sql(delta_select(conn, schema, table)).to_arrow_reader()
                    write_deltalake(str(target), reader, mode="overwrite", schema_mode="overwrite")
            written.append(target)
        return written

    def staging(self) -> Staging:
        """Open the staging file read-write (only the sync process holding :meth:`lock` may)."""
        return Staging(self)

    def lock(self) -> SyncLock:
        """The one-sync-per-warehouse lock."""
        return SyncLock(self.lock_path)


def _query_error(exc: Exception, path: str) -> QueryError:
    """DuckDB's message on one line (its own suggestion is the useful part), with a hint only where one fits."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    # Drop DuckDB's echo of the query and its caret line; keep "Did you mean" and "Candidate bindings".
    kept = [ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) != {"^"}]
    message = " ".join(kept)
    if isinstance(exc, duckdb.PermissionException) or "by configuration" in message or "external access" in message:
        return QueryError("refused: queries read the warehouse only (no files, other databases or extensions)",
                          path=path, hint="to write tables to files use `bridgekit export`")
    hint: str | None = None
    if isinstance(exc, duckdb.CatalogException) and "Did you mean" not in message:
        hint = "list the tables with: select schema_name, table_name from duckdb_tables()"
    elif isinstance(exc, duckdb.BinderException) and "Candidate bindings" not in message:
        hint = "list a table's columns with: describe <schema>.<table>"
    elif "read-only" in message:
        hint = "the warehouse is read-only here: `bridgekit sync` writes it; query it with SELECT"
    return QueryError(f"query failed: {message}", path=path, hint=hint)


class Overlay:
    """The connection of :meth:`Warehouse.overlay`: the mirrored tables as views, plus the tables :meth:`put` there."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, path: str) -> None:
        self._conn = conn
        self._path = path

    def put(self, table_id: str, types: Mapping[str, str], rows: Sequence[Mapping[str, Any]]) -> None:
        """Hold ``rows`` as ``table_id`` (``schema.table``, in place of a mirrored one), with the columns and
        DuckDB types of ``types`` (a row's other keys are ignored; a missing key is NULL)."""
        schema, table = table_id.split(".", 1)
        name = f"_bk_put_{schema}_{table}"
        # A view over the registered Arrow table, typed on read: small tables, read a few times each.
        self._conn.register(name, pa.table({c: pa.array([r.get(c) for r in rows]) for c in types}))
        cols = ", ".join(f'CAST("{c}" AS {t}) AS "{c}"' for c, t in types.items())
        self._conn.execute(f'CREATE OR REPLACE VIEW {schema}."{table}" AS SELECT {cols} FROM "{name}"')

    def records(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a query; its rows as dicts (NULL as None).

        Raises:
            QueryError: the query is wrong.
        """
        try:
            out: list[dict[str, Any]] = self._conn.sql(query, params=params).to_arrow_table().to_pylist()
        except duckdb.Error as exc:
            raise _query_error(exc, self._path) from exc
        return out


class HeldReader:
    """One read-only connection reused by a run of short queries, and released ``hold_s`` after it opened.

    Opening the warehouse file costs ~15 ms of CPU (its catalog is read each time), more than a small
    query; a loop of them (a migration looks up the current target rows of each chunk it plans) pays it
    once per ``hold_s`` instead of per query. While the connection is open a merge waits for it, so a
    timer closes it ``hold_s`` after it opened (after the query running then, if any), whether or not
    more queries come; the next query opens a new one. Use it as a context manager, or :meth:`close` it.
    """

    def __init__(self, warehouse: Warehouse, hold_s: float = 1.0) -> None:
        self.warehouse = warehouse
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._held: contextlib.AbstractContextManager[duckdb.DuckDBPyConnection] | None = None
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._timer: threading.Timer | None = None

    def arrow(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Like :meth:`Warehouse.arrow`, on the held connection."""
        with self._lock:
            if self._conn is None:
                held = self.warehouse.reader()
                self._conn, self._held = held.__enter__(), held
                self._timer = threading.Timer(self.hold_s, self.close)
                self._timer.daemon = True
                self._timer.start()
            try:
                result: pa.Table = self._conn.sql(query, params=params).to_arrow_table()
            except duckdb.Error as exc:
                raise WarehouseError(f"query failed: {exc}", path=str(self.warehouse.path)) from exc
            return result

    def close(self) -> None:
        """Release the connection now (a later query opens a new one)."""
        with self._lock:
            timer, held = self._timer, self._held
            self._timer, self._held, self._conn = None, None, None
            if held is not None:
                held.__exit__(None, None, None)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    def __enter__(self) -> HeldReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def delta_select(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> str:
    """SELECT for a Delta table (the export and the lake copy): Delta has no UUID or JSON type, so those become strings."""
    cols = conn.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? AND "
                        "table_name = ? ORDER BY column_index", [schema, table]).fetchall()
    parts = []
    for name, typ in cols:
        if typ in ("UUID", "JSON"):
            parts.append(f"CAST({quote(name)} AS VARCHAR) AS {quote(name)}")
        else:
            parts.append(quote(name))
    return f"SELECT {', '.join(parts)} FROM {quote(schema)}.{quote(table)}"


# -- types ---------------------------------------------------------------------------------------------------

_INT_RANK = {"TINYINT": 1, "SMALLINT": 2, "INTEGER": 3, "BIGINT": 4, "HUGEINT": 5}
_DECIMAL = re.compile(r"DECIMAL\((\d+),\s*(\d+)\)")


def widen(old: str, new: str) -> str | None:
    """The type to alter an existing ``old`` column to when metadata now says ``new`` (None: keep).

    Widening only: integers grow, decimals gain scale/precision, numbers may become DOUBLE or VARCHAR.
    A narrowing or unrelated change keeps the existing type (values still cast on insert).
    """
    o, n = old.upper().replace("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ"), new.upper()
    if o == n:
        return None
    if o in _INT_RANK and n in _INT_RANK:
        return n if _INT_RANK[n] > _INT_RANK[o] else None
    mo, mn = _DECIMAL.fullmatch(o), _DECIMAL.fullmatch(n)
    if mo and mn:
        p, s = max(int(mo[1]), int(mn[1])), max(int(mo[2]), int(mn[2]))
        return f"DECIMAL({p},{s})" if (p, s) != (int(mo[1]), int(mo[2])) else None
    if (o in _INT_RANK or mo) and (mn or n == "DOUBLE"):
        return n
    if o == "DATE" and n == "TIMESTAMPTZ":
        return n
    if n == "VARCHAR" and o not in ("JSON",) and not o.endswith("[]"):
        return n
    return None


def carrier(duck_type: str) -> pa.DataType:
    """The Arrow type a staged value travels in before DuckDB casts it to ``duck_type``."""
    t = duck_type.upper()
    if t in _INT_RANK:
        return pa.int64()
    if t in ("DOUBLE", "FLOAT", "REAL") or t.startswith("DECIMAL"):
        return pa.float64()
    if t == "BOOLEAN":
        return pa.bool_()
    if t.endswith("[]"):
        return pa.list_(carrier(t[:-2]))
    return pa.string()  # UUID, VARCHAR, JSON, DATE, TIMESTAMPTZ: DuckDB parses the text


# -- staging (the sync process's side) --------------------------------------------------------------------


def _stage_table(table_id: str) -> str:
    return quote("s_" + table_id.replace(".", "__"))


_STAGING_DDL = (
    "CREATE TABLE IF NOT EXISTS stage_tables (table_name VARCHAR NOT NULL, stage_id VARCHAR, run_id VARCHAR, "
    "mode VARCHAR, resynced BOOLEAN, spec VARCHAR, base_token VARCHAR, token VARCHAR, status VARCHAR, "
    "started_at TIMESTAMPTZ, pages BIGINT, fetched BIGINT, message VARCHAR)",
    "CREATE TABLE IF NOT EXISTS stage_cursors (table_name VARCHAR NOT NULL, part INTEGER NOT NULL, "
    "cursor VARCHAR, token VARCHAR)",
)


@dataclass
class StagedPage:
    """One page for :meth:`Staging.write_pages` (the arguments of :meth:`Staging.write_page`)."""

    part: int
    rows: pa.Table | None
    deletes: Sequence[str]
    versions: Sequence[str | None] | pa.Array | None
    next_cursor: str | None
    token: str | None = None
    reset: Mapping[str, str] | None = None


class Staging:
    """The staging file of one sync process: checkpointed pages and positions, and the merge.

    Only the process holding the warehouse's :class:`SyncLock` opens it.
    """

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        self._outer = False  # inside one_transaction
        self._labels: dict[str, list[tuple[str, str, int, str]]] = {}  # option labels this process merged
        self._labels_merging: dict[str, list[tuple[str, str, int, str]]] = {}  # ... in the merge under way
        self._outer_left = 0  # rows one_transaction may still hold before it settles
        path = warehouse.staging_path
        try:
            self.conn = self._open(path)
        except duckdb.Error as exc:
            if not _is_damage(exc):
                raise
            # A damaged staging file (a disk that filled up, a copy cut short) holds nothing the
            # warehouse needs: set it aside and start afresh; the tables staged in it are fetched again
            # (deltas from the stored links, so nothing merged before is lost).
            aside = path.with_name(f"{path.name}.damaged-{_now():%Y%m%dT%H%M%S}")
            path.rename(aside)
            wal = path.with_name(path.name + ".wal")
            if wal.exists():
                wal.rename(aside.with_name(aside.name + ".wal"))
            log.warning("the staging file %s was damaged (%s): set aside as %s; its tables are fetched again",
                        path, _first_line(exc), aside.name)
            self.conn = self._open(path)

    def _open(self, path: Path) -> duckdb.DuckDBPyConnection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = duckdb.connect(str(path))
        except OSError as exc:
            raise _open_error(self.warehouse.path, exc, writing=True) from None
        except duckdb.Error as exc:
            if _is_damage(exc):
                raise
            if any(s in str(exc) for s in _DENIED):
                raise _open_error(self.warehouse.path, exc, writing=True) from None
            raise SyncError(f"cannot open the staging file {path}: {_first_line(exc)}",
                            hint="another sync may be running on this warehouse") from None
        try:
            _configure(conn, self.warehouse.sync_memory_limit)
            # Staged rows are re-ordered by key at merge time anyway; not preserving order saves memory.
            conn.execute("SET preserve_insertion_order = false")
            for ddl in _STAGING_DDL:
                conn.execute(ddl)
            # Read the bookkeeping through once: damage past the header shows here, not mid-run.
            conn.execute("SELECT count(*), max(spec) FROM stage_tables").fetchall()
            conn.execute("SELECT count(*), max(cursor) FROM stage_cursors").fetchall()
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close the staging connection."""
        self.conn.close()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One transaction, or a part of the run's open one (see :meth:`one_transaction`)."""
        if self._outer:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def one_transaction(self, *, up_to_rows: int) -> Iterator[None]:
        """Stage what is done inside in one transaction, committed at the end, or at :meth:`settle`, or once
        more than ``up_to_rows`` rows are staged (from there on each page is checkpointed again).

        For a delta run: its pages need no checkpoint of their own, because the stored delta links move
        only when the merge commits, so a process killed before the merge fetches the same changes again:
        one commit instead of several per table (each a write of the staging file's log). A large delta
        (a weekend's changes) is worth resuming, hence the bound.
        """
        self.conn.execute("BEGIN")
        self._outer = True
        self._outer_left = up_to_rows
        try:
            yield
        except BaseException:
            if self._outer:
                with contextlib.suppress(duckdb.Error):
                    self.conn.execute("ROLLBACK")
            raise
        else:
            if self._outer:
                self.conn.execute("COMMIT")
        finally:
            self._outer = False

    def settle(self) -> None:
        """Commit what :meth:`one_transaction` holds so far and checkpoint each page from now on (a full load
        started inside a delta run: its pages are what a resume goes on from)."""
        if self._outer:
            self._outer = False
            self.conn.execute("COMMIT")

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------------------------
    def get(self, table_id: str) -> StageState | None:
        """The staged state of ``table_id`` or None when nothing is in progress."""
        row = self.conn.execute("SELECT stage_id, run_id, mode, resynced, spec, base_token, token, status, "
                                "started_at, pages, fetched, message FROM stage_tables WHERE table_name = ?",
                                [table_id]).fetchone()
        if row is None:
            return None
        parts = self.conn.execute("SELECT part, cursor, token FROM stage_cursors WHERE table_name = ? ORDER BY part",
                                  [table_id]).fetchall()
        return StageState(table_id, row[0], row[1], row[2], bool(row[3]), TableSpec.from_json(row[4]), row[5],
                          row[6], row[7], row[8], int(row[9]), int(row[10]), {int(p): c for p, c, _ in parts},
                          row[11], {int(p): t for p, _, t in parts})

    def begin(self, spec: TableSpec, *, run_id: str, mode: str, cursors: Sequence[str | None],
              base_token: str | None = None, token: str | None = None, resynced: bool = False,
              message: str | None = None) -> StageState:
        """Start staging ``spec`` afresh (dropping anything staged before) from the given positions."""
        tid = spec.id
        st = _stage_table(tid)
        cols = ", ".join(f"{quote(c.name)} {c.type}" for c in spec.columns)
        with self._txn():
            self._drop(tid)
            self.conn.execute(f"CREATE TABLE {st} ({cols}, _bk_version VARCHAR, _bk_op UTINYINT, "
                              "_bk_seq BIGINT)")
            self.conn.execute("INSERT INTO stage_tables VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'fetching', ?, 0, 0, ?)",
                              [tid, uuid.uuid4().hex, run_id, mode, resynced, spec.to_json(), base_token, token,
                               _now(), message])
            self._insert_cursors(tid, cursors, first=0)
        state = self.get(tid)
        assert state is not None
        return state

    def _insert_cursors(self, table_id: str, cursors: Sequence[str | None], *, first: int) -> None:
        """Positions of new partitions, in one statement (a mailbox resource starts hundreds)."""
        if not cursors:
            return
        rows = pa.table({"part": pa.array(range(first, first + len(cursors)), pa.int64()),
                         "cursor": pa.array(list(cursors), pa.string())})
        self.conn.register("_bk_cursors", rows)
        try:
            self.conn.execute("INSERT INTO stage_cursors SELECT ?, part, cursor, NULL FROM _bk_cursors", [table_id])
        finally:
            self.conn.unregister("_bk_cursors")

    def _drop(self, table_id: str) -> None:
        self.conn.execute(f"DROP TABLE IF EXISTS {_stage_table(table_id)}")
        self.conn.execute("DELETE FROM stage_tables WHERE table_name = ?", [table_id])
        self.conn.execute("DELETE FROM stage_cursors WHERE table_name = ?", [table_id])

    def discard(self, *table_ids: str) -> None:
        """Forget staged tables (a resync restarts one; a finished merge clears those it merged)."""
        if not table_ids:
            return  # no transaction to commit (a run that merged nothing, an idle poll)
        with self._txn():
            for table_id in table_ids:
                self._drop(table_id)

    def write_page(self, state: StageState, part: int, rows: pa.Table | None, deletes: Sequence[str],
                   versions: Sequence[str | None] | pa.Array | None, next_cursor: str | None, *,
                   token: str | None = None, reset: Mapping[str, str] | None = None) -> None:
        """Stage one page and the position reached, atomically (the checkpoint).

        Args:
            state: The table's stage state (updated in place).
            part: The partition the page belongs to.
            rows: Upserted rows in carrier types (columns named as the spec's), or None.
            deletes: Keys of deleted rows.
            versions: Each upserted row's version string (or None).
            next_cursor: The partition's next position, None when the partition is finished.
            token: The partition's delta link, when this page carried it.
            reset: Columns and values of a slice of the table (one mailbox) read afresh from this page on:
                at the merge, the slice's rows staged before this page and those merged before that no
                later page brings again are dropped.
        """
        self.write_pages(state, [StagedPage(part, rows, deletes, versions, next_cursor, token, reset)])

    def write_pages(self, state: StageState, pages: Sequence[StagedPage]) -> None:
        """Stage several pages (a round over many partitions) and the positions reached in one transaction:
        one checkpoint, not one per partition (a poll of hundreds of mailboxes paid a commit for each).

        The round costs a fixed number of statements whatever its number of pages: all pages' rows go in as
        one Arrow table, their deletes, slice resets and positions likewise.
        """
        if not pages:
            return
        saved = (state.pages, state.fetched, dict(state.cursors), dict(state.part_tokens))
        try:
            with self._txn():
                self._stage(state, pages)
        except BaseException:
            state.pages, state.fetched, state.cursors, state.part_tokens = saved
            raise
        if self._outer:
            self._outer_left -= state.fetched - saved[1]
            if self._outer_left < 0:
                self.settle()

    def _stage(self, state: StageState, pages: Sequence[StagedPage]) -> None:
        spec = state.spec
        st = _stage_table(spec.id)
        names = {c.name for c in spec.columns}
        resets: list[tuple[str, str, int]] = []
        tables: list[pa.Table] = []
        del_keys: list[str] = []
        del_seqs: list[int] = []
        positions: dict[int, tuple[str | None, str | None]] = {}
        fetched = 0
        for i, page in enumerate(pages):
            # Each page's sequence block keeps later pages after earlier ones (pages hold at most 5,000 rows).
            seq0 = (state.pages + i + 1) << 20
            if page.reset:
                unknown = set(page.reset) - names
                if unknown:
                    raise SyncError(f"{spec.id}: a reset names columns the table does not have: {sorted(unknown)}",
                                    table=spec.id)
                resets.append((f"{_RESET_KEY}{seq0 - 1}", json.dumps(dict(page.reset), sort_keys=True), seq0 - 1))
            rows = page.rows
            if rows is not None and rows.num_rows:
                # The sequence is built here, not with row_number(): a page may repeat a key (Graph
                # delta replays) and the later occurrence must win.
                versions = page.versions
                version = versions if isinstance(versions, pa.Array) else pa.array(
                    list(versions) if versions is not None else [None] * rows.num_rows, pa.string())
                batch = rows.append_column("_bk_version", version)
                tables.append(batch.append_column("_bk_seq", pa.array(range(seq0, seq0 + rows.num_rows),
                                                                       pa.int64())))
            if page.deletes:
                # Deletes of a page come after its upserts (Dataverse lists deletes last, §1.11).
                first = seq0 + (1 << 19)
                del_keys += page.deletes
                del_seqs += range(first, first + len(page.deletes))
            fetched += (rows.num_rows if rows is not None else 0) + len(page.deletes)
            cursor, token = page.next_cursor, page.token or positions.get(page.part, (None, None))[1]
            positions[page.part] = (cursor, token)
        if resets:
            marks = pa.table({"k": pa.array([r[0] for r in resets], pa.string()),
                              "v": pa.array([r[1] for r in resets], pa.string()),
                              "s": pa.array([r[2] for r in resets], pa.int64())})
            self.conn.register("_bk_resets", marks)
            self.conn.execute(f"INSERT INTO {st} ({quote(spec.key)}, _bk_version, _bk_op, _bk_seq) "
                              f"SELECT k, v, {_OP_RESET}, s FROM _bk_resets")
            self.conn.unregister("_bk_resets")
        if tables:
            # Pages of one table share its columns; a column all-null on one page promotes to the others' type.
            batch = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
            self.conn.register("_bk_page", batch)
            casts = ", ".join(f"CAST(p.{quote(c.name)} AS {c.type})" for c in spec.columns)
            self.conn.execute(f"INSERT INTO {st} SELECT {casts}, p._bk_version, {_OP_UPSERT}, p._bk_seq "
                              "FROM _bk_page p")
            self.conn.unregister("_bk_page")
        if del_keys:
            key = next(c for c in spec.columns if c.name == spec.key)
            dels = pa.table({"k": pa.array(del_keys, pa.string()), "s": pa.array(del_seqs, pa.int64())})
            self.conn.register("_bk_dels", dels)
            self.conn.execute(f"INSERT INTO {st} ({quote(spec.key)}, _bk_op, _bk_seq) SELECT "
                              f"CAST(k AS {key.type}), {_OP_DELETE}, s FROM _bk_dels")
            self.conn.unregister("_bk_dels")
        parts = sorted(positions)
        moved = pa.table({"part": pa.array(parts, pa.int64()),
                          "cursor": pa.array([positions[p][0] for p in parts], pa.string()),
                          "token": pa.array([positions[p][1] for p in parts], pa.string())})
        self.conn.register("_bk_moved", moved)
        self.conn.execute("UPDATE stage_cursors SET cursor = m.cursor, token = coalesce(m.token, stage_cursors.token) "
                          "FROM _bk_moved m WHERE stage_cursors.table_name = ? AND stage_cursors.part = m.part",
                          [spec.id])
        self.conn.unregister("_bk_moved")
        self.conn.execute("UPDATE stage_tables SET pages = pages + ?, fetched = fetched + ? WHERE table_name = ?",
                          [len(pages), fetched, spec.id])
        state.pages += len(pages)
        state.fetched += fetched
        for part, (cursor, token) in positions.items():
            state.cursors[part] = cursor
            if token:
                state.part_tokens[part] = token

    def add_cursors(self, state: StageState, cursors: Sequence[str], *, first: int) -> None:
        """Add partitions numbered from ``first`` to a staged table (a catch-up delta after its staged rounds).

        A fetched table goes back to fetching, so a process killed during the catch-up resumes it.
        """
        with self._txn():
            self._insert_cursors(state.table, cursors, first=first)
            self.conn.execute("UPDATE stage_tables SET status = 'fetching' WHERE table_name = ?", [state.table])
        for i, cur in enumerate(cursors):
            state.cursors[first + i] = cur
        state.status = "fetching"

    def digest(self, state: StageState) -> str:
        """A digest of the staged rows (order-independent: each row's key, columns and version hashed),
        to tell whether a full reload brought anything the last one did not."""
        spec = state.spec
        cols = ", ".join([quote(c.name) for c in spec.columns] + ["_bk_version"])
        row = self.conn.execute(f"SELECT count(*), coalesce(bit_xor(hash({cols})), 0) FROM {_stage_table(spec.id)} "
                                f"WHERE _bk_op = {_OP_UPSERT}").fetchone()
        assert row is not None
        return f"{row[0]}:{row[1]}"

    def mark_fetched(self, state: StageState, token: str | None) -> None:
        """Record that every page is staged (and the delta link to keep); the table awaits its merge."""
        self.conn.execute("UPDATE stage_tables SET status = 'fetched', token = coalesce(?, token) "
                          "WHERE table_name = ?", [token, state.table])
        state.status = "fetched"
        if token:
            state.token = token

    def pending(self) -> list[StageState]:
        """Every staged table (fetching or fetched)."""
        names = [r[0] for r in self.conn.execute("SELECT table_name FROM stage_tables ORDER BY 1").fetchall()]
        return [s for s in (self.get(n) for n in names) if s is not None]

    # -- merge ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        wh = self.warehouse
        wh.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wh.lock_timeout
        delay = 0.02
        while True:
            try:
                self.conn.execute(f"ATTACH '{_sql_string(str(wh.path))}' AS {_STAGE_ALIAS}")
                break
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    raise _open_error(wh.path, exc, writing=True) from None
                if time.monotonic() >= deadline:
                    raise WarehouseError(f"warehouse {wh.path} stayed busy with readers for "
                                         f"{wh.lock_timeout:.0f}s; the sync's data is staged and will be "
                                         "merged by the next run", path=str(wh.path),
                                         hint="close long-running notebook connections to the warehouse "
                                              "and run the sync again") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        try:
            yield
        finally:
            self.conn.execute(f"DETACH {_STAGE_ALIAS}")

    def merge(self, states: Sequence[StageState], records: Sequence[RunRecord], *, run_id: str,
              source: str = "") -> dict[str, MergeCounts]:
        """Apply fetched tables to the warehouse and record the run, in one transaction.

        Args:
            states: Fetched tables to apply (``status == 'fetched'``).
            records: ``sync_runs`` rows for this run; those of merged tables get their counts filled in.
            run_id: The run applying them.
            source: Free text stored in ``sync_state.source`` (e.g. the profile name).

        Returns:
            Counts per merged table id.
        """
        counts: dict[str, MergeCounts] = {}
        by_table = {r.table: r for r in records}
        self.settle()
        self._labels_merging = {}
        with self._attached():
            self.conn.execute("BEGIN")
            try:
                _migrate(self.conn, _STAGE_ALIAS)
                done = dict(self.conn.execute(
                    f"SELECT table_name, stage_id FROM {_STAGE_ALIAS}.{BOOKKEEPING_SCHEMA}.sync_state").fetchall())
                now = _now()
                for state in states:
                    if done.get(state.table) == state.stage_id:
                        continue  # merged by an earlier process that died before clearing its staging
                    c = self._apply(state, run_id=run_id, now=now)
                    counts[state.table] = c
                    rec = by_table.get(state.table)
                    if rec is not None:
                        rec.created, rec.updated, rec.deleted = c.created, c.updated, c.deleted
                    self._record_state(state, c, run_id=run_id, now=now, source=source,
                                       started=rec.started_at if rec else state.started_at)
                for rec in records:
                    self._record_run(rec)
                self.conn.execute("COMMIT")
                self._labels.update(self._labels_merging)
            except (KeyboardInterrupt, duckdb.InterruptException) as exc:
                # Ctrl-C lands in a statement (DuckDB interrupts it) or between two: either way the whole
                # run is rolled back, and its staged pages stay for the next run.
                with contextlib.suppress(duckdb.Error):
                    self.conn.execute("ROLLBACK")
                raise SyncInterrupted("interrupted: nothing of this run was merged") from exc
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    self.conn.execute("ROLLBACK")
                raise
        self.discard(*(state.table for state in states))
        return counts

    def record(self, records: Sequence[RunRecord]) -> None:
        """Record runs that merged nothing (errors, skips)."""
        if records:
            self.merge([], records, run_id=records[0].run_id)

    def _columns(self, spec: TableSpec) -> dict[str, str] | None:
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = ? AND schema_name = ? "
            "AND table_name = ? ORDER BY column_index", [_STAGE_ALIAS, spec.schema, spec.name]).fetchall()
        return {n: t for n, t in rows} if rows else None

    def _resets(self, st: str) -> list[tuple[int, dict[str, str]]]:
        """The slices read afresh in a staged table: (sequence of the reset, columns and values)."""
        rows = self.conn.execute(f"SELECT _bk_seq, _bk_version FROM {st} WHERE _bk_op = {_OP_RESET} "
                                 "ORDER BY _bk_seq").fetchall()
        return [(int(seq), json.loads(text)) for seq, text in rows]

    def _apply(self, state: StageState, *, run_id: str, now: datetime) -> MergeCounts:
        spec = state.spec
        target = f"{_STAGE_ALIAS}.{quote(spec.schema)}.{quote(spec.name)}"
        k = quote(spec.key)
        st = _stage_table(spec.id)
        resets = self._resets(st)
        if resets:
            # Rows of a slice staged before its reset are void: the slice was read again after them.
            void = " OR ".join(f"(_bk_op = {_OP_UPSERT} AND _bk_seq < {seq} AND " + " AND ".join(
                f"{quote(col)} = '{_sql_string(val)}'" for col, val in cols.items()) + ")" for seq, cols in resets)
            st = f"(SELECT * FROM {st} WHERE NOT ({void}))"
        last = f"QUALIFY row_number() OVER (PARTITION BY {k} ORDER BY _bk_seq DESC) = 1"
        if state.mode == "full":
            # A full load stages each key once, except keys the catch-up delta (or a Graph replay) staged
            # again: only those go through the window, the rest are taken as they are (the window over a
            # whole million-row table was ~40% of the merge).
            dup = f"(SELECT {k} FROM {st} GROUP BY {k} HAVING count(*) > 1)"
            latest = (f"(SELECT * FROM {st} ANTI JOIN {dup} USING ({k}) UNION ALL "
                      f"SELECT * FROM (SELECT * FROM {st} SEMI JOIN {dup} USING ({k})) {last})")
        else:
            latest = f"(SELECT * FROM {st} {last})"
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_STAGE_ALIAS}.{quote(spec.schema)}")
        old = self._columns(spec)
        meta = "_bk_version, CAST(? AS TIMESTAMPTZ) AS _bk_synced_at, CAST(? AS VARCHAR) AS _bk_run_id"
        data_names = [c.name for c in spec.columns]
        c = MergeCounts()
        if state.mode == "full":
            final = {col.name: col.type for col in spec.columns}
            if old is not None:
                for col in spec.columns:
                    if col.name in old:
                        final[col.name] = widen(old[col.name], col.type) or old[col.name]
            select = [f"CAST({quote(n)} AS {t}) AS {quote(n)}" for n, t in final.items()]
            kept = [n for n in (old or {}) if n not in final and not n.startswith("_bk_")]
            select += [f"CAST(NULL AS {old[n]}) AS {quote(n)}" for n in kept] if old else []
            if old is not None:
                common = ", ".join(quote(n) for n in data_names if n in old)
                c.created = _scalar(self.conn, f"SELECT count(*) FROM {latest} n ANTI JOIN {target} o USING ({k}) "
                                    f"WHERE n._bk_op = {_OP_UPSERT}")
                c.deleted = _scalar(self.conn, f"SELECT count(*) FROM {target} o ANTI JOIN (SELECT {k} FROM "
                                    f"{latest} WHERE _bk_op = {_OP_UPSERT}) n USING ({k})")
                changed = _scalar(self.conn, f"SELECT count(*) FROM (SELECT {common} FROM {latest} WHERE "
                                  f"_bk_op = {_OP_UPSERT} EXCEPT SELECT {common} FROM {target})")
                c.updated = max(changed - c.created, 0)
            self.conn.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {', '.join(select)}, {meta} "
                              f"FROM {latest} WHERE _bk_op = {_OP_UPSERT}", [now, run_id])
            if old is None:
                c.created = _scalar(self.conn, f"SELECT count(*) FROM {target}")
        else:
            if old is None:
                cols = ", ".join(f"{quote(col.name)} {col.type}" for col in (*spec.columns, *META_COLUMNS))
                self.conn.execute(f"CREATE TABLE {target} ({cols})")
                old = {col.name: col.type for col in (*spec.columns, *META_COLUMNS)}
            self._evolve(target, old, spec)
            for _seq, piece in resets:
                # What was merged of a slice read afresh goes, unless this run brings it again.
                cond = " AND ".join(f"{quote(col)} = '{_sql_string(val)}'" for col, val in piece.items())
                c.deleted += _scalar(self.conn, f"SELECT count(*) FROM {target} WHERE {cond} AND {k} NOT IN "
                                     f"(SELECT {k} FROM {st} WHERE _bk_op = {_OP_UPSERT})")
                self.conn.execute(f"DELETE FROM {target} WHERE {cond} AND {k} NOT IN "
                                  f"(SELECT {k} FROM {st} WHERE _bk_op = {_OP_UPSERT})")
            row = self.conn.execute(
                f"SELECT count(*) FILTER (WHERE n._bk_op = {_OP_UPSERT} AND o.{k} IS NULL), "
                f"count(*) FILTER (WHERE n._bk_op = {_OP_UPSERT} AND o.{k} IS NOT NULL), "
                f"count(*) FILTER (WHERE n._bk_op = {_OP_DELETE} AND o.{k} IS NOT NULL) "
                f"FROM {latest} n LEFT JOIN (SELECT DISTINCT {k} FROM {target} WHERE {k} IN (SELECT {k} FROM {st})) o "
                f"USING ({k})").fetchone()
            assert row is not None
            c.created, c.updated = int(row[0] or 0), int(row[1] or 0)
            c.deleted += int(row[2] or 0)  # after the rows of slices read afresh that went above
            self.conn.execute(f"DELETE FROM {target} WHERE {k} IN (SELECT {k} FROM {st})")
            names = ", ".join(quote(n) for n in data_names)
            self.conn.execute(f"INSERT INTO {target} ({names}, _bk_version, _bk_synced_at, _bk_run_id) "
                              f"SELECT {names}, {meta} FROM {latest} WHERE _bk_op = {_OP_UPSERT}", [now, run_id])
        c.rows = _scalar(self.conn, f"SELECT count(*) FROM {target}")
        # Option-set labels, replaced wholesale with what the metadata says now (only when they changed:
        # a delta run of a watcher should not rewrite them every poll).
        labels_table = f"{_STAGE_ALIAS}.{BOOKKEEPING_SCHEMA}.option_labels"
        labels = sorted((spec.id, col, int(v), lab) for col, m in spec.labels.items() for v, lab in m.items())
        if self._labels.get(spec.id) == labels:
            return c  # this process wrote (or found) them, and only a sync process writes them
        stored = sorted(self.conn.execute(f"SELECT table_name, column_name, value, label FROM {labels_table} "
                                          "WHERE table_name = ?", [spec.id]).fetchall())
        self._labels_merging[spec.id] = labels
        if stored != labels:
            self.conn.execute(f"DELETE FROM {labels_table} WHERE table_name = ?", [spec.id])
            if labels:
                rows = pa.table({"table_name": [r[0] for r in labels], "column_name": [r[1] for r in labels],
                                 "value": pa.array([r[2] for r in labels], pa.int32()),
                                 "label": [r[3] for r in labels]})
                self.conn.register("__bk_labels", rows)
                try:
                    self.conn.execute(f"INSERT INTO {labels_table} SELECT * FROM __bk_labels")
                finally:
                    self.conn.unregister("__bk_labels")
        return c

    def _evolve(self, target: str, old: dict[str, str], spec: TableSpec) -> None:
        """Add new columns and widen widened ones (nothing is ever dropped)."""
        for col in (*spec.columns, *META_COLUMNS):
            if col.name not in old:
                log.info("%s: new column %s %s", spec.id, col.name, col.type)
                self.conn.execute(f"ALTER TABLE {target} ADD COLUMN {quote(col.name)} {col.type}")
            else:
                wider = widen(old[col.name], col.type)
                if wider:
                    log.info("%s: widening %s from %s to %s", spec.id, col.name, old[col.name], wider)
                    self.conn.execute(f"ALTER TABLE {target} ALTER COLUMN {quote(col.name)} TYPE {wider}")

    def _record_state(self, state: StageState, c: MergeCounts, *, run_id: str, now: datetime, source: str,
                      started: datetime) -> None:
        b = f"{_STAGE_ALIAS}.{BOOKKEEPING_SCHEMA}"
        phase = "delta" if state.token else "full"
        self.conn.execute(f"DELETE FROM {b}.sync_state WHERE table_name = ?", [state.table])
        self.conn.execute(f"INSERT INTO {b}.sync_state (table_name, source, delta_link, phase, stage_id, last_run_id, "
                          "last_status, last_started_at, last_ended_at, row_count, spec, updated_at, position_at) "
                          "VALUES (?, ?, ?, ?, ?, ?, 'ok', ?, ?, ?, ?, ?, ?)",
                          [state.table, source, state.token, phase, state.stage_id, run_id, started, now,
                           c.rows, state.spec.to_json(), now, state.position_at or state.started_at])

    def _record_run(self, rec: RunRecord) -> None:
        b = f"{_STAGE_ALIAS}.{BOOKKEEPING_SCHEMA}"
        duration = (rec.ended_at - rec.started_at).total_seconds()
        self.conn.execute(f"INSERT INTO {b}.sync_runs (run_id, table_name, mode, started_at, ended_at, duration_s, "
                          "created, updated, deleted, fetched, pages, resynced, status, error, message, caught_up) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [rec.run_id, rec.table, rec.mode, rec.started_at, rec.ended_at, duration, rec.created,
                           rec.updated, rec.deleted, rec.fetched, rec.pages, rec.resynced, rec.status, rec.error,
                           rec.message, rec.caught_up])
        if rec.status in ("error", "skipped"):
            self.conn.execute(f"UPDATE {b}.sync_state SET last_run_id = ?, last_status = ?, last_started_at = ?, "
                              "last_ended_at = ? WHERE table_name = ?",
                              [rec.run_id, rec.status, rec.started_at, rec.ended_at, rec.table])


def _scalar(conn: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> int:
    row = conn.execute(sql, list(params)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0
