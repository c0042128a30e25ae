"""The migration checkpoint: one SQLite file per run id holding the plan, the rejects, batch states and per-row results.

Why SQLite and why per run: a run must survive SIGKILL at any instant and resume without writing
anything twice, and a rollback must find exactly what the run created, possibly days later. SQLite in
WAL mode with ``synchronous=FULL`` makes each recorded batch durable at its commit, needs no server, and
one file per run (``<state_dir>/<run_id>.sqlite``) is easy to keep with the run's report.

Tables::

    run       one row: target, key, mapping text, source, mode, status, times
    rows      the plan: one row per valid source row (key, action, payload, intended values, diff) and
              its result (status, http status, created, error, attempts)
    rejects   rows that failed validation or were refused by Dataverse, with the reason
    batches   batch number -> pending | in_flight | done; a batch is marked in_flight (committed)
              before it is sent, and done with its rows' results in one transaction after
    events    rollback and reconciliation outcomes
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridgekit.errors import ConfigError

__all__ = ["Checkpoint", "checkpoint_path"]

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    run_id TEXT PRIMARY KEY, target TEXT, key_json TEXT, mapping TEXT, mapping_sha TEXT, source TEXT,
    profile TEXT, mode TEXT, status TEXT, created_at TEXT, updated_at TEXT, summary_json TEXT);
CREATE TABLE IF NOT EXISTS rows (
    seq INTEGER PRIMARY KEY, row_no INTEGER, key_norm TEXT UNIQUE, key_json TEXT, action TEXT,
    payload_json TEXT, intended_json TEXT, diff_json TEXT, batch INTEGER,
    status TEXT DEFAULT 'planned', http_status INTEGER, created INTEGER DEFAULT 0, target_id TEXT,
    error TEXT, attempts INTEGER DEFAULT 0, note TEXT, finished_at TEXT, rolled_back INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS rows_batch ON rows(batch);
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY, row_no INTEGER, key TEXT, columns TEXT, reason TEXT, row_json TEXT, stage TEXT);
CREATE TABLE IF NOT EXISTS batches (
    batch INTEGER PRIMARY KEY, state TEXT, started_at TEXT, finished_at TEXT, sends INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at TEXT, kind TEXT, detail_json TEXT);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def checkpoint_path(state_dir: str | Path, run_id: str) -> Path:
    """``<state_dir>/<run_id>.sqlite``.

    Raises:
        ConfigError: the run id has characters that do not belong in a file name.
    """
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run id {run_id!r} is not valid",
                          hint="use letters, digits, '.', '_' and '-' (at most 100 characters)")
    return Path(state_dir).expanduser() / f"{run_id}.sqlite"


class Checkpoint:
    """One run's checkpoint file; thread-safe (one connection behind a lock, short transactions)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch result survives a kill of the process (and of the machine).
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (committed on success, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Read rows (as :class:`sqlite3.Row`)."""
        with self._lock:
            self._conn.row_factory = sqlite3.Row
            try:
                return list(self._conn.execute(sql, params).fetchall())
            finally:
                self._conn.row_factory = None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row (None when there is none)."""
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
        return row[0] if row else None

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """The run row as a dict (None before :meth:`start`)."""
        rows = self.query("SELECT * FROM run LIMIT 1")
        return dict(rows[0]) if rows else None

    def start(self, *, run_id: str, target: str, key: Sequence[str], mapping: str, mapping_sha: str,
              source: str, profile: str, mode: str) -> None:
        """Record a new run (status ``planning``)."""
        now = _now()
        with self.transaction() as conn:
            conn.execute("INSERT INTO run VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (run_id, target, json.dumps(list(key)), mapping, mapping_sha, source, profile, mode,
                          "planning", now, now, None))

    def set_status(self, status: str, summary: dict[str, Any] | None = None) -> None:
        """Update the run's status (and summary)."""
        with self.transaction() as conn:
            if summary is None:
                conn.execute("UPDATE run SET status = ?, updated_at = ?", (status, _now()))
            else:
                conn.execute("UPDATE run SET status = ?, updated_at = ?, summary_json = ?",
                             (status, _now(), json.dumps(summary, default=str)))

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        """Append an event (rollback, reconciliation ...)."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO events (at, kind, detail_json) VALUES (?,?,?)",
                         (_now(), kind, json.dumps(detail, default=str)))

    # -- planning ---------------------------------------------------------------------------------------
    def reject(self, conn: sqlite3.Connection, *, row_no: int | None, key: str | None, columns: Iterable[str],
               reason: str, row: dict[str, Any] | None, stage: str = "validation") -> None:
        """Record a rejected row (inside a transaction)."""
        conn.execute("INSERT INTO rejects (row_no, key, columns, reason, row_json, stage) VALUES (?,?,?,?,?,?)",
                     (row_no, key, ",".join(columns), reason,
                      json.dumps(row, default=str) if row is not None else None, stage))

    def planned_keys(self, conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, int]:
        """Normalised key -> source row number, for those of ``keys`` already planned (inside a transaction)."""
        if not keys:
            return {}
        found = conn.execute("SELECT key_norm, row_no FROM rows WHERE key_norm IN (SELECT value FROM json_each(?))",
                             (json.dumps(list(keys)),))
        return {str(k): int(n) for k, n in found}

    def add_planned(self, conn: sqlite3.Connection, rows: Iterable[Sequence[Any]]) -> None:
        """Record planned rows (inside a transaction): ``(row_no, key_norm, key_json, action, payload_json,
        intended_json, diff_json, status)`` each, keys not planned yet (see :meth:`planned_keys`)."""
        conn.executemany("INSERT INTO rows (row_no, key_norm, key_json, action, payload_json, intended_json, "
                         "diff_json, status) VALUES (?,?,?,?,?,?,?,?)", rows)

    def number_batches(self, size: int, *, complete: bool = True) -> int:
        """Number the planned creates and updates that have no batch yet, in source order; returns the count.

        Numbering continues after the batches already numbered. With ``complete`` false only full batches
        are numbered (the remainder waits for rows planned later), so writing can start while planning
        goes on without leaving a short batch behind every plan chunk.
        """
        with self.transaction() as conn:
            start = int(conn.execute("SELECT coalesce(max(batch) + 1, 0) FROM rows").fetchone()[0])
            todo = int(conn.execute("SELECT count(*) FROM rows WHERE batch IS NULL AND action IN ('create', 'update')"
                                    ).fetchone()[0])
            take = todo if complete else todo - todo % size
            conn.execute("""
                WITH r AS (SELECT seq, ? + (row_number() OVER (ORDER BY seq) - 1) / ? AS b FROM rows
                           WHERE batch IS NULL AND action IN ('create', 'update') ORDER BY seq LIMIT ?)
                UPDATE rows SET batch = (SELECT b FROM r WHERE r.seq = rows.seq)
                WHERE seq IN (SELECT seq FROM r)""", (start, size, take))
            conn.execute("INSERT OR IGNORE INTO batches (batch, state) SELECT DISTINCT batch, 'pending' FROM rows "
                         "WHERE batch IS NOT NULL")
            return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])

    def last_planned_row(self) -> int:
        """The highest source row number planned (kept or rejected by validation); 0 when none."""
        return int(self.scalar("SELECT max(n) FROM (SELECT max(row_no) AS n FROM rows UNION ALL "
                               "SELECT max(row_no) FROM rejects WHERE stage = 'validation')") or 0)

    def writes_started(self) -> bool:
        """Whether any batch has been sent (or is being sent)."""
        return bool(self.scalar("SELECT count(*) FROM batches WHERE sends > 0 OR state != 'pending'"))

    # -- execution --------------------------------------------------------------------------------------
    def batches_in(self, *states: str) -> list[int]:
        """Batch numbers in the given states, in order."""
        marks = ",".join("?" * len(states))
        return [int(r[0]) for r in self.query(f"SELECT batch FROM batches WHERE state IN ({marks}) ORDER BY batch",
                                              states)]

    def mark_in_flight(self, batch: int) -> None:
        """Durably note that ``batch`` is about to be sent (so a resume knows its outcome is unknown)."""
        with self.transaction() as conn:
            conn.execute("UPDATE batches SET state = 'in_flight', started_at = ?, sends = sends + 1 WHERE batch = ?",
                         (_now(), batch))

    def pending_rows(self, batch: int) -> list[sqlite3.Row]:
        """Rows of ``batch`` that still need writing."""
        return self.query("SELECT * FROM rows WHERE batch = ? AND status IN ('planned', 'retry') ORDER BY seq",
                          (batch,))
