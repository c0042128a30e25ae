"""The lake copy: one Delta table per mirrored table, kept current with the warehouse, exactly once.

After each merge into DuckDB, :meth:`Lake.publish` applies to the lake what the warehouse's runs since the
lake's own watermark changed: one Delta commit per table (a MERGE of the upserted rows and the deleted keys),
carrying the sync run it reaches in the commit's metadata (``bridgekit.sync_run_id``, ``bridgekit.runs_through``).
The watermark lives in the Delta log itself, so it moves in the same atomic commit as the data: a sync killed
between the DuckDB merge and the lake commit is caught up by the next publish, never applied twice, and the
lake is never ahead of the warehouse (it is only ever written from it).

Tables are published concurrently from one read-only snapshot of the warehouse. A Lake keeps each table's
DeltaTable between publishes (a watcher's polls read only the log entries added since) and counts its commits in
their metadata (``bridgekit.commits_since_optimize``) to compact and vacuum every ``optimize_every`` commits.
A column new in the warehouse is added to the Delta table by the MERGE's schema evolution.

Layout: ``<url>/<schema>/<table>`` (``dataverse/account``, ``graph/users``), the warehouse's column names and
types, except UUID and JSON, which Delta lacks, as strings. No partitioning: the mirrored tables are keyed by
id and read whole or by filters Delta's file statistics already serve; a table of tens of millions of rows
is better served by compaction (:meth:`Lake.optimize`) than by many small partitions.

Example:
    >>> lake = Lake(profile.lake)                   # doctest: +SKIP
    >>> lake.publish(wb.warehouse)                  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from bridgekit.config import LakeTarget
from bridgekit.errors import ConfigError, LakeError
from bridgekit.warehouse import Warehouse, delta_select, quote

__all__ = ["Lake", "LakeCommit"]

log = logging.getLogger("bridgekit.lake")

_RUN = "bridgekit.sync_run_id"
_THROUGH = "bridgekit.runs_through"
_SINCE = "bridgekit.commits_since_optimize"
_DELETED = "_bk_lake_deleted"
_REOPEN_S = 1800.0  # a kept DeltaTable is reopened after this long (it holds the credentials it opened with)
_PUBLISHERS = 4  # tables published at once: each commit waits mostly on storage round trips and delta-rs


@dataclass
class LakeCommit:
    """What one publish did to one Delta table."""

    table: str
    version: int | None  # the Delta version written (None: nothing to do)
    sync_run_id: str | None
    upserted: int = 0
    deleted: int = 0
    mode: str = "merge"  # create | merge | none
    optimized: bool = False


class Lake:
    """The Delta Lake copy of one profile's warehouse (a local path or Azure Data Lake Storage Gen2).

    Args:
        target: The profile's ``[profiles.X.lake]`` settings.
        token: For ``auth = "profile"``: returns an Entra access token for Azure Storage.
    """

    def __init__(self, target: LakeTarget, *, token: Callable[[], str] | None = None) -> None:
        self.target = target
        self._token = token
        # Kept between publishes (a watcher's polls): each table's DeltaTable, brought up to date by reading
        # only the log entries added since, and the watermark of the commit this object made last. Object
        # stores answer every log file read with a round trip, so reopening each poll costs more than the merge.
        self._kept: dict[str, tuple[Any, float]] = {}
        self._marks: dict[str, tuple[int, tuple[dt.datetime, str], int]] = {}  # uri: (version, mark, count)
        self._lock = threading.Lock()

    # -- where and how -------------------------------------------------------------------------------------

    def table_uri(self, table: str) -> str:
        """``<url>/<schema>/<table>`` for ``schema.table``."""
        schema, _, name = table.partition(".")
        return f"{self.target.url.rstrip('/')}/{schema}/{name}"

    def storage_options(self) -> dict[str, str] | None:
        """Credentials and endpoint for the object store, read now from the environment (never stored)."""
        t = self.target
        if t.is_local:
            return None
        opts: dict[str, str] = {}
        if t.endpoint:  # Azurite or a sovereign cloud
            opts["azure_storage_endpoint"] = t.endpoint
            if t.endpoint.startswith("http://"):
                # Plain http only to an emulator on this machine (Azurite); a storage account is https, verified
                if not _loopback(t.endpoint):
                    raise ConfigError(f"the lake's endpoint {t.endpoint} is plain http on another host",
                                      key="endpoint", hint="use the https:// endpoint of the storage account "
                                      "(plain http is only for Azurite on 127.0.0.1)")
                opts["allow_http"] = "true"
        if t.account_name:
            opts["azure_storage_account_name"] = t.account_name
        if t.auth == "key":
            opts["azure_storage_account_key"] = _env(t.account_key_env, "account_key_env")
        elif t.auth == "sas":
            opts["azure_storage_sas_key"] = _env(t.sas_token_env, "sas_token_env")
        elif t.auth == "profile":
            if self._token is None:
                raise ConfigError("lake auth = 'profile' needs the profile's identity",
                                  hint="open the lake through the Workbench (bridgekit sync does)")
            opts["azure_storage_token"] = self._token()
        return opts

    # -- publishing ----------------------------------------------------------------------------------------

    def publish(self, warehouse: Warehouse, tables: Sequence[str] | None = None) -> list[LakeCommit]:
        """Bring every mirrored table's Delta copy up to the warehouse: what its runs since the lake's
        watermark created, updated and deleted, in one commit per table.

        Tables are published concurrently (each its own Delta commit; delta-rs does the work outside the
        GIL), all from one read-only snapshot of the warehouse: no merge can land while it is open.

        Raises:
            LakeError: the lake could not be read or written (nothing in the warehouse is affected; the
                next publish catches up). Tables published before the error keep their commits.
        """
        names = list(tables) if tables is not None else warehouse.tables()
        if not names:
            return []
        with warehouse.reader() as conn:  # one snapshot of the warehouse for every table
            cursors = [conn.cursor() for _ in range(min(_PUBLISHERS, len(names)))]
            free: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
            for cur in cursors:
                free.put(cur)

            def one(table: str) -> LakeCommit:
                cur = free.get()
                try:
                    return self._publish_guarded(cur, table)
                finally:
                    free.put(cur)

            try:
                with ThreadPoolExecutor(max_workers=len(cursors), thread_name_prefix="bk-lake") as pool:
                    futures = [pool.submit(one, table) for table in names]
                    wait(futures)
                return [f.result() for f in futures]  # the first failure, in table order, is raised
            finally:
                for cur in cursors:
                    cur.close()

    def _publish_guarded(self, conn: duckdb.DuckDBPyConnection, table: str) -> LakeCommit:
        """:meth:`_publish_table`, then compaction when due; delta-rs and DuckDB errors become LakeError."""
        try:
            commit, count = self._publish_table(conn, table)
            if commit.version is not None and 0 < self.target.optimize_every <= count:
                self.optimize([table])
                commit.optimized = True
            return commit
        except LakeError:
            raise
        except (OSError, duckdb.Error) as exc:
            raise LakeError(f"could not publish {table} to the lake at {self.target.url}: {exc}",
                            hint="check the lake's URL and credentials; the next sync catches it up") from exc
        except Exception as exc:  # deltalake raises its own (Rust) error types
            if type(exc).__module__.split(".")[0] != "deltalake" and "Delta" not in type(exc).__name__:
                raise
            raise LakeError(f"could not publish {table} to the lake at {self.target.url}: {exc}",
                            hint="check the lake's URL and credentials; the next sync catches it up") from exc

    def _publish_table(self, conn: duckdb.DuckDBPyConnection, table: str) -> tuple[LakeCommit, int]:
        """One table's commit, and its compaction count (0: no commit)."""
        from deltalake import CommitProperties, write_deltalake

        schema, _, name = table.partition(".")
        runs = _runs(conn, table)
        if not runs:
            return LakeCommit(table, None, None, mode="none"), 0
        uri = self.table_uri(table)
        storage = self.storage_options()
        target = self._current(uri, storage)
        with self._lock:
            kept = self._marks.get(uri)
        if target is None:
            mark, since = None, 0
        elif kept is not None and kept[0] == target.version():  # nobody committed since this object did
            mark, since = kept[1], kept[2]
        else:
            mark, since = _watermark(target)
        last_run, last_end = str(runs[-1][0]), runs[-1][1]
        # The compaction count: this commit's place in the cycle of optimize_every commits; the commit that
        # reaches it is followed by a compaction and the next one starts the cycle again (whether or not the
        # compaction found files to rewrite, which is when delta-rs commits nothing).
        every = self.target.optimize_every
        count = since % every + 1 if every > 0 else since + 1
        props = CommitProperties(custom_metadata={_RUN: last_run, _THROUGH: _iso(last_end), _SINCE: str(count)})
        select = delta_select(conn, schema, name)
        if target is None or mark is None:
            # First publish (or the lake table was removed): the whole table, streamed, in one commit.
            reader: Any = conn.sql(select).to_arrow_reader()
            write_deltalake(uri, reader, mode="overwrite", schema_mode="overwrite", storage_options=storage,
                            commit_properties=props)
            rows = int(conn.execute(f"SELECT count(*) FROM {quote(schema)}.{quote(name)}").fetchall()[0][0])
            created = self._current(uri, storage)
            version = created.version() if created is not None else 0
            self._remember(uri, version, last_end, last_run, count)
            log.info("lake: %s created at version %d (%d rows, through run %s)", table, version, rows, last_run)
            return LakeCommit(table, version, last_run, upserted=rows, mode="create"), count
        pending = _changed_since(runs, mark)
        if not pending:  # runs since the watermark changed nothing in this table
            return LakeCommit(table, None, mark[1], mode="none"), 0
        ids = [str(r[0]) for r in pending]
        upserts: pa.Table = conn.sql(f"{select} WHERE _bk_run_id IN (SELECT unnest(?))", params=[ids]).to_arrow_table()
        key = _key(conn, schema, name)
        deletes: pa.Array = pa.array([], pa.string())
        if any(r[2] == "full" or int(r[4]) > 0 for r in pending):
            # Rows the runs deleted (or a full reload dropped): keys in the lake the warehouse no longer has.
            lake_keys = target.to_pyarrow_table(columns=[key])
            conn.register("_bk_lake_keys", lake_keys)
            try:
                gone: pa.Table = conn.sql(
                    f"SELECT k.{quote(key)} FROM _bk_lake_keys k ANTI JOIN {quote(schema)}.{quote(name)} w "
                    f"ON CAST(w.{quote(key)} AS VARCHAR) = CAST(k.{quote(key)} AS VARCHAR)").to_arrow_table()
            finally:
                conn.unregister("_bk_lake_keys")
            deletes = gone.column(0).combine_chunks() if gone.num_rows else deletes
        source = _with_deletes(upserts, key, deletes)
        cols = [f.name for f in upserts.schema]
        q = {c: f"s.`{c}`" for c in cols}
        # merge_schema: a column the warehouse gained since the last commit is added to the Delta table
        # (older rows read it as null, as they do in DuckDB after its ALTER TABLE ADD COLUMN)
        merger = target.merge(source, predicate=f"t.`{key}` = s.`{key}`", source_alias="s", target_alias="t",
                              merge_schema=True, commit_properties=props)
        merger = (merger.when_matched_delete(predicate=f"s.`{_DELETED}`")
                  .when_matched_update(updates=q, predicate=f"NOT s.`{_DELETED}`")
                  .when_not_matched_insert(updates=q, predicate=f"NOT s.`{_DELETED}`"))
        metrics = merger.execute()
        version = target.version()  # the merge moved the table object to the version it committed
        self._remember(uri, version, last_end, last_run, count)
        log.info("lake: %s version %d, +~%d -%d (through run %s)", table, version, upserts.num_rows,
                 metrics.get("num_target_rows_deleted", 0), last_run)
        return LakeCommit(table, version, last_run, upserted=upserts.num_rows,
                          deleted=int(metrics.get("num_target_rows_deleted", 0))), count

    def _current(self, uri: str, storage: dict[str, str] | None) -> Any:
        """The Delta table at ``uri`` at its newest version (a kept one reads only the log entries added
        since), or None when there is none. Reopened after ``_REOPEN_S``: its credentials may expire."""
        with self._lock:
            kept = self._kept.get(uri)
        if kept is not None and time.monotonic() - kept[1] < _REOPEN_S:
            try:
                kept[0].update_incremental()
                return kept[0]
            except Exception:  # removed or replaced since: open it afresh
                log.debug("lake: reopening %s", uri)
        table = self._open(uri, storage)
        with self._lock:
            if table is None:
                self._kept.pop(uri, None)
            else:
                self._kept[uri] = (table, time.monotonic())
        return table

    def _remember(self, uri: str, version: int, through: Any, run: str, count: int) -> None:
        """The watermark this object just committed at ``version`` (what the log's history would answer)."""
        with self._lock:
            self._marks[uri] = (version, (dt.datetime.fromisoformat(_iso(through)), run), count)

    @staticmethod
    def _open(uri: str, storage: dict[str, str] | None) -> Any:
        """The Delta table at ``uri``, or None when there is none yet."""
        from deltalake import DeltaTable

        try:
            return DeltaTable(uri, storage_options=storage)
        except Exception as exc:  # no table yet (TableNotFoundError)
            if "TableNotFound" in type(exc).__name__ or "not a Delta table" in str(exc) or "no log files" in str(exc):
                return None
            raise

    def _watermark(self, uri: str) -> tuple[dt.datetime, str] | None:
        """(runs through, run id) of the newest bridgekit commit of the Delta table; None if there is none."""
        table = self._open(uri, self.storage_options())
        return None if table is None else _watermark(table)[0]

    # -- small files -----------------------------------------------------------------------------------------

    def optimize(self, tables: Sequence[str] | None = None, *, warehouse: Warehouse | None = None) -> list[dict[str, Any]]:
        """Compact each table's small files, then vacuum files older than ``retention_hours``.

        ``tables`` default: every table the warehouse mirrors (``warehouse`` is then required).
        """
        from deltalake import DeltaTable

        if tables is None:
            if warehouse is None:
                raise ConfigError("optimize needs the tables or the warehouse")
            tables = warehouse.tables()
        out: list[dict[str, Any]] = []
        for table in tables:
            try:
                dtable = DeltaTable(self.table_uri(table), storage_options=self.storage_options())
            except Exception as exc:
                if "TableNotFound" in type(exc).__name__:
                    continue
                raise LakeError(f"could not open {table} in the lake: {exc}") from exc
            before = len(dtable.file_uris())
            metrics = dtable.optimize.compact()
            removed = dtable.vacuum(retention_hours=self.target.retention_hours, dry_run=False,
                                    enforce_retention_duration=False)
            after = len(DeltaTable(self.table_uri(table), storage_options=self.storage_options()).file_uris())
            out.append({"table": table, "files_before": before, "files_after": after,
                        "compacted": int(metrics.get("numFilesRemoved", 0)), "vacuumed": len(removed)})
            log.info("lake: %s compacted %d -> %d files, %d old files vacuumed", table, before, after, len(removed))
        return out

    def status(self, warehouse: Warehouse) -> list[dict[str, Any]]:
        """Per mirrored table: the lake's version, the run it reaches, and whether the warehouse is ahead."""
        from deltalake import DeltaTable

        out: list[dict[str, Any]] = []
        state = warehouse.state()
        for table in warehouse.tables():
            uri = self.table_uri(table)
            mark = self._watermark(uri)
            version = files = None
            if mark is not None:
                dtable = DeltaTable(uri, storage_options=self.storage_options())
                version, files = dtable.version(), len(dtable.file_uris())
            last = (state.get(table) or {}).get("last_run_id")
            with warehouse.reader() as conn:
                behind = mark is None or bool(_changed_since(_runs(conn, table), mark))
            out.append({"table": table, "lake_version": version, "files": files,
                        "lake_run": mark[1] if mark else None, "warehouse_run": last, "current": not behind})
        return out


def _watermark(table: Any) -> tuple[tuple[dt.datetime, str] | None, int]:
    """The newest bridgekit commit's (runs through, run id), or None; and the compaction count it recorded
    (``bridgekit.commits_since_optimize``: 1 to ``optimize_every``, so no publish reads a long history)."""
    for limit in (20, None):
        for entry in table.history(limit):
            if _THROUGH in entry:
                since = int(entry.get(_SINCE) or 0)
                return (dt.datetime.fromisoformat(str(entry[_THROUGH])), str(entry.get(_RUN))), since
    return None, 0


def _runs(conn: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    """The table's successful runs, oldest first: (run id, ended at, mode, rows changed, rows deleted)."""
    return conn.execute(
        "SELECT run_id, ended_at, mode, coalesce(created, 0) + coalesce(updated, 0) + coalesce(deleted, 0), "
        "coalesce(deleted, 0) FROM bridgekit.sync_runs WHERE table_name = ? AND status = 'ok' "
        "ORDER BY ended_at, run_id", [table]).fetchall()


def _changed_since(runs: list[tuple[Any, ...]], mark: tuple[dt.datetime, str]) -> list[tuple[Any, ...]]:
    """The runs after the watermark that changed the table (a full reload counts: it may drop rows)."""
    return [r for r in runs if (_utc(r[1]), str(r[0])) > mark and (int(r[3]) > 0 or r[2] == "full")]


def _env(name: str | None, key: str) -> str:
    import os

    if not name:
        raise ConfigError(f"the lake's auth needs {key}", key=key,
                          hint=f'add {key} = "NAME_OF_THE_VARIABLE" to [profiles.<name>.lake]')
    value = os.environ.get(name)
    if not value:
        from bridgekit.errors import MissingCredentialError

        raise MissingCredentialError(f"environment variable {name} is not set (the lake's credential)", key=key,
                                     hint=f"export {name}=<the value>")
    return value


def _loopback(url: str) -> bool:
    """True when ``url``'s host is this machine (127.0.0.0/8, ::1 or localhost)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _iso(value: Any) -> str:
    return _utc(value).isoformat()


def _utc(value: Any) -> dt.datetime:
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _key(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> str:
    """The table's key, as its sync recorded it (``bridgekit.sync_state.spec``)."""
    # fetchall, not fetchone: an unfinished result would block the connection's next statement
    rows = conn.execute("SELECT json_extract_string(spec, '$.key') FROM bridgekit.sync_state WHERE table_name = ?",
                        [f"{schema}.{table}"]).fetchall()
    row = rows[0] if rows else None
    if row is None or not row[0]:
        raise LakeError(f"{schema}.{table} has no recorded key in the warehouse",
                        hint="run `bridgekit sync` for the table first")
    return str(row[0])


def _with_deletes(upserts: pa.Table, key: str, deletes: pa.Array) -> pa.Table:
    """The MERGE source: the upserted rows, then one row per deleted key (other columns null), flagged."""
    flagged = upserts.append_column(_DELETED, pa.array([False] * upserts.num_rows, pa.bool_()))
    if len(deletes) == 0:
        return flagged
    key_type = upserts.schema.field(key).type
    cols = {f.name: (deletes.cast(key_type) if f.name == key else pa.nulls(len(deletes), f.type))
            for f in upserts.schema}
    gone = pa.table({**cols, _DELETED: pa.array([True] * len(deletes), pa.bool_())})
    return pa.concat_tables([flagged, gone])
