"""``bridgekit emulator ...``: start, stop, status, serve, reset, mutate, faults (thin wrappers over process/admin)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import click

from bridgekit.emulator.process import (
    EmulatorInfo,
    admin,
    default_home,
    default_port,
    serve,
    start,
    status,
    stop,
)
from bridgekit.errors import EmulatorError

__all__ = ["emulator"]

_home_option = click.option("--home", type=click.Path(file_okay=False), default=None,
                            help="Emulator data directory (default: $BRIDGEKIT_EMULATOR_HOME or the user data dir).")
_port_option = click.option("--port", type=int, default=None,
                            help="Port on 127.0.0.1 (default: $BRIDGEKIT_EMULATOR_PORT or 47443; 0 = any free port).")


#: MSAL and azure-identity ask the public cloud's /common/discovery/instance about an authority host they do
#: not know (the emulator's), which cannot succeed offline; these settings skip that call.
INSTANCE_DISCOVERY_NOTE = (
    "  your own tools: turn off instance discovery, which otherwise calls login.microsoftonline.com:",
    "    MSAL:           ConfidentialClientApplication(..., authority=<authority>, instance_discovery=False)",
    "    azure-identity: ClientSecretCredential(..., authority=<base url>, disable_instance_discovery=True)",
    "    msgraph-sdk:    pass such an azure-identity credential, and allowed_hosts=[<emulator host>] to",
    "                    AzureIdentityAuthenticationProvider; trust the CA certificate above in every client",
)


def _running(home: str | None) -> EmulatorInfo:
    info = status(home)
    if info is None:
        raise click.ClickException(f"no emulator is running for {home or default_home()}; "
                                   "run `bridgekit emulator start`")
    return info


def _describe(info: EmulatorInfo) -> None:
    click.echo(f"Emulator running (pid {info.pid}) at {info.base_url}")
    click.echo(f"  authority:      {info.authority}")
    click.echo(f"  tenant:         {info.tenant_id}")
    click.echo(f"  Dataverse:      {info.dataverse_url}   (Web API: {info.dataverse_url}/api/data/v9.2)")
    click.echo(f"  Graph:          {info.graph_url}   (API: {info.graph_url}/v1.0)")
    click.echo(f"  CA certificate: {info.ca_bundle}")
    click.echo(f"  demo client id: {info.client_id}")
    click.echo(f"    credential:   the certificate at {info.certificate_path} (key {info.private_key_path})")
    if info.secret_client_id:
        click.echo(f"  secret app id:  {info.secret_client_id}")
        click.echo("    credential:   secret from $BRIDGEKIT_EMULATOR_CLIENT_SECRET")
    else:
        click.echo("  secret app:     inactive (set BRIDGEKIT_EMULATOR_CLIENT_SECRET before start to enable it)")
    click.echo(f"  home:           {info.home}")
    click.echo(f"  log:            {info.log_path}")
    for line in INSTANCE_DISCOVERY_NOTE:
        click.echo(line)
    with contextlib.suppress(EmulatorError):
        live = admin(info, "info")
        if live.get("data_error"):
            click.echo(f"  WARNING: no synthetic data ({live['data_error']}); see the log, then "
                       "`bridgekit emulator reset`", err=True)


@click.group()
def emulator() -> None:
    """Run the local HTTPS emulator of Entra ID, Dataverse and Microsoft Graph."""


@emulator.command("start")
@_home_option
@_port_option
@click.option("--scale", default="small", show_default=True, help="Size of the synthetic company made on first start.")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed for the synthetic company and tenant ids.")
def start_cmd(home: str | None, port: int | None, scale: str, seed: int) -> None:
    """Start the emulator in the background (or show the one already running)."""
    _describe(start(home, port, scale=scale, seed=seed))


@emulator.command("stop")
@_home_option
def stop_cmd(home: str | None) -> None:
    """Stop the background emulator."""
    click.echo("Emulator stopped." if stop(home) else "No emulator was running.")


@emulator.command("status")
@_home_option
def status_cmd(home: str | None) -> None:
    """Say whether the emulator is running, and where."""
    info = status(home)
    if info is None:
        click.echo(f"No emulator is running for {home or default_home()}.")
        raise SystemExit(1)
    _describe(info)


@emulator.command("serve")
@_home_option
@_port_option
@click.option("--scale", default="small", show_default=True, help="Size of the synthetic company made on first start.")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed for the synthetic company and tenant ids.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log level for the emulator log.")
@click.option("--access-log/--no-access-log", default=False, show_default=True,
              help="Log one line per request (paths only; never headers or bodies).")
def serve_cmd(home: str | None, port: int | None, scale: str, seed: int, log_level: str, access_log: bool) -> None:
    """Run the emulator in the foreground (Ctrl-C stops it)."""
    serve(home, default_port() if port is None else port, scale, seed, log_level=log_level, access_log=access_log)


@emulator.command("reset")
@_home_option
@click.option("--scale", default=None, help="Size of the regenerated company (default: the current one).")
@click.option("--seed", default=None, type=int, help="Seed for the regenerated company (default: the current one).")
@click.option("--clean-integration", is_flag=True,
              help="Plant no integration-layer defects (a clean tenant for the assessment's integration area).")
def reset_cmd(home: str | None, scale: str | None, seed: int | None, clean_integration: bool) -> None:
    """Throw away all data and regenerate the synthetic company (delta tokens become invalid)."""
    body: dict[str, Any] = {"integration_defects": not clean_integration}
    if scale:
        body["scale"] = scale
    if seed is not None:
        body["seed"] = seed
    result = admin(_running(home), "reset", body)
    click.echo(f"Regenerated scale={result['scale']} seed={result['seed']} in {result['seconds']} s.")


@emulator.command("mutate")
@_home_option
@click.option("--creates", default=0, show_default=True, type=int, help="Records to create.")
@click.option("--updates", default=0, show_default=True, type=int, help="Records to update.")
@click.option("--deletes", default=0, show_default=True, type=int, help="Records to delete.")
@click.option("--seed", default=None, type=int, help="Seed for choosing what changes (default: random).")
@click.option("--json", "as_json", is_flag=True, help="Print every id created, updated and deleted, as JSON.")
def mutate_cmd(home: str | None, creates: int, updates: int, deletes: int, seed: int | None, as_json: bool) -> None:
    """Simulate live activity: create, update and delete records across Dataverse and Graph.

    Prints one summary line (records per change and the tables touched); --json prints the ids.
    """
    result = admin(_running(home), "mutate", {"creates": creates, "updates": updates, "deletes": deletes,
                                               "seed": seed})["result"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(mutation_summary(result))


def mutation_summary(result: dict[str, Any]) -> str:
    """One line: the changes made, the records and tables they touched, and the new change version."""
    counts = result.get("counts") or {}
    tables = sorted({t for verb in ("created", "updated", "deleted") for t in (result.get(verb) or {})})
    return (f"{counts.get('creates', 0)} created, {counts.get('updates', 0)} updated, {counts.get('deletes', 0)} "
            f"deleted: {counts.get('records', 0)} records in {len(tables)} tables; change version "
            f"{result.get('version')} (the ids: --json)")


@emulator.command("faults")
@_home_option
@click.option("--throttle-rate", type=click.FloatRange(0, 1), default=None, help="Fraction of calls answered 429.")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=None, help="Fraction of calls answered 503.")
@click.option("--latency-ms", type=click.IntRange(0), default=None, help="Delay added to every call.")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=None,
              help="Fraction of connections closed without an answer.")
@click.option("--retry-after", type=click.IntRange(0), default=None,
              help="Retry-After seconds on injected 429/503 (default 1).")
@click.option("--expire-deltas/--keep-deltas", default=None,
              help="Make every delta / change-tracking token expired (forces a resync).")
@click.option("--clear", is_flag=True, help="Remove all faults first.")
def faults_cmd(home: str | None, throttle_rate: float | None, error_rate: float | None, latency_ms: int | None,
               drop_rate: float | None, retry_after: int | None, expire_deltas: bool | None, clear: bool) -> None:
    """Show or set injected faults for the Dataverse and Graph endpoints."""
    body: dict[str, Any] = {"clear": clear} if clear else {}
    for key, value in (("throttle_rate", throttle_rate), ("error_5xx_rate", error_rate),
                       ("latency_ms", latency_ms), ("drop_rate", drop_rate), ("retry_after_s", retry_after),
                       ("force_delta_expiry", expire_deltas)):
        if value is not None:
            body[key] = value
    result = admin(_running(home), "faults", body if body else None)
    for key, value in result.items():
        click.echo(f"{key:20} {value}")
