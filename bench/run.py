"""Run every benchmark in bench/ (bench_*.py) and write their figures into BENCHMARKS.md.

Each benchmark script prints a markdown section to stdout. This runner puts them together with the
machine, the date and the command that produced them. Usage::

    make bench                            # all benchmarks
    .venv/bin/python bench/run.py sync    # only bench_sync.py
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s.stem for a in argv)]
    sections = []
    failed = 0
    for script in scripts:
        cmd = [sys.executable, str(script.relative_to(ROOT))]
        print(f"==> {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            failed += 1
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            continue
        print(proc.stdout)
        sections.append(f"Command: `.venv/bin/python {script.relative_to(ROOT)}`\n\n{proc.stdout.strip()}\n")
    if sections and not argv:
        head = (
            "# Benchmarks\n\n"
            f"Produced by `make bench` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
            "The machine is shared and noisy: compare figures within one run (ratios), not across runs.\n\n"
        )
        (ROOT / "BENCHMARKS.md").write_text(head + "\n".join(sections))
        print("wrote BENCHMARKS.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
