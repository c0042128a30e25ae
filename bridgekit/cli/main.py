"""The ``bridgekit`` command line: parse, call the library, render, and map errors to exit codes (in one place)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import click

from bridgekit import __version__
from bridgekit.errors import BridgekitError, ExitCode, exit_code_for

__all__ = ["Terminated", "cli", "main", "sigterm_as_interrupt"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a scheduler or CI stops a job: unwinds like Ctrl-C (partial work cleaned up), exits 143."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block, so a stopped run cleans up instead of dying.

    Python's default for SIGTERM ends the process without unwinding: no rollback message, no scan of
    partial outputs. Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, hint: str | None, code: int) -> int:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    return int(code)


def _interrupted(exc: BaseException) -> int:
    code = ExitCode.TERMINATED if isinstance(exc, Terminated) else ExitCode.INTERRUPTED
    click.echo(f"interrupted: {'stopped by SIGTERM' if code == ExitCode.TERMINATED else 'stopped by Ctrl-C'}; "
               "nothing of the interrupted step was merged, run the command again to resume", err=True)
    return int(code)


def _path_hint(exc: OSError) -> str:
    """What to do about a file or folder that cannot be read or written, by the reason the system gave."""
    if isinstance(exc, FileNotFoundError):
        return "the path or a folder above it does not exist and cannot be created there: choose another path"
    if isinstance(exc, NotADirectoryError):
        return "a file stands where a folder is needed: name a folder (it is created when missing)"
    if isinstance(exc, IsADirectoryError):
        return "a folder stands where a file is needed: name a file"
    if isinstance(exc, PermissionError):
        return "you may not write or read there: choose a path you own, or change its permissions"
    if isinstance(exc, FileExistsError):
        return "remove it or choose another path"
    return "check the path, the free space and the permissions, then run the command again"


class BridgekitGroup(click.Group):
    """The root group: the one place where an error becomes its message and documented exit code.

    A bridgekit error prints ``error:`` and ``hint:`` lines and exits with its class's code (README, "Exit
    codes"); a file the user named that cannot be read or written is two such lines too, and anything else
    unexpected is one line and exit 1. ``-v`` shows the traceback instead. Mapped here, in the group, so the CLI
    behaves the same however it is invoked.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BridgekitError as exc:
            ctx.exit(_fail(exc.message, exc.hint, exit_code_for(exc)))
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # The reader went away (`bridgekit sql ... | head`): nothing more to say, and nowhere to say it.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stays open: Python flushes stdout at exit)
            ctx.exit(0)
        except OSError as exc:
            if (ctx.obj or {}).get("verbose", 0) >= 1:
                raise
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            ctx.exit(_fail(f"{exc.strerror or exc}{where}", _path_hint(exc), ExitCode.ERROR))
        except Exception as exc:
            if (ctx.obj or {}).get("verbose", 0) >= 1:
                raise
            ctx.exit(_fail(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0],
                           "run the command again with -v to see the traceback, and report it", ExitCode.ERROR))


@click.group(cls=BridgekitGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--profile", "-P", "profile", metavar="NAME", envvar=None,
              help="Profile to use (default: $BRIDGEKIT_PROFILE, then default_profile in bridgekit.toml, "
                   "then the built-in 'emulator').")
@click.option("--verbose", "-v", count=True,
              help="More logging (-v INFO and tracebacks on errors, -vv DEBUG); default: warnings only.")
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
    ctx.obj["verbose"] = verbose


def _register() -> None:
    """Attach every command: each module of this package lists its commands in ``COMMANDS``."""
    from bridgekit.cli import auth, demo, lake, profiles, runbooks, warehouse
    from bridgekit.emulator.cli import emulator

    for module in (profiles, warehouse, lake, runbooks, demo, auth):
        for command in module.COMMANDS:
            cli.add_command(command)
    cli.add_command(emulator)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bridgekit`` console script: usage errors exit 2, Ctrl-C 130, SIGTERM 143; errors
    raised by commands are mapped by :class:`BridgekitGroup`."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_as_interrupt():
            rv = cli.main(args=args, prog_name="bridgekit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            return _interrupted(exc.__context__)
        click.echo("aborted", err=True)
        return int(ExitCode.INTERRUPTED)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE) if isinstance(exc, click.UsageError) else int(exc.exit_code)
    except BridgekitError as exc:  # raised while parsing, before a command runs (a bad profile name)
        return _fail(exc.message, exc.hint, exit_code_for(exc))
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
