"""The MSAL seam: token acquisition per auth mode, the persistent token cache, the bearer-token hook, MSAL errors -> AuthError.

One :class:`TokenProvider` per profile holds one MSAL application and hands out one token per resource
(``{dataverse_url}/.default``, ``{graph_url}/.default``). :class:`BearerAuth` attaches it to requests and,
when the service answers 401, drops the cached token and resends once.

Example:
    >>> provider = TokenProvider(profile)                                   # doctest: +SKIP
    >>> session.auth = provider.bearer(resource_scope(profile.graph_url))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msal
import platformdirs
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from bridgekit.config import Profile
from bridgekit.errors import (
    AuthError,
    BridgekitError,
    ConfigError,
    MissingCredentialError,
    TransientError,
    redact,
)
from bridgekit.http import tls_session

__all__ = [
    "BearerAuth",
    "CertificateCredential",
    "TokenProvider",
    "auth_error",
    "is_microsoft_host",
    "load_certificate",
    "login",
    "logout",
    "resource_scope",
    "status",
    "token_cache_path",
]

log = logging.getLogger("bridgekit.auth")

# Entra ID hosts MSAL knows (public and national clouds); anything else is a private authority such as
# the emulator, for which instance discovery must be off (protocols.md §0.2, §3.5).
_MICROSOFT_HOSTS = (
    "login.microsoftonline.com", "login.microsoft.com", "login.windows.net", "sts.windows.net",
    "login.microsoftonline.us", "login.chinacloudapi.cn", "login.partner.microsoftonline.cn",
    "login.microsoftonline.de",
)
_AADSTS = re.compile(r"AADSTS(\d+)")

DeviceCodeCallback = Callable[[str], None]


def is_microsoft_host(url: str) -> bool:
    """True when ``url`` is an Entra ID (Microsoft) authority host."""
    host = (urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in _MICROSOFT_HOSTS)


def resource_scope(resource_url: str) -> str:
    """The client-credentials scope for a resource: ``https://org.crm.dynamics.com/.default``."""
    return resource_url.rstrip("/") + "/.default"


def _embedded_json(text: str) -> dict[str, Any] | None:
    """The OAuth error object MSAL quotes inside an exception message, if any."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
    except ValueError:
        return None
    return data if isinstance(data, dict) and "error" in data else None


def _hints(profile: Profile | None) -> dict[str, str]:
    var = profile.client_secret_env if profile and profile.client_secret_env else "the client secret variable"
    return {
        "AADSTS7000215": f"the client secret is wrong: check the secret in ${var} (use the secret's Value, not its ID)",
        "AADSTS7000222": f"the client secret has expired: create a new one in the app registration and put it in ${var}",
        "AADSTS700016": "the application (client_id) is unknown in this tenant: check client_id and tenant_id in the "
                        "profile, and that the app is registered or consented in that tenant",
        "AADSTS90002": "the tenant does not exist: check tenant_id (a GUID or a verified domain) in the profile",
        "AADSTS65001": "the application has no admin consent for this API: ask a tenant admin to grant consent "
                       "to the app's API permissions",
        "AADSTS700027": "the certificate was not accepted: upload this certificate's public part to the app "
                        "registration, or check certificate_path in the profile",
        "AADSTS70011": "the scope is invalid: check dataverse_url / graph_url in the profile",
        "AADSTS500011": "the resource is not in this tenant: check dataverse_url and tenant_id in the profile",
        "AADSTS7000112": "the application is disabled in this tenant: ask an admin to enable it",
        "AADSTS50034": "the user does not exist in this tenant: sign in with an account of this tenant",
        "AADSTS50076": "multi-factor authentication is required: run `bridgekit auth login` again",
        "AADSTS70043": "the sign-in expired: run `bridgekit auth login` again",
        "AADSTS700082": "the sign-in expired: run `bridgekit auth login` again",
    }


def auth_error(result: Mapping[str, Any], *, profile: Profile | None = None, scope: str | None = None) -> AuthError:
    """Translate an MSAL error dict (``error``, ``error_description``, ``error_codes``) into :class:`AuthError`.

    The AADSTS code goes into ``service_code`` and selects a hint naming what to fix.
    """
    error = str(result.get("error") or "unknown_error")
    description = str(result.get("error_description") or "")
    codes = result.get("error_codes") or []
    match = _AADSTS.search(description)
    code = f"AADSTS{codes[0]}" if codes else (match.group(0) if match else None)
    first_line = description.strip().splitlines()[0] if description.strip() else error
    hints = _hints(profile)
    hint = hints.get(code or "")
    if hint is None and code and code.startswith("AADSTS650"):
        hint = hints["AADSTS65001"]  # the 650xx family is consent
    if hint is None:
        hint = {
            "invalid_client": "check the client credential (secret or certificate) configured for this profile",
            "authorization_declined": "the sign-in was declined; run `bridgekit auth login` again",
            "expired_token": "the device code expired before sign-in finished; run `bridgekit auth login` again",
            "bad_verification_code": "the device code was not recognised; run `bridgekit auth login` again",
            "invalid_grant": "the sign-in is no longer valid; run `bridgekit auth login` again",
        }.get(error, "see the AADSTS code at https://login.microsoftonline.com/error")
    where = f" for {scope}" if scope else ""
    return AuthError(f"could not get a token{where}: {error}: {first_line}", hint=hint, service_code=code,
                     error=error, status=result.get("status") if isinstance(result.get("status"), int) else None)


@dataclass(frozen=True)
class CertificateCredential:
    """A loaded client certificate: PEM private key (unencrypted, in memory only), certificate and thumbprints."""

    private_key_pem: str
    certificate_pem: str
    thumbprint: str  # SHA-1, upper-case hex: what the Entra portal shows
    thumbprint_sha256: str

    def msal_credential(self, *, send_x5c: bool = False) -> dict[str, Any]:
        """The ``client_credential`` dict for MSAL.

        Without x5c MSAL signs RS256 with the SHA-1 ``x5t``; with ``send_x5c`` (subject name/issuer auth)
        it gets the certificate, derives the SHA-256 thumbprint and sends the chain in ``x5c``.
        """
        if send_x5c:
            return {"private_key": self.private_key_pem, "public_certificate": self.certificate_pem}
        return {"private_key": self.private_key_pem, "thumbprint": self.thumbprint}

    def __repr__(self) -> str:  # never show the key
        return f"CertificateCredential(thumbprint={self.thumbprint!r})"


def _key_candidates(path: Path) -> list[Path]:
    stem = path.name.removesuffix(".pem").removesuffix(".crt").removesuffix(".cer")
    names = [f"{stem}.key", f"{stem}-key.pem", f"{stem}_key.pem", f"{stem}.key.pem"]
    if stem.endswith(("cert", "-cert", "_cert")):
        base = stem.removesuffix("cert").rstrip("-_")
        names += [f"{base}-key.pem", f"{base}_key.pem", f"{base}key.pem", f"{base}.key"]
    return [path.with_name(n) for n in names]


def load_certificate(path: str | Path, *, password: str | None = None,
                     private_key_path: str | Path | None = None) -> CertificateCredential:
    """Load a client certificate from a PEM (certificate + key, or key in ``private_key_path`` or alongside) or PFX.

    Raises:
        ConfigError: the file is missing, unreadable, has no certificate or key, or the password is wrong.
    """
    cert_path = Path(path).expanduser()
    try:
        data = cert_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {cert_path}: {exc.strerror}", key="certificate_path",
                          path=str(cert_path), hint="set certificate_path to a PEM or PFX file") from exc
    pwd = password.encode() if password else None
    try:
        if cert_path.suffix.lower() in (".pfx", ".p12"):
            key, cert, _extra = pkcs12.load_key_and_certificates(data, pwd)
            if key is None or cert is None:
                raise ValueError("the PFX holds no private key or no certificate")
        else:
            certs = x509.load_pem_x509_certificates(data) if b"CERTIFICATE-----" in data else []
            if not certs:
                raise ValueError("no PEM certificate found")
            cert = certs[0]
            key_data = data if b"PRIVATE KEY-----" in data else None
            if key_data is None:
                candidates = [Path(private_key_path).expanduser()] if private_key_path else _key_candidates(cert_path)
                for candidate in candidates:
                    if candidate.is_file():
                        key_data = candidate.read_bytes()
                        break
            if key_data is None:
                raise ValueError("no private key in the PEM and none found alongside it")
            key = serialization.load_pem_private_key(key_data, pwd)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load certificate {cert_path}: {exc}", key="certificate_path",
                          path=str(cert_path),
                          hint="use a PEM holding the certificate and its private key (or the key next to it), or a "
                               "PFX with its password in the variable named by certificate_password_env") from exc
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertificateCredential(
        private_key_pem=key_pem,
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        thumbprint=hashlib.sha1(der).hexdigest().upper(),  # noqa: S324 - the x5t thumbprint is SHA-1 by definition
        thumbprint_sha256=cert.fingerprint(hashes.SHA256()).hex().upper(),
    )


def token_cache_path(profile: Profile) -> Path:
    """Where the persistent (device code) token cache of ``profile`` lives."""
    return Path(platformdirs.user_cache_dir("bridgekit")) / "tokens" / f"{profile.name}.json"


def _persistent_cache(path: Path) -> tuple[msal.SerializableTokenCache, str]:
    """An msal-extensions cache: OS-encrypted when available, else a 0600 file. Returns (cache, kind)."""
    from msal_extensions import (  # type: ignore[import-untyped]
        FilePersistence,
        PersistedTokenCache,
        build_encrypted_persistence,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path.parent, 0o700)
    try:
        persistence = build_encrypted_persistence(str(path))
        kind = "encrypted"
    except Exception:  # no keyring / libsecret on this machine: fall back to an owner-only file
        persistence = FilePersistence(str(path))
        kind = "file (0600)"
    if path.exists():
        os.chmod(path, 0o600)
    return PersistedTokenCache(persistence), kind


class TokenProvider:
    """Tokens for one profile, one per resource, cached by MSAL.

    Auth modes (``profile.auth``): ``client_secret`` (secret from the environment variable named by
    ``client_secret_env``), ``certificate`` (PEM or PFX at ``certificate_path``), ``device_code`` (a signed-in
    user, persistent cache; see :func:`login`), ``managed_identity`` (MSAL's ManagedIdentityClient).

    Args:
        profile: The resolved profile (for the emulator: after its runtime values are filled in).
        on_device_code: For ``device_code``: shows the sign-in message; when given, a missing sign-in
            starts the device code flow instead of raising.
        send_x5c: Send the certificate chain (subject name/issuer authentication).
        private_key_path: Key file when the certificate PEM does not hold the key.
        http_client: The session MSAL uses (default: a verified session trusting ``profile.ca_bundle``).
        cache_path: Override the persistent cache location (device code).
    """

    def __init__(self, profile: Profile, *, on_device_code: DeviceCodeCallback | None = None,
                 send_x5c: bool = False, private_key_path: str | None = None,
                 http_client: requests.Session | None = None, cache_path: Path | None = None) -> None:
        if profile.auth == "emulator":
            raise ConfigError("the emulator profile must be resolved to the running emulator first",
                              profile=profile.name, hint="use bridgekit.connect('emulator'), which starts it")
        for key in ("tenant_id", "client_id") if profile.auth != "managed_identity" else ():
            if not getattr(profile, key):
                raise ConfigError(f"profile '{profile.name}' has no {key}", key=key, profile=profile.name,
                                  hint=f'add {key} = "..." to the profile')
        self.profile = profile
        self.mode = profile.auth
        self.authority = f"{profile.authority_host.rstrip('/')}/{profile.tenant_id}"
        self._on_device_code = on_device_code
        self._send_x5c = send_x5c
        self._private_key_path = private_key_path
        self._http = http_client or tls_session(profile.ca_bundle)
        self._cache_path = cache_path or token_cache_path(profile)
        self._app: Any = None
        self._cache_kind = "memory"
        self._lock = threading.RLock()
        self._credential: Any = self._load_credential()  # fail fast on a missing variable or bad certificate

    # -- construction -------------------------------------------------------------------------------

    def _load_credential(self) -> Any:
        p = self.profile
        if self.mode == "client_secret":
            name = p.client_secret_env
            if not name:
                raise ConfigError(f"profile '{p.name}' has no client_secret_env", key="client_secret_env",
                                  profile=p.name, hint='add client_secret_env = "NAME_OF_THE_VARIABLE"')
            secret = os.environ.get(name)
            if not secret:
                raise MissingCredentialError(
                    f"environment variable {name} is not set (client secret for profile '{p.name}')",
                    key="client_secret_env", profile=p.name, hint=f"export {name}=<the client secret value>")
            return secret
        if self.mode == "certificate":
            if not p.certificate_path:
                raise ConfigError(f"profile '{p.name}' has no certificate_path", key="certificate_path",
                                  profile=p.name, hint="set certificate_path to a PEM or PFX file")
            password = None
            if p.certificate_password_env:
                password = os.environ.get(p.certificate_password_env)
                if password is None:
                    raise MissingCredentialError(
                        f"environment variable {p.certificate_password_env} is not set "
                        f"(certificate password for profile '{p.name}')", key="certificate_password_env",
                        profile=p.name, hint=f"export {p.certificate_password_env}=<the certificate password>")
            cert = load_certificate(p.certificate_path, password=password, private_key_path=self._private_key_path)
            self.certificate = cert
            return cert.msal_credential(send_x5c=self._send_x5c)
        if self.mode in ("device_code", "managed_identity"):
            return None
        raise ConfigError(f"unknown auth mode '{self.mode}'", key="auth", profile=p.name,
                          hint="use client_secret, certificate, device_code or managed_identity")

    def _build_app(self) -> Any:
        p = self.profile
        # Instance discovery calls login.microsoftonline.com; off for any other authority (protocols.md §3.5).
        discovery: dict[str, Any] = {} if is_microsoft_host(self.authority) else {"instance_discovery": False}
        try:
            if self.mode in ("client_secret", "certificate"):
                return msal.ConfidentialClientApplication(
                    p.client_id, client_credential=self._credential, authority=self.authority,
                    http_client=self._http, **discovery)
            if self.mode == "device_code":
                cache, self._cache_kind = _persistent_cache(self._cache_path)
                return msal.PublicClientApplication(p.client_id, authority=self.authority, token_cache=cache,
                                                    http_client=self._http, **discovery)
            identity: Any = (msal.UserAssignedManagedIdentity(client_id=p.client_id) if p.client_id
                             else msal.SystemAssignedManagedIdentity())
            return msal.ManagedIdentityClient(identity, http_client=self._http)
        except BridgekitError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: BaseException) -> BridgekitError:
        if isinstance(exc, requests.exceptions.SSLError):
            return ConfigError(f"TLS verification failed talking to {urlsplit(self.authority).netloc}",
                               key="ca_bundle", profile=self.profile.name,
                               hint="set ca_bundle in the profile to the CA that signed the authority's certificate")
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return TransientError(f"cannot reach the identity service at {urlsplit(self.authority).netloc}",
                                  service="identity")
        if isinstance(exc, requests.exceptions.HTTPError):
            return TransientError(f"the identity service failed: {exc}", service="identity")
        text = redact(str(exc))
        # MSAL wraps the discovery failure ("OIDC Discovery failed ... AADSTS90002 ...") in a generic
        # ValueError; the AADSTS code is in the chained exception.
        chain: list[str] = []
        item: BaseException | None = exc
        while item is not None and len(chain) < 5:
            chain.append(redact(str(item)))
            item = item.__cause__ or item.__context__
        match = next((m for m in (_AADSTS.search(t) for t in chain) if m), None)
        if match:
            text = next(t for t in chain if match.group(0) in t)
            body = _embedded_json(text)
            if body is not None:
                return auth_error(body, profile=self.profile)
        if match:
            return auth_error({"error": "invalid_request", "error_description": text,
                               "error_codes": [int(match.group(1))]}, profile=self.profile)
        return AuthError(f"cannot use authority {self.authority}: {text.splitlines()[0] if text else type(exc).__name__}",
                         hint="check authority_host and tenant_id in the profile")

    @property
    def app(self) -> Any:
        """The MSAL application (built on first use: building it fetches OIDC discovery)."""
        with self._lock:
            if self._app is None:
                self._app = self._build_app()
            return self._app

    # -- tokens -------------------------------------------------------------------------------------

    def token(self, scope: str) -> str:
        """An access token for ``scope`` (from MSAL's cache when still valid for 5 minutes or more).

        Raises:
            AuthError: Entra refused (the AADSTS code and a hint are on the error), or no user is signed in.
            ConfigError: TLS trust or credential problems.
            TransientError: the identity service is unreachable or failing.
        """
        with self._lock:
            try:
                result = self._acquire(scope)
            except BridgekitError:
                raise
            except Exception as exc:
                raise self._translate(exc) from exc
        if not result or "access_token" not in result:
            raise auth_error(result or {"error": "no_token"}, profile=self.profile, scope=scope)
        return str(result["access_token"])

    def _acquire(self, scope: str) -> Mapping[str, Any] | None:
        app = self.app
        if self.mode in ("client_secret", "certificate"):
            return app.acquire_token_for_client(scopes=[scope])  # type: ignore[no-any-return]
        if self.mode == "managed_identity":
            return app.acquire_token_for_client(resource=scope.removesuffix("/.default"))  # type: ignore[no-any-return]
        accounts = app.get_accounts()
        if accounts:
            result = app.acquire_token_silent([scope], account=accounts[0])
            if result and "access_token" in result:
                return result  # type: ignore[no-any-return]
        if self._on_device_code is None:
            raise AuthError(f"no signed-in user for profile '{self.profile.name}'",
                            hint=f"run `bridgekit --profile {self.profile.name} auth login`")
        return self._device_flow(scope, self._on_device_code)

    def _device_flow(self, scope: str, show: DeviceCodeCallback) -> Mapping[str, Any]:
        flow = self.app.initiate_device_flow(scopes=[scope])
        if "user_code" not in flow:
            raise auth_error(flow, profile=self.profile, scope=scope)
        show(str(flow["message"]))
        return self.app.acquire_token_by_device_flow(flow)  # type: ignore[no-any-return]

    def invalidate(self, scope: str, token: str) -> None:
        """Forget ``token`` (rejected by the service) so the next :meth:`token` call fetches a new one."""
        with self._lock:
            cache = getattr(self.app, "token_cache", None) or getattr(self.app, "_token_cache", None)
            if cache is None:
                return
            for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                if entry.get("secret") == token:
                    cache.remove_at(entry)

    def bearer(self, scope: str) -> BearerAuth:
        """A ``requests`` auth hook sending tokens for ``scope``."""
        return BearerAuth(self, scope)

    @property
    def cache_kind(self) -> str:
        """``memory``, ``encrypted`` or ``file (0600)``."""
        return self._cache_kind

    def __repr__(self) -> str:
        return f"TokenProvider(profile={self.profile.name!r}, mode={self.mode!r})"


class BearerAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer <token>``; on a 401 drops the token, gets a new one and resends once.

    A 401 can arrive with a token MSAL still thought valid (revoked, signing key rolled, clock skew);
    one refresh-and-retry covers those without looping.
    """

    def __init__(self, provider: TokenProvider, scope: str) -> None:
        self.provider = provider
        self.scope = scope

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.provider.token(self.scope)
        request.headers["Authorization"] = f"Bearer {token}"
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        if response.status_code != 401 or request is None or getattr(request, "_bk_retried", False):
            return response
        sent = str(request.headers.get("Authorization", "")).removeprefix("Bearer ")
        self.provider.invalidate(self.scope, sent)
        fresh = self.provider.token(self.scope)
        if fresh == sent:
            return response
        response.content  # noqa: B018 - drain so the connection can be reused
        response.close()
        retry = request.copy()
        retry.headers["Authorization"] = f"Bearer {fresh}"
        retry._bk_retried = True  # type: ignore[attr-defined]
        connection = response.connection
        new = connection.send(retry, **kwargs)
        new.history.append(response)
        new.request = retry
        log.debug("401 from %s: token refreshed and request resent", urlsplit(str(request.url)).path)
        return new  # type: ignore[no-any-return]


# -- CLI-facing functions (bridgekit auth login|status|logout) -----------------------------------------


def login(profile: Profile, *, on_message: DeviceCodeCallback | None = None) -> dict[str, Any]:
    """Sign in: device code flow for ``device_code`` profiles (token cached), a token fetch for the others.

    Returns a status dict (see :func:`status`).
    """
    show = on_message or (lambda text: print(text, file=sys.stderr))
    provider = TokenProvider(profile, on_device_code=show)
    if profile.dataverse_url:
        provider.token(resource_scope(profile.dataverse_url))
    provider.token(resource_scope(profile.graph_url))
    return status(profile, provider=provider)


def status(profile: Profile, *, provider: TokenProvider | None = None) -> dict[str, Any]:
    """What bridgekit would authenticate as for ``profile``, without starting any sign-in.

    Keys: ``profile``, ``mode``, ``authority``, ``client_id``, ``signed_in`` (a token is available without
    interaction), ``account`` (device code), ``cache`` (where tokens are kept), ``error`` (when not signed in).
    """
    info: dict[str, Any] = {"profile": profile.name, "mode": profile.auth, "client_id": profile.client_id,
                            "authority": f"{profile.authority_host.rstrip('/')}/{profile.tenant_id}",
                            "signed_in": False, "account": None, "cache": "memory"}
    try:
        provider = provider or TokenProvider(profile)
        if profile.auth == "device_code":
            info["cache"] = str(token_cache_path(profile))
            accounts = provider.app.get_accounts()
            info["account"] = accounts[0].get("username") if accounts else None
            info["cache"] += f" [{provider.cache_kind}]"
        scope = resource_scope(profile.dataverse_url or profile.graph_url)
        provider.token(scope)
        info["signed_in"] = True
    except BridgekitError as exc:
        info["error"] = exc.message
        info["hint"] = exc.hint
    return info


def logout(profile: Profile, *, cache_path: Path | None = None) -> bool:
    """Forget the signed-in user of a ``device_code`` profile; True if anything was removed.

    Accounts are removed through MSAL first (that clears an OS-encrypted store too), then the files.
    """
    path = cache_path or token_cache_path(profile)
    removed = False
    if profile.auth == "device_code" and path.exists():
        try:
            cache, _kind = _persistent_cache(path)
            for account in cache.search(msal.TokenCache.CredentialType.ACCOUNT):
                cache.remove_account(account)
                removed = True
        except Exception as exc:  # a damaged cache is deleted below all the same
            log.debug("could not clear the token cache through MSAL: %s", type(exc).__name__)
    for candidate in (path, path.with_name(path.name + ".lockfile")):
        if candidate.exists():
            candidate.unlink()
            removed = True
    return removed
