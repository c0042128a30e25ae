"""Authentication: certificates load, MSAL errors become AuthError with a hint, and real MSAL works against the emulator."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from bridgekit.auth import (
    BearerAuth,
    TokenProvider,
    auth_error,
    is_microsoft_host,
    load_certificate,
    login,
    logout,
    resource_scope,
    status,
)
from bridgekit.config import Profile
from bridgekit.emulator.tls import generate_self_signed
from bridgekit.errors import AuthError, ConfigError, PermissionDeniedError
from bridgekit.graph import GraphClient

# -- certificates ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_pair() -> tuple[bytes, bytes]:
    return generate_self_signed("bridgekit test app")


def _sha1(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()


def test_combined_pem_and_key_alongside(tmp_path: Path, cert_pair: tuple[bytes, bytes]) -> None:
    cert, key = cert_pair
    (tmp_path / "both.pem").write_bytes(cert + key)
    loaded = load_certificate(tmp_path / "both.pem")
    assert loaded.thumbprint == _sha1(cert)
    assert "PRIVATE KEY" in loaded.private_key_pem and "PRIVATE KEY" not in repr(loaded)
    (tmp_path / "app.pem").write_bytes(cert)
    (tmp_path / "app.key").write_bytes(key)  # the emulator's layout: demo.pem + demo.key
    assert load_certificate(tmp_path / "app.pem").thumbprint == loaded.thumbprint
    assert loaded.msal_credential() == {"private_key": loaded.private_key_pem, "thumbprint": loaded.thumbprint}
    assert "public_certificate" in loaded.msal_credential(send_x5c=True)


def test_pfx_and_encrypted_pem_with_password(tmp_path: Path, cert_pair: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = cert_pair
    key = serialization.load_pem_private_key(key_pem, None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    pfx = pkcs12.serialize_key_and_certificates(b"app", key, cert, None,  # type: ignore[arg-type]
                                                serialization.BestAvailableEncryption(b"pfx-pass"))
    (tmp_path / "app.pfx").write_bytes(pfx)
    assert load_certificate(tmp_path / "app.pfx", password="pfx-pass").thumbprint == _sha1(cert_pem)
    with pytest.raises(ConfigError) as info:
        load_certificate(tmp_path / "app.pfx", password="wrong")
    assert info.value.key == "certificate_path"
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[union-attr]
                                  serialization.BestAvailableEncryption(b"pem-pass"))
    (tmp_path / "enc.pem").write_bytes(cert_pem + encrypted)
    assert load_certificate(tmp_path / "enc.pem", password="pem-pass").thumbprint == _sha1(cert_pem)


def test_certificate_without_key_is_a_config_error(tmp_path: Path, cert_pair: tuple[bytes, bytes]) -> None:
    (tmp_path / "lonely.pem").write_bytes(cert_pair[0])
    with pytest.raises(ConfigError, match="no private key"):
        load_certificate(tmp_path / "lonely.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        load_certificate(tmp_path / "absent.pem")


def test_missing_secret_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTOSO_SECRET", raising=False)
    profile = Profile(name="contoso", auth="client_secret", tenant_id="t", client_id="c",
                      client_secret_env="CONTOSO_SECRET", dataverse_url="https://contoso.crm.dynamics.com")
    with pytest.raises(ConfigError) as info:
        TokenProvider(profile)
    assert "CONTOSO_SECRET" in info.value.message and "export CONTOSO_SECRET" in info.value.hint


def test_emulator_profile_must_be_resolved_first() -> None:
    with pytest.raises(ConfigError):
        TokenProvider(Profile(name="emulator"))


@pytest.mark.parametrize(("code", "expect"), [
    (7000215, "check the secret in $MY_SECRET"),
    (7000222, "expired"),
    (700016, "client_id"),
    (90002, "tenant_id"),
    (65001, "consent"),
    (65004, "consent"),
    (700027, "certificate"),
])
def test_msal_errors_carry_the_aadsts_code_and_a_hint(code: int, expect: str) -> None:
    profile = Profile(name="p", auth="client_secret", client_secret_env="MY_SECRET")
    result = {"error": "invalid_client", "error_codes": [code],
              "error_description": f"AADSTS{code}: Something went wrong.\r\nTrace ID: abc\r\nCorrelation ID: def"}
    err = auth_error(result, profile=profile, scope="https://x/.default")
    assert err.service_code == f"AADSTS{code}"
    assert expect in err.hint
    assert "Trace ID" not in err.message and err.exit_code == 3


def test_microsoft_hosts() -> None:
    assert is_microsoft_host("https://login.microsoftonline.com")
    assert is_microsoft_host("https://login.microsoftonline.us/")
    assert not is_microsoft_host("https://127.0.0.1:8443")
    assert not is_microsoft_host("https://login.microsoftonline.com.evil.example")
    assert resource_scope("https://org.crm.dynamics.com/") == "https://org.crm.dynamics.com/.default"


# -- the bearer hook ---------------------------------------------------------------------------------


class FakeProvider:
    """Hands out tokens in order; forgets the current one when told it was rejected."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.invalidated: list[str] = []

    def token(self, scope: str) -> str:
        return self.tokens[0]

    def invalidate(self, scope: str, token: str) -> None:
        self.invalidated.append(token)
        if len(self.tokens) > 1 and self.tokens[0] == token:
            self.tokens.pop(0)


@pytest.fixture()
def auth_server() -> Iterator[tuple[str, list[str], set[str]]]:
    seen: list[str] = []
    good: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            seen.append(token)
            status = 200 if token in good else 401
            body = b'{"ok": true}' if status == 200 else b'{"error":{"code":"0x8005F101","message":"expired"}}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/x", seen, good
    server.shutdown()
    server.server_close()


def test_401_refreshes_the_token_and_resends_once(auth_server: tuple[str, list[str], set[str]]) -> None:
    url, seen, good = auth_server
    good.add("fresh")
    provider = FakeProvider(["stale", "fresh"])
    r = requests.get(url, auth=BearerAuth(provider, "s"), timeout=5)  # type: ignore[arg-type]
    assert r.status_code == 200 and seen == ["stale", "fresh"] and provider.invalidated == ["stale"]
    assert r.history[0].status_code == 401


def test_401_with_a_token_that_stays_rejected_does_not_loop(auth_server: tuple[str, list[str], set[str]]) -> None:
    url, seen, _good = auth_server
    provider = FakeProvider(["bad", "also-bad"])
    r = requests.get(url, auth=BearerAuth(provider, "s"), timeout=5)  # type: ignore[arg-type]
    assert r.status_code == 401 and seen == ["bad", "also-bad"]


# -- real MSAL against the emulator ------------------------------------------------------------------


def _profile(emulator: Any, **values: Any) -> Profile:
    base = Profile(name="auth-test", auth="certificate", tenant_id=emulator.tenant_id, client_id=emulator.client_id,
                   certificate_path=emulator.certificate_path, dataverse_url=emulator.dataverse_url,
                   graph_url=emulator.graph_url, authority_host=emulator.authority_host, ca_bundle=emulator.ca_bundle)
    return base.with_values(**values)


def _users(profile: Profile, provider: TokenProvider) -> list[dict[str, Any]]:
    graph = GraphClient(profile, tokens=provider)
    return next(graph.users(select=["id"], top=2)).value


def test_certificate_credential_with_and_without_x5c(emulator: Any) -> None:
    profile = _profile(emulator)
    assert len(_users(profile, TokenProvider(profile))) == 2
    assert len(_users(profile, TokenProvider(profile, send_x5c=True))) == 2


def test_client_secret_from_the_named_variable(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BK_TEST_SECRET", emulator.client_secret)
    profile = _profile(emulator, auth="client_secret", client_id=emulator.secret_client_id,
                       client_secret_env="BK_TEST_SECRET", certificate_path=None)
    provider = TokenProvider(profile)
    token = provider.token(resource_scope(profile.graph_url))
    assert provider.token(resource_scope(profile.graph_url)) == token  # cached by MSAL
    assert provider.token(resource_scope(str(profile.dataverse_url))) != token  # one token per resource
    assert len(_users(profile, provider)) == 2


def test_wrong_secret_names_the_variable(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BK_TEST_SECRET", "not-the-secret")
    profile = _profile(emulator, auth="client_secret", client_id=emulator.secret_client_id,
                       client_secret_env="BK_TEST_SECRET", certificate_path=None)
    with pytest.raises(AuthError) as info:
        TokenProvider(profile).token(resource_scope(profile.graph_url))
    assert info.value.service_code == "AADSTS7000215"
    assert "$BK_TEST_SECRET" in info.value.hint
    assert "not-the-secret" not in str(info.value)


def test_unknown_tenant(emulator: Any) -> None:
    profile = _profile(emulator, tenant_id="00000000-0000-0000-0000-00000000beef")
    with pytest.raises(AuthError) as info:
        TokenProvider(profile).token(resource_scope(profile.graph_url))
    assert info.value.service_code == "AADSTS90002" and "tenant_id" in info.value.hint


def test_expired_secret(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = emulator.admin("apps", {"name": "expired-secret", "secret": "bk~expired-secret-value",
                                  "secret_expires_in": -60, "roles": {"graph": ["User.Read.All"]}})
    monkeypatch.setenv("BK_OLD_SECRET", "bk~expired-secret-value")
    profile = _profile(emulator, auth="client_secret", client_id=app["client_id"], client_secret_env="BK_OLD_SECRET")
    with pytest.raises(AuthError) as info:
        TokenProvider(profile).token(resource_scope(profile.graph_url))
    assert info.value.service_code == "AADSTS7000222" and "$BK_OLD_SECRET" in info.value.hint


def test_missing_role_is_permission_denied(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = emulator.admin("apps", {"name": "no-roles", "secret": "bk~no-roles-secret", "roles": {}})
    monkeypatch.setenv("BK_NOROLE_SECRET", "bk~no-roles-secret")
    profile = _profile(emulator, auth="client_secret", client_id=app["client_id"],
                       client_secret_env="BK_NOROLE_SECRET")
    with pytest.raises(PermissionDeniedError) as info:
        _users(profile, TokenProvider(profile))
    assert info.value.status == 403 and "role" in info.value.hint


def test_device_code_login_status_logout(emulator: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    profile = _profile(emulator, auth="device_code", certificate_path=None, name="device-test")
    shown: list[str] = []
    with emulator.settings(device_code_interval_s=1):
        info = login(profile, on_message=shown.append)
    assert shown and "code" in shown[0].lower()
    assert info["signed_in"] is True
    cache = tmp_path / "bridgekit" / "tokens" / "device-test.json"
    assert cache.exists()
    if "0600" in info["cache"]:
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    # A new provider (a new process, in real life) signs in silently from the persistent cache.
    assert len(_users(profile, TokenProvider(profile))) == 2
    assert logout(profile) is True
    after = status(profile)
    assert after["signed_in"] is False and "auth login" in after["hint"]


def test_auth_cli_status_and_logout(emulator: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bridgekit.cli.main import cli

    toml = tmp_path / "bridgekit.toml"
    toml.write_text(
        "[profiles.dev]\n"
        'auth = "device_code"\n'
        f'tenant_id = "{emulator.tenant_id}"\nclient_id = "{emulator.client_id}"\n'
        f'dataverse_url = "{emulator.dataverse_url}"\ngraph_url = "{emulator.graph_url}"\n'
        f'authority_host = "{emulator.authority_host}"\nca_bundle = "{emulator.ca_bundle}"\n')
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(toml))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runner = CliRunner()
    result = runner.invoke(cli, ["--profile", "dev", "auth", "status"])
    assert result.exit_code == 3
    assert "signed_in  False" in result.output and "bridgekit --profile dev auth login" in result.output
    result = runner.invoke(cli, ["--profile", "dev", "auth", "logout"])
    assert result.exit_code == 0 and "no cached sign-in" in result.output
