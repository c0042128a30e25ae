"""The ``bridgekit`` command line: parse, call the library, render, and map errors to exit codes (in one place)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from bridgekit import __version__
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


def _register() -> None:
    """Attach every command: each module of this package lists its commands in ``COMMANDS``."""
    from bridgekit.cli import auth, demo, profiles, runbooks, warehouse
    from bridgekit.emulator.cli import emulator

    for module in (profiles, warehouse, runbooks, demo, auth):
        for command in module.COMMANDS:
            cli.add_command(command)
    cli.add_command(emulator)


_register()


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
