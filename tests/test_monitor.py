"""The monitor runbook and bridgekit.monitor: SLO checks, exit 6 on a breach, throttling headroom, watermarks."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner
from runbook_support import RUNBOOKS, leaks, manifest, profile_toml

import bridgekit
from bridgekit.checks import delta_position, watermarks
from bridgekit.cli.main import cli
from bridgekit.config import Profile, SyncPlan
from bridgekit.errors import ExitCode
from bridgekit.monitor import Monitor
from bridgekit.warehouse import Warehouse
from bridgekit.workbench import Workbench

TABLES = 16  # the built-in plan: 12 Dataverse tables and 4 Graph resources


@pytest.fixture
def demo_env(demo_runs: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point profile resolution at the demo's bridgekit.toml (its warehouse) for one test."""
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(demo_runs.config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    return demo_runs


def test_monitor_within_its_slos_exits_0_and_records_every_check(monitor_run: Any, demo_runs: Any,
                                                                 emulator: Any) -> None:
    m = manifest(monitor_run.run_dir)
    assert (monitor_run.exit_code, m["status"]) == (0, "succeeded"), m.get("error")
    names = {c["name"]: c["status"] for c in m["checks"]}
    assert {"latency.identity", "latency.dataverse", "latency.graph", "throttling.dataverse", "throttling.graph",
            "errors.sync_runs"} <= set(names)
    assert sum(1 for n in names if n.startswith("freshness.")) == TABLES
    assert "red" not in names.values()
    assert names["errors.sync_runs"] == "green"  # the demo's sync runs all succeeded
    assert m["results"]["status"] in ("green", "amber") and m["results"]["breached"] == []
    assert set(m["data_watermark"]) == set(manifest(demo_runs.sync)["data_watermark"])
    assert leaks(monitor_run.run_dir, [emulator.client_secret]) == []


def test_a_breached_freshness_slo_exits_6_so_a_scheduler_can_alert(demo_env: Any, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "monitor", "--path", str(RUNBOOKS), "--out", str(tmp_path),
                                      "-p", "calls", "2", "-p", "freshness_slo_minutes", "0.001",
                                      "-p", "latency_p95_ms", "60000"])
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    run_dir = next(tmp_path.iterdir())
    m = manifest(run_dir)
    assert m["exit_code"] == ExitCode.CHECK_FAILED and m["error"]["type"] == "CheckFailed"
    breached = m["results"]["breached"]
    assert len(breached) == TABLES and all(b.startswith("freshness.") for b in breached)
    assert "check:    red   freshness.dataverse.account" in result.output
    assert (run_dir / "monitor.html").is_file() and (run_dir / "monitor.ipynb").is_file()


def test_monitor_refuses_a_bad_parameter_and_exits_3_on_an_unknown_tenant(
        demo_env: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = CliRunner().invoke(cli, ["run", "monitor", "--path", str(RUNBOOKS), "--out", str(tmp_path / "a"),
                                   "-p", "max_error_rate", "high"])
    assert bad.exit_code == ExitCode.USAGE and "parameter 'max_error_rate'" in bad.output
    assert not (tmp_path / "a").exists() or list((tmp_path / "a").iterdir()) == []
    # A tenant Entra does not know: token acquisition fails before any data is read.
    config = tmp_path / "bridgekit.toml"
    config.write_text(profile_toml("elsewhere", {
        "auth": "certificate", "tenant_id": str(uuid.uuid4()), "client_id": emulator.client_id,
        "certificate_path": emulator.certificate_path, "dataverse_url": emulator.dataverse_url,
        "graph_url": emulator.graph_url, "authority_host": emulator.authority_host, "ca_bundle": emulator.ca_bundle,
        "warehouse": str(demo_env.warehouse)}))
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    result = CliRunner().invoke(cli, ["run", "monitor", "--path", str(RUNBOOKS), "--out", str(tmp_path / "b"),
                                      "--profile", "elsewhere", "-p", "calls", "2"])
    assert result.exit_code == ExitCode.AUTH, result.output
    assert "status:   failed (exit 3)" in result.output
    run_dir = next((tmp_path / "b").iterdir())
    assert manifest(run_dir)["error"]["type"] == "AuthError"
    assert leaks(run_dir, [emulator.client_secret]) == []
    assert "PRIVATE KEY" not in "".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())


def test_throttling_headroom_comes_from_the_rate_limit_headers(demo_env: Any, emulator: Any) -> None:
    wb = bridgekit.connect("emulator")
    roomy = Monitor(wb)
    roomy.latency(calls=3)
    assert roomy.throttling().checks[0].status == "green"
    with emulator.settings(dataverse_requests_per_window=100):
        tight = Monitor(wb)
        tight.latency(calls=3)
        section = tight.throttling(min_headroom_pct=10.0)
    dv = next(c for c in section.checks if c.id == "throttling.dataverse")
    # At most 100 requests per window (and a few used) leaves under 2% of Dataverse's 6,000.
    assert dv.status == "red"
    assert dv.measures["burst_remaining"] <= 97
    assert dv.measures["headroom_pct"] < 2.0


def _workbench(tmp_path: Path) -> Workbench:
    prof = Profile(name="t", auth="emulator", warehouse=str(tmp_path / "w.duckdb"),
                   sync=SyncPlan(dataverse=("account", "contact"), graph=()))
    return Workbench(prof)


def test_error_rate_and_freshness_come_from_sync_runs(tmp_path: Path) -> None:
    wb = _workbench(tmp_path)
    Warehouse(wb.profile.warehouse_path).bootstrap()
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    rows = [("r1", "dataverse.account", "ok", now - dt.timedelta(hours=5)),
            ("r2", "dataverse.account", "ok", now - dt.timedelta(hours=3)),
            ("r3", "dataverse.account", "error", now - dt.timedelta(hours=2)),
            ("r4", "dataverse.account", "ok", now - dt.timedelta(minutes=30)),
            ("r0", "dataverse.account", "error", now - dt.timedelta(days=3))]  # outside the 24 h window
    with duckdb.connect(str(wb.profile.warehouse_path)) as conn:
        for run, table, status, ended in rows:
            conn.execute("INSERT INTO bridgekit.sync_runs (run_id, table_name, mode, started_at, ended_at, status) "
                         "VALUES (?, ?, 'delta', ?, ?, ?)", [run, table, ended, ended, status])
    m = Monitor(wb, now=now)
    errors = m.errors(window_hours=24, max_error_rate=0.2)
    assert errors.checks[0].status == "red" and errors.checks[0].ids == ["dataverse.account"]
    assert errors.checks[0].measures == {"runs": 4, "errors": 1, "window_hours": 24}
    assert m.errors(window_hours=24, max_error_rate=0.5).checks[0].status == "amber"  # failures, within the SLO
    fresh = {c.id: c for c in m.freshness(slo_minutes=60).checks}
    assert fresh["freshness.dataverse.account"].status == "green"
    assert fresh["freshness.dataverse.account"].measures["age_minutes"] == 30.0
    assert fresh["freshness.dataverse.contact"].status == "red"  # never synced
    assert m.freshness(slo_minutes=20).checks[0].status == "red"
    assert m.status() == "red"


def test_delta_positions_never_expose_a_delta_token() -> None:
    dv = "https://org.crm.dynamics.com/api/data/v9.2/accounts?$select=name&$deltatoken=919042%2108%2f22%2f2017%2008%3a10%3a44"
    assert delta_position(dv) == 919042
    graph = "https://graph.microsoft.com/v1.0/users/delta?$deltatoken=" + "x" * 60
    pos = delta_position(graph)
    assert isinstance(pos, str) and pos.startswith("sha256:") and "x" * 10 not in pos
    per_mailbox = json.dumps({"u1/inbox": graph, "u2/inbox": graph + "y"})
    assert str(delta_position(per_mailbox)).startswith("sha256:")
    assert delta_position(per_mailbox) != delta_position(json.dumps({"u1/inbox": graph}))
    assert delta_position(None) is None and delta_position("") is None


def test_watermarks_match_the_sync_state(demo_env: Any) -> None:
    wb = bridgekit.connect("emulator")
    marks = {w["table"]: w for w in watermarks(wb.warehouse)}
    state = wb.warehouse.state()
    assert set(marks) == set(state)
    for table, w in marks.items():
        assert w["sync_run_id"] == state[table]["last_run_id"]
        assert w["rows"] == state[table]["row_count"]
