"""The Entra ID v2 token service: OIDC discovery, JWKS, token (client credentials, device code, refresh) and devicecode.

Shapes follow protocols.md §3: discovery fields MSAL requires (§3.4), the AADSTS error body (§3.3),
client authentication by secret (form body or HTTP Basic) or by a certificate-signed client assertion
(§3.2), and the device-code flow with ``device_code``/``code`` polling (§3.8).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets
import time
import urllib.parse
import uuid
from typing import Any

import jwt
import orjson
from cryptography import x509
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from bridgekit.emulator.context import AppRegistration, EmulatorContext, b64url, cert_thumbprints

__all__ = ["OAuthError", "mint_access_token", "parse_form", "routes"]

log = logging.getLogger("bridgekit.emulator.identity")

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_OIDC_SCOPES = {"openid", "profile", "offline_access", "email"}
_TENANT_ALIASES = {"common", "organizations"}


class OAuthError(Exception):
    """An OAuth error answered in Entra's shape: ``error``, ``AADSTS<code>: description``, ``error_codes``."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(f"AADSTS{code}: {description}")
        self.status, self.error, self.code, self.description = status, error, code, description


def _json(data: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json; charset=utf-8",
                    headers=headers)


def _error_response(exc: OAuthError, request: Request) -> Response:
    # Entra's error body: the description ends with trace/correlation ids and a timestamp, separated by
    # CRLF, and repeats them as fields (protocols.md §3.3).
    trace = str(uuid.uuid4())
    corr = request.headers.get("client-request-id") or str(uuid.uuid4())
    ts = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {
        "error": exc.error,
        "error_description": f"AADSTS{exc.code}: {exc.description}\r\nTrace ID: {trace}\r\n"
                             f"Correlation ID: {corr}\r\nTimestamp: {ts}",
        "error_codes": [exc.code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": f"https://login.microsoftonline.com/error?code={exc.code}",
    }
    return _json(body, exc.status, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def parse_form(body: bytes) -> dict[str, str]:
    """Decode an ``application/x-www-form-urlencoded`` body (last value wins)."""
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _check_tenant(ctx: EmulatorContext, tenant: str) -> None:
    if tenant != ctx.tenant_id and tenant.lower() not in _TENANT_ALIASES:
        raise OAuthError(400, "invalid_tenant", 90002,
                         f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                         "signing into the correct cloud.")


class _Service:
    """The token service's handlers, bound to one context."""

    def __init__(self, ctx: EmulatorContext) -> None:
        self.ctx = ctx

    # -- discovery ---------------------------------------------------------------------------------
    async def openid_configuration(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        try:
            _check_tenant(self.ctx, tenant)
        except OAuthError as exc:
            return _error_response(exc, request)
        host = self.ctx.host_url_for(request.headers.get("host"))
        t = self.ctx.tenant_id
        doc = {
            "issuer": self.ctx.issuer(host),
            "authorization_endpoint": f"{host}/{t}/oauth2/v2.0/authorize",
            "token_endpoint": f"{host}/{t}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{host}/{t}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{host}/{t}/oauth2/v2.0/logout",
            "jwks_uri": f"{host}/{t}/discovery/v2.0/keys",
            "userinfo_endpoint": f"{host}/oidc/userinfo",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce",
                                 "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
            "request_uri_parameter_supported": False,
            "tenant_region_scope": "WW",
            "cloud_instance_name": "microsoftonline.com",
            "msgraph_host": "graph.microsoft.com",
        }
        return _json(doc, headers={"Cache-Control": "max-age=86400, private", "Access-Control-Allow-Origin": "*"})

    async def keys(self, request: Request) -> Response:
        try:
            _check_tenant(self.ctx, request.path_params["tenant"])
        except OAuthError as exc:
            return _error_response(exc, request)
        return _json(self.ctx.jwks(), headers={"Cache-Control": "max-age=86400, private"})

    async def device_login_page(self, request: Request) -> Response:
        # Where the device-code message sends people: every code is approved on its first poll.
        return HTMLResponse("<html><body><p>bridgekit emulator: device codes are approved automatically; "
                            "return to your application.</p></body></html>")

    # -- token endpoint ----------------------------------------------------------------------------
    async def token(self, request: Request) -> Response:
        try:
            _check_tenant(self.ctx, request.path_params["tenant"])
            form = parse_form(await request.body())
            result = self._token(request, form)
        except OAuthError as exc:
            return _error_response(exc, request)
        return _json(result, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _token(self, request: Request, form: dict[str, str]) -> dict[str, Any]:
        grant = form.get("grant_type")
        if not grant:
            raise OAuthError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'grant_type'.")
        client_id, secret = self._client_auth_params(request, form)
        if not client_id:
            raise OAuthError(400, "invalid_request", 900144,
                             "The request body must contain the following parameter: 'client_id'.")
        app = self.ctx.get_app(client_id)
        if app is None:
            raise OAuthError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory "
                             f"'{self.ctx.tenant_id}'. This can happen if the application has not been installed "
                             "by the administrator of the tenant or consented to by any user in the tenant.")
        host = self.ctx.host_url_for(request.headers.get("host"))
        if grant == "client_credentials":
            method = self._authenticate_client(app, form, secret, required=True)
            kind, resource = self._resource_from_default_scope(form.get("scope", ""))
            roles = sorted(app.roles.get(kind, []))
            claims = self._access_claims(app, host, resource, appidacr=method, oid=self._app_oid(app), idtyp="app")
            if roles:
                claims["roles"] = roles
            return self._token_response(claims, scope=f"{resource}/.default")
        if grant == _DEVICE_GRANT:
            self._authenticate_client(app, form, secret, required=not app.public_client)
            return self._device_code_grant(app, form, host)
        if grant == "refresh_token":
            method = self._authenticate_client(app, form, secret, required=not app.public_client)
            return self._refresh_grant(app, form, host, method)
        raise OAuthError(400, "unsupported_grant_type", 70003,
                         f"The app requested an unsupported grant type '{grant}'.")

    @staticmethod
    def _client_auth_params(request: Request, form: dict[str, str]) -> tuple[str, str | None]:
        # RFC 6749 §2.3.1: HTTP Basic carries form-urlencoded client_id:client_secret. Entra accepts it as
        # well as the form body (MSAL uses the body, protocols.md §3.2).
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                raw = base64.b64decode(auth[6:].strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise OAuthError(401, "invalid_client", 7000215,
                                 "Invalid client secret provided. Ensure the secret being sent in the request is "
                                 "the client secret value, not the client secret ID.") from exc
            cid, _, sec = raw.partition(":")
            return urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(sec)
        return form.get("client_id", ""), form.get("client_secret")

    def _authenticate_client(self, app: AppRegistration, form: dict[str, str], secret: str | None, *,
                             required: bool) -> str:
        """Check the client credential; returns ``appidacr``: "1" secret, "2" certificate, "0" none."""
        if secret is not None and secret != "":
            entry = app.match_secret(secret)
            if entry is None:
                raise OAuthError(401, "invalid_client", 7000215,
                                 "Invalid client secret provided. Ensure the secret being sent in the request is "
                                 f"the client secret value, not the client secret ID, for a secret added to app "
                                 f"'{app.client_id}'.")
            expires = entry.get("expires_at")
            if expires is not None and float(expires) <= time.time():
                raise OAuthError(401, "invalid_client", 7000222,
                                 f"The provided client secret keys for app '{app.client_id}' are expired. Visit the "
                                 "Azure portal to create new keys for your app.")
            return "1"
        assertion = form.get("client_assertion")
        if assertion:
            if form.get("client_assertion_type") != _ASSERTION_TYPE:
                raise OAuthError(400, "invalid_request", 90014,
                                 "The request body must contain the following parameter: 'client_assertion_type'.")
            self._verify_assertion(app, assertion)
            return "2"
        if required:
            raise OAuthError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: 'client_assertion' or "
                             "'client_secret'.")
        return "0"

    def _verify_assertion(self, app: AppRegistration, assertion: str) -> None:
        # A certificate credential is a JWT signed by the app's key: RS256 with an x5t (SHA-1) header or
        # PS256 with x5t#S256, aud = the token endpoint, iss = sub = client id (protocols.md §3.2).
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise OAuthError(401, "invalid_client", 700027, "Client assertion is not a valid JWT.") from exc
        if header.get("alg") not in ("RS256", "PS256"):
            raise OAuthError(401, "invalid_client", 700027,
                             f"Client assertion uses an unsupported signing algorithm '{header.get('alg')}'.")
        # Compare thumbprints without base64 padding: MSAL sends x5t#S256 padded, RFC 7515 says unpadded.
        x5t = str(header["x5t"]).rstrip("=") if header.get("x5t") else None
        x5t256 = str(header["x5t#S256"]).rstrip("=") if header.get("x5t#S256") else None
        candidates = []
        for pem in app.certificates:
            _hex, t1, t256 = cert_thumbprints(pem.encode())
            if (x5t is None and x5t256 is None) or x5t == t1 or x5t256 == t256:
                candidates.append(pem)
        if not candidates:
            raise OAuthError(401, "invalid_client", 700027,
                             "Client assertion contains an invalid signature. [Reason - The key was not found., "
                             f"Thumbprint of key used by client: '{x5t or x5t256}']")
        last: Exception | None = None
        for pem in candidates:
            key = x509.load_pem_x509_certificate(pem.encode()).public_key()
            try:
                claims = jwt.decode(assertion, key, algorithms=["RS256", "PS256"],  # type: ignore[arg-type]
                                    audience=list(self.ctx.token_endpoints()),
                                    options={"require": ["exp", "aud", "iss", "sub"]}, leeway=300)
            except jwt.ExpiredSignatureError as exc:
                raise OAuthError(401, "invalid_client", 700024,
                                 "Client assertion is not within its valid time range.") from exc
            except jwt.InvalidAudienceError as exc:
                raise OAuthError(401, "invalid_client", 700027,
                                 "Client assertion failed signature validation: the audience claim must be the "
                                 "token endpoint.") from exc
            except jwt.PyJWTError as exc:
                last = exc
                continue
            if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
                raise OAuthError(401, "invalid_client", 700027,
                                 "Client assertion's iss and sub claims must both be the client id.")
            return
        raise OAuthError(401, "invalid_client", 700027,
                         "Client assertion failed signature validation.") from last

    def _resource_from_default_scope(self, scope: str) -> tuple[str, str]:
        scopes = scope.split()
        defaults = [s for s in scopes if s.endswith("/.default")]
        if len(defaults) != 1 or len(scopes) != 1:
            raise OAuthError(400, "invalid_scope", 70011,
                             f"The provided request must include a 'scope' input parameter. The provided value for "
                             f"the input parameter 'scope' is not valid: '{scope}'. Client credential flows must "
                             "have a scope value with /.default suffixed to the resource identifier "
                             "(application ID URI).")
        resource = defaults[0][: -len("/.default")].rstrip("/")
        kind = self.ctx.resolve_resource(resource)
        if kind is None:
            raise OAuthError(400, "invalid_resource", 500011,
                             f"The resource principal named {resource} was not found in the tenant named "
                             f"{self.ctx.tenant_id}.")
        return kind, resource

    def _app_oid(self, app: AppRegistration) -> str:
        # The service principal's object id: stable per app, distinct from the client (application) id.
        return str(uuid.uuid5(uuid.UUID(self.ctx.tenant_id), f"sp:{app.client_id}"))

    def _access_claims(self, app: AppRegistration, host: str, aud: str, *, appidacr: str, oid: str,
                       idtyp: str) -> dict[str, Any]:
        now = int(time.time())
        return {
            "aud": aud, "iss": self.ctx.issuer(host), "iat": now, "nbf": now,
            "exp": now + self.ctx.settings.token_lifetime_s,
            "tid": self.ctx.tenant_id, "oid": oid, "sub": oid, "appid": app.client_id, "azp": app.client_id,
            "appidacr": appidacr, "azpacr": appidacr, "idtyp": idtyp, "ver": "2.0",
            "uti": b64url(secrets.token_bytes(16)),
        }

    def _token_response(self, claims: dict[str, Any], *, scope: str) -> dict[str, Any]:
        lifetime = int(claims["exp"]) - int(claims["iat"])
        return {"token_type": "Bearer", "scope": scope, "expires_in": lifetime, "ext_expires_in": lifetime,
                "access_token": self.ctx.sign(claims)}

    # -- delegated flows ---------------------------------------------------------------------------
    def _delegated_target(self, scopes: list[str]) -> tuple[str, str, list[str]]:
        """(service, resource, permission names) for delegated scopes such as ``User.Read`` or ``<res>/x``."""
        perms = [s for s in scopes if s not in _OIDC_SCOPES]
        resources: set[str] = set()
        names: list[str] = []
        for p in perms:
            if "/" in p and p.startswith(("https://", "api://")):
                res, _, name = p.rpartition("/")
                resources.add(res.rstrip("/"))
                names.append(name)
            elif p == "00000003-0000-0000-c000-000000000000/.default":
                resources.add("https://graph.microsoft.com")
                names.append(".default")
            else:
                # Unqualified scopes belong to Microsoft Graph, as in Entra.
                resources.add("https://graph.microsoft.com")
                names.append(p)
        if not resources:
            resources.add("https://graph.microsoft.com")
        if len(resources) > 1:
            raise OAuthError(400, "invalid_scope", 70011,
                             "The provided value for the input parameter 'scope' is not valid: scopes for more than "
                             "one resource were requested.")
        resource = resources.pop()
        kind = self.ctx.resolve_resource(resource)
        if kind is None:
            raise OAuthError(400, "invalid_resource", 500011,
                             f"The resource principal named {resource} was not found in the tenant named "
                             f"{self.ctx.tenant_id}.")
        return kind, resource, [n for n in names if n and n != ".default"]

    def _user_tokens(self, app: AppRegistration, host: str, scopes: list[str], appidacr: str) -> dict[str, Any]:
        kind, resource, names = self._delegated_target(scopes)
        user = self.ctx.demo_user()
        # The demo tenant's admin consented to the app's permissions, so the token carries all of them.
        granted = sorted(set(names) | set(app.roles.get(kind, [])))
        claims = self._access_claims(app, host, resource, appidacr=appidacr, oid=user["oid"], idtyp="user")
        claims.update(scp=" ".join(granted), name=user["name"], upn=user["upn"], preferred_username=user["upn"])
        result = self._token_response(claims, scope=" ".join(f"{resource}/{g}" for g in granted))
        now = int(time.time())
        result["client_info"] = b64url(orjson.dumps({"uid": user["oid"], "utid": self.ctx.tenant_id}))
        if "openid" in scopes:
            result["id_token"] = self.ctx.sign({
                "aud": app.client_id, "iss": self.ctx.issuer(host), "iat": now, "nbf": now, "exp": now + 3600,
                "tid": self.ctx.tenant_id, "oid": user["oid"], "sub": user["oid"], "name": user["name"],
                "preferred_username": user["upn"], "ver": "2.0",
            })
        if "offline_access" in scopes:
            result["refresh_token"] = self.ctx.sign({
                "typ": "refresh", "aud": self.ctx.issuer(), "iss": self.ctx.issuer(), "iat": now,
                "exp": now + self.ctx.settings.refresh_token_lifetime_s, "cid": app.client_id,
                "oid": user["oid"], "scp": " ".join(scopes), "jti": str(uuid.uuid4()),
            })
        return result

    async def devicecode(self, request: Request) -> Response:
        try:
            _check_tenant(self.ctx, request.path_params["tenant"])
            form = parse_form(await request.body())
            client_id = form.get("client_id", "")
            app = self.ctx.get_app(client_id)
            if app is None:
                raise OAuthError(400, "unauthorized_client", 700016,
                                 f"Application with identifier '{client_id}' was not found in the directory "
                                 f"'{self.ctx.tenant_id}'.")
            scopes = form.get("scope", "").split()
            self._delegated_target(scopes)  # reject bad scopes now rather than at the first poll
        except OAuthError as exc:
            return _error_response(exc, request)
        host = self.ctx.host_url_for(request.headers.get("host"))
        device_code = secrets.token_urlsafe(48)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        s = self.ctx.settings
        with self.ctx._lock:
            now = time.time()
            # Forget codes that expired long ago so the table cannot grow without bound.
            for code in [c for c, d in self.ctx.device_codes.items() if d["expires_at"] < now - 3600]:
                del self.ctx.device_codes[code]
            self.ctx.device_codes[device_code] = {"client_id": client_id, "scopes": scopes, "polls": 0,
                                                  "expires_at": now + s.device_code_expires_in_s}
        uri = f"{host}/devicelogin"
        return _json({
            "user_code": user_code, "device_code": device_code, "verification_uri": uri,
            "expires_in": s.device_code_expires_in_s, "interval": s.device_code_interval_s,
            "message": f"To sign in, use a web browser to open the page {uri} and enter the code {user_code} "
                       "to authenticate.",
        }, headers={"Cache-Control": "no-store"})

    def _device_code_grant(self, app: AppRegistration, form: dict[str, str], host: str) -> dict[str, Any]:
        code = form.get("device_code") or form.get("code") or ""
        with self.ctx._lock:
            entry = self.ctx.device_codes.get(code)
            if entry is None or entry["client_id"] != app.client_id:
                raise OAuthError(400, "bad_verification_code", 70000,
                                 "The provided value for the input parameter 'device_code' is not valid.")
            if entry["expires_at"] <= time.time():
                raise OAuthError(400, "expired_token", 70019,
                                 "Verification code expired. The user did not sign in before the code expired.")
            entry["polls"] += 1
            if entry["polls"] == 1:
                # The "user" signs in between the first and second poll.
                raise OAuthError(400, "authorization_pending", 70016,
                                 "OAuth 2.0 device flow error. Authorization is pending. Continue polling.")
            del self.ctx.device_codes[code]
        return self._user_tokens(app, host, entry["scopes"], "0" if app.public_client else "1")

    def _refresh_grant(self, app: AppRegistration, form: dict[str, str], host: str, method: str) -> dict[str, Any]:
        token = form.get("refresh_token", "")
        try:
            claims = self.ctx.decode_own(token, audience={self.ctx.issuer()})
        except jwt.ExpiredSignatureError as exc:
            raise OAuthError(400, "invalid_grant", 700082,
                             "The refresh token has expired due to inactivity.") from exc
        except jwt.PyJWTError as exc:
            raise OAuthError(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.") from exc
        if claims.get("typ") != "refresh" or claims.get("cid") != app.client_id:
            raise OAuthError(400, "invalid_grant", 70000,
                             "Provided grant is invalid or malformed: the refresh token was issued to another client.")
        scopes = form.get("scope", "").split() or str(claims.get("scp", "")).split()
        return self._user_tokens(app, host, scopes, method)


def mint_access_token(ctx: EmulatorContext, *, audience: str, client_id: str | None = None,
                      roles: list[str] | None = None, scp: str | None = None, expires_in: int | None = None,
                      oid: str | None = None) -> dict[str, Any]:
    """Issue an access token directly (admin API, for tests): e.g. one that expired ten minutes ago.

    Args:
        audience: ``dataverse``, ``graph`` or a resource URI.
        client_id: The app it is issued to (default: the demo app).
        roles: App roles (default: the app's roles for that service); ignored when ``scp`` is given.
        scp: Delegated scopes (space-separated) for a user token.
        expires_in: Seconds until ``exp``; negative for an expired token (default: the token lifetime).
        oid: Object id of the caller (default: the app's service principal, or the demo user for ``scp``).

    Raises:
        ValueError: unknown audience or client.
    """
    kind = audience if audience in ("dataverse", "graph") else ctx.resolve_resource(audience)
    if kind is None:
        raise ValueError(f"unknown audience {audience!r}")
    if roles is not None and (not isinstance(roles, list) or not all(isinstance(r, str) for r in roles)):
        raise ValueError("roles must be a list of strings")
    expires_in = None if expires_in is None else int(expires_in)
    resource = audience if audience not in ("dataverse", "graph") else (
        ctx.dataverse_url if kind == "dataverse" else ctx.graph_url)
    app = ctx.get_app(client_id or ctx.demo_client_id)
    if app is None:
        raise ValueError(f"unknown client_id {client_id!r}")
    svc = _Service(ctx)
    user = scp is not None
    caller = oid or (ctx.demo_user()["oid"] if user else svc._app_oid(app))
    claims = svc._access_claims(app, ctx.base_url, resource.rstrip("/"), appidacr="2" if not user else "0",
                                oid=caller, idtyp="user" if user else "app")
    if expires_in is not None:
        claims["exp"] = claims["iat"] + int(expires_in)
        if expires_in < 0:
            claims["iat"] = claims["nbf"] = claims["exp"] - 3600
    if user:
        claims["scp"] = scp
    else:
        granted = sorted(app.roles.get(kind, [])) if roles is None else list(roles)
        if granted:
            claims["roles"] = granted
    return {"token_type": "Bearer", "access_token": ctx.sign(claims), "expires_in": int(claims["exp"]) - int(time.time())}


def routes(ctx: EmulatorContext) -> list[BaseRoute]:
    """The identity routes, relative to the server root.

    Args:
        ctx: The shared emulator context.
    """
    s = _Service(ctx)
    return [
        Route("/{tenant}/v2.0/.well-known/openid-configuration", s.openid_configuration, methods=["GET"]),
        Route("/{tenant}/discovery/v2.0/keys", s.keys, methods=["GET"]),
        Route("/{tenant}/oauth2/v2.0/token", s.token, methods=["POST"]),
        Route("/{tenant}/oauth2/v2.0/devicecode", s.devicecode, methods=["POST"]),
        Route("/devicelogin", s.device_login_page, methods=["GET"]),
    ]
