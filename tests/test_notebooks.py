"""The notebooks in notebooks/: nbval (``--nbval-lax``) runs every one, and the runner runs each to an HTML report.

Both run against the analytics tenant (tests/analytics_tenant.py). The notebooks' ``profile`` parameter
defaults to "" (``$BRIDGEKIT_PROFILE`` or the default profile), so nbval, which cannot inject parameters,
reaches the tenant through ``BRIDGEKIT_CONFIG`` and ``BRIDGEKIT_PROFILE`` in the kernel's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import analytics_tenant  # tests/analytics_tenant.py
import pytest

from bridgekit.record import RECORD_ENV

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def tenant(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> analytics_tenant.Tenant:
    return analytics_tenant.tenant(tmp_path_factory, request)


def test_the_analytics_notebooks_are_there() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"win_probability", "revenue_forecast", "account_health", "explore"}


def test_nbval_runs_every_notebook(tenant: analytics_tenant.Tenant, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != RECORD_ENV} | tenant.env()
    # The kernels inherit this environment: the tenant's bridgekit.toml and profile name.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "-o", "addopts=", *map(str, NOTEBOOKS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout.lower(), tail


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runner_runs_the_notebook_to_an_html_report(notebook_runs: dict[str, Any], path: Path) -> None:
    # As `bridgekit run NAME --path notebooks --profile analytics-test` (run once for this test and the
    # browser test of the reports: tests/conftest.py's notebook_runs).
    result = notebook_runs[path.stem]
    manifest = json.loads(result.manifest_path.read_text())
    assert result.exit_code == 0, manifest.get("error")
    assert manifest["parameters"]["profile"] == analytics_tenant.PROFILE
    assert result.report is not None and result.report.suffix == ".html"
    report = result.report.read_text(encoding="utf-8")
    assert report.count("plotly") > 3 and "Traceback" not in report
    results = manifest["results"]
    # A report for the customer's analyst: an executive summary first, every figure explained.
    assert report.index("Executive summary") < report.index("What it means:")
    if path.stem == "win_probability":
        assert results["win_model_auc"] - results["baseline_auc"] >= 0.10
        assert results["drivers_same_sign"] is True
    elif path.stem == "revenue_forecast":
        assert results["forecast_mape"] < results["seasonal_naive_mape"]
    elif path.stem == "account_health":
        assert results["accounts_at_risk"] > 0
    elif path.stem == "explore":
        assert "Data-quality findings" in report
