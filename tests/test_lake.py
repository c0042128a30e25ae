"""The Delta Lake copy: kept equal to the warehouse by every sync, exactly once across a kill, compacted on demand."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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

TABLES = ("dataverse.account", "dataverse.contact", "graph.users")


@pytest.fixture()
def lake_profile(emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profile whose lake is a local path."""
    config = tmp_path / "bridgekit.toml"
    config.write_text(textwrap.dedent(f"""
        [profiles.lakeside]
        auth = "emulator"
        warehouse = "{tmp_path / 'w.duckdb'}"
        sync = {{ dataverse = ["account", "contact"], graph = ["users"] }}
    """) + f'\n[profiles.lakeside.lake]\nurl = "{tmp_path / "lake"}"\noptimize_every = 0\nretention_hours = 0\n')
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.setenv("BRIDGEKIT_PROFILE", "lakeside")
    return tmp_path


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


def _assert_lake_equals_warehouse(root: Path) -> None:
    wh = Warehouse(root / "w.duckdb")
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


def test_every_sync_keeps_the_lake_equal_to_the_warehouse(lake_profile: Path, emulator: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync"]) == 0
    out = capsys.readouterr().out
    assert all(f"lake: {t} version 0 (create" in out for t in TABLES)
    _assert_lake_equals_warehouse(lake_profile)
    for seed in (11, 12):
        emulator.admin("mutate", {"creates": 40, "updates": 120, "deletes": 25, "seed": seed})
        assert main(["sync", "--quiet"]) == 0
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
        lake_profile: Path, emulator: Any, capsys: pytest.CaptureFixture[str]) -> None:
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


def test_optimize_compacts_small_files_vacuums_old_ones_and_keeps_the_rows(lake_profile: Path, emulator: Any,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sync", "--quiet"]) == 0
    for seed in (31, 32, 33):
        emulator.admin("mutate", {"creates": 10, "updates": 30, "deletes": 5, "seed": seed})
        assert main(["sync", "--quiet"]) == 0
    def active() -> int:
        return sum(len(_delta(t).file_uris()) for t in TABLES)

    before_on_disk = len(list((lake_profile / "lake").rglob("*.parquet")))
    before = active()
    capsys.readouterr()
    assert main(["lake", "optimize"]) == 0
    out = capsys.readouterr().out
    # every table compacted to as few files as its rows need; files no version needs (retention 0) removed
    assert active() <= before and len(list((lake_profile / "lake").rglob("*.parquet"))) < before_on_disk
    assert all(f"{t}:" in out for t in TABLES)
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
