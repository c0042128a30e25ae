"""The headless runbook runner: parameter checks, exit codes, manifest, offline report, secret quarantine.

Each run starts a real kernel on small notebooks in tests/runbooks/ (a few seconds each).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import bridgekit
import bridgekit.record as record
from bridgekit.cli.main import cli
from bridgekit.errors import ExitCode, RunbookError, RunbookFailed
from bridgekit.runbooks.runner import discover, find_runbook, run_runbook

RB = Path(__file__).resolve().parent / "runbooks"
ROOT = Path(__file__).resolve().parent.parent
# Assembled here, as the leak runbook assembles it, so no file in the repository holds a token shape.
_PART = "A" * 16
JWT_SHAPED = f"ey{'J'}{_PART}.ey{'J'}{_PART}.{_PART}"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user profile or config leaks into a run: an empty bridgekit.toml and the built-in profile."""
    config = tmp_path / "bridgekit.toml"
    config.write_text("")
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    monkeypatch.delenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", raising=False)
    monkeypatch.delenv(record.RECORD_ENV, raising=False)


def run(name: str, out: Path, parameters: dict[str, Any] | None = None, **kw: Any) -> Any:
    return run_runbook(name, parameters, path=RB, out=out, raise_on_failure=False, **kw)


def manifest_of(result: Any) -> dict[str, Any]:
    return json.loads(result.manifest_path.read_text())


def printed(notebook: Path) -> str:
    """Everything the cells printed (stream outputs), not their source."""
    cells = json.loads(notebook.read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))


def all_bytes_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- listing and parameter checks (no kernel)

def test_runbooks_lists_parameters_with_types_defaults_and_help() -> None:
    result = CliRunner().invoke(cli, ["runbooks", "--path", str(RB)])
    assert result.exit_code == 0, result.output
    assert "\n  good\n" in result.output and "\n  raises\n" in result.output
    assert "days: int = 30" in result.output and "# look-back window in days" in result.output
    assert 'since: str = "2024-01-01"' in result.output
    listed = json.loads(CliRunner().invoke(cli, ["runbooks", "--path", str(RB), "--json"]).output)
    good = next(r for r in listed if r["name"] == "good")
    params = {p["name"]: p for p in good["parameters"]}
    assert params["ratio"] == {"name": "ratio", "type": "float", "default": 0.5, "help": "share of rows to flag",
                               "iso_date": False}
    assert params["since"]["iso_date"] is True
    assert good["problems"] == []


def test_the_shipped_runbooks_have_usable_parameter_cells() -> None:
    found = {rb.name: rb for rb in discover(ROOT / "runbooks")}
    sync = found["sync"]
    assert [p.name for p in sync.parameters][:3] == ["profile", "only", "full"]
    assert sync.parameter("full") is not None and sync.parameter("full").kind == "bool"  # type: ignore[union-attr]
    assert all(not rb.problems for rb in found.values())


def test_unknown_runbook_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(RunbookError) as err:
        run_runbook("nope", path=RB, out=tmp_path / "runs")
    assert err.value.exit_code == 2 and "good" in err.value.hint


@pytest.mark.parametrize(("params", "named"), [
    ({"dayz": 3}, "dayz"),                       # unknown
    ({"days": "seven"}, "days"),                 # str for int
    ({"days": True}, "days"),                    # bool is not an int
    ({"verbose": 1}, "verbose"),                 # int is not a bool
    ({"tables": "account"}, "tables"),           # str for list
    ({"options": [1]}, "options"),               # list for dict
    ({"since": "2024-13-01"}, "since"),          # not an ISO date
    ({"ratio": float("nan")}, "ratio"),          # not a finite number
])
def test_bad_parameters_are_refused_before_the_kernel_starts(tmp_path: Path, params: dict[str, Any],
                                                             named: str) -> None:
    out = tmp_path / "runs"
    with pytest.raises(RunbookError) as err:
        run_runbook("good", params, path=RB, out=out)
    assert err.value.exit_code == ExitCode.USAGE
    assert f"'{named}'" in err.value.message and err.value.parameter == named
    assert not out.exists()  # nothing ran, nothing written


def test_secret_parameters_are_refused_and_never_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "runs"
    with pytest.raises(RunbookError, match="named like a secret"):
        run_runbook("good", {"client_secret": "x"}, path=RB, out=out)
    with pytest.raises(RunbookError) as err:
        run_runbook("good", {"label": JWT_SHAPED}, path=RB, out=out)
    assert "'label'" in err.value.message and JWT_SHAPED not in str(err.value)
    monkeypatch.setenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", "plain-looking-s3cret-value")
    with pytest.raises(RunbookError) as err:
        run_runbook("good", {"tables": ["account", "plain-looking-s3cret-value"]}, path=RB, out=out)
    assert "'tables'" in err.value.message and "s3cret" not in str(err.value)
    assert not out.exists()


def test_cli_parameters_are_parsed_as_the_declared_type_or_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli, ["run", "good", "--path", str(RB), "--out", str(tmp_path / "runs"),
                              "-p", "days", "seven"])
    assert bad.exit_code == 2
    assert "'days'" in bad.output and "expects int" in bad.output
    unknown = runner.invoke(cli, ["run", "good", "--path", str(RB), "--out", str(tmp_path / "runs"),
                                  "-p", "weeks", "2"])
    assert unknown.exit_code == 2 and "'weeks'" in unknown.output and "days" in unknown.output
    missing_profile = runner.invoke(cli, ["run", "good", "--path", str(RB), "--out", str(tmp_path / "runs"),
                                          "--profile", "nosuch"])
    assert missing_profile.exit_code == 2 and "nosuch" in missing_profile.output
    rb = find_runbook("good", RB)
    from bridgekit.runbooks.runner import coerce_text_parameters

    assert coerce_text_parameters(rb, {"days": "7", "ratio": "1", "verbose": "yes", "tables": "[a, b]",
                                       "options": '{"k": 1}'}) == {
        "days": 7, "ratio": 1.0, "verbose": True, "tables": ["a", "b"], "options": {"k": 1}}
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("ename", "code"), [
    ("AuthError", 3), ("PermissionDeniedError", 3), ("ThrottledError", 4), ("TransientError", 4),
    ("ResyncRequired", 4), ("ConfigError", 2), ("CheckFailed", 6), ("ValueError", 5), ("RunbookFailed", 5),
])
def test_exception_raised_in_a_cell_maps_to_its_documented_exit_code(ename: str, code: int) -> None:
    from bridgekit.runbooks.runner import _exit_code_for_ename

    assert _exit_code_for_ename(ename) == code


# ---------------------------------------------------------------- runs

def test_good_run_writes_notebook_report_and_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from plotly.offline import get_plotlyjs

    out = tmp_path / "runs"
    result = bridgekit.run_runbook("good", {"days": 7, "since": dt.date(2024, 2, 1), "label": "weekly"},
                                   out=str(out), path=RB)
    # papermill cannot parse the `label` line (an "=" in its help); the runner's own check is what counts.
    assert not [r for r in caplog.records if "unknown parameter" in r.getMessage()]
    assert result.exit_code == 0 and result.status == "succeeded"
    assert result.run_dir.parent == out and re.fullmatch(r"\d{8}T\d{6}Z-good", result.run_dir.name)
    m = manifest_of(result)
    assert len(m["runbook_sha256"]) == 64
    assert m["runbook"] == "good" and m["profile"] == "emulator" and m["bridgekit_version"] == bridgekit.__version__
    assert m["parameters"]["days"] == 7 and m["parameters"]["since"] == "2024-02-01"
    assert m["parameters"]["label"] == "weekly" and m["parameters"]["ratio"] == 0.5  # defaults are recorded too
    started = dt.datetime.fromisoformat(m["started_at"])
    ended = dt.datetime.fromisoformat(m["ended_at"])
    assert started.utcoffset() == dt.timedelta(0) and started <= ended
    assert (m["status"], m["exit_code"], m["error"]) == ("succeeded", 0, None)
    wm = m["data_watermark"]["dataverse.account"]
    assert (wm["sync_run_id"], wm["position"], wm["rows"]) == ("sync-1", 42, 10)
    assert m["results"] == {"days": 7, "tables": ["account"]}
    assert m["checks"] == [{"name": "freshness", "status": "green", "detail": "synced within the window"}]
    assert m["outputs"]["notebook"] == "good.ipynb" and m["outputs"]["report"] == "good.html"
    for name in ("good.ipynb", "good.html", "manifest.json"):
        assert (result.run_dir / name).is_file()

    nb = json.loads(result.notebook.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "days = 7" in "".join(injected[0]["source"])
    # The kernel got the profile name through the environment as well as the parameter.
    assert "OUTPUT-MARKER weekly 7 0.5 2024-02-01 False {} emulator" in result.notebook.read_text()

    html = result.report.read_text()
    assert "OUTPUT-MARKER" in html and "INPUT-MARKER" not in html  # outputs shown, code hidden
    assert html.count(get_plotlyjs()) == 1  # plotly.js embedded, once
    assert "Plotly.newPlot" in html
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']https?://", html, re.I)  # no CDN script at all
    assert "cdn.plot.ly/plotly" not in html
    assert "succeeded" in html and "freshness" in html  # the run summary on top


def test_plain_papermill_still_runs_a_runbook(tmp_path: Path) -> None:
    import papermill as pm

    nb = pm.execute_notebook(str(RB / "good.ipynb"), str(tmp_path / "out.ipynb"), parameters={"days": 3},
                             progress_bar=False)
    assert "OUTPUT-MARKER demo 3" in json.dumps(nb)


def test_cell_raising_exits_5_with_the_failing_cell_marked(tmp_path: Path) -> None:
    with pytest.raises(RunbookFailed) as err:
        run_runbook("raises", {"n": 4}, path=RB, out=tmp_path / "runs")
    assert err.value.exit_code == ExitCode.NOTEBOOK_ERROR == 5
    run_dir = Path(err.value.run_dir or "")
    m = json.loads((run_dir / "manifest.json").read_text())
    assert (m["status"], m["exit_code"]) == ("failed", 5)
    assert m["error"]["type"] == "ValueError" and "boom 4" in m["error"]["message"]
    assert m["results"] == {"before": 4}  # what was recorded before the failure is kept
    cells = json.loads((run_dir / "raises.ipynb").read_text())["cells"]
    failing = cells[m["error"]["cell_index"]]
    assert "raise ValueError" in "".join(failing["source"])
    assert any(o.get("ename") == "ValueError" for o in failing["outputs"])
    assert "papermill-error-cell-tag" in cells[m["error"]["cell_index"] - 1]["metadata"]["tags"]
    assert (run_dir / "raises.html").is_file()


def test_auth_error_in_a_cell_exits_3(tmp_path: Path) -> None:
    result = run("auth", tmp_path / "runs")
    assert result.exit_code == ExitCode.AUTH == 3
    assert result.error["type"] == "AuthError" and result.status == "failed"


def test_red_check_exits_6_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bridgekit", "run", "red_check", "--path", str(RB),
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == ExitCode.CHECK_FAILED == 6, proc.stderr
    assert "check:    red   slo" in proc.stdout and "check:    amber orphans" in proc.stdout
    m = json.loads(next((tmp_path / "runs").glob("*-red_check/manifest.json")).read_text())
    assert m["status"] == "failed" and m["error"]["type"] == "CheckFailed"
    assert [c["status"] for c in m["checks"]] == ["amber", "red"]
    assert "after the check" in printed(next((tmp_path / "runs").glob("*-red_check/red_check.ipynb")))


def test_raising_check_failed_exits_6(tmp_path: Path) -> None:
    result = run("red_check", tmp_path / "runs", {"stop": True})
    assert result.exit_code == 6 and result.error["type"] == "CheckFailed"
    assert result.error["cell_index"] is not None  # it stopped in a cell
    assert "after the check" not in printed(result.notebook)


def test_killed_kernel_exits_7_and_says_why(tmp_path: Path) -> None:
    result = run("kill", tmp_path / "runs")
    assert result.exit_code == ExitCode.KERNEL_DIED == 7
    err = manifest_of(result)["error"]
    assert err["type"] == "DeadKernelError"
    assert "kernel died" in err["message"] and "SIGKILL" in err["message"]
    cells = json.loads(result.notebook.read_text())["cells"]
    assert "os.kill" in "".join(cells[err["cell_index"]]["source"])
    assert "papermill-error-cell-tag" in cells[err["cell_index"] - 1]["metadata"]["tags"]
    assert "before the kill" in printed(result.notebook)
    assert result.report is not None and "kernel died" in result.report.read_text().lower()


def test_timeout_exits_7(tmp_path: Path) -> None:
    result = run("slow", tmp_path / "runs", timeout=2)
    assert result.exit_code == 7
    assert result.error["type"] == "Timeout" and "timed out" in result.error["message"]
    assert "time.sleep" in "".join(json.loads(result.notebook.read_text())["cells"][result.error["cell_index"]]["source"])


def test_token_in_an_output_is_quarantined_with_exit_8(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = run("leak", out)
    assert result.exit_code == ExitCode.SECRET_LEAK == 8 and result.status == "quarantined"
    assert JWT_SHAPED not in all_bytes_under(out)  # not in the notebook, report or manifest
    m = manifest_of(result)
    assert m["error"]["type"] == "SecretLeak" and "jwt" in m["error"]["message"]
    assert {f["file"] for f in m["quarantine"]["findings"]} >= {"leak.ipynb", "leak.html"}
    assert "leaked" not in m["results"]
    assert "Quarantined" in result.notebook.read_text() and "Quarantined" in result.report.read_text()


def test_secret_value_from_the_environment_is_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "plain-looking-s3cret-value"  # no token shape: only the value in play can catch it
    monkeypatch.setenv("BRIDGEKIT_EMULATOR_CLIENT_SECRET", secret)
    out = tmp_path / "runs"
    with pytest.raises(RunbookFailed) as err:
        run_runbook("leak", {"mode": "env"}, path=RB, out=out)
    assert err.value.exit_code == 8
    assert secret not in str(err.value) and secret not in all_bytes_under(out)


def test_secret_of_the_chosen_profile_is_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bridgekit.toml"
    config.write_text('[profiles.contoso]\nauth = "client_secret"\ntenant_id = "t"\nclient_id = "c"\n'
                      'client_secret_env = "CONTOSO_APP_SECRET"\ndataverse_url = "https://contoso.crm.dynamics.com"\n')
    monkeypatch.setenv("CONTOSO_APP_SECRET", "another-plain-value-42")
    out = tmp_path / "runs"
    result = run("leak", out, {"mode": "env", "variable": "CONTOSO_APP_SECRET"}, profile="contoso")
    assert result.exit_code == 8 and result.manifest["profile"] == "contoso"
    assert "another-plain-value-42" not in all_bytes_under(out)


# ---------------------------------------------------------------- the record library on its own

def test_record_without_a_runner_keeps_records_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert record.result("n", 3) == 3
    assert record.records()[-1]["value"] == 3
    with pytest.raises(ValueError, match="green, amber, red"):
        record.check("x", "purple")
    with pytest.raises(record.CheckFailed) as err:
        record.check("x", "red", detail="bad", stop=True)
    assert err.value.exit_code == 6
    path = tmp_path / "records.jsonl"
    monkeypatch.setenv(record.RECORD_ENV, str(path))
    record.watermark("graph.users", sync_run_id=7, position="v12", rows=5)
    record.result("when", dt.date(2024, 1, 2))
    with path.open("a") as fh:
        fh.write('{"kind": "result", "name": "torn"')  # a kernel killed mid-write
    assert [(r["kind"], r.get("table") or r.get("name")) for r in record.read_records(path)] == [
        ("watermark", "graph.users"), ("result", "when")]
    with pytest.raises(TypeError, match="not JSON-able"):
        record.result("obj", object())
