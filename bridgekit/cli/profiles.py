"""The ``bridgekit profiles`` commands: list the profiles and show one's resolved values (never a secret)."""

from __future__ import annotations

import click

from bridgekit.config import list_profiles, load_profile, resolve_profile_name

__all__ = ["COMMANDS", "profiles"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=_CONTEXT)
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


COMMANDS: list[click.Command] = [profiles]
