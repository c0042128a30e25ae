"""Secrets stay out of error messages, off disk while a run executes, and out of reach of `bridgekit sql`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bridgekit.cli.main import main
from bridgekit.runbooks import run_runbook
from bridgekit.warehouse import Warehouse

RB = Path(__file__).parent / "runbooks"
SECRET = "bk7Q~Zq3vN8xLw2RtY6uP0sA9dF4gH1jK5lM7nB2"  # shaped like an Entra client secret
TOKEN_SHAPE = "eyJ" + "B" * 16  # what leak_then_wait prints (never written here in full)


@pytest.mark.parametrize("args", [
    ["run", "sync", "-p", "profile", SECRET],
    ["-P", SECRET, "sync", "--quiet"],
    ["sync", "--quiet", "-P", SECRET],
    ["sync", "--quiet", "--only", SECRET],
    ["run", SECRET],
])
def test_a_secret_typed_where_a_name_goes_is_never_echoed(args: list[str], emulator: Any,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONTOSO_CLIENT_SECRET", SECRET)
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2
    assert SECRET not in out + err and SECRET[:12] not in out + err
    assert err.startswith("error: ") and len(err.splitlines()) <= 2 and "not shown" in err


def test_a_secret_in_bridgekit_profile_is_never_echoed(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BRIDGEKIT_PROFILE", SECRET)
    assert main(["sql", "select 1"]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "not shown" in err


def _run_cli(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bridgekit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _wait_for(predicate: Any, proc: subprocess.Popen[str], limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _running_notebook(out: Path) -> Path | None:
    found = sorted((out / ".running").glob("*/leak_then_wait.ipynb")) if (out / ".running").is_dir() else []
    return found[0] if found else None


def test_a_running_runbook_is_private_until_scanned_and_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    out, tmp = tmp_path / "runs", tmp_path / "tmp"
    tmp.mkdir()
    proc = _run_cli(["run", "leak_then_wait", "--path", str(RB), "--out", str(out), "-p", "seconds", "3"],
                    env={**os.environ, "TMPDIR": str(tmp)})
    _wait_for(lambda: (nb := _running_notebook(out)) is not None and TOKEN_SHAPE in nb.read_text(), proc)
    nb = _running_notebook(out)
    assert nb is not None
    assert stat.S_IMODE(nb.parent.stat().st_mode) == 0o700 and stat.S_IMODE((out / ".running").stat().st_mode) == 0o700
    assert [p for p in out.iterdir() if p.name != ".running"] == []  # nothing published before the scan
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 8, err  # the token-shaped string is found: outputs quarantined
    published = [p for p in out.iterdir()]
    assert len(published) == 1 and published[0].name.endswith("-leak_then_wait")
    for f in published[0].iterdir():
        assert TOKEN_SHAPE not in f.read_text(errors="replace"), f
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [p.name for p in tmp.iterdir() if "bridgekit" in p.name] == []


def test_a_killed_runs_leftovers_are_scanned_and_quarantined_by_the_next_run(tmp_path: Path) -> None:
    out, tmp = tmp_path / "runs", tmp_path / "tmp"
    tmp.mkdir()
    proc = _run_cli(["run", "leak_then_wait", "--path", str(RB), "--out", str(out)],
                    env={**os.environ, "TMPDIR": str(tmp)})
    _wait_for(lambda: (nb := _running_notebook(out)) is not None and TOKEN_SHAPE in nb.read_text(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert [p.name for p in tmp.iterdir() if "bridgekit" in p.name] == []  # no records file left behind
    run_runbook("raise_error", {"error": "ValueError"}, path=RB, out=out, raise_on_failure=False)
    dirs = sorted(p for p in out.iterdir())
    assert [p.name.split("-", 1)[1] for p in dirs] == ["leak_then_wait", "raise_error"]
    killed = dirs[0]
    import json

    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "killed" and manifest["quarantine"]["findings"]
    assert all(TOKEN_SHAPE not in f.read_text(errors="replace") for f in killed.iterdir())
    assert "Quarantined" in (killed / "leak_then_wait.ipynb").read_text()


def test_sigterm_stops_a_run_with_its_documented_code_and_scans_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = _run_cli(["run", "leak_then_wait", "--path", str(RB), "--out", str(out)])
    _wait_for(lambda: (nb := _running_notebook(out)) is not None and TOKEN_SHAPE in nb.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped by SIGTERM")
    dirs = list(out.iterdir())
    assert len(dirs) == 1 and all(TOKEN_SHAPE not in f.read_text(errors="replace") for f in dirs[0].iterdir())


# -- bridgekit sql reads the warehouse and nothing else ----------------------------------------------------


@pytest.fixture()
def warehouse_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.bootstrap()
    config = tmp_path / "bridgekit.toml"
    config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{wh.path}"\n')
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    return wh


@pytest.mark.parametrize("query", [
    "select * from read_csv('/etc/passwd')",
    "copy (select 42) to '{target}'",
    "attach '{target}.duckdb' as other",
    "set enable_external_access = true",
])
def test_sql_is_confined_to_the_warehouse(query: str, warehouse_profile: Warehouse, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "written.csv"
    code = main(["sql", query.format(target=target)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: refused") and len(err.splitlines()) <= 2
    assert not target.exists() and not Path(f"{target}.duckdb").exists()
    # the same for the notebooks' read-only connection (%sql)
    import duckdb

    from bridgekit.analytics import read_only_connection

    conn = read_only_connection(warehouse_profile)
    try:
        with pytest.raises(duckdb.Error, match=r"external access|disabled by configuration"):
            conn.execute(query.format(target=target))
        assert conn.execute("select count(*) from bridgekit.sync_runs").fetchone() == (0,)
    finally:
        conn.close()
    assert not target.exists()


def test_sql_errors_keep_duckdbs_suggestion_and_hint_only_where_it_helps(warehouse_profile: Warehouse,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "select * from bridgekit.sync_runz"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert 'Did you mean "sync_runs"' in err[0] and len(err) == 1
    assert main(["sql", "select nosuchcolumn from bridgekit.sync_runs"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "nosuchcolumn" in err[0] and len(err) == 1
    assert main(["sql", "delete from bridgekit.sync_runs"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: query failed: ") and "read-only" in err[0] and "bridgekit sync" in err[1]
