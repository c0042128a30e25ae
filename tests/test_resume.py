"""A sync that exits 0 is current: resumed pages are caught up, kills under faults end equal to a fresh full sync."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridgekit.sources import FullPlan, Page
from bridgekit.warehouse import Warehouse
from tests.test_sync import MemorySource, _engine, _expected, _mirror

# -- in memory: what a resumed table must end with ----------------------------------------------------------


class Keyset(MemorySource):
    """:class:`MemorySource` paging its full reads by key (as the services do), not by offset: a row deleted
    between two pages does not shift the rows after it out of the read."""

    def plan_full(self, partitions: int) -> FullPlan:
        return FullPlan([f"keyset:{p}:{partitions}:" for p in range(partitions)], token=f"{self.version}")

    def page(self, cursor: str) -> Page:
        if not cursor.startswith("keyset:"):
            return super().page(cursor)
        self._tick()
        _kind, part, parts, after = cursor.split(":")
        ids = sorted(r for r in self.rows if int(r[-4:], 16) % int(parts) == int(part) and r > after)
        chunk = ids[:self.page_size]
        more = len(ids) > self.page_size
        return Page(rows=[dict(self.rows[r]) for r in chunk],
                    next=f"keyset:{part}:{parts}:{chunk[-1]}" if more else None)


class SingleRead(Keyset):
    """A tracked table read in one partition whose delta link arrives on its last page (a small
    Dataverse table): the link is the version seen by the first page, as the service's snapshot is."""

    def plan_full(self, partitions: int) -> FullPlan:
        return FullPlan([f"single:{self.version}:"])

    def page(self, cursor: str) -> Page:
        if not cursor.startswith("single:"):
            return super().page(cursor)
        self._tick()
        _kind, since, after = cursor.split(":")
        ids = sorted(r for r in self.rows if r > after)
        chunk = ids[:self.page_size]
        more = len(ids) > self.page_size
        return Page(rows=[dict(self.rows[r]) for r in chunk],
                    next=f"single:{since}:{chunk[-1]}" if more else None, token=None if more else since)


def _change(src: MemorySource, rnd: random.Random) -> None:
    ids = sorted(src.rows)
    for rid in rnd.sample(ids, 4):
        src.upsert(rid, f"changed {rnd.random():.4f}", rnd.randint(0, 999))
    for rid in rnd.sample(ids, 3):
        src.delete(rid)
    for _ in range(3):
        src.upsert(str(uuid.UUID(int=rnd.getrandbits(128))), "created", 1)


@pytest.mark.parametrize("kind", [Keyset, SingleRead])
def test_a_table_staged_before_a_crash_is_caught_up_before_it_is_merged(tmp_path: Path, kind: type) -> None:
    first, second = kind("widget", n=30), MemorySource("gadget", n=40)
    eng = _engine(tmp_path, first, second)
    second.fail_at = 3  # the widget is fully staged, the gadget dies mid-fetch
    with pytest.raises(RuntimeError):
        eng.run()
    second.fail_at = None
    _change(first, random.Random(1))
    _change(second, random.Random(2))
    report = _engine(tmp_path, first, second).run()
    assert report.ok and report.table("widget").resumed and report.table("gadget").resumed
    assert _mirror(eng.warehouse) == _expected(first)
    assert _mirror(eng.warehouse, "dataverse.gadget") == _expected(second)
    runs = eng.warehouse.sql("select table_name, caught_up from bridgekit.sync_runs order by table_name")
    assert list(runs["caught_up"]) == [True, True]
    assert "caught up" in (report.table("widget").message or "")


@pytest.mark.parametrize("kind", [Keyset, SingleRead])
def test_a_crash_in_every_round_still_ends_current(tmp_path: Path, kind: type) -> None:
    """Crashes mid-load, mid-catch-up and mid-delta, with changes in between, then one run that completes."""
    src = kind("widget", n=60)
    rnd = random.Random(5)
    crashes = 0
    for fail_at in (4, 9, 2, 13, 1, 6, 3):
        src.fail_at = fail_at
        try:
            _engine(tmp_path, src).run()
        except RuntimeError:
            crashes += 1
        _change(src, rnd)
    src.fail_at = None
    assert crashes >= 3
    eng = _engine(tmp_path, src)
    assert eng.run().ok
    assert _mirror(eng.warehouse) == _expected(src)


def test_an_untracked_table_staged_before_a_crash_is_reloaded(tmp_path: Path) -> None:
    src, other = MemorySource("gadget", tracked=False), MemorySource("widget")
    eng = _engine(tmp_path, src, other)
    other.fail_at = 2
    with pytest.raises(RuntimeError):
        eng.run()
    other.fail_at = None
    src.delete(sorted(src.rows)[0])
    src.upsert(sorted(src.rows)[1], "changed", 7)
    assert _engine(tmp_path, src, other).run().ok
    assert _mirror(eng.warehouse, "dataverse.gadget") == _expected(src)


def test_pages_already_merged_by_a_killed_process_are_not_merged_again(tmp_path: Path, monkeypatch: Any) -> None:
    """A process that merged and died before clearing its staging: the next run goes on from the stored link."""
    from bridgekit.warehouse import Staging

    src = MemorySource(n=20)
    eng = _engine(tmp_path, src)
    monkeypatch.setattr(Staging, "discard", lambda self, *tables: None)  # "dies" before clearing staging
    eng.run()
    monkeypatch.undo()
    _change(src, random.Random(3))
    report = _engine(tmp_path, src).run()
    assert report.ok and report.table("widget").mode == "delta"
    assert _mirror(eng.warehouse) == _expected(src)


def test_a_watcher_restarted_after_a_crash_is_current_from_its_first_report(tmp_path: Path) -> None:
    first, second = SingleRead("widget", n=30), MemorySource("gadget", n=30)
    second.fail_at = 2
    with pytest.raises(RuntimeError):
        _engine(tmp_path, first, second).watch(interval=0.01)
    second.fail_at = None
    _change(first, random.Random(8))
    eng = _engine(tmp_path, first, second)
    stop = threading.Event()
    reports: list[Any] = []

    def on_report(report: Any) -> None:
        reports.append(report)
        # Read while the watcher is stopped at its first report: nothing newer has been polled yet.
        reports.append(_mirror(eng.warehouse))
        stop.set()

    eng.watch(interval=0.01, on_report=on_report, stop=stop)
    assert reports[0].ok and reports[0].table("widget").resumed
    assert reports[1] == _expected(first)


def test_freshness_reads_the_position_the_data_reached(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from bridgekit.monitor import Monitor

    src = MemorySource(n=5)
    eng = _engine(tmp_path, src)
    eng.run()
    wh = eng.warehouse
    # Data that reached its position two hours ago, although the run that merged it ended just now.
    import duckdb

    with duckdb.connect(str(wh.path)) as con:
        con.execute("update bridgekit.sync_state set position_at = position_at - interval 2 hour")

    plan = SimpleNamespace(sync=SimpleNamespace(dataverse=("widget",), graph=()))
    mon = Monitor(SimpleNamespace(warehouse=wh, sql=wh.sql, profile=plan), now=datetime.now(UTC) + timedelta(minutes=1))
    section = mon.freshness(slo_minutes=60)
    check = section.checks[0]
    assert check.status == "red" and 120 <= check.measures["age_minutes"] < 125
    assert "data reached" in check.finding


# -- against the emulator: the reported sequence, through the CLI ------------------------------------------

_KILLABLE = textwrap.dedent("""
    import os, sys, time
    from bridgekit import sync, warehouse
    from bridgekit.cli.main import main
    marker, table, pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # A delta larger than this many rows checkpoints page by page (smaller ones stage in one transaction).
    sync.DELTA_COMMIT_ROWS = int(os.environ.get("BK_TEST_DELTA_COMMIT_ROWS", sync.DELTA_COMMIT_ROWS))
    write_pages = warehouse.Staging.write_pages  # write_page goes through it too
    def checkpoint(self, state, *args, **kw):
        write_pages(self, state, *args, **kw)
        if state.table == table and state.pages >= pages:
            open(marker, "w").write("staged")  # staged (committed unless a small delta's transaction): kill
            time.sleep(600)
    warehouse.Staging.write_pages = checkpoint
    sys.exit(main(sys.argv[4:]))
""")


def _config(tmp_path: Path, name: str, *, page_size: int = 200) -> Path:
    toml = tmp_path / f"{name}.toml"
    toml.write_text(textwrap.dedent(f"""
        [profiles.local]
        auth = "emulator"
        warehouse = "{tmp_path / (name + '.duckdb')}"
        sync = {{ dataverse = ["account", "contact"], graph = ["users", "messages"], page_size = {page_size} }}
    """))
    return toml


def _env(toml: Path) -> dict[str, str]:
    return {**os.environ, "BRIDGEKIT_CONFIG": str(toml), "BRIDGEKIT_PROFILE": "local",
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _kill_at_checkpoint(toml: Path, table: str, pages: int, args: list[str], *,
                        delta_commit_rows: int | None = None) -> None:
    """Run ``bridgekit <args>`` and SIGKILL it once ``table`` has ``pages`` pages staged (at most 120 s).

    ``delta_commit_rows`` overrides how many rows a delta run stages before it checkpoints page by page.
    """
    marker = toml.with_suffix(".staged")
    marker.unlink(missing_ok=True)
    env = _env(toml)
    if delta_commit_rows is not None:
        env["BK_TEST_DELTA_COMMIT_ROWS"] = str(delta_commit_rows)
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(marker), table, str(pages), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the sync ended before {table} reached page {pages}: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _bridgekit(toml: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridgekit", *args], env=_env(toml), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _tables(path: Path) -> dict[str, set[tuple[Any, ...]]]:
    """Every mirrored table as a set of rows (all columns but when and by which run it was written)."""
    wh = Warehouse(path)
    out: dict[str, set[tuple[Any, ...]]] = {}
    with wh.reader() as conn:
        names = conn.execute("select schema_name, table_name from duckdb_tables() "
                             "where schema_name in ('dataverse', 'graph') order by 1, 2").fetchall()
        for schema, table in names:
            cols = [c for (c,) in conn.execute("select column_name from duckdb_columns() where schema_name = ? "
                                               "and table_name = ? order by column_index", [schema, table]).fetchall()
                    if c not in ("_bk_synced_at", "_bk_run_id")]
            rows = conn.execute(f'select {", ".join(chr(34) + c + chr(34) for c in cols)} from {schema}."{table}"'
                                ).fetchall()
            out[f"{schema}.{table}"] = {tuple(str(v) for v in r) for r in rows}
    return out


def _assert_same(mine: Path, fresh: Path) -> None:
    a, b = _tables(mine), _tables(fresh)
    assert sorted(a) == sorted(b)
    for table in a:
        lost, extra = b[table] - a[table], a[table] - b[table]
        assert not lost and not extra, f"{table}: {len(lost)} rows missing or different, {len(extra)} stale"


def test_a_sync_resumed_after_a_kill_exits_0_with_what_changed_meanwhile(emulator: Any, tmp_path: Path) -> None:
    """Killed with account fully staged and messages mid-fetch; 1,100 changes; the resumed sync is current."""
    toml = _config(tmp_path, "stale", page_size=50)
    only = "account,graph.messages"
    _kill_at_checkpoint(toml, "graph.messages", 3, ["sync", "--only", only])
    emulator.admin("mutate", {"creates": 200, "updates": 800, "deletes": 100, "seed": 14})
    resumed = _bridgekit(toml, "sync", "--only", only)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("dataverse.account"))
    assert "resumed" in line and "caught up" in line
    fresh = _config(tmp_path, "fresh")
    assert _bridgekit(fresh, "sync", "--only", only, "--full").returncode == 0
    _assert_same(tmp_path / "stale.duckdb", tmp_path / "fresh.duckdb")
    caught = Warehouse(tmp_path / "stale.duckdb").sql(
        "select table_name from bridgekit.sync_runs where caught_up order by 1")
    assert list(caught["table_name"]) == ["dataverse.account", "graph.messages"]


def _kill_somewhere(toml: Path, rnd: random.Random, args: list[str], at: tuple[str, int] | None = None) -> bool:
    """Run ``bridgekit <args>`` and SIGKILL it at a seeded random moment: after a random checkpoint (or the
    one ``at`` names), or after a random time (mid-fetch, mid-catch-up or mid-merge). False when it ended first
    (a checkpoint that never comes, e.g. in a one-page delta, ends the wait after 20 s)."""
    marker = toml.with_suffix(".staged")
    marker.unlink(missing_ok=True)
    if at is None and rnd.random() < 0.5:
        at = rnd.choice(["dataverse.account", "dataverse.contact", "graph.messages"]), rnd.randint(1, 6)
    table, pages = at or ("-", 0)
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(marker), table, str(pages), *args],
                            env=_env(toml), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + (20 if pages else rnd.uniform(1.5, 6.0))
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return killed


def test_kills_under_faults_with_changes_between_end_equal_to_a_fresh_full_sync(emulator: Any,
                                                                                tmp_path: Path) -> None:
    """Five kills of syncs and watchers under throttling and 5xx, the tenant changing between them; then one
    sync that exits 0 leaves exactly what a fresh full sync into another warehouse holds, with no further run."""
    toml = _config(tmp_path, "chaos", page_size=50)
    only = "account,contact,graph.users,graph.messages"
    rnd = random.Random(1414)
    kills = 0
    with emulator.faults(throttle_rate=0.15, error_5xx_rate=0.05, retry_after_s=0, latency_ms=5, seed=14):
        for round_ in range(6):
            args = ["sync", "--only", only] + (["--watch", "--interval", "0.2"] if round_ in (2, 4) else [])
            # The last kill lands in a full reload with account and contact staged and messages mid-fetch.
            at = ("graph.messages", 3) if round_ == 5 else None
            kills += _kill_somewhere(toml, rnd, args + (["--full"] if at else []), at)
            emulator.admin("mutate", {"creates": 30, "updates": 90, "deletes": 15, "seed": rnd.randint(0, 10**6)})
        assert kills >= 4
        final = _bridgekit(toml, "sync", "--only", only)
    assert final.returncode == 0, final.stderr[-2000:]
    resumed = [x for x in final.stdout.splitlines() if x.startswith(("dataverse.", "graph.")) and "resumed; caught up" in x]
    assert len(resumed) == 4, final.stdout
    fresh = _config(tmp_path, "fresh", page_size=5000)
    done = _bridgekit(fresh, "sync", "--only", only, "--full")
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same(tmp_path / "chaos.duckdb", tmp_path / "fresh.duckdb")
