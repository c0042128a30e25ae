"""Sync engine: exact mirrors after full loads and deltas, resume after crashes (SIGKILL), faults, resync, locking, CLI."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner

from bridgekit.errors import ResyncRequired, SyncError
from bridgekit.sources import FullPlan, Page
from bridgekit.sync import SyncEngine, resolve_selection
from bridgekit.warehouse import Column, TableSpec, Warehouse

# -- an in-memory source: a versioned dict with change tracking ------------------------------------------


class MemorySource:
    """A table in memory: full reads in key-hash partitions, deltas by version, injectable failures."""

    def __init__(self, name: str = "widget", *, n: int = 23, page_size: int = 4, tracked: bool = True) -> None:
        self.table = f"dataverse.{name}"
        self.name = name
        self.page_size = page_size
        self._tracked = tracked
        self.version = 0
        self.rows: dict[str, dict[str, Any]] = {}
        self.changed: dict[str, int] = {}  # id -> version of its last change (deletes included)
        self.fail_at: int | None = None  # raise after this many more pages
        self.expire_before: int = -1  # delta tokens older than this raise ResyncRequired
        for i in range(n):
            self.upsert(str(uuid.UUID(int=i + 1)), f"w{i}", i)

    @property
    def tracked(self) -> bool:
        return self._tracked

    def upsert(self, rid: str, name: str, qty: int) -> None:
        self.version += 1
        self.rows[rid] = {"id": rid, "name": name, "qty": qty}
        self.changed[rid] = self.version

    def delete(self, rid: str) -> None:
        self.version += 1
        self.rows.pop(rid, None)
        self.changed[rid] = self.version

    def spec(self) -> TableSpec:
        return TableSpec("dataverse", self.name, "id", (Column("id", "UUID"), Column("name", "VARCHAR"),
                                                         Column("qty", "INTEGER")))

    def plan_full(self, partitions: int) -> FullPlan:
        return FullPlan([f"full:{p}:{partitions}:0" for p in range(partitions)],
                        token=f"{self.version}" if self.tracked else None)

    def delta_start(self, token: str) -> list[str]:
        return [f"delta:{token}:0"]

    def join_tokens(self, tokens: list[str]) -> str:
        return tokens[0]

    def _tick(self) -> None:
        if self.fail_at is not None:
            if self.fail_at <= 0:
                raise RuntimeError("simulated crash")
            self.fail_at -= 1

    def page(self, cursor: str) -> Page:
        self._tick()
        kind, *rest = cursor.split(":")
        if kind == "full":
            part, parts, offset = (int(x) for x in rest)
            ids = sorted(r for r in self.rows if int(r[-4:], 16) % parts == part)
            chunk = ids[offset:offset + self.page_size]
            more = offset + self.page_size < len(ids)
            return Page(rows=[dict(self.rows[r]) for r in chunk],
                        next=f"full:{part}:{parts}:{offset + self.page_size}" if more else None)
        since, offset = int(rest[0]), int(rest[1])
        if since < self.expire_before:
            raise ResyncRequired("token expired", table=self.table)
        changes = sorted((v, r) for r, v in self.changed.items() if v > since)[offset:offset + self.page_size]
        more = offset + self.page_size < sum(1 for v in self.changed.values() if v > since)
        ups = [dict(self.rows[r]) for _, r in changes if r in self.rows]
        dels = [r for _, r in changes if r not in self.rows]
        return Page(rows=ups, deletes=dels, next=f"delta:{since}:{offset + self.page_size}" if more else None,
                    token=None if more else str(self.version))


def _engine(tmp_path: Path, *sources: MemorySource, **kw: Any) -> SyncEngine:
    by = {s.table: s for s in sources}
    return SyncEngine(Warehouse(tmp_path / "w.duckdb"), list(by), by.__getitem__, concurrency=3, progress=False, **kw)


def _mirror(wh: Warehouse, table: str = "dataverse.widget") -> dict[str, tuple[str, int]]:
    df = wh.sql(f"select id::varchar as id, name, qty from {table}")
    assert df["id"].is_unique
    return {r.id: (r.name, int(r.qty)) for r in df.itertuples()}


def _expected(src: MemorySource) -> dict[str, tuple[str, int]]:
    return {r: (v["name"], v["qty"]) for r, v in src.rows.items()}


def test_full_load_then_deltas_mirror_the_source_and_report_counts(tmp_path: Path) -> None:
    src = MemorySource()
    eng = _engine(tmp_path, src)
    report = eng.run()
    assert report.table("widget").created == 23 and report.table("widget").mode == "full"
    assert _mirror(eng.warehouse) == _expected(src)
    ids = sorted(src.rows)
    src.upsert(ids[0], "changed", 99)
    src.delete(ids[1])
    src.upsert(str(uuid.uuid4()), "new", 1)
    rep = eng.run().table("widget")
    assert (rep.mode, rep.created, rep.updated, rep.deleted) == ("delta", 1, 1, 1)
    assert _mirror(eng.warehouse) == _expected(src)
    runs = eng.warehouse.sql("select table_name, mode, created, updated, deleted from bridgekit.sync_runs order by ended_at")
    assert list(runs["mode"]) == ["full", "delta"]
    frame = eng.run().to_frame()
    assert list(frame.columns)[:6] == ["table", "mode", "status", "created", "updated", "deleted"]
    assert "dataverse.widget" in str(report) and "rows/s" in report.render()


def test_a_crash_mid_fetch_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    src = MemorySource(n=40)
    eng = _engine(tmp_path, src)
    src.fail_at = 5
    with pytest.raises(RuntimeError):
        eng.run()
    assert not eng.warehouse.exists() or "dataverse.widget" not in eng.warehouse.tables()  # nothing half-applied
    src.fail_at = None
    # a fresh engine (a new process) picks up the staged pages
    eng2 = _engine(tmp_path, src)
    rep = eng2.run().table("widget")
    assert rep.resumed and rep.created == 40
    assert _mirror(eng2.warehouse) == _expected(src)
    # and a crash in the middle of a delta as well: a large delta resumes from its staged pages ...
    for i, rid in enumerate(sorted(src.rows)[:15]):
        src.upsert(rid, f"d{i}", i)
    src.delete(sorted(src.rows)[20])
    src.fail_at = 2
    with pytest.raises(RuntimeError):
        eng3 = _engine(tmp_path, src)
        eng3.delta_commit_rows = 5  # checkpoint page by page beyond 5 rows (50,000 by default)
        eng3.run()
    src.fail_at = None
    rep = _engine(tmp_path, src).run().table("widget")
    assert rep.resumed and (rep.updated, rep.deleted) == (15, 1)
    assert _mirror(eng2.warehouse) == _expected(src)
    # ... and a small one, staged in one transaction, is fetched again from the stored link: nothing lost
    for i, rid in enumerate(sorted(src.rows)[:12]):
        src.upsert(rid, f"e{i}", i)
    src.delete(sorted(src.rows)[25])
    src.fail_at = 2
    with pytest.raises(RuntimeError):
        _engine(tmp_path, src).run()
    src.fail_at = None
    rep = _engine(tmp_path, src).run().table("widget")
    assert not rep.resumed and (rep.updated, rep.deleted) == (12, 1)
    assert _mirror(eng2.warehouse) == _expected(src)


class Boxes(MemorySource):
    """Mailbox-like: a partition per box (more than a thousand), each with its own delta link."""

    BOXES = 1200

    def plan_full(self, partitions: int) -> FullPlan:
        return FullPlan([f"box:{b}:init" for b in range(self.BOXES)])

    def delta_start(self, token: str) -> list[str]:
        links = json.loads(token)
        return [f"box:{b}:{links.get(str(b), 'init')}" for b in range(self.BOXES)]

    def join_tokens(self, tokens: list[str]) -> str:
        return json.dumps(dict(t.split("=", 1) for t in tokens))

    def page(self, cursor: str) -> Page:
        _, box, since = cursor.split(":")
        ids = [r for r in sorted(self.rows) if int(r[-4:], 16) % self.BOXES == int(box)]
        if since != "init":
            ids = [r for r in ids if self.changed.get(r, 0) > int(since)]
        return Page(rows=[dict(self.rows[r]) for r in ids], token=f"{box}={self.version}")


def test_a_table_of_more_than_a_thousand_partitions_keeps_every_partitions_link(tmp_path: Path) -> None:
    src = Boxes(n=2400)
    eng = _engine(tmp_path, src)
    assert eng.run().table("widget").fetched == 2400
    assert len(json.loads(eng.warehouse.state()["dataverse.widget"]["delta_link"])) == 1200
    rid = sorted(src.rows)[1500]
    src.upsert(rid, "changed", 7)
    rep = _engine(tmp_path, src).run().table("widget")
    assert rep.mode == "delta" and rep.fetched == 1 and rep.updated == 1  # no box read again from the start
    assert _mirror(eng.warehouse) == _expected(src)


def test_expired_token_triggers_a_full_reload_reported_as_resynced(tmp_path: Path) -> None:
    src = MemorySource()
    eng = _engine(tmp_path, src)
    eng.run()
    rid = sorted(src.rows)[3]
    src.delete(rid)
    src.expire_before = src.version  # the stored token (issued before the delete) is now too old
    rep = eng.run().table("widget")
    assert rep.resynced and rep.mode == "full" and rep.deleted == 1
    assert _mirror(eng.warehouse) == _expected(src)
    flag = eng.warehouse.sql("select resynced from bridgekit.sync_runs order by ended_at desc limit 1")
    assert bool(flag["resynced"][0])
    src.expire_before = -1
    assert eng.run().table("widget").mode == "delta"  # back to deltas


def test_untracked_tables_reload_each_run_or_are_skipped(tmp_path: Path) -> None:
    src = MemorySource(tracked=False)
    eng = _engine(tmp_path, src)
    eng.run()
    src.delete(sorted(src.rows)[0])
    rep = eng.run().table("widget")
    assert rep.mode == "full" and rep.deleted == 1 and "change tracking" in (rep.message or "")
    skip = _engine(tmp_path / "s", MemorySource(tracked=False), untracked="skip").run().table("widget")
    assert skip.status == "skipped" and "skipped" in (skip.message or "")


def test_selection_names() -> None:
    avail = ["dataverse.account", "dataverse.contact", "graph.users"]
    assert resolve_selection(avail, "account,graph.users") == ["dataverse.account", "graph.users"]
    assert resolve_selection(avail, ["users"]) == ["graph.users"]
    with pytest.raises(SyncError, match="not in the profile"):
        resolve_selection(avail, "nope")


def test_watch_applies_changes_and_stops(tmp_path: Path) -> None:
    src = MemorySource()
    eng = _engine(tmp_path, src)
    stop = threading.Event()
    seen: list[int] = []

    def on_report(r: Any) -> None:
        seen.append(r.changed)
        if len(seen) == 1:
            src.upsert(str(uuid.uuid4()), "live", 5)
        else:
            stop.set()

    eng.watch(interval=0.05, on_report=on_report, stop=stop)
    assert seen[0] == 23 and seen[1] == 1
    assert _mirror(eng.warehouse) == _expected(src)


def test_a_reader_sees_each_merge_of_a_running_watcher(tmp_path: Path) -> None:
    """A watcher holds its staging file from poll to poll, never the warehouse: a reader sees each merge at once."""
    src = MemorySource()
    eng = _engine(tmp_path, src)
    with eng.polling() as poll:
        assert poll().ok
        for i in range(3):
            rid = str(uuid.uuid4())
            src.upsert(rid, f"live {i}", i)
            assert poll().changed == 1
            assert _mirror(eng.warehouse)[rid] == (f"live {i}", i)
        assert poll().changed == 0
    assert _mirror(eng.warehouse) == _expected(src)


def test_an_idle_watcher_leaves_untracked_tables_alone_but_picks_up_their_changes(tmp_path: Path) -> None:
    src = MemorySource("gadget", tracked=False)
    eng = _engine(tmp_path, src)
    wh = eng.warehouse
    stop = threading.Event()
    reports: list[Any] = []
    thread = threading.Thread(target=eng.watch, kwargs={"interval": 0.05, "stop": stop,
                                                        "on_report": reports.append})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not reports and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reports and reports[0].ok
        before = wh.path.stat().st_mtime_ns
        time.sleep(1.0)  # about 20 polls, each reloading the table in full and finding it unchanged
        assert wh.path.stat().st_mtime_ns == before
        assert wh.sql("select count(*) as n from bridgekit.sync_runs")["n"][0] == 1
        rid = sorted(src.rows)[3]
        src.upsert(rid, "changed while watched", 99)
        while _mirror(wh, "dataverse.gadget").get(rid) != ("changed while watched", 99) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert _mirror(wh, "dataverse.gadget") == _expected(src)
    assert len(reports) == 2 and reports[1].table("gadget").mode == "full"


# -- against the emulator -----------------------------------------------------------------------------------

DV_TABLES = ("account", "contact", "businessunit", "email")
GRAPH_TABLES = ("users", "groups", "events")


def _profile(emulator: Any, warehouse: Path, page_size: int = 5000, partitions: int | None = 4) -> Any:
    """The emulator profile on a private warehouse. Partitioned full loads are what a tenant gets (the
    emulator's own default is a single read), so the tests ask for them unless told otherwise."""
    from bridgekit.config import SyncPlan, load_profile
    from bridgekit.workbench import resolve_runtime

    prof = resolve_runtime(load_profile("emulator"))
    return prof.with_values(warehouse=str(warehouse), sync=SyncPlan(DV_TABLES, GRAPH_TABLES, page_size, partitions))


def _store(emulator: Any) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{Path(emulator.home) / 'store.sqlite'}?mode=ro", uri=True)


def _norm(value: Any) -> Any:
    """One canonical form for a value read from the warehouse or from the emulator's JSON."""
    import pandas as pd

    if value is None or (not isinstance(value, list | tuple | dict) and not hasattr(value, "tolist")
                         and pd.isna(value)):
        return None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).strftime("%Y-%m-%dT%H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return format(Decimal(str(value)).normalize(), "f")
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        return datetime.fromisoformat(value[:19]).strftime("%Y-%m-%dT%H:%M:%S")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _row_hash(values: list[Any]) -> str:
    return hashlib.sha256(json.dumps([_norm(v) for v in values], default=str, sort_keys=True).encode()).hexdigest()


def _compare(emulator: Any, wh: Warehouse, names: tuple[str, ...] | None = None) -> None:
    """Every synced table (or those in ``names``) equals the emulator's store: same keys and the same per-row
    hash of all columns."""
    from bridgekit.emulator.schema import TABLES

    con = _store(emulator)
    for name in names or (*DV_TABLES, *(f"graph.{g}" for g in GRAPH_TABLES)):
        schema, table = ("graph", name[6:]) if name.startswith("graph.") else ("dataverse", name)
        meta = wh.sql("select column_name, data_type from duckdb_columns() where schema_name = ? and table_name = ? "
                      "order by column_index", [schema, table])
        cols = [c for c in meta["column_name"] if not c.startswith("_bk_") and not c.endswith(("_label", "_entitytype"))
                and c not in ("from_address", "sender_address", "to_addresses", "cc_addresses", "start_utc", "end_utc",
                              "organizer_address", "attendee_addresses", "location_name")]
        key = TABLES[table].primary_id if schema == "dataverse" else "id"
        json_cols = set(meta[meta["data_type"] == "JSON"]["column_name"])
        with wh.reader() as conn:  # DuckDB's own Python values (date, Decimal, UUID), not pandas'
            rows = conn.execute(f'select {", ".join(chr(34) + c + chr(34) for c in cols)} from {schema}."{table}"'
                                ).fetchall()
        mine = {}
        for row in rows:
            rec = dict(zip(cols, row, strict=True))
            vals = [json.loads(rec[c]) if c in json_cols and isinstance(rec[c], str) else rec[c] for c in cols]
            mine[str(rec[key])] = _row_hash(vals)
        coll = name if schema == "graph" else table
        theirs = {}
        for (data,) in con.execute(f'select data from "c_{coll}"'):
            rec = json.loads(data)
            if schema == "dataverse":
                t = TABLES[table]
                vals = [rec.get(t.column(c).json_name if t.column(c) else c) for c in cols]
            else:
                vals = [rec.get("@emu.user") if c == "user_id" else rec.get(c) for c in cols]
            theirs[str(rec[key])] = _row_hash(vals)
        assert len(mine) == len(theirs), f"{name}: {len(mine)} rows mirrored, {len(theirs)} in the source"
        diff = [k for k in theirs if mine.get(k) != theirs[k]]
        assert not diff, f"{name}: {len(diff)} rows differ, e.g. {diff[:3]}"
    con.close()


def _mutate(emulator: Any, rnd: random.Random, n: int = 12) -> None:
    """Change the source: the emulator's live-activity generator when present, else Web API writes."""
    try:
        emulator.admin("mutate", {"creates": n, "updates": n, "deletes": n // 2, "seed": rnd.randint(0, 10**6)})
        return
    except Exception:
        pass
    s, h = emulator.session(), emulator.headers("dataverse")
    api = f"{emulator.dataverse_url}/api/data/v9.2"
    con = _store(emulator)
    ids = [r[0] for r in con.execute('select id from "c_account" order by id')]
    cids = [r[0] for r in con.execute('select id from "c_contact" order by id')]
    con.close()
    for i in range(n):
        r = s.post(f"{api}/accounts", json={"name": f"Mutated {rnd.random():.6f}", "revenue": i * 10.5}, headers=h)
        assert r.status_code in (201, 204), r.text
    for rid in rnd.sample(ids, n):
        r = s.patch(f"{api}/accounts({rid})", json={"telephone1": f"+1 555 {rnd.randint(0, 9999):04d}",
                                                    "industrycode": rnd.randint(1, 33)}, headers=h)
        assert r.status_code == 204, r.text
    for rid in rnd.sample(cids, n // 2):
        assert s.delete(f"{api}/contacts({rid})", headers=h).status_code == 204


def test_sync_mirrors_the_emulator_exactly_through_mutate_rounds(emulator: Any, tmp_path: Path) -> None:
    from bridgekit.workbench import Workbench

    wb = Workbench(_profile(emulator, tmp_path / "wh.duckdb"))
    report = wb.sync(progress=False)
    assert report.ok, report.render()
    assert report.table("account").created > 0 and report.table("graph.users").created > 0
    assert report.table("businessunit").message and "change tracking" in report.table("businessunit").message
    _compare(emulator, wb.warehouse)
    rnd = random.Random(7)
    for _ in range(3):
        _mutate(emulator, rnd)
        report = wb.sync(progress=False)
        assert report.ok, report.render()
        assert report.table("account").mode == "delta"
        assert report.changed > 0
        _compare(emulator, wb.warehouse)
    # lookups carry their target table, choices their label (accounts other tests created may have no
    # industry, hence no label), metadata types are kept
    df = wb.sql("select c.parentcustomerid_entitytype as t, a.industrycode_label as l from dataverse.contact c "
                "join dataverse.account a on a.accountid = c.parentcustomerid where a.industrycode is not null limit 1")
    assert df["t"][0] == "account" and isinstance(df["l"][0], str)
    unlabelled = wb.sql("select count(*) as n from dataverse.account where industrycode is not null "
                        "and industrycode_label is null")
    assert unlabelled["n"][0] == 0
    types = dict(wb.sql("select column_name, data_type from duckdb_columns() where table_name = 'account'").values)
    assert types["accountid"] == "UUID" and types["revenue"].startswith("DECIMAL") and types["createdon"].startswith(
        "TIMESTAMP")


_CHILD = textwrap.dedent("""
    import sys
    from bridgekit.config import SyncPlan, load_profile
    from bridgekit.workbench import Workbench, resolve_runtime
    prof = resolve_runtime(load_profile("emulator"))
    prof = prof.with_values(warehouse=sys.argv[1], sync=SyncPlan(tuple(sys.argv[2].split(",")), ("users",),
                                                                 int(sys.argv[3]), partitions=4))
    report = Workbench(prof).sync(progress=False, full=len(sys.argv) > 4)
    print(report.render())
    sys.exit(0 if report.ok else 1)
""")


def _child(warehouse: Path, tables: str, page_size: int, *, full: bool = False) -> subprocess.Popen[str]:
    args = [str(warehouse), tables, str(page_size)] + (["full"] if full else [])
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_points_then_resume_ends_equal_to_the_source(emulator: Any, tmp_path: Path) -> None:
    wh = tmp_path / "chaos.duckdb"
    rnd = random.Random(11)
    tables = "account,contact"
    kills = 0
    # Small pages and a little latency stretch the run so the kills land mid-fetch and mid-merge.
    with emulator.faults(latency_ms=25):
        for round_ in range(4):
            if round_ == 2:
                _mutate(emulator, rnd, 6)
            proc = _child(wh, tables, 25, full=round_ == 3)
            time.sleep(rnd.uniform(1.2, 4.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.communicate(timeout=120)
    assert kills >= 2
    proc = _child(wh, tables, 25)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    warehouse = Warehouse(wh)
    con = _store(emulator)
    for table, key in (("account", "accountid"), ("contact", "contactid")):
        mirrored = warehouse.sql(f"select {key}::varchar as k, _bk_version as v from dataverse.{table}")
        assert mirrored["k"].is_unique
        source = {r[0]: str(r[1]) for r in con.execute(f'select id, version from "c_{table}"')}
        assert dict(zip(mirrored["k"], mirrored["v"], strict=True)) == source
    con.close()


def test_faults_throttling_errors_drops_and_token_expiry_still_end_exact(emulator: Any, tmp_path: Path) -> None:
    from bridgekit.workbench import Workbench

    wb = Workbench(_profile(emulator, tmp_path / "f.duckdb", page_size=200))
    only = ["account", "graph.users"]
    with emulator.faults(throttle_rate=0.3, error_5xx_rate=0.05, drop_rate=0.03, retry_after_s=0, seed=5):
        report = wb.sync(only=only, progress=False)
        assert report.ok, report.render()
        _mutate(emulator, random.Random(3), 5)
        with emulator.faults(throttle_rate=0.3, error_5xx_rate=0.05, drop_rate=0.03, retry_after_s=0, seed=6,
                             force_delta_expiry=True):
            report = wb.sync(only=only, progress=False)
        assert report.ok, report.render()
        assert report.table("account").resynced and report.table("graph.users").resynced
    con = _store(emulator)
    got = wb.sql("select accountid::varchar as k, _bk_version as v from dataverse.account")
    assert dict(zip(got["k"], got["v"], strict=True)) == {r[0]: str(r[1]) for r in con.execute(
        'select id, version from "c_account"')}
    con.close()
    runs = wb.sql("select count(*) as n from bridgekit.sync_runs where resynced")
    assert runs["n"][0] == 2


def test_reads_during_a_sync_see_a_whole_run_and_a_second_sync_fails_clearly(emulator: Any, tmp_path: Path) -> None:
    from bridgekit.workbench import Workbench

    path = tmp_path / "c.duckdb"
    wb = Workbench(_profile(emulator, path, page_size=100))
    wb.sync(only=["account", "contact"], progress=False)
    # The child reloads both tables in full, so every row it writes carries its run id.
    proc = _child(path, "account,contact", 100, full=True)
    query = ("select count(distinct r) as runs, min(r) as run from (select _bk_run_id as r from dataverse.account "
             "union all select _bk_run_id from dataverse.contact)")
    lock = Warehouse(path).lock_path
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # until the child holds the sync lock
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            break
        time.sleep(0.02)
    seen = set()
    second_error = None
    while proc.poll() is None and time.monotonic() < deadline:
        df = wb.sql(query)
        seen.add((int(df["runs"][0]), str(df["run"][0])))
        if second_error is None:
            try:
                wb.sync(only=["account"], progress=False)
            except SyncError as exc:
                second_error = exc
        time.sleep(0.05)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert second_error is not None and "another sync (pid" in str(second_error)
    # Each query saw one run's data in both tables: before the child's merge or after it, never a mix.
    assert seen and all(runs == 1 for runs, _ in seen)
    final = wb.sql(query)
    assert int(final["runs"][0]) == 1


def test_cli_sync_sql_export(emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.cli.main import cli

    toml = tmp_path / "bridgekit.toml"
    toml.write_text(textwrap.dedent(f"""
        [profiles.local]
        auth = "emulator"
        warehouse = "{tmp_path / 'cli.duckdb'}"
        sync = {{ dataverse = ["team", "transactioncurrency"], graph = ["groups"] }}
    """))
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(toml))
    runner = CliRunner()
    res = runner.invoke(cli, ["--profile", "local", "sync"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "dataverse.team" in res.output and "graph.groups" in res.output
    res = runner.invoke(cli, ["--profile", "local", "sync", "--only", "team", "--quiet"])
    assert res.exit_code == 0 and res.output == ""
    res = runner.invoke(cli, ["--profile", "local", "sql", "select count(*) as n from graph.groups", "--format", "csv"])
    assert res.exit_code == 0 and res.output.splitlines()[0] == "n" and int(res.output.splitlines()[1]) > 0
    res = runner.invoke(cli, ["--profile", "local", "sql", "select name from dataverse.team limit 2", "--format", "json"])
    assert res.exit_code == 0 and len(json.loads(res.output)) == 2
    res = runner.invoke(cli, ["--profile", "local", "export", "--to", str(tmp_path / "out")])
    assert res.exit_code == 0 and (tmp_path / "out" / "graph" / "groups.parquet").exists()
    res = runner.invoke(cli, ["--profile", "local", "sync", "--only", "nosuch"])
    assert res.exit_code != 0



# -- reading fast: read-ahead links, Arrow-shaped pages, partitions, thread switching ----------------------


def test_next_links_read_off_raw_pages_only_when_certain() -> None:
    from bridgekit.sources.dataverse import _scan_next_link

    link = "https://org.example/api/data/v9.2/accounts?$select=name&$skiptoken=%3Ccookie%20pagenumber=%222%22/%3E"
    page = json.dumps({"@odata.context": "x", "value": [{"name": "a"}], "@odata.nextLink": link}).encode()
    assert _scan_next_link(page) == link
    assert _scan_next_link(page.replace(b'":', b'" :  ')) == link  # white space around the colon
    # A row's text that spells the member name is escaped inside its string, so it never matches.
    tricky = json.dumps({"value": [{"description": '"@odata.nextLink":"https://evil"'}]}).encode()
    assert _scan_next_link(tricky) is None
    # An escape inside the link: left to the decoder rather than guessed.
    assert _scan_next_link(json.dumps({"value": [], "@odata.nextLink": "https://a/b"}).replace("/", "\\/").encode()) \
        is None
    assert _scan_next_link(json.dumps({"value": [], "@odata.deltaLink": link}).encode()) is None


def test_arrow_shaped_pages_equal_python_shaped_pages_for_every_table(emulator: Any, tmp_path: Path) -> None:
    """Full-read pages are shaped by Arrow's JSON reader; every value, label, lookup target and version
    must be what the row-by-row path makes of the same bytes."""
    from bridgekit.sources import DataverseSource, RawPage
    from bridgekit.workbench import Workbench

    wb = Workbench(_profile(emulator, tmp_path / "a.duckdb"))
    checked = 0
    for name in ("account", "contact", "lead", "opportunity", "systemuser", "email", "appointment", "phonecall",
                 "task", "activitypointer"):
        src = DataverseSource(wb.dataverse, name, page_size=300)
        spec = src.spec()
        cursor: str | None = "T|" + src._url()
        while cursor is not None:
            raw = src.fetch(cursor)
            if isinstance(raw.body, bytes):
                fast = src.shape(raw)
                slow = src.shape(RawPage(json.loads(raw.body), raw.next, raw.cursor))
                assert isinstance(fast.rows, pa.Table) and isinstance(slow.rows, pa.Table)
                assert fast.rows.num_rows == slow.rows.num_rows > 0
                for col in spec.columns:
                    assert fast.rows.column(col.name).to_pylist() == slow.rows.column(col.name).to_pylist(), \
                        f"{name}.{col.name}"
                assert list(fast.versions.to_pylist()) == list(slow.versions or [])  # type: ignore[union-attr]
                assert (fast.next, fast.token, fast.deletes) == (slow.next, slow.token, slow.deletes)
                checked += 1
            cursor = raw.next
    assert checked >= 10


def test_a_read_ahead_link_that_differs_from_the_page_stops_before_staging(emulator: Any, tmp_path: Path) -> None:
    from bridgekit.sources import DataverseSource, RawPage
    from bridgekit.workbench import Workbench

    wb = Workbench(_profile(emulator, tmp_path / "m.duckdb"))
    src = DataverseSource(wb.dataverse, "contact", page_size=100)
    raw = src.fetch("T|" + src._url())
    assert isinstance(raw.body, bytes) and raw.next is not None
    for body in (raw.body, json.loads(raw.body)):
        with pytest.raises(SyncError, match="read ahead differs"):
            src.shape(RawPage(body, raw.next + "&tampered=1", raw.cursor))


def test_small_pages_read_ahead_and_arrow_shaped_mirror_the_emulator_exactly(emulator: Any, tmp_path: Path) -> None:
    from bridgekit.workbench import Workbench

    wb = Workbench(_profile(emulator, tmp_path / "s.duckdb", page_size=150, partitions=1))
    report = wb.sync(progress=False)
    assert report.ok, report.render()
    assert report.table("contact").pages > 3
    _compare(emulator, wb.warehouse)


class _CappedCount:
    """The emulator's Dataverse client, except that ``$count`` answers 5,000 as it does for a large table."""

    def __init__(self, client: Any, *, snapshot: bool) -> None:
        self._client = client
        self._snapshot = snapshot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def count(self, table: str, **_kw: Any) -> int:
        return 5000

    def total_record_counts(self, tables: list[str]) -> dict[str, int]:
        if not self._snapshot:
            raise SyncError("RetrieveTotalRecordCount is not available")
        # The snapshot of a large table (RetrieveTotalRecordCount is not capped).
        return {t: n + 20000 for t, n in self._client.total_record_counts(tables).items()}


@pytest.mark.parametrize("snapshot", [True, False])
def test_a_table_whose_count_is_capped_is_still_read_in_partitions(emulator: Any, tmp_path: Path,
                                                                   snapshot: bool) -> None:
    from bridgekit.sources import DataverseSource
    from bridgekit.workbench import Workbench

    wb = Workbench(_profile(emulator, tmp_path / "p.duckdb", page_size=5000))
    src = DataverseSource(_CappedCount(wb.dataverse, snapshot=snapshot), "contact", page_size=5000)
    plan = src.plan_full(4)
    assert len(plan.cursors) == 4 and plan.token is not None
    assert plan.estimate == (wb.dataverse.total_record_counts(["contact"])["contact"] + 20000 if snapshot else 5000)
    engine = SyncEngine(wb.warehouse, ["dataverse.contact"], lambda _t: src, concurrency=4, progress=False)
    report = engine.run()
    assert report.ok, report.render()
    con = _store(emulator)
    source = {r[0]: str(r[1]) for r in con.execute('select id, version from "c_contact"')}
    con.close()
    got = wb.sql("select contactid::varchar as k, _bk_version as v from dataverse.contact")
    assert got["k"].is_unique and dict(zip(got["k"], got["v"], strict=True)) == source


def test_a_sync_shortens_the_thread_switch_interval_and_restores_it(tmp_path: Path) -> None:
    seen: list[float] = []

    class Watching(MemorySource):
        def page(self, cursor: str) -> Page:
            seen.append(sys.getswitchinterval())
            return super().page(cursor)

    before = sys.getswitchinterval()
    report = _engine(tmp_path, Watching()).run()
    assert report.ok
    assert seen and max(seen) <= 0.0005 < before
    assert sys.getswitchinterval() == before
