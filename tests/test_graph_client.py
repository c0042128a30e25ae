"""GraphClient: recorded delta/batch payloads parse as documented; against the emulator, reads and batches survive faults."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bridgekit.config import Profile
from bridgekit.errors import NotFoundError, ResyncRequired
from bridgekit.graph import GraphClient, GraphRequest, max_page_size
from bridgekit.http import Governor, RetryPolicy, ServiceSession

PAYLOADS = Path(__file__).parent / "payloads"


def _load(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


class RecordedSession(ServiceSession):
    """A ServiceSession whose network is a list of recorded (status, headers, body) answers."""

    def __init__(self, answers: list[tuple[int, dict[str, str], Any]]) -> None:
        self.now = 0.0
        super().__init__("https://graph.microsoft.com/v1.0", service="graph", sleep=self._sleep_for,
                         governor=Governor(2, sleep=self._sleep_for, clock=lambda: self.now))
        self.answers = answers
        self.sent: list[tuple[str, str, Any]] = []
        self.session.send = self._send  # type: ignore[method-assign]
        self.session.auth = None

    def _sleep_for(self, seconds: float) -> None:
        self.now += seconds  # time passes only when the client waits

    def _send(self, prepared: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        body = json.loads(prepared.body) if prepared.body else None
        self.sent.append((str(prepared.method), str(prepared.url), body))
        status, headers, payload = self.answers.pop(0)
        r = requests.Response()
        r.status_code = status
        r.headers.update({"Content-Type": "application/json", **headers})
        r._content = json.dumps(payload).encode()
        r.request = prepared
        r.url = str(prepared.url)
        return r


def _client(answers: list[tuple[int, dict[str, str], Any]]) -> tuple[GraphClient, RecordedSession]:
    session = RecordedSession(answers)
    return GraphClient(Profile(name="t", auth="client_secret"), session), session


def test_page_size_maxima() -> None:
    assert max_page_size("users") == 999
    assert max_page_size("users/abc/mailFolders/inbox/messages") == 1000
    assert max_page_size("directoryRoles") is None


def test_delta_separates_removed_items_and_keeps_member_changes() -> None:
    graph, session = _client([(200, {}, _load("graph_users_page.json") | {"@odata.nextLink": None}),
                              (200, {}, _load("graph_users_delta_last.json")),
                              (200, {}, _load("graph_groups_delta.json"))])
    # First round: a page without a deltaLink, then the last page.
    session.answers[0] = (200, {}, {**_load("graph_users_page.json"),
                                    "@odata.nextLink": "https://graph.microsoft.com/v1.0/users/delta?$skiptoken=x"})
    pages = list(graph.users_delta(select=["displayName"]))
    assert [len(p.items) for p in pages] == [2, 1]
    assert pages[-1].removed[0].id == "2e6b4d2f-0000-4000-8000-00000000dead"
    assert pages[-1].removed[0].reason == "changed"
    assert pages[-1].delta_link and pages[0].delta_link is None
    assert session.sent[0][1].endswith("/users/delta?$select=displayName")
    groups = list(graph.groups_delta())
    assert groups[0].removed[0].reason == "deleted"
    members = groups[0].items[0]["members@delta"]
    assert [m.get("@removed", {}).get("reason") for m in members] == [None, "deleted"]
    assert "members" in session.sent[-1][1]


@pytest.mark.parametrize(("status", "payload"), [(400, "graph_error_sync_state.json"), (410, None)])
def test_expired_or_reset_delta_token_raises_resync_required(status: int, payload: str | None) -> None:
    body = _load(payload) if payload else {"error": {"code": "resyncRequired", "message": "reset"}}
    graph, _ = _client([(status, {"Location": "https://graph.microsoft.com/v1.0/users/delta?$deltatoken="}, body)])
    with pytest.raises(ResyncRequired):
        list(graph.delta_changes("https://graph.microsoft.com/v1.0/users/delta?$deltatoken=old"))


def test_batch_retries_throttled_items_and_their_dependents_and_keeps_input_order() -> None:
    first = _load("graph_batch_response.json")  # id 2 throttled, id 3 failed because of it, id 1 fine
    second = {"responses": [{"id": "3", "status": 204, "body": None}, {"id": "2", "status": 201, "body": {"id": "n"}}]}
    graph, session = _client([(200, {}, first), (200, {}, second)])
    reqs = [GraphRequest("1", "GET", "/users/87d349ed-44d7-43e1-9a83-5f2406dee5bd"),
            GraphRequest("2", "POST", "/groups", body={"displayName": "x"}),
            GraphRequest("3", "PATCH", "/groups/x", body={"description": "y"}, depends_on=["2"])]
    results = graph.batch(reqs)
    assert [r.id for r in results] == ["1", "2", "3"]
    assert [r.status for r in results] == [200, 201, 204]
    resent = session.sent[1][2]["requests"]
    assert [r["id"] for r in resent] == ["2", "3"]
    assert resent[1]["dependsOn"] == ["2"]
    assert resent[0]["headers"]["Content-Type"] == "application/json"
    assert graph.session.governor.throttle_count == 1  # the sub-response's Retry-After paused the client


def test_batch_rejects_duplicate_ids() -> None:
    graph, _ = _client([])
    with pytest.raises(ValueError):
        graph.batch([GraphRequest("a", "GET", "/me"), GraphRequest("A", "GET", "/me")])


# -- against the emulator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph(emulator: Any) -> Iterator[GraphClient]:
    profile = Profile(name="emulator-test", auth="certificate", tenant_id=emulator.tenant_id,
                      client_id=emulator.client_id, certificate_path=emulator.certificate_path,
                      dataverse_url=emulator.dataverse_url, graph_url=emulator.graph_url,
                      authority_host=emulator.authority_host, ca_bundle=emulator.ca_bundle)
    client = GraphClient(profile)
    client.session.policy = RetryPolicy(max_attempts=12, max_total_wait=120, backoff_base=0.05, backoff_cap=0.5)
    yield client
    client.session.close()


def test_paged_read_returns_every_user_once_under_faults(graph: GraphClient, emulator: Any) -> None:
    expected = sorted(u["id"] for u in graph.items("users", select=["id"]))
    assert len(expected) > 7
    throttled_before = graph.session.governor.throttle_count
    with emulator.faults(throttle_rate=0.3, error_5xx_rate=0.05, retry_after_s=0, services=["graph"], seed=7):
        pages = list(graph.users(select=["id", "displayName"], top=7))
    assert graph.session.governor.throttle_count > throttled_before  # the faults were there
    got = [u["id"] for p in pages for u in p.value]
    assert len(pages) > 1
    assert sorted(got) == expected  # every user exactly once


def test_delta_round_trip_and_forced_expiry(graph: GraphClient, emulator: Any) -> None:
    pages = list(graph.users_delta(select=["displayName", "mail"]))
    assert pages[-1].delta_link
    assert sum(len(p.items) for p in pages) == len(list(graph.items("users", select=["id"])))
    assert all(not p.removed for p in pages)
    again = list(graph.delta_changes(pages[-1].delta_link))
    assert again[-1].delta_link
    with emulator.faults(force_delta_expiry=True), pytest.raises(ResyncRequired) as info:
        list(graph.delta_changes(pages[-1].delta_link))
    assert "bridgekit reloads" in info.value.hint


def test_batch_under_throttling_answers_every_request(graph: GraphClient, emulator: Any) -> None:
    users = [u["id"] for u in graph.items("users", select=["id"])][:25]
    reqs = [GraphRequest(f"r{i}", "GET", f"/users/{uid}?$select=id") for i, uid in enumerate(users)]
    reqs.append(GraphRequest("missing", "GET", "/users/00000000-0000-0000-0000-000000000000"))
    with emulator.faults(throttle_rate=0.3, retry_after_s=0, services=["graph"], seed=11):
        results = graph.batch(reqs, max_rounds=12)
    assert [r.id for r in results] == [r.id for r in reqs]
    assert [r.body["id"] for r in results[:-1]] == users
    assert results[-1].status == 404 and isinstance(results[-1].error, NotFoundError)
