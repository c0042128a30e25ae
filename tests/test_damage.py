"""Damage handled: a damaged staging file or warehouse, a read-only directory, Ctrl-C in a merge, a service that
stops answering: one-line messages, the documented exit code, and nothing synced before lost."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bridgekit.warehouse import Warehouse
from tests.test_resume import _bridgekit, _config, _env, _tables
from tests.test_sync import MemorySource, _engine, _expected, _mirror


def _truncate(path: Path, keep: float = 0.5) -> None:
    with path.open("r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def _errors(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith(("error:", "hint:", "Traceback"))]


def test_a_damaged_staging_file_is_set_aside_and_its_tables_fetched_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = MemorySource(n=200, page_size=10)
    eng = _engine(tmp_path, src)
    assert eng.run().ok
    for i, rid in enumerate(sorted(src.rows)[:150]):
        src.upsert(rid, f"d{i}", i)
    src.fail_at = 8  # a delta dies with pages staged
    with pytest.raises(RuntimeError):
        _engine(tmp_path, src).run()
    src.fail_at = None
    staging = eng.warehouse.staging_path
    _truncate(staging, 0.3)
    with caplog.at_level(logging.WARNING, logger="bridgekit.warehouse"):
        report = _engine(tmp_path, src).run()
    assert report.ok and not report.table("widget").resumed and report.table("widget").mode == "delta"
    assert _mirror(eng.warehouse) == _expected(src)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "set aside as" in warned[0]
    assert len(list(tmp_path.glob(staging.name + ".damaged-*"))) == 1


def _local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warehouse: Path) -> None:
    toml = tmp_path / "bridgekit.toml"
    toml.write_text(textwrap.dedent(f"""
        [profiles.local]
        auth = "emulator"
        warehouse = "{warehouse}"
        sync = {{ dataverse = ["team", "transactioncurrency"], graph = ["groups"] }}
    """))
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(toml))
    monkeypatch.setenv("BRIDGEKIT_PROFILE", "local")


def test_a_damaged_warehouse_is_one_line_in_sql_and_sync_naming_the_rebuild(
        emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.cli.main import cli

    path = tmp_path / "wh" / "d.duckdb"
    _local(tmp_path, monkeypatch, path)
    runner = CliRunner()
    assert runner.invoke(cli, ["sync", "--quiet"]).exit_code == 0
    _truncate(path, 0.02)  # a copy cut short: the header survives, the catalog does not
    for args in (["sql", "select count(*) from dataverse.team"], ["sync", "--quiet"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 1
        lines = _errors(res.output)
        assert len(lines) == 2, res.output
        assert lines[0].startswith(f"error: the warehouse {path} is damaged (truncated or corrupt)")
        assert lines[1] == f"hint: set it aside and rebuild it from the services: mv '{path}' '{path}.damaged' " \
                           "&& bridgekit sync --full"
    # The hint works as written.
    path.rename(f"{path}.damaged")
    assert runner.invoke(cli, ["sync", "--full", "--quiet"]).exit_code == 0
    assert runner.invoke(cli, ["sql", "select count(*) as n from dataverse.team"]).exit_code == 0


def test_a_read_only_warehouse_directory_is_one_line_and_leaves_the_warehouse_readable(
        emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit import warehouse
    from bridgekit.cli.main import cli

    folder = tmp_path / "ro"
    path = folder / "r.duckdb"
    _local(tmp_path, monkeypatch, path)
    runner = CliRunner()
    assert runner.invoke(cli, ["sync", "--quiet"]).exit_code == 0
    before = _tables(path)
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the kernel's answer for this directory explicit
        real_open = os.open

        def denied(file: Any, flags: int, *args: Any, **kw: Any) -> int:
            if Path(file).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, flags, *args, **kw)

        monkeypatch.setattr(warehouse.os, "open", denied)
    try:
        res = runner.invoke(cli, ["sync"])
        assert res.exit_code == 1
        assert _errors(res.output) == [
            f"error: cannot write the warehouse directory {folder}: permission denied",
            "hint: make the directory writable by this user, or point the profile's warehouse at a writable path"]
        assert _tables(path) == before
    finally:
        folder.chmod(0o755)


_INTERRUPTED_MERGE = textwrap.dedent("""
    import os, signal, sys
    from bridgekit import warehouse
    from bridgekit.cli.main import main
    apply = warehouse.Staging._apply
    seen = []
    def ctrl_c(self, state, **kw):
        seen.append(state.table)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second table is being merged
        return apply(self, state, **kw)
    warehouse.Staging._apply = ctrl_c
    sys.exit(main(sys.argv[1:]))
""")


def test_ctrl_c_during_a_merge_rolls_the_run_back_and_exits_130(emulator: Any, tmp_path: Path) -> None:
    toml = _config(tmp_path, "int")
    only = "account,contact"
    assert _bridgekit(toml, "sync", "--only", only).returncode == 0
    wh = tmp_path / "int.duckdb"
    before, runs = _tables(wh), len(Warehouse(wh).sql("select * from bridgekit.sync_runs"))
    emulator.admin("mutate", {"creates": 20, "updates": 40, "deletes": 10, "seed": 130})
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_MERGE, "sync", "--only", only], env=_env(toml),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert _errors(proc.stderr) == ["error: interrupted: nothing of this run was merged",
                                    "hint: run the sync again: it resumes from the pages staged so far"]
    assert _tables(wh) == before and len(Warehouse(wh).sql("select * from bridgekit.sync_runs")) == runs
    again = _bridgekit(toml, "sync", "--only", only)
    assert again.returncode == 0 and again.stdout.count("resumed") == 2


_STOPS_ANSWERING = textwrap.dedent("""
    import functools, sys, time
    from bridgekit import http, warehouse
    from bridgekit.cli.main import main
    # The production budget is 45 s without an answer; a shorter one keeps the test short.
    http.RetryPolicy = functools.partial(http.RetryPolicy, unanswered_budget=6.0, answer_timeout=2.5)
    marker = sys.argv[1]
    write_page = warehouse.Staging.write_page
    def checkpoint(self, state, *args, **kw):
        write_page(self, state, *args, **kw)
        if state.table == "dataverse.contact" and state.pages == 1:
            open(marker, "w").write("staged")
            time.sleep(3)  # the test stops the service meanwhile
    warehouse.Staging.write_page = checkpoint
    sys.exit(main(sys.argv[2:]))
""")


def test_a_service_that_stops_answering_is_reported_as_transient_and_keeps_what_was_synced(
        emulator: Any, tmp_path: Path) -> None:
    from bridgekit.http import RetryPolicy

    policy = RetryPolicy()
    # A call gives up once the budget is spent (an attempt's wait for an answer is cut to what is left, and
    # waiting for a connection adds at most the 10 s connect timeout): reported within a minute.
    assert policy.unanswered_budget + 10.0 < 60 and policy.answer_timeout <= policy.unanswered_budget
    toml = _config(tmp_path, "hang", page_size=100)
    marker = tmp_path / "hang.staged"
    proc = subprocess.Popen([sys.executable, "-c", _STOPS_ANSWERING, str(marker), "sync", "--only",
                             "account,contact,graph.users", "--full"], env=_env(toml),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None
    with emulator.faults(latency_ms=20000):  # every request now hangs
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-2000:]
    lines = _errors(err)
    # One error for contact and graph.users (not attempted: no answer at all stops every table, at once)
    assert len(lines) == 2 and lines[0].startswith("error: 2 tables (dataverse.contact, ...): dataverse stopped "
                                                   "answering: GET ")
    assert lines[1].startswith("hint: the service is unavailable; run the sync again later")
    assert any("retrying (attempt 2" in x for x in err.splitlines())  # a progress line while it retried
    # account, fetched before the service stopped, was merged; the failure is recorded.
    wh = Warehouse(tmp_path / "hang.duckdb")
    runs = wh.sql("select table_name, status from bridgekit.sync_runs order by 1")
    assert list(zip(runs["table_name"], runs["status"], strict=True)) == [("dataverse.account", "ok"),
                                                                         ("dataverse.contact", "error"),
                                                                         ("graph.users", "error")]
    assert wh.sql("select count(*) as n from dataverse.account")["n"][0] > 0
