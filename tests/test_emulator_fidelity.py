"""Where the emulator used to be lenient or silently wrong (issues #17 and #14), checked over raw HTTPS:
every case asserts the values a client gets, not only the status."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
import requests


class Api:
    def __init__(self, emulator: Any, audience: str) -> None:
        self.s = emulator.session()
        self.auth = emulator.headers(audience)
        self.root = (f"{emulator.dataverse_url}/api/data/v9.2" if audience == "dataverse"
                     else f"{emulator.graph_url}/v1.0")

    def call(self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        url = path if path.startswith("https://") else f"{self.root}/{path}"
        return self.s.request(method, url, headers={**self.auth, "Accept": "application/json", **(headers or {})},
                              timeout=60, **kw)

    def ok(self, path: str, **kw: Any) -> Any:
        r = self.call("GET", path, **kw)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def dv(emulator: Any) -> Api:
    return Api(emulator, "dataverse")


@pytest.fixture(scope="module")
def graph(emulator: Any) -> Api:
    return Api(emulator, "graph")


def _error(r: requests.Response) -> tuple[int, str, str]:
    err = r.json()["error"]
    return r.status_code, err["code"], err["message"]


# -- Dataverse: wrong answers and the paging bug -----------------------------------------------------------


def test_sql_and_saved_queries_are_refused_instead_of_returning_the_whole_table(dv: Api) -> None:
    for param in ("sql=SELECT TOP 5 name FROM account", "savedQuery=00000000-0000-0000-0000-000000000001"):
        status, code, message = _error(dv.call("GET", f"accounts?{param}&$top=5"))
        assert (status, code) == (400, "0x80060888") and param.split("=")[0] in message


@pytest.mark.parametrize("orderby", ["accountid asc", "modifiedon asc,accountid asc", "accountid desc",
                                     "name desc,accountid asc"])
def test_paging_with_the_primary_key_in_orderby_follows_its_own_next_links(dv: Api, orderby: str) -> None:
    everything = [r["accountid"] for r in dv.ok(f"accounts?$select=accountid&$orderby={orderby}")["value"]]
    seen: list[str] = []
    url: str | None = f"accounts?$select=accountid&$orderby={orderby}"
    pages = 0
    while url:
        data = dv.ok(url, headers={"Prefer": "odata.maxpagesize=70"})
        seen += [r["accountid"] for r in data["value"]]
        url = data.get("@odata.nextLink")
        pages += 1
    assert pages == -(-len(everything) // 70) >= 3
    assert seen == everything and len(set(seen)) == len(seen)
    if orderby.startswith("accountid"):
        assert seen == sorted(seen, reverse=orderby.endswith("desc"))


def test_filter_compares_strings_holding_a_nul_whole(dv: Api) -> None:
    tag = uuid.uuid4().hex[:8]
    for name in (f"before{tag}\u0000after", f"before{tag}"):
        r = dv.call("POST", "accounts", json={"name": name})
        assert r.status_code == 204, r.text

    def names(flt: str) -> list[str]:
        return sorted(x["name"] for x in dv.ok("accounts", params={"$select": "name", "$filter": flt})["value"])

    assert names(f"name eq 'before{tag}'") == [f"before{tag}"]
    assert names(f"name eq 'before{tag}\u0000after'") == [f"before{tag}\u0000after"]
    assert names(f"endswith(name,'{tag}\u0000after')") == [f"before{tag}\u0000after"]
    assert names(f"endswith(name,'after') and startswith(name,'before{tag}')") == [f"before{tag}\u0000after"]
    assert names(f"startswith(name,'before{tag}') and name ne 'before{tag}'") == [f"before{tag}\u0000after"]


def _batch(lines: list[str]) -> tuple[bytes, str]:
    body = "".join(f"--b1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{line}\r\n"
                   "Accept: application/json\r\n\r\n" for line in lines) + "--b1--\r\n"
    return body.encode(), "multipart/mixed; boundary=b1"


def test_batch_request_lines_are_read_like_the_services_odata_library(dv: Api, emulator: Any) -> None:
    api = f"{emulator.dataverse_url}/api/data/v9.2"
    body, ctype = _batch([f"GET {api}/EntityDefinitions?$select=LogicalName&$filter=LogicalName eq 'contact' HTTP/1.1"])
    r = dv.call("POST", "$batch", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert "HTTP/1.1 200 OK" in r.text and '"LogicalName":"contact"' in r.text and '"account"' not in r.text
    body, ctype = _batch([f"GET {api}/accounts?$top=1"])
    status, code, message = _error(dv.call("POST", "$batch", data=body, headers={"Content-Type": ctype}))
    assert (status, code) == (400, "0x80060888") and "HTTP/1.1" in message


# -- Dataverse: FetchXML -----------------------------------------------------------------------------------

ANNOTATIONS = 'odata.include-annotations="Microsoft.Dynamics.CRM.fetchxmlpagingcookie,Microsoft.Dynamics.CRM.morerecords"'


def _fetch(dv: Api, entity_set: str, xml: str, **headers: str) -> requests.Response:
    return dv.call("GET", f"{entity_set}?fetchXml={quote(xml, safe='')}", headers=headers)


def test_fetchxml_filters_orders_and_pages_with_the_paging_cookie(dv: Api) -> None:
    expected = dv.ok("accounts", params={"$select": "name,numberofemployees", "$filter": "numberofemployees gt 100",
                                         "$orderby": "numberofemployees desc,accountid asc"})["value"]
    assert len(expected) > 40
    xml = ('<fetch count="20"{paging}><entity name="account"><attribute name="name" />'
           '<attribute name="numberofemployees" /><filter><condition attribute="numberofemployees" operator="gt" '
           'value="100" /></filter><order attribute="numberofemployees" descending="true" />'
           '<order attribute="accountid" /></entity></fetch>')
    seen: list[dict[str, Any]] = []
    paging = ""
    for _ in range(100):
        r = _fetch(dv, "accounts", xml.format(paging=paging), Prefer=ANNOTATIONS)
        assert r.status_code == 200, r.text
        data = r.json()
        seen += data["value"]
        if not data["@Microsoft.Dynamics.CRM.morerecords"]:
            assert "@Microsoft.Dynamics.CRM.fetchxmlpagingcookie" not in data
            break
        cookie = data["@Microsoft.Dynamics.CRM.fetchxmlpagingcookie"]
        assert cookie.startswith("<cookie pagenumber=") and "pagingcookie=" in cookie
        page = int(cookie.split('pagenumber="')[1].split('"')[0])
        inner = requests.utils.unquote(requests.utils.unquote(cookie.split('pagingcookie="')[1].split('"')[0]))
        paging = f' page="{page}" paging-cookie="{inner.replace(chr(34), "&quot;").replace("<", "&lt;")}"'
    assert [(r["accountid"], r["name"], r["numberofemployees"]) for r in seen] == \
        [(r["accountid"], r["name"], r["numberofemployees"]) for r in expected]


def test_fetchxml_link_entity_inner_and_outer(dv: Api) -> None:
    inner = _fetch(dv, "contacts", '<fetch><entity name="contact"><attribute name="fullname" />'
                   '<link-entity name="account" from="accountid" to="parentcustomerid" alias="acct">'
                   '<attribute name="name" /></link-entity></entity></fetch>').json()["value"]
    with_parent = dv.ok("contacts", params={"$select": "fullname", "$expand": "parentcustomerid_account($select=name)",
                                            "$filter": "_parentcustomerid_value ne null"})["value"]
    by_id = {c["contactid"]: c["parentcustomerid_account"] for c in with_parent}
    expected = {cid: acc["name"] for cid, acc in by_id.items() if acc is not None}
    assert {r["contactid"]: r["acct.name"] for r in inner} == expected
    outer = _fetch(dv, "contacts", '<fetch><entity name="contact"><attribute name="fullname" />'
                   '<link-entity name="account" from="accountid" to="parentcustomerid" alias="acct" '
                   'link-type="outer"><attribute name="name" /></link-entity></entity></fetch>').json()["value"]
    assert len(outer) == len(dv.ok("contacts", params={"$select": "contactid"})["value"]) > len(inner)
    assert sum(r["acct.name"] is None for r in outer) == len(outer) - len(inner)


def test_fetchxml_aggregates_match_the_rows(dv: Api) -> None:
    rows = dv.ok("opportunities", params={"$select": "estimatedvalue,statecode"})["value"]
    r = _fetch(dv, "opportunities", '<fetch aggregate="true"><entity name="opportunity">'
               '<attribute name="statecode" groupby="true" alias="state" />'
               '<attribute name="opportunityid" aggregate="count" alias="n" />'
               '<attribute name="estimatedvalue" aggregate="sum" alias="total" />'
               '<attribute name="estimatedvalue" aggregate="max" alias="top" /></entity></fetch>')
    assert r.status_code == 200, r.text
    got = {g["state"]: (g["n"], round(g["total"] or 0, 2), g["top"]) for g in r.json()["value"]}
    want: dict[int, tuple[int, float, Any]] = {}
    for row in rows:
        n, total, top = want.get(row["statecode"], (0, 0.0, None))
        value = row["estimatedvalue"]
        want[row["statecode"]] = (n + 1, total + (value or 0),
                                  value if top is None or (value is not None and value > top) else top)
    assert got == {k: (n, round(t, 2), top) for k, (n, t, top) in want.items()}


def test_fetchxml_that_the_emulator_does_not_serve_is_refused(dv: Api) -> None:
    for xml, words in (('<fetch><entity name="account"><attribute name="nosuch" /></entity></fetch>', "nosuch"),
                       ('<fetch><entity name="account"><filter><condition attribute="name" operator="above" '
                        'value="x" /></filter></entity></fetch>', "above"),
                       ("<fetch><entity name='account'>", "well-formed")):
        r = _fetch(dv, "accounts", xml)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


# -- Dataverse: query functions and BulkDelete's neighbours -------------------------------------------------


def test_query_functions_select_by_date(dv: Api) -> None:
    tag = uuid.uuid4().hex[:8]
    for days in (0, 3, 40):
        r = dv.call("POST", "tasks", json={"subject": f"QF {tag} {days}",
                                           "scheduledend": (datetime.now(UTC) - timedelta(days=days)).strftime(
                                               "%Y-%m-%dT%H:%M:%SZ")})
        assert r.status_code == 204, r.text

    def subjects(fn: str) -> list[str]:
        flt = f"startswith(subject,'QF {tag}') and Microsoft.Dynamics.CRM.{fn}"
        return sorted(x["subject"].rsplit(" ", 1)[1] for x in dv.ok("tasks", params={"$select": "subject",
                                                                                    "$filter": flt})["value"])

    assert subjects("Today(PropertyName='scheduledend')") == ["0"]
    assert subjects("LastXDays(PropertyName='scheduledend',PropertyValue=7)") == ["0", "3"]
    assert subjects("OlderThanXDays(PropertyName='scheduledend',PropertyValue=30)") == ["40"]
    day = (datetime.now(UTC) - timedelta(days=3)).date().isoformat()
    assert subjects(f"On(PropertyName='scheduledend',PropertyValue='{day}')") == ["3"]
    this_month = subjects("ThisMonth(PropertyName='scheduledend')")
    assert "0" in this_month and "40" not in this_month
    assert subjects(f"In(PropertyName='subject',PropertyValues=['QF {tag} 3','QF {tag} 40'])") == ["3", "40"]
    status, code, message = _error(dv.call("GET", "tasks", params={
        "$filter": "Microsoft.Dynamics.CRM.Above(PropertyName='activityid',PropertyValue='x')"}))
    assert (status, code) == (400, "0x80060888") and "not supported by the emulator" in message


def test_relationship_and_global_option_set_definitions(dv: Api) -> None:
    one = dv.ok("RelationshipDefinitions(SchemaName='contact_customer_accounts')")
    assert (one["ReferencedEntity"], one["ReferencingEntity"], one["ReferencingAttribute"]) == \
        ("account", "contact", "parentcustomerid")
    nn = dv.ok("RelationshipDefinitions", params={
        "$filter": "RelationshipType eq Microsoft.Dynamics.CRM.RelationshipType'ManyToManyRelationship'",
        "$select": "SchemaName"})["value"]
    assert [r["SchemaName"] for r in nn] == ["teammembership_association"]
    sets = dv.ok("GlobalOptionSetDefinitions")["value"]
    timeframe = next(s for s in sets if s["Name"] == "purchasetimeframe")
    labels = {o["Value"]: o["Label"]["UserLocalizedLabel"]["Label"] for o in timeframe["Options"]}
    assert labels[0] == "Immediate" and labels[4] == "Unknown"
    assert dv.ok("GlobalOptionSetDefinitions(Name='purchasetimeframe')")["MetadataId"] == timeframe["MetadataId"]


# -- Dataverse: lambdas, collection-valued $expand and $apply ----------------------------------------------

LOOKUP_TYPES = 'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"'
FORMATTED = "OData.Community.Display.V1.FormattedValue"


def _children(dv: Api, entity_set: str, lookup: str, parent: str, select: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of ``entity_set`` by the id of the ``parent`` table record their ``lookup`` points at."""
    rows = dv.ok(entity_set, params={"$select": f"{select},{lookup}"}, headers={"Prefer": LOOKUP_TYPES})["value"]
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(lookup) and row.get(f"{lookup}@Microsoft.Dynamics.CRM.lookuplogicalname") == parent:
            out.setdefault(row[lookup], []).append(row)
    return out


def test_lambda_operators_over_collection_valued_navigation_properties(dv: Api) -> None:
    accounts = {a["accountid"] for a in dv.ok("accounts", params={"$select": "accountid"})["value"]}
    contacts = {a: cs for a, cs in _children(dv, "contacts", "_parentcustomerid_value", "account",
                                             "fullname,statecode,emailaddress1").items() if a in accounts}  # no orphans

    def ids(flt: str) -> set[str]:
        return {a["accountid"] for a in dv.ok("accounts", params={"$select": "accountid", "$filter": flt})["value"]}

    name = next(iter(contacts.values()))[0]["fullname"]
    assert ids(f"contact_customer_accounts/any(c:c/fullname eq '{name.replace(chr(39), chr(39) * 2)}')") == \
        {a for a, cs in contacts.items() if any(c["fullname"].lower() == name.lower() for c in cs)}
    assert ids("contact_customer_accounts/any()") == set(contacts) and 0 < len(contacts) < len(accounts)
    all_with_email = {a for a in accounts if all(c["emailaddress1"] is not None for c in contacts.get(a, []))}
    assert ids("contact_customer_accounts/all(c:c/emailaddress1 ne null)") == all_with_email != accounts
    assert ids("not contact_customer_accounts/any() and startswith(name,'a')") == \
        ids("startswith(name,'a')") - set(contacts)
    # Nested: accounts with a contact that has an open task regarding it.
    tasks = _children(dv, "tasks", "_regardingobjectid_value", "contact", "statecode")
    open_task = {cid for cid, ts in tasks.items() if any(t["statecode"] == 0 for t in ts)}
    assert ids("contact_customer_accounts/any(c:c/Contact_Tasks/any(t:t/statecode eq 0))") == \
        {a for a, cs in contacts.items() if any(c["contactid"] in open_task for c in cs)}
    # The doc's own examples: every task closed; an open task whose subject holds a word.
    account_tasks = {a: ts for a, ts in _children(dv, "tasks", "_regardingobjectid_value", "account",
                                                  "statecode,subject").items() if a in accounts}
    assert ids("Account_Tasks/all(t:t/statecode eq 1)") == \
        {a for a in accounts if all(t["statecode"] == 1 for t in account_tasks.get(a, []))} != accounts
    word = next(t["subject"] for ts in account_tasks.values() for t in ts if t["subject"]).split()[-1]
    assert ids(f"Account_Tasks/any(t:contains(t/subject,'{word.replace(chr(39), chr(39) * 2)}') and t/statecode eq 0)") \
        == {a for a, ts in account_tasks.items()
            if any(word.lower() in (t["subject"] or "").lower() and t["statecode"] == 0 for t in ts)}
    for flt, words in (("primarycontactid/any(c:c/fullname eq 'x')", "collection-valued"),
                       ("contact_customer_accounts/any(c:name eq 'x')", "not supported by the emulator"),
                       ("nosuch/any(c:c/fullname eq 'x')", "Could not find a property named 'nosuch'")):
        status, code, message = _error(dv.call("GET", "accounts", params={"$filter": flt}))
        assert (status, code) == (400, "0x80060888") and words in message, flt


def test_collection_valued_expand_nests_rows_with_their_own_options(dv: Api, emulator: Any) -> None:
    contacts = _children(dv, "contacts", "_parentcustomerid_value", "account", "fullname,statecode")
    inner = "$select=fullname;$filter=statecode eq 0;$orderby=fullname desc;$top=2"
    # Accounts with active contacts and accounts without any (other tests add accounts of their own, so the
    # first page of accounts need not hold both kinds).
    def among(ids: list[str]) -> str:
        return ("Microsoft.Dynamics.CRM.In(PropertyName='accountid',PropertyValues=["
                + ",".join(f"'{a}'" for a in ids) + "])")

    parents = sorted(a for a, cs in contacts.items() if any(c["statecode"] == 0 for c in cs))[:20]
    existing = [a["accountid"] for a in dv.ok("accounts", params={"$select": "accountid",
                                                                  "$filter": among(parents)})["value"]]
    every = [a["accountid"] for a in dv.ok("accounts", params={"$select": "accountid"})["value"]]
    chosen = existing[:4] + [a for a in every if a not in contacts][:4]
    in_chosen = among(chosen)
    data = dv.ok("accounts", params={"$select": "name", "$filter": in_chosen,
                                     "$expand": f"contact_customer_accounts({inner})"},
                 headers={"Prefer": "odata.maxpagesize=60"})
    assert sorted(a["accountid"] for a in data["value"]) == sorted(chosen)
    assert data["@odata.context"].endswith("/$metadata#accounts(name,contact_customer_accounts(fullname))")
    root = f"{emulator.dataverse_url}/api/data/v9.2"
    with_children = 0
    for account in data["value"]:
        aid = account["accountid"]
        want = sorted((c["fullname"] for c in contacts.get(aid, []) if c["statecode"] == 0),
                      key=str.lower, reverse=True)[:2]
        got = account["contact_customer_accounts"]
        assert [c["fullname"] for c in got] == want, aid
        assert all(set(c) == {"@odata.etag", "fullname", "_parentcustomerid_value", "contactid"}
                   and c["_parentcustomerid_value"] == aid for c in got)
        link = account["contact_customer_accounts@odata.nextLink"]
        assert link == (f"{root}/accounts({aid})/contact_customer_accounts?$select=fullname&"
                        "$filter=statecode%20eq%200&$orderby=fullname%20desc&$top=2")
        with_children += bool(got)
        if len(contacts.get(aid, [])) > 1 and with_children < 4:
            # The link is the filtered collection: the same rows again.
            assert [c["fullname"] for c in dv.ok(link)["value"]] == want
    assert 0 < with_children < len(data["value"])
    # Without options every related row comes back, and the filtered collection pages like an entity set.
    aid = max(contacts, key=lambda a: len(contacts[a]))
    one = dv.ok(f"accounts({aid})", params={"$select": "name", "$expand": "contact_customer_accounts"})
    assert sorted(c["contactid"] for c in one["contact_customer_accounts"]) == \
        sorted(c["contactid"] for c in contacts[aid])
    assert one["contact_customer_accounts@odata.nextLink"] == f"{root}/accounts({aid})/contact_customer_accounts"
    seen: list[str] = []
    url: str | None = f"accounts({aid})/contact_customer_accounts?$select=fullname"
    while url:
        page = dv.ok(url, headers={"Prefer": "odata.maxpagesize=1"})
        seen += [c["contactid"] for c in page["value"]]
        url = page.get("@odata.nextLink")
        assert url is None or url.startswith(f"{root}/accounts({aid})/contact_customer_accounts?")
    assert sorted(seen) == sorted(c["contactid"] for c in contacts[aid]) and len(seen) > 1
    csdl = dv.call("GET", "$metadata").text
    assert '<NavigationProperty Name="contact_customer_accounts" Type="Collection(mscrm.contact)" />' in csdl
    for path, words in (("accounts?$expand=contact_customer_accounts/$ref", "only supported on lookup type"),
                        ("accounts?$expand=contact_customer_accounts($expand=owninguser)", "nested $expand"),
                        ("accounts?$expand=contact_customer_accounts($skip=1)", "'$skip' is not supported"),
                        ("systemusers?$expand=teammembership_association", "many-to-many")):
        status, code, message = _error(dv.call("GET", path))
        assert (status, code) == (400, "0x80060888") and words in message, path


def test_apply_aggregates_and_groups_like_the_service(dv: Api) -> None:
    rows = dv.ok("accounts", params={"$select": "statuscode,statecode,industrycode,revenue,numberofemployees"})["value"]
    data = dv.ok("accounts", params={"$apply": "aggregate(revenue with sum as total,numberofemployees with max as most,"
                                               "numberofemployees with min as least,revenue with average as mean,"
                                               "industrycode with countdistinct as industries,$count as n)"})
    assert data["@odata.context"].endswith("/$metadata#accounts")
    revenue = [r["revenue"] for r in rows if r["revenue"] is not None]
    staff = [r["numberofemployees"] for r in rows if r["numberofemployees"] is not None]
    assert data["value"] == [{"total": pytest.approx(sum(revenue)), "most": max(staff), "least": min(staff),
                              "mean": pytest.approx(sum(revenue) / len(revenue)),
                              "industries": len({r["industrycode"] for r in rows} - {None}), "n": len(rows)}]
    grouped = dv.ok("accounts", params={"$apply": "groupby((statuscode),aggregate($count as count))"},
                    headers={"Prefer": f'odata.include-annotations="{FORMATTED}"'})["value"]
    counts = Counter(r["statuscode"] for r in rows)
    assert [(g["statuscode"], g["count"]) for g in grouped] == sorted(counts.items())
    assert grouped[0][f"statuscode@{FORMATTED}"] == "Active" and grouped[0][f"count@{FORMATTED}"] == \
        f"{grouped[0]['count']:,}"
    # Distinct combinations; null group values are left out of a row, as the service does.
    pairs = dv.ok("accounts", params={"$apply": "groupby((statecode,industrycode))"})["value"]
    assert sorted((p["statecode"], p.get("industrycode", -1)) for p in pairs) == \
        sorted({(r["statecode"], -1 if r["industrycode"] is None else r["industrycode"]) for r in rows})
    # filter() first, then grouping on a related table's column (named <table>_<column>).
    big = dv.ok("accounts", params={"$select": "name", "$filter": "numberofemployees gt 100",
                                    "$expand": "primarycontactid($select=fullname)"})["value"]
    related = dv.ok("accounts", params={
        "$apply": "filter(numberofemployees gt 100)/groupby((primarycontactid/fullname),aggregate($count as n))",
        "$orderby": "primarycontactid/fullname desc"})["value"]
    want = Counter((a["primarycontactid"] or {}).get("fullname") for a in big)
    assert {g.get("contact_fullname"): g["n"] for g in related} == dict(want)
    named = [g["contact_fullname"] for g in related if "contact_fullname" in g]
    assert named == sorted(named, key=str.lower, reverse=True)
    top = dv.ok("accounts", params={"$apply": "groupby((statuscode))", "$top": "1"})["value"]
    assert top == [{"statuscode": min(counts)}]
    for apply, extra, words in (
            ("compute(revenue mul 2 as double)", {}, "'compute' is not supported"),
            ("topcount(5,revenue)", {}, "'topcount' is not supported"),
            ("groupby((createdon))", {}, "datetime"),
            ("aggregate(name with sum as s)", {}, "numeric"),
            ("aggregate(revenue with median as m)", {}, "'median'"),
            ("groupby((statuscode))/filter(statuscode eq 1)", {}, "after groupby"),
            ("groupby((statuscode),aggregate($count as n))", {"$orderby": "n desc"}, "SingleValueOpenPropertyAccess"),
            ("groupby((statuscode))", {"$filter": "statuscode eq 1"}, "together with $apply"),
            ("groupby((nosuch))", {}, "'nosuch'")):
        status, code, message = _error(dv.call("GET", "accounts", params={"$apply": apply, **extra}))
        assert (status, code) == (400, "0x80060888") and words in message, apply


# -- Graph ------------------------------------------------------------------------------------------------


def test_graph_single_objects_refuse_options_they_do_not_serve(graph: Api) -> None:
    user = graph.ok("users?$top=1&$select=id")["value"][0]["id"]
    group = graph.ok("groups?$top=1&$select=id")["value"][0]["id"]
    for path in (f"users/{user}?$selct=id", f"users/{user}?$expand=members", f"groups/{group}?$filter=id eq 'x'",
                 f"groups/{group}?$expand=owners"):
        status, code, _ = _error(graph.call("GET", path))
        assert (status, code) == (400, "Request_BadRequest"), path


def test_graph_lambda_and_in_filters(graph: Api) -> None:
    groups = graph.ok("groups?$select=displayName,groupTypes&$top=999")["value"]
    unified = graph.ok("groups?$filter=groupTypes/any(c:c eq 'Unified')&$select=displayName")["value"]
    assert sorted(g["displayName"] for g in unified) == \
        sorted(g["displayName"] for g in groups if "Unified" in g["groupTypes"])
    assert 0 < len(unified) < len(groups)
    some = [g["id"] for g in graph.ok("groups?$select=id")["value"][:2]]
    found = graph.ok(f"groups?$filter=id in ('{some[0]}','{some[1]}')&$select=id")["value"]
    assert sorted(g["id"] for g in found) == sorted(some)


def test_graph_manager_member_of_and_expand(graph: Api) -> None:
    users = graph.ok("users?$top=999&$expand=manager($select=id)&$select=id,jobTitle")["value"]
    reps = [u for u in users if u.get("manager")]
    assert reps and all("Sales Manager" in (graph.ok(f"users/{u['manager']['id']}?$select=jobTitle")["jobTitle"])
                        for u in reps[:3])
    alone = next(u for u in users if not u.get("manager"))
    status, code, _ = _error(graph.call("GET", f"users/{alone['id']}/manager"))
    assert (status, code) == (404, "Request_ResourceNotFound")
    rep = reps[0]["id"]
    member_of = {g["id"] for g in graph.ok(f"users/{rep}/memberOf")["value"]}
    groups = graph.ok("groups?$select=id")["value"]
    assert member_of == {g["id"] for g in groups
                         if rep in {m["id"] for m in graph.ok(f"groups/{g['id']}/members?$top=999")["value"]}}
    expanded = graph.ok("groups?$expand=members($select=id)&$select=id")["value"]
    assert member_of >= {g["id"] for g in expanded if rep in {m["id"] for m in g["members"]}}
    assert max(len(g["members"]) for g in expanded) == 20  # Graph expands at most 20 directory objects
    casted = graph.ok(f"users/{rep}/memberOf/microsoft.graph.group?$select=displayName")
    assert len(casted["value"]) == len(member_of) and casted["@odata.context"].endswith("#groups(displayName)")


def test_graph_writes_without_a_write_permission_get_403(graph: Api) -> None:
    user = graph.ok("users?$top=1&$select=id")["value"][0]["id"]
    group = graph.ok("groups?$top=1&$select=id")["value"][0]["id"]
    cases = [("PATCH", f"users/{user}", "Authorization_RequestDenied"),
             ("POST", f"groups/{group}/members/$ref", "Authorization_RequestDenied"),
             ("DELETE", f"groups/{group}", "Authorization_RequestDenied"),
             ("POST", f"users/{user}/messages", "ErrorAccessDenied")]
    for method, path, code in cases:
        r = graph.call(method, path, json={"displayName": "x"})
        assert _error(r)[:2] == (403, code), (method, path, r.text)


def test_emulator_description_says_how_to_turn_off_instance_discovery(emulator: Any,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from bridgekit.emulator.cli import _describe
    from bridgekit.emulator.process import EmulatorInfo

    fields = set(EmulatorInfo.__dataclass_fields__)
    _describe(EmulatorInfo(**{k: v for k, v in emulator.to_dict().items() if k in fields}))
    out = capsys.readouterr().out
    assert "instance_discovery=False" in out and "disable_instance_discovery=True" in out
    assert "allowed_hosts" in out and emulator.base_url in out
