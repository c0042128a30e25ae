"""Benchmark: the assessment's run time on the medium tenant, without and with the integration area.

Starts a private emulator (medium scale, seed 42) in a temporary home, syncs the default plan (the platform group
off, as by default), then times, in-process and in this order: the assessment without the integration area
(connectivity with 20 calls, identity, change tracking, volumes, full-sync estimate, data quality, cross-system,
infrastructure, record), then ``Assessment.integration()`` on its own (which first reads the platform tables
into the warehouse, as an assessment of a default plan does), then the integration area once more (the
platform tables already mirrored). Prints a markdown section. Usage::

    .venv/bin/python bench/bench_assess_integration.py [scale]
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import bridgekit
from bridgekit.assess import Assessment
from bridgekit.emulator import process


def main(argv: list[str]) -> int:
    scale = argv[0] if argv else "medium"
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["BRIDGEKIT_EMULATOR_HOME"] = str(home)
        os.environ["BRIDGEKIT_EMULATOR_CLIENT_SECRET"] = "bk~" + secrets.token_urlsafe(24)
        config = Path(tmp) / "bridgekit.toml"
        config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{Path(tmp) / "w.duckdb"}"\n')
        os.environ["BRIDGEKIT_CONFIG"] = str(config)
        info = process.start(home=home, port=0, scale=scale, seed=42)
        os.environ["BRIDGEKIT_EMULATOR_PORT"] = str(info.port)
        try:
            wb = bridgekit.connect("emulator")
            started = time.perf_counter()
            wb.sync(progress=False)
            sync_s = time.perf_counter() - started
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
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            Assessment(wb).integration()
            again_s = time.perf_counter() - started
        finally:
            process.stop(home)
    rows = sum(a.rows().get(f"dataverse.{t}", 0) for t in ("asyncoperation", "plugintracelog", "workflow",
                                                           "sdkmessageprocessingstep"))
    print(f"## Assessment run time with the integration area ({scale} tenant, seed 42)\n")
    print(f"Default plan synced in {sync_s:.1f} s; {len(section.checks)} integration checks; {rows:,} rows in the "
          "largest platform tables (system jobs, trace log, processes, steps).\n")
    print("| run | seconds | vs the assessment without it |")
    print("| --- | ---: | ---: |")
    print(f"| assessment without the integration area | {base_s:.2f} | 1.00x |")
    print(f"| + integration area, reading the platform tables first | {base_s + first_s:.2f} | "
          f"{(base_s + first_s) / base_s:.2f}x |")
    print(f"| + integration area, platform tables already mirrored | {base_s + again_s:.2f} | "
          f"{(base_s + again_s) / base_s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
