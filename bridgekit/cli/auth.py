"""The ``bridgekit auth`` command group: login, status and logout for the profile in use."""

from __future__ import annotations

import click

from bridgekit.auth import login, logout, status
from bridgekit.config import Profile, load_profile

__all__ = ["COMMANDS", "auth"]


def _profile(ctx: click.Context) -> Profile:
    name = (ctx.find_root().obj or {}).get("profile")
    profile = load_profile(name)
    if profile.is_emulator:
        # The emulator's runtime values (URLs, tenant, app certificate) exist only once it runs.
        from bridgekit.workbench import resolve_runtime

        profile = resolve_runtime(profile)
    return profile


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def auth() -> None:
    """Sign in, show who bridgekit authenticates as, and sign out (device code profiles)."""


@auth.command("login")
@click.pass_context
def login_cmd(ctx: click.Context) -> None:
    """Sign in: the device code flow for device_code profiles, a token check for app profiles."""
    info = login(_profile(ctx), on_message=lambda text: click.echo(text, err=True))
    _show(info)


@auth.command("status")
@click.pass_context
def status_cmd(ctx: click.Context) -> None:
    """Show the auth mode, authority, account and whether a token is available without signing in."""
    info = status(_profile(ctx))
    _show(info)
    if not info["signed_in"]:
        ctx.exit(3)


@auth.command("logout")
@click.pass_context
def logout_cmd(ctx: click.Context) -> None:
    """Forget the signed-in user (removes the persistent token cache of the profile)."""
    profile = _profile(ctx)
    click.echo("signed out" if logout(profile) else f"no cached sign-in for profile '{profile.name}'")


def _show(info: dict[str, object]) -> None:
    for key in ("profile", "mode", "authority", "client_id", "account", "cache", "signed_in", "error", "hint"):
        value = info.get(key)
        if value is not None:
            click.echo(f"{key:<10} {value}")


COMMANDS: list[click.Command] = [auth]
