"""bridgekit sync vs dlt's ``rest_api`` source, loading the same Dataverse data into DuckDB, side by side.

Starts a private emulator (``--scale``, default ``large``: ~1M Dataverse rows) and, in fresh processes,
alternating, best of ``--repeats``:

* **bridgekit**: ``wb.sync(full=True)`` of every Dataverse table of the default plan.
* **dlt**: a ``rest_api_source`` over the same entity sets (same page size, ``@odata.nextLink`` paging
  through the ``json_link`` paginator, bearer token from bridgekit's MSAL provider), loaded with
  ``write_disposition="replace"`` into a DuckDB file. dlt's requests session trusts the emulator CA
  through ``REQUESTS_CA_BUNDLE`` set for that process only.

Both read the same rows over the same HTTPS endpoint; the figure is the ratio of their wall times.
Target: bridgekit at least 5x faster. Requires ``dlt[duckdb]`` (``pip install -e '.[bench]'``).

Usage: ``.venv/bin/python bench/bench_dlt.py [--scale large] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridgekit.config import DEFAULT_DATAVERSE_TABLES  # noqa: E402
from bridgekit.emulator import process  # noqa: E402

_SYNC = textwrap.dedent("""
    import sys, time
    from bridgekit.config import SyncPlan, load_profile
    from bridgekit.workbench import Workbench, resolve_runtime
    prof = resolve_runtime(load_profile("emulator"))
    prof = prof.with_values(warehouse=sys.argv[2], sync=SyncPlan(tuple(sys.argv[1].split(",")), (), 5000))
    t = time.perf_counter()
    r = Workbench(prof).sync(progress=False, full=True)
    assert r.ok, r.render()
    print(r.fetched, time.perf_counter() - t)
""")

# The token is handed over on stdin, never on the command line or in a file.
_DLT = textwrap.dedent("""
    import sys, time
    import dlt, duckdb
    from dlt.sources.rest_api import rest_api_source
    base, sets, path, workdir = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
    token = sys.stdin.readline().strip()
    source = rest_api_source({
        "client": {
            "base_url": base,
            "auth": {"type": "bearer", "token": token},
            "headers": {"Accept": "application/json", "Prefer": "odata.maxpagesize=5000"},
            "paginator": {"type": "json_link", "next_url_path": "['@odata.nextLink']"},
        },
        "resource_defaults": {"write_disposition": "replace", "endpoint": {"data_selector": "value"}},
        "resources": [{"name": s, "endpoint": {"path": s}} for s in sets],
    })
    pipeline = dlt.pipeline(pipeline_name="bk_bench", destination=dlt.destinations.duckdb(path),
                            dataset_name="dataverse", pipelines_dir=workdir, progress=None)
    t = time.perf_counter()
    pipeline.run(source)
    secs = time.perf_counter() - t
    with duckdb.connect(path, read_only=True) as c:
        rows = sum(c.execute(f'select count(*) from dataverse."{s}"').fetchall()[0][0] for s in sets)
    print(rows, secs)
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="large")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    try:
        import dlt  # noqa: F401
    except ImportError:
        raise SystemExit("dlt is not installed: .venv/bin/pip install -e '.[bench]'") from None
    from bridgekit.config import load_profile
    from bridgekit.emulator.schema import TABLES
    from bridgekit.workbench import resolve_runtime

    home = Path(tempfile.mkdtemp(prefix="bk-bench-dlt-"))
    os.environ["BRIDGEKIT_EMULATOR_CLIENT_SECRET"] = "bk~" + secrets.token_urlsafe(24)
    os.environ["BRIDGEKIT_EMULATOR_HOME"] = str(home)
    info = process.start(home=home, port=0, scale=args.scale, seed=42, timeout=3600)
    os.environ["BRIDGEKIT_EMULATOR_PORT"] = str(info.port)
    try:
        prof = resolve_runtime(load_profile("emulator"))
        from bridgekit.auth import TokenProvider

        token = TokenProvider(prof).token(f"{prof.dataverse_url}/.default")
        tables = ",".join(DEFAULT_DATAVERSE_TABLES)
        sets = ",".join(TABLES[t].entity_set for t in DEFAULT_DATAVERSE_TABLES)
        base = f"{prof.dataverse_url}/api/data/v9.2/"
        env = dict(os.environ, REQUESTS_CA_BUNDLE=str(info.ca_bundle), CURL_CA_BUNDLE=str(info.ca_bundle),
                   RUNTIME__LOG_LEVEL="WARNING")
        print(f"## bridgekit sync vs dlt rest_api ({args.scale} scale: every Dataverse table of the default plan)\n")
        print("| run | rows | seconds | rows/s |\n|---|---:|---:|---:|")
        best_bk = best_dlt = float("inf")
        for i in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", _SYNC, tables, str(home / f"bk{i}.duckdb")],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            rows, secs = out.stdout.split()
            best_bk = min(best_bk, float(secs))
            print(f"| bridgekit sync (full) #{i + 1} | {int(rows):,} | {float(secs):.1f} | "
                  f"{int(rows) / float(secs):,.0f} |", flush=True)
            work = Path(tempfile.mkdtemp(prefix="bk-dlt-", dir=home))
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _DLT, base, sets, str(work / "dlt.duckdb"), str(work)],
                                 input=token + "\n", capture_output=True, text=True, env=env, check=False,
                                 cwd=work)
            if out.returncode:
                raise SystemExit(f"dlt failed after {time.perf_counter() - t:.0f}s: {out.stderr[-3000:]}")
            rows, secs = out.stdout.split()[-2:]
            best_dlt = min(best_dlt, float(secs))
            print(f"| dlt rest_api -> duckdb #{i + 1} | {int(rows):,} | {float(secs):.1f} | "
                  f"{int(rows) / float(secs):,.0f} |", flush=True)
        print(f"\ndlt / bridgekit (best of {args.repeats} each): **{best_dlt / best_bk:.1f}x** "
              "(target: bridgekit at least 5x faster)\n")
        print("dlt's figure is its whole `pipeline.run` (extract, normalize, load); bridgekit's is its whole "
              "sync (fetch, stage with checkpoints, merge). Neither includes interpreter start-up.\n")
    finally:
        process.stop(home)


if __name__ == "__main__":
    main()
