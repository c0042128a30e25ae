"""Exit codes a scheduler relies on: every error class through the CLI and through a runbook cell, the one
exit-code table (README, ``bridgekit run --help``), and the common failures of a sync, both ways."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import bridgekit
from bridgekit import errors
from bridgekit.cli.main import cli, main
from bridgekit.errors import EXIT_CODES, BridgekitError, ExitCode
from bridgekit.runbooks import run_runbook

ROOT = Path(__file__).resolve().parents[1]
RB = Path(__file__).parent / "runbooks"

#: Every error class and the code `bridgekit` exits with when a command raises it (README, "Exit codes").
CLI_CODES = {
    "BridgekitError": 1, "ConfigError": 2, "MissingCredentialError": 3, "AuthError": 3, "ApiError": 1,
    "NotFoundError": 1, "PermissionDeniedError": 3, "ConflictError": 1, "TransientError": 4,
    "ThrottledError": 4, "MigrationIncomplete": 4, "ResyncRequired": 4, "ChangeTrackingNotEnabled": 1,
    "WarehouseError": 1, "QueryError": 2, "SyncError": 1, "SyncInterrupted": 130, "UnknownTableError": 2, "InsufficientDataError": 1, "LakeError": 1, "CheckFailed": 6,
    "RunbookError": 2, "RunbookFailed": 5, "EmulatorError": 1,
}
#: In a runbook cell: usage, auth, transient and a red check keep their meaning; anything else is "a cell
#: raised" (5), also runner errors raised from inside a notebook.
CELL_CODES = {name: code if code in (2, 3, 4, 6) and name not in ("RunbookError",) else 5
              for name, code in CLI_CODES.items()} | {"ValueError": 5, "KeyError": 5}


def _tree(cls: type[BridgekitError] = BridgekitError) -> list[type[BridgekitError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


def test_the_table_names_every_error_class_of_the_tree() -> None:
    assert sorted(c.__name__ for c in _tree()) == sorted(CLI_CODES)
    public = {n for n in errors.__all__ if isinstance(getattr(errors, n), type) and n != "ExitCode"}
    assert public == set(CLI_CODES)
    assert public <= set(bridgekit.__all__)


@pytest.mark.parametrize("name", sorted(CLI_CODES))
def test_every_error_class_exits_with_its_code_through_the_cli(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    cls = getattr(errors, name)

    @cli.command(f"raise-{name.lower()}")
    def raiser() -> None:
        raise cls("raised on purpose")

    try:
        code = main([f"raise-{name.lower()}"])
    finally:
        cli.commands.pop(f"raise-{name.lower()}")
    err = capsys.readouterr().err
    assert code == CLI_CODES[name]
    assert err.splitlines()[0] == "error: raised on purpose"
    assert len(err.splitlines()) <= 2 and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(CELL_CODES))
def test_every_error_class_raised_in_a_runbook_cell_exits_with_its_code(name: str, tmp_path: Path) -> None:
    result = run_runbook("raise_error", {"error": name}, path=RB, out=tmp_path / "runs", raise_on_failure=False)
    assert result.exit_code == CELL_CODES[name], result.error
    assert result.manifest["exit_code"] == CELL_CODES[name]
    assert (result.error or {}).get("type") == name


def test_one_exit_code_table_for_the_readme_the_help_and_the_manifest() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == {int(c): m for c, m in EXIT_CODES.items()}
    help_text = " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    for code, meaning in EXIT_CODES.items():
        assert f"{int(code)} {' '.join(meaning.split())}" in help_text
    assert ExitCode.TRANSIENT.meaning == EXIT_CODES[ExitCode.TRANSIENT]


# -- the common failures of a sync, through `bridgekit sync` and through `bridgekit run sync` ---------------


@pytest.fixture()
def profiles(emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bridgekit.toml with profiles that fail in the ways a scheduler meets, each on a narrow plan."""
    closed = _closed_port()
    common = textwrap.dedent(f"""
        client_id = "{emulator.secret_client_id}"
        dataverse_url = "{emulator.dataverse_url}"
        graph_url = "{emulator.graph_url}"
        ca_bundle = "{emulator.ca_bundle}"
        auth = "client_secret"
        client_secret_env = "BK_EXIT_SECRET"
        """)
    plan = '[profiles.{name}.sync]\ndataverse = ["businessunit", "transactioncurrency"]\ngraph = ["groups"]\n'
    body = ""
    for name, tenant, authority in (
        ("good", emulator.tenant_id, emulator.authority_host),
        ("unknown-tenant", "00000000-0000-0000-0000-00000000beef", emulator.authority_host),
        ("no-identity", emulator.tenant_id, f"https://127.0.0.1:{closed}"),
    ):
        body += (f'[profiles.{name}]\ntenant_id = "{tenant}"\nauthority_host = "{authority}"\n'
                 f'warehouse = "{tmp_path / name}.duckdb"\n{common}\n' + plan.format(name=name) + "\n")
    config = tmp_path / "bridgekit.toml"
    config.write_text(body)
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.setenv("BK_EXIT_SECRET", emulator.client_secret)
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    return tmp_path


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["sync", "--quiet", *args])
    return code, capsys.readouterr().err.splitlines()


def _run_sync(out: Path, profile: str, **params: Any) -> Any:
    return run_runbook("sync", params, profile=profile, out=out, raise_on_failure=False)


def test_usage_errors_exit_2(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _sync(capsys, "-P", "good", "--only", "acount")
    assert code == 2 and err[0] == "error: table 'acount' is not in the profile's sync plan" and len(err) == 2
    code, err = _sync(capsys, "-P", "good", "--bogus")
    assert code == 2 and "No such option" in " ".join(err)
    result = _run_sync(profiles / "runs", "good", only="acount")
    assert result.exit_code == 2 and result.error["type"] == "UnknownTableError"


def test_a_missing_or_wrong_secret_exits_3_and_is_reported_once(profiles: Path, emulator: Any,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BK_EXIT_SECRET")
    code, err = _sync(capsys, "-P", "good")
    assert code == 3 and err == ["error: 3 tables (dataverse.businessunit, ...): environment variable "
                                 "BK_EXIT_SECRET is not set (client secret for profile 'good')",
                                 "hint: export BK_EXIT_SECRET=<the client secret value>"]
    result = _run_sync(profiles / "runs", "good")
    assert result.exit_code == 3 and result.error["type"] == "MissingCredentialError"
    monkeypatch.setenv("BK_EXIT_SECRET", "bk~not-the-secret-value")
    code, err = _sync(capsys, "-P", "good")
    assert code == 3 and "AADSTS7000215" in err[0] and "3 tables" in err[0]
    assert sum(line.startswith("error:") for line in err) == 1
    assert "bk~not-the-secret-value" not in " ".join(err)
    result = _run_sync(profiles / "runs", "good")
    assert result.exit_code == 3 and result.error["type"] == "AuthError"


def test_an_unknown_tenant_exits_3(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _sync(capsys, "-P", "unknown-tenant")
    assert code == 3 and "AADSTS90002" in err[0]
    assert _run_sync(profiles / "runs", "unknown-tenant").exit_code == 3


def test_an_unreachable_identity_service_exits_4(profiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _sync(capsys, "-P", "no-identity")
    assert code == 4 and "cannot reach the identity service" in err[0]
    assert _run_sync(profiles / "runs", "no-identity").exit_code == 4


def test_a_throttled_out_sync_exits_4(profiles: Path, emulator: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with emulator.faults(throttle_rate=1.0, retry_after_s=0):
        code, err = _sync(capsys, "-P", "good")
        result = _run_sync(profiles / "runs", "good")
    assert code == 4 and err[0].startswith("error: 2 tables (dataverse.businessunit, ...): ")
    assert result.exit_code == 4 and result.error["type"] == "ThrottledError"
