"""Headless runbooks: parameters, the Papermill runner, the HTML report, and the secret scan of every output.

Modules:
    runner.py   discover runbooks, check parameters, execute, write notebook, report and manifest, exit codes
    secrets.py  notebook hygiene and the scan for secrets and token-shaped strings in outputs

What a run records for its manifest (results, checks, watermarks) is written through :mod:`bridgekit.record`,
which sits below the features that call it.
"""

from __future__ import annotations

from bridgekit.runbooks.runner import (
    DEFAULT_OUT,
    RUNBOOKS_DIR,
    Parameter,
    Runbook,
    RunResult,
    check_parameters,
    coerce_text_parameters,
    discover,
    find_runbook,
    load_runbook,
    run_runbook,
)

__all__ = [
    "DEFAULT_OUT",
    "RUNBOOKS_DIR",
    "Parameter",
    "RunResult",
    "Runbook",
    "check_parameters",
    "coerce_text_parameters",
    "discover",
    "find_runbook",
    "load_runbook",
    "run_runbook",
]
