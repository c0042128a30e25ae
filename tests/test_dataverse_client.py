"""DataverseClient: recorded payloads parse as documented; against the emulator, reads, tracking and writes are exact."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridgekit.config import Profile
from bridgekit.dataverse import DataverseClient, Operation, _key_segment, parse_batch_response
from bridgekit.errors import ChangeTrackingNotEnabled, ConflictError, NotFoundError, ResyncRequired
from bridgekit.http import RetryPolicy
from bridgekit.odata import contains, eq, in_, startswith

PAYLOADS = Path(__file__).parent / "payloads"
HOSTILE = ["O'Brien & Sons", "') or (1 eq 1", "Zoë %&+# 東京", "x' or name ne 'y"]


def test_batch_response_parts_map_to_statuses_ids_and_errors() -> None:
    raw = (PAYLOADS / "dataverse_batch_response.txt").read_bytes()
    parts = parse_batch_response(raw, "multipart/mixed; boundary=batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f")
    assert [(p.status, p.content_id) for p in parts] == [(204, "1"), (204, "2"), (400, None), (200, None)]
    assert parts[0].headers["odata-entityid"].endswith("tasks(a59c24a7-fcd0-e911-a81e-000d3a3a1a5a)")
    assert json.loads(parts[2].body)["error"]["code"] == "0x80044331"
    assert parts[2].headers["req_id"] == "5ecd1cb3-1730-4ffc-909c-d44c22270026"
    assert json.loads(parts[3].body)["value"][0]["subject"] == "Task 1"


def test_key_segments_quote_alternate_key_values() -> None:
    gid = "78914942-34CB-ED11-B596-0022481D68CD"
    assert _key_segment(gid) == "(78914942-34cb-ed11-b596-0022481d68cd)"
    assert _key_segment("{" + gid + "}") == _key_segment(uuid.UUID(gid))
    seg = _key_segment({"accountnumber": "A/1?#'&", "x": 2})
    assert seg == "(accountnumber='A%2F1%3F%23''%26',x=2)"
    with pytest.raises(ValueError):
        _key_segment("not-a-guid")
    with pytest.raises(ValueError):
        _key_segment({"bad name": "x"})


# -- against the emulator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dv(emulator: Any) -> Iterator[DataverseClient]:
    profile = Profile(name="emulator-test", auth="certificate", tenant_id=emulator.tenant_id,
                      client_id=emulator.client_id, certificate_path=emulator.certificate_path,
                      dataverse_url=emulator.dataverse_url, graph_url=emulator.graph_url,
                      authority_host=emulator.authority_host, ca_bundle=emulator.ca_bundle, max_concurrency=4)
    client = DataverseClient(profile)
    client.session.policy = RetryPolicy(max_attempts=12, max_total_wait=120, backoff_base=0.05, backoff_cap=0.5)
    yield client
    client.session.close()


def _tag() -> str:
    return f"bk{uuid.uuid4().hex[:8]}"


def test_metadata_tables_columns_choices_and_keys(dv: DataverseClient) -> None:
    account = dv.table("account")
    assert (account.entity_set, account.primary_id, account.primary_name) == ("accounts", "accountid", "name")
    assert dv.table("accounts") == account  # entity set names resolve too
    cols = {c.name: c for c in dv.columns("account")}
    assert cols["primarycontactid"].targets == ("contact",)
    assert cols["primarycontactid"].json_name == "_primarycontactid_value"
    assert cols["statecode"].options == {0: "Active", 1: "Inactive"}
    assert cols["industrycode"].options and all(isinstance(v, str) for v in cols["industrycode"].options.values())
    assert ("accountnumber",) in dv.alternate_keys("account")
    assert not dv.table("businessunit").change_tracking
    with pytest.raises(NotFoundError):
        dv.table("nosuchtable")


def test_paged_read_returns_every_row_once_under_faults(dv: DataverseClient, emulator: Any) -> None:
    expected = sorted(r["accountid"] for r in dv.rows("account", select=["accountid"]))
    throttled_before = dv.session.governor.throttle_count
    with emulator.faults(throttle_rate=0.3, error_5xx_rate=0.05, retry_after_s=0, services=["dataverse"], seed=3):
        pages = list(dv.pages("account", select=["name"], page_size=60))
    assert dv.session.governor.throttle_count > throttled_before  # the faults were there
    assert len(pages) > 3
    got = [r["accountid"] for p in pages for r in p.value]
    assert sorted(got) == expected


def test_hostile_filter_values_match_exactly_the_intended_rows(dv: DataverseClient) -> None:
    tag = _tag()
    ids = {value: dv.create("account", {"name": f"{tag} {value}", "accountnumber": f"{tag}-{i}"})
           for i, value in enumerate(HOSTILE)}
    for value, row_id in ids.items():
        rows = list(dv.rows("account", select=["name"], filter=eq("name", f"{tag} {value}")))
        assert [r["accountid"] for r in rows] == [row_id], value
        rows = list(dv.rows("account", select=["name"], filter=contains("name", value) & startswith("name", tag)))
        assert [r["accountid"] for r in rows] == [row_id], value
    numbers = [f"{tag}-0", f"{tag}-3"]
    rows = list(dv.rows("account", select=["accountnumber"], filter=in_("accountnumber", numbers)))
    assert sorted(r["accountnumber"] for r in rows) == numbers


def test_top_and_annotations(dv: DataverseClient) -> None:
    rows = list(dv.rows("contact", select=["fullname", "_parentcustomerid_value"], top=7, page_size=3,
                        annotations=True))
    assert len(rows) == 7
    with_parent = [r for r in rows if r.get("_parentcustomerid_value")]
    assert with_parent
    assert "_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname" in with_parent[0]


def test_counts_and_whoami(dv: DataverseClient) -> None:
    n = sum(1 for _ in dv.rows("contact", select=["contactid"]))
    assert dv.count("contact") == min(n, 5000)
    assert dv.total_record_counts(["contact"])["contact"] >= 1
    assert uuid.UUID(dv.whoami()["UserId"])


def test_change_tracking_round_trip(dv: DataverseClient, emulator: Any) -> None:
    pages = list(dv.track("account", select=["name"], page_size=150))
    assert pages[-1].delta_link and all(p.delta_link is None for p in pages[:-1])
    assert sum(len(p.upserts) for p in pages) == dv.count("account") or dv.count("account") == 5000
    tag = _tag()
    new_id = dv.create("account", {"name": f"{tag} new"})
    gone_id = dv.create("account", {"name": f"{tag} gone"})
    second = list(dv.track("account", select=["name"]))[-1].delta_link
    assert second
    dv.update("account", new_id, {"name": f"{tag} renamed"})
    dv.delete("account", gone_id)
    changes = list(dv.changes(second))
    upserts = {r["accountid"]: r for p in changes for r in p.upserts}
    deletes = [d for p in changes for d in p.deletes]
    assert upserts[new_id]["name"] == f"{tag} renamed"
    assert gone_id in deletes and gone_id not in upserts
    assert changes[-1].delta_link
    with emulator.faults(force_delta_expiry=True), pytest.raises(ResyncRequired):
        list(dv.changes(changes[-1].delta_link, table="account"))
    with pytest.raises(ChangeTrackingNotEnabled) as info:
        list(dv.track("businessunit"))
    assert info.value.table == "businessunit"


def test_writes_create_update_upsert_delete(dv: DataverseClient) -> None:
    tag = _tag()
    row_id = dv.create("account", {"name": f"{tag} a"})
    assert dv.get("account", row_id, select=["name"])["name"] == f"{tag} a"
    created = dv.upsert("account", {"accountnumber": f"{tag}-K"}, {"name": f"{tag} k"}, return_representation=True)
    assert created.created is True and created.id
    again = dv.upsert("account", {"accountnumber": f"{tag}-K"}, {"name": f"{tag} k2"}, return_representation=True)
    assert again.created is False and again.id == created.id
    with pytest.raises(ConflictError):
        dv.upsert("account", {"accountnumber": f"{tag}-K"}, {"name": "x"}, if_none_match="*")
    with pytest.raises(NotFoundError):
        dv.update("account", uuid.uuid4(), {"name": "nobody"})
    dv.delete("account", row_id)
    with pytest.raises(NotFoundError):
        dv.get("account", row_id)


def test_batch_upserts_under_faults_apply_every_row_once(dv: DataverseClient, emulator: Any) -> None:
    tag = _tag()
    ops = [Operation.upsert("account", {"accountnumber": f"{tag}-{i:03d}"}, {"name": f"{tag} {i}"})
           for i in range(60)]
    ops.insert(10, Operation.update("account", uuid.uuid4(), {"name": "missing"}))  # fails with 404
    throttled_before = dv.session.governor.throttle_count
    with emulator.faults(throttle_rate=0.3, error_5xx_rate=0.05, retry_after_s=0, services=["dataverse"], seed=5):
        results = dv.batch(ops, chunk_size=5)
    assert dv.session.governor.throttle_count > throttled_before
    assert [r.index for r in results] == list(range(len(ops)))
    assert results[10].status == 404 and isinstance(results[10].error, NotFoundError)
    assert all(r.ok for i, r in enumerate(results) if i != 10)
    rows = list(dv.rows("account", select=["accountnumber", "name"], filter=startswith("accountnumber", tag)))
    assert sorted(r["accountnumber"] for r in rows) == sorted(f"{tag}-{i:03d}" for i in range(60))


def test_batch_change_set_is_atomic(dv: DataverseClient) -> None:
    tag = _tag()
    ops = [Operation.create("account", {"name": f"{tag} one"}),
           Operation.update("account", uuid.uuid4(), {"name": "missing"}),
           Operation.create("account", {"name": f"{tag} two"})]
    results = dv.batch(ops, change_set_size=3)
    assert len(results) == 3 and not any(r.ok for r in results)
    assert not list(dv.rows("account", select=["name"], filter=startswith("name", tag)))
    singles = dv.batch([ops[0], ops[2]])
    assert all(r.ok and r.id for r in singles)


def test_batch_sends_json_text_as_given_and_mappings_encoded(dv: DataverseClient) -> None:
    """A write body may arrive already encoded (a migration keeps its payloads as JSON text): it is sent
    as is, beside mappings encoded by the client; non-ASCII text survives both ways."""
    tag = _tag()
    ops = [Operation.upsert("account", {"accountnumber": f"{tag}-text"}, f'{{"name": "{tag} Zürich text", "revenue": 12.5}}'),
           Operation.upsert("account", {"accountnumber": f"{tag}-map"}, {"name": f"{tag} Zürich map", "revenue": 7})]
    results = dv.batch(ops, change_set_size=2)
    assert all(r.ok for r in results), [r.error for r in results]
    rows = {r["accountnumber"]: r for r in dv.rows("account", select=["accountnumber", "name", "revenue"],
                                                   filter=startswith("accountnumber", tag))}
    assert (rows[f"{tag}-text"]["name"], float(rows[f"{tag}-text"]["revenue"])) == (f"{tag} Zürich text", 12.5)
    assert (rows[f"{tag}-map"]["name"], float(rows[f"{tag}-map"]["revenue"])) == (f"{tag} Zürich map", 7.0)


def test_partitioned_read_covers_the_table_once(dv: DataverseClient) -> None:
    expected = sorted(r["contactid"] for r in dv.rows("contact", select=["contactid"]))
    pages = list(dv.partitioned_pages("contact", partitions=4, select=["contactid"], page_size=200))
    got = [r["contactid"] for p in pages for r in p.value]
    assert sorted(got) == expected
