"""Benchmark: the assessment's run time on the medium tenant, without and with the integration area.

Starts a private emulator (medium scale, seed 42) in a temporary home and syncs the default plan (the platform
group off, as by default) into one warehouse, then a copy of it with the platform group on (a second profile).
Then, ``reps`` times, runs three variants interleaved (their order rotating, so a slow moment of the shared machine
does not land on one variant only), each a fresh in-process assessment:

* base: the assessment without the integration area (connectivity with 20 calls, identity, change tracking,
  volumes, full-sync estimate, data quality, cross-system, infrastructure, record);
* live: base + ``Assessment.integration()`` on the default plan's warehouse (the area reads what it needs of the
  platform tables from Dataverse);
* mirrored: base + the integration area on the warehouse whose plan mirrors the platform tables (fresh).

Each variant's ratio is taken against the base run of the same repetition. Prints a markdown section. Usage::

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


def _assess(profile: str, integration: bool) -> tuple[float, Any]:
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
    section = a.integration() if integration else None
    return time.perf_counter() - started, section


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
        times: dict[str, list[float]] = {"base": [], "live": [], "mirrored": []}
        try:
            started = time.perf_counter()
            bridgekit.connect("emulator").sync(progress=False)
            sync_s = time.perf_counter() - started
            shutil.copy(Path(tmp) / "w.duckdb", Path(tmp) / "m.duckdb")
            bridgekit.connect("mirror").sync(progress=False)  # adds the platform tables to the copy
            variants = [("base", "emulator", False), ("live", "emulator", True), ("mirrored", "mirror", True)]
            section = None
            for rep in range(reps):
                for name, profile, integration in variants[rep % 3:] + variants[:rep % 3]:
                    seconds, got = _assess(profile, integration)
                    times[name].append(seconds)
                    section = got or section
        finally:
            process.stop(home)
    assert section is not None
    print(f"## Assessment run time with the integration area ({scale} tenant, seed 42)\n")
    print(f"Default plan synced in {sync_s:.1f} s; {len(section.checks)} integration checks; {reps} repetitions, "
          "the variants interleaved; ratios against the base run of the same repetition.\n")
    print("| run | seconds (median, range) | vs the assessment without it (median, range) |")
    print("| --- | ---: | ---: |")
    for name, label in (("base", "assessment without the integration area"),
                        ("live", "+ integration area, platform tables read from Dataverse (default plan)"),
                        ("mirrored", "+ integration area, platform tables mirrored by the plan")):
        t = times[name]
        ratios = [x / b for x, b in zip(t, times["base"], strict=True)]
        print(f"| {label} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
