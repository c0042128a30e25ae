"""Injected faults and service-protection limits on the emulator's Dataverse and Graph prefixes."""

from __future__ import annotations

import threading
import time

import pytest
import requests


def _whoami(emulator, session, **kw):
    return session.get(f"{emulator.dataverse_url}/api/data/v9.2/WhoAmI", headers=emulator.headers("dataverse"),
                       timeout=60, **kw)


def _graph_users(emulator, session):
    return session.get(f"{emulator.graph_url}/v1.0/users?$top=1", headers=emulator.headers("graph"), timeout=60)


def test_dataverse_responses_carry_rate_limit_headers(emulator, ca_session):
    resp = _whoami(emulator, ca_session)
    assert resp.status_code == 200, resp.text
    burst = int(resp.headers["x-ms-ratelimit-burst-remaining-xrm-requests"])
    assert 0 <= burst < 6000
    assert int(resp.headers["x-ms-ratelimit-time-remaining-xrm-requests"]) > 0
    assert int(_whoami(emulator, ca_session).headers["x-ms-ratelimit-burst-remaining-xrm-requests"]) < burst


def test_dataverse_request_count_limit_answers_429_with_documented_code(emulator, ca_session):
    with emulator.settings(dataverse_requests_per_window=3, dataverse_window_s=300):
        assert [_whoami(emulator, ca_session).status_code for _ in range(3)] == [200, 200, 200]
        resp = _whoami(emulator, ca_session)
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "0x80072322"
        assert "limit of 3 over time window of 300 seconds" in resp.json()["error"]["message"]
        retry_after = resp.headers["Retry-After"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 300
        # Limits are per caller: an anonymous caller (counted by IP) is not affected.
        anon = ca_session.get(f"{emulator.dataverse_url}/api/data/v9.2/WhoAmI", timeout=30)
        assert anon.status_code == 401
    assert _whoami(emulator, ca_session).status_code == 200


def test_dataverse_batch_counts_as_one_request(emulator, ca_session):
    boundary = "batch_bk"
    parts = "".join(
        f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        f"GET {emulator.dataverse_url}/api/data/v9.2/WhoAmI HTTP/1.1\r\nAccept: application/json\r\n\r\n"
        for _ in range(3))
    body = parts + f"--{boundary}--\r\n"
    headers = {**emulator.headers("dataverse"), "Content-Type": f"multipart/mixed; boundary={boundary}"}
    with emulator.settings(dataverse_requests_per_window=2):
        batch = ca_session.post(f"{emulator.dataverse_url}/api/data/v9.2/$batch", data=body, headers=headers,
                                timeout=60)
        assert batch.status_code != 429
        assert batch.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] == "1"
        assert _whoami(emulator, ca_session).status_code == 200
        assert _whoami(emulator, ca_session).status_code == 429


def test_dataverse_execution_time_limit(emulator, ca_session):
    with emulator.settings(dataverse_execution_ms_per_window=100), emulator.faults(latency_ms=150):
        assert _whoami(emulator, ca_session).status_code == 200
        resp = _whoami(emulator, ca_session)
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "0x80072321"
    assert int(resp.headers["Retry-After"]) >= 1


def test_dataverse_concurrency_limit(emulator, ca_session):
    results: list[int] = []
    with emulator.settings(dataverse_concurrency=1), emulator.faults(latency_ms=4000):
        slow = threading.Thread(target=lambda: results.append(_whoami(emulator, ca_session).status_code))
        slow.start()
        time.sleep(1.0)  # let the slow request take the only slot (ordering, not a timing assertion)
        resp = _whoami(emulator, ca_session)
        slow.join()
    assert results == [200]
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "0x80072326"
    assert resp.headers["Retry-After"] == "1"


def test_injected_throttles_use_each_services_shape_and_a_usable_retry_after(emulator, ca_session):
    with emulator.faults(throttle_rate=1.0):
        dv = _whoami(emulator, ca_session)
        graph = _graph_users(emulator, ca_session)
        # The token service is never faulted.
        token = ca_session.post(f"{emulator.authority}/oauth2/v2.0/token", timeout=30, data={
            "grant_type": "client_credentials", "client_id": emulator.secret_client_id,
            "client_secret": emulator.client_secret, "scope": f"{emulator.graph_url}/.default"})
    assert dv.status_code == 429 and dv.headers["Retry-After"] == "1"
    assert dv.json()["error"]["code"] == "0x80072322"
    assert graph.status_code == 429 and graph.headers["Retry-After"] == "1"
    error = graph.json()["error"]
    assert error["code"] == "TooManyRequests" and error["innerError"]["request-id"]
    assert token.status_code == 200


def test_injected_faults_can_target_one_service(emulator, ca_session):
    with emulator.faults(error_5xx_rate=1.0, retry_after_s=2, services=["graph"]):
        graph = _graph_users(emulator, ca_session)
        dv = _whoami(emulator, ca_session)
    assert graph.status_code == 503 and graph.headers["Retry-After"] == "2"
    assert graph.json()["error"]["code"] == "serviceNotAvailable"
    assert dv.status_code == 200


def test_dropped_connection_gets_no_answer(emulator, ca_session):
    with emulator.faults(drop_rate=1.0), pytest.raises(requests.ConnectionError):
        _whoami(emulator, ca_session)
    assert _whoami(emulator, ca_session).status_code == 200


def test_graph_request_window_throttles_per_app(emulator, ca_session):
    with emulator.settings(graph_requests_per_window=2, graph_window_s=60):
        statuses = [_graph_users(emulator, ca_session).status_code for _ in range(3)]
        last = _graph_users(emulator, ca_session)
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    assert last.json()["error"]["code"] == "TooManyRequests"
    assert 1 <= int(last.headers["Retry-After"]) <= 60


def test_outlook_requests_count_per_mailbox_not_against_the_directory_window(emulator, ca_session):
    """Mail and calendar requests have their own budget per app + mailbox (Outlook service limits), in direct
    calls and in $batch items alike; the identity-and-access window counts the directory requests."""
    users = ca_session.get(f"{emulator.graph_url}/v1.0/users?$top=2&$select=id", headers=emulator.headers("graph"),
                           timeout=60).json()["value"]
    one, two = (u["id"] for u in users)

    def inbox(uid: str) -> requests.Response:
        return ca_session.get(f"{emulator.graph_url}/v1.0/users/{uid}/mailFolders/inbox/messages?$top=1",
                              headers=emulator.headers("graph"), timeout=60)

    with emulator.settings(graph_requests_per_window=2, graph_window_s=60, graph_mailbox_requests_per_window=3,
                           graph_mailbox_window_s=60):
        assert [inbox(one).status_code for _ in range(3)] == [200, 200, 200]  # past the directory window of 2
        throttled = inbox(one)
        assert throttled.status_code == 429 and 1 <= int(throttled.headers["Retry-After"]) <= 60
        batch = ca_session.post(f"{emulator.graph_url}/v1.0/$batch", headers=emulator.headers("graph"), timeout=60,
                                json={"requests": [{"id": "1", "method": "GET",
                                                    "url": f"/users/{one}/mailFolders/inbox/messages?$top=1"},
                                                   {"id": "2", "method": "GET",
                                                    "url": f"/users/{two}/mailFolders/inbox/messages?$top=1"}]})
        assert batch.status_code == 200, batch.text
        status = {r["id"]: r["status"] for r in batch.json()["responses"]}
        assert status == {"1": 429, "2": 200}  # the spent mailbox alone is throttled
        assert _graph_users(emulator, ca_session).status_code == 200  # the directory window still has room


def test_faults_reject_bad_values(emulator, ca_session):
    resp = ca_session.post(f"{emulator.base_url}/_emulator/faults", json={"throttle_rate": 2},
                           headers={"X-Emulator-Admin-Key": emulator.admin_key()}, timeout=30)
    assert resp.status_code == 400
    assert "throttle_rate" in resp.json()["error"]
    assert emulator.admin("faults")["throttle_rate"] == 0
