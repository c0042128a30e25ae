"""The emulator's persistent record store: one SQLite file, JSON records, one global row version.

Every collection (a Dataverse table such as ``account`` or a Graph resource such as ``graph.users``) is
a SQLite table ``c_<name>(id TEXT PRIMARY KEY, version INTEGER, data TEXT)`` where ``data`` is the
record as it is served (JSON text, keys in service order). Deletes leave a tombstone in
``tombstones(coll, id, version, deleted_at, data)`` so change tracking and Graph delta can report them;
``data`` is the record's last state, so a per-mailbox feed can tell whose item was deleted.

Row versions are one global, strictly increasing counter (Dataverse's org-wide ``versionnumber``).
All writes go through one lock and commit before it is released, so any reader that sees version V
also sees every write with a version below V. That is what makes ``changes_since`` exact: a delta
token is just the highest version the reader had seen.

Reads use one connection per thread (WAL mode), so pages can be served while writes go on.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Change", "Row", "Store"]

#: In an index's fields: the row version column itself (see :meth:`Store.ensure_index` ``feed``).
_VERSION = "\x00version"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (
    coll TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, deleted_at REAL NOT NULL,
    data TEXT, PRIMARY KEY (coll, id)
);
CREATE INDEX IF NOT EXISTS tombstones_v ON tombstones (coll, version);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """A stored record: its id, its row version and its JSON text."""

    id: str
    version: int
    data: str

    def load(self) -> dict[str, Any]:
        """The record as a dict."""
        result: dict[str, Any] = orjson.loads(self.data)
        return result


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a change feed: an upsert (``row`` set) or a delete (``row`` None)."""

    id: str
    version: int
    row: Row | None

    @property
    def deleted(self) -> bool:
        return self.row is None


class _WriteTransaction:
    """:meth:`Store.write`: the outermost entry takes the lock and begins; nested entries join it."""

    __slots__ = ("_outer", "_store")

    def __init__(self, store: Store) -> None:
        self._store = store
        self._outer = False

    def __enter__(self) -> sqlite3.Connection:
        store = self._store
        store._write_lock.acquire()
        try:
            conn = store._conn()
            if store._write_depth:
                store._write_depth += 1
                return conn
            store._write_depth = 1
            self._outer = True
            conn.execute("BEGIN IMMEDIATE")
            store._version, store._writer = None, threading.get_ident()
        except BaseException:
            if self._outer:
                store._write_depth, self._outer = 0, False
            store._write_lock.release()
            raise
        return conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        try:
            if not self._outer:
                store._write_depth -= 1
                return
            try:
                conn = store._conn()
                if exc_type is not None:
                    conn.execute("ROLLBACK")
                else:
                    if store._version is not None:  # the counter, kept in memory during the transaction
                        conn.execute("UPDATE meta SET v=? WHERE k='version'", (str(store._version),))
                    conn.execute("COMMIT")
            finally:
                store._write_depth, store._version, store._writer = 0, None, None
        finally:
            store._write_lock.release()


def _table(coll: str) -> str:
    # Collection names are ours (schema-defined), but quote defensively: "graph.users" has a dot.
    return '"c_' + coll.replace('"', "") + '"'


#: How much of the store file reads map (SQLite's mmap_size; the rest is read as usual).
_MMAP_BYTES = 16 << 30


class Store:
    """A SQLite-backed, versioned record store shared by the Dataverse and Graph emulators.

    Example:
        >>> s = Store(":memory:")
        >>> s.ensure_collection("account")
        >>> v = s.put("account", "a1", {"accountid": "a1", "name": "Contoso"})
        >>> s.get("account", "a1").load()["name"]
        'Contoso'
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._memory = self.path == ":memory:"
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._write_depth = 0  # nesting of write() on the thread holding _write_lock
        # Inside a write transaction: the version counter (stored at commit) and the writing thread.
        self._version: int | None = None
        self._writer: int | None = None
        self._shared: sqlite3.Connection | None = None
        if self._memory:
            self._shared = self._open()
        with self._write_lock:
            self._conn().executescript(_SCHEMA)
            self._conn().execute("INSERT OR IGNORE INTO meta VALUES ('version', '0')")
            # Stores created before tombstones kept the deleted record's last state.
            cols = {r[1] for r in self._conn().execute("PRAGMA table_info(tombstones)")}
            if "data" not in cols:
                self._conn().execute("ALTER TABLE tombstones ADD COLUMN data TEXT")
            self._conn().commit()
        self._collections: set[str] = set(self._existing_collections())
        # Indexes asked for with ensure_index, re-created whenever their collection is (after drop_all).
        self._indexes: dict[str, dict[str, tuple[str, ...]]] = {}
        # (collection, index name) of indexes built with NOCASE collation (see ensure_index).
        self._nocase: set[tuple[str, str]] = set()
        self._defer_indexes = False

    # -- connections -------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        # Records are ~1 KB of JSON. With SQLite's default 4 KB pages a WITHOUT ROWID row that size
        # spills into an overflow page, tripling the file and the I/O; 16 KB pages keep rows up to
        # ~4 KB inline. Only takes effect when the database file is new (before WAL is switched on).
        conn.execute("PRAGMA page_size=16384")
        if not self._memory:
            conn.execute("PRAGMA journal_mode=WAL")
            # No fsync, not even at WAL checkpoints (about a sixth of a $batch write's cost). The store holds
            # the emulator's synthetic tenant: a crash of the emulator process still loses nothing committed
            # (SQLite has handed it to the OS); an OS crash or power cut could lose or damage recent writes,
            # and `bridgekit emulator reset` regenerates the tenant.
            conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA cache_size=-65536")
        if not self._memory:
            # Reads map the file instead of copying each page out of the OS cache into every connection's
            # own cache (each server thread has a connection): a poll of 600 mailboxes spent a fifth of its
            # CPU on those copies. The mapping is shared, and address space, not memory.
            conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._shared is not None:
            return self._shared
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads (one SQLite read transaction)."""
        if self._memory:
            with self._write_lock:
                yield self._conn()
            return
        conn = self._conn()
        if conn.in_transaction:
            # Inside this thread's write transaction: read through it (sees its own writes).
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def write(self) -> _WriteTransaction:
        """An exclusive write transaction; versions allocated inside it are committed together.

        Nested calls on the thread that holds the transaction join it instead of starting another, so
        several store calls (a Dataverse ``$batch`` change set, an activity and its ``activitypointer``
        row) commit or roll back as one. (A class, not a generator: a batched write enters it several
        times per record.)
        """
        return _WriteTransaction(self)

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[sqlite3.Connection]:
        """A nested atomic unit: inside an outer :meth:`write`, an exception undoes only this block's writes.

        Lets one transaction hold several independent units (a ``$batch``'s change sets) and commit
        once, instead of paying a commit per unit; outside a write it is a write of its own.
        """
        with self.write() as conn:
            name = f"bk_sp{self._write_depth}"
            conn.execute(f"SAVEPOINT {name}")
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            conn.execute(f"RELEASE {name}")

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = self._shared or getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._shared = None

    # -- collections -------------------------------------------------------------------------------
    def _existing_collections(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'c\\_%' ESCAPE '\\'"
        ).fetchall()
        return [r[0][2:] for r in rows]

    def ensure_collection(self, coll: str) -> None:
        """Create the collection's table if it does not exist (idempotent)."""
        if coll in self._collections:
            return
        with self.write() as conn:
            t = _table(coll)
            conn.execute(f"CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                         "data TEXT NOT NULL) WITHOUT ROWID")
            conn.execute(f'CREATE INDEX IF NOT EXISTS "{t[1:-1]}_v" ON {t} (version)')
            for name, fields in ({} if self._defer_indexes else self._indexes.get(coll, {})).items():
                self._create_index(conn, coll, name, fields)
        self._collections.add(coll)

    def ensure_index(self, coll: str, name: str, fields: Sequence[str], *, nocase: bool = False,
                     feed: bool = False) -> None:
        """Create an expression index over top-level JSON fields of ``coll`` (idempotent).

        SQLite uses an expression index only when a query spells the expression exactly as indexed, so
        queries must build their conditions with :meth:`field` (e.g. per-mailbox reads on ``@emu.user``).
        The index is remembered and re-created when the collection is (after :meth:`drop_all`).
        With ``nocase`` the index uses NOCASE collation, which serves ``field(x) = ? COLLATE NOCASE``.
        With ``feed`` the index also serves :meth:`changes_since` narrowed by these fields (one mailbox's
        change feed): ``version`` follows the fields, and the collection's tombstones get the same index,
        so a mailbox's feed reads that mailbox's changes, not every delete of the tenant since the token.
        """
        fields = tuple(fields) + ((_VERSION,) if feed else ())
        self._indexes.setdefault(coll, {})[name] = fields
        if nocase:
            self._nocase.add((coll, name))
        self.ensure_collection(coll)
        with self.write() as conn:
            self._create_index(conn, coll, name, fields)
            if feed:
                safe = "".join(ch for ch in f"{coll}_{name}" if ch.isalnum() or ch == "_")
                exprs = ", ".join(self.field(f) for f in fields[:-1])
                conn.execute(f'CREATE INDEX IF NOT EXISTS "tombstones_{safe}" ON tombstones (coll, {exprs}, version)')

    @contextlib.contextmanager
    def deferred_indexes(self) -> Iterator[None]:
        """Hold back the remembered expression indexes of collections created inside the block.

        For bulk loads after :meth:`drop_all`: building an index once over loaded rows is much cheaper
        than maintaining it row by row. On exit every remembered index is (re-)created.
        """
        self._defer_indexes = True
        try:
            yield
        finally:
            self._defer_indexes = False
            with self.write() as conn:
                for coll, indexes in self._indexes.items():
                    if coll in self._collections:
                        for name, fields in indexes.items():
                            self._create_index(conn, coll, name, fields)

    def _create_index(self, conn: sqlite3.Connection, coll: str, name: str, fields: tuple[str, ...]) -> None:
        t = _table(coll)
        safe = "".join(ch for ch in name if ch.isalnum() or ch == "_")
        collate = " COLLATE NOCASE" if (coll, name) in self._nocase else ""
        exprs = ", ".join("version" if f is _VERSION else self.field(f) + collate for f in fields)
        suffix = "_feed" if fields and fields[-1] is _VERSION else ""  # not the name an older store used
        conn.execute(f'CREATE INDEX IF NOT EXISTS "{t[1:-1]}_{safe}{suffix}" ON {t} ({exprs})')

    def collections(self) -> list[str]:
        """Names of all collections."""
        return sorted(self._collections)

    def drop_all(self) -> None:
        """Remove every collection, tombstone and meta value except the version counter."""
        with self.write() as conn:
            for coll in list(self._collections):
                conn.execute(f"DROP TABLE IF EXISTS {_table(coll)}")
            conn.execute("DELETE FROM tombstones")
            conn.execute("DELETE FROM meta WHERE k != 'version'")
        self._collections.clear()

    # -- versions and meta -------------------------------------------------------------------------
    def current_version(self, conn: sqlite3.Connection | None = None) -> int:
        """The highest committed row version (inside this thread's write transaction: the highest allocated)."""
        if self._version is not None and self._writer == threading.get_ident():
            return self._version
        row = (conn or self._conn()).execute("SELECT v FROM meta WHERE k='version'").fetchone()
        return int(row[0])

    def _next_versions(self, conn: sqlite3.Connection, n: int = 1) -> int:
        """Reserve ``n`` versions inside a write transaction; returns the first.

        The counter is read once per transaction (the write lock is held, so nobody else moves it), kept
        in memory and stored when the transaction commits. A savepoint rolled back leaves a gap in the
        versions, as Dataverse's have.
        """
        cur = self.current_version(conn)
        self._version = cur + n
        return cur + 1

    def get_meta(self, key: str, default: Any = None) -> Any:
        """A JSON value stored under ``key`` (apps, planted defects, settings ...)."""
        row = self._conn().execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key``."""
        if key == "version":
            raise ValueError("the version counter is managed by the store")
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # -- single-record operations ------------------------------------------------------------------
    def get(self, coll: str, rid: str) -> Row | None:
        """The record with id ``rid``, or None."""
        self.ensure_collection(coll)
        r = self._conn().execute(f"SELECT id, version, data FROM {_table(coll)} WHERE id=?", (rid,)).fetchone()
        return Row(*r) if r else None

    def put(self, coll: str, rid: str, record: dict[str, Any], *, version_field: str | None = None,
            fresh: bool = False) -> int:
        """Create or replace a record; returns its new version.

        Args:
            version_field: if given, the new version is also written into the record under this key
                (Dataverse's ``versionnumber``) before it is stored.
            fresh: ``rid`` was just generated, so no record or tombstone can have it (nothing to clear).
        """
        return self.put_many(coll, [(rid, record)], version_field=version_field, fresh=fresh)[0]

    def put_many(self, coll: str, items: Sequence[tuple[str, dict[str, Any]]], *,
                 version_field: str | None = None, fresh: bool = False) -> list[int]:
        """Create or replace several records in one transaction; returns their versions in order
        (``fresh``: every id was just generated, see :meth:`put`)."""
        self.ensure_collection(coll)
        t = _table(coll)
        with self.write() as conn:
            first = self._next_versions(conn, len(items))
            rows = []
            for i, (rid, rec) in enumerate(items):
                if version_field:
                    rec[version_field] = first + i
                rows.append((rid, first + i, orjson.dumps(rec).decode()))
            conn.executemany(f"INSERT OR REPLACE INTO {t} (id, version, data) VALUES (?, ?, ?)", rows)
            if not fresh:
                conn.executemany("DELETE FROM tombstones WHERE coll=? AND id=?", [(coll, r[0]) for r in rows])
        return [first + i for i in range(len(items))]

    def delete(self, coll: str, rid: str) -> int | None:
        """Delete a record, leaving a tombstone; returns the tombstone's version, or None if absent."""
        result = self.delete_many(coll, [rid])
        return result[0] if result else None

    def delete_many(self, coll: str, ids: Iterable[str]) -> list[int]:
        """Delete several records in one transaction; returns versions of those that existed."""
        self.ensure_collection(coll)
        t = _table(coll)
        out: list[int] = []
        now = time.time()
        with self.write() as conn:
            for rid in ids:
                gone = conn.execute(f"DELETE FROM {t} WHERE id=? RETURNING data", (rid,)).fetchall()
                if gone:
                    v = self._next_versions(conn)
                    conn.execute("INSERT OR REPLACE INTO tombstones (coll, id, version, deleted_at, data) "
                                 "VALUES (?, ?, ?, ?, ?)", (coll, rid, v, now, gone[0][0]))
                    out.append(v)
        return out

    def bulk_load(self, coll: str, records: Iterable[tuple[str, dict[str, Any]]], *,
                  version_field: str | None = None, chunk: int = 20000) -> int:
        """Load many records fast (synthetic data, new ids: no tombstone is cleared); returns how many were written."""
        self.ensure_collection(coll)
        n = 0
        buf: list[tuple[str, dict[str, Any]]] = []
        for item in records:
            buf.append(item)
            if len(buf) >= chunk:
                self.put_many(coll, buf, version_field=version_field, fresh=True)
                n += len(buf)
                buf = []
        if buf:
            self.put_many(coll, buf, version_field=version_field, fresh=True)
            n += len(buf)
        return n

    # -- queries -----------------------------------------------------------------------------------
    def count(self, coll: str, where: str = "", params: Sequence[Any] = ()) -> int:
        """Number of records, optionally matching a SQL condition over ``data`` (see :meth:`field`)."""
        self.ensure_collection(coll)
        sql = f"SELECT count(*) FROM {_table(coll)}" + (f" WHERE {where}" if where else "")
        return int(self._conn().execute(sql, tuple(params)).fetchone()[0])

    def aggregate(self, coll: str, exprs: str, where: str = "", params: Sequence[Any] = ()) -> tuple[Any, ...]:
        """One row of aggregate SQL expressions (e.g. ``count(*), sum(...)``) over the matching records."""
        self.ensure_collection(coll)
        sql = f"SELECT {exprs} FROM {_table(coll)}" + (f" WHERE {where}" if where else "")
        row = self._conn().execute(sql, tuple(params)).fetchone()
        return tuple(row) if row is not None else ()

    def ids(self, coll: str) -> list[str]:
        """Every record id of a collection, in version order (reads only the version index, not the records)."""
        self.ensure_collection(coll)
        t = _table(coll)
        # The (version) index also holds the primary key, so it covers this query and is far smaller
        # than the table; without the hint SQLite may walk the whole table.
        sql = f'SELECT id FROM {t} INDEXED BY "{t[1:-1]}_v"'
        return [r[0] for r in self._conn().execute(sql)]

    @staticmethod
    def table_sql(coll: str) -> str:
        """The quoted SQL table name of a collection (to qualify columns in correlated subqueries)."""
        return _table(coll)

    @staticmethod
    def field(name: str) -> str:
        """SQL expression for a top-level JSON field of ``data`` (for WHERE/ORDER BY built by callers).

        Field names come from the schema or are validated by the caller against it; quotes are
        stripped anyway so a hostile name cannot break out of the JSON path.
        """
        safe = name.replace('"', "").replace("'", "")
        return f"json_extract(data, '$.\"{safe}\"')"

    def query(self, coll: str, *, where: str = "", params: Sequence[Any] = (),
              order_by: Sequence[tuple[str, bool]] = (), limit: int | None = None,
              conn: sqlite3.Connection | None = None) -> list[Row]:
        """Rows matching ``where`` ordered by ``order_by`` (pairs of SQL expression, descending).

        ``id`` is always the last sort key so keyset paging is stable; callers build keyset
        conditions ("after this row") into ``where`` themselves.
        """
        self.ensure_collection(coll)
        sql = f"SELECT id, version, data FROM {_table(coll)}"
        if where:
            sql += f" WHERE {where}"
        keys = [f"{expr} {'DESC' if desc else 'ASC'}" for expr, desc in order_by]
        if not any(expr == "id" for expr, _ in order_by):
            keys.append("id ASC")
        sql += " ORDER BY " + ", ".join(keys)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Row(*r) for r in (conn or self._conn()).execute(sql, tuple(params))]

    def changes_since(self, coll: str, since: int, *, upto: int | None = None, after: tuple[int, str] | None = None,
                      limit: int = 5000, conn: sqlite3.Connection | None = None,
                      where: str = "", params: Sequence[Any] = ()) -> list[Change]:
        """Upserts and deletes with ``since < version <= upto``, in version order, at most ``limit``.

        ``after`` is the (version, id) of the last change already returned, for paging a long feed.
        ``where`` (a SQL condition over ``data``, see :meth:`field`) narrows both upserts and deletes;
        deletes are matched against the record's last state (e.g. one mailbox's items).
        A record created and then deleted in the window shows up only as a delete; a record updated
        several times shows up once, with its latest state.
        """
        self.ensure_collection(coll)
        c = conn or self._conn()
        lo_v, lo_id = after if after else (since, "")
        hi = upto if upto is not None else self.current_version(c)
        extra = f" AND ({where})" if where else ""
        up = c.execute(
            f"SELECT id, version, data FROM {_table(coll)} WHERE version <= ? AND (version > ? OR "
            f"(version = ? AND id > ?)) AND version > ?{extra} ORDER BY version, id LIMIT ?",
            (hi, lo_v, lo_v, lo_id, since, *params, limit),
        ).fetchall()
        dels = c.execute(
            "SELECT id, version FROM tombstones WHERE coll=? AND version <= ? AND (version > ? OR "
            f"(version = ? AND id > ?)) AND version > ?{extra} ORDER BY version, id LIMIT ?",
            (coll, hi, lo_v, lo_v, lo_id, since, *params, limit),
        ).fetchall()
        merged = [Change(r[0], r[1], Row(*r)) for r in up] + [Change(d[0], d[1], None) for d in dels]
        merged.sort(key=lambda ch: (ch.version, ch.id))
        return merged[:limit]

    def oldest_tombstone_time(self) -> float | None:
        """When the oldest remembered delete happened (for token-expiry decisions)."""
        r = self._conn().execute("SELECT min(deleted_at) FROM tombstones").fetchone()
        return float(r[0]) if r and r[0] is not None else None
