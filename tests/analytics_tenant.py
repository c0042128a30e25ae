"""The analytics test tenant: one emulator with a medium company on a fixed date, synced once per session.

Shared by tests/test_analytics.py and tests/test_notebooks.py (each wraps :func:`tenant` in a session
fixture; the first call does the work, later calls reuse it).

Why its own emulator: the suite's ``small`` company has ~570 closed opportunities over 34 months, a
handful of wins a month, so a monthly revenue series is mostly noise and a held-out period of ~140 deals
gives AUC estimates +-0.04. The ``medium`` company (~5,700 closed deals) is the smallest preset that
gives stable metrics. Its data is generated for a fixed anchor date (the emulator otherwise generates
"three years up to today"), so every run sees the same company and the asserted margins are reproducible.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridgekit.config import Profile
from bridgekit.emulator import process
from bridgekit.emulator.store import Store
from bridgekit.emulator.synth import generate

SCALE = "medium"
SEED = 42
ANCHOR = "2026-07-01"
PROFILE = "analytics-test"


@dataclass(frozen=True)
class Tenant:
    """The synced analytics tenant."""

    home: Path
    warehouse: Path
    config: Path
    profile: Profile
    sync_report: Any

    def env(self) -> dict[str, str]:
        """Environment for a kernel or subprocess that should use this tenant by default."""
        return {"BRIDGEKIT_CONFIG": str(self.config), "BRIDGEKIT_PROFILE": PROFILE,
                "BRIDGEKIT_EMULATOR_HOME": str(self.home)}


_STATE: dict[str, Any] = {}


def tenant(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Tenant:
    """The session's analytics tenant (created, started and synced on first use)."""
    if "tenant" in _STATE:
        return _STATE["tenant"]  # type: ignore[no-any-return]
    import bridgekit

    root = tmp_path_factory.mktemp("analytics-tenant")
    home = root / "emulator"
    home.mkdir()
    # Generate the company for a fixed date before the first start: the server only generates data
    # when its store has none.
    store = Store(home / "store.sqlite")
    try:
        generate(store, seed=SEED, scale=SCALE, anchor=ANCHOR)
        store.set_meta("emulator.scale", SCALE)
        store.set_meta("emulator.seed", SEED)
    finally:
        store.close()
    warehouse = root / "analytics.duckdb"
    config = root / "bridgekit.toml"
    config.write_text(f'[profiles.{PROFILE}]\nauth = "emulator"\nemulator_home = "{home}"\n'
                      f'warehouse = "{warehouse}"\n', encoding="utf-8")
    process.start(home=home, port=0, scale=SCALE, seed=SEED)
    request.session.config.add_cleanup(lambda: _stop(home))
    profile = Profile(name=PROFILE, auth="emulator", emulator_home=str(home), warehouse=str(warehouse))
    wb = bridgekit.connect(profile)
    report = wb.sync(progress=False)
    _STATE["tenant"] = Tenant(home, warehouse, config, profile, report)
    return _STATE["tenant"]  # type: ignore[no-any-return]


def notebook_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
                  notebooks: list[Path]) -> dict[str, Any]:
    """Each notebook run once by the runner on the tenant, as `bridgekit run NAME --path notebooks --profile
    analytics-test` (name -> RunResult). tests/test_notebooks.py checks the runs, tests/test_reports_browser.py
    opens their reports: one execution for both."""
    if "runs" in _STATE:
        return dict(_STATE["runs"])
    from bridgekit.record import RECORD_ENV
    from bridgekit.runbooks.runner import run_runbook

    t = tenant(tmp_path_factory, request)
    out = tmp_path_factory.mktemp("notebook-runs")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRIDGEKIT_CONFIG", str(t.config))
        mp.delenv(RECORD_ENV, raising=False)
        for path in notebooks:
            runs[path.stem] = run_runbook(path.stem, path=path.parent, profile=PROFILE, out=out, timeout=600,
                                          raise_on_failure=False)
    _STATE["runs"] = runs
    return dict(runs)


def _stop(home: Path) -> None:
    with contextlib.suppress(Exception):
        process.stop(home)
    _STATE.clear()
