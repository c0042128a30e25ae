"""The emulator's Entra ID v2 token service, exercised with real MSAL, azure-identity and pyjwt over HTTPS."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import jwt
import msal
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bridgekit.emulator.context import (
    DATAVERSE_ROLE,
    GRAPH_ROLES,
    EmulatorContext,
    RoleMissing,
    TokenRejected,
)
from bridgekit.emulator.tls import generate_self_signed


def _read(path):
    return Path(path).read_text()


def _jwks(emulator, ca_session):
    resp = ca_session.get(f"{emulator.authority}/discovery/v2.0/keys", timeout=10)
    resp.raise_for_status()
    return jwt.PyJWKSet.from_dict(resp.json())


def _verified_claims(token, emulator, ca_session, audience):
    header = jwt.get_unverified_header(token)
    key = next(k for k in _jwks(emulator, ca_session).keys if k.key_id == header["kid"])
    return jwt.decode(token, key.key, algorithms=["RS256"], audience=audience,
                      issuer=f"{emulator.authority}/v2.0")


def _confidential(emulator, ca_session, client_id, credential):
    # http_client: MSAL sets Session.verify, which REQUESTS_CA_BUNDLE would override (see CASession).
    return msal.ConfidentialClientApplication(client_id, client_credential=credential, authority=emulator.authority,
                                              instance_discovery=False, http_client=ca_session)


def _thumbprint(cert_pem: str) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.fingerprint(hashes.SHA1()).hex()  # x5t is SHA-1 by definition


def test_discovery_document_points_msal_at_the_same_https_host(emulator, ca_session):
    doc = ca_session.get(f"{emulator.authority}/v2.0/.well-known/openid-configuration", timeout=10).json()
    assert doc["issuer"] == f"{emulator.base_url}/{emulator.tenant_id}/v2.0"
    for key in ("authorization_endpoint", "token_endpoint", "device_authorization_endpoint", "jwks_uri"):
        assert doc[key].startswith(f"{emulator.base_url}/{emulator.tenant_id}/")
    # A client that addressed the server as localhost gets localhost endpoints (MSAL checks issuer host).
    local = f"https://localhost:{emulator.port}"
    doc = ca_session.get(f"{local}/{emulator.tenant_id}/v2.0/.well-known/openid-configuration", timeout=10).json()
    assert doc["issuer"] == f"{local}/{emulator.tenant_id}/v2.0"
    assert doc["token_endpoint"].startswith(local)


def test_msal_client_secret_token_for_dataverse_has_documented_claims(emulator, ca_session):
    app = _confidential(emulator, ca_session, emulator.secret_client_id, emulator.client_secret)
    result = app.acquire_token_for_client([f"{emulator.dataverse_url}/.default"])
    assert "access_token" in result, result.get("error_description")
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] >= 3599
    claims = _verified_claims(result["access_token"], emulator, ca_session, emulator.dataverse_url)
    assert claims["tid"] == emulator.tenant_id
    assert claims["appid"] == claims["azp"] == emulator.secret_client_id
    assert DATAVERSE_ROLE in claims["roles"]
    assert "scp" not in claims
    assert claims["exp"] - claims["iat"] >= 3599
    assert claims["nbf"] <= time.time() + 5


def test_msal_certificate_with_sha1_thumbprint_gets_graph_token(emulator, ca_session):
    cert = _read(emulator.certificate_path)
    credential = {"private_key": _read(emulator.private_key_path), "thumbprint": _thumbprint(cert)}
    app = _confidential(emulator, ca_session, emulator.client_id, credential)
    result = app.acquire_token_for_client(["https://graph.microsoft.com/.default"])
    assert "access_token" in result, result.get("error_description")
    claims = _verified_claims(result["access_token"], emulator, ca_session, "https://graph.microsoft.com")
    assert set(GRAPH_ROLES) <= set(claims["roles"])
    assert claims["appidacr"] == "2"  # certificate credential


def test_msal_certificate_with_public_certificate_uses_ps256_and_works(emulator, ca_session):
    credential = {"private_key": _read(emulator.private_key_path),
                  "public_certificate": _read(emulator.certificate_path)}
    app = _confidential(emulator, ca_session, emulator.client_id, credential)
    result = app.acquire_token_for_client([f"{emulator.graph_url}/.default"])
    assert "access_token" in result, result.get("error_description")
    claims = _verified_claims(result["access_token"], emulator, ca_session, emulator.graph_url)
    assert claims["aud"] == emulator.graph_url


def test_client_secret_over_http_basic_is_accepted(emulator, ca_session):
    basic = base64.b64encode(f"{emulator.secret_client_id}:{emulator.client_secret}".encode()).decode()
    resp = ca_session.post(f"{emulator.authority}/oauth2/v2.0/token", timeout=10,
                           headers={"Authorization": f"Basic {basic}"},
                           data={"grant_type": "client_credentials", "scope": f"{emulator.dataverse_url}/.default"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] >= 3599


def test_wrong_secret_is_invalid_client_7000215(emulator, ca_session):
    app = _confidential(emulator, ca_session, emulator.secret_client_id, "not-the-secret")
    result = app.acquire_token_for_client([f"{emulator.dataverse_url}/.default"])
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215:")
    assert "Trace ID:" in result["error_description"] and result["trace_id"]
    assert "not-the-secret" not in result["error_description"]


def test_unknown_tenant_is_90002(emulator, ca_session):
    other = "11111111-2222-3333-4444-555555555555"
    resp = ca_session.post(f"{emulator.base_url}/{other}/oauth2/v2.0/token", timeout=10,
                           data={"grant_type": "client_credentials", "client_id": emulator.secret_client_id,
                                 "client_secret": emulator.client_secret,
                                 "scope": f"{emulator.dataverse_url}/.default"})
    assert resp.status_code == 400
    assert resp.json()["error_codes"] == [90002]
    # MSAL reads the discovery document first, and fails there for an unknown tenant.
    with pytest.raises(ValueError, match="tenant name or GUID is correct"):
        msal.ConfidentialClientApplication(emulator.secret_client_id, client_credential=emulator.client_secret,
                                           authority=f"{emulator.base_url}/{other}", instance_discovery=False,
                                           http_client=ca_session).acquire_token_for_client(
            [f"{emulator.dataverse_url}/.default"])


def test_unknown_app_is_700016(emulator, ca_session):
    app = _confidential(emulator, ca_session, "99999999-8888-7777-6666-555555555555", "whatever")
    result = app.acquire_token_for_client([f"{emulator.dataverse_url}/.default"])
    assert result["error_codes"] == [700016]


def test_assertion_signed_by_unregistered_certificate_is_700027(emulator, ca_session):
    cert_pem, key_pem = generate_self_signed("someone else")
    credential = {"private_key": key_pem.decode(), "thumbprint": _thumbprint(cert_pem.decode())}
    result = _confidential(emulator, ca_session, emulator.client_id, credential).acquire_token_for_client(
        [f"{emulator.dataverse_url}/.default"])
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]


def test_assertion_with_registered_thumbprint_but_wrong_key_is_700027(emulator, ca_session):
    _cert, other_key = generate_self_signed("forger")
    credential = {"private_key": other_key.decode(), "thumbprint": _thumbprint(_read(emulator.certificate_path))}
    result = _confidential(emulator, ca_session, emulator.client_id, credential).acquire_token_for_client(
        [f"{emulator.graph_url}/.default"])
    assert result["error_codes"] == [700027]


def test_expired_assertion_is_rejected(emulator, ca_session):
    key = serialization.load_pem_private_key(_read(emulator.private_key_path).encode(), password=None)
    now = int(time.time())
    assertion = jwt.encode({"aud": f"{emulator.authority}/oauth2/v2.0/token", "iss": emulator.client_id,
                            "sub": emulator.client_id, "iat": now - 7200, "exp": now - 3600, "jti": "x"},
                           key, algorithm="RS256",
                           headers={"x5t": base64.urlsafe_b64encode(bytes.fromhex(_thumbprint(
                               _read(emulator.certificate_path)))).decode().rstrip("=")})
    resp = ca_session.post(f"{emulator.authority}/oauth2/v2.0/token", timeout=10, data={
        "grant_type": "client_credentials", "client_id": emulator.client_id,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion, "scope": f"{emulator.graph_url}/.default"})
    assert resp.status_code == 401
    assert resp.json()["error_codes"] == [700024]


def test_scope_without_default_suffix_is_invalid_scope_70011(emulator, ca_session):
    app = _confidential(emulator, ca_session, emulator.secret_client_id, emulator.client_secret)
    result = app.acquire_token_for_client([f"{emulator.dataverse_url}/user_impersonation"])
    assert result["error"] == "invalid_scope"
    assert result["error_codes"] == [70011]


def test_registered_app_with_expired_secret_is_7000222(emulator, ca_session):
    created = emulator.admin("apps", {"name": "expired", "secret": "old-secret-1", "secret_expires_in": -60,
                                      "roles": {"dataverse": [DATAVERSE_ROLE]}})
    app = _confidential(emulator, ca_session, created["client_id"], "old-secret-1")
    result = app.acquire_token_for_client([f"{emulator.dataverse_url}/.default"])
    assert result["error_codes"] == [7000222]


def test_registered_app_without_roles_gets_a_token_without_roles(emulator, ca_session):
    created = emulator.admin("apps", {"name": "no-roles", "secret": "plain-secret-2"})
    assert "plain-secret-2" not in str(emulator.admin("apps"))
    app = _confidential(emulator, ca_session, created["client_id"], "plain-secret-2")
    result = app.acquire_token_for_client([f"{emulator.graph_url}/.default"])
    claims = _verified_claims(result["access_token"], emulator, ca_session, emulator.graph_url)
    assert "roles" not in claims


def test_device_code_flow_with_msal_public_client_then_refresh(emulator, ca_session):
    app = msal.PublicClientApplication(emulator.client_id, authority=emulator.authority, instance_discovery=False,
                                       http_client=ca_session)
    with emulator.settings(device_code_interval_s=1):
        flow = app.initiate_device_flow(scopes=["User.Read"])
    assert "user_code" in flow, flow
    assert flow["verification_uri"].startswith(emulator.base_url)
    result = app.acquire_token_by_device_flow(flow)
    assert "access_token" in result, result.get("error_description")
    assert "refresh_token" in result and "id_token_claims" in result
    claims = _verified_claims(result["access_token"], emulator, ca_session, "https://graph.microsoft.com")
    assert "User.Read" in claims["scp"].split()
    assert "roles" not in claims
    account = app.get_accounts()[0]
    assert account["home_account_id"] == f"{claims['oid']}.{emulator.tenant_id}"
    refreshed = app.acquire_token_silent([f"{emulator.dataverse_url}/user_impersonation"], account=account)
    assert refreshed and "access_token" in refreshed, refreshed
    dv = _verified_claims(refreshed["access_token"], emulator, ca_session, emulator.dataverse_url)
    assert DATAVERSE_ROLE in dv["scp"].split() and dv["oid"] == claims["oid"]


def test_expired_device_code_gives_expired_token(emulator, ca_session):
    with emulator.settings(device_code_expires_in_s=0):
        resp = ca_session.post(f"{emulator.authority}/oauth2/v2.0/devicecode", timeout=10,
                               data={"client_id": emulator.client_id, "scope": "User.Read openid"})
    code = resp.json()["device_code"]
    poll = ca_session.post(f"{emulator.authority}/oauth2/v2.0/token", timeout=10, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": emulator.client_id,
        "device_code": code})
    assert poll.status_code == 400
    assert poll.json()["error"] == "expired_token"


def test_azure_identity_client_secret_credential(emulator):
    from azure.identity import ClientSecretCredential

    cred = ClientSecretCredential(emulator.tenant_id, emulator.secret_client_id, emulator.client_secret,
                                  authority=emulator.authority_host, disable_instance_discovery=True,
                                  connection_verify=emulator.ca_bundle)
    token = cred.get_token(f"{emulator.dataverse_url}/.default")
    assert token.token.count(".") == 2
    assert token.expires_on > time.time() + 3000


def test_admin_api_requires_the_admin_key(emulator, ca_session):
    resp = ca_session.get(f"{emulator.base_url}/_emulator/info", timeout=10)
    assert resp.status_code == 401
    resp = ca_session.get(f"{emulator.base_url}/_emulator/info", timeout=10,
                          headers={"X-Emulator-Admin-Key": "wrong"})
    assert resp.status_code == 401
    assert emulator.admin("info")["tenant_id"] == emulator.tenant_id


# -- token validation used by the Dataverse and Graph services (in process) --------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return EmulatorContext(tmp_path_factory.mktemp("ctx-home"), port=45555, client_secret="x")


def _token(ctx, **overrides):
    now = int(time.time())
    claims = {"aud": ctx.dataverse_url, "iss": ctx.issuer(), "iat": now, "nbf": now, "exp": now + 3600,
              "tid": ctx.tenant_id, "oid": "o1", "roles": [DATAVERSE_ROLE]}
    claims.update(overrides)
    return ctx.sign(claims)


def test_verify_token_accepts_a_valid_token_and_checks_roles(ctx):
    claims = ctx.verify_token(f"Bearer {_token(ctx)}", ctx.dataverse_url)
    assert claims["oid"] == "o1"
    ctx.require_role(claims, DATAVERSE_ROLE)
    with pytest.raises(RoleMissing):
        ctx.require_role(claims, "User.Read.All")


@pytest.mark.parametrize(("header", "code"), [
    (None, "missing_token"),
    ("Basic abc", "missing_token"),
    ("Bearer not-a-jwt", "malformed_token"),
])
def test_verify_token_rejects_missing_or_malformed(ctx, header, code):
    with pytest.raises(TokenRejected) as err:
        ctx.verify_token(header, "dataverse")
    assert err.value.code == code


def test_verify_token_rejects_expired_wrong_audience_tenant_and_foreign_key(ctx, tmp_path):
    now = int(time.time())
    cases = [
        (_token(ctx, iat=now - 7200, nbf=now - 7200, exp=now - 3600), "dataverse", "expired"),
        (_token(ctx), "graph", "invalid_audience"),
        (_token(ctx, tid="someone-else"), "dataverse", "invalid_tenant"),
        (_token(ctx, iss="https://evil.example/x/v2.0"), "dataverse", "invalid_issuer"),
    ]
    other = EmulatorContext(tmp_path, port=45555, client_secret="")
    cases.append((_token(other), "dataverse", "invalid_signature"))
    for token, audience, code in cases:
        with pytest.raises(TokenRejected) as err:
            ctx.verify_token(f"Bearer {token}", audience)
        assert err.value.code == code, audience
        assert token not in str(err.value)


def test_a_token_accepted_before_still_expires_and_keeps_its_audience(ctx, monkeypatch):
    # A client sends one token for an hour (and a $batch once per item): the emulator remembers a token it
    # accepted, but the token must still stop working when it expires, and only for the audience it was for.
    now = time.time()
    token = _token(ctx, exp=int(now) + 60)
    assert ctx.verify_token(f"Bearer {token}", "dataverse")["oid"] == "o1"
    assert ctx.verify_token(f"Bearer {token}", "dataverse")["oid"] == "o1"
    with pytest.raises(TokenRejected) as err:
        ctx.verify_token(f"Bearer {token}", "graph")
    assert err.value.code == "invalid_audience"
    monkeypatch.setattr(time, "time", lambda: now + 60 + ctx.settings.token_clock_skew_s + 1)
    with pytest.raises(TokenRejected) as err:
        ctx.verify_token(f"Bearer {token}", "dataverse")
    assert err.value.code == "expired"


def test_azure_identity_certificate_credential(emulator, tmp_path):
    from azure.identity import CertificateCredential

    # azure-identity wants the key and the certificate in one PEM file.
    combined = tmp_path / "demo-combined.pem"
    combined.write_text(_read(emulator.private_key_path) + _read(emulator.certificate_path))
    cred = CertificateCredential(emulator.tenant_id, emulator.client_id, certificate_path=str(combined),
                                 authority=emulator.authority_host, disable_instance_discovery=True,
                                 connection_verify=emulator.ca_bundle)
    token = cred.get_token(f"{emulator.graph_url}/.default")
    assert token.token.count(".") == 2


def test_msal_with_a_localhost_authority(emulator, ca_session):
    authority = f"https://localhost:{emulator.port}/{emulator.tenant_id}"
    app = msal.ConfidentialClientApplication(emulator.secret_client_id, client_credential=emulator.client_secret,
                                             authority=authority, instance_discovery=False, http_client=ca_session)
    result = app.acquire_token_for_client([f"https://localhost:{emulator.port}/org/.default"])
    assert "access_token" in result, result.get("error_description")
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["iss"] == f"{authority}/v2.0"


def test_admin_registered_certificate_app_with_limited_roles(emulator, ca_session):
    cert_pem, key_pem = generate_self_signed("limited app")
    created = emulator.admin("apps", {"name": "graph-users-only", "certificate_pem": cert_pem.decode(),
                                      "roles": {"graph": ["User.Read.All"]}})
    credential = {"private_key": key_pem.decode(), "thumbprint": _thumbprint(cert_pem.decode())}
    app = _confidential(emulator, ca_session, created["client_id"], credential)
    graph = app.acquire_token_for_client([f"{emulator.graph_url}/.default"])
    claims = _verified_claims(graph["access_token"], emulator, ca_session, emulator.graph_url)
    assert claims["roles"] == ["User.Read.All"]
    dv = app.acquire_token_for_client([f"{emulator.dataverse_url}/.default"])
    assert "roles" not in _verified_claims(dv["access_token"], emulator, ca_session, emulator.dataverse_url)


def test_admin_apps_rejects_bad_input(emulator, ca_session):
    for body in ({"roles": {"sharepoint": ["x"]}}, {"certificate_pem": "not a pem"}, {"client_id": "nope"},
                 {"colour": "blue"}):
        resp = ca_session.post(f"{emulator.base_url}/_emulator/apps", json=body, timeout=10,
                               headers={"X-Emulator-Admin-Key": emulator.admin_key()})
        assert resp.status_code == 400, body


def test_services_reject_an_expired_token_with_401(emulator, ca_session):
    for audience, url in (("dataverse", f"{emulator.dataverse_url}/api/data/v9.2/WhoAmI"),
                          ("graph", f"{emulator.graph_url}/v1.0/users")):
        minted = emulator.admin("token", {"audience": audience, "expires_in": -600})
        resp = ca_session.get(url, headers={"Authorization": f"Bearer {minted['access_token']}"}, timeout=30)
        assert resp.status_code == 401, (audience, resp.text)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_without_the_role_is_refused_with_403(emulator, ca_session):
    minted = emulator.admin("token", {"audience": "graph", "roles": []})
    resp = ca_session.get(f"{emulator.graph_url}/v1.0/users",
                          headers={"Authorization": f"Bearer {minted['access_token']}"}, timeout=30)
    assert resp.status_code == 403
