"""Starting, stopping and restarting the emulator process; its CLI; where it listens."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import CASession

from bridgekit.emulator import process
from bridgekit.emulator.cli import emulator as emulator_group
from bridgekit.errors import EmulatorError


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            addr, port_hex = parts[1].split(":")
            if parts[3] == "0A" and int(port_hex, 16) == port:
                found.add(addr)
    return found


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_server_listens_on_loopback_only(emulator):
    addresses = _listening_addresses(emulator.port)
    if addresses:
        assert addresses == {"0100007F"}  # 127.0.0.1, little-endian hex as /proc writes it
    ip = _non_loopback_ip()
    if ip is not None:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((ip, emulator.port))
    assert addresses or ip, "could not observe the listening socket in any way"


def test_start_is_idempotent_and_status_reports_the_running_server(emulator):
    again = process.start(home=emulator.home)
    assert again.pid == emulator.pid and again.port == emulator.port
    assert process.status(emulator.home).pid == emulator.pid


def test_private_keys_and_admin_key_are_owner_only(emulator):
    home = Path(emulator.home)
    for path in (home / "tls" / "ca.key", home / "tls" / "server.key", Path(emulator.private_key_path),
                 home / "admin.key", home / "signing.key"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path} is {oct(mode)}"


def test_start_on_a_taken_port_fails_naming_the_log(emulator, tmp_path):
    with pytest.raises(EmulatorError) as err:
        process.start(home=tmp_path / "other", port=emulator.port, timeout=120)
    assert "emulator.log" in str(err.value)
    assert process.status(tmp_path / "other") is None


def _signing_key(session, info):
    key = session.get(f"{info.authority}/discovery/v2.0/keys", timeout=10).json()["keys"][0]
    return key["kid"], key["n"], key["e"]


def test_stop_then_restart_keeps_identity_apps_and_signing_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", "restart-secret-1")
    home = tmp_path / "emu"
    first = process.start(home=home, port=0, scale="small", seed=7)
    ca_session = CASession(first.ca_bundle)
    try:
        key = first.admin_key()
        created = ca_session.post(f"{first.base_url}/_emulator/apps", timeout=30,
                                  headers={"X-Emulator-Admin-Key": key},
                                  json={"name": "kept", "secret": "kept-secret-1"}).json()
        key_before = _signing_key(ca_session, first)
        ca_before = Path(first.ca_bundle).read_bytes()
        assert process.stop(home) is True
        assert process.status(home) is None
        assert process.stop(home) is False

        second = process.start(home=home, port=0)
        assert second.pid != first.pid
        assert (second.tenant_id, second.client_id, second.secret_client_id) == \
               (first.tenant_id, first.client_id, first.secret_client_id)
        assert Path(second.ca_bundle).read_bytes() == ca_before
        assert _signing_key(ca_session, second) == key_before
        token = ca_session.post(f"{second.authority}/oauth2/v2.0/token", timeout=30, data={
            "grant_type": "client_credentials", "client_id": created["client_id"], "client_secret": "kept-secret-1",
            "scope": f"{second.graph_url}/.default"})
        assert token.status_code == 200, token.text
    finally:
        process.stop(home)


def test_secret_app_is_inactive_without_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", raising=False)
    home = tmp_path / "nosecret"
    info = process.start(home=home, port=0, scale="small", seed=7)
    try:
        assert info.secret_client_id is None
    finally:
        process.stop(home)


def _commands(group: click.Group) -> list[str]:
    return sorted(group.commands)


@pytest.mark.parametrize("name", _commands(emulator_group))
def test_every_emulator_command_has_help(name):
    command = emulator_group.commands[name]
    assert command.help and command.help.strip()
    result = CliRunner().invoke(emulator_group, [name, "--help"])
    assert result.exit_code == 0
    assert " ".join(command.help.split()[:4]) in " ".join(result.output.split())


def test_cli_status_and_start_describe_the_running_emulator(emulator):
    result = CliRunner().invoke(emulator_group, ["status", "--home", emulator.home])
    assert result.exit_code == 0, result.output
    assert emulator.base_url in result.output
    assert emulator.client_id in result.output and emulator.certificate_path in result.output
    assert "secret from $BRIDGEKIT_EMULATOR_CLIENT_SECRET" in result.output
    assert emulator.client_secret not in result.output


def test_cli_faults_sets_and_clears(emulator):
    runner = CliRunner()
    try:
        result = runner.invoke(emulator_group, ["faults", "--home", emulator.home, "--latency-ms", "5",
                                                "--expire-deltas"])
        assert result.exit_code == 0, result.output
        assert emulator.admin("faults")["latency_ms"] == 5
        assert emulator.admin("faults")["force_delta_expiry"] is True
    finally:
        result = runner.invoke(emulator_group, ["faults", "--home", emulator.home, "--clear"])
    assert result.exit_code == 0
    assert emulator.admin("faults")["latency_ms"] == 0


def test_reset_regenerates_data_and_keeps_app_registrations(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", "reset-secret-1")
    home = tmp_path / "reset"
    info = process.start(home=home, port=0, scale="tiny", seed=5)
    session = CASession(info.ca_bundle)
    admin = {"X-Emulator-Admin-Key": info.admin_key()}
    try:
        before = session.get(f"{info.base_url}/_emulator/info", headers=admin, timeout=30).json()
        assert before["scale"] == "tiny" and before["collections"]
        created = session.post(f"{info.base_url}/_emulator/apps", headers=admin, timeout=30,
                               json={"name": "survivor", "secret": "survivor-secret"}).json()
        result = CliRunner().invoke(emulator_group, ["reset", "--home", str(home), "--seed", "6"])
        assert result.exit_code == 0, result.output
        after = session.get(f"{info.base_url}/_emulator/info", headers=admin, timeout=30).json()
        assert (after["scale"], after["data_seed"]) == ("tiny", 6)
        assert after["tenant_id"] == before["tenant_id"]
        for client_id, secret in ((created["client_id"], "survivor-secret"),
                                  (info.secret_client_id, "reset-secret-1")):
            token = session.post(f"{info.authority}/oauth2/v2.0/token", timeout=30, data={
                "grant_type": "client_credentials", "client_id": client_id, "client_secret": secret,
                "scope": f"{info.dataverse_url}/.default"})
            assert token.status_code == 200, token.text
        bad = session.post(f"{info.base_url}/_emulator/reset", headers=admin, json={"scale": "galactic"},
                           timeout=30)
        assert bad.status_code in (400, 500) and "error" in bad.json()
    finally:
        process.stop(home)


def test_python_m_entry_point_lists_the_commands():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bridgekit.emulator", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for name in ("start", "stop", "status", "serve", "reset", "mutate", "faults"):
        assert name in out


def test_no_secret_or_token_is_written_in_clear(emulator):
    token = emulator.token("dataverse")  # make sure at least one token was issued
    home = Path(emulator.home)
    for path in [home / "emulator.log", home / "runtime.json", home / "identity.json",
                 *home.glob("store.sqlite*")]:
        data = path.read_bytes()
        assert emulator.client_secret.encode() not in data, path
        assert token.encode() not in data, path
    assert b"eyJ" not in (home / "emulator.log").read_bytes()


def test_concurrent_starts_share_one_server(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    home = tmp_path / "race"
    try:
        with ThreadPoolExecutor(2) as pool:
            infos = list(pool.map(lambda _: process.start(home=home, port=0, scale="tiny"), range(2)))
        assert infos[0].pid == infos[1].pid
    finally:
        process.stop(home)


def test_ensure_running_finds_the_session_emulator_through_the_environment(emulator):
    # The fixture exports BRIDGEKIT_EMULATOR_HOME/PORT, as a user's shell would for the built-in profile.
    info = process.ensure_running()
    assert info.pid == emulator.pid and info.base_url == emulator.base_url
