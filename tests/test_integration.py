"""The assessment's integration area: every planted integration defect found exactly, on the demo tenant and on a
second seed and scale; a clean integration layer gives no red finding; the map of the integration surface.

The demo tests read the platform tables live (the demo's plan does not mirror them). The clean and second-seed
tests reset the session emulator (tiny scale) into a warehouse of their own that mirrors them (the plan's platform
group), then put the demo's tenant (small, seed 42) back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bridgekit
from bridgekit.assess import Assessment
from bridgekit.catalog import PLATFORM_TABLES
from bridgekit.config import load_profile
from bridgekit.integration import PLANTED_CHECKS


def _assess(config: Path, monkeypatch: pytest.MonkeyPatch) -> Assessment:
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    a = Assessment(bridgekit.connect("emulator"))
    a.integration()
    return a


def _assert_exact(a: Assessment, planted: dict[str, Any]) -> None:
    for name, check_id in PLANTED_CHECKS.items():
        entry = planted[name]
        c = a.check(check_id)
        assert c.ids == sorted(entry["ids"]), name
        assert c.count == entry["count"] == len(entry["ids"]) > 0, name
        assert c.status in ("red", "amber"), name


@pytest.fixture(scope="module")
def demo_integration(demo_runs: Any) -> Assessment:
    with pytest.MonkeyPatch.context() as mp:
        return _assess(demo_runs.config, mp)


def test_every_planted_integration_defect_is_found_exactly(demo_integration: Assessment, demo_runs: Any) -> None:
    assert set(PLANTED_CHECKS) <= set(demo_runs.planted)
    _assert_exact(demo_integration, demo_runs.planted)
    # Read from Dataverse for the assessment only: the warehouse still holds just what the plan syncs.
    assert "dataverse.asyncoperation" not in demo_integration.wb.warehouse.tables()
    # Each check names its yardstick and source, and lists the affected components as evidence.
    for c in demo_integration.sections["integration"].checks:
        assert c.measures["yardstick"] and c.measures["source"].startswith("https://learn.microsoft.com/"), c.id
        if c.status != "green":
            assert c.recommendation and len(c.measures["evidence"]) >= min(c.count, 1), c.id


def test_endpoint_failures_name_the_rate_and_the_top_errors(demo_integration: Assessment) -> None:
    c = demo_integration.check("integration.endpoint_job_failures")
    assert c.status == "red"
    worst = c.measures["by_endpoint"][0] if c.measures["by_endpoint"][0]["id"] == c.ids[0] else next(
        r for r in c.measures["by_endpoint"] if r["id"] == c.ids[0])
    assert worst["endpoint"] == "Account events topic" and 0.05 <= worst["failure_rate"] < 1
    assert sum(e["count"] for e in worst["top_errors"]) == worst["failed"]
    steps = demo_integration.check("integration.sync_steps_on_hot_paths").measures["evidence"]
    assert all(s["p95_ms"] > 500 for s in steps)  # execution times from the trace log


def test_the_map_links_tables_to_steps_flows_endpoints_and_hosts(demo_integration: Assessment) -> None:
    section = demo_integration.sections["integration"]
    edges = section.data["edges"]
    targets = {e["target"] for e in edges}
    assert "sb://alpineridge-integration.servicebus.windows.net/crm-accounts" in targets
    assert "http://erp.alpineridge.example" in targets  # the flow calling plain http
    assert any(t.startswith("https://prod-27.westeurope.logic.azure.com") for t in targets)
    failing = [e for e in edges if e["failure_rate"]]
    assert failing and all(e["failed"] <= e["jobs"] for e in failing)
    sankey = section.figure.data[0]
    assert sankey.type == "sankey" and len(sankey.link.source) == len(edges)


def test_the_platform_group_is_off_by_default_and_adds_the_tables(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bridgekit.toml"
    config.write_text('[profiles.p]\nauth = "emulator"\n[profiles.p.sync]\nplatform = true\n')
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    assert not set(PLATFORM_TABLES) & set(load_profile("emulator").sync.dataverse)
    plan = load_profile("p").sync
    assert plan.platform and set(PLATFORM_TABLES) <= set(plan.dataverse) and "account" in plan.dataverse


@pytest.fixture(scope="module")
def other_tenants(emulator: Any, demo_runs: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Assess two more tenants, then put the demo's tenant back: (planted, assessment) for seed 7 at tiny scale,
    and the assessment of the same tenant with a clean integration layer."""
    out = {}
    try:
        for key, body in (("seed7", {"scale": "tiny", "seed": 7}),
                          ("clean", {"scale": "tiny", "seed": 7, "integration_defects": False})):
            emulator.admin("reset", body)
            root = tmp_path_factory.mktemp(key)
            config = root / "bridgekit.toml"
            config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{root / "w.duckdb"}"\n'
                              '[profiles.emulator.sync]\nplatform = true\n')
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("BRIDGEKIT_CONFIG", str(config))
                mp.delenv("BRIDGEKIT_PROFILE", raising=False)
                wb = bridgekit.connect("emulator")
                wb.sync(progress=False)
                a = Assessment(wb)
                a.integration(read_platform=False)  # the plan's platform group mirrored them
                live = Assessment(wb)
                live.integration(max_age_hours=0)  # the mirror counts as stale: read from Dataverse instead
            out[key] = (emulator.admin("truth")["planted_defects"], a, live)
    finally:
        emulator.admin("reset", {"scale": "small", "seed": 42})
    return out


def test_a_second_seed_and_scale_is_found_exactly_too(other_tenants: Any, demo_runs: Any) -> None:
    planted, a, live = other_tenants["seed7"]
    _assert_exact(a, planted)
    _assert_exact(live, planted)
    assert planted["failed_system_jobs"]["ids"] != demo_runs.planted["failed_system_jobs"]["ids"]


def test_a_clean_integration_layer_has_no_red_finding(other_tenants: Any) -> None:
    planted, a, _ = other_tenants["clean"]
    assert not set(PLANTED_CHECKS) & set(planted)
    assert "disabled_users_owning_records" in planted  # the data defects are still there
    checks = a.sections["integration"].checks
    assert [c.id for c in checks if c.status == "red"] == []
    assert all(c.count == 0 for c in checks), [(c.id, c.count) for c in checks if c.count]
