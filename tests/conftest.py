"""Shared fixtures: one emulator server for the whole test session, and HTTP sessions that trust its CA.

``emulator`` (session scope) is an :class:`EmulatorHandle`: every :class:`EmulatorInfo` field plus
``client_secret``, ``admin()``, ``faults()``, ``settings()``, ``session()``, ``token()`` and ``headers()``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import certifi
import pytest
import requests

from bridgekit.emulator import process
from bridgekit.emulator.process import EmulatorInfo


class CASession(requests.Session):
    """A requests Session that always verifies against ``ca`` (the emulator CA).

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` override ``Session.verify`` when a request does
    not pass ``verify`` itself; this session puts its own bundle back after that merge, so the emulator CA
    is used whatever the environment says. ``verify=False`` is never used.
    """

    def __init__(self, ca: str) -> None:
        super().__init__()
        self.verify = ca

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None or verify is True:
            merged["verify"] = self.verify
        return merged


@dataclass(frozen=True)
class EmulatorHandle(EmulatorInfo):
    """The running test emulator: its :class:`EmulatorInfo` plus test helpers.

    Attributes:
        client_secret: The secret of the client-secret app (``secret_client_id``), random per session.
    """

    client_secret: str = ""
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict, compare=False, repr=False)
    _session: list[CASession] = field(default_factory=list, compare=False, repr=False)

    def session(self) -> CASession:
        """A shared requests session trusting the emulator CA."""
        if not self._session:
            self._session.append(CASession(self.ca_bundle))
        return self._session[0]

    def admin(self, path: str, json: dict[str, Any] | None = None, *, method: str | None = None) -> Any:
        """Call ``/_emulator/<path>`` with the admin key; POST when ``json`` is given. Returns the JSON body.

        Raises ``requests.HTTPError`` on a non-2xx answer.
        """
        verb = method or ("POST" if json is not None else "GET")
        resp = self.session().request(verb, f"{self.base_url}/_emulator/{path.lstrip('/')}", json=json,
                                      headers={"X-Emulator-Admin-Key": self.admin_key()}, timeout=600)
        resp.raise_for_status()
        return resp.json()

    @contextlib.contextmanager
    def faults(self, **kw: Any) -> Iterator[dict[str, Any]]:
        """Set fault settings (``throttle_rate=1.0``, ``latency_ms=…``, ``force_delta_expiry=True`` …) for a block.

        Yields the settings now in force; restores the previous ones afterwards.
        """
        before = self.admin("faults")
        try:
            yield self.admin("faults", kw)
        finally:
            self.admin("faults", {"clear": True, **before})

    @contextlib.contextmanager
    def settings(self, **kw: int) -> Iterator[dict[str, Any]]:
        """Change service settings (``dataverse_requests_per_window=5`` …) for a block, then restore them."""
        before = self.admin("settings")
        try:
            yield self.admin("settings", kw)
        finally:
            self.admin("settings", before)

    def token(self, audience: str = "dataverse", *, client: str = "secret") -> str:
        """An app-only access token (client credentials) for ``dataverse``, ``graph`` or a resource URI.

        ``client="secret"`` uses the secret app; tokens are cached for the session.
        """
        resource = {"dataverse": self.dataverse_url, "graph": self.graph_url}.get(audience, audience)
        key = (resource, client)
        if key not in self._tokens:
            if client != "secret":
                raise ValueError("token() only supports client='secret'; use MSAL for certificates")
            resp = self.session().post(
                f"{self.authority}/oauth2/v2.0/token",
                data={"grant_type": "client_credentials", "client_id": self.secret_client_id,
                      "client_secret": self.client_secret, "scope": f"{resource}/.default"}, timeout=30)
            resp.raise_for_status()
            self._tokens[key] = resp.json()["access_token"]
        return self._tokens[key]

    def headers(self, audience: str = "dataverse") -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}`` for ``audience``."""
        return {"Authorization": f"Bearer {self.token(audience)}"}


@pytest.fixture(scope="session", autouse=True)
def _ca_bundle_env() -> Iterator[None]:
    """Keep REQUESTS_CA_BUNDLE set (to a system bundle) so tests prove they pass the emulator CA explicitly."""
    mp = pytest.MonkeyPatch()
    if not os.environ.get("REQUESTS_CA_BUNDLE"):
        mp.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    yield
    mp.undo()


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    """A fresh emulator for the session: temporary home, free port, scale "small", seed 42.

    Exports BRIDGEKIT_EMULATOR_HOME / _PORT / _CLIENT_SECRET for the session so code that resolves the
    built-in ``emulator`` profile reaches this same server. Stopped at the end of the session.
    """
    home = tmp_path_factory.mktemp("emulator-home")
    secret = "bk~" + secrets.token_urlsafe(24)
    mp = pytest.MonkeyPatch()
    mp.setenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", secret)
    mp.setenv("BRIDGEKIT_EMULATOR_HOME", str(home))
    try:
        info = process.start(home=home, port=0, scale="small", seed=42)
        mp.setenv("BRIDGEKIT_EMULATOR_PORT", str(info.port))
        yield EmulatorHandle(**info.to_dict(), client_secret=secret)
    finally:
        process.stop(home)
        mp.undo()


@pytest.fixture(scope="session")
def ca_session(emulator: EmulatorHandle) -> CASession:
    """A requests session that verifies TLS against the emulator CA (env bundles cannot override it)."""
    return CASession(emulator.ca_bundle)


# -- runbook end-to-end fixtures (assess, monitor and report tests share one demo run) ------------------


@dataclass(frozen=True)
class DemoRuns:
    """One ``bridgekit demo`` (sync then assess through the runner) against a freshly reset emulator.

    Attributes:
        output: What the command printed.
        exit_code: Its exit code.
        config: A ``bridgekit.toml`` whose ``emulator`` profile keeps its warehouse in the session's temp dir
            (set ``BRIDGEKIT_CONFIG`` to it to run more runbooks on the same warehouse).
        warehouse: That warehouse file.
        runs: The ``--out`` directory.
        sync: The sync run's directory.
        assess: The assess run's directory.
        planted: The emulator's ``planted_defects`` store meta.
    """

    output: str
    exit_code: int
    config: Any
    warehouse: Any
    runs: Any
    sync: Any
    assess: Any
    planted: dict[str, Any]


@pytest.fixture(scope="session")
def demo_runs(emulator: EmulatorHandle, tmp_path_factory: pytest.TempPathFactory) -> DemoRuns:
    """``bridgekit demo`` once per session; the emulator is reset first so the planted defects are pristine."""
    from click.testing import CliRunner

    from bridgekit.cli.main import cli

    root = tmp_path_factory.mktemp("demo")
    warehouse = root / "warehouse" / "emulator.duckdb"
    config = root / "bridgekit.toml"
    config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{warehouse}"\n')
    emulator.admin("reset", {"scale": "small", "seed": 42})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRIDGEKIT_CONFIG", str(config))
        mp.delenv("BRIDGEKIT_PROFILE", raising=False)
        result = CliRunner().invoke(cli, ["demo", "--out", str(root / "runs")])
    dirs = sorted(p for p in (root / "runs").iterdir() if p.is_dir()) if (root / "runs").is_dir() else []
    sync = next((p for p in dirs if p.name.endswith("-sync")), root / "missing-sync")
    assess = next((p for p in dirs if p.name.endswith("-assess")), root / "missing-assess")
    return DemoRuns(result.output, result.exit_code, config, warehouse, root / "runs", sync, assess,
                    emulator.admin("truth")["planted_defects"])


@pytest.fixture(scope="session")
def monitor_run(demo_runs: DemoRuns, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The monitor runbook run once through the runner on the demo's warehouse, with SLOs it meets."""
    from pathlib import Path

    from bridgekit.runbooks.runner import run_runbook

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRIDGEKIT_CONFIG", str(demo_runs.config))
        mp.delenv("BRIDGEKIT_PROFILE", raising=False)
        return run_runbook("monitor", {"calls": 5, "latency_p95_ms": 60000.0, "freshness_slo_minutes": 1440.0},
                           profile="emulator", out=tmp_path_factory.mktemp("monitor"),
                           path=Path(__file__).resolve().parent.parent / "runbooks", raise_on_failure=False)


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The four analytics notebooks run once by the runner on the analytics tenant (name -> RunResult)."""
    from pathlib import Path

    import analytics_tenant

    notebooks = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
    return analytics_tenant.notebook_runs(tmp_path_factory, request, notebooks)
