"""The emulator's Microsoft Graph v1.0 over HTTPS: paging, query options, delta, JSON $batch, auth.

Tests read with plain requests (and once with Microsoft's msgraph-sdk) against the session emulator.
Tests that need exact changes write their own records into the emulator's store file (the state the
server serves) and remove them afterwards; one test runs the live activity generator while paging.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from bridgekit.emulator.store import Store

# -- helpers -------------------------------------------------------------------------------------------

class Graph:
    """A tiny Graph caller over the emulator's HTTPS with the emulator CA."""

    def __init__(self, emulator: Any, token: str | None = None) -> None:
        self.emulator = emulator
        self.session = emulator.session()
        self.base = emulator.graph_url + "/v1.0"
        self.token = token or emulator.token("graph")

    def call(self, method: str, url: str, *, headers: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        if not url.startswith("https://"):
            url = f"{self.base}/{url.lstrip('/')}"
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        return self.session.request(method, url, headers=hdrs, timeout=60, **kw)

    def get(self, url: str, **kw: Any) -> requests.Response:
        return self.call("GET", url, **kw)

    def ok(self, url: str, **kw: Any) -> dict[str, Any]:
        resp = self.get(url, **kw)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def drain(self, url: str, **kw: Any) -> tuple[list[dict[str, Any]], str | None, int]:
        """Follow nextLinks: (items, deltaLink, pages)."""
        items: list[dict[str, Any]] = []
        pages = 0
        link: str | None = url
        while link:
            page = self.ok(link, **kw)
            pages += 1
            items += page["value"]
            if "@odata.deltaLink" in page:
                assert "@odata.nextLink" not in page
                return items, page["@odata.deltaLink"], pages
            link = page.get("@odata.nextLink")
        return items, None, pages


def _store(emulator: Any) -> Store:
    # The server and this process share the SQLite file; writes here are what a tenant change looks like.
    return Store(Path(emulator.home) / "store.sqlite")


def _error(resp: requests.Response) -> dict[str, Any]:
    body = resp.json()
    err = body["error"]
    assert set(err["innerError"]) >= {"date", "request-id", "client-request-id"}
    return err


def _removed(items: list[dict[str, Any]]) -> dict[str, str]:
    return {i["id"]: i["@removed"]["reason"] for i in items if "@removed" in i}


def _present(items: list[dict[str, Any]]) -> set[str]:
    return {i["id"] for i in items if "@removed" not in i}


def _new_user(tag: str) -> tuple[str, dict[str, Any]]:
    uid = str(uuid.uuid4())
    return uid, {"id": uid, "displayName": f"Test {tag}", "givenName": "Test", "surname": tag,
                 "userPrincipalName": f"test.{tag}.{uid[:8]}@alpineridge.example", "mail": None,
                 "accountEnabled": True, "jobTitle": "Tester", "businessPhones": []}


@pytest.fixture(scope="module")
def graph(emulator: Any) -> Graph:
    return Graph(emulator)


@pytest.fixture(scope="module")
def mailbox(graph: Graph) -> str:
    """A user id whose inbox has messages (the synthetic company's mail)."""
    for user in graph.ok("users?$top=999&$select=id")["value"]:
        if graph.ok(f"users/{user['id']}/mailFolders/inbox/messages?$top=1")["value"]:
            return str(user["id"])
    raise AssertionError("the synthetic company has no mail")


def _app_token(emulator: Any, roles: list[str]) -> str:
    """A client-credentials token for a fresh app registration holding only ``roles`` on Graph."""
    secret = "s~" + uuid.uuid4().hex
    app = emulator.admin("apps", {"name": "graph-test", "secret": secret, "roles": {"graph": roles}})
    resp = emulator.session().post(f"{emulator.authority}/oauth2/v2.0/token", timeout=30, data={
        "grant_type": "client_credentials", "client_id": app["client_id"], "client_secret": secret,
        "scope": f"{emulator.graph_url}/.default"})
    resp.raise_for_status()
    return str(resp.json()["access_token"])


# -- collections, paging and query options ----------------------------------------------------------

def test_users_page_with_documented_limits_and_default_properties(graph):
    page = graph.ok("users")
    assert page["@odata.context"] == f"{graph.base}/$metadata#users"
    assert 0 < len(page["value"]) <= 100
    first = page["value"][0]
    assert set(first) == {"businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone",
                          "officeLocation", "preferredLanguage", "surname", "userPrincipalName", "id"}
    assert not any(k.startswith("@emu") for k in first)

    resp = graph.get("users?$top=1000")
    assert resp.status_code == 400
    assert _error(resp)["message"] == "Invalid page size specified: '1000'. Must be between 1 and 999 inclusive."
    assert resp.headers["request-id"] == _error(resp)["innerError"]["request-id"]
    assert graph.get("users?$top=999").status_code == 200

    # client-request-id is echoed back.
    resp = graph.get("users?$top=1", headers={"client-request-id": "abc-123"})
    assert resp.headers["client-request-id"] == "abc-123"


def test_users_pages_cover_the_tenant_with_opaque_skiptokens(graph):
    everyone = {u["id"] for u in graph.ok("users?$top=999&$select=id")["value"]}
    items, delta, pages = graph.drain("users?$top=7&$select=id,displayName")
    ids = [u["id"] for u in items]
    assert delta is None
    assert pages == -(-len(everyone) // 7)
    assert len(ids) == len(set(ids)) and set(ids) == everyone
    assert set(items[0]) == {"id", "displayName"}
    # The nextLink carries the query in its opaque token; an altered token is refused.
    link = graph.ok("users?$top=7")["@odata.nextLink"]
    assert set(parse_qs(urlsplit(link).query)) == {"$skiptoken"}
    resp = graph.get(link[:-3] + ("abc" if not link.endswith("abc") else "xyz"))
    assert resp.status_code == 400


def test_filter_select_orderby_and_documented_refusals(graph):
    users = graph.ok("users?$top=999&$select=id,displayName,userPrincipalName,accountEnabled")["value"]
    target = users[3]
    hit = graph.ok(f"users?$filter=userPrincipalName eq '{target['userPrincipalName'].upper()}'")["value"]
    assert [u["id"] for u in hit] == [target["id"]]
    prefix = target["displayName"][:2]
    hit = graph.ok(f"users?$filter=startswith(displayName,'{prefix}') and accountEnabled eq true&$select=id")
    expected = {u["id"] for u in users if u["displayName"].lower().startswith(prefix.lower()) and u["accountEnabled"]}
    assert {u["id"] for u in hit["value"]} == expected
    assert hit["@odata.context"].endswith("#users(id)")

    ordered = graph.ok("users?$orderby=displayName&$select=displayName&$top=999")["value"]
    names = [u["displayName"] for u in ordered]
    assert names == sorted(names)

    # Unknown property and ne without an advanced query are refused as Graph does; lambdas on a
    # multi-valued property are served (issue #17).
    resp = graph.get("users?$filter=shoeSize eq 4")
    assert resp.status_code == 400 and "shoeSize" in _error(resp)["message"]
    phone = graph.ok("users?$top=1&$select=businessPhones")["value"][0]["businessPhones"][0]
    by_phone = graph.ok("users?$select=businessPhones&$filter="
                        + quote(f"businessPhones/any(p:p eq '{phone}')"))["value"]
    assert by_phone and all(phone in u["businessPhones"] for u in by_phone)
    resp = graph.get("users?$filter=displayName ne 'x'")
    assert resp.status_code == 400 and _error(resp)["code"] == "Request_UnsupportedQuery"
    advanced = graph.ok("users?$filter=displayName ne 'x'&$count=true", headers={"ConsistencyLevel": "eventual"})
    assert advanced["@odata.count"] == len(users)
    resp = graph.get("users?$select=shoeSize")
    assert resp.status_code == 400
    resp = graph.get("users?$skip=5")
    assert resp.status_code == 400


def test_count_and_search_need_consistency_level_eventual(graph):
    total = len(graph.ok("users?$top=999&$select=id")["value"])
    resp = graph.get("users/$count")
    assert resp.status_code == 400
    resp = graph.get("users/$count", headers={"ConsistencyLevel": "eventual"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert int(resp.text) == total
    resp = graph.get('users?$search="displayName:a"')
    assert resp.status_code == 400
    assert _error(resp)["message"].startswith("Request with $search query parameter only works through MSGraph")
    found = graph.ok('users?$search="displayName:a"&$select=displayName', headers={"ConsistencyLevel": "eventual"})
    assert found["value"] and all("a" in u["displayName"].lower() for u in found["value"])


def test_user_by_id_or_upn_and_me_with_an_app_token(graph):
    user = graph.ok("users?$top=1&$select=id,userPrincipalName")["value"][0]
    by_id = graph.ok(f"users/{user['id']}")
    by_upn = graph.ok(f"users/{user['userPrincipalName']}")
    assert by_id["id"] == by_upn["id"] == user["id"]
    assert by_id["@odata.context"].endswith("$metadata#users/$entity")
    resp = graph.get(f"users/{uuid.uuid4()}")
    assert resp.status_code == 404 and _error(resp)["code"] == "Request_ResourceNotFound"
    resp = graph.get("me")
    assert resp.status_code == 400
    assert _error(resp)["message"] == "/me request is only valid with delegated authentication flow."
    resp = graph.get("users/nonsense/segment")
    assert resp.status_code == 400


def test_groups_and_members(graph):
    groups = graph.ok("groups?$select=id,displayName")["value"]
    assert groups
    gid = groups[0]["id"]
    members, _, _ = graph.drain(f"groups/{gid}/members?$top=3")
    assert members and all(m["@odata.type"] == "#microsoft.graph.user" for m in members)
    count = graph.get(f"groups/{gid}/members/$count", headers={"ConsistencyLevel": "eventual"})
    assert int(count.text) == len(members)


def test_mailbox_messages_are_per_user_per_folder_and_newest_first(graph, mailbox):
    inbox, _, _ = graph.drain(f"users/{mailbox}/mailFolders/inbox/messages?$top=50&$select=receivedDateTime")
    sent, _, _ = graph.drain(f"users/{mailbox}/mailFolders/SentItems/messages?$top=50&$select=id")
    every, _, _ = graph.drain(f"users/{mailbox}/messages?$top=50&$select=id")
    assert {m["id"] for m in inbox} | {m["id"] for m in sent} == {m["id"] for m in every}
    assert not {m["id"] for m in inbox} & {m["id"] for m in sent}
    stamps = [m["receivedDateTime"] for m in inbox]
    assert stamps == sorted(stamps, reverse=True)
    assert set(inbox[0]) >= {"id", "receivedDateTime"} and "subject" not in inbox[0]
    first = graph.ok(f"users/{mailbox}/messages")
    assert len(first["value"]) == min(10, len(every))  # Outlook's default page size
    folders = graph.ok(f"users/{mailbox}/mailFolders")["value"]
    inbox_folder = next(f for f in folders if f["displayName"] == "Inbox")
    assert inbox_folder["totalItemCount"] == len(inbox)
    by_id, _, _ = graph.drain(f"users/{mailbox}/mailFolders/{inbox_folder['id']}/messages?$top=100&$select=id")
    assert {m["id"] for m in by_id} == {m["id"] for m in inbox}
    resp = graph.get(f"users/{mailbox}/messages?$top=1001")
    assert resp.status_code == 400
    resp = graph.get(f"users/{uuid.uuid4()}/messages")
    assert resp.status_code == 404 and _error(resp)["code"] == "ErrorInvalidUser"


def test_calendar_view_needs_its_window_and_returns_overlapping_events(graph, mailbox):
    resp = graph.get(f"users/{mailbox}/calendarView")
    assert resp.status_code == 400 and _error(resp)["code"] == "ErrorInvalidParameter"
    events, _, _ = graph.drain(f"users/{mailbox}/events?$top=100&$select=start,end")
    assert events
    start = min(e["start"]["dateTime"] for e in events)[:19]
    end = max(e["end"]["dateTime"] for e in events)[:19]
    view, _, _ = graph.drain(f"users/{mailbox}/calendarView?startDateTime={start}Z&endDateTime={end}Z&$top=3")
    assert {e["id"] for e in view} == {e["id"] for e in events}
    contacts = graph.ok(f"users/{mailbox}/contacts")
    assert contacts["@odata.context"].endswith(f"users('{mailbox}')/contacts")


# -- paging while the tenant changes ------------------------------------------------------------------

def _page_while(graph: Graph, url: str, change: Any) -> tuple[list[str], set[str], set[str]]:
    """Page ``url`` while ``change()`` runs in a loop; returns (ids seen, ids before, ids after)."""
    def snapshot() -> set[str]:
        return {i["id"] for i in graph.drain(url.replace("$top=5", "$top=999").replace("$top=10", "$top=1000"))[0]}

    before = snapshot()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                change()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        seen: list[str] = []
        link: str | None = url
        while link:
            page = graph.ok(link)
            seen += [i["id"] for i in page["value"]]
            link = page.get("@odata.nextLink")
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    return seen, before, snapshot()


def test_paging_sees_each_record_exactly_once_while_activity_runs(emulator, graph, mailbox):
    def mutate() -> None:
        emulator.admin("mutate", {"creates": 3, "updates": 6, "deletes": 2})

    seen, before, after = _page_while(graph, "users?$top=5&$select=id", mutate)
    assert len(seen) == len(set(seen)), "a user was served twice"
    assert (before & after) <= set(seen), "a user that existed throughout was skipped"

    seen, before, after = _page_while(graph, f"users/{mailbox}/mailFolders/inbox/messages?$top=10&$select=id",
                                      mutate)
    assert len(seen) == len(set(seen)), "a message was served twice"
    assert (before & after) <= set(seen), "a message that existed throughout was skipped"


def test_paging_is_exact_under_direct_churn_of_the_same_collection(emulator, graph):
    store = _store(emulator)
    made: list[str] = []

    def churn() -> None:
        uid, rec = _new_user("churn")
        store.put("graph.users", uid, rec)
        made.append(uid)
        if len(made) > 3:
            store.delete("graph.users", made[-4])
        time.sleep(0.005)

    try:
        seen, before, after = _page_while(graph, "users?$top=5&$select=id", churn)
        assert len(seen) == len(set(seen))
        assert (before & after) <= set(seen)
    finally:
        store.delete_many("graph.users", made)


# -- delta ---------------------------------------------------------------------------------------------

def test_users_delta_reports_exactly_the_changes_since_the_last_round(emulator, graph):
    store = _store(emulator)
    a, rec_a = _new_user("a")
    b, rec_b = _new_user("b")
    store.put_many("graph.users", [(a, rec_a), (b, rec_b)])
    try:
        items, delta, pages = graph.drain("users/delta?$select=displayName,jobTitle",
                                          headers={"Prefer": "odata.maxpagesize=9"})
        assert pages > 1 and delta
        assert {a, b} <= _present(items) and set(items[0]) == {"displayName", "jobTitle", "id"}
        first = graph.ok("users/delta?$select=displayName")
        assert first["@odata.context"] == f"{graph.base}/$metadata#users(displayName)"

        # Nothing changed: an empty round with a fresh deltaLink.
        quiet, delta, _ = graph.drain(delta)
        assert quiet == [] and delta

        c, rec_c = _new_user("c")
        store.put("graph.users", c, rec_c)
        store.put("graph.users", a, {**rec_a, "jobTitle": "Lead tester"})
        store.delete("graph.users", b)
        changes, delta, _ = graph.drain(delta)
        assert _present(changes) == {a, c}
        assert _removed(changes) == {b: "changed"}  # directory deletes are soft: reason "changed"
        changed_a = next(i for i in changes if i["id"] == a)
        assert changed_a == {"id": a, "displayName": "Test a", "jobTitle": "Lead tester"}
        again, _, _ = graph.drain(delta)
        assert again == []
    finally:
        store.delete_many("graph.users", [a, b, locals().get("c", "")])


def test_delta_after_activity_reports_exactly_what_activity_changed(emulator, graph):
    """One activity burst; every delta feed reports exactly the ids the generator says it touched."""
    users = [u["id"] for u in graph.ok("users?$top=999&$select=id")["value"]]

    def inbox(uid: str) -> set[str]:
        return {m["id"] for m in graph.drain(f"users/{uid}/mailFolders/inbox/messages?$top=1000&$select=id")[0]}

    user_link = graph.drain("users/delta")[1]
    group_link = graph.drain("groups/delta?$select=displayName,members")[1]
    inbox_links = {uid: graph.drain(f"users/{uid}/mailFolders/inbox/messages/delta?$select=id")[1]
                   for uid in users}
    inbox_before = {uid: inbox(uid) for uid in users}
    visible_before = {u["id"]: u for u in graph.drain("users?$top=999&$select=id,jobTitle,mobilePhone,"
                                                      "officeLocation,department")[0]}

    result = emulator.admin("mutate", {"creates": 20, "updates": 40, "deletes": 15})["result"]

    def ids(kind: str, coll: str) -> set[str]:
        return set(result[kind].get(coll, []))

    items = graph.drain(user_link)[0]
    assert _present(items) == ids("created", "graph.users") | ids("updated", "graph.users")
    assert set(_removed(items)) == ids("deleted", "graph.users")
    visible_after = {u["id"]: u for u in graph.drain("users?$top=999&$select=id,jobTitle,mobilePhone,"
                                                     "officeLocation,department")[0]}
    assert {i for i in visible_after if visible_after[i] != visible_before.get(i)} <= _present(items)

    items = graph.drain(group_link)[0]
    assert _present(items) == ids("created", "graph.groups") | ids("updated", "graph.groups")
    assert all("members@delta" in i for i in items if "@removed" not in i)

    mail_up = ids("created", "graph.messages") | ids("updated", "graph.messages")
    mail_gone = ids("deleted", "graph.messages")
    touched = 0
    for uid, link in inbox_links.items():
        items = graph.drain(link)[0]
        assert _present(items) == mail_up & inbox(uid), uid
        assert set(_removed(items)) == mail_gone & inbox_before[uid], uid
        touched += bool(items)
    assert touched, "the activity burst touched no inbox"


def test_groups_delta_reports_member_additions_and_removals(emulator, graph):
    store = _store(emulator)
    users = [u["id"] for u in graph.ok("users?$top=5&$select=id")["value"]]
    gid = str(uuid.uuid4())
    group = {"id": gid, "displayName": "Delta test group", "description": None, "mailEnabled": False,
             "securityEnabled": True, "groupTypes": [], "@emu.members": users[:3]}
    store.put("graph.groups", gid, group)
    try:
        items, delta, _ = graph.drain("groups/delta?$select=displayName,members")
        mine = next(i for i in items if i["id"] == gid)
        assert [m["id"] for m in mine["members@delta"]] == users[:3]
        assert all(m["@odata.type"] == "#microsoft.graph.user" for m in mine["members@delta"])

        store.put("graph.groups", gid, {**group, "@emu.members": [users[0], users[2], users[3]]})
        items, delta, _ = graph.drain(delta)
        assert [i["id"] for i in items] == [gid]
        members = items[0]["members@delta"]
        assert {m["id"] for m in members if "@removed" not in m} == {users[3]}
        assert {m["id"]: m["@removed"]["reason"] for m in members if "@removed" in m} == {users[1]: "deleted"}

        store.delete("graph.groups", gid)
        items, _, _ = graph.drain(delta)
        assert _removed(items) == {gid: "changed"}
    finally:
        store.delete("graph.groups", gid)


def test_directory_delta_pages_hold_at_most_200_objects(emulator, graph):
    # However large a page is asked for, the directory answers at most 200 objects and says so.
    for resource in ("users", "groups"):
        r = graph.get(f"{resource}/delta?$select=id", headers={"Prefer": "odata.maxpagesize=999"})
        assert r.status_code == 200
        assert r.headers["Preference-Applied"] == "odata.maxpagesize=200"
        assert len(r.json()["value"]) <= 200
    r = graph.get("users/delta?$select=id", headers={"Prefer": "odata.maxpagesize=2"})
    assert r.headers["Preference-Applied"] == "odata.maxpagesize=2" and len(r.json()["value"]) == 2


def test_message_delta_is_per_folder(emulator, graph, mailbox):
    store = _store(emulator)
    _, inbox_link, _ = graph.drain(f"users/{mailbox}/mailFolders/inbox/messages/delta?$select=subject",
                                   headers={"Prefer": "odata.maxpagesize=25"})
    _, sent_link, _ = graph.drain(f"users/{mailbox}/mailFolders/sentitems/messages/delta?$select=subject")
    inbox = graph.ok(f"users/{mailbox}/mailFolders/inbox/messages?$top=3&$select=id")["value"]
    edited, deleted = inbox[0]["id"], inbox[1]["id"]
    rec = store.get("graph.messages", edited).load()
    new_id = "AAMkTEST" + uuid.uuid4().hex
    store.put("graph.messages", edited, {**rec, "isRead": not rec.get("isRead"), "subject": "edited"})
    store.delete("graph.messages", deleted)
    store.put("graph.messages", new_id, {**rec, "id": new_id, "@emu.folder": "sentitems", "subject": "new sent"})
    try:
        items, _, _ = graph.drain(inbox_link)
        assert [(i["id"], i.get("subject")) for i in items if "@removed" not in i] == [(edited, "edited")]
        assert _removed(items) == {deleted: "deleted"}
        assert all(i["@odata.type"] == "#microsoft.graph.message" for i in items if "@removed" in i)
        items, _, _ = graph.drain(sent_link)
        assert [i["id"] for i in items] == [new_id]
    finally:
        store.delete("graph.messages", new_id)


def test_calendar_view_delta_keeps_its_window(emulator, graph, mailbox):
    store = _store(emulator)
    resp = graph.get(f"users/{mailbox}/calendarView/delta")
    assert resp.status_code == 400
    window = "startDateTime=2030-01-01T00:00:00Z&endDateTime=2030-02-01T00:00:00Z"
    inside, outside = "AAMkEVT" + uuid.uuid4().hex, "AAMkEVT" + uuid.uuid4().hex

    def event(eid: str, day: str) -> dict[str, Any]:
        return {"id": eid, "subject": f"event {day}", "@emu.user": mailbox,
                "start": {"dateTime": f"{day}T10:00:00.0000000", "timeZone": "UTC"},
                "end": {"dateTime": f"{day}T11:00:00.0000000", "timeZone": "UTC"}}

    store.put("graph.events", inside, event(inside, "2030-01-10"))
    store.put("graph.events", outside, event(outside, "2030-03-10"))
    try:
        items, delta, _ = graph.drain(f"users/{mailbox}/calendarView/delta?{window}")
        assert _present(items) == {inside}
        store.put("graph.events", inside, event(inside, "2030-01-11"))
        items, delta, _ = graph.drain(delta)
        assert _present(items) == {inside}
        # Moving an event out of the window reports it as removed (documented behaviour).
        store.put("graph.events", inside, event(inside, "2030-04-01"))
        store.delete("graph.events", outside)
        items, _, _ = graph.drain(delta)
        assert _removed(items) == {inside: "deleted", outside: "deleted"}
    finally:
        store.delete_many("graph.events", [inside, outside])


def test_deltatoken_latest_starts_from_now(emulator, graph):
    page = graph.ok("users/delta?$deltatoken=latest")
    assert page["value"] == [] and "@odata.deltaLink" in page
    store = _store(emulator)
    uid, rec = _new_user("latest")
    store.put("graph.users", uid, rec)
    try:
        items, _, _ = graph.drain(page["@odata.deltaLink"])
        assert _present(items) == {uid}
    finally:
        store.delete("graph.users", uid)


def test_expired_and_reset_delta_tokens(emulator, graph):
    _, delta, _ = graph.drain("users/delta?$select=displayName")
    with emulator.settings(delta_token_max_age_s=0):
        time.sleep(1.1)
        resp = graph.get(delta)
        assert resp.status_code == 400 and _error(resp)["code"] == "syncStateNotFound"
    with emulator.faults(force_delta_expiry=True):
        resp = graph.get(delta, allow_redirects=False)
        assert resp.status_code == 410
        assert _error(resp)["code"] == "resyncRequired"
        location = resp.headers["Location"]
        assert location.startswith(f"{graph.base}/users/delta?") and location.endswith("$deltatoken=")
    # Following Location starts a full resync with the original query options.
    items, fresh, _ = graph.drain(location)
    assert items and set(items[0]) == {"displayName", "id"} and fresh
    resp = graph.get(f"{graph.base}/users/delta?$deltatoken=not-a-token")
    assert resp.status_code == 400 and _error(resp)["code"] == "syncStateNotFound"
    resp = graph.get("users/delta?$top=5")
    assert resp.status_code == 400 and _error(resp)["code"] == "Request_UnsupportedQuery"


# -- $batch ---------------------------------------------------------------------------------------------

def test_batch_runs_items_with_the_outer_token_and_dependencies(graph):
    user = graph.ok("users?$top=1&$select=id")["value"][0]["id"]
    body = {"requests": [
        {"id": "1", "method": "GET", "url": f"/users/{user}?$select=id"},
        {"id": "2", "method": "GET", "url": "users?$top=2&$select=id", "dependsOn": ["1"]},
        {"id": "3", "method": "GET", "url": f"/users/{uuid.uuid4()}"},
        {"id": "4", "method": "GET", "url": "/groups?$top=1", "dependsOn": ["3"]},
        {"id": "5", "method": "GET", "url": "/users/$count", "headers": {"ConsistencyLevel": "eventual"}},
    ]}
    resp = graph.call("POST", "$batch", json=body)
    assert resp.status_code == 200
    by_id = {r["id"]: r for r in resp.json()["responses"]}
    assert set(by_id) == {"1", "2", "3", "4", "5"}
    assert by_id["1"]["status"] == 200 and by_id["1"]["body"]["id"] == user
    assert by_id["2"]["status"] == 200 and len(by_id["2"]["body"]["value"]) == 2
    assert "@odata.nextLink" in by_id["2"]["body"]
    assert by_id["3"]["status"] == 404 and by_id["3"]["body"]["error"]["code"] == "Request_ResourceNotFound"
    assert by_id["4"]["status"] == 424
    assert by_id["5"]["status"] == 200
    order = [r["id"] for r in resp.json()["responses"]]
    assert order.index("1") < order.index("2")


def test_batch_limits_and_malformed_payloads(graph):
    twenty_one = {"requests": [{"id": str(i), "method": "GET", "url": "/users?$top=1"} for i in range(21)]}
    resp = graph.call("POST", "$batch", json=twenty_one)
    assert resp.status_code == 400 and "20" in _error(resp)["message"]
    twenty = {"requests": twenty_one["requests"][:20]}
    assert graph.call("POST", "$batch", json=twenty).status_code == 200
    dup = {"requests": [{"id": "a", "method": "GET", "url": "/users"}, {"id": "A", "method": "GET", "url": "/groups"}]}
    assert graph.call("POST", "$batch", json=dup).status_code == 400
    unknown = {"requests": [{"id": "1", "method": "GET", "url": "/users", "dependsOn": ["9"]}]}
    assert graph.call("POST", "$batch", json=unknown).status_code == 400
    assert graph.call("POST", "$batch", data=b"not json", headers={"Content-Type": "application/json"}).status_code == 400


def test_batch_items_are_authorised_like_direct_calls(emulator):
    mail_only = Graph(emulator, _app_token(emulator, ["Mail.Read"]))
    resp = mail_only.call("POST", "$batch", json={"requests": [{"id": "1", "method": "GET", "url": "/users"}]})
    assert resp.status_code == 200
    item = resp.json()["responses"][0]
    assert item["status"] == 403 and item["body"]["error"]["code"] == "Authorization_RequestDenied"
    resp = Graph(emulator, "not-a-token").call("POST", "$batch", json={"requests": []})
    assert resp.status_code == 401


def test_throttled_batch_items_are_429_inside_a_200_batch(emulator, graph):
    body = {"requests": [{"id": str(i), "method": "GET", "url": "/users?$top=1&$select=id"} for i in range(5)]}
    # The outer POST rolls the dice too: a throttled batch is answered 429 as a whole, so try again.
    statuses: set[int] = set()
    with emulator.faults(throttle_rate=0.5, retry_after_s=2, services=["graph"], seed=7):
        for _ in range(20):
            resp = graph.call("POST", "$batch", json=body)
            if resp.status_code != 200:
                assert resp.status_code == 429
                continue
            for item in resp.json()["responses"]:
                statuses.add(item["status"])
                if item["status"] == 429:
                    assert item["headers"]["Retry-After"] == "2"
                    assert item["body"]["error"]["code"] == "TooManyRequests"
            if statuses >= {200, 429}:
                break
    assert statuses >= {200, 429}


# -- auth -----------------------------------------------------------------------------------------------

def test_missing_wrong_audience_and_insufficient_roles(emulator, graph, mailbox):
    resp = emulator.session().get(f"{graph.base}/users", timeout=30)
    assert resp.status_code == 401
    err = _error(resp)
    assert err["code"] == "InvalidAuthenticationToken" and err["message"] == "Access token is empty."
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")

    dataverse = Graph(emulator, emulator.token("dataverse"))
    resp = dataverse.get("users")
    assert resp.status_code == 401 and _error(resp)["code"] == "InvalidAuthenticationToken"

    mail_only = Graph(emulator, _app_token(emulator, ["Mail.Read"]))
    resp = mail_only.get("users")
    assert resp.status_code == 403 and _error(resp)["code"] == "Authorization_RequestDenied"
    assert _error(resp)["message"] == "Insufficient privileges to complete the operation."
    resp = mail_only.get("groups")
    assert resp.status_code == 403
    resp = mail_only.get(f"users/{mailbox}/events")
    assert resp.status_code == 403 and _error(resp)["code"] == "ErrorAccessDenied"
    assert mail_only.get(f"users/{mailbox}/messages?$top=1").status_code == 200

    members_only = Graph(emulator, _app_token(emulator, ["GroupMember.Read.All"]))
    gid = graph.ok("groups?$top=1&$select=id")["value"][0]["id"]
    assert members_only.get(f"groups/{gid}/members").status_code == 200


# -- Microsoft's Graph SDK ----------------------------------------------------------------------------

def test_msgraph_sdk_pages_users_and_runs_a_delta_round(emulator, graph):
    import httpx
    from azure.identity import ClientSecretCredential
    from kiota_authentication_azure.azure_identity_authentication_provider import (
        AzureIdentityAuthenticationProvider,
    )
    from msgraph import GraphRequestAdapter, GraphServiceClient
    from msgraph.generated.users.delta.delta_request_builder import DeltaRequestBuilder
    from msgraph.generated.users.users_request_builder import UsersRequestBuilder
    from msgraph_core import GraphClientFactory

    host = urlsplit(emulator.base_url).hostname
    credential = ClientSecretCredential(
        emulator.tenant_id, emulator.secret_client_id, emulator.client_secret,
        authority=emulator.authority_host, disable_instance_discovery=True, connection_verify=emulator.ca_bundle)
    auth = AzureIdentityAuthenticationProvider(credential, scopes=[f"{emulator.graph_url}/.default"],
                                               allowed_hosts=[host])
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=emulator.ca_bundle)))
    adapter = GraphRequestAdapter(auth, http)
    adapter.base_url = f"{emulator.graph_url}/v1.0"
    client = GraphServiceClient(request_adapter=adapter)
    expected = {u["id"] for u in graph.ok("users?$top=999&$select=id")["value"]}

    async def run() -> tuple[list[str], list[str], str | None]:
        config = UsersRequestBuilder.UsersRequestBuilderGetRequestConfiguration(
            query_parameters=UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(top=9, select=["id"]))
        page = await client.users.get(request_configuration=config)
        paged: list[str] = []
        while page is not None:
            paged += [u.id for u in page.value or []]
            page = await client.users.with_url(page.odata_next_link).get() if page.odata_next_link else None
        dconf = DeltaRequestBuilder.DeltaRequestBuilderGetRequestConfiguration(
            query_parameters=DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(select=["displayName"]))
        dpage = await client.users.delta.get(request_configuration=dconf)
        delta_ids: list[str] = []
        while dpage is not None:
            delta_ids += [u.id for u in dpage.value or []]
            if dpage.odata_next_link:
                dpage = await client.users.delta.with_url(dpage.odata_next_link).get()
            else:
                return paged, delta_ids, dpage.odata_delta_link
        return paged, delta_ids, None

    paged, delta_ids, delta_link = asyncio.run(run())
    assert len(paged) == len(set(paged)) and set(paged) == expected
    assert set(delta_ids) == expected and delta_link
    assert graph.drain(delta_link)[0] == []
