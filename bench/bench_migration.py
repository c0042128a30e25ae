"""Migration benchmark: batched concurrent upserts (the migration engine) against one request per row, same rows.

Starts a private emulator (temporary home, free port, scale ``small``), writes one CSV of ``--rows``
accounts, and loads it into ``account`` three ways, each creating the same rows under its own key prefix:

1. **one request per row, sequential**: the naive loop, ``DataverseClient.upsert`` per row;
2. **one request per row, concurrent**: the same on ``--concurrency`` threads (the session's governor);
3. **migration engine**: ``Migration.execute`` end to end (metadata, delta sync of the target,
   validation and plan of every row, then ``$batch`` change sets, checkpointed per batch), with 1, 2
   and ``--concurrency`` batches in flight.

It also times plain ``DataverseClient.batch`` calls to show the emulator's own per-operation cost,
which bounds the ratio any client can reach here.

The emulator's request-count limit is raised for the comparison (6,000 requests per 300 s per user
in production, protocols.md §1.12): with it, the per-row loops would mostly measure waiting, which the
table's last column estimates instead. Prints a markdown section for BENCHMARKS.md.

Usage: ``.venv/bin/python bench/bench_migration.py [--rows 10000] [--batch 200] [--concurrency 4]``
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402

from bridgekit.config import Profile  # noqa: E402
from bridgekit.dataverse import Operation  # noqa: E402
from bridgekit.emulator import process  # noqa: E402
from bridgekit.migration import Migration, parse_mapping, sync_tables  # noqa: E402
from bridgekit.workbench import Workbench  # noqa: E402

INDUSTRIES = {"Consulting": 7, "Financial": 16, "Insurance": 20, "Legal Services": 21, "Wholesale": 33}
MAPPING = """
target: account
key: [accountnumber]
columns:
  accountnumber: {from: number, transform: [strip, {prefix: "%(prefix)s"}]}
  name: company
  telephone1: phone
  industrycode: {from: industry, choice: label}
  revenue: {from: revenue, transform: [number]}
options: {batch_size: %(batch)d, change_set_size: %(change_set)d, concurrency: %(concurrency)d}
"""
# Dataverse's service-protection request limit per user (api-limits.md).
PROD_REQUESTS, PROD_WINDOW_S = 6000, 300


def write_csv(path: Path, n: int) -> None:
    names = list(INDUSTRIES)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["number", "company", "phone", "industry", "revenue"])
        for i in range(1, n + 1):
            out.writerow([f"{i:06d}", f"Bench Company {i}", f"+1 555 {i:06d}", names[i % len(names)], f"{i * 10}.50"])


def per_row(wb: Workbench, path: Path, prefix: str, workers: int) -> tuple[float, int]:
    """Upsert every CSV row with one PATCH each (the same values the mapping produces)."""
    dv = wb.dataverse
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    def one(row: dict[str, str]) -> None:
        dv.upsert("account", {"accountnumber": prefix + row["number"]}, {
            "name": row["company"], "telephone1": row["phone"], "industrycode": INDUSTRIES[row["industry"]],
            "revenue": float(row["revenue"])})

    started = time.perf_counter()
    if workers == 1:
        for row in rows:
            one(row)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, rows))
    return time.perf_counter() - started, len(rows)


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) another process has used so far, from /proc (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb() -> float | None:
    """This process's resident set size now (MB), from /proc (None where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory_run(wb: Workbench, home: Path, rows: int, args: argparse.Namespace) -> None:
    """One engine run over ``rows`` rows with the resident set sampled every 0.5 s: it should stay flat."""
    source = home / "memory.csv"
    write_csv(source, rows)
    text = MAPPING % {"prefix": "MEM-", "batch": args.batch, "change_set": args.change_set,
                      "concurrency": args.concurrency}
    mig = Migration(wb, parse_mapping(yaml.safe_load(text), text=text), str(source), state_dir=home / "state")
    sync_tables(wb, ["account"])
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.wait(0.5):
            mb = rss_mb()
            if mb is not None:
                samples.append((time.perf_counter() - t0, mb))

    before = rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    report = mig.execute("bench-memory")
    secs = time.perf_counter() - started
    done.set()
    sampler.join()
    assert report.complete and report.counts["created"] == rows, report.counts
    if before is None or not samples:
        print("(no /proc here: memory not sampled)\n")
        return
    quarter = [mb for t, mb in samples if t >= secs / 4]
    print(f"### Migration memory: one engine run of {rows:,} rows ({args.concurrency} in flight)\n")
    print("| rows | seconds | rows/s | RSS before (MB) | peak RSS (MB) | RSS range after the first quarter (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {rows:,} | {secs:.1f} | {rows / secs:,.0f} | {before:.0f} | {max(mb for _, mb in samples):.0f} | "
          + (f"{min(quarter):.0f} to {max(quarter):.0f}" if quarter else "n/a") + " |\n")


def count(wb: Workbench, prefix: str) -> int:
    from bridgekit.odata import startswith

    return sum(1 for _ in wb.dataverse.rows("account", select=["accountid"], filter=startswith("accountnumber", prefix)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--change-set", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--memory-rows", type=int, default=200_000,
                        help="rows of a longer engine run whose memory is sampled (0: skip it)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bk-bench-mig-"))
    info = process.start(home=home, port=0, scale="small", seed=42)
    try:
        admin = {"X-Emulator-Admin-Key": info.admin_key()}
        requests.post(f"{info.base_url}/_emulator/settings", json={"dataverse_requests_per_window": 10_000_000},
                      headers=admin, verify=info.ca_bundle, timeout=30).raise_for_status()
        wb = Workbench.open(Profile(name="bench", auth="emulator", emulator_home=str(home),
                                    warehouse=str(home / "bench.duckdb"), max_concurrency=max(8, args.concurrency)))
        wb.dataverse.whoami()
        wb.dataverse.table("account")
        source = home / "accounts.csv"
        write_csv(source, args.rows)
        n = args.rows
        results: list[tuple[str, float, int, str]] = []

        seq_s, _ = per_row(wb, source, "ONE-", 1)
        results.append(("one request per row, sequential", seq_s, n, "1"))
        con_s, _ = per_row(wb, source, "PAR-", args.concurrency)
        results.append((f"one request per row, {args.concurrency} threads", con_s, n, str(args.concurrency)))

        engine: list[tuple[int, Any]] = []
        cpu: list[tuple[float | None, float]] = []  # per engine run: (emulator, client) CPU seconds
        for workers in sorted({1, 2, args.concurrency}):
            prefix = f"BAT{workers}-"
            text = MAPPING % {"prefix": prefix, "batch": args.batch, "change_set": args.change_set,
                              "concurrency": workers}
            mig = Migration(wb, parse_mapping(yaml.safe_load(text), text=text), str(source), state_dir=home / "state")
            # Untimed: bring the target warehouse up to date first, as a user's synced warehouse is, so the
            # run's own (timed) delta sync does not also fetch the rows the approach before it just wrote.
            sync_tables(wb, ["account"])
            emu_before, own_before = process_cpu(info.pid), own_cpu()
            started = time.perf_counter()
            report = mig.execute(f"bench-{workers}")
            secs = time.perf_counter() - started
            emu_after = process_cpu(info.pid)
            cpu.append((emu_after - emu_before if emu_after is not None and emu_before is not None else None,
                        own_cpu() - own_before))
            assert report.complete and report.counts["created"] == n, report.counts
            engine.append((workers, report))
            results.append((f"migration engine, {workers} in flight", secs, n, str(workers)))
        for prefix in ["ONE-", "PAR-"] + [f"BAT{w}-" for w, _ in engine]:
            got = count(wb, prefix)
            assert got == n, f"{prefix}: {got} rows, expected {n}"

        # Where the time goes: the same writes straight through DataverseClient.batch (no validation, no
        # plan, no checkpoint), one call at a time -- the emulator's own ceiling for $batch writes.
        ops = [Operation("PATCH", "account", {"accountnumber": f"RAW-{i:06d}"}, {
            "name": f"Bench Company {i}", "telephone1": f"+1 555 {i:06d}", "industrycode": 7, "revenue": 10.5},
            {"If-None-Match": "*"}, idempotent=True) for i in range(min(n, 2000))]
        started = time.perf_counter()
        for start in range(0, len(ops), args.batch):
            dv_results = wb.dataverse.batch(ops[start:start + args.batch], change_set_size=args.change_set)
            assert all(r.ok for r in dv_results)
        raw_per_op_ms = (time.perf_counter() - started) / len(ops) * 1000
        per_row_ms = seq_s / n * 1000

        batches = math.ceil(n / args.batch)
        calls = {"one request per row": n}
        best = min(engine, key=lambda e: e[1].write_s)[1]
        print(f"### Migration: batched concurrent upserts vs one request per row ({n:,} rows)\n")
        print(f"Emulator scale small on this machine ({os.cpu_count()} cores, shared), {n:,} new `account` rows "
              f"from one CSV (name, phone, industry by label, revenue), each approach under its own key prefix; "
              f"every row verified present afterwards. Engine: `$batch` of {args.batch}, change sets of "
              f"{args.change_set}; its time includes metadata, a delta sync of the target, validation and the "
              f"plan of every row, and the checkpoint (the target warehouse is synced, untimed, before each "
              f"engine run, as a user's is, so that delta does not hold the rows the approach before it wrote). Batches are sent as soon as planned rows fill them, so "
              f"the engine's write window overlaps its planning.\n")
        print("| approach | seconds | rows/s | write calls | speed-up vs per-row sequential |")
        print("|---|---:|---:|---:|---:|")
        for label, secs, rows, _ in results:
            count_calls = calls.get(label.split(",")[0], batches)
            print(f"| {label} | {secs:.1f} | {rows / secs:,.0f} | {count_calls:,} | {seq_s / secs:.1f}x |")
        print()
        print("| engine phase (per run) | " + " | ".join(f"{w} in flight" for w, _ in engine) + " |")
        print("|---|" + "---:|" * len(engine))
        print("| validation + plan (s: start to last row planned) | "
              + " | ".join(f"{r.plan_s:.1f}" for _, r in engine) + " |")
        print("| writes (s: first batch sent to last answered) | "
              + " | ".join(f"{r.write_s:.1f}" for _, r in engine) + " |")
        print("| overlap of the two (s) | "
              + " | ".join(f"{max(0.0, r.plan_s + r.write_s - r.duration_s):.1f}" for _, r in engine) + " |")
        print("| writes (rows/s over the write window) | "
              + " | ".join(f"{n / r.write_s:,.0f}" for _, r in engine) + " |")
        print("| CPU s: emulator process | "
              + " | ".join("n/a" if e is None else f"{e:.2f}" for e, _ in cpu) + " |")
        print("| CPU s: client process (all its threads) | " + " | ".join(f"{c:.2f}" for _, c in cpu) + " |")
        print(f"\n**Where the ratio comes from.** One request per row costs {per_row_ms:.1f} ms here; one "
              f"operation inside a `$batch` costs {raw_per_op_ms:.2f} ms (plain `DataverseClient.batch` calls one "
              f"at a time, no engine), so batching alone is worth ~{per_row_ms / raw_per_op_ms:.1f}x on this "
              f"emulator, whose per-operation work (JSON, validation, key lookup, versioned write) is the floor. "
              f"The engine adds validation, the plan and the checkpoint, overlaps them with the writes, and keeps "
              f"several batches in flight (best engine write window: {n / best.write_s:,.0f} rows/s, "
              f"{per_row_ms / (best.write_s / n * 1000):.1f}x the per-row loop). The single-process emulator "
              f"(one writer at a time) and the client share {os.cpu_count()} busy cores, so each side's CPU time "
              f"per row sets the pace. Against Dataverse the ratio grows with the limits: it admits "
              f"{PROD_REQUESTS:,} requests per user per {PROD_WINDOW_S} s (sliding; the emulator's limit was raised "
              f"for these timings), so {n:,} single requests take at least "
              f"{(n - 1) // PROD_REQUESTS * PROD_WINDOW_S} s of windows, while the engine needs {batches:,} calls.\n")
        if args.memory_rows > 0:
            memory_run(wb, home, args.memory_rows, args)
        wb.dataverse.session.close()  # an idle keep-alive connection would hold the emulator's shutdown
    finally:
        process.stop(home)


if __name__ == "__main__":
    main()
