"""The Delta Lake copy: kept equal to the warehouse by every sync, exactly once across a kill, compacted on demand.

Every lake test runs twice: on a local path and on Azurite (Microsoft's Azure Storage emulator, started on
loopback by these tests: tests/azurite.py), through the same ``abfss://`` URL, endpoint and account-key
settings a storage account takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from bridgekit.cli.main import main
from bridgekit.config import load_profile
from bridgekit.errors import ConfigError
from bridgekit.warehouse import Warehouse
from tests.azurite import ACCOUNT, DEV_KEY, Azurite

TABLES = ("dataverse.account", "dataverse.contact", "graph.users")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite Blob service for this module's tests (each test gets its own container)."""
    server = Azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Site:
    """A test's profile directory (``root``: bridgekit.toml, the warehouse) and where its lake is stored."""

    root: Path
    kind: str  # local | azurite
    server: Azurite | None = None
    container: str = ""

    def stored_parquet(self) -> int:
        """Data files in the lake's storage, whether or not a Delta version still names them."""
        if self.server is None:
            names = [str(p) for p in (self.root / "lake").rglob("*.parquet")]
        else:
            names = self.server.list_blobs(self.container, "bridgekit/")
        return sum(n.endswith(".parquet") and "_delta_log/" not in n for n in names)  # data, not log checkpoints


@pytest.fixture(params=["local", "azurite"])
def lake_profile(request: pytest.FixtureRequest, emulator: Any, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Site:
    """A profile whose lake is a local path, or a container in Azurite reached as Azure Data Lake."""
    config = tmp_path / "bridgekit.toml"
    config.write_text(textwrap.dedent(f"""
        [profiles.lakeside]
        auth = "emulator"
        warehouse = "{tmp_path / 'w.duckdb'}"
        sync = {{ dataverse = ["account", "contact"], graph = ["users"] }}
    """))
    lake = "\n[profiles.lakeside.lake]\noptimize_every = 0\nretention_hours = 0\n"
    if request.param == "local":
        site = Site(tmp_path, "local")
        lake += f'url = "{tmp_path / "lake"}"\n'
    else:
        server: Azurite = request.getfixturevalue("azurite")
        site = Site(tmp_path, "azurite", server, f"lake{uuid.uuid4().hex[:12]}")
        server.create_container(site.container)
        # the account key reaches bridgekit as a real one does: by the name of an environment variable
        monkeypatch.setenv("BK_TEST_LAKE_ACCOUNT_KEY", DEV_KEY)
        lake += (f'url = "abfss://{site.container}@{ACCOUNT}.dfs.core.windows.net/bridgekit"\n'
                 f'endpoint = "{server.endpoint}"\naccount_key_env = "BK_TEST_LAKE_ACCOUNT_KEY"\n')
    config.write_text(config.read_text() + lake)
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.setenv("BRIDGEKIT_PROFILE", "lakeside")
    return site


def _lake() -> Any:
    from bridgekit.lake import Lake

    target = load_profile("lakeside").lake
    assert target is not None
    return Lake(target)


def _delta(table: str) -> DeltaTable:
    lake = _lake()
    return DeltaTable(lake.table_uri(table), storage_options=lake.storage_options())


def _sorted(table: pa.Table, key: str) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda r: str(r[key]))


def _assert_lake_equals_warehouse(site: Site) -> None:
    wh = Warehouse(site.root / "w.duckdb")
    state = wh.state()
    for table in TABLES:
        schema, _, name = table.partition(".")
        key = state[table]["spec"]["key"] if isinstance(state[table]["spec"], dict) else None
        with wh.reader() as conn:
            cols = conn.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? "
                                "AND table_name = ? ORDER BY column_index", [schema, name]).fetchall()
            select = ", ".join(f'CAST("{c}" AS VARCHAR) AS "{c}"' if t in ("UUID", "JSON") else f'"{c}"'
                               for c, t in cols)
            key = key or cols[0][0]
            expected = conn.sql(f'SELECT {select} FROM {schema}."{name}"').to_arrow_table()
        delta = _delta(table)
        got = delta.to_pyarrow_table()
        assert got.num_rows == expected.num_rows == len(set(got.column(key).to_pylist())), table  # no duplicate
        assert _sorted(got.select(expected.column_names), key) == _sorted(expected, key), table
        # DuckDB reads the same Delta table (through its Arrow dataset)
        ds = delta.to_pyarrow_dataset()
        con = duckdb.connect()
        con.register("ds", ds)
        assert con.execute("SELECT count(DISTINCT " + f'"{key}"' + ") FROM ds").fetchone() == (expected.num_rows,)
        # the newest data commit names the sync run the table reached (compaction commits carry no data)
        newest = next(h for h in delta.history() if "bridgekit.sync_run_id" in h)
        assert newest["bridgekit.sync_run_id"] == state[table]["last_run_id"]


def test_every_sync_keeps_the_lake_equal_to_the_warehouse(lake_profile: Site, emulator: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync"]) == 0
    out = capsys.readouterr().out
    assert all(f"lake: {t} version 0 (create" in out for t in TABLES)
    _assert_lake_equals_warehouse(lake_profile)
    import bridgekit

    wb = bridgekit.connect("lakeside")  # one Lake across syncs, as a watcher has: it keeps its Delta tables
    for seed in (11, 12):
        emulator.admin("mutate", {"creates": 40, "updates": 120, "deletes": 25, "seed": seed})
        assert wb.sync(progress=False).ok
        _assert_lake_equals_warehouse(lake_profile)
    versions = {t: _delta(t).version() for t in TABLES}
    assert max(versions.values()) <= 2  # one commit per table per run that changed it, never more
    assert main(["sync", "--quiet"]) == 0  # nothing changed: no new commit
    assert {t: _delta(t).version() for t in TABLES} == versions


_KILL_BEFORE_PUBLISH = """
import os, signal, sys
import bridgekit.lake as lake
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
lake.Lake.publish = killed
from bridgekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sync_killed_between_the_merge_and_the_lake_commit_is_caught_up_exactly_once(
        lake_profile: Site, emulator: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync", "--quiet"]) == 0
    emulator.admin("mutate", {"creates": 30, "updates": 80, "deletes": 20, "seed": 21})
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_PUBLISH, "sync", "--quiet"], env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed after the warehouse merge, before the lake commit
    capsys.readouterr()
    assert main(["lake", "status"]) == 0
    assert "behind" in capsys.readouterr().out
    assert main(["sync", "--quiet"]) == 0  # nothing new at the source: the lake catches up all the same
    _assert_lake_equals_warehouse(lake_profile)
    assert main(["lake", "status"]) == 0
    assert "behind" not in capsys.readouterr().out


def test_optimize_compacts_small_files_vacuums_old_ones_and_keeps_the_rows(lake_profile: Site, emulator: Any,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync", "--quiet"]) == 0
    for seed in (31, 32, 33):
        emulator.admin("mutate", {"creates": 10, "updates": 30, "deletes": 5, "seed": seed})
        assert main(["sync", "--quiet"]) == 0
    def active() -> int:
        return sum(len(_delta(t).file_uris()) for t in TABLES)

    before_on_disk = lake_profile.stored_parquet()
    before = active()
    capsys.readouterr()
    assert main(["lake", "optimize"]) == 0
    out = capsys.readouterr().out
    # every table compacted to as few files as its rows need; files no version needs (retention 0) removed
    assert active() <= before and lake_profile.stored_parquet() < before_on_disk
    assert all(f"{t}:" in out for t in TABLES)
    _assert_lake_equals_warehouse(lake_profile)


@pytest.mark.parametrize("lake_profile", ["local"], indirect=True)  # the schedule is the same on any storage
def test_compaction_runs_on_the_profiles_schedule(lake_profile: Site, emulator: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = lake_profile.root / "bridgekit.toml"
    config.write_text(config.read_text().replace("optimize_every = 0", "optimize_every = 2"))
    assert main(["sync"]) == 0  # commit 1 of each table
    assert "compacted" not in capsys.readouterr().out
    emulator.admin("mutate", {"creates": 10, "updates": 30, "deletes": 5, "seed": 51})
    assert main(["sync"]) == 0  # commit 2 of the tables that changed: due
    out = capsys.readouterr().out
    compacted = {ln.split()[1] for ln in out.splitlines() if ln.startswith("lake:") and "compacted" in ln}
    assert compacted and compacted <= set(TABLES)
    assert all(_delta(t).history(1)[0]["operation"] in ("OPTIMIZE", "VACUUM END") for t in compacted)
    emulator.admin("mutate", {"creates": 10, "updates": 30, "deletes": 5, "seed": 52})
    assert main(["sync"]) == 0  # the count starts again after a compaction: commit 1 of 2
    out = capsys.readouterr().out
    assert not {ln.split()[1] for ln in out.splitlines() if "compacted" in ln} & compacted
    _assert_lake_equals_warehouse(lake_profile)


@pytest.mark.parametrize("lake_profile", ["local"], indirect=True)
def test_a_watcher_publishes_each_poll_that_changed_something(lake_profile: Site, emulator: Any) -> None:
    watcher = subprocess.Popen([sys.executable, "-m", "bridgekit", "sync", "--watch", "--interval", "0.2", "--quiet"],
                               env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wh = Warehouse(lake_profile.root / "w.duckdb")

    def versions() -> dict[str, int] | None:
        """Each table's Delta version once the watcher has published it and the lake is current, else None."""
        try:
            status = _lake().status(wh)
        except Exception:  # no warehouse or no lake yet
            return None
        if len(status) < len(TABLES) or not all(r["current"] for r in status):
            return None
        return {r["table"]: r["lake_version"] for r in status}

    def wait_for(ready: Any) -> Any:
        for _ in range(600):  # bounded: 120 s at most, typically a few polls
            assert watcher.poll() is None, watcher.communicate()[1][-2000:]
            got = ready()
            if got:
                return got
            time.sleep(0.2)
        pytest.fail("the watcher did not publish within 120 s")

    try:
        first = wait_for(versions)
        emulator.admin("mutate", {"creates": 20, "updates": 60, "deletes": 10, "seed": 61})
        # a poll that merged the changes was published by the watcher itself: versions moved on, lake current
        wait_for(lambda: (v := versions()) is not None and any(v[t] > first[t] for t in TABLES))
    finally:
        watcher.terminate()
        watcher.communicate(timeout=60)
    assert main(["lake", "publish"]) == 0  # a poll the stop interrupted after its merge (if any) is caught up
    _assert_lake_equals_warehouse(lake_profile)


def test_lake_settings_never_hold_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bridgekit.toml"
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    config.write_text('[profiles.p]\nauth = "emulator"\n[profiles.p.lake]\n'
                      'url = "abfss://c@acct.dfs.core.windows.net/x"\naccount_key = "abc"\n')
    with pytest.raises(ConfigError, match="literal secret"):
        load_profile("p")
    config.write_text('[profiles.p]\nauth = "emulator"\n[profiles.p.lake]\n'
                      'url = "abfss://c@acct.dfs.core.windows.net/x"\naccount_key_env = "BK_LAKE_KEY"\n')
    target = load_profile("p").lake
    assert target is not None and (target.auth, target.account_name) == ("key", "acct")
    from bridgekit.errors import MissingCredentialError
    from bridgekit.lake import Lake

    monkeypatch.delenv("BK_LAKE_KEY", raising=False)
    with pytest.raises(MissingCredentialError, match="BK_LAKE_KEY"):
        Lake(target).storage_options()
    monkeypatch.setenv("BK_LAKE_KEY", "a-key-value-from-the-environment")
    assert Lake(target).storage_options() == {"azure_storage_account_name": "acct",
                                              "azure_storage_account_key": "a-key-value-from-the-environment"}
    # plain http only to an emulator on this machine: a storage account's endpoint is https, verified
    from dataclasses import replace

    with pytest.raises(ConfigError, match="plain http on another host"):
        Lake(replace(target, endpoint="http://storage.example.net/acct")).storage_options()
    assert Lake(replace(target, endpoint="http://127.0.0.1:10000/acct")).storage_options()["allow_http"] == "true"
    assert "allow_http" not in Lake(replace(target, endpoint="https://acct.blob.core.usgovcloudapi.net")
                                    ).storage_options()


def test_a_column_new_in_the_warehouse_is_added_to_the_delta_table(lake_profile: Site, emulator: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The first sync sees account without one attribute (as before a customizer added it to the tenant) ...
    from bridgekit.dataverse import DataverseClient

    real_columns = DataverseClient.columns
    added = "websiteurl"

    def without_it(self: DataverseClient, table: str, *, refresh: bool = False) -> Any:
        cols = real_columns(self, table, refresh=refresh)
        return [c for c in cols if not (table == "account" and c.name == added)]

    monkeypatch.setattr(DataverseClient, "columns", without_it)
    assert main(["sync", "--quiet"]) == 0
    assert added not in _delta("dataverse.account").schema().to_arrow().names
    # ... the next sync finds it: the warehouse gains the column and the lake's MERGE evolves the Delta schema.
    # A delta run's changes hold no value for it yet (the delta link keeps the columns it was opened with), so
    # it is null in DuckDB and in the lake alike; a full reload then fills it, in both.
    monkeypatch.setattr(DataverseClient, "columns", real_columns)
    emulator.admin("mutate", {"creates": 10, "updates": 40, "deletes": 5, "seed": 41})
    assert main(["sync", "--quiet"]) == 0
    wh = Warehouse(lake_profile.root / "w.duckdb")
    assert added in set(wh.sql("SELECT column_name FROM duckdb_columns() WHERE table_name = 'account'")["column_name"])
    assert added in _delta("dataverse.account").schema().to_arrow().names
    _assert_lake_equals_warehouse(lake_profile)
    assert main(["sync", "--quiet", "--full", "--only", "account"]) == 0
    values = _delta("dataverse.account").to_pyarrow_table(columns=[added]).column(added)
    assert values.null_count < len(values)
    _assert_lake_equals_warehouse(lake_profile)


def test_azurite_lists_blobs_from_a_start_key(azurite: Azurite) -> None:
    # deltalake lists a table's log from the version it knows (List Blobs' startFrom); the Azurite the tests
    # pin must honour it (3.35.0 ignored it and every Delta commit after the second failed)
    azurite.create_container("startfrom")
    for n in range(3):
        status, _ = azurite.put_blob("startfrom", f"t/_delta_log/{n:020d}.json", b"{}")
        assert status == 201
    assert azurite.list_blobs("startfrom", "t/", start_from=f"t/_delta_log/{1:020d}") == [
        f"t/_delta_log/{1:020d}.json", f"t/_delta_log/{2:020d}.json"]
