"""The command line: help on every command, version, profiles, and exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from bridgekit import __version__
from bridgekit.cli.main import cli, main

ROOT = Path(__file__).resolve().parent.parent


def walk(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += walk(sub, (*path, name))
    return out


def test_every_command_has_help() -> None:
    runner = CliRunner()
    commands = walk(cli)
    assert len(commands) >= 4
    for path, cmd in commands:
        assert cmd.help, f"`bridgekit {' '.join(path)}` has no help text"
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        result = runner.invoke(cli, [*path, "-h"])
        assert result.exit_code == 0, (path, result.output)


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_profiles_show_emulator() -> None:
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "profiles", "show", "emulator"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "profile: emulator" in proc.stdout and "built-in" in proc.stdout


def test_usage_error_exit_code() -> None:
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2


# -- what a first user met: the running emulator's values, one-line errors, output that fits --------------------


def test_profiles_show_emulator_gives_the_running_emulators_urls_and_ca(emulator: Any) -> None:
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "profiles", "show", "emulator"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert emulator.graph_url in proc.stdout and emulator.ca_bundle in proc.stdout
    assert emulator.tenant_id in proc.stdout and "[running emulator]" in proc.stdout
    assert "graph.microsoft.com" not in proc.stdout and "login.microsoftonline.com" not in proc.stdout


def test_profiles_show_emulator_says_its_values_come_when_it_starts(tmp_path: Path) -> None:
    env = os.environ | {"BRIDGEKIT_EMULATOR_HOME": str(tmp_path / "not-started")}
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "profiles", "show", "emulator"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "filled in when it starts" in proc.stdout
    assert "graph.microsoft.com" not in proc.stdout


@pytest.fixture()
def synced(demo_runs: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The session demo's synced warehouse, as the profile in use."""
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(demo_runs.config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    return demo_runs


@pytest.mark.parametrize("where", ["/proc/bridgekit-cannot-create", "a-file"])
def test_export_to_a_path_that_cannot_be_written_is_an_error_and_a_hint(where: str, synced: Any, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / where if where == "a-file" else Path(where)
    if where == "a-file":
        target.write_text("in the way")
    code = main(["export", "--format", "parquet", "--to", str(target), "--only", "dataverse.team"])
    err = capsys.readouterr().err
    assert code == 1  # README: a file or folder that cannot be read or written
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and str(target) in lines[0]
    assert lines[1].startswith("hint: ") and ("choose another path" in lines[1] or "name a folder" in lines[1])


def test_an_unexpected_error_is_one_line_and_its_traceback_only_with_v(capsys: pytest.CaptureFixture[str]) -> None:
    @cli.command("raise-unexpected")
    def raiser() -> None:
        raise ValueError("something nobody planned for\nsecond line")

    try:
        code = main(["raise-unexpected"])
        err = capsys.readouterr().err
        assert code == 1
        assert err.splitlines() == ["error: unexpected ValueError: something nobody planned for",
                                    "hint: run the command again with -v to see the traceback, and report it"]
        with pytest.raises(ValueError):
            main(["-v", "raise-unexpected"])
    finally:
        cli.commands.pop("raise-unexpected")


@pytest.mark.parametrize(("query", "says", "hint"), [
    ("select nme from dataverse.account", "Candidate bindings", None),
    ("select * from dataverse.acount", 'Did you mean "account"', None),
    ("delete from dataverse.account", "read-only", "the warehouse is read-only here"),
])
def test_a_refused_query_exits_2_with_duckdbs_own_advice(query: str, says: str, hint: str | None, synced: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sql", query])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert lines[0].startswith("error: query failed: ") and says in lines[0]
    assert "duckdb_tables" not in "\n".join(lines)
    assert (lines[1:] == []) if hint is None else (len(lines) == 2 and hint in lines[1])


def test_sql_rows_fit_the_terminal(synced: Any, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["sql", "select * from dataverse.account limit 5"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "accountid" in out  # every column is there, wrapped into blocks


def test_runbooks_keeps_the_help_comments_in_one_narrow_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "110")
    out = CliRunner().invoke(cli, ["runbooks", "--path", str(ROOT / "runbooks" / "assess.ipynb")]).output
    columns = {line.index("# ") for line in out.splitlines() if "# " in line}
    assert len(columns) == 1 and columns.pop() <= 4 + 36 + 2, out  # not pushed right by the widest default
    assert max(len(line) for line in out.splitlines()) <= 110


def test_demo_says_the_emulator_was_running_and_names_both_sync_durations(demo_runs: Any) -> None:
    out = demo_runs.output
    assert "the local tenant emulator is already running at" in out and "==> starting" not in out
    sync_line = next(line for line in out.splitlines() if line.startswith("sync:    exit"))
    found = re.search(r"; sync ([\d.]+) s \(runbook ([\d.]+) s with kernel start and report\)", sync_line)
    assert found, sync_line
    manifest = json.loads((demo_runs.sync / "manifest.json").read_text())
    assert float(found.group(1)) == round(manifest["results"]["duration_s"], 1)
    assert float(found.group(2)) == round(manifest["duration_s"], 1)
