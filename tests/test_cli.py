"""The command line: help on every command, version, profiles, and exit codes."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from bridgekit import __version__
from bridgekit.cli.main import cli


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
