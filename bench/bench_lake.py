"""Lake copy benchmarks (issue #20): initial load, changes until visible in the lake, small files and compaction.

Each scenario starts a private emulator (temporary home, free port) and, for the Azure target, Azurite on
loopback (the pinned version `make azurite` installs; see tests/azurite.py), and prints markdown:

1. **Initial load** (``--scale``, default ``large``: ~1M Dataverse rows). A full sync of the Dataverse tables
   of the default plan and activitypointer into DuckDB (as bench_sync.py's full sync), then the lake's first
   publish of the same warehouse (one Delta table per table, written from DuckDB's Arrow stream) to a local
   path and to Azurite, each in a fresh process. Reported next to the DuckDB full sync's time.
2. **Changes until visible in the lake** (``--delta-scale``, default ``medium``). A ``bridgekit sync --watch
   --interval 0.2`` process (the default plan, the profile's lake set) runs; ``bridgekit emulator mutate`` makes
   ``--changes`` changes in one transaction; the clock runs from the emulator's commit until every change in the
   synced tables reads back from the Delta tables with deltalake (created and updated rows carrying a sync run
   that started after the commit, deleted rows gone). Target < 5 s. The same watcher without a lake, clocked
   until the changes are visible in DuckDB, runs first on the same emulator: the baseline of the same run.
   ``--graph`` narrows the Graph resources (the mailbox deltas dominate the default plan's poll).
3. **Small files** (same emulator). ``--polls`` watch polls (the watcher's own poll: a delta run, then the lake
   publish), each after a small ``mutate`` (``--poll-changes`` changes), then ``bridgekit lake optimize``: the
   lake's files (those the current versions read, and those stored) before and after. The benchmark's lake sets
   ``retention_hours = 0`` so that the vacuum's effect shows within the run (the default is 168 h).

Usage: ``.venv/bin/python bench/bench_lake.py [--scale large] [--delta-scale medium] [--changes 10000]
[--polls 100] [--poll-changes 50] [--targets local,azurite] [--graph users,groups,messages,events] [--skip-initial]
[--skip-delta]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sync import _SYNC, BENCH_TABLES, Emulator, _child, mutate, wait_visible  # noqa: E402

from bridgekit.config import DEFAULT_DATAVERSE_TABLES, DEFAULT_GRAPH_RESOURCES, LakeTarget  # noqa: E402

_KEY_ENV = "BK_BENCH_LAKE_ACCOUNT_KEY"

_PUBLISH = textwrap.dedent("""
    import sys, time, resource
    from bridgekit.config import LakeTarget
    from bridgekit.lake import Lake
    from bridgekit.warehouse import Warehouse
    target = LakeTarget(url=sys.argv[2], auth=sys.argv[3], account_name=sys.argv[4] or None,
                        account_key_env=sys.argv[5] or None, endpoint=sys.argv[6] or None, optimize_every=0)
    t = time.perf_counter()
    commits = Lake(target).publish(Warehouse(sys.argv[1]))
    assert all(c.mode == "create" for c in commits), commits
    print(sum(c.upserted for c in commits), len(commits), time.perf_counter() - t,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


class Target:
    """Where a benchmark lake lives: a local path, or a fresh container in a running Azurite."""

    def __init__(self, kind: str, work: Path, azurite: Any = None) -> None:
        self.kind, self.azurite = kind, azurite
        if kind == "local":
            self.target = LakeTarget(url=str(work / f"lake-{uuid.uuid4().hex[:6]}"), optimize_every=0,
                                     retention_hours=0)
            return
        from tests.azurite import ACCOUNT

        self.container = f"bench{uuid.uuid4().hex[:10]}"
        azurite.create_container(self.container)
        self.target = LakeTarget(url=f"abfss://{self.container}@{ACCOUNT}.dfs.core.windows.net/bridgekit", auth="key",
                                 account_name=ACCOUNT, account_key_env=_KEY_ENV, endpoint=azurite.endpoint,
                                 optimize_every=0, retention_hours=0)

    def args(self) -> list[str]:
        t = self.target
        return [t.url, t.auth, t.account_name or "", t.account_key_env or "", t.endpoint or ""]

    def toml(self) -> str:
        t = self.target
        lines = [f'url = "{t.url}"', "optimize_every = 0", "retention_hours = 0"]
        if t.endpoint:
            lines += [f'endpoint = "{t.endpoint}"', f'account_key_env = "{t.account_key_env}"']
        return "\n".join(lines) + "\n"

    def stored_parquet(self) -> int:
        """Data files in storage (whether or not a current version reads them; the log's checkpoints not counted)."""
        if self.kind == "local":
            names = [str(p) for p in Path(self.target.url).rglob("*.parquet")]
        else:
            names = self.azurite.list_blobs(self.container, "bridgekit/")
        return sum(n.endswith(".parquet") and "_delta_log/" not in n for n in names)


@contextlib.contextmanager
def _azurite(kinds: list[str], work: Path) -> Iterator[Any]:
    """Azurite under ``work`` while the block runs, when ``kinds`` has it (None otherwise)."""
    if "azurite" not in kinds:
        yield None
        return
    from tests.azurite import DEV_KEY, Azurite

    os.environ[_KEY_ENV] = DEV_KEY  # the key reaches bridgekit by the name of a variable, as a real one does
    azurite = Azurite(work / "azurite")
    try:
        yield azurite
    finally:
        azurite.stop()


def initial(scale: str, kinds: list[str]) -> None:
    """Scenario 1: the DuckDB full sync, then the lake's first publish of the same warehouse."""
    tables = ",".join(BENCH_TABLES)
    with Emulator(scale) as emu:
        wh = emu.home / "initial.duckdb"
        fetched, sync_s, _rss = _child(_SYNC, tables, str(wh)).split()[-3:]  # bench_sync's full sync
        rows = [f"| DuckDB full sync (`bridgekit sync`, warehouse only) | {int(fetched):,} | {float(sync_s):.1f} "
                f"| 1.00x | |"]
        with _azurite(kinds, emu.home) as azurite:
            for kind in kinds:
                target = Target(kind, emu.home, azurite)
                n, count, secs, rss = _child(_PUBLISH, str(wh), *target.args()).split()[-4:]
                where = "local path" if kind == "local" else "Azurite (abfss:// through its Blob endpoint)"
                rows.append(f"| first lake publish, {where}: {count} Delta tables | {int(n):,} | {float(secs):.1f} | "
                            f"{float(secs) / float(sync_s):.2f}x | {rss} |")
                print(rows[-1], file=sys.stderr, flush=True)
    shutil.rmtree(emu.home, ignore_errors=True)
    print(f"## Lake: initial load ({scale} scale: the Dataverse tables of the default plan and activitypointer)\n")
    print("| step | rows | seconds | vs the DuckDB full sync | peak RSS MB |\n|---|---:|---:|---:|---:|")
    print("\n".join(rows) + "\n")


def _delta_checks(result: dict[str, Any], graph: tuple[str, ...]) -> list[tuple[str, str, list[str], str]]:
    from bridgekit.emulator.schema import TABLES

    checks = []
    for kind in ("created", "updated", "deleted"):
        for coll, ids in result[kind].items():
            if coll.startswith("graph."):
                if coll.removeprefix("graph.") in graph:
                    checks.append((coll, "id", list(ids), kind))
            elif coll in DEFAULT_DATAVERSE_TABLES:
                checks.append((f"dataverse.{coll}", TABLES[coll].primary_id, list(ids), kind))
    return checks


def _fresh_runs(wh: Path, committed: float) -> set[str]:
    import duckdb

    try:
        with duckdb.connect(str(wh), read_only=True) as c:
            return {r[0] for r in c.execute("select distinct run_id from bridgekit.sync_runs "
                                            "where epoch(started_at) >= ?", [committed]).fetchall()}
    except duckdb.Error:
        return set()


class _ReadBack:
    """Reads the changes back from the Delta tables as a reader polling the lake would: one DeltaTable per
    table, brought up to date each pass (only the new log entries are read), read again only when its version
    moved; a table whose changes all read back is not read again."""

    def __init__(self, lake: Any, checks: list[tuple[str, str, list[str], str]]) -> None:
        self.lake, self.checks = lake, checks
        self.tables: dict[str, Any] = {}
        self.seen_version: dict[str, tuple[int, int]] = {}  # (version, fresh runs known) at the last failed check
        self.done: set[int] = set()

    def current(self, wh: Path, committed: float) -> bool:
        """Every change reads back, written by runs of the warehouse ``wh`` that started after ``committed``."""
        return self.visible(_fresh_runs(wh, committed))

    def visible(self, fresh: set[str]) -> bool:
        import pyarrow as pa
        import pyarrow.compute as pc
        from deltalake import DeltaTable

        for i, (table, pk, ids, kind) in enumerate(self.checks):
            if i in self.done:
                continue
            dtable = self.tables.get(table)
            if dtable is None:
                dtable = self.tables[table] = DeltaTable(self.lake.table_uri(table),
                                                         storage_options=self.lake.storage_options())
            else:
                dtable.update_incremental()
            if self.seen_version.get(table) == (dtable.version(), len(fresh)):
                return False  # nothing new since this table last failed the check
            data = dtable.to_pyarrow_table(columns=[pk, "_bk_run_id"])
            hit = data.filter(pc.is_in(data.column(pk).cast(pa.string()), value_set=pa.array(ids, pa.string())))
            if kind == "deleted":
                ok = hit.num_rows == 0
            else:
                ok = hit.num_rows == len(ids) and set(hit.column("_bk_run_id").to_pylist()) <= fresh
            if not ok:
                self.seen_version[table] = (dtable.version(), len(fresh))
                return False
            self.done.add(i)
        return True


def _last_commit(lake: Any, checks: list[tuple[str, str, list[str], str]], committed: float) -> float:
    """Seconds from the emulator's commit to the newest Delta commit of the tables the changes touched."""
    from deltalake import DeltaTable

    newest = committed
    for table in {c[0] for c in checks}:
        for entry in DeltaTable(lake.table_uri(table), storage_options=lake.storage_options()).history(3):
            if entry.get("operation") in ("MERGE", "WRITE"):
                newest = max(newest, float(entry["timestamp"]) / 1000)
    return newest - committed


def _warehouse_only(emu: Emulator, changes: int, seed: int, graph: tuple[str, ...]) -> str:
    """The same watcher and clock without a lake: until the changes are visible in DuckDB (the baseline)."""
    from bench_sync import _all_visible

    wh = emu.home / "watch-none.duckdb"
    config = emu.home / "none.toml"
    config.write_text(f'[profiles.lakebench]\nauth = "emulator"\nwarehouse = "{wh}"\n{_plan(graph)}')
    env = {**os.environ, "BRIDGEKIT_CONFIG": str(config), "BRIDGEKIT_PROFILE": "lakebench"}
    proc = subprocess.Popen([sys.executable, "-m", "bridgekit", "sync", "--watch", "--interval", "0.2", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=emu.home)
    try:
        t = time.perf_counter()
        while not _fresh_runs(wh, 0) or len(_tables_done(wh)) < len(DEFAULT_DATAVERSE_TABLES) + len(graph):
            time.sleep(0.5)
            if time.perf_counter() - t > 900:
                raise SystemExit("the watcher did not finish its first run")
        first = time.perf_counter() - t
        time.sleep(2.0)
        result = mutate(emu, changes, seed)
        committed = float(result["committed_at"])
        checks = _delta_checks(result, graph)
        seen = wait_visible(partial(_all_visible, wh, checks, committed), committed, deadline=committed + 120)
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    shown = f"**{seen:.2f}**" if seen is not None else "**not within 120 s**"
    in_plan = sum(len(c[2]) for c in checks)
    return f"| none (DuckDB only, the baseline) | {changes:,} | {in_plan:,} | {shown} | | {first:.1f} |"


def _tables_done(wh: Path) -> set[str]:
    import duckdb

    try:
        with duckdb.connect(str(wh), read_only=True) as c:
            return {r[0] for r in c.execute("select distinct table_name from bridgekit.sync_runs "
                                            "where status = 'ok'").fetchall()}
    except duckdb.Error:
        return set()


def _wait_until_published(lake: Any, tables: list[str], wh: Path, timeout: float = 900) -> None:
    from deltalake import DeltaTable

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for t in tables:
                DeltaTable(lake.table_uri(t), storage_options=lake.storage_options())
            time.sleep(1.0)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("the watcher did not publish its first run to the lake")


def _plan(graph: tuple[str, ...]) -> str:
    """The profile's sync plan: the default Dataverse tables and ``graph``."""
    return f"sync = {{ graph = [{', '.join(repr(g) for g in graph)}] }}\n".replace("'", '"')


def delta(scale: str, kinds: list[str], changes: int, polls: int, poll_changes: int,
          graph: tuple[str, ...] = DEFAULT_GRAPH_RESOURCES) -> None:
    """Scenarios 2 and 3 on one emulator, per target."""
    from bridgekit.config import load_profile
    from bridgekit.lake import Lake
    from bridgekit.workbench import Workbench, resolve_runtime

    tables = [f"dataverse.{t}" for t in DEFAULT_DATAVERSE_TABLES] + [f"graph.{r}" for r in graph]
    latency_rows: list[str] = []
    file_rows: list[str] = []
    with Emulator(scale) as emu:
        latency_rows.append(_warehouse_only(emu, changes, 69, graph))
        print(latency_rows[-1], file=sys.stderr, flush=True)
        with _azurite(kinds, emu.home) as azurite:
            for i, kind in enumerate(kinds):
                target = Target(kind, emu.home, azurite)
                wh = emu.home / f"watch-{kind}.duckdb"
                config = emu.home / f"lake-{kind}.toml"
                config.write_text(f'[profiles.lakebench]\nauth = "emulator"\nwarehouse = "{wh}"\n{_plan(graph)}\n'
                                  f"[profiles.lakebench.lake]\n{target.toml()}")
                env = {**os.environ, "BRIDGEKIT_CONFIG": str(config), "BRIDGEKIT_PROFILE": "lakebench"}
                lake = Lake(target.target)
                # 2. --watch with the lake: 10,000 changes until they read back from the Delta tables
                proc = subprocess.Popen([sys.executable, "-m", "bridgekit", "sync", "--watch", "--interval", "0.2",
                                         "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, cwd=emu.home)
                try:
                    t = time.perf_counter()
                    _wait_until_published(lake, tables, wh)
                    first = time.perf_counter() - t
                    time.sleep(2.0)  # a poll or two with nothing to do before the clock starts
                    result = mutate(emu, changes, 70 + i)
                    committed = float(result["committed_at"])
                    checks = _delta_checks(result, graph)
                    in_plan = sum(len(c[2]) for c in checks)
                    reader = _ReadBack(lake, checks)
                    seen = wait_visible(partial(reader.current, wh, committed), committed,
                                        deadline=committed + 120, step=0.05)
                    shown = f"**{seen:.2f}**" if seen is not None else "**not within 120 s**"
                    where = "local path" if kind == "local" else "Azurite"
                    latency_rows.append(f"| {where} | {changes:,} | {in_plan:,} | {shown} | "
                                        f"{_last_commit(lake, checks, committed):.2f} | {first:.1f} |")
                    print(latency_rows[-1], file=sys.stderr, flush=True)
                finally:
                    proc.terminate()
                    _, err = proc.communicate(timeout=120)
                if seen is None:
                    print(f"<!-- watcher stderr: {err[-1500:]} -->")
                if polls == 0:
                    continue
                # 3. the watcher's poll, --polls times, each after a small mutate; then lake optimize
                os.environ["BRIDGEKIT_CONFIG"], os.environ["BRIDGEKIT_PROFILE"] = str(config), "lakebench"
                wb = Workbench(resolve_runtime(load_profile("lakebench")))
                engine = wb.sync_engine(progress=False)
                selection = list(engine.tables)
                from bridgekit.sync import responsive_threads

                commits = 0
                t = time.perf_counter()
                for p in range(polls):
                    mutate(emu, poll_changes, 1000 + p)
                    with wb.warehouse.lock(), responsive_threads():
                        rep = engine._run(selection, full=False, quiet_noop=True)
                    assert rep.ok, rep.render()
                    commits += sum(c.version is not None for c in wb.publish_lake())
                per_poll = (time.perf_counter() - t) / max(polls, 1)
                active = _active_files(lake, tables)
                stored = target.stored_parquet()
                t = time.perf_counter()
                lake.optimize(tables)
                opt_s = time.perf_counter() - t
                where = "local path" if kind == "local" else "Azurite"
                file_rows.append(f"| {where} | {polls} | {commits} | {per_poll:.2f} | {active:,} -> "
                                 f"{_active_files(lake, tables):,} | {stored:,} -> {target.stored_parquet():,} | "
                                 f"{opt_s:.1f} |")
                print(file_rows[-1], file=sys.stderr, flush=True)
    shutil.rmtree(emu.home, ignore_errors=True)
    plan = ("the default plan" if graph == DEFAULT_GRAPH_RESOURCES else "the default Dataverse tables") + ": " + \
        ", ".join(DEFAULT_DATAVERSE_TABLES) + "; Graph " + ", ".join(graph)
    print(f"## Lake: changes until visible in the Delta tables ({scale} scale, `bridgekit sync --watch --interval "
          f"0.2` with the profile's lake, {plan})\n")
    print(f"`bridgekit emulator mutate` makes {changes:,} changes ({changes // 5:,} creates, "
          f"{changes - changes // 5 - changes // 10:,} updates, {changes // 10:,} deletes requested; cascades "
          "included) in one transaction; the clock runs from the emulator's commit until every change in the synced "
          "tables reads back from the Delta tables with deltalake (created and updated rows carrying a sync run that "
          "started after the commit, deleted rows gone); it includes up to one 0.2 s poll interval and the "
          "read-back's own passes. Target < 5 s.\n")
    print("The first row is the same watcher without a lake, clocked until the changes are visible in DuckDB (the "
          "rule of bench_sync.py's delta latency), in the same run: the lake's share is the difference. \"Last lake "
          "commit\" is the newest Delta commit's own timestamp among the tables the changes touched (the read-back "
          "passes excluded).\n")
    print("| lake | changes | in the synced tables | visible (s) | last lake commit after (s) | watcher's first "
          "full sync + lake load (s) |\n|---|---:|---:|---:|---:|---:|")
    print("\n".join(latency_rows) + "\n")
    if not file_rows:
        return
    print(f"## Lake: files after {polls} watch polls, before and after `bridgekit lake optimize` ({scale} scale)\n")
    print(f"Each poll: `mutate` with {poll_changes} changes, then the watcher's poll (a delta run of the default "
          "plan and the lake publish: one Delta commit per table that changed). Files the current versions read "
          "(`DeltaTable.file_uris()`, summed over the tables) and data files stored; the benchmark's lake keeps "
          "`retention_hours = 0` so the vacuum shows within the run (the default keeps 168 h of history).\n")
    print("| lake | polls | Delta commits | seconds per poll (mutate + poll + publish) | files read by the current "
          "versions | data files stored | optimize (s) |\n|---|---:|---:|---:|---|---|---:|")
    print("\n".join(file_rows) + "\n")


def _active_files(lake: Any, tables: list[str]) -> int:
    from deltalake import DeltaTable

    return sum(len(DeltaTable(lake.table_uri(t), storage_options=lake.storage_options()).file_uris())
               for t in tables)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="large", help="scale of the initial load")
    ap.add_argument("--delta-scale", default="medium", help="scale of the change and small-file scenarios")
    ap.add_argument("--changes", type=int, default=10000)
    ap.add_argument("--polls", type=int, default=100)
    ap.add_argument("--poll-changes", type=int, default=50)
    ap.add_argument("--targets", default="local,azurite")
    ap.add_argument("--graph", default=",".join(DEFAULT_GRAPH_RESOURCES), help="Graph resources the watcher mirrors")
    ap.add_argument("--skip-initial", action="store_true")
    ap.add_argument("--skip-delta", action="store_true")
    args = ap.parse_args()
    kinds = args.targets.split(",")
    if not args.skip_initial:
        initial(args.scale, kinds)
    if not args.skip_delta:
        delta(args.delta_scale, kinds, args.changes, args.polls, args.poll_changes, tuple(args.graph.split(",")))


if __name__ == "__main__":
    main()
