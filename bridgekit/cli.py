"""The ``bridgekit`` command line: parse, call the library, render, and map errors to exit codes (in one place)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from bridgekit import __version__
from bridgekit.config import list_profiles, load_profile, resolve_profile_name
from bridgekit.errors import BridgekitError, ExitCode

__all__ = ["cli", "main"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception (README, "Exit codes")."""
    if isinstance(exc, BridgekitError):
        return int(exc.exit_code)
    if isinstance(exc, click.UsageError):
        return int(ExitCode.USAGE)
    return int(ExitCode.ERROR)


class BridgekitGroup(click.Group):
    """A click group that turns BridgekitError into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BridgekitError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exit_code_for(exc))


@click.group(cls=BridgekitGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--profile", "-P", "profile", metavar="NAME", envvar=None,
              help="Profile to use (default: $BRIDGEKIT_PROFILE, then default_profile in bridgekit.toml, "
                   "then the built-in 'emulator').")
@click.option("--verbose", "-v", count=True, help="More logging (-v INFO, -vv DEBUG).")
@click.version_option(__version__, "--version", prog_name="bridgekit")
@click.pass_context
def cli(ctx: click.Context, profile: str | None, verbose: int) -> None:
    """bridgekit: Dynamics 365 (Dataverse) and Microsoft 365 (Graph) integration workbench.

    Sync both into a local DuckDB warehouse, run headless runbooks, and analyse in JupyterLab.
    With no configuration it talks to the built-in local tenant emulator.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["profile"] = profile


@cli.group(context_settings=CONTEXT_SETTINGS)
def profiles() -> None:
    """List and inspect profiles (secrets are never shown)."""


@profiles.command("list")
@click.pass_context
def profiles_list(ctx: click.Context) -> None:
    """List the available profiles and mark the one in use."""
    current, origin = resolve_profile_name(ctx.obj.get("profile"))
    for name, source in list_profiles():
        mark = "*" if name == current else " "
        click.echo(f"{mark} {name:<20} {source}")
    click.echo(f"(in use: {current}, chosen by {origin})")


@profiles.command("show")
@click.argument("name", required=False)
@click.pass_context
def profiles_show(ctx: click.Context, name: str | None) -> None:
    """Show a profile's resolved values and where each came from (NAME defaults to the profile in use)."""
    prof = load_profile(name or ctx.obj.get("profile"))
    click.echo(f"profile: {prof.name}")
    rows = prof.describe()
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        click.echo(f"  {key:<{width}}  {value}    [{source}]")


def _add_optional(group: click.Group, loader: Callable[[], click.Command]) -> None:
    """Attach a sub-command group that lives in another module (kept import-light)."""
    try:
        group.add_command(loader())
    except ImportError as exc:  # pragma: no cover - only while a module is absent
        logging.getLogger(__name__).debug("command unavailable: %s", exc)


def _emulator_group() -> click.Command:
    from bridgekit.emulator.cli import emulator

    cmd: click.Command = emulator
    return cmd


def _auth_group() -> click.Command:
    from bridgekit.auth_cli import auth

    cmd: click.Command = auth
    return cmd


def _workbench_commands() -> list[click.Command]:
    from bridgekit import cli_commands

    return list(cli_commands.COMMANDS)


_add_optional(cli, _emulator_group)
_add_optional(cli, _auth_group)
try:
    for _cmd in _workbench_commands():
        cli.add_command(_cmd)
except ImportError:  # pragma: no cover - only while the module is absent
    pass
for _cmd in __import__("bridgekit.cli_runbooks", fromlist=["COMMANDS"]).COMMANDS:
    cli.add_command(_cmd)
for _cmd in __import__("bridgekit.cli_demo", fromlist=["COMMANDS"]).COMMANDS:
    cli.add_command(_cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bridgekit`` console script."""
    try:
        rv = cli.main(args=argv, prog_name="bridgekit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE) if isinstance(exc, click.UsageError) else int(exc.exit_code)
    except BridgekitError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        return exit_code_for(exc)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
