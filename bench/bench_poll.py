"""One watcher poll of the default plan, taken apart: its duration and its HTTP requests, by injected latency.

A private emulator (``--scale``, default ``medium``) is fully synced with the default plan (the Dataverse
tables plus Graph users, groups, messages and events), then, at each injected latency (``--latency``,
default ``0,50,150`` ms), the engine polls as ``sync --watch`` does (``SyncEngine.polling``: the lock and one staging connection): ``--idle`` polls with nothing
changed, then one poll right after ``bridgekit emulator mutate`` made ``--changes`` changes. For each poll
it prints the wall time and the HTTP requests sent to each service (a ``$batch`` is one request; its
items are counted apart), so the cost of a poll can be read per round trip.

Usage: ``.venv/bin/python bench/bench_poll.py [--scale medium] [--latency 0,50,150] [--idle 2] [--changes 10000]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sync import Emulator, _admin, mutate  # noqa: E402

from bridgekit.config import load_profile  # noqa: E402
from bridgekit.workbench import Workbench, resolve_runtime  # noqa: E402


def _counts(wb: Workbench) -> dict[str, int]:
    return {"dataverse": wb.dataverse.session.request_count, "graph": wb.graph.session.request_count,
            "items": getattr(wb.graph, "batch_items", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="medium")
    ap.add_argument("--latency", default="0,50,150")
    ap.add_argument("--idle", type=int, default=2)
    ap.add_argument("--changes", type=int, default=10000)
    args = ap.parse_args()
    with Emulator(args.scale) as emu:
        prof = resolve_runtime(load_profile("emulator"))
        prof = prof.with_values(warehouse=str(emu.home / "poll.duckdb"))
        wb = Workbench(prof)
        engine = wb.sync_engine(progress=False)
        # What `sync --watch` holds: the lock and one staging connection.
        with engine.polling() as poll:
            t = time.perf_counter()
            report = poll()
            assert report.ok, report.render()
            print(f"<!-- full sync of the default plan: {report.fetched:,} rows in {time.perf_counter() - t:.1f}s -->",
                  flush=True)
            print(f"## One poll of the default plan ({args.scale} scale)\n")
            print("| latency ms | poll | seconds | Dataverse requests | Graph requests | Graph $batch items | rows fetched |")
            print("|---:|---|---:|---:|---:|---:|---:|")
            for latency in (int(x) for x in args.latency.split(",")):
                _admin(emu, "faults", {"clear": True, "latency_ms": latency})
                polls = [f"idle #{i + 1}" for i in range(args.idle)] + ["after mutate"]
                for name in polls:
                    if name == "after mutate":
                        mutate(emu, args.changes, latency + 7)
                    before = _counts(wb)
                    t = time.perf_counter()
                    rep = poll()
                    secs = time.perf_counter() - t
                    after = _counts(wb)
                    assert rep.ok, rep.render()
                    slow = sorted(rep.tables, key=lambda t: -t.duration_s)[:4]
                    print("<!-- " + ", ".join(f"{t.table} {t.duration_s:.2f}s ({t.fetched})" for t in slow) + " -->")
                    print(f"| {latency} | {name} | {secs:.2f} | {after['dataverse'] - before['dataverse']} | "
                          f"{after['graph'] - before['graph']} | {after['items'] - before['items']} | "
                          f"{rep.fetched:,} |", flush=True)
        _admin(emu, "faults", {"clear": True})


if __name__ == "__main__":
    main()
