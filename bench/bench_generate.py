"""Benchmark: synthetic company generation per scale (records written, seconds, records per second).

Writes each scale into a fresh SQLite file in a temporary directory (the emulator's real set-up: WAL,
file on disk), then times one :func:`bridgekit.emulator.synth.generate` call and one
:func:`bridgekit.emulator.activity.mutate` of 10,000 changes on the result. Prints a markdown section.
Usage::

    .venv/bin/python bench/bench_generate.py              # tiny, small, medium, large
    .venv/bin/python bench/bench_generate.py tiny small   # chosen scales
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bridgekit.emulator import activity, synth
from bridgekit.emulator.store import Store

SCALES = ("tiny", "small", "medium", "large")


def main(argv: list[str]) -> int:
    scales = [a for a in argv if a in SCALES] or list(SCALES)
    print("## Synthetic data generation\n")
    print("| scale | Dataverse rows | Graph records | records | seconds | records/s | file MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    mutations = []
    for scale in scales:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "emulator.db"
            store = Store(path)
            started = time.perf_counter()
            result = synth.generate(store, seed=42, scale=scale, anchor="2026-01-15")
            seconds = time.perf_counter() - started
            size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
            print(f"| {scale} | {result['dataverse_rows']:,} | {result['graph_records']:,} | {result['total']:,} "
                  f"| {seconds:.2f} | {result['total'] / seconds:,.0f} | {size:,.0f} |", flush=True)
            started = time.perf_counter()
            changed = activity.mutate(store, creates=3000, updates=5000, deletes=2000, seed=7)
            m_seconds = time.perf_counter() - started
            mutations.append((scale, changed["counts"]["records"], m_seconds))
            store.close()
    print("\n## Live activity (`mutate`, 3,000 creates + 5,000 updates + 2,000 deletes)\n")
    print("| scale | records written or deleted | seconds |")
    print("| --- | ---: | ---: |")
    for scale, n, seconds in mutations:
        print(f"| {scale} | {n:,} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
