"""The assess runbook and bridgekit.assess: `bridgekit demo` end to end, planted defects found exactly, failure paths.

One demo run per session (``demo_runs`` in conftest: sync then assess through the runner on a freshly reset
emulator); the library-level tests read the same warehouse.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from runbook_support import RUNBOOKS, leaks, manifest, profile_toml

import bridgekit
from bridgekit.assess import Assessment, compare_with_planted, tls_probe
from bridgekit.catalog import PLATFORM_TABLES
from bridgekit.cli.main import cli
from bridgekit.errors import ExitCode
from bridgekit.runbooks.runner import run_runbook

PLANNED = {f"dataverse.{t}" for t in ("account", "contact", "lead", "opportunity", "systemuser", "team", "businessunit",
                                      "transactioncurrency", "email", "appointment", "phonecall", "task")} | \
    {f"graph.{r}" for r in ("users", "groups", "messages", "events")}


@pytest.fixture
def demo_env(demo_runs: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point profile resolution at the demo's bridgekit.toml (its warehouse) for one test."""
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(demo_runs.config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    return demo_runs


@pytest.fixture(scope="module")
def assessed(demo_runs: Any) -> Assessment:
    """The data-quality and cross-system checks run in-process on the demo's warehouse."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRIDGEKIT_CONFIG", str(demo_runs.config))
        mp.delenv("BRIDGEKIT_PROFILE", raising=False)
        a = Assessment(bridgekit.connect("emulator"))
        a.data_quality()
        a.cross_system()
    return a


# ------------------------------------------------------------------------------------------- make demo

def test_demo_ends_with_a_report_naming_the_planted_defects(demo_runs: Any) -> None:
    assert demo_runs.exit_code == 0, demo_runs.output
    out = demo_runs.output
    report = re.search(r"assess report:\s+(\S+\.html)", out)
    assert report and Path(report.group(1)).is_file()
    assert "planted defects" in out
    for name in demo_runs.planted:
        assert re.search(rf"^\s+{name}\s+\d+\s+\d+\s+\d+$", out, re.M), f"{name} missing from the summary"
    assert "RED   quality.contacts_missing_email" in out
    assert "exit 6" in out and "planted defects" in out


def test_no_output_of_the_demo_holds_a_secret_or_token(demo_runs: Any, emulator: Any) -> None:
    assert leaks(demo_runs.runs, [emulator.client_secret]) == []
    assert emulator.client_secret not in demo_runs.output


# ------------------------------------------------------------------------------------------- sync runbook

def test_sync_run_records_a_watermark_per_table_and_its_changes(demo_runs: Any) -> None:
    m = manifest(demo_runs.sync)
    assert (m["exit_code"], m["status"]) == (0, "succeeded")
    run_id = m["results"]["sync_run_id"]
    marks = m["data_watermark"]
    assert set(marks) == PLANNED
    assert all(w["sync_run_id"] == run_id for w in marks.values())
    # Change-tracked Dataverse tables: the row version reached; Graph: a fingerprint; never a token URL.
    assert isinstance(marks["dataverse.account"]["position"], int)
    assert marks["dataverse.businessunit"]["position"] is None  # no change tracking, no delta position
    assert str(marks["graph.users"]["position"]).startswith("sha256:")
    assert "deltatoken" not in (demo_runs.sync / "manifest.json").read_text()
    assert marks["dataverse.contact"]["rows"] == 1200 and marks["dataverse.account"]["rows"] == 400
    assert m["results"]["changed_by_table"]["dataverse.contact"] == 1200  # the first, full load
    assert m["checks"] == [{"name": "sync.tables", "status": "green",
                            "detail": f"16 table(s) synced, {m['results']['changed']} row change(s)"}]
    assert (demo_runs.sync / "sync.html").is_file()


def test_sync_runbook_refuses_a_mistyped_parameter_before_starting(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "sync", "--path", str(RUNBOOKS), "--out", str(tmp_path),
                                      "-p", "full", "maybe"])
    assert result.exit_code == ExitCode.USAGE
    assert "parameter 'full'" in result.output
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- assess runbook

def test_assess_run_exits_6_with_the_planted_defects_red(demo_runs: Any) -> None:
    m = manifest(demo_runs.assess)
    assert (m["exit_code"], m["status"]) == (ExitCode.CHECK_FAILED, "failed")
    assert m["error"]["type"] == "CheckFailed"
    status = {c["name"]: c["status"] for c in m["checks"]}
    # The integration area's findings: tests/test_integration.py.
    assert {k for k, v in status.items() if v == "red" and not k.startswith("integration.")} == {
        "quality.contacts_missing_email", "quality.contacts_malformed_email", "quality.stale_open_opportunities",
        "cross.disabled_users_owning_records", "cross.disabled_users_active_in_crm"}
    # Below the 3% red rate: amber, but found.
    assert status["quality.duplicate_accounts"] == status["quality.orphan_lookups"] == "amber"
    for area in ("connectivity.latency.identity", "connectivity.latency.dataverse", "connectivity.latency.graph",
                 "identity.credential_expiry", "volumes.full_sync_time", "infrastructure.rpo", "infrastructure.rto"):
        assert status[area] == "green", area
    assert status["change_tracking.businessunit"] == "amber"  # the emulator, like Dataverse, does not track it
    assert set(m["data_watermark"]) == PLANNED
    # The emulator's answer key is the demo's, in its own file: never in the manifest or the customer report.
    assert "planted_defects" not in m["results"]
    assert "planted" not in (demo_runs.assess / "assess.html").read_text().lower()
    found = json.loads((demo_runs.assess / "ground_truth.json").read_text())
    assert set(found) == set(demo_runs.planted)
    for name, row in found.items():
        assert row["planted"] == demo_runs.planted[name]["count"]
        assert row["matched"] == row["planted"], name  # every planted defect found
        if name != "duplicate_accounts":
            assert row["found"] == row["planted"], name  # and nothing else


def test_evidence_workbook_lists_exactly_the_planted_records_with_links(demo_runs: Any) -> None:
    from openpyxl import load_workbook

    book = load_workbook(demo_runs.assess / "evidence.xlsx")
    summary = book["Summary"]
    assert summary.freeze_panes == "A2" and summary.auto_filter.ref
    sheets = {str(r[0]): str(r[6]) for r in summary.iter_rows(min_row=2, values_only=True)}
    planted = demo_runs.planted

    def ids(check: str) -> list[str]:
        ws = book[sheets[check]]
        assert ws.freeze_panes == "A2" and ws.auto_filter.ref, check
        head = [c.value for c in ws[1]]
        assert head[:5] == ["record", "id", "table", "owner", "detail"], head
        assert all(r[0] for r in ws.iter_rows(min_row=2, values_only=True)), f"{check}: a record without a name"
        return sorted(str(r[1]) for r in ws.iter_rows(min_row=2, values_only=True))

    for name in ("contacts_missing_email", "contacts_malformed_email", "stale_open_opportunities",
                 "disabled_users_owning_records", "disabled_users_active_in_crm"):
        area = "cross" if name.startswith("disabled") else "quality"
        assert ids(f"{area}.{name}") == sorted(planted[name]["ids"]), name
    orphans = planted["orphan_lookups"]
    # One row per broken lookup: an opportunity whose account is gone breaks customerid and parentaccountid.
    assert set(ids("quality.orphan_lookups")) == set(orphans["contact"]["ids"] + orphans["opportunity"]["ids"])
    # Duplicates: the planted ones, plus the pair the generator drew by chance that the documented rule also
    # names (test_duplicates_are_the_planted_ones_plus_...): the sheet lists exactly what the check found.
    dups = ids("quality.duplicate_accounts")
    assert set(planted["duplicate_accounts"]["ids"]) <= set(dups) and len(dups) == 9
    ws = book[sheets["quality.contacts_missing_email"]]
    link = ws.cell(row=2, column=6)
    assert link.hyperlink is not None and "main.aspx?etn=contact&id=" in str(link.value)
    assert "pagetype=entityrecord" in str(link.value)
    users = book[sheets["cross.disabled_users_active_in_crm"]]
    head = [c.value for c in users[1]]
    assert "entra link" in head and "entra.microsoft.com" in str(users.cell(row=2, column=head.index("entra link") + 1).value)
    csv_text = (demo_runs.assess / "evidence.csv").read_text()
    assert all(i in csv_text for i in planted["contacts_missing_email"]["ids"])


def test_the_report_is_also_a_pdf_of_several_pages(demo_runs: Any) -> None:
    m = manifest(demo_runs.assess)
    pdf = demo_runs.assess / "assess.pdf"
    assert m["outputs"]["pdf"] == "assess.pdf" and pdf.is_file()
    pages = len(re.findall(rb"/Type\s*/Page\b", pdf.read_bytes()))
    assert pages > 1


def test_without_chromium_the_run_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.runbooks.runner import _write_pdf

    monkeypatch.setenv("BRIDGEKIT_CHROMIUM", str(tmp_path / "no-such-browser"))
    html = tmp_path / "r.html"
    html.write_text("<p>report</p>")
    note = _write_pdf(html, tmp_path / "r.pdf")
    assert note and "Chromium is not installed" in note and "\n" not in note
    assert not (tmp_path / "r.pdf").exists()


def test_a_follow_up_assessment_reports_a_fixed_defect_as_resolved_or_better(
        demo_runs: Any, emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follow-up visit: the tenant moved on (emulator mutate), one planted defect was fixed through the Web
    API, the warehouse was synced again; ``-p compare_with <previous run>`` says what changed."""
    import shutil

    warehouse = tmp_path / "emulator.duckdb"
    shutil.copy(demo_runs.warehouse, warehouse)  # the demo's warehouse stays as the other tests read it
    config = tmp_path / "bridgekit.toml"
    config.write_text(f'[profiles.emulator]\nauth = "emulator"\nwarehouse = "{warehouse}"\n')
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.delenv("BRIDGEKIT_PROFILE", raising=False)
    fixed = demo_runs.planted["contacts_missing_email"]["ids"][0]
    try:
        emulator.admin("mutate", {"creates": 5, "updates": 5, "deletes": 0, "seed": 18})
        resp = emulator.session().patch(f"{emulator.dataverse_url}/api/data/v9.2/contacts({fixed})",
                                        json={"emailaddress1": "fixed.contact@example.com"},
                                        headers={**emulator.headers("dataverse"), "If-Match": "*"}, timeout=30)
        assert resp.status_code == 204, resp.text
        bridgekit.connect("emulator").sync()
        result = CliRunner().invoke(cli, ["run", "assess", "--path", str(RUNBOOKS), "--out", str(tmp_path / "runs"),
                                          "-p", "calls", "2", "-p", "compare_with", str(demo_runs.assess)])
    finally:
        emulator.admin("reset", {"scale": "small", "seed": 42})
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    run_dir = next((tmp_path / "runs").glob("*-assess"))
    m = manifest(run_dir)
    assert m["results"]["since_last_assessment"]["better"] + m["results"]["since_last_assessment"]["resolved"] >= 1
    text = (run_dir / "assess.html").read_text()
    since = text[text.index("Since the last assessment</h2>"):]
    row = re.search(r"<tr>(?:(?!</tr>).)*Contacts without an email address(?:(?!</tr>).)*</tr>", since)
    assert row and re.search(r">(better|resolved)<", row.group(0)), row
    assert ">60<" in row.group(0) and ">59<" in row.group(0)  # records before and now


def test_assessment_finds_the_planted_ids_exactly(assessed: Assessment, demo_runs: Any) -> None:
    planted = demo_runs.planted
    for name in ("contacts_missing_email", "contacts_malformed_email", "stale_open_opportunities"):
        assert assessed.check(f"quality.{name}").ids == sorted(planted[name]["ids"]), name
    orphans = assessed.check("quality.orphan_lookups").measures["by_lookup_ids"]
    assert orphans["contact.parentcustomerid"] == sorted(planted["orphan_lookups"]["contact"]["ids"])
    assert orphans["opportunity.parentaccountid"] == sorted(planted["orphan_lookups"]["opportunity"]["ids"])
    owning = assessed.check("cross.disabled_users_owning_records")
    assert owning.ids == sorted(planted["disabled_users_owning_records"]["ids"])
    # Counted in the tables the plan mirrors: the demo's default plan leaves the platform tables (the flows in
    # workflow) to the integration area, which reads them from Dataverse without writing them to the warehouse.
    records = planted["disabled_users_owning_records"]["records"]
    mirrored = {t: n for t, n in records.items() if f"dataverse.{t}" in assessed.warehouse_tables()}
    assert set(records) - set(mirrored) <= set(PLATFORM_TABLES)
    assert owning.measures["records"] == mirrored
    active = assessed.check("cross.disabled_users_active_in_crm")
    assert active.ids == sorted(planted["disabled_users_active_in_crm"]["ids"])
    rate = assessed.check("quality.contacts_missing_email").rate
    assert rate == pytest.approx(planted["contacts_missing_email"]["rate"], abs=0.001)


def test_duplicates_are_the_planted_ones_plus_only_pairs_the_documented_rule_also_names(
        assessed: Assessment, demo_runs: Any) -> None:
    planted = demo_runs.planted["duplicate_accounts"]
    found = set(assessed.check("quality.duplicate_accounts").ids)
    assert set(planted["ids"]) <= found
    # The generator can draw two distinct companies whose names differ only by a legal suffix and so share a
    # domain ("Alpha Motors" / "Alpha Motors GmbH"): by its own documented rule they are duplicates too.
    extra = found - set(planted["ids"])
    planted_accounts = {i for pair in planted["pairs"] for i in pair}
    _dups, clusters = assessed.duplicate_accounts()
    accounts = assessed.wb.sql("SELECT accountid::VARCHAR AS id, name, emailaddress1 FROM dataverse.account")
    by_id = {r["id"]: r for r in accounts.to_dict("records")}
    for cluster in clusters:
        if not extra & set(cluster):
            continue
        assert not planted_accounts & set(cluster)
        names = sorted((" ".join(re.sub(r"[^a-z0-9 ]", " ", by_id[i]["name"].lower()).split()) for i in cluster), key=len)
        assert names[-1].rsplit(" ", 1)[0] == names[0]
        assert len({by_id[i]["emailaddress1"].split("@")[1] for i in cluster}) == 1
    assert len(extra) <= max(1, len(planted["ids"]) // 4)


def test_ground_truth_table_compares_found_with_planted(assessed: Assessment, demo_runs: Any) -> None:
    table = compare_with_planted(assessed.checks, demo_runs.planted).set_index("defect")
    assert table.loc["contacts_malformed_email", "missed"] == 0
    assert table.loc["contacts_malformed_email", "extra"] == 0
    assert table.loc["orphan_lookups", "matched"] == demo_runs.planted["orphan_lookups"]["count"]


def test_least_privilege_names_missing_and_excess_permissions(demo_env: Any, emulator: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    a = Assessment(bridgekit.connect("emulator"))
    a.identity()
    perms = a.check("identity.graph_permissions")
    assert perms.status == "amber"
    assert perms.measures["excess"] == ["Contacts.Read", "Group.Read.All"]  # demo app: more than the plan reads
    assert a.check("identity.credential_expiry").status == "green"  # the demo certificate lives two years
    # An app granted only User.Read.All cannot sync groups, mail or calendars: red, naming what is missing.
    secret = "bk~" + secrets.token_urlsafe(24)
    app = emulator.admin("apps", {"name": "narrow", "secret": secret,
                                  "roles": {"dataverse": ["user_impersonation"], "graph": ["User.Read.All"]}})
    config = tmp_path / "bridgekit.toml"
    config.write_text(profile_toml("narrow", {
        "auth": "client_secret", "tenant_id": emulator.tenant_id, "client_id": app["client_id"],
        "client_secret_env": "BK_TEST_NARROW_SECRET", "dataverse_url": emulator.dataverse_url,
        "graph_url": emulator.graph_url, "authority_host": emulator.authority_host, "ca_bundle": emulator.ca_bundle,
        "warehouse": str(demo_env.warehouse)}))
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.setenv("BK_TEST_NARROW_SECRET", secret)
    narrow = Assessment(bridgekit.connect("narrow"))
    narrow.identity()
    perms = narrow.check("identity.graph_permissions")
    assert perms.status == "red"
    assert perms.measures["missing"] == ["groups needs GroupMember.Read.All", "messages needs Mail.Read",
                                         "events needs Calendars.Read"]
    assert narrow.check("identity.credential_expiry").status == "amber"  # a secret's expiry is not visible


def test_infrastructure_prerequisites_are_scored_from_parameters() -> None:
    a = Assessment(None)
    good = a.infrastructure(users=1000, bandwidth_mbps_per_1000_users=500,
                            environments={"prod": {"vcores": 4, "ram_gb": 16}}, rpo_minutes=15, rto_hours=4)
    assert [c.status for c in good.checks] == ["green"] * 4
    bad = a.infrastructure(users=1000, bandwidth_mbps_per_1000_users=100,
                           environments={"prod": {"vcores": 1, "ram_gb": 4}, "test": {"vcores": 2, "ram_gb": 8}},
                           rpo_minutes=60, rto_hours=8)
    status = {c.id: c.status for c in bad.checks}
    assert status == {"infrastructure.bandwidth": "red", "infrastructure.compute": "red", "infrastructure.rpo": "red",
                      "infrastructure.rto": "red"}
    assert bad.checks[1].ids == ["prod", "test"]  # prod below the minimum, test below the recommendation
    amber = a.infrastructure(users=10, bandwidth_mbps_per_1000_users=300, environments={"x": {"vcores": 4, "ram_gb": 16}},
                             rpo_minutes=5, rto_hours=1)
    assert amber.checks[0].status == "amber"


def test_tls_probe_reports_version_cipher_and_forward_secrecy(emulator: Any, tmp_path: Path) -> None:
    info = tls_probe(emulator.dataverse_url, emulator.ca_bundle)
    assert info["error"] is None
    assert info["version"] == "TLSv1.3" and info["forward_secrecy"] is True and info["bits"] >= 128
    # Verification stays on: against a CA that did not sign the emulator's certificate the handshake fails.
    import certifi

    assert "CERTIFICATE_VERIFY_FAILED" in str(tls_probe(emulator.dataverse_url, certifi.where())["error"])


# ------------------------------------------------------------------------------------------- failure paths

def test_assess_refuses_unknown_and_mistyped_parameters_before_starting(tmp_path: Path) -> None:
    for args, name in ((["-p", "calls", "many"], "calls"), (["-p", "colour", "red"], "colour"),
                       (["-p", "environments", "[1, 2]"], "environments")):
        result = CliRunner().invoke(cli, ["run", "assess", "--path", str(RUNBOOKS), "--out", str(tmp_path), *args])
        assert result.exit_code == ExitCode.USAGE, result.output
        assert f"parameter '{name}'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_assess_with_a_wrong_client_secret_exits_3_and_leaks_nothing(demo_env: Any, emulator: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "bk~" + secrets.token_urlsafe(24)
    config = tmp_path / "bridgekit.toml"
    config.write_text(profile_toml("wrongsecret", {
        "auth": "client_secret", "tenant_id": emulator.tenant_id, "client_id": emulator.secret_client_id,
        "client_secret_env": "BK_TEST_WRONG_SECRET", "dataverse_url": emulator.dataverse_url,
        "graph_url": emulator.graph_url, "authority_host": emulator.authority_host, "ca_bundle": emulator.ca_bundle,
        "warehouse": str(demo_env.warehouse)}))
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    monkeypatch.setenv("BK_TEST_WRONG_SECRET", wrong)
    result = run_runbook("assess", {"calls": 2}, profile="wrongsecret", out=tmp_path / "runs", path=RUNBOOKS,
                         raise_on_failure=False)
    m = manifest(result.run_dir)
    assert (result.exit_code, m["exit_code"], m["status"]) == (ExitCode.AUTH, ExitCode.AUTH, "failed")
    assert m["error"]["type"] == "AuthError"
    assert "AADSTS7000215" in m["error"]["message"]  # invalid client secret, named by its Entra code
    assert m["profile"] == "wrongsecret"
    assert result.report is not None and result.report.is_file()  # a failed run still writes its report
    assert leaks(result.run_dir, [wrong, emulator.client_secret]) == []
