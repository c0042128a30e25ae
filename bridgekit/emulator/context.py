"""The emulator's shared state: home directory, store, tenant, settings, app registrations, token signing.

Every route module (identity, dataverse, graph, faults, admin) receives one :class:`EmulatorContext`.
Services authenticate callers with :meth:`EmulatorContext.verify_token` and turn
:class:`TokenRejected` into their own 401 shape; :meth:`EmulatorContext.require_role` raises
:class:`RoleMissing` so a service can answer 403.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridgekit.emulator.store import Store
from bridgekit.emulator.tls import TlsFiles, ensure_tls, generate_self_signed, write_private

T = TypeVar("T")

__all__ = [
    "DATAVERSE_ROLE",
    "GRAPH_APP_ID",
    "GRAPH_ROLES",
    "SECRET_ENV",
    "AppRegistration",
    "EmulatorContext",
    "FaultSettings",
    "RoleMissing",
    "Settings",
    "TokenRejected",
    "b64url",
    "cert_thumbprints",
]

log = logging.getLogger("bridgekit.emulator")

SECRET_ENV = "BRIDGEKIT_EMULATOR_CLIENT_SECRET"  # noqa: S105 - the variable's name, not a secret
#: The app role (and delegated scope) that grants Dataverse access. Real Dataverse authorises app-only
#: callers through an application user's security roles; the emulator models that as one role claim.
DATAVERSE_ROLE = "user_impersonation"
#: Microsoft Graph's well-known application id: tokens for Graph may carry it as ``aud`` (v2 tokens).
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_ROLES: tuple[str, ...] = (
    "User.Read.All", "Group.Read.All", "GroupMember.Read.All", "Mail.Read", "Calendars.Read", "Contacts.Read",
)
# Deterministic GUIDs (tenant, demo app ...) are uuid5 names under this namespace.
_NS = uuid.UUID("6f1e3c52-2a57-4f43-9a43-7d1b0c2b9e11")
_PBKDF2_ROUNDS = 20_000
_CLOCK_SKEW_S = 300  # Entra-issued tokens are accepted with 5 minutes of clock skew


def b64url(data: bytes) -> str:
    """Unpadded base64url, as used in JWT headers (``x5t``) and JWKS."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_thumbprints(cert_pem: bytes) -> tuple[str, str, str]:
    """(SHA-1 hex, ``x5t`` = base64url SHA-1, ``x5t#S256`` = base64url SHA-256) of a PEM certificate."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    sha1 = hashlib.sha1(der).digest()  # noqa: S324 - the x5t header is defined as SHA-1 (RFC 7515 §4.1.7)
    return sha1.hex().upper(), b64url(sha1), b64url(hashlib.sha256(der).digest())


class TokenRejected(Exception):
    """A bearer token was missing or invalid.

    Attributes:
        reason: Human-readable cause, safe to show (never contains the token).
        code: Machine-readable cause: ``missing_token``, ``malformed_token``, ``invalid_signature``,
            ``expired``, ``not_yet_valid``, ``invalid_audience``, ``invalid_issuer``, ``invalid_tenant``.
    """

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


class RoleMissing(Exception):
    """The token is valid but carries none of the roles/scopes an operation needs (answer 403)."""

    def __init__(self, required: tuple[str, ...], granted: tuple[str, ...]) -> None:
        super().__init__(f"token lacks any of the required permissions: {', '.join(required)}")
        self.required, self.granted = required, granted


@dataclass
class Settings:
    """Tunable service behaviour; defaults are the documented production values, tests lower them.

    Attributes:
        token_lifetime_s: ``expires_in`` of access tokens (Entra's sample shows 3599; MSAL treats tokens
            with < 300 s left as expired, protocols.md §0.4, so keep this well above 300).
        token_clock_skew_s: Leeway when checking a bearer token's ``exp``/``nbf`` (tests set 0 to see
            expired tokens rejected at once).
        refresh_token_lifetime_s: Lifetime of refresh tokens from the device-code flow.
        device_code_interval_s: Poll ``interval`` returned by the devicecode endpoint (Entra: 5).
        device_code_expires_in_s: Device code lifetime (Entra: 900).
        delta_token_max_age_s: Age after which Dataverse/Graph delta tokens are refused (Graph directory: 7 days).
        dataverse_requests_per_window: Service-protection request count per user per window (6000).
        dataverse_window_s: Sliding window for requests and execution time (300 s).
        dataverse_execution_ms_per_window: Combined execution time per user per window (1,200,000 ms).
        dataverse_concurrency: Concurrent requests per user (52).
        graph_requests_per_window: Graph requests per app per window (identity & access, small tenant: 3500 / 10 s);
            Outlook requests (a user's mail, calendar, contacts) are not counted here but per mailbox, below.
        graph_window_s: Graph throttling window.
        graph_mailbox_concurrency: Concurrent Outlook requests per app + mailbox (4).
        graph_mailbox_requests_per_window: Outlook requests per app + mailbox per window (10,000).
        graph_mailbox_window_s: The Outlook window (10 minutes).
    """

    token_lifetime_s: int = 3599
    token_clock_skew_s: int = 300
    refresh_token_lifetime_s: int = 90 * 86400
    device_code_interval_s: int = 5
    device_code_expires_in_s: int = 900
    delta_token_max_age_s: int = 7 * 86400
    dataverse_requests_per_window: int = 6000
    dataverse_window_s: int = 300
    dataverse_execution_ms_per_window: int = 1_200_000
    dataverse_concurrency: int = 52
    graph_requests_per_window: int = 3500
    graph_window_s: int = 10
    graph_mailbox_concurrency: int = 4
    graph_mailbox_requests_per_window: int = 10_000
    graph_mailbox_window_s: int = 600

    def update(self, values: dict[str, Any]) -> None:
        """Set the given fields (ints only); unknown names raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"setting {key!r} must be a non-negative integer")
        for key, value in values.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FaultSettings:
    """Injected faults for the ``/org`` and ``/graph`` prefixes (identity and admin are never faulted).

    Attributes:
        throttle_rate: Fraction of requests answered 429 with the service's throttling body.
        error_5xx_rate: Fraction answered 503 (Graph ``serviceNotAvailable`` / Dataverse ``0x80040216``-like).
        latency_ms: Delay added before every request.
        drop_rate: Fraction whose connection is closed without an answer.
        force_delta_expiry: Services treat every delta / change-tracking token as expired while set.
        retry_after_s: ``Retry-After`` on injected throttles and 503s (integer seconds).
        services: Which services the rates apply to (``dataverse``, ``graph``).
        seed: Seed for the fault dice, for reproducible runs (None: random).
    """

    throttle_rate: float = 0.0
    error_5xx_rate: float = 0.0
    latency_ms: int = 0
    drop_rate: float = 0.0
    force_delta_expiry: bool = False
    retry_after_s: int = 1
    services: tuple[str, ...] = ("dataverse", "graph")
    seed: int | None = None

    def update(self, values: dict[str, Any]) -> None:
        """Validate and set fields; unknown names or out-of-range rates raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown fault setting {key!r}; known: {', '.join(sorted(known))}")
            if key.endswith("_rate"):
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                    raise ValueError(f"{key} must be a number from 0 to 1")
                value = float(value)
            elif key in ("latency_ms", "retry_after_s"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{key} must be a non-negative integer")
            elif key == "force_delta_expiry":
                if not isinstance(value, bool):
                    raise ValueError("force_delta_expiry must be true or false")
            elif key == "services":
                if not isinstance(value, list | tuple) or not set(value) <= {"dataverse", "graph"}:
                    raise ValueError("services must be a list of 'dataverse' and/or 'graph'")
                value = tuple(value)
            elif key == "seed" and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError("seed must be an integer or null")
            clean[key] = value
        for key, value in clean.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["services"] = list(self.services)
        return d


@dataclass
class AppRegistration:
    """An app registration: credentials (secret hashes, certificate PEMs), app roles per service.

    ``roles`` maps a service (``dataverse`` / ``graph``) to the application permissions granted there
    (admin-consented). Delegated tokens carry the same names as ``scp``.
    """

    client_id: str
    name: str
    roles: dict[str, list[str]] = field(default_factory=dict)
    secrets: list[dict[str, Any]] = field(default_factory=list)  # {salt, hash, expires_at, hint}
    certificates: list[str] = field(default_factory=list)  # PEM text of public certificates
    public_client: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppRegistration:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def add_secret(self, secret: str, *, expires_at: float | None = None) -> None:
        """Remember a secret by salted PBKDF2 hash only; ``hint`` keeps its first 3 characters like Entra."""
        salt = secrets.token_bytes(16)
        digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, _PBKDF2_ROUNDS)
        self.secrets.append({"salt": salt.hex(), "hash": digest.hex(), "expires_at": expires_at,
                             "hint": secret[:3]})

    def match_secret(self, secret: str) -> dict[str, Any] | None:
        """The stored secret entry ``secret`` matches, or None."""
        for entry in self.secrets:
            digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), bytes.fromhex(entry["salt"]), _PBKDF2_ROUNDS)
            if hmac.compare_digest(digest.hex(), entry["hash"]):
                return entry
        return None


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def _hosts(port: int) -> tuple[str, ...]:
    return (f"https://127.0.0.1:{port}", f"https://localhost:{port}")


class EmulatorContext:
    """Everything the emulator's routes share.

    Args:
        home: The emulator's data directory (created if missing).
        port: The TCP port the server listens on (already chosen; URLs are built from it).
        seed: Seed for deterministic identities (tenant id, demo app ids) on first start.
        client_secret: Secret of the client-secret app; defaults to ``$BRIDGEKIT_EMULATOR_CLIENT_SECRET``.
            When empty, that app has no active secret.

    Example:
        >>> ctx = EmulatorContext(tmp_path, port=47443)        # doctest: +SKIP
        >>> claims = ctx.verify_token(request.headers.get("authorization"), ctx.graph_url)  # doctest: +SKIP
        >>> ctx.require_role(claims, "User.Read.All")          # doctest: +SKIP
    """

    def __init__(self, home: str | Path, *, port: int, seed: int = 42, client_secret: str | None = None) -> None:
        self.home = Path(home).expanduser().resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.tls: TlsFiles = ensure_tls(self.home)
        self.store = Store(self.home / "store.sqlite")
        self.settings = Settings()
        self.faults = FaultSettings()
        self.started_at = time.time()
        self._lock = threading.RLock()
        self.device_codes: dict[str, dict[str, Any]] = {}
        self.data_error: str | None = None  # why the synthetic data could not be generated, if it failed
        self.limiter: Any = None  # the fault middleware's usage counters (faults.Limiter), once it exists
        self._serving = threading.Lock()  # see serve()

        ident = self._load_identity(seed)
        self.seed: int = ident["seed"]
        self.tenant_id: str = ident["tenant_id"]
        self.demo_client_id: str = ident["demo_client_id"]
        self.secret_client_id_registered: str = ident["secret_client_id"]

        self.base_url = f"https://127.0.0.1:{port}"
        self.dataverse_url = self.base_url + "/org"
        self.graph_url = self.base_url + "/graph"
        self.signing_key = _load_or_create_key(self.home / "signing.key")
        self._verified_signatures: dict[str, None] = {}  # tokens whose signature checked out (decode_own)
        # (token, audience) -> claims of a bearer token that passed every check of verify_token but time.
        self._accepted: dict[tuple[str, str], dict[str, Any]] = {}
        pub_der = self.signing_key.public_key().public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_id = b64url(hashlib.sha256(pub_der).digest()[:20])
        self.admin_key_path = self.home / "admin.key"
        if not self.admin_key_path.exists():
            write_private(self.admin_key_path, secrets.token_urlsafe(32).encode())
        self._admin_key = self.admin_key_path.read_text().strip()

        self.apps_dir = self.home / "apps"
        self.demo_cert_path = self.apps_dir / "demo.pem"
        self.demo_key_path = self.apps_dir / "demo.key"
        self.apps: dict[str, AppRegistration] = {}
        secret = os.environ.get(SECRET_ENV) if client_secret is None else client_secret
        self.secret_active = bool(secret)
        self._init_apps(secret or "")

    # -- identity bootstrap ------------------------------------------------------------------------
    def _load_identity(self, seed: int) -> dict[str, Any]:
        # The tenant and app ids are fixed on first start (from the seed) and kept in a file, not in
        # the store, so a reset with another seed regenerates data without changing who the tenant is.
        path = self.home / "identity.json"
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        data = {
            "seed": seed,
            "tenant_id": str(uuid.uuid5(_NS, f"tenant:{seed}")),
            "demo_client_id": str(uuid.uuid5(_NS, f"app:demo:{seed}")),
            "secret_client_id": str(uuid.uuid5(_NS, f"app:secret:{seed}")),
        }
        path.write_text(json.dumps(data, indent=2))
        return data

    def _init_apps(self, secret: str) -> None:
        for raw in self.store.get_meta("identity.apps", {}).values():
            app = AppRegistration.from_dict(raw)
            self.apps[app.client_id] = app
        if not self.demo_cert_path.exists() or not self.demo_key_path.exists():
            cert_pem, key_pem = generate_self_signed("bridgekit emulator demo app")
            write_private(self.demo_key_path, key_pem)
            self.demo_cert_path.write_bytes(cert_pem)
        full_roles = {"dataverse": [DATAVERSE_ROLE], "graph": list(GRAPH_ROLES)}
        demo = AppRegistration(self.demo_client_id, "bridgekit-demo", roles=full_roles,
                               certificates=[self.demo_cert_path.read_text()], public_client=True)
        self.apps[demo.client_id] = demo
        # The secret app's secret comes from the environment at each start, so rotating it is a restart.
        sec = AppRegistration(self.secret_client_id_registered, "bridgekit-demo-secret",
                              roles={k: list(v) for k, v in full_roles.items()})
        if secret:
            sec.add_secret(secret)
        self.apps[sec.client_id] = sec
        self.save_apps()

    @property
    def secret_client_id(self) -> str | None:
        """The client-secret app's id, or None when no secret was provided at start."""
        return self.secret_client_id_registered if self.secret_active else None

    def save_apps(self) -> None:
        """Persist app registrations to store meta (called after changes and after a data reset)."""
        with self._lock:
            self.store.set_meta("identity.apps", {cid: app.to_dict() for cid, app in self.apps.items()})

    def register_app(self, app: AppRegistration) -> None:
        """Add or replace an app registration and persist it."""
        with self._lock:
            self.apps[app.client_id] = app
        self.save_apps()

    def get_app(self, client_id: str) -> AppRegistration | None:
        """The registration for ``client_id``, or None."""
        return self.apps.get(client_id)

    def demo_user(self) -> dict[str, str]:
        """The user who "signs in" in the device-code flow: ``oid``, ``upn``, ``name``.

        Uses meta ``identity.demo_user`` when the synthetic data set one, else the first Graph user in
        the store, else a fixed identity.
        """
        meta = self.store.get_meta("identity.demo_user")
        if isinstance(meta, dict) and meta.get("oid"):
            return {"oid": str(meta["oid"]), "upn": str(meta.get("upn", "")), "name": str(meta.get("name", ""))}
        if "graph.users" in self.store.collections():
            rows = self.store.query("graph.users", limit=1)
            if rows:
                u = rows[0].load()
                return {"oid": rows[0].id, "upn": str(u.get("userPrincipalName", "")),
                        "name": str(u.get("displayName", ""))}
        return {"oid": str(uuid.uuid5(_NS, f"user:demo:{self.tenant_id}")),
                "upn": "demo.user@bridgekit-emulator.onmicrosoft.com", "name": "Demo User"}

    def reset_limits(self) -> None:
        """Forget service-protection / throttling usage (called when settings change)."""
        if self.limiter is not None:
            self.limiter.reset()

    # -- admin -------------------------------------------------------------------------------------
    def check_admin_key(self, presented: str | None) -> bool:
        """True when ``presented`` equals the admin key (constant-time comparison)."""
        return bool(presented) and hmac.compare_digest(str(presented), self._admin_key)

    # -- URLs and audiences ------------------------------------------------------------------------
    def issuer(self, host_url: str | None = None) -> str:
        """The v2 issuer for the host the caller used (``127.0.0.1`` by default, ``localhost`` allowed)."""
        return f"{host_url or self.base_url}/{self.tenant_id}/v2.0"

    def host_url_for(self, host_header: str | None) -> str:
        """``https://localhost:<port>`` when the caller addressed localhost, else the 127.0.0.1 base URL.

        MSAL checks that the discovered issuer has the same host as the configured authority
        (protocols.md §3.5), so discovery answers with whichever of the two names the caller used.
        """
        if host_header and host_header.split(":")[0].lower() == "localhost":
            return f"https://localhost:{self.port}"
        return self.base_url

    def token_endpoints(self) -> set[str]:
        """Every spelling of the token endpoint accepted as a client assertion ``aud``."""
        return {f"{h}/{t}/oauth2/v2.0/token" for h in _hosts(self.port)
                for t in (self.tenant_id, "organizations", "common")}

    def resolve_resource(self, resource: str) -> str | None:
        """Which service a resource URI (the part before ``/.default``) names: ``dataverse``, ``graph`` or None."""
        r = resource.rstrip("/")
        if r in (f"{h}/org" for h in _hosts(self.port)):
            return "dataverse"
        # Kiota derives "https://<host>/.default" when given no scopes (protocols.md §2.7): treat the bare
        # host as Graph, as well as the real Graph resource names.
        if r in ("https://graph.microsoft.com", GRAPH_APP_ID) or r in (f"{h}/graph" for h in _hosts(self.port)) \
                or r in _hosts(self.port):
            return "graph"
        return None

    def audiences(self, audience: str) -> set[str]:
        """All ``aud`` values accepted for ``audience`` (a service name or one of its resource URIs)."""
        kind = audience if audience in ("dataverse", "graph") else self.resolve_resource(audience)
        if kind == "dataverse":
            return {f"{h}/org" for h in _hosts(self.port)}
        if kind == "graph":
            return ({f"{h}/graph" for h in _hosts(self.port)} | set(_hosts(self.port))
                    | {"https://graph.microsoft.com", GRAPH_APP_ID})
        return {audience.rstrip("/")}

    def serve(self, handle: Callable[..., T], *args: Any) -> T:
        """Run a Dataverse or Graph handler, one at a time (called on the server's thread pool).

        Handlers are Python under one GIL: run side by side, each SQLite call hands the GIL to another
        handler and waits up to a switch interval to get it back, so serving them one at a time does the
        same work with less CPU. Injected latency and the network are outside, so requests still overlap
        where a tenant's do.
        """
        with self._serving:
            return handle(*args)

    # -- tokens ------------------------------------------------------------------------------------
    def sign(self, claims: dict[str, Any]) -> str:
        """Sign ``claims`` as an RS256 JWT with the tenant's signing key."""
        return jwt.encode(claims, self.signing_key, algorithm="RS256", headers={"kid": self.key_id, "typ": "JWT"})

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set publishing the signing key."""
        nums = self.signing_key.public_key().public_numbers()

        def b64int(n: int) -> str:
            return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.key_id,
                          "n": b64int(nums.n), "e": b64int(nums.e), "issuer": self.issuer()}]}

    def decode_own(self, token: str, *, audience: set[str] | None, leeway: int = _CLOCK_SKEW_S) -> dict[str, Any]:
        """Verify a JWT this emulator signed (signature, exp/nbf, aud when given); raises jwt errors."""
        opts: Any = {"require": ["exp", "iat"], "verify_aud": audience is not None}
        if token in self._verified_signatures:
            # The RS256 signature of this exact token was checked before (a client sends one token for an
            # hour, a $batch carries it for each item): skip only the RSA step; expiry, not-before and
            # audience are checked on every call.
            opts.update(verify_signature=False, verify_exp=True, verify_nbf=True, verify_iat=True)
        claims: dict[str, Any] = jwt.decode(token, self.signing_key.public_key(), algorithms=["RS256"],
                                            audience=list(audience) if audience else None,
                                            options=opts, leeway=leeway)
        if token not in self._verified_signatures:
            if len(self._verified_signatures) >= 4096:
                self._verified_signatures.clear()
            self._verified_signatures[token] = None
        return claims

    def verify_token(self, authorization_header: str | None, audience: str) -> dict[str, Any]:
        """Validate a bearer token for ``audience`` and return its claims.

        Args:
            authorization_header: The raw ``Authorization`` header value (or None).
            audience: ``"dataverse"``, ``"graph"``, or a resource URI such as ``ctx.dataverse_url``.

        Raises:
            TokenRejected: missing, malformed, badly signed, expired, wrong audience/issuer/tenant.
        """
        if not authorization_header:
            raise TokenRejected("no bearer token was presented", "missing_token")
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenRejected("the Authorization header is not a Bearer token", "missing_token")
        known = self._accepted.get((token, audience))
        if known is not None:
            # Accepted before for this audience (a client sends one token for an hour, and a $batch carries
            # it for each item): what can change since is only the time.
            now, skew = time.time(), self.settings.token_clock_skew_s
            if now >= float(known["exp"]) + skew:
                raise TokenRejected("the access token has expired", "expired")
            if now < float(known.get("nbf", 0)) - skew:
                raise TokenRejected("the access token is not yet valid", "not_yet_valid")
            return dict(known)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenRejected("the bearer token is not a well-formed JWT", "malformed_token") from exc
        if header.get("alg") != "RS256" or header.get("kid") != self.key_id:
            raise TokenRejected("the token was not signed by this tenant's signing key", "invalid_signature")
        try:
            claims = self.decode_own(token, audience=self.audiences(audience),
                                     leeway=self.settings.token_clock_skew_s)
        except jwt.ExpiredSignatureError as exc:
            raise TokenRejected("the access token has expired", "expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenRejected("the access token is not yet valid", "not_yet_valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected(f"the token's audience is not valid for {audience}", "invalid_audience") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenRejected("the token signature is invalid", "invalid_signature") from exc
        except jwt.PyJWTError as exc:
            raise TokenRejected("the bearer token could not be validated", "malformed_token") from exc
        if claims.get("typ") == "refresh" or claims.get("iss") not in {self.issuer(h) for h in _hosts(self.port)}:
            raise TokenRejected("the token was not issued by this tenant's token service", "invalid_issuer")
        if claims.get("tid") != self.tenant_id:
            raise TokenRejected("the token belongs to another tenant", "invalid_tenant")
        if len(self._accepted) >= 4096:
            self._accepted.clear()
        self._accepted[(token, audience)] = dict(claims)
        return claims

    @staticmethod
    def granted(claims: dict[str, Any]) -> tuple[str, ...]:
        """App roles (``roles``) plus delegated scopes (``scp``) a token carries."""
        roles = [str(r) for r in claims.get("roles", [])]
        return tuple(roles + str(claims.get("scp", "")).split())

    def require_role(self, claims: dict[str, Any], *roles: str) -> None:
        """Raise :class:`RoleMissing` unless the token carries at least one of ``roles``.

        App-only tokens are checked against ``roles``; delegated ones against ``scp``. A ``*.ReadWrite.All``
        grant also satisfies the matching ``*.Read.All``.
        """
        have = set(self.granted(claims))
        for role in roles:
            if role in have or role.replace(".Read.", ".ReadWrite.") in have or role.replace(".Read", ".ReadWrite") in have:
                return
        raise RoleMissing(tuple(roles), tuple(sorted(have)))

    # -- info --------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The public facts about this emulator (no secret)."""
        return {
            "base_url": self.base_url,
            "authority_host": self.base_url,
            "tenant_id": self.tenant_id,
            "client_id": self.demo_client_id,
            "certificate_path": str(self.demo_cert_path),
            "private_key_path": str(self.demo_key_path),
            "secret_client_id": self.secret_client_id,
            "dataverse_url": self.dataverse_url,
            "graph_url": self.graph_url,
            "ca_bundle": str(self.tls.ca_cert),
            "admin_key_path": str(self.admin_key_path),
            "home": str(self.home),
            "pid": os.getpid(),
            "port": self.port,
            "seed": self.seed,
            "scale": self.store.get_meta("emulator.scale"),
            "data_seed": self.store.get_meta("emulator.seed"),
            "started_at": self.started_at,
            "data_error": self.data_error,
        }

    def new_trace_id(self) -> str:
        """A fresh GUID for trace/correlation ids in error bodies."""
        return str(uuid.uuid4())

    def digest_hint(self, value: str) -> str:
        """A short non-reversible fingerprint of a value, for logs that must not contain it."""
        return hashlib.sha256(value.encode()).hexdigest()[:8]
