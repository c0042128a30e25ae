"""Profiles: where a tenant is, how to authenticate to it, what to sync, and where the warehouse lives.

Resolution order for the profile *name*: explicit argument > ``BRIDGEKIT_PROFILE`` > ``default_profile``
in ``bridgekit.toml`` > the built-in ``emulator`` profile. ``bridgekit.toml`` is looked for in the
working directory, then in the user config directory (``BRIDGEKIT_CONFIG`` names a file explicitly).

Secrets never live in the file: ``client_secret_env`` names an environment variable, certificates are
files, and a literal secret key is refused with an error saying which variable to use instead.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import platformdirs

from bridgekit.catalog import (
    DATAVERSE_MAX_CONCURRENCY,
    DATAVERSE_MAX_PAGE,
    DEFAULT_GRAPH_RESOURCES,
    DEFAULT_SYNC_PAGE,
    GRAPH_DEFAULT_CONCURRENCY,
    GRAPH_MAX_CONCURRENCY,
    GRAPH_RESOURCES,
    PLATFORM_TABLES,
)
from bridgekit.errors import ConfigError, shown

__all__ = [
    "AUTH_MODES",
    "DEFAULT_DATAVERSE_TABLES",
    "DEFAULT_GRAPH_RESOURCES",
    "EMULATOR_PROFILE",
    "EMULATOR_RUNTIME_SOURCE",
    "LakeTarget",
    "Profile",
    "SyncPlan",
    "config_paths",
    "list_profiles",
    "load_profile",
    "resolve_profile_name",
]

AuthMode = Literal["client_secret", "certificate", "device_code", "managed_identity", "emulator"]
AUTH_MODES: tuple[str, ...] = ("client_secret", "certificate", "device_code", "managed_identity", "emulator")
EMULATOR_PROFILE = "emulator"
#: The source recorded for values that a running emulator filled into an emulator profile.
EMULATOR_RUNTIME_SOURCE = "running emulator"

DEFAULT_DATAVERSE_TABLES: tuple[str, ...] = (
    "account", "contact", "lead", "opportunity", "systemuser", "team", "businessunit",
    "transactioncurrency", "email", "appointment", "phonecall", "task",
)

# Keys that would hold a secret literally; each maps to the key to use instead.
_SECRET_KEYS = {
    "client_secret": "client_secret_env",
    "secret": "client_secret_env",
    "password": "certificate_password_env",
    "certificate_password": "certificate_password_env",
    "access_token": "client_secret_env",
    "private_key": "certificate_path",
}
_PROFILE_KEYS = {
    "tenant_id", "client_id", "auth", "client_secret_env", "certificate_path", "certificate_password_env",
    "dataverse_url", "graph_url", "authority_host", "ca_bundle", "warehouse", "sync", "max_concurrency",
    "graph_concurrency", "emulator_home", "lake",
}
_LAKE_KEYS = {"url", "auth", "account_name", "account_key_env", "sas_token_env", "endpoint", "optimize_every",
              "retention_hours"}
_LAKE_AUTH = ("none", "key", "sas", "profile")
_SYNC_KEYS = {"dataverse", "graph", "page_size", "partitions", "platform"}
_TOP_KEYS = {"default_profile", "profiles"}
_REQUIRED = {
    "client_secret": ("tenant_id", "client_id", "client_secret_env"),
    "certificate": ("tenant_id", "client_id", "certificate_path"),
    "device_code": ("tenant_id", "client_id"),
    "managed_identity": (),
    "emulator": (),
}


@dataclass(frozen=True)
class SyncPlan:
    """What to mirror: Dataverse tables by logical name and Graph resources by name."""

    dataverse: tuple[str, ...] = DEFAULT_DATAVERSE_TABLES
    graph: tuple[str, ...] = DEFAULT_GRAPH_RESOURCES
    page_size: int = DEFAULT_SYNC_PAGE
    #: Range partitions of a large table's full load; None: automatic (see :meth:`partitions_for`).
    partitions: int | None = None
    #: The ``platform`` group (plug-in steps, endpoints, flows, system jobs, ...: :data:`PLATFORM_TABLES`) is in
    #: ``dataverse`` too; off by default so the default sync stays as fast.
    platform: bool = False

    def partitions_for(self, profile: Profile, concurrency: int) -> int:
        """The partitions a full load uses: the configured number, else ``concurrency`` against a
        tenant and 1 against the local emulator, a single process on the same machine, where
        concurrent range reads add server work and win nothing."""
        if self.partitions is not None:
            return self.partitions
        return 1 if profile.is_emulator else concurrency


@dataclass(frozen=True)
class LakeTarget:
    """Where a profile's Delta Lake copy lives (``[profiles.X.lake]``), and how to reach it.

    ``url`` is a local path or ``abfss://<container>@<account>.dfs.core.windows.net/<path>`` (Azure Data Lake
    Storage Gen2). Credentials are named, never held: ``account_key_env`` or ``sas_token_env`` name
    environment variables; ``auth = "profile"`` uses the profile's own identity (an Entra token for Azure
    Storage). ``endpoint`` points at Azurite or a sovereign cloud's blob endpoint.
    """

    url: str
    auth: str = "none"  # none (a local path) | key | sas | profile
    account_name: str | None = None
    account_key_env: str | None = None
    sas_token_env: str | None = None
    endpoint: str | None = None
    optimize_every: int = 100  # commits per table between compactions (0: only `bridgekit lake optimize`)
    retention_hours: int = 168  # files no version younger than this needs are vacuumed (7 days)

    @property
    def is_local(self) -> bool:
        """True for a path on this machine (no object store)."""
        return "://" not in self.url or self.url.startswith("file://")


@dataclass(frozen=True)
class Profile:
    """A resolved profile. ``sources`` says where each value came from (file path, env, built-in).

    Holds names of secrets (environment variables, certificate paths), never secret values.
    """

    name: str
    auth: str = "emulator"
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    certificate_path: str | None = None
    certificate_password_env: str | None = None
    dataverse_url: str | None = None
    graph_url: str = "https://graph.microsoft.com"
    authority_host: str = "https://login.microsoftonline.com"
    ca_bundle: str | None = None
    warehouse: str | None = None
    max_concurrency: int = 8
    graph_concurrency: int = GRAPH_DEFAULT_CONCURRENCY
    emulator_home: str | None = None
    sync: SyncPlan = field(default_factory=SyncPlan)
    lake: LakeTarget | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def is_emulator(self) -> bool:
        """True for the built-in emulator profile (or any ``auth = "emulator"`` profile), also once
        :func:`bridgekit.workbench.resolve_runtime` has filled in the running emulator's values."""
        return self.auth == "emulator" or self.sources.get("auth") == EMULATOR_RUNTIME_SOURCE

    @property
    def warehouse_path(self) -> Path:
        """The DuckDB file: the profile's ``warehouse`` or ``<user data dir>/warehouses/<name>.duckdb``."""
        if self.warehouse:
            return Path(self.warehouse).expanduser()
        return Path(platformdirs.user_data_dir("bridgekit")) / "warehouses" / f"{self.name}.duckdb"

    def with_values(self, **values: Any) -> Profile:
        """A copy with some values replaced (used when the emulator fills in its runtime URLs)."""
        return replace(self, **values)

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, value, source) rows for ``bridgekit profiles show``; secret values are never present."""
        rows: list[tuple[str, str, str]] = []
        for f in fields(self):
            if f.name in ("sources", "name", "sync"):
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            shown = str(value)
            if f.name in ("client_secret_env", "certificate_password_env"):
                shown += " (set)" if os.environ.get(str(value)) else " (not set)"
            rows.append((f.name, shown, self.sources.get(f.name, "default")))
        rows.append(("warehouse_path", str(self.warehouse_path), self.sources.get("warehouse", "default")))
        rows.append(("sync.dataverse", ",".join(self.sync.dataverse), self.sources.get("sync", "default")))
        rows.append(("sync.graph", ",".join(self.sync.graph), self.sources.get("sync", "default")))
        if self.lake is not None:
            rows.append(("lake.url", self.lake.url, self.sources.get("lake", "default")))
            rows.append(("lake.auth", self.lake.auth, self.sources.get("lake", "default")))
        return rows


def config_paths() -> list[Path]:
    """Files that may hold profiles, in the order they are read (first found wins)."""
    explicit = os.environ.get("BRIDGEKIT_CONFIG")
    if explicit:
        return [Path(explicit).expanduser()]
    return [Path.cwd() / "bridgekit.toml", Path(platformdirs.user_config_dir("bridgekit")) / "bridgekit.toml"]


def _read_file() -> tuple[dict[str, Any], Path | None]:
    for path in config_paths():
        if path.is_file():
            try:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}", path=str(path),
                                  hint="fix the syntax error at the position shown") from exc
            _check_top(data, path)
            return data, path
    if os.environ.get("BRIDGEKIT_CONFIG"):
        p = Path(os.environ["BRIDGEKIT_CONFIG"])
        raise ConfigError(f"BRIDGEKIT_CONFIG points to {p}, which does not exist", path=str(p),
                          hint="create the file or unset BRIDGEKIT_CONFIG")
    return {}, None


def _check_top(data: dict[str, Any], path: Path) -> None:
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"unknown key '{key}' in {path}", key=key, path=str(path),
                              hint=f"top-level keys are {', '.join(sorted(_TOP_KEYS))}; profiles go in [profiles.NAME]")
    if "profiles" in data and not isinstance(data["profiles"], dict):
        raise ConfigError(f"'profiles' in {path} must be a table", key="profiles", path=str(path),
                          hint="write profiles as [profiles.NAME] tables")


def resolve_profile_name(explicit: str | None = None) -> tuple[str, str]:
    """The profile name to use and where the choice came from."""
    if explicit:
        return explicit, "argument"
    env = os.environ.get("BRIDGEKIT_PROFILE")
    if env:
        return env, "BRIDGEKIT_PROFILE"
    data, path = _read_file()
    if data.get("default_profile"):
        return str(data["default_profile"]), f"default_profile in {path}"
    return EMULATOR_PROFILE, "built-in"


def list_profiles() -> list[tuple[str, str]]:
    """(name, source) for every profile available: the built-in one and those in the file."""
    data, path = _read_file()
    out = [(EMULATOR_PROFILE, "built-in")]
    for name in sorted(data.get("profiles", {})):
        if name != EMULATOR_PROFILE:
            out.append((name, str(path)))
        else:
            out[0] = (name, f"{path} (overrides built-in)")
    return out


def load_profile(name: str | None = None) -> Profile:
    """Resolve and validate a profile.

    Raises:
        ConfigError: the profile does not exist, has an unknown key, a literal secret, a missing required
            key, or a bad value. The message names the key and the fix.

    Example:
        >>> load_profile("emulator").auth
        'emulator'
    """
    chosen, _origin = resolve_profile_name(name)
    data, path = _read_file()
    table = data.get("profiles", {}).get(chosen)
    if table is None:
        if chosen == EMULATOR_PROFILE:
            return _emulator_profile()
        known = ", ".join(n for n, _ in list_profiles())
        name_shown = shown(chosen)  # a secret pasted where a profile name goes must not reach a CI log
        raise ConfigError(f"profile '{name_shown}' not found", path=str(path) if path else None,
                          profile=None if name_shown != chosen else chosen,
                          hint=f"known profiles: {known}; add [profiles.<name>] to bridgekit.toml"
                          if name_shown != chosen else f"known profiles: {known}; add [profiles.{chosen}] to bridgekit.toml")
    assert path is not None
    return _parse_profile(chosen, table, path)


def _emulator_profile() -> Profile:
    home = os.environ.get("BRIDGEKIT_EMULATOR_HOME")
    sources = {"auth": "built-in"}
    if home:
        sources["emulator_home"] = "BRIDGEKIT_EMULATOR_HOME"
    return Profile(name=EMULATOR_PROFILE, auth="emulator", emulator_home=home, sources=sources)


def _parse_profile(name: str, table: dict[str, Any], path: Path) -> Profile:
    src = str(path)
    where = f"[profiles.{name}] in {path}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table", profile=name, path=src, hint=f"write it as [profiles.{name}]")
    for key, value in table.items():
        if key in _SECRET_KEYS:
            instead = _SECRET_KEYS[key]
            raise ConfigError(
                f"{where} holds a literal secret under '{key}'; secrets never go in files",
                key=key, path=src, profile=name,
                hint=f"remove '{key}', put the secret in an environment variable and set "
                     f"{instead} = \"BRIDGEKIT_{name.upper().replace('-', '_')}_SECRET\" (the variable's name)"
                if instead.endswith("_env") else f"remove '{key}' and set {instead} to the PEM/PFX file instead",
            )
        if key not in _PROFILE_KEYS:
            raise ConfigError(f"unknown key '{key}' in {where}", key=key, path=src, profile=name,
                              hint=f"valid keys: {', '.join(sorted(_PROFILE_KEYS))}")
        if key not in ("sync", "max_concurrency", "graph_concurrency", "lake") and not isinstance(value, str):
            raise ConfigError(f"'{key}' in {where} must be a string", key=key, path=src, profile=name,
                              hint=f'write it as {key} = "..."')
    auth = table.get("auth", "client_secret")
    if auth not in AUTH_MODES:
        raise ConfigError(f"auth = '{auth}' in {where} is not a known mode", key="auth", path=src, profile=name,
                          hint=f"use one of: {', '.join(AUTH_MODES)}")
    for req in _REQUIRED[auth]:
        if not table.get(req):
            raise ConfigError(f"{where} is missing required key '{req}' for auth = '{auth}'", key=req,
                              path=src, profile=name, hint=f"add {req} = \"...\" to {where}")
    if auth != "emulator" and not table.get("dataverse_url"):
        raise ConfigError(f"{where} is missing required key 'dataverse_url'", key="dataverse_url", path=src,
                          profile=name, hint='add dataverse_url = "https://<org>.crm.dynamics.com"')
    for url_key in ("dataverse_url", "graph_url", "authority_host"):
        if url_key in table and not str(table[url_key]).startswith("https://"):
            raise ConfigError(f"'{url_key}' in {where} must be an https:// URL", key=url_key, path=src,
                              profile=name, hint="Microsoft endpoints (and the emulator) are https only")
    env_key = table.get("client_secret_env")
    if env_key and not env_key.replace("_", "").isalnum():
        raise ConfigError(f"client_secret_env in {where} must be the NAME of an environment variable",
                          key="client_secret_env", path=src, profile=name,
                          hint='write e.g. client_secret_env = "CONTOSO_CLIENT_SECRET" and export that variable')
    sync = _parse_sync(table.get("sync", {}), where, src, name)
    values: dict[str, Any] = {k: v for k, v in table.items() if k not in ("sync", "lake")}
    if "lake" in table:
        values["lake"] = _parse_lake(table["lake"], where, src, name)
    if "max_concurrency" in values:
        mc = values["max_concurrency"]
        if not isinstance(mc, int) or not 1 <= mc <= DATAVERSE_MAX_CONCURRENCY:
            raise ConfigError(f"max_concurrency in {where} must be an integer from 1 to {DATAVERSE_MAX_CONCURRENCY}",
                              key="max_concurrency", path=src, profile=name,
                              hint=f"Dataverse allows {DATAVERSE_MAX_CONCURRENCY} concurrent requests per user")
    if "graph_concurrency" in values:
        gc = values["graph_concurrency"]
        if not isinstance(gc, int) or isinstance(gc, bool) or not 1 <= gc <= GRAPH_MAX_CONCURRENCY:
            raise ConfigError(f"graph_concurrency in {where} must be an integer from 1 to {GRAPH_MAX_CONCURRENCY}",
                              key="graph_concurrency", path=src, profile=name,
                              hint=f"Graph requests kept in flight (default {GRAPH_DEFAULT_CONCURRENCY}); "
                                   "Outlook's 4 per mailbox are kept whatever the value")
    values["auth"] = auth
    sources = {k: src for k in table}
    return Profile(name=name, sync=sync, sources=sources, **values)


def _parse_lake(table: Any, where: str, src: str, name: str) -> LakeTarget:
    here = f"[profiles.{name}.lake]"
    if not isinstance(table, dict):
        raise ConfigError(f"lake in {where} must be a table", key="lake", path=src, profile=name,
                          hint=f'write it as {here} with url = "..."')
    for key, value in table.items():
        if key in ("account_key", "sas_token", "key", "sas"):
            raise ConfigError(f"{here} in {src} holds a literal secret under '{key}'; secrets never go in files",
                              key=key, path=src, profile=name,
                              hint=f'remove it, put it in an environment variable and set {key.split("_")[0]}'
                                   f'{"_token" if key.startswith("sas") else "_key"}_env = "NAME_OF_THE_VARIABLE"'
                              if key != "key" else "use account_key_env (the NAME of an environment variable)")
        if key not in _LAKE_KEYS:
            raise ConfigError(f"unknown key '{key}' in {here}", key=key, path=src, profile=name,
                              hint=f"valid keys: {', '.join(sorted(_LAKE_KEYS))}")
        numeric = key in ("optimize_every", "retention_hours")
        if numeric and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{key} in {here} must be a whole number >= 0", key=key, path=src, profile=name)
        if not numeric and not isinstance(value, str):
            raise ConfigError(f"'{key}' in {here} must be a string", key=key, path=src, profile=name)
    if not table.get("url"):
        raise ConfigError(f"{here} in {src} has no url", key="url", path=src, profile=name,
                          hint='add url = "abfss://<container>@<account>.dfs.core.windows.net/bridgekit" or a path')
    url = str(table["url"])
    remote = "://" in url and not url.startswith("file://")
    auth = str(table.get("auth") or ("key" if table.get("account_key_env") else "sas" if table.get("sas_token_env")
                                     else "profile" if remote else "none"))
    if auth not in _LAKE_AUTH:
        raise ConfigError(f"auth = '{auth}' in {here} is not a known mode", key="auth", path=src, profile=name,
                          hint=f"use one of: {', '.join(_LAKE_AUTH)}")
    if remote and not url.startswith(("abfss://", "abfs://", "az://", "azure://")):
        raise ConfigError(f"url in {here} must be a local path or an Azure Data Lake URL (abfss://...)",
                          key="url", path=src, profile=name)
    values = {k: v for k, v in table.items() if k != "auth"}
    if remote and not values.get("account_name"):
        # abfss://<container>@<account>.dfs.core.windows.net/...: the account is in the host
        host = url.split("://", 1)[1].split("/", 1)[0]
        if "@" in host:
            values["account_name"] = host.split("@", 1)[1].split(".", 1)[0]
    if not remote and url.startswith("file://"):
        values["url"] = url.removeprefix("file://")
    elif not remote:
        values["url"] = str(Path(url).expanduser())
    return LakeTarget(auth=auth, **values)


def _parse_sync(table: Any, where: str, src: str, name: str) -> SyncPlan:
    if not isinstance(table, dict):
        raise ConfigError(f"sync in {where} must be a table", key="sync", path=src, profile=name,
                          hint=f"write it as [profiles.{name}.sync]")
    for key in table:
        if key not in _SYNC_KEYS:
            raise ConfigError(f"unknown key '{key}' in [profiles.{name}.sync]", key=key, path=src, profile=name,
                              hint=f"valid keys: {', '.join(sorted(_SYNC_KEYS))}")
    plan = SyncPlan()
    for key in ("dataverse", "graph"):
        if key in table:
            value = table[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"sync.{key} in {where} must be a list of names", key=key, path=src,
                                  profile=name, hint=f'write e.g. {key} = ["account", "contact"]')
            unknown = [v for v in value if key == "graph" and v not in GRAPH_RESOURCES]
            if unknown:
                raise ConfigError(f"sync.graph in {where} names a resource bridgekit cannot sync: {unknown[0]!r}",
                                  key="graph", path=src, profile=name,
                                  hint=f"choose from: {', '.join(GRAPH_RESOURCES)}")
            plan = replace(plan, dataverse=tuple(value)) if key == "dataverse" else replace(plan, graph=tuple(value))
    if "page_size" in table:
        ps = table["page_size"]
        if not isinstance(ps, int) or not 1 <= ps <= DATAVERSE_MAX_PAGE:
            raise ConfigError(f"sync.page_size in {where} must be 1..{DATAVERSE_MAX_PAGE}", key="page_size",
                              path=src, profile=name, hint=f"Dataverse pages hold at most {DATAVERSE_MAX_PAGE} rows")
        plan = replace(plan, page_size=ps)
    if "partitions" in table:
        parts = table["partitions"]
        if not isinstance(parts, int) or isinstance(parts, bool) or not 1 <= parts <= 16:
            raise ConfigError(f"sync.partitions in {where} must be 1..16", key="partitions", path=src,
                              profile=name, hint="the number of concurrent range reads of a large table's "
                                                 "full load, e.g. partitions = 4")
        plan = replace(plan, partitions=parts)
    if "platform" in table:
        on = table["platform"]
        if not isinstance(on, bool):
            raise ConfigError(f"sync.platform in {where} must be true or false", key="platform", path=src,
                              profile=name, hint="platform = true adds the platform tables (plug-in steps, service "
                                                 "endpoints, flows, system jobs, ...) to the sync plan")
        if on:
            extra = tuple(t for t in PLATFORM_TABLES if t not in plan.dataverse)
            plan = replace(plan, platform=True, dataverse=plan.dataverse + extra)
    return plan
