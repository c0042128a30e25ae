"""Migrations against the emulator: validation and rejects, dry runs, execution under faults, SIGKILL and resume, reconciliation, rollback, cutover, the runbook."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from runbook_support import assert_readable_report

from bridgekit.config import Profile
from bridgekit.errors import ConfigError
from bridgekit.migration import (
    Migration,
    cutover,
    load_mapping,
    parse_mapping,
    reconcile,
    rejects,
    results,
    rollback,
)
from bridgekit.odata import in_, startswith
from bridgekit.workbench import Workbench

DATA = Path(__file__).resolve().parent / "data" / "migration"
ROOT = Path(__file__).resolve().parent.parent

SIMPLE_MAPPING = """
target: account
key: [accountnumber]
columns:
  accountnumber: {from: number, transform: [strip, upper]}
  name: company
  telephone1: phone
  industrycode: {from: industry, choice: label}
  revenue: {from: revenue, transform: [number]}
options: {batch_size: %(batch)d, change_set_size: 10, concurrency: %(concurrency)d}
"""
INDUSTRIES = ("Consulting", "Financial", "Insurance", "Legal Services", "Wholesale")


def workbench(emulator: Any, tmp_path: Path, name: str = "mig") -> Workbench:
    """A workbench on the session emulator with its own warehouse."""
    return Workbench.open(Profile(name=name, auth="emulator", emulator_home=str(emulator.home),
                                  warehouse=str(tmp_path / f"{name}.duckdb")))


def write_accounts(path: Path, prefix: str, n: int, *, phone: str = "+1 555 01") -> dict[str, dict[str, Any]]:
    """A CSV of ``n`` valid accounts keyed ``<prefix>-00001`` ...; returns the intended rows by key."""
    lines = ["number,company,phone,industry,revenue"]
    intended = {}
    for i in range(1, n + 1):
        key = f"{prefix}-{i:05d}"
        industry = INDUSTRIES[i % len(INDUSTRIES)]
        lines.append(f"{key},Company {prefix} {i},{phone}{i:04d},{industry},{i * 1000}.25")
        intended[key] = {"name": f"Company {prefix} {i}", "telephone1": f"{phone}{i:04d}", "revenue": i * 1000 + 0.25}
    path.write_text("\n".join(lines) + "\n")
    return intended


def simple_migration(wb: Workbench, csv: Path, state: Path, *, batch: int = 50, concurrency: int = 4) -> Migration:
    text = SIMPLE_MAPPING % {"batch": batch, "concurrency": concurrency}
    mapping = parse_mapping(yaml.safe_load(text), text=text)
    return Migration(wb, mapping, str(csv), state_dir=state)


def live_accounts(wb: Workbench, prefix: str) -> list[dict[str, Any]]:
    return list(wb.dataverse.rows("account", select=["accountid", "accountnumber", "name", "telephone1", "revenue"],
                                  filter=startswith("accountnumber", prefix + "-")))


def prefixed_fixture(tmp_path: Path, prefix: str) -> Path:
    """The accounts fixture with its keys renamed to ``prefix`` (so each test writes rows of its own)."""
    shutil.copy(DATA / "accounts.yaml", tmp_path / "accounts.yaml")
    text = (DATA / "accounts.csv").read_text()
    (tmp_path / "accounts.csv").write_text(re.sub(r"(?i)leg-", f"{prefix}-", text))
    return tmp_path / "accounts.yaml"


@pytest.fixture
def contacts(emulator: Any, tmp_path: Path) -> None:
    """The contacts the fixture's lookups point at (by their alternate key, employeeid)."""
    dv = workbench(emulator, tmp_path, "setup").dataverse
    for i in (1, 2, 3):
        dv.upsert("contact", {"employeeid": f"MIG-CT-{i}"}, {"lastname": f"Migrant {i}"})


# -- mapping and validation -----------------------------------------------------------------------------------


def test_values_are_coerced_per_column_type_and_compare_canonically() -> None:
    from decimal import Decimal

    from bridgekit.migration import open_source
    from bridgekit.migration.sources import CsvSource, ParquetSource, WarehouseSource
    from bridgekit.migration.values import ValueProblem, apply_transforms, canon, coerce

    assert apply_transforms(" leg-7 ", ["strip", "upper", {"prefix": "X-"}]) == "X-LEG-7"
    assert apply_transforms(None, [{"default": "no"}, {"map": {"NO": False}}]) is False
    assert coerce("1,250.505", type="Money", precision=2) == Decimal("1250.50")
    assert coerce("Legal services", type="Picklist", options={21: "Legal Services"}, choice_labels=True) == 21
    assert coerce("2024-03-01", type="DateTime") == "2024-03-01T00:00:00Z"
    assert coerce("2024-03-01T10:00:00+02:00", type="DateTime", date_only=True) == "2024-03-01"
    for bad, kind in (("12.5", "Integer"), ("maybe", "Boolean"), ("x" * 11, "String"), ("nope", "Uniqueidentifier")):
        with pytest.raises(ValueProblem):
            coerce(bad, type=kind, max_length=10)
    # The same content from a CSV, a Web API row and a DuckDB cell compares equal.
    assert canon(Decimal("1250.50"), "Money") == canon(1250.5, "Money") == "1250.5"
    plus_one = dt.timezone(dt.timedelta(hours=1))
    assert canon("2024-03-01T10:00:00Z", "DateTime") == canon(dt.datetime(2024, 3, 1, 11, tzinfo=plus_one), "DateTime")
    assert canon("", "String") is None and canon("ABC-{0}", "String") == "ABC-{0}"

    assert isinstance(open_source("legacy/accounts.csv", base_dir="/data"), CsvSource)
    assert open_source("legacy/accounts.csv", base_dir="/data").description == "csv:/data/legacy/accounts.csv"
    assert isinstance(open_source({"kind": "parquet", "path": "/x.parquet"}), ParquetSource)

    class FakeWorkbench:
        warehouse = object()
        profile = Profile(name="legacy")

    source = open_source("warehouse:dataverse.contact", workbench=FakeWorkbench())
    assert isinstance(source, WarehouseSource) and source.description == "warehouse:legacy:dataverse.contact"
    with pytest.raises(ConfigError, match="unknown source"):
        open_source("accounts.xlsx")
    with pytest.raises(ConfigError, match="not a table name"):
        open_source("warehouse:dataverse.contact; drop table x", workbench=FakeWorkbench())



def test_mapping_errors_list_every_problem_before_any_row_is_read(emulator: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as syntax:
        parse_mapping({"target": "account", "key": "accountnumber",
                       "columns": {"accountnumber": {"from": "a", "transform": ["shout"]}, "name": {}}})
    assert "unknown transform 'shout'" in syntax.value.message
    assert "columns.name" in syntax.value.message

    wb = workbench(emulator, tmp_path)
    bad = parse_mapping({"target": "account", "key": ["name"], "columns": {
        "name": "a", "colour": "b", "createdon": "c", "primarycontactid": "d", "telephone1": {"from": "e",
                                                                                             "choice": "label"}}})
    missing_file = tmp_path / "nowhere.csv"
    with pytest.raises(ConfigError) as meta:
        Migration(wb, bad, str(missing_file), state_dir=tmp_path / "state").plan()
    text = meta.value.message
    for expected in ("'colour' is not a column of account", "'createdon' is read-only",
                     "'primarycontactid' is a lookup", "key (name) is not an alternate key",
                     "not a choice"):
        assert expected in text
    assert not (tmp_path / "state").exists()  # nothing recorded for a mapping that does not fit

    unmapped = parse_mapping({"target": "account", "key": ["accountnumber"],
                              "columns": {"accountnumber": "a"}})
    with pytest.raises(ConfigError, match="required column 'name' is not mapped"):
        Migration(wb, unmapped, str(missing_file), state_dir=tmp_path / "state").schema()


def test_validation_sends_each_bad_row_to_rejects_with_its_reason_and_writes_nothing(
        emulator: Any, tmp_path: Path, contacts: None) -> None:
    wb = workbench(emulator, tmp_path)
    mig = Migration(wb, prefixed_fixture(tmp_path, "VAL"), state_dir=tmp_path / "state")
    plan = mig.plan("val-1")
    assert plan.dry_run
    assert plan.counts["source_rows"] == 13
    assert (plan.counts["create"], plan.counts["update"], plan.counts["unchanged"]) == (3, 0, 0)
    assert plan.counts["rejected"] == 10

    table = rejects(wb, "val-1", state_dir=tmp_path / "state")
    reasons = dict(zip(table["row_no"], table["reason"], strict=True))
    assert "name: is 179 characters long; the column allows 160" in reasons[4]
    assert "'Underwater Basket Weaving' is not a label of this choice" in reasons[5]
    assert "revenue: 'lots' is not a number" in reasons[6]
    assert "numberofemployees: '12.5' is not a whole number" in reasons[7]
    assert "primarycontactid: no contact with employeeid = 'CT-NOPE'" in reasons[8]
    assert "accountnumber: alternate key column is empty" in reasons[9]
    assert "duplicate alternate key: source row 2" in reasons[10]
    assert "name: required column is empty" in reasons[11]
    assert "creditonhold: 'maybe' is not a yes/no value" in reasons[12]
    assert "ownerid: no systemuser with internalemailaddress" in reasons[13]
    assert json.loads(table.set_index("row_no").loc[6, "row_json"])["Company"] == "Globex"
    # A dry run writes nothing.
    assert live_accounts(wb, "VAL") == []
    assert "LEG" not in plan.to_markdown() and "VAL-0001" in plan.to_markdown()


def test_dry_run_plans_creates_updates_and_unchanged_with_field_differences(
        emulator: Any, tmp_path: Path, contacts: None) -> None:
    wb = workbench(emulator, tmp_path)
    mapping = prefixed_fixture(tmp_path, "DRY")
    first = Migration(wb, mapping, state_dir=tmp_path / "state").execute("dry-base")
    assert first.counts["created"] == 3

    csv = tmp_path / "accounts.csv"
    text = csv.read_text().replace("+1 555 0101", "+1 555 0199").replace('"1,250,000.50"', "1300000")
    csv.write_text(text + "DRY-0013,New Venture,,Consulting,,,,,\n")
    plan = Migration(wb, load_mapping(mapping), state_dir=tmp_path / "state").plan("dry-2")
    assert (plan.counts["create"], plan.counts["update"], plan.counts["unchanged"]) == (1, 1, 2)
    change = plan.samples["update"][0]
    assert change["key"] == "DRY-0001"
    assert change["changes"] == {"telephone1": ["+1 555 0101", "+1 555 0199"], "revenue": ["1250000.5", "1300000"]}
    assert [s["key"] for s in plan.samples["create"]] == ["DRY-0013"]
    assert "| 1 | DRY-0001 | telephone1 | +1 555 0101 | +1 555 0199 |" in plan.to_markdown()
    # Still only planned: the target keeps the old phone number and has no DRY-0013.
    live = {r["accountnumber"]: r for r in live_accounts(wb, "DRY")}
    assert live["DRY-0001"]["telephone1"] == "+1 555 0101"
    assert "DRY-0013" not in live


# -- execution ----------------------------------------------------------------------------------------------


def test_execution_under_throttling_and_5xx_writes_every_row_exactly_as_intended(
        emulator: Any, tmp_path: Path) -> None:
    wb = workbench(emulator, tmp_path)
    intended = write_accounts(tmp_path / "many.csv", "THR", 400)
    mig = simple_migration(wb, tmp_path / "many.csv", tmp_path / "state", batch=25, concurrency=4)
    with emulator.faults(throttle_rate=0.3, error_5xx_rate=0.05, retry_after_s=0, services=["dataverse"], seed=11):
        report = mig.execute("thr-1")
    assert wb.dataverse.session.governor.throttle_count > 0  # the faults did hit the run
    assert report.complete
    assert report.counts["created"] == 400 and report.counts["failed"] == 0
    live = live_accounts(wb, "THR")
    assert len(live) == 400 and len({r["accountnumber"] for r in live}) == 400
    for row in live:
        want = intended[row["accountnumber"]]
        assert (row["name"], row["telephone1"], row["revenue"]) == (want["name"], want["telephone1"], want["revenue"])
    per_row = results(wb, "thr-1", state_dir=tmp_path / "state")
    assert len(per_row) == 400 and set(per_row["status"]) == {"done"} and set(per_row["http_status"]) == {204}
    assert reconcile(wb, "thr-1", state_dir=tmp_path / "state").status == "green"


def _kill_when(proc: subprocess.Popen[bytes], cp_file: Path, ready: Callable[[sqlite3.Connection], bool]) -> None:
    """SIGKILL the run in ``proc`` as soon as ``ready`` says so of its checkpoint (polled, at most 90 s)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if cp_file.exists():
            with sqlite3.connect(cp_file, timeout=5) as conn:
                try:
                    if ready(conn):
                        break
                except (sqlite3.OperationalError, TypeError):  # the schema or the run row is not there yet
                    pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def _keys_changed_since(wb: Any, delta: str | None) -> set[str]:
    """Account numbers created or updated since ``delta`` (the change feed of the target)."""
    changed: set[str] = set()
    for page in wb.dataverse.changes(delta):
        changed |= {r["accountnumber"] for r in page.upserts if r.get("accountnumber") is not None}
    return changed


_KILLED_RUN = textwrap.dedent("""
    import sys
    from bridgekit.config import Profile
    from bridgekit.migration import Migration, parse_mapping
    from bridgekit.workbench import Workbench
    import yaml
    home, warehouse, csv, state, text = sys.argv[1:6]
    wb = Workbench.open(Profile(name="mig", auth="emulator", emulator_home=home, warehouse=warehouse))
    mig = Migration(wb, parse_mapping(yaml.safe_load(text), text=text), csv, state_dir=state)
    mig.execute("killed-1")
""")


def test_a_run_killed_midway_resumes_without_duplicates_or_writing_anything_twice(
        emulator: Any, tmp_path: Path) -> None:
    wb = workbench(emulator, tmp_path)
    intended = write_accounts(tmp_path / "kill.csv", "KIL", 600)
    text = SIMPLE_MAPPING % {"batch": 20, "concurrency": 2}
    state = tmp_path / "state"
    with emulator.faults(latency_ms=40, services=["dataverse"]):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(emulator.home), str(tmp_path / "mig.duckdb"),
                                 str(tmp_path / "kill.csv"), str(state), text], env=os.environ.copy())
        cp_file = state / "killed-1.sqlite"
        _kill_when(proc, cp_file, lambda conn: conn.execute(
            "SELECT count(*) FROM batches WHERE state = 'done'").fetchone()[0] >= 4)
        time.sleep(1.0)  # let the server finish the request the process was waiting on
    with sqlite3.connect(cp_file) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM batches GROUP BY state").fetchall())
    assert states.get("done", 0) >= 4 and states.get("pending", 0) > 0  # killed midway

    written_before = {r["accountnumber"] for r in live_accounts(wb, "KIL")}
    assert 0 < len(written_before) < 600
    pages = list(wb.dataverse.track("account", select=["accountnumber"]))
    delta = pages[-1].delta_link

    report = Migration(wb, parse_mapping(yaml.safe_load(text), text=text), str(tmp_path / "kill.csv"),
                       state_dir=state).execute("killed-1")
    assert report.resumed and report.complete

    changed = _keys_changed_since(wb, delta)
    # Nothing the killed process had written was written again; everything else was written once.
    assert not changed & written_before
    assert changed | written_before == set(intended)
    live = live_accounts(wb, "KIL")
    assert len(live) == 600 and {r["accountnumber"] for r in live} == set(intended)
    assert all(r["name"] == intended[r["accountnumber"]]["name"] for r in live)
    assert reconcile(wb, "killed-1", state_dir=state).status == "green"


_KILLED_WHILE_PLANNING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bridgekit.config import Profile
    from bridgekit.migration import Migration, engine, parse_mapping
    from bridgekit.migration.sources import CsvSource
    from bridgekit.workbench import Workbench
    import yaml
    home, warehouse, csv, state, text = sys.argv[1:6]
    engine._PLAN_CHUNK = 50

    class SlowSource(CsvSource):  # read slowly (a remote share): planning outlasts the first writes
        def batches(self, size):
            for chunk in super().batches(size):
                time.sleep(0.2)
                yield chunk

    wb = Workbench.open(Profile(name="mig", auth="emulator", emulator_home=home, warehouse=warehouse))
    source = SlowSource(Path(csv))
    Migration(wb, parse_mapping(yaml.safe_load(text), text=text), source, state_dir=state).execute("plan-kill")
""")


def test_a_run_killed_while_planning_after_writes_began_resumes_exactly(emulator: Any, tmp_path: Path) -> None:
    """SIGKILL while later rows are still being planned and earlier batches are written: the rerun checks
    what was in flight, plans only the rows not planned yet, and the target ends exactly as intended."""
    wb = workbench(emulator, tmp_path)
    intended = write_accounts(tmp_path / "pk.csv", "PKL", 500)
    text = SIMPLE_MAPPING % {"batch": 20, "concurrency": 2}
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_PLANNING, str(emulator.home),
                             str(tmp_path / "mig.duckdb"), str(tmp_path / "pk.csv"), str(state), text],
                            env=os.environ.copy())
    cp_file = state / "plan-kill.sqlite"
    _kill_when(proc, cp_file, lambda conn: conn.execute("SELECT status FROM run").fetchone()[0] == "planning"
               and conn.execute("SELECT count(*) FROM batches WHERE state = 'done'").fetchone()[0] >= 2)
    time.sleep(0.5)  # let the server finish the request the process was waiting on
    with sqlite3.connect(cp_file) as conn:
        status = conn.execute("SELECT status FROM run").fetchone()[0]
        planned = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
    assert status == "planning" and 0 < planned < 500  # killed mid-plan, after writing had begun
    written_before = {r["accountnumber"] for r in live_accounts(wb, "PKL")}
    assert 40 <= len(written_before) <= planned
    delta = list(wb.dataverse.track("account", select=["accountnumber"]))[-1].delta_link

    report = Migration(wb, parse_mapping(yaml.safe_load(text), text=text), str(tmp_path / "pk.csv"),
                       state_dir=state).execute("plan-kill")
    assert report.resumed and report.complete and report.plan.counts["source_rows"] == 500
    changed = _keys_changed_since(wb, delta)
    assert not changed & written_before and changed | written_before == set(intended)
    live = live_accounts(wb, "PKL")
    assert len(live) == 500 and all(r["name"] == intended[r["accountnumber"]]["name"] for r in live)
    per_row = results(wb, "plan-kill", state_dir=state)
    assert len(per_row) == 500 and set(per_row["status"]) == {"done"}
    assert reconcile(wb, "plan-kill", state_dir=state).status == "green"


class _FailingSource:
    """A CSV source that breaks after ``rows`` rows, as a source that goes away while it is read; it breaks
    only once ``checkpoint`` records two batches written, so the failure surely comes after writes began."""

    def __init__(self, path: Path, rows: int, checkpoint: Path) -> None:
        from bridgekit.migration.sources import CsvSource

        self.inner, self.rows, self.checkpoint = CsvSource(path), rows, checkpoint
        self.description = self.inner.description

    def columns(self) -> list[str]:
        return self.inner.columns()

    def batches(self, size: int) -> Any:
        seen = 0
        for chunk in self.inner.batches(size):
            seen += len(chunk)
            if seen > self.rows:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with sqlite3.connect(self.checkpoint, timeout=5) as conn:
                        if conn.execute("SELECT count(*) FROM batches WHERE state = 'done'").fetchone()[0] >= 2:
                            break
                    time.sleep(0.02)
                raise OSError("the source went away")
            yield chunk


def test_batches_are_written_while_planning_goes_on_and_a_run_stopped_while_planning_resumes(
        emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.migration import engine

    wb = workbench(emulator, tmp_path)
    intended = write_accounts(tmp_path / "stop.csv", "STP", 300)
    text = SIMPLE_MAPPING % {"batch": 20, "concurrency": 2}
    mapping = parse_mapping(yaml.safe_load(text), text=text)
    state = tmp_path / "state"
    monkeypatch.setattr(engine, "_PLAN_CHUNK", 50)  # six plan chunks, so writing starts after the first
    switch_interval = sys.getswitchinterval()
    with pytest.raises(OSError, match="went away"):
        Migration(wb, mapping, _FailingSource(tmp_path / "stop.csv", 150, state / "stopped-1.sqlite"),
                  state_dir=state).execute("stopped-1")
    assert sys.getswitchinterval() == switch_interval  # shortened while writing and planning, restored
    cp_file = state / "stopped-1.sqlite"
    with sqlite3.connect(cp_file) as conn:
        status = conn.execute("SELECT status FROM run").fetchone()[0]
        planned = conn.execute("SELECT count(*) FROM rows").fetchone()[0]
        done = conn.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
        unnumbered = conn.execute("SELECT count(*) FROM rows WHERE batch IS NULL").fetchone()[0]
    # Stopped while planning, with some of the full batches of the rows planned so far already written (the
    # rest were not started when planning failed); the rows short of a full batch wait for the next ones.
    assert (status, planned, unnumbered) == ("planning", 150, 10) and 40 <= done <= 140 and done % 20 == 0
    written_before = {r["accountnumber"] for r in live_accounts(wb, "STP")}
    assert len(written_before) == done
    delta = list(wb.dataverse.track("account", select=["accountnumber"]))[-1].delta_link

    report = Migration(wb, mapping, str(tmp_path / "stop.csv"), state_dir=state).execute("stopped-1")
    assert report.resumed and report.complete and sys.getswitchinterval() == switch_interval
    assert report.counts["created"] == 300 and report.plan.counts["source_rows"] == 300
    assert report.plan.counts["batches"] == 15  # 300 rows in batches of 20: no short batch per plan chunk
    changed = _keys_changed_since(wb, delta)
    assert not changed & written_before and changed | written_before == set(intended)
    live = live_accounts(wb, "STP")
    assert len(live) == 300 and all(r["name"] == intended[r["accountnumber"]]["name"] for r in live)
    assert reconcile(wb, "stopped-1", state_dir=state).status == "green"


def test_a_duplicate_key_is_rejected_naming_the_first_row_whether_in_the_same_plan_chunk_or_an_earlier_one(
        emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.migration import engine

    wb = workbench(emulator, tmp_path)
    intended = write_accounts(tmp_path / "dup.csv", "DUP", 120)
    lines = (tmp_path / "dup.csv").read_text().splitlines()
    # Row numbers count data rows. Row 5 repeats row 3 (same chunk); rows 101 and 123 repeat rows 8 and 2
    # (later chunks), with different values and another spelling of the key, which normalises the same.
    lines.insert(5, lines[3].replace("Company DUP 3", "Second DUP 3"))
    lines.insert(101, " dup-00007 ,Second DUP 7,,Consulting,1")
    lines.append("DUP-00002,Third DUP 2,,Consulting,2")
    (tmp_path / "dup.csv").write_text("\n".join(lines) + "\n")
    text = SIMPLE_MAPPING % {"batch": 10, "concurrency": 2}
    mapping = parse_mapping(yaml.safe_load(text), text=text)
    state = tmp_path / "state"
    monkeypatch.setattr(engine, "_PLAN_CHUNK", 40)  # an execution plans pieces of 10, 20, 40, 40 ... rows
    expected = {5: 3, 101: 8, 123: 2}

    plan = Migration(wb, mapping, str(tmp_path / "dup.csv"), state_dir=state).plan("dup-dry")
    assert (plan.counts["source_rows"], plan.counts["create"], plan.counts["rejected"]) == (123, 120, 3)
    report = Migration(wb, mapping, str(tmp_path / "dup.csv"), state_dir=state).execute("dup-1")
    assert report.complete and report.counts["created"] == 120 and report.counts["rejected"] == 3
    for run in ("dup-dry", "dup-1"):
        table = rejects(wb, run, state_dir=state)
        assert list(table["row_no"]) == list(expected)
        for row_no, reason in zip(table["row_no"], table["reason"], strict=True):
            assert reason == f"duplicate alternate key: source row {expected[row_no]} has the same key"
        assert set(table["columns"]) == {"accountnumber"} and set(table["stage"]) == {"validation"}
    # The first row with a key is the one written; the planned rows read back as they were planned.
    live = live_accounts(wb, "DUP")
    assert len(live) == 120 and all(r["name"] == intended[r["accountnumber"]]["name"] for r in live)
    per_row = results(wb, "dup-1", state_dir=state)
    assert list(per_row["row_no"]) == [n for n in range(1, 124) if n not in expected]
    assert per_row.set_index("row_no").loc[100, "key"] == "DUP-00099"
    rec = reconcile(wb, "dup-1", state_dir=state)
    assert rec.status == "amber"  # rows were rejected; every planned row matches
    assert (rec.counts["matched"], rec.counts["missing"], rec.counts["mismatched"]) == (120, 0, 0)


# -- reconciliation and rollback ---------------------------------------------------------------------------------


def test_reconciliation_catches_a_corrupted_row_and_rollback_removes_only_what_the_run_created(
        emulator: Any, tmp_path: Path) -> None:
    wb = workbench(emulator, tmp_path)
    dv = wb.dataverse
    intended = write_accounts(tmp_path / "rec.csv", "REC", 30)
    existing = dv.upsert("account", {"accountnumber": "REC-00001"}, {"name": "Pre-existing", "telephone1": "old"},
                         return_representation=True)
    mig = simple_migration(wb, tmp_path / "rec.csv", tmp_path / "state", batch=10)
    report = mig.execute("rec-1")
    assert (report.counts["created"], report.counts["updated"]) == (29, 1)
    assert mig.reconcile("rec-1").status == "green"

    dv.update("account", {"accountnumber": "REC-00007"}, {"telephone1": "+0 000 CORRUPT"})
    rec = mig.reconcile("rec-1")
    assert rec.status == "red"
    assert rec.counts["mismatched"] == 1 and rec.counts["matched"] == 29
    assert rec.differences == [{"key": "REC-00007", "column": "telephone1", "source": intended["REC-00007"][
        "telephone1"], "target": "+0 000 CORRUPT"}]
    assert not rec.checksums["telephone1"]["match"]
    assert all(v["match"] for col, v in rec.checksums.items() if col != "telephone1")

    undo = mig.rollback("rec-1")
    assert (undo.deleted, undo.already_gone, undo.failed) == (29, 0, 0)
    left = live_accounts(wb, "REC")
    assert [r["accountnumber"] for r in left] == ["REC-00001"]  # updated by the run, not created: kept
    assert left[0]["accountid"] == existing.id
    again = rollback(wb, "rec-1", state_dir=tmp_path / "state")
    assert (again.deleted, again.failed) == (0, 0)


# -- other sources ---------------------------------------------------------------------------------------------


def test_parquet_source_with_a_customer_lookup_resolved_by_alternate_key(emulator: Any, tmp_path: Path) -> None:
    wb = workbench(emulator, tmp_path)
    mig = Migration(wb, DATA / "contacts.yaml", state_dir=tmp_path / "state")
    report = mig.execute("pq-1")
    assert report.counts["created"] == 2
    reasons = set(rejects(wb, "pq-1", state_dir=tmp_path / "state")["reason"])
    assert reasons == {"parentcustomerid: no account with accountnumber = 'ACC-999999'",
                       "lastname: required column is empty"}
    accounts = {r["accountnumber"]: r["accountid"] for r in wb.dataverse.rows(
        "account", select=["accountid", "accountnumber"], filter=in_("accountnumber", ["ACC-100001", "ACC-100002"]))}
    rows = {r["employeeid"]: r for r in wb.dataverse.rows(
        "contact", select=["employeeid", "_parentcustomerid_value", "birthdate", "preferredcontactmethodcode",
                           "emailaddress1"], filter=startswith("employeeid", "PQ-"))}
    assert rows["PQ-0001"]["_parentcustomerid_value"] == accounts["ACC-100001"]
    assert rows["PQ-0002"]["_parentcustomerid_value"] == accounts["ACC-100002"]
    assert rows["PQ-0001"]["birthdate"] == "1815-12-10"
    assert rows["PQ-0002"]["preferredcontactmethodcode"] == 3  # "phone" -> Phone through the option labels
    assert mig.reconcile("pq-1").status == "amber"  # everything written matches; rows were rejected
    mig.rollback("pq-1")


@pytest.fixture(scope="module")
def second_environment(tmp_path_factory: pytest.TempPathFactory, emulator: Any) -> Any:
    """A second, independent environment: a fresh emulator (own home, store and tenant) on another port."""
    from bridgekit.emulator import process

    home = tmp_path_factory.mktemp("target-env")
    info = process.start(home=home, port=0, scale="tiny", seed=7)
    try:
        yield info
    finally:
        process.stop(home)


def test_cutover_copies_then_catches_up_until_the_environments_agree(
        emulator: Any, second_environment: Any, tmp_path: Path) -> None:
    from bridgekit.auth import TokenProvider
    from bridgekit.dataverse import DataverseClient
    from bridgekit.http import tls_session

    source = workbench(emulator, tmp_path, "legacy")
    target = Workbench.open(Profile(name="new-env", auth="emulator", emulator_home=str(second_environment.home),
                                    warehouse=str(tmp_path / "new-env.duckdb")))
    # The target's token traffic on a session of our own, closed at the end: an idle keep-alive
    # connection would hold the second emulator's shutdown for its whole grace period.
    token_http = tls_session(target.profile.ca_bundle)
    target.__dict__["dataverse"] = DataverseClient(target.profile,
                                                   tokens=TokenProvider(target.profile, http_client=token_http))
    assert source.dataverse.whoami()["OrganizationId"] != target.dataverse.whoami()["OrganizationId"]

    def changes_arrive(round_no: int) -> None:
        if round_no == 1:  # users keep working in the source while the copy runs
            emulator.admin("mutate", {"creates": 15, "updates": 60, "deletes": 8, "seed": 99})
            # mutate spreads its creates and deletes over every collection, so whether one hits a copied
            # contact depends on what earlier tests left in the shared emulator: create one contact with a
            # key and delete two copied contacts for certain.
            from bridgekit import odata

            source.dataverse.create("contact", {"employeeid": "CUT-NEW-1", "firstname": "Cutover",
                                                "lastname": "Newcomer", "jobtitle": "Analyst"})
            gone = list(source.dataverse.rows("contact", select=["contactid"], top=2,
                                              filter=odata.ne("employeeid", None)))
            assert len(gone) == 2
            for row in gone:
                source.dataverse.delete("contact", row["contactid"])

    report = cutover(source, target, DATA / "contacts_cutover.yaml", cutover_id="cut-1", state_dir=tmp_path / "state",
                     max_rounds=4, between_rounds=changes_arrive)
    snapshot, catch_up, last = report.rounds[0], report.rounds[1], report.rounds[-1]
    assert snapshot["kind"] == "snapshot" and snapshot["created"] > 1000
    assert catch_up["kind"] == "catch-up" and catch_up["source_changes"] > 0
    assert catch_up["created"] > 0 and catch_up["updated"] > 0 and catch_up["deleted"] > 0, catch_up
    assert len(report.rounds) == 3 and last["lag"] == 0
    assert report.ready and report.lag == 0 and report.status in ("green", "amber")
    assert "ready to switch" in report.to_markdown()
    # Independently of the report: the two environments hold the same contacts.
    cols = "employeeid, firstname, lastname, telephone1, jobtitle"
    src = source.sql(f"select {cols} from dataverse.contact where employeeid is not null and lastname is not null "
                     "order by employeeid")
    dst = target.sql(f"select {cols} from dataverse.contact where employeeid in (select unnest(?)) order by employeeid",
                     [list(src["employeeid"])])
    assert len(src) > 1000
    assert src.fillna("").values.tolist() == dst.fillna("").values.tolist()
    target.dataverse.session.close()
    token_http.close()


# -- the runbook ---------------------------------------------------------------------------------------------


def test_migrate_runbook_executes_and_records_checks(emulator: Any, tmp_path: Path, contacts: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from bridgekit.runbooks.runner import run_runbook

    config = tmp_path / "bridgekit.toml"
    config.write_text(f'[profiles.migtest]\nauth = "emulator"\nemulator_home = "{emulator.home}"\n'
                      f'warehouse = "{tmp_path / "rb.duckdb"}"\n')
    monkeypatch.setenv("BRIDGEKIT_CONFIG", str(config))
    mapping = prefixed_fixture(tmp_path, "RBK")
    result = run_runbook("migrate", {"mapping": str(mapping), "mode": "execute", "run_id": "rb-1",
                                     "state_dir": str(tmp_path / "state")},
                         profile="migtest", path=ROOT / "runbooks", out=tmp_path / "runs", raise_on_failure=False)
    manifest = json.loads(result.manifest_path.read_text())
    assert result.exit_code == 0, manifest.get("error")
    checks = {c["name"]: c["status"] for c in manifest["checks"]}
    assert checks == {"validation": "amber", "reconciliation": "amber"}
    assert manifest["results"]["execution"]["created"] == 3
    assert manifest["results"]["run_id"] == "rb-1"
    # The outcome reads as a report: a summary first (status, counts, next steps), no dicts, index or NaN.
    assert result.report is not None
    page = assert_readable_report(result.report, tmp_path / "migrate-first-screen.png")
    first = page.text[:2000]
    assert "Summary" in first and "AMBER" in first and "3 created" in first and "Next steps:" in first
    assert "{" not in page.text and "Reconciliation" in page.text
    assert {r["accountnumber"] for r in live_accounts(workbench(emulator, tmp_path), "RBK")} == {
        "RBK-0001", "RBK-0002", "RBK-0003"}
