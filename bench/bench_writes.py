"""Write and read throughput of the Dataverse client against a local emulator: single requests vs $batch.

Usage: python bench/bench_writes.py [--rows 200] [--home DIR]   (starts an emulator in DIR when none runs)
Prints one line per scenario; record results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

from bridgekit.config import Profile
from bridgekit.dataverse import DataverseClient, Operation
from bridgekit.emulator import process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="bk-bench-")
    info = process.status(home) or process.start(home=home, port=0, scale="small", seed=42)
    profile = Profile(name="bench", auth="certificate", tenant_id=info.tenant_id, client_id=info.client_id,
                      certificate_path=info.certificate_path, dataverse_url=info.dataverse_url,
                      graph_url=info.graph_url, authority_host=info.authority_host, ca_bundle=info.ca_bundle)
    dv = DataverseClient(profile)
    dv.whoami()  # token and metadata warm-up
    dv.table("account")
    n = args.rows

    def run(label: str, fn: object) -> None:
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        elapsed = time.perf_counter() - started
        print(f"{label:<40} {n / elapsed:8.1f} rows/s  ({elapsed:.2f} s)")

    tag = uuid.uuid4().hex[:6]
    run("single upserts", lambda: [dv.upsert("account", {"accountnumber": f"s{tag}-{i}"}, {"name": "x"})
                                   for i in range(n)])
    ops = [Operation.upsert("account", {"accountnumber": f"b{tag}-{i}"}, {"name": "x"}) for i in range(n)]
    run("$batch upserts (1 per change set)", lambda: dv.batch(ops))
    ops = [Operation.upsert("account", {"accountnumber": f"c{tag}-{i}"}, {"name": "x"}) for i in range(n)]
    run("$batch upserts (change sets of 50)", lambda: dv.batch(ops, change_set_size=50))
    total = dv.count("contact")
    n = total
    run("paged read contact (page 500)", lambda: sum(1 for _ in dv.rows("contact", page_size=500)))
    run("partitioned read contact (4 x page 500)",
        lambda: sum(len(p.value) for p in dv.partitioned_pages("contact", partitions=4, page_size=500)))
    if not args.home:
        process.stop(home)


if __name__ == "__main__":
    main()
