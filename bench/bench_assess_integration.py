"""Benchmark: the assessment's run time on the medium tenant, without and with the integration area.

Starts a private emulator (medium scale, seed 42) in a temporary home and syncs the default plan (the platform
group off, as by default) into one warehouse, then a copy of it with the platform group on (a second profile).
Then, ``reps`` times, runs the assessment on each warehouse, the two interleaved (their order alternating), each
a fresh in-process assessment timed in two parts: the assessment without the integration area (connectivity with
20 calls, identity, change tracking, volumes, full-sync estimate, data quality, cross-system, infrastructure,
record), then ``Assessment.integration()`` right after it. On the default plan's warehouse the area reads what it
needs of the platform tables from Dataverse ("live"); on the other it reads the mirrored tables ("mirrored").
A run's ratio is (base + area) / base of that same run, so the shared machine's slow moments weigh on both
parts alike. Prints a markdown section. Usage::

    .venv/bin/python bench/bench_assess_integration.py [scale] [reps]
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bridgekit
from bridgekit.assess import Assessment
from bridgekit.emulator import process


def _assess(profile: str) -> tuple[float, float, Any]:
    wb = bridgekit.connect(profile)
    a = Assessment(wb)
    started = time.perf_counter()
    a.connectivity(calls=20)
    a.identity()
    a.change_tracking()
    a.volumes()
    a.full_sync_estimate()
    a.data_quality()
    a.cross_system()
    a.infrastructure(users=100, bandwidth_mbps_per_1000_users=500, environments={"prod": {"vcores": 4,
                                                                                          "ram_gb": 16}},
                     rpo_minutes=15, rto_hours=4)
    a.record()
    base_s = time.perf_counter() - started
    started = time.perf_counter()
    section = a.integration()
    return base_s, time.perf_counter() - started, section


def main(argv: list[str]) -> int:
    scale = argv[0] if argv else "medium"
    reps = int(argv[1]) if len(argv) > 1 else 5
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["BRIDGEKIT_EMULATOR_HOME"] = str(home)
        os.environ["BRIDGEKIT_EMULATOR_CLIENT_SECRET"] = "bk~" + secrets.token_urlsafe(24)
        config = Path(tmp) / "bridgekit.toml"
        config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{Path(tmp) / "w.duckdb"}"\n'
                          f'[profiles.mirror]\nauth = "emulator"\nwarehouse = "{Path(tmp) / "m.duckdb"}"\n'
                          '[profiles.mirror.sync]\nplatform = true\n')
        os.environ["BRIDGEKIT_CONFIG"] = str(config)
        os.environ.pop("BRIDGEKIT_PROFILE", None)
        info = process.start(home=home, port=0, scale=scale, seed=42)
        os.environ["BRIDGEKIT_EMULATOR_PORT"] = str(info.port)
        runs: dict[str, list[tuple[float, float]]] = {"live": [], "mirrored": []}
        try:
            started = time.perf_counter()
            bridgekit.connect("emulator").sync(progress=False)
            sync_s = time.perf_counter() - started
            shutil.copy(Path(tmp) / "w.duckdb", Path(tmp) / "m.duckdb")
            bridgekit.connect("mirror").sync(progress=False)  # adds the platform tables to the copy
            variants = [("live", "emulator"), ("mirrored", "mirror")]
            section = None
            for rep in range(reps):
                for name, profile in variants[rep % 2:] + variants[:rep % 2]:
                    base_s, area_s, section = _assess(profile)
                    runs[name].append((base_s, area_s))
        finally:
            process.stop(home)
    assert section is not None
    print(f"## Assessment run time with the integration area ({scale} tenant, seed 42)\n")
    print(f"Default plan synced in {sync_s:.1f} s; {len(section.checks)} integration checks; {reps} runs per "
          "warehouse, the two interleaved; a run's ratio is (base + area) / base of the same run.\n")
    print("| warehouse | base s (median) | integration area s (median, range) | ratio (median, range) |")
    print("| --- | ---: | ---: | ---: |")
    for name, label in (("live", "default plan: the area reads the platform tables from Dataverse"),
                        ("mirrored", "plan with the platform group: the area reads the mirrored tables")):
        base = [b for b, _ in runs[name]]
        area = [x for _, x in runs[name]]
        ratios = [(b + x) / b for b, x in runs[name]]
        print(f"| {label} | {statistics.median(base):.2f} | {statistics.median(area):.2f} "
              f"({min(area):.2f}-{max(area):.2f}) | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
