"""Sync engine benchmarks: full sync vs a plain paging loop, peak memory at two sizes, delta latency.

Each scenario starts a private emulator (temporary home, free port) and prints markdown:

1. **Full sync vs plain download** (``--scale``, default ``large``: ~1M Dataverse rows). A plain loop reads
   every page of every Dataverse table of the sync plan (same ``$select``, page size and annotations as
   the sync, same HTTP seam, rows thrown away) against ``bridgekit sync`` of the same tables (staging,
   checkpoints, merge), each in a fresh process, alternating, best of ``--repeats``. Target: <= 1.15x.
2. **Peak memory.** Peak RSS of a full sync at ``medium`` (~100k rows) and at ``--scale``.
   Target: < 400 MB and within 20% of each other.
3. **Delta latency** (a matrix: ``--delta-scales`` x ``--latency``). A ``sync --watch --interval 0.2``
   process mirrors the default plan (the Dataverse plan plus Graph users, groups, messages and events;
   ``--graph`` narrows it); at each injected latency ``bridgekit emulator mutate`` (the admin endpoint) makes 10,000 changes (creates,
   updates and deletes) in one transaction; the clock runs until every change in the synced collections
   is visible: created and updated rows written by a sync run that *started after* the mutation committed
   (a conservative rule: it never credits a run that might have missed the change), deleted rows gone. Each
   cell is measured ``--delta-repeats`` times from a steady state (the watcher merging nothing for 3 s) and
   shown as the median and each run: where the commit falls in the poll under way moves a single figure.
   Target: < 2 s, aim < 0.5 s.

Usage: ``.venv/bin/python bench/bench_sync.py [--scale large] [--repeats 2] [--changes 10000] [--skip-full]
[--skip-delta] [--delta-scales medium,large] [--latency 0,50,150] [--delta-repeats 3] [--graph users,groups,messages,events]``
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridgekit.config import DEFAULT_DATAVERSE_TABLES, DEFAULT_GRAPH_RESOURCES  # noqa: E402
from bridgekit.emulator import process  # noqa: E402

_PLAIN = textwrap.dedent("""
    import resource, sys, time
    from bridgekit.config import load_profile
    from bridgekit.workbench import Workbench, resolve_runtime
    from bridgekit.sources import DataverseSource
    wb = Workbench(resolve_runtime(load_profile("emulator")))
    t = time.perf_counter()
    rows = pages = 0
    for table in sys.argv[1].split(","):
        src = DataverseSource(wb.dataverse, table)
        url, headers = src._url(), src._headers(track=src.tracked)   # the same $select and Prefer as the sync
        while url:
            body = wb.dataverse.session.get_json(url, headers=headers)   # same HTTP seam and JSON parsing
            rows += len(body["value"]); pages += 1
            url = body.get("@odata.nextLink")
    print(rows, pages, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")

_SYNC = textwrap.dedent("""
    import resource, sys, time
    from bridgekit.config import SyncPlan, load_profile
    from bridgekit.workbench import Workbench, resolve_runtime
    prof = resolve_runtime(load_profile("emulator"))
    prof = prof.with_values(warehouse=sys.argv[2], sync=SyncPlan(tuple(sys.argv[1].split(",")), ()))
    wb = Workbench(prof)
    t = time.perf_counter()
    r = wb.sync(progress=False, full=True)
    assert r.ok, r.render()
    print(r.fetched, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")

_WATCH = textwrap.dedent("""
    import sys
    from bridgekit.config import SyncPlan, load_profile
    from bridgekit.workbench import Workbench, resolve_runtime
    prof = resolve_runtime(load_profile("emulator"))
    prof = prof.with_values(warehouse=sys.argv[1], sync=SyncPlan(tuple(sys.argv[2].split(",")),
                                                                 tuple(sys.argv[3].split(","))))
    Workbench(prof).sync_engine(progress=False).watch(interval=float(sys.argv[4]))
""")


def _child(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (it prints its own figures, peak RSS included); return stdout."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stdout.strip()


class Emulator:
    """A private emulator for one scenario (the environment variables point bridgekit's profile at it)."""

    def __init__(self, scale: str) -> None:
        self.home = Path(tempfile.mkdtemp(prefix=f"bk-bench-sync-{scale}-"))
        os.environ["BRIDGEKIT_EMULATOR_CLIENT_SECRET"] = "bk~" + secrets.token_urlsafe(24)
        os.environ["BRIDGEKIT_EMULATOR_HOME"] = str(self.home)
        os.environ.pop("BRIDGEKIT_EMULATOR_PORT", None)
        t = time.perf_counter()
        self.info = process.start(home=self.home, port=0, scale=scale, seed=42, timeout=3600)
        os.environ["BRIDGEKIT_EMULATOR_PORT"] = str(self.info.port)
        print(f"<!-- {scale} emulator ready in {time.perf_counter() - t:.0f}s -->", file=sys.stderr, flush=True)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        process.stop(self.home)


#: The default plan plus activitypointer (every activity again, through the base table): ~1M rows at large.
BENCH_TABLES = (*DEFAULT_DATAVERSE_TABLES, "activitypointer")


def full_vs_plain(scale: str, repeats: int) -> int:
    """Scenario 1; returns the sync's best peak RSS (MB)."""
    tables = ",".join(BENCH_TABLES)
    with Emulator(scale) as emu:
        print(f"## Full sync vs plain paging loop ({scale} scale: the Dataverse tables of the default plan "
              "and activitypointer)\n")
        print("| run | rows | seconds | rows/s | peak RSS MB |\n|---|---:|---:|---:|---:|")
        plain_best = sync_best = float("inf")
        rss_best = 10**9
        for i in range(repeats):
            rows, _pages, secs, rss = _child(_PLAIN, tables).split()[-4:]
            plain_best = min(plain_best, float(secs))
            print(f"| plain paging loop #{i + 1} | {int(rows):,} | {float(secs):.1f} | "
                  f"{int(rows) / float(secs):,.0f} | {rss} |", flush=True)
            fetched, secs, rss = _child(_SYNC, tables, str(emu.home / f"bench{i}.duckdb")).split()[-3:]
            sync_best = min(sync_best, float(secs))
            rss_best = min(rss_best, int(rss))
            print(f"| bridgekit sync (full) #{i + 1} | {int(fetched):,} | {float(secs):.1f} | "
                  f"{int(fetched) / float(secs):,.0f} | {rss} |", flush=True)
        print(f"\nsync / plain (best of {repeats} each): **{sync_best / plain_best:.2f}x** (target <= 1.15x)\n")
    return rss_best


def memory(scale: str, large_rss: int | None) -> None:
    """Scenario 2: peak RSS of a full sync at medium and at ``scale``."""
    tables = ",".join(BENCH_TABLES)
    figures: dict[str, tuple[int, int]] = {}
    for s in ("medium", scale):
        if s == scale and large_rss is not None:
            figures[s] = (0, large_rss)
            continue
        with Emulator(s) as emu:
            fetched, _secs, rss = _child(_SYNC, tables, str(emu.home / "mem.duckdb")).split()[-3:]
            figures[s] = (int(fetched), int(rss))
    print("## Peak memory of a full sync (the same tables)\n")
    print("| scale | peak RSS MB |\n|---|---:|")
    for s, (_n, rss) in figures.items():
        print(f"| {s} | {rss} |")
    small, big = figures["medium"][1], figures[scale][1]
    print(f"\n{scale} / medium: **{big / small:.2f}x** (target: both < 400 MB and within 20%)\n")


def delta(changes: int, *, scales: tuple[str, ...] = ("medium",), latencies: tuple[int, ...] = (0,),
          graph: tuple[str, ...] = DEFAULT_GRAPH_RESOURCES, repeats: int = 1) -> None:
    """Scenario 3: 10,000 mutate changes until visible under --watch, per scale and injected latency."""

    from bridgekit.emulator.schema import TABLES

    rows: list[str] = []
    notes: list[str] = []
    for scale in scales:
        with Emulator(scale) as emu:
            wh = emu.home / "watch.duckdb"
            # The watcher's warnings go to a file: a pipe nobody reads fills up and stops the watcher.
            log_path = emu.home / "watch.log"
            log_file = log_path.open("w")
            proc = subprocess.Popen([sys.executable, "-c", _WATCH, str(wh), ",".join(DEFAULT_DATAVERSE_TABLES),
                                     ",".join(graph), "0.2"], stdout=subprocess.DEVNULL, stderr=log_file, text=True)
            try:
                _wait_for_first_run(wh, len(DEFAULT_DATAVERSE_TABLES) + len(graph))
                for i, latency in enumerate(latencies):
                    _admin(emu, "faults", {"clear": True, "latency_ms": latency})
                    got: list[float | None] = []
                    total = in_plan = 0
                    for rep in range(repeats):
                        # Steady state before the clock starts: polls at this latency, none merging anything for
                        # 3 s (after the first full sync the watcher's first polls catch up with what changed
                        # during it).
                        _wait_idle(wh, quiet_s=3.0)
                        t0 = time.time()
                        result = mutate(emu, changes, 7 + i + 100 * rep)
                        answered = time.time()
                        # The emulator's own commit time (same machine, same clock): the admin call answers later,
                        # after serialising every changed id, and a watcher may already be merging by then.
                        t_committed = float(result["committed_at"])
                        checks = _visibility_checks(result, TABLES, graph)
                        total = sum(len(v) for v in result["created"].values()) + sum(
                            len(v) for v in result["updated"].values()) + sum(len(v) for v in result["deleted"].values())
                        in_plan = sum(len(ids) for _t, _pk, ids, _kind in checks)
                        latency_s = wait_visible(partial(_all_visible, wh, checks, t_committed), t_committed,
                                                 deadline=t0 + 120)
                        got.append(latency_s)
                        if latency_s is None:
                            tail = log_path.read_text(errors="replace").splitlines()[-5:]
                            missing = [(t, len(ids)) for t, _pk, ids, _kind in checks
                                       if not _all_visible(wh, [c for c in checks if c[0] == t], t_committed)]
                            print(f"<!-- {scale}, {latency} ms, #{rep + 1}: not visible within 120 s: {missing}; "
                                  f"watcher: {' / '.join(tail)} -->", file=sys.stderr, flush=True)
                        notes.append(f"{scale}, {latency} ms, #{rep + 1}: mutate answered {answered - t_committed:.2f} s "
                                     f"after its commit ({answered - t0:.2f} s through the admin endpoint)")
                    done = sorted(x for x in got if x is not None)
                    each = ", ".join(f"{x:.2f}" if x is not None else "not within 120 s" for x in got)
                    median = f"**{statistics.median(done):.2f}**" if len(done) == len(got) else "**not within 120 s**"
                    rows.append(f"| {scale} | {latency} | {total:,} | {in_plan:,} | {median} | {each} |")
                    print(rows[-1], file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
                log_file.close()
                _admin(emu, "faults", {"clear": True})
    plan = "the Dataverse plan plus Graph " + ", ".join(graph)
    print(f"## Delta latency (`bridgekit sync --watch --interval 0.2`: {plan})\n")
    print(f"Each cell: `bridgekit emulator mutate` makes {changes:,} changes ({changes // 5:,} creates, "
          f"{changes - changes // 5 - changes // 10:,} updates, {changes // 10:,} deletes requested; cascades "
          "included) in one transaction, at the injected latency (every Dataverse and Graph call, `emulator "
          "faults --latency-ms`); the clock runs from the emulator's commit until every change in the synced "
          "tables is visible (created and updated rows written by a run that started after the commit, deleted "
          "rows gone). Target < 2 s, aim < 0.5 s; includes up to one 0.2 s poll interval and the rest of a poll "
          "already under way at the commit. Each cell starts from a steady state: the watcher polling at that latency "
          "and merging nothing for 3 s.\n")
    print(f"| scale | latency ms | changes | in the synced tables | visible after (s), median of {repeats} | each run (s) |\n"
          "|---|---:|---:|---:|---:|---|")
    print("\n".join(rows) + "\n")
    print("<!-- " + "; ".join(notes) + " -->\n")


def _admin(emu: Emulator, path: str, body: dict[str, object]) -> dict:
    import requests

    from bridgekit.http import tls_session

    key = emu.info.admin_key()
    with tls_session(str(emu.info.ca_bundle)) as s:
        r = s.post(f"{emu.info.base_url}/_emulator/{path}", json=body, headers={"X-Emulator-Admin-Key": key},
                   timeout=600)
    if not isinstance(r, requests.Response) or r.status_code != 200:
        raise SystemExit(f"admin {path}: {r.status_code} {r.text[:500]}")
    out: dict = r.json()
    return out


def mutate(emu: Emulator, changes: int, seed: int) -> dict:
    """``bridgekit emulator mutate`` with the benches' mix: a fifth creates, a tenth deletes, the rest updates."""
    n_create, n_delete = changes // 5, changes // 10
    return _admin(emu, "mutate", {"creates": n_create, "updates": changes - n_create - n_delete,
                                  "deletes": n_delete, "seed": seed})["result"]


def wait_visible(visible: Callable[[], bool], committed: float, *, deadline: float,
                 step: float = 0.02) -> float | None:
    """Seconds from ``committed`` until ``visible()`` holds, checked every ``step`` s; None at ``deadline``."""
    while time.time() < deadline:
        if visible():
            return time.time() - committed
        time.sleep(step)
    return None


def _visibility_checks(result: dict, tables: dict, graph: tuple[str, ...]) -> list[tuple[str, str, list[str], str]]:
    checks = []
    for kind in ("created", "updated", "deleted"):
        for coll, ids in result[kind].items():
            if coll.startswith("graph."):
                if coll.removeprefix("graph.") not in graph:
                    continue
                checks.append((coll, "id", list(ids), kind))
            elif coll in DEFAULT_DATAVERSE_TABLES:
                checks.append((f"dataverse.{coll}", tables[coll].primary_id, list(ids), kind))
    return checks


def _all_visible(wh: Path, checks: list[tuple[str, str, list[str], str]], committed: float) -> bool:
    import duckdb

    try:
        with duckdb.connect(str(wh), read_only=True) as c:
            fresh = {r[0] for r in c.execute(
                "select distinct run_id from bridgekit.sync_runs where epoch(started_at) >= ?", [committed]
            ).fetchall()}
            if not fresh:
                return False  # no run started after the commit has merged yet: skip the costly id checks
            for table, pk, ids, kind in checks:
                rows = dict(c.execute(f"select cast({pk} as varchar), _bk_run_id from {table} "
                                      f"where cast({pk} as varchar) in (select unnest(?))", [ids]).fetchall())
                if kind == "deleted":
                    if rows:
                        return False
                elif len(rows) < len(ids) or any(run not in fresh for run in rows.values()):
                    return False
    except duckdb.Error:
        return False
    return True


def _wait_idle(wh: Path, *, quiet_s: float, timeout: float = 120.0) -> None:
    """Wait until the watcher has merged nothing for ``quiet_s`` seconds (its polls find nothing new)."""
    import duckdb

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with duckdb.connect(str(wh), read_only=True) as c:
                last = c.execute("select epoch(max(ended_at)) from bridgekit.sync_runs").fetchall()[0][0]
        except duckdb.Error:
            last = None
        if last is not None and time.time() - float(last) >= quiet_s:
            return
        time.sleep(0.5)
    raise SystemExit(f"the watcher kept merging changes for {timeout:.0f} s: no steady state to measure from")


def _wait_for_first_run(wh: Path, n_tables: int) -> None:
    import duckdb

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            with duckdb.connect(str(wh), read_only=True) as c:
                done = c.execute("select count(distinct table_name) from bridgekit.sync_runs "
                                 "where status = 'ok'").fetchall()[0][0]
                if done >= n_tables:
                    time.sleep(1.0)
                    return
        except duckdb.Error:
            pass
        time.sleep(0.5)
    raise SystemExit("the watch process did not finish its first full run")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="large")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--changes", type=int, default=10000)
    ap.add_argument("--skip-full", action="store_true", help="only the delta scenario")
    ap.add_argument("--skip-delta", action="store_true", help="only the full-sync and memory scenarios")
    ap.add_argument("--delta-scales", default="medium", help="scales of the delta matrix (comma-separated)")
    ap.add_argument("--latency", default="0", help="injected latencies of the delta matrix, ms (comma-separated)")
    ap.add_argument("--delta-repeats", type=int, default=3, help="mutate rounds per cell of the delta matrix")
    ap.add_argument("--graph", default=",".join(DEFAULT_GRAPH_RESOURCES),
                    help="Graph resources the watcher mirrors (default: the default plan's)")
    args = ap.parse_args()
    rss = None
    if not args.skip_full:
        rss = full_vs_plain(args.scale, args.repeats)
        memory(args.scale, rss)
    if not args.skip_delta:
        delta(args.changes, scales=tuple(args.delta_scales.split(",")),
              latencies=tuple(int(x) for x in args.latency.split(",")), graph=tuple(args.graph.split(",")),
              repeats=args.delta_repeats)


if __name__ == "__main__":
    main()
