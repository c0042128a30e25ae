"""The ``bridgekit lake`` commands: the Delta Lake copy's status, a publish on demand, compaction and vacuum."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from bridgekit.cli.warehouse import _workbench
from bridgekit.errors import ConfigError

if TYPE_CHECKING:
    from bridgekit.lake import Lake
    from bridgekit.workbench import Workbench

__all__ = ["COMMANDS", "lake"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _lake_of(ctx: click.Context) -> tuple[Workbench, Lake]:
    wb = _workbench(ctx, None)
    if wb.lake is None:
        raise ConfigError(f"profile '{wb.profile.name}' has no lake",
                          hint=f'add [profiles.{wb.profile.name}.lake] with url = "<path or abfss://...>" to '
                               "bridgekit.toml")
    return wb, wb.lake


@click.group(context_settings=_CONTEXT)
def lake() -> None:
    """The profile's Delta Lake copy ([profiles.X.lake]), kept current by `bridgekit sync`."""


@lake.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Per table: the lake's Delta version, files, the sync run it reaches, and whether it is current."""
    wb, lk = _lake_of(ctx)
    rows = lk.status(wb.warehouse)
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    for r in rows:
        state = "current" if r["current"] else "behind (the next sync catches it up)"
        click.echo(f"{r['table']:<32} version {r['lake_version']!s:<5} files {r['files']!s:<5} {state}")


@lake.command("publish")
@click.pass_context
def publish_cmd(ctx: click.Context) -> None:
    """Bring the lake up to the warehouse now (what `bridgekit sync` does after each merge)."""
    wb, _ = _lake_of(ctx)
    commits = wb.publish_lake()
    changed = [c for c in commits if c.version is not None]
    for c in changed:
        click.echo(f"{c.table}: version {c.version} ({c.mode}, {c.upserted} upserted, {c.deleted} deleted)")
    click.echo(f"{len(changed)} table(s) published, {len(commits) - len(changed)} already current")


@lake.command("optimize")
@click.pass_context
def optimize_cmd(ctx: click.Context) -> None:
    """Compact every table's small files, then vacuum files older than the profile's retention_hours."""
    wb, lk = _lake_of(ctx)
    for r in lk.optimize(warehouse=wb.warehouse):
        click.echo(f"{r['table']}: {r['files_before']} -> {r['files_after']} files, {r['vacuumed']} vacuumed")


COMMANDS: list[click.Command] = [lake]
