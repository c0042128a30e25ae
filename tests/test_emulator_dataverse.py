"""The emulated Dataverse Web API v9.2 over real HTTPS: auth, metadata, queries, paging, change tracking,
writes, upserts and $batch, checked against the documented shapes (shared/reference/protocols.md §1)."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests

ANN_ALL = 'odata.include-annotations="*"'


class Dv:
    """A thin requests helper for one test module: the API root, a CA-trusting session, a token."""

    def __init__(self, emulator: Any, session: requests.Session | None = None) -> None:
        self.emulator = emulator
        self.api = f"{emulator.dataverse_url}/api/data/v9.2"
        self.s = session or emulator.session()
        self.auth = emulator.headers("dataverse")

    def call(self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        url = path if path.startswith("https://") else f"{self.api}/{path}"
        return self.s.request(method, url, headers={**self.auth, "Accept": "application/json",
                                                    "OData-Version": "4.0", **(headers or {})}, timeout=60, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.call("GET", path, **kw)

    def create(self, entity_set: str, body: dict[str, Any]) -> str:
        r = self.call("POST", entity_set, json=body)
        assert r.status_code == 204, r.text
        return r.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")

    def rows(self, entity_set: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
             ) -> list[dict[str, Any]]:
        r = self.get(entity_set, params=params, headers=headers)
        assert r.status_code == 200, r.text
        return list(r.json()["value"])

    def pages(self, url: str, headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
        next_url: str | None = url
        while next_url:
            r = self.get(next_url, headers=headers)
            assert r.status_code == 200, r.text
            data = r.json()
            yield data
            next_url = data.get("@odata.nextLink")


def error_of(r: requests.Response) -> tuple[str, str]:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]["code"], body["error"]["message"]


@pytest.fixture(scope="module")
def dv(emulator: Any) -> Dv:
    return Dv(emulator)


@pytest.fixture(scope="module")
def tag() -> str:
    """A marker unique to this test run, used in the records the tests create."""
    return uuid.uuid4().hex[:8].upper()


# -- authentication ------------------------------------------------------------------------------------


def test_requests_without_a_valid_dataverse_token_get_401_with_a_challenge(dv: Dv, emulator: Any) -> None:
    url = f"{dv.api}/accounts"
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, emulator.headers("graph")):
        r = dv.s.get(url, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
        assert f"resource_id={emulator.dataverse_url}/" in r.headers["WWW-Authenticate"]
        code, message = error_of(r)
        assert code == "0x8005F101" and "requires authentication" in message


# -- service document, $metadata, EntityDefinitions, functions ------------------------------------------


def test_service_document_and_csdl_describe_the_tables(dv: Dv) -> None:
    doc = dv.get("").json()
    assert doc["@odata.context"].endswith("/api/data/v9.2/$metadata")
    assert {"name": "accounts", "kind": "EntitySet", "url": "accounts"} in doc["value"]

    r = dv.get("$metadata", params={"annotations": "true"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/xml")
    xml = r.text
    assert 'Namespace="Microsoft.Dynamics.CRM" Alias="mscrm"' in xml
    account = re.search(r'<EntityType Name="account".*?</EntityType>', xml, re.S)
    assert account is not None
    assert '<PropertyRef Name="accountid" />' in account.group(0)
    assert '<Property Name="_primarycontactid_value" Type="Edm.Guid" />' in account.group(0)
    assert '<NavigationProperty Name="primarycontactid" Type="mscrm.contact" />' in account.group(0)
    accounts_set = re.search(r'<EntitySet Name="accounts".*?</EntitySet>', xml, re.S)
    assert accounts_set is not None and "Org.OData.Capabilities.V1.ChangeTracking" in accounts_set.group(0)
    assert 'Property="Supported" Bool="true"' in accounts_set.group(0)


def test_entity_definitions_answer_the_sdk_lookups(dv: Dv) -> None:
    # The PowerPlatform SDK's table lookup (protocols.md §1.16).
    rows = dv.rows("EntityDefinitions", {"$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
                                         "$filter": "LogicalName eq 'account'"})
    assert len(rows) == 1
    assert rows[0]["EntitySetName"] == "accounts" and rows[0]["PrimaryIdAttribute"] == "accountid"
    assert "MetadataId" in rows[0] and "ObjectTypeCode" not in rows[0]

    tracked = {r["LogicalName"] for r in dv.rows("EntityDefinitions", {"$select": "LogicalName",
                                                                        "$filter": "ChangeTrackingEnabled eq true"})}
    assert "account" in tracked and "businessunit" not in tracked

    one = dv.get("EntityDefinitions(LogicalName='contact')").json()
    assert one["PrimaryNameAttribute"] == "fullname" and one["ObjectTypeCode"] == 2
    assert one["DisplayName"]["UserLocalizedLabel"]["Label"] == "Contact"

    attrs = {a["LogicalName"]: a for a in dv.rows("EntityDefinitions(LogicalName='account')/Attributes")}
    assert attrs["name"]["AttributeTypeName"] == {"Value": "StringType"} and attrs["name"]["MaxLength"] == 160
    assert attrs["primarycontactid"]["AttributeType"] == "Lookup" and attrs["primarycontactid"]["Targets"] == ["contact"]
    assert attrs["accountid"]["RequiredLevel"]["Value"] == "SystemRequired"

    picklists = dv.rows("EntityDefinitions(LogicalName='account')/Attributes/"
                        "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
                        {"$select": "LogicalName", "$expand": "OptionSet($select=Options)"})
    industry = next(a for a in picklists if a["LogicalName"] == "industrycode")
    labels = {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in industry["OptionSet"]["Options"]}
    assert labels[7] == "Consulting"
    assert all(a["@odata.type"] == "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata" for a in picklists)

    status = dv.rows("EntityDefinitions(LogicalName='account')/Attributes/"
                     "Microsoft.Dynamics.CRM.StatusAttributeMetadata", {"$expand": "OptionSet"})
    assert {o["Value"]: o["State"] for o in status[0]["OptionSet"]["Options"]} == {1: 0, 2: 1}

    keys = dv.rows("EntityDefinitions(LogicalName='account')/Keys")
    assert keys[0]["KeyAttributes"] == ["accountnumber"]

    r = dv.get("EntityDefinitions", params={"$filter": "startswith(LogicalName,'acc')"})
    assert r.status_code == 501 and error_of(r)[0] == "0x8006088a"


def test_who_am_i_and_total_record_count(dv: Dv) -> None:
    me = dv.get("WhoAmI").json()
    assert me["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")
    for key in ("UserId", "BusinessUnitId", "OrganizationId"):
        uuid.UUID(me[key])
    counts = dv.get("RetrieveTotalRecordCount(EntityNames=['account','contact'])").json()
    coll = counts["EntityRecordCountCollection"]
    assert coll["Keys"] == ["account", "contact"]
    assert coll["Values"][0] == int(dv.get("accounts/$count").text) or coll["Values"][0] > 5000
    r = dv.get("nosuchthings")
    assert r.status_code == 404 and error_of(r) == ("0x8006088a", "Resource not found for the segment 'nosuchthings'.")


# -- queries ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(dv: Dv, tag: str) -> dict[str, str]:
    """Accounts whose names are hostile filter values, plus one contact they point at."""
    contact = dv.create("contacts", {"firstname": "Hostile", "lastname": f"Owner {tag}"})
    names = {
        "obrien": f"O'Brien & Sons {tag}",
        "inject": f"') or (1 eq 1 {tag}",
        "umlaut": f"Müller Straße GmbH {tag}",
        "plain": f"Plain Trading {tag}",
    }
    ids = {}
    for i, (key, name) in enumerate(names.items()):
        body: dict[str, Any] = {"name": name, "accountnumber": f"H-{tag}-{i}", "numberofemployees": 10 * (i + 1),
                                "revenue": 1000.5 * (i + 1), "creditonhold": i % 2 == 0, "industrycode": 7}
        if key == "obrien":
            body["primarycontactid@odata.bind"] = f"/contacts({contact})"
        ids[key] = dv.create("accounts", body)
    ids["contact"] = contact
    return ids


def _names(dv: Dv, flt: str, tag: str, **extra: str) -> set[str]:
    params = {"$select": "name", "$filter": f"({flt}) and endswith(name,'{tag}')", **extra}
    return {r["name"].removesuffix(f" {tag}") for r in dv.rows("accounts", params)}


def test_filter_literals_and_operators(dv: Dv, tag: str, hostile: dict[str, str]) -> None:
    assert _names(dv, f"name eq 'o''brien & sons {tag}'", tag) == {"O'Brien & Sons"}  # '' escape, any case
    assert _names(dv, "contains(name,'müller')", tag) == {"Müller Straße GmbH"}
    assert _names(dv, "contains(name,'MÜLLER')", tag) == {"Müller Straße GmbH"}  # case folding beyond ASCII
    assert _names(dv, "startswith(name,'plain')", tag) == {"Plain Trading"}
    assert _names(dv, "not contains(name,'GmbH') and numberofemployees ge 30", tag) == {"Plain Trading"}
    assert _names(dv, "(numberofemployees eq 10 or numberofemployees eq 40) and revenue lt 2000", tag) == \
        {"O'Brien & Sons"}
    assert _names(dv, "creditonhold eq true", tag) == {"O'Brien & Sons", "Müller Straße GmbH"}
    assert _names(dv, "revenue gt 2001.5", tag) == {"Müller Straße GmbH", "Plain Trading"}
    assert _names(dv, "createdon gt 2020-01-01T00:00:00Z and createdon lt 2999-01-01", tag) == \
        {"O'Brien & Sons", "') or (1 eq 1", "Müller Straße GmbH", "Plain Trading"}
    assert _names(dv, "_primarycontactid_value ne null", tag) == {"O'Brien & Sons"}
    assert _names(dv, f"_primarycontactid_value eq {hostile['contact']}", tag) == {"O'Brien & Sons"}
    assert _names(dv, f"_primarycontactid_value eq '{hostile['contact'].upper()}'", tag) == {"O'Brien & Sons"}
    assert _names(dv, f"accountid eq {hostile['plain']}", tag) == {"Plain Trading"}
    assert _names(dv, f"primarycontactid/lastname eq 'Owner {tag}'", tag) == {"O'Brien & Sons"}
    assert _names(dv, "industrycode eq @p1", tag, **{"@p1": "7"}) == \
        {"O'Brien & Sons", "') or (1 eq 1", "Müller Straße GmbH", "Plain Trading"}
    assert _names(dv, "Microsoft.Dynamics.CRM.In(PropertyName='numberofemployees',PropertyValues=[\"20\",\"30\"])",
                  tag) == {"') or (1 eq 1", "Müller Straße GmbH"}


def test_hostile_values_never_widen_a_filter(dv: Dv, tag: str, hostile: dict[str, str]) -> None:
    # The value is a literal that happens to look like OData: it matches only the record named so.
    assert _names(dv, f"name eq ''') or (1 eq 1 {tag}'", tag) == {"') or (1 eq 1"}
    # Breaking out of the literal is a syntax error, not a wider query.
    r = dv.get("accounts", params={"$filter": "name eq 'x') or (1 eq 1"})
    assert r.status_code == 400 and error_of(r)[0] == "0x80060888"
    r = dv.get("accounts", params={"$filter": "name eq 'O'Brien'"})
    code, message = error_of(r)
    assert r.status_code == 400 and code == "0x80060888"
    assert message == "There is an unterminated literal at position 16 in 'name eq 'O'Brien''."
    r = dv.get("accounts", params={"$filter": "name eq 'unterminated"})
    assert error_of(r)[1].startswith("There is an unterminated literal at position 8")


def test_query_errors_use_the_documented_codes(dv: Dv) -> None:
    cases = [
        ({"$select": "name,primarycontactid"},
         "Could not find a property named 'primarycontactid' on type 'Microsoft.Dynamics.CRM.account'."),
        ({"$filter": "nosuch eq 1"}, "Could not find a property named 'nosuch' on type 'Microsoft.Dynamics.CRM.account'."),
        ({"$filter": "name eq 5"}, "A binary operator with incompatible types was detected. Found operand types "
                                   "'Edm.String' and 'Edm.Int32' for operator kind 'Equal'."),
        ({"$skip": "10"}, "The query parameter $skip is not supported"),
        ({"$search": "x"}, "The query parameter $search is not supported"),
        ({"$format": "json"}, "The query parameter $format is not supported"),
    ]
    for params, message in cases:
        r = dv.get("accounts", params=params)
        assert r.status_code == 400, params
        assert error_of(r) == ("0x80060888", message)


def test_select_orderby_top_count_expand_and_annotations(dv: Dv, tag: str, hostile: dict[str, str]) -> None:
    flt = f"endswith(name,'{tag}')"
    r = dv.get("accounts", params={"$select": "name,numberofemployees", "$filter": flt,
                                   "$orderby": "numberofemployees desc", "$top": "2", "$count": "true"})
    data = r.json()
    assert data["@odata.context"].endswith("$metadata#accounts(name,numberofemployees)")
    assert data["@odata.count"] == 4 and "@odata.nextLink" not in data
    assert [row["numberofemployees"] for row in data["value"]] == [40, 30]
    assert set(data["value"][0]) == {"@odata.etag", "name", "numberofemployees", "accountid"}
    assert re.fullmatch(r'W/"\d+"', data["value"][0]["@odata.etag"])

    r = dv.get("accounts", params={"$select": "name,revenue,industrycode,creditonhold,_primarycontactid_value",
                                   "$filter": f"accountid eq {hostile['obrien']}",
                                   "$expand": "primarycontactid($select=fullname)"},
               headers={"Prefer": ANN_ALL})
    assert r.headers["Preference-Applied"] == ANN_ALL
    row = r.json()["value"][0]
    assert row["revenue@OData.Community.Display.V1.FormattedValue"] == "$1,000.50"
    assert row["industrycode@OData.Community.Display.V1.FormattedValue"] == "Consulting"
    assert row["creditonhold@OData.Community.Display.V1.FormattedValue"] == "Yes"
    assert row["_primarycontactid_value@OData.Community.Display.V1.FormattedValue"] == f"Hostile Owner {tag}"
    assert row["_primarycontactid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    assert row["_primarycontactid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == "primarycontactid"
    keys = list(row)
    assert keys.index("_primarycontactid_value@Microsoft.Dynamics.CRM.lookuplogicalname") < \
        keys.index("_primarycontactid_value")
    assert row["primarycontactid"]["fullname"] == f"Hostile Owner {tag}"
    assert row["primarycontactid"]["contactid"] == hostile["contact"]

    r = dv.get("accounts/$count")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain") and int(r.text) > 4
    ann = dv.get("accounts", params={"$select": "name", "$count": "true", "$top": "1"},
                 headers={"Prefer": 'odata.include-annotations="Microsoft.Dynamics.CRM.totalrecordcount,'
                                    'Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"'}).json()
    assert ann["@Microsoft.Dynamics.CRM.totalrecordcount"] == ann["@odata.count"] == int(r.text)
    assert ann["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] is False


# -- paging ------------------------------------------------------------------------------------------------


def test_paging_returns_every_record_exactly_once_while_others_write(dv: Dv, emulator: Any, tag: str) -> None:
    prefix = f"PG{tag}"
    stable = {dv.create("accounts", {"name": f"Paged {i}", "accountnumber": f"{prefix}-{i:04d}"}) for i in range(120)}
    doomed = [dv.create("accounts", {"name": f"Doomed {i}", "accountnumber": f"{prefix}-D{i:03d}"})
              for i in range(30)]
    stop = threading.Event()
    writer = Dv(emulator, session=type(emulator.session())(emulator.ca_bundle))
    ordered = sorted(stable)
    created: list[str] = []
    failures: list[BaseException] = []
    counter = itertools.count()

    def churn() -> None:
        try:
            for _ in range(200):
                if stop.is_set():
                    return
                i = next(counter)
                r = writer.call("PATCH", f"accounts({ordered[(i * 7) % len(ordered)]})",
                                json={"name": f"Renamed {i}"}, headers={"If-Match": "*"})
                assert r.status_code == 204, r.text
                created.append(writer.create("accounts", {"name": f"New {i}", "accountnumber": f"{prefix}-N{i:04d}"}))
                if i < len(doomed):
                    assert writer.call("DELETE", f"accounts({doomed[i]})").status_code == 204
        except BaseException as exc:  # surfaced by the assertion after join()
            failures.append(exc)

    for orderby in (None, "accountnumber desc"):
        params = {"$select": "name,accountnumber", "$filter": f"startswith(accountnumber,'{prefix}-')"}
        if orderby:
            params["$orderby"] = orderby
        url = requests.Request("GET", f"{dv.api}/accounts", params=params).prepare().url
        assert url is not None
        thread = threading.Thread(target=churn)
        stop.clear()
        thread.start()
        seen: list[str] = []
        try:
            for page in dv.pages(url, headers={"Prefer": "odata.maxpagesize=7"}):
                assert len(page["value"]) <= 7
                seen += [row["accountid"] for row in page["value"]]
        finally:
            stop.set()
            thread.join()
        assert not failures, failures
        assert len(seen) == len(set(seen)), "a record was served twice"
        assert stable <= set(seen), "a record that existed throughout was skipped"
        assert set(seen) <= stable | set(doomed) | set(created)


def test_next_links_use_the_paging_cookie_and_echo_the_page_size(dv: Dv) -> None:
    r = dv.get("contacts", params={"$select": "fullname"}, headers={"Prefer": "odata.maxpagesize=3"})
    assert r.headers["Preference-Applied"] == "odata.maxpagesize=3"
    link = r.json()["@odata.nextLink"]
    query = parse_qs(urlsplit(link).query)
    assert query["$select"] == ["fullname"]
    cookie = query["$skiptoken"][0]
    assert re.fullmatch(r'<cookie pagenumber="2" pagingcookie="[^"]+" istracking="False" />', cookie)
    inner = unquote(re.search(r'pagingcookie="([^"]+)"', cookie).group(1))  # type: ignore[union-attr]
    assert re.fullmatch(r'<cookie page="1"><contactid last="\{[0-9A-F-]{36}\}" first="\{[0-9A-F-]{36}\}" />'
                        r"</cookie>", inner)
    r = dv.get("contacts", params={"$skiptoken": "<cookie nonsense />"})
    assert r.status_code == 400 and error_of(r)[0] == "0x80060888"


# -- change tracking ---------------------------------------------------------------------------------------


def _initial_sync(dv: Dv, entity_set: str, select: str, page: int) -> tuple[set[str], str, int]:
    ids: set[str] = set()
    pages = 0
    delta = ""
    url = f"{dv.api}/{entity_set}?$select={select}"
    for data in dv.pages(url, headers={"Prefer": f"odata.track-changes,odata.maxpagesize={page}"}):
        pages += 1
        ids |= {row["accountid"] for row in data["value"]}
        if "@odata.nextLink" in data:
            assert "@odata.deltaLink" not in data
        else:
            delta = data["@odata.deltaLink"]
    return ids, delta, pages


def test_change_tracking_delta_returns_exactly_what_changed(dv: Dv, tag: str) -> None:
    total = int(dv.get("accounts/$count").text)
    ids, delta, pages = _initial_sync(dv, "accounts", "name", 5000 if total > 5000 else max(total // 3, 1))
    assert pages >= 2 or total > 5000
    token = unquote(parse_qs(urlsplit(delta).query)["$deltatoken"][0])
    assert re.fullmatch(r"\d+!\d\d/\d\d/\d{4} \d\d:\d\d:\d\d", token)

    victim, updated = sorted(ids)[:2]
    created = dv.create("accounts", {"name": f"Delta new {tag}"})
    fleeting = dv.create("accounts", {"name": f"Delta fleeting {tag}"})
    assert dv.call("PATCH", f"accounts({updated})", json={"telephone1": "555-0100"},
                   headers={"If-Match": "*"}).status_code == 204
    assert dv.call("DELETE", f"accounts({victim})").status_code == 204
    assert dv.call("DELETE", f"accounts({fleeting})").status_code == 204

    changed: set[str] = set()
    deleted: set[str] = set()
    next_delta = ""
    for data in dv.pages(delta, headers={"Prefer": "odata.maxpagesize=2"}):
        assert data["@odata.context"].endswith("$metadata#accounts(name)/$delta")
        for row in data["value"]:
            if "reason" in row:
                assert row["reason"] == "deleted"
                assert row["@odata.context"].endswith("$metadata#accounts/$deletedEntity")
                deleted.add(row["id"])
            else:
                assert set(row) == {"@odata.etag", "name", "accountid"}
                changed.add(row["accountid"])
        next_delta = data.get("@odata.deltaLink", next_delta)
    assert changed == {created, updated}
    assert deleted == {victim, fleeting}  # created then deleted shows only as a delete

    again = dv.get(next_delta).json()
    assert again["value"] == [] and "@odata.deltaLink" in again


def test_tracked_full_read_plus_delta_reproduces_the_table_despite_concurrent_writes(dv: Dv, tag: str) -> None:
    all_ids = sorted(r["accountid"] for r in dv.rows("accounts", {"$select": "name"}))
    page = max(len(all_ids) // 4, 1)
    replica: dict[str, str | None] = {}
    delta = ""
    url = f"{dv.api}/accounts?$select=name"
    for n, data in enumerate(dv.pages(url, headers={"Prefer": f"odata.track-changes,odata.maxpagesize={page}"})):
        replica.update({row["accountid"]: row["name"] for row in data["value"]})
        delta = data.get("@odata.deltaLink", delta)
        if n < 2:
            # Writes between pages: rows already served, rows still ahead, new rows and deletes.
            for rid in (all_ids[n], all_ids[-1 - n]):
                dv.call("PATCH", f"accounts({rid})", json={"name": f"Moved {n} {tag}"}, headers={"If-Match": "*"})
            dv.create("accounts", {"name": f"Born {n} {tag}"})
            dv.call("DELETE", f"accounts({all_ids[len(all_ids) // 2 + n]})")
    for data in dv.pages(delta):
        for row in data["value"]:
            if "reason" in row:
                replica.pop(row["id"], None)
            else:
                replica[row["accountid"]] = row["name"]
    truth = {r["accountid"]: r["name"] for r in dv.rows("accounts", {"$select": "name"})}
    assert replica == truth


def test_change_tracking_errors(dv: Dv, emulator: Any) -> None:
    r = dv.get("businessunits", headers={"Prefer": "odata.track-changes"})
    assert r.status_code == 400
    assert error_of(r) == ("0x80072491", "Entity businessunit isn't enabled for change tracking.")
    for option, value in (("$filter", "name ne null"), ("$orderby", "name"), ("$top", "5"),
                          ("$expand", "primarycontactid")):
        r = dv.get("accounts", params={"$select": "name", option: value}, headers={"Prefer": "odata.track-changes"})
        assert r.status_code == 400
        assert error_of(r)[1] == f'The "{option}" query parameter isn\'t supported when Change Tracking is enabled.'

    _, delta, _ = _initial_sync(dv, "accounts", "name", 5000)
    assert dv.get(delta).status_code == 200
    with emulator.faults(force_delta_expiry=True):
        r = dv.get(delta)
        assert r.status_code == 400
        code, message = error_of(r)
        assert code == "0x80044352" and "full sync" in message and "odata.track-changes" in message
    time.sleep(1.1)  # the token's date has one-second resolution
    with emulator.settings(delta_token_max_age_s=0):
        assert dv.get(delta).status_code == 400
    assert dv.get(delta).status_code == 200


# -- single records and writes -----------------------------------------------------------------------------


def test_create_read_update_delete_status_codes_and_headers(dv: Dv, tag: str) -> None:
    r = dv.call("POST", "accounts", json={"name": f"Crud {tag}", "numberofemployees": 5})
    assert r.status_code == 204 and r.content == b""
    entity_url = r.headers["OData-EntityId"]
    rid = entity_url.rsplit("(", 1)[1].rstrip(")")
    assert entity_url == f"{dv.api}/accounts({rid})"

    r = dv.get(f"accounts({rid})", params={"$select": "name,versionnumber"})
    body = r.json()
    assert r.status_code == 200 and body["@odata.context"].endswith("$metadata#accounts(name,versionnumber)/$entity")
    assert r.headers["ETag"] == body["@odata.etag"] == f'W/"{body["versionnumber"]}"'
    assert dv.get(f"accounts({rid})", headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
    assert dv.get(f"accounts({rid})", headers={"If-None-Match": r.headers["ETag"],
                                               "Prefer": ANN_ALL}).status_code == 200

    r = dv.call("PATCH", f"accounts({rid})", json={"name": "stale"}, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412 and error_of(r)[0] == "0x80060882"
    r = dv.call("PATCH", f"accounts({rid})", json={"name": f"Crud2 {tag}"},
                headers={"If-Match": body["@odata.etag"], "Prefer": "return=representation"})
    assert r.status_code == 200 and r.json()["name"] == f"Crud2 {tag}"
    assert int(r.json()["versionnumber"]) > int(body["versionnumber"])
    assert r.json()["modifiedon"] >= r.json()["createdon"]
    r = dv.call("PATCH", f"accounts({rid})", json={"name": "x"}, headers={"If-None-Match": "*"})
    assert r.status_code == 412 and error_of(r) == ("0x80040237", "A record with matching key values already exists.")

    missing = str(uuid.uuid4())
    r = dv.call("PATCH", f"accounts({missing})", json={"name": "x"}, headers={"If-Match": "*"})
    assert r.status_code == 404 and error_of(r) == ("0x80040217", f"account With Id = {missing} Does Not Exist")
    r = dv.call("PATCH", f"accounts({missing})", json={"name": f"Upserted by id {tag}"})
    assert r.status_code == 204 and dv.get(f"accounts({missing})").json()["name"] == f"Upserted by id {tag}"

    r = dv.call("POST", "accounts", json={"accountid": rid, "name": "dup"})
    assert r.status_code == 412 and error_of(r)[0] == "0x80040237"
    r = dv.call("POST", "accounts", json={"name": f"Rep {tag}"}, params={"$select": "name"},
                headers={"Prefer": "return=representation"})
    assert r.status_code == 201 and "OData-EntityId" not in r.headers
    assert set(r.json()) == {"@odata.context", "@odata.etag", "name", "accountid"}

    assert dv.call("DELETE", f"accounts({rid})").status_code == 204
    r = dv.call("DELETE", f"accounts({rid})")
    assert r.status_code == 404 and error_of(r)[0] == "0x80040217"
    assert dv.get(f"accounts({rid})").status_code == 404


def test_writes_validate_payloads_and_bind_lookups(dv: Dv, tag: str) -> None:
    r = dv.call("POST", "accounts", json={"name": "x" * 161})
    assert r.status_code == 400
    assert error_of(r) == ("0x80044331", "A validation error occurred. The length of the 'name' attribute of the "
                                         "'account' entity exceeded the maximum allowed length of '160'.")
    for body, fragment in (({"name": 5}, "Cannot convert the literal '5' to the expected type 'Edm.String'."),
                           ({"nme": "x"}, "The property 'nme' does not exist on type 'Microsoft.Dynamics.CRM.account'."),
                           ({"_primarycontactid_value": str(uuid.uuid4())}, "does not exist on type"),
                           ({"Primarycontactid@odata.bind": "/contacts(x)"}, "An undeclared property 'Primarycontactid'")):
        r = dv.call("POST", "accounts", json=body)
        code, message = error_of(r)
        assert r.status_code == 400 and code == "0x80048d19" and fragment in message, body

    account = dv.create("accounts", {"name": f"Parent {tag}", "accountnumber": f"BIND-{tag}"})
    contact_a = dv.create("contacts", {"lastname": f"Bound A {tag}", "parentcustomerid_account@odata.bind":
                                       f"/accounts({account})"})
    contact_b = dv.create("contacts", {"lastname": f"Bound B {tag}",
                                       "parentcustomerid_account@odata.bind": f"accounts(accountnumber='BIND-{tag}')"})
    contact_c = dv.create("contacts", {"lastname": f"Bound C {tag}",
                                       "parentcustomerid_contact@odata.bind": f"{dv.api}/contacts({contact_a})"})
    rows = {r["contactid"]: r for r in dv.rows(
        "contacts", {"$select": "_parentcustomerid_value,fullname", "$filter": f"endswith(lastname,'{tag}')"},
        headers={"Prefer": ANN_ALL})}
    assert rows[contact_a]["_parentcustomerid_value"] == rows[contact_b]["_parentcustomerid_value"] == account
    assert rows[contact_a]["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account"
    assert rows[contact_c]["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    assert rows[contact_c]["_parentcustomerid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == \
        "parentcustomerid_contact"
    assert rows[contact_a]["fullname"] == f"Bound A {tag}"
    r = dv.call("POST", "contacts", json={"lastname": "x", "parentcustomerid_account@odata.bind":
                                          f"/accounts({uuid.uuid4()})"})
    assert r.status_code == 404 and error_of(r)[0] == "0x80040217"


def test_activities_stay_consistent_with_activitypointer(dv: Dv, tag: str) -> None:
    account = dv.create("accounts", {"name": f"Activity host {tag}"})
    task = dv.create("tasks", {"subject": f"Call back {tag}", "regardingobjectid_account_task@odata.bind":
                               f"/accounts({account})"})
    pointer = dv.get(f"activitypointers({task})", headers={"Prefer": ANN_ALL}).json()
    assert pointer["activitytypecode"] == "task" and pointer["subject"] == f"Call back {tag}"
    assert pointer["_regardingobjectid_value"] == account
    assert pointer["_regardingobjectid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account"
    dv.call("PATCH", f"tasks({task})", json={"subject": f"Called {tag}"}, headers={"If-Match": "*"})
    assert dv.get(f"activitypointers({task})").json()["subject"] == f"Called {tag}"
    assert dv.call("DELETE", f"tasks({task})").status_code == 204
    assert dv.get(f"activitypointers({task})").status_code == 404


def test_upsert_by_alternate_key(dv: Dv, tag: str) -> None:
    key = f"accounts(accountnumber='ALT-{tag}/1')"
    r = dv.call("PATCH", key, json={"name": f"Alt {tag}"}, headers={"Prefer": "return=representation"})
    assert r.status_code == 201
    created = r.json()
    assert created["accountnumber"] == f"ALT-{tag}/1" and created["name"] == f"Alt {tag}"
    r = dv.call("PATCH", key, json={"name": f"Alt again {tag}", "accountnumber": "ignored"},
                headers={"Prefer": "return=representation"})
    assert r.status_code == 200 and r.json()["accountid"] == created["accountid"]
    assert r.json()["accountnumber"] == f"ALT-{tag}/1"
    r = dv.call("PATCH", key, json={"telephone1": "555"})
    assert r.status_code == 204 and r.headers["OData-EntityId"] == f"{dv.api}/{key}"
    got = dv.get(key, params={"$select": "name,telephone1"}).json()
    assert (got["name"], got["telephone1"], got["accountid"]) == (f"Alt again {tag}", "555", created["accountid"])
    r = dv.get(f"accounts(accountnumber='NOPE-{tag}')")
    assert r.status_code == 404 and error_of(r)[0] == "0x80040217"
    r = dv.get("accounts(name='x')")
    assert r.status_code == 400 and error_of(r)[0] == "0x80060888"
    r = dv.call("POST", "accounts", json={"name": "dup key", "accountnumber": f"ALT-{tag}/1"})
    assert r.status_code == 412


# -- $batch ------------------------------------------------------------------------------------------------


def _part(method: str, url: str, body: str | None = None, content_id: int | None = None, nl: str = "\r\n") -> str:
    head = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        head.append(f"Content-ID: {content_id}")
    lines = [*head, "", f"{method} {url} HTTP/1.1"]
    if body is not None:
        lines += ["Content-Type: application/json; type=entry", "", body]
    else:
        lines += ["Accept: application/json", ""]
    return nl.join(lines)


def _batch(parts: list[str], boundary: str, nl: str = "\r\n") -> str:
    return "".join(f"--{boundary}{nl}{p}{nl}" for p in parts) + f"--{boundary}--{nl}"


def _changeset(parts: list[str], boundary: str, nl: str = "\r\n") -> str:
    return f'Content-Type: multipart/mixed; boundary="{boundary}"{nl}{nl}' + _batch(parts, boundary, nl)


def _statuses(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"^HTTP/1\.1 (\d{3})", text, re.M)]


def test_batch_change_set_is_atomic_and_resolves_content_ids(dv: Dv, tag: str) -> None:
    cs = _changeset([
        _part("POST", f"{dv.api}/accounts", f'{{"name":"Batch parent {tag}"}}', 1),
        _part("POST", "/api/data/v9.2/contacts",
              f'{{"lastname":"Batch child {tag}","parentcustomerid_account@odata.bind":"$1"}}', 2),
        _part("PATCH", "$1", '{"telephone1":"555-0199"}', 3),
    ], "changeset_ok")
    get = _part("GET", f"accounts?$select=name,telephone1&$filter=name%20eq%20'Batch%20parent%20{tag}'")
    r = dv.call("POST", "$batch", data=_batch([cs, get], "batch_ok").encode(),
                headers={"Content-Type": "multipart/mixed; boundary=batch_ok"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert _statuses(r.text) == [204, 204, 204, 200]
    assert "Content-ID: 2" in r.text and "changesetresponse_" in r.text
    row = dv.rows("accounts", {"$select": "name,telephone1", "$filter": f"name eq 'Batch parent {tag}'"})[0]
    assert row["telephone1"] == "555-0199"
    child = dv.rows("contacts", {"$select": "_parentcustomerid_value", "$filter": f"lastname eq 'Batch child {tag}'"})
    assert child[0]["_parentcustomerid_value"] == row["accountid"]

    bad = _changeset([
        _part("POST", "accounts", f'{{"name":"Atomic one {tag}"}}', 1),
        _part("POST", "contacts", f'{{"lastname":"{"x" * 60}"}}', 2),
    ], "changeset_bad")
    r = dv.call("POST", "$batch", data=_batch([bad], "batch_bad").encode(),
                headers={"Content-Type": 'multipart/mixed; boundary="batch_bad"'})
    assert r.status_code == 400 and _statuses(r.text) == [400]
    assert "0x80044331" in r.text
    assert dv.rows("accounts", {"$select": "name", "$filter": f"name eq 'Atomic one {tag}'"}) == []

    r = dv.call("POST", "$batch", data=_batch([_changeset([_part("PATCH", "$9", "{}", 1)], "cs")], "b").encode(),
                headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert r.status_code == 400 and "Content-ID Reference: '$9' does not exist in the batch context." in r.text


def test_batch_continue_on_error_lf_line_ends_and_limit(dv: Dv, tag: str) -> None:
    nl = "\n"
    parts = [
        _part("POST", "accounts", f'{{"name":"Continue one {tag}"}}', nl=nl),
        _part("POST", "accounts", '{"name": 5}', nl=nl),
        _part("POST", "accounts", f'{{"name":"Continue two {tag}"}}', nl=nl),
    ]
    body = _batch(parts, "batch_lf", nl).encode()
    r = dv.call("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=batch_lf"})
    assert r.status_code == 400 and _statuses(r.text) == [400]  # stops at the first failure
    assert len(dv.rows("accounts", {"$select": "name", "$filter": f"startswith(name,'Continue ')"
                                                                  f" and endswith(name,'{tag}')"})) == 1
    r = dv.call("POST", "$batch", data=body, headers={"Content-Type": "multipart/mixed; boundary=batch_lf",
                                                      "Prefer": "odata.continue-on-error"})
    assert r.status_code == 200 and _statuses(r.text) == [204, 400, 204]
    assert len(dv.rows("accounts", {"$select": "name", "$filter": f"startswith(name,'Continue ')"
                                                                  f" and endswith(name,'{tag}')"})) == 3

    many = _batch([_part("GET", "WhoAmI")] * 1001, "batch_big").encode()
    r = dv.call("POST", "$batch", data=many, headers={"Content-Type": "multipart/mixed; boundary=batch_big"})
    assert r.status_code == 400 and "limit of 1000" in error_of(r)[1]


def test_batch_upserts_by_alternate_key_create_then_update_and_a_failed_change_set_leaves_no_trace(
        dv: Dv, tag: str) -> None:
    """One batch, continue-on-error: the same key created then updated within a change set and again in a
    later one; a change set whose last part fails (If-Match mismatch) is rolled back whole, its earlier
    parts included; a change set after it still commits; the delta feed reports only what committed."""
    r = dv.get("accounts", params={"$select": "name,telephone1,versionnumber"},
               headers={"Prefer": "odata.track-changes"})
    delta = r.json().get("@odata.deltaLink")
    while "@odata.nextLink" in r.json():
        r = dv.get(r.json()["@odata.nextLink"], headers={"Prefer": "odata.track-changes"})
        delta = r.json().get("@odata.deltaLink", delta)
    key = f"accounts(accountnumber='BK-{tag}')"
    created = _changeset([
        _part("PATCH", key, f'{{"name":"Batch key {tag}","telephone1":"1"}}', 1),
        _part("PATCH", key, '{"telephone1":"2"}', 2),
        _part("PATCH", "$1", '{"websiteurl":"3"}', 3),
    ], "cs_one")
    updated = _changeset([_part("PATCH", key, '{"telephone1":"4"}', 4)], "cs_two")
    doomed = _changeset([
        _part("PATCH", f"accounts(accountnumber='GONE-{tag}')", f'{{"name":"Rolled back {tag}"}}', 5),
        _part("PATCH", key, '{"telephone1":"never"}', 6),
        _part("PATCH", key, '{"name":"stale"}', 7).replace("HTTP/1.1\r\n", 'HTTP/1.1\r\nIf-Match: W/"1"\r\n'),
    ], "cs_three")
    dup = _changeset([_part("PATCH", key, '{"name":"create only"}', 8)], "cs_four").replace(
        "HTTP/1.1\r\n", "HTTP/1.1\r\nIf-None-Match: *\r\n")
    after = _changeset([_part("PATCH", f"accounts(accountnumber='AFTER-{tag}')", f'{{"name":"After {tag}"}}', 9)],
                       "cs_five")
    r = dv.call("POST", "$batch", data=_batch([created, updated, doomed, dup, after], "batch_keys").encode(),
                headers={"Content-Type": "multipart/mixed; boundary=batch_keys", "Prefer": "odata.continue-on-error"})
    assert r.status_code == 200, r.text
    assert _statuses(r.text) == [204, 204, 204, 204, 412, 412, 204]
    assert "0x80060882" in r.text and "0x80040237" in r.text
    rows = dv.rows("accounts", {"$select": "name,telephone1,websiteurl,versionnumber",
                                "$filter": f"accountnumber eq 'BK-{tag}'"})
    assert len(rows) == 1
    assert (rows[0]["name"], rows[0]["telephone1"], rows[0]["websiteurl"]) == (f"Batch key {tag}", "4", "3")
    assert dv.rows("accounts", {"$select": "name", "$filter": f"accountnumber eq 'GONE-{tag}'"}) == []
    assert len(dv.rows("accounts", {"$select": "name", "$filter": f"accountnumber eq 'AFTER-{tag}'"})) == 1
    changed = [row for data in dv.pages(delta) for row in data["value"]]
    names = {row.get("name") for row in changed}
    assert {f"Batch key {tag}", f"After {tag}"} <= names and f"Rolled back {tag}" not in names
    mine = [row for row in changed if row.get("accountid") == rows[0]["accountid"]]
    assert len(mine) == 1 and mine[0]["telephone1"] == "4"
    assert int(mine[0]["versionnumber"]) == int(rows[0]["versionnumber"])


def test_batch_parser_finds_delimiters_only_at_line_starts() -> None:
    from bridgekit.emulator.dataverse.batch import BatchRequest, ChangeSet, parse_batch

    inner = _changeset([_part("POST", "accounts", '{"name":"a --b_x inside"}', 1, nl="\n")], "cs_x", nl="\n")
    text = (f"--b_x \t\r\n{_part('GET', '/org/api/data/v9.2/WhoAmI')}\r\n"
            f"--b_x\n{inner}\n--b_x--\r\nepilogue --b_x\r\n")
    parts = parse_batch(text.encode(), 'multipart/mixed; boundary="b_x"', "/org/api/data/v9.2")
    assert len(parts) == 2 and isinstance(parts[0], BatchRequest) and isinstance(parts[1], ChangeSet)
    assert (parts[0].method, parts[0].target) == ("GET", "WhoAmI")
    req = parts[1].requests[0]
    assert (req.method, req.target, req.body, req.content_id) == (
        "POST", "accounts", b'{"name":"a --b_x inside"}', "1")
    with pytest.raises(Exception, match="not terminated by its closing boundary"):
        parse_batch(b"--b_x\r\n" + _part("GET", "WhoAmI").encode(), "multipart/mixed; boundary=b_x", "/")


# -- Microsoft's own client ------------------------------------------------------------------------------


def test_powerplatform_dataverse_sdk_pages_and_creates(emulator: Any, dv: Dv, tag: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.identity import ClientSecretCredential
    from PowerPlatform.Dataverse.client import DataverseClient

    # The SDK sends requests through a plain requests.Session: point its CA bundle at the emulator's.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", emulator.ca_bundle)
    credential = ClientSecretCredential(emulator.tenant_id, emulator.secret_client_id, emulator.client_secret,
                                        authority=emulator.base_url, disable_instance_discovery=True,
                                        connection_verify=emulator.ca_bundle)
    with DataverseClient(emulator.dataverse_url, credential) as client:
        new_id = client.records.create("account", {"name": f"From the SDK {tag}", "numberofemployees": 12})
        uuid.UUID(new_id)
        seen: list[str] = []
        pages = 0
        for page in client.records.list_pages("contact", select=["fullname"], page_size=400):
            pages += 1
            seen += [row["contactid"] for row in page]
        assert pages >= 2 and len(seen) == len(set(seen)) == int(dv.get("contacts/$count").text)
    row = dv.get(f"accounts({new_id})", params={"$select": "name,numberofemployees"}).json()
    assert (row["name"], row["numberofemployees"]) == (f"From the SDK {tag}", 12)


def test_records_created_without_an_id_get_ascending_guids(dv: Dv, tag: str) -> None:
    """Dataverse assigns sequential GUIDs when the caller gives no id; the emulator's ids ascend too,
    whether the record comes from a POST, an upsert by alternate key or a $batch part."""
    ids = []
    for i in range(3):
        r = dv.call("POST", "accounts", json={"name": f"Seq {tag} {i}"})
        assert r.status_code == 204, r.text
        ids.append(re.search(r"\(([0-9a-f-]{36})\)", r.headers["OData-EntityId"]).group(1))  # type: ignore[union-attr]
    r = dv.call("PATCH", f"accounts(accountnumber='SEQ-{tag}')", json={"name": f"Seq {tag} upsert"})
    assert r.status_code == 204, r.text
    ids.append(dv.rows("accounts", {"$select": "accountid", "$filter": f"accountnumber eq 'SEQ-{tag}'"})[0]["accountid"])
    body = _batch([_changeset([_part("POST", "accounts", f'{{"name":"Seq {tag} batch {i}"}}', i + 1)
                               for i in range(2)], "cs_seq")], "batch_seq")
    r = dv.call("POST", "$batch", data=body.encode(), headers={"Content-Type": "multipart/mixed; boundary=batch_seq"})
    assert r.status_code == 200 and _statuses(r.text) == [204, 204], r.text
    ids += re.findall(r"OData-EntityId: \S+accounts\(([0-9a-f-]{36})\)", r.text)
    assert len(ids) == 6 and len(set(ids)) == 6
    assert ids == sorted(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)


def test_a_batch_part_that_breaks_unexpectedly_answers_500_and_only_its_change_set_is_undone(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (an emulator bug cannot be provoked over HTTP): a part raising an unexpected error gets
    a 500 of its own, its change set is rolled back, and the change sets around it commit, as the
    service's change sets are independent transactions."""
    from bridgekit.emulator.context import EmulatorContext
    from bridgekit.emulator.dataverse.api import DataverseService, DvRequest
    from bridgekit.emulator.dataverse.common import Prefer
    from bridgekit.emulator.dataverse.write import Caller

    ctx = EmulatorContext(tmp_path, port=1)
    svc = DataverseService(ctx)
    real = svc.writer.create

    def create(table: Any, values: dict[str, Any], caller: Any, **kw: Any) -> Any:
        if values.get("name") == "breaks":
            raise RuntimeError("an emulator bug")
        return real(table, values, caller, **kw)

    monkeypatch.setattr(svc.writer, "create", create)
    body = _batch([_changeset([_part("POST", "accounts", '{"name":"first"}', 1)], "cs1"),
                   _changeset([_part("POST", "accounts", '{"name":"before"}', 2),
                               _part("POST", "accounts", '{"name":"breaks"}', 3)], "cs2"),
                   _changeset([_part("POST", "accounts", '{"name":"after"}', 4)], "cs3")], "b1")

    def send(prefer: Prefer) -> Any:
        return svc.batch(DvRequest("POST", "$batch", [], {"content-type": "multipart/mixed; boundary=b1"}, prefer,
                                   body.encode(), "https://127.0.0.1:1/org/api/data/v9.2", caller=Caller("u1")))

    reply = send(Prefer(continue_on_error=True))
    assert reply.status == 200 and _statuses(reply.body.decode()) == [204, 500, 204]
    assert "0x80040216" in reply.body.decode()
    names = sorted(r.load()["name"] for r in ctx.store.query("account"))
    assert names == ["after", "first"]
    reply = send(Prefer())  # without continue-on-error the batch stops at the failing change set
    assert reply.status == 500 and _statuses(reply.body.decode()) == [500]
    assert sorted(r.load()["name"] for r in ctx.store.query("account")) == ["after", "first", "first"]
