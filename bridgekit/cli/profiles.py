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
    rows = prof.describe()
    note = ""
    if prof.auth == "emulator":
        # The emulator's tenant, app, URLs and CA exist only once it runs: show them when it does.
        from bridgekit.emulator.process import status
        from bridgekit.workbench import with_emulator

        info = status(prof.emulator_home)
        if info is not None:
            # Its values, with the profile's own auth row ("emulator" says where they come from).
            own = dict((key, (key, value, source)) for key, value, source in rows)
            rows = [own["auth"] if row[0] == "auth" else row for row in with_emulator(prof, info).describe()]
        else:
            rows = [row for row in rows if row[0] not in _EMULATOR_RUNTIME_KEYS]
            note = ("the emulator is not running: its tenant, client id, URLs and CA are filled in when it starts "
                    "(bridgekit emulator start, or any command that needs it)")
    click.echo(f"profile: {prof.name}")
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        click.echo(f"  {key:<{width}}  {value}    [{source}]")
    if note:
        click.echo(note)


# What a running emulator fills in: the public cloud's defaults for them would be wrong for an emulator profile.
_EMULATOR_RUNTIME_KEYS = ("tenant_id", "client_id", "certificate_path", "dataverse_url", "graph_url",
                          "authority_host", "ca_bundle")


COMMANDS: list[click.Command] = [profiles]
