"""The warehouse commands of the ``bridgekit`` CLI: ``sync``, ``sql`` and ``export`` (thin translators over the Workbench)."""

from __future__ import annotations

import json
import shutil
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from bridgekit.sync import SyncReport
    from bridgekit.workbench import Workbench

__all__ = ["COMMANDS", "export", "sql", "sync"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_MAX_COLWIDTH = 40


def _workbench(ctx: click.Context, profile: str | None) -> Workbench:
    from bridgekit.workbench import Workbench

    root = ctx.find_root().obj or {}
    return Workbench.open(profile or root.get("profile"))


@click.command(context_settings=_CONTEXT)
@click.option("--profile", "-P", "profile", metavar="NAME", help="Profile to use (overrides the global --profile).")
@click.option("--only", metavar="TABLES",
              help="Comma-separated tables to sync (account,contact,graph.users); default: the profile's plan.")
@click.option("--full", is_flag=True, help="Reload the selected tables in full instead of applying deltas.")
@click.option("--watch", is_flag=True, help="Keep running: poll deltas every --interval seconds (Ctrl-C stops).")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Seconds between delta polls with --watch.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no report (errors still go to stderr).")
@click.pass_context
def sync(ctx: click.Context, profile: str | None, only: str | None, full: bool, watch: bool, interval: float,
         quiet: bool) -> None:
    """Mirror Dataverse tables and Graph resources into the local DuckDB warehouse.

    The first run loads every table in full; later runs apply change-tracking / delta changes. An
    interrupted sync resumes where it stopped. Prints a report per table (created, updated, deleted,
    duration, throughput, resynced). A failed table exits with its error's code: 4 when every failure is
    transient (throttled out, service unavailable: run again, it resumes), 3 for credentials, 2 for usage.
    """
    wb = _workbench(ctx, profile)
    # Progress bars only on an interactive terminal (tqdm would litter logs and CI output).
    progress = not quiet and sys.stderr.isatty()
    engine = wb.sync_engine(progress=progress)
    if watch:
        def show(report: SyncReport) -> None:
            if not quiet:
                click.echo(report.render())
            _failures(report)
            _publish(wb, quiet)
        click.echo(f"watching {wb.warehouse.path} every {interval:g}s (Ctrl-C to stop)", err=True)
        try:
            engine.watch(only, interval=interval, on_report=show, full=full)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the normal way to stop a watcher; every poll merged whole
            click.echo("stopped", err=True)
        return
    report = engine.run(only, full=full)
    if not quiet:
        click.echo(report.render())
    _failures(report)
    _publish(wb, quiet)
    if not report.ok:
        ctx.exit(int(report.exit_code))


def _publish(wb: Workbench, quiet: bool) -> None:
    """Bring the profile's lake copy up to the warehouse (nothing when it has none)."""
    for c in wb.publish_lake():
        if c.version is not None and not quiet:
            click.echo(f"lake: {c.table} version {c.version} ({c.mode}, {c.upserted} upserted, {c.deleted} "
                       f"deleted{', compacted' if c.optimized else ''})")


def _failures(report: SyncReport) -> None:
    """Each distinct failure once, on stderr (a credentials failure shared by every table is one error)."""
    for tables, exc in report.failures():
        where = tables[0] if len(tables) == 1 else f"{len(tables)} tables ({tables[0]}, ...)"
        click.echo(f"error: {where}: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)


@click.command(context_settings=_CONTEXT)
@click.argument("query")
@click.option("--profile", "-P", "profile", metavar="NAME", help="Profile to use (overrides the global --profile).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="Output format.")
@click.option("--max-rows", default=100, show_default=True, type=int, help="Rows shown in table format (0: all).")
def sql(query: str, profile: str | None, fmt: str, max_rows: int) -> None:
    """Run a read-only SQL QUERY on the warehouse (waits briefly while a sync merge holds it).

    Example: bridgekit sql "select name, revenue from dataverse.account order by revenue desc limit 5"
    """
    ctx = click.get_current_context()
    wb = _workbench(ctx, profile)
    df = wb.warehouse.sql(query, confined=True)  # SQL a user typed reaches the warehouse only
    if fmt == "csv":
        click.echo(df.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=1, default=str))
    else:
        # Long values are cut and wide results wrap into column blocks that fit the terminal (--format csv or
        # json gives every value whole).
        width = shutil.get_terminal_size((120, 24)).columns
        click.echo(df.to_string(index=False, max_rows=max_rows or None, max_colwidth=_MAX_COLWIDTH,
                                line_width=width))


@click.command(context_settings=_CONTEXT)
@click.option("--profile", "-P", "profile", metavar="NAME", help="Profile to use (overrides the global --profile).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "delta"]), default="parquet", show_default=True,
              help="Parquet files or Delta Lake tables.")
@click.option("--to", "to", required=True, metavar="PATH", help="Directory to write <schema>/<table> into.")
@click.option("--only", metavar="TABLES", help="Comma-separated schema.table names (default: every mirrored table).")
def export(profile: str | None, fmt: str, to: str, only: str | None) -> None:
    """Export the mirrored tables as Parquet files or Delta tables under PATH."""
    ctx = click.get_current_context()
    wb = _workbench(ctx, profile)
    tables = [t.strip() for t in only.split(",") if t.strip()] if only else None
    for path in wb.warehouse.export(to, format=fmt, tables=tables):
        click.echo(str(path))


COMMANDS: list[click.Command] = [sync, sql, export]
