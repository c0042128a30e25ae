"""The HTTP seam against a real local stub server: Retry-After, back-off cap, safe writes, error mapping, TLS."""

from __future__ import annotations

import email.utils
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bridgekit.config import Profile
from bridgekit.errors import (
    ApiError,
    AuthError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ThrottledError,
    TransientError,
)
from bridgekit.http import Governor, RetryPolicy, ServiceSession, build_session, parse_retry_after

PAYLOADS = Path(__file__).parent / "payloads"
DROP = "drop"


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: {"value": []})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Stub:
    """A scripted HTTP server: each path answers from a list of replies (the last one repeats)."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply | str]] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.url = ""

    def on(self, path: str, *replies: Reply | str) -> None:
        self.script[path] = list(replies)

    def count(self, method: str | None = None) -> int:
        return sum(1 for m, _, _ in self.seen if method is None or m == method)


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path.split("?")[0]
            with stub.lock:
                stub.seen.append((self.command, self.path, dict(self.headers)))
                replies = stub.script.get(path, [Reply(404, {"error": {"code": "x", "message": "no script"}})])
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                stub.in_flight += 1
                stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
            try:
                if reply == DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                assert isinstance(reply, Reply)
                if reply.delay:
                    threading.Event().wait(reply.delay)
                data = b"" if reply.body is None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                with stub.lock:
                    stub.in_flight -= 1

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

    return Handler


@pytest.fixture()
def stub() -> Iterator[Stub]:
    s = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    server.daemon_threads = True
    s.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield s
    server.shutdown()
    server.server_close()


class FakeClock:
    """Time that passes only when someone sleeps: back-off decisions become observable, not timed."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.t += seconds


def _session(stub: Stub, clock: FakeClock, *, policy: RetryPolicy | None = None, concurrency: int = 4,
             service: str = "dataverse") -> ServiceSession:
    governor = Governor(concurrency, sleep=clock.sleep, clock=clock.now)
    return ServiceSession(stub.url + "/api/data/v9.2", service=service, governor=governor,
                          policy=policy or RetryPolicy(), sleep=clock.sleep, timeout=(2.0, 5.0))


def test_429_is_retried_after_the_retry_after_seconds(stub: Stub) -> None:
    clock = FakeClock()
    throttled = json.loads((PAYLOADS / "dataverse_error_429.json").read_text())
    stub.on("/api/data/v9.2/accounts", Reply(429, throttled, {"Retry-After": "7"}),
            Reply(200, {"value": [{"accountid": "1"}]}))
    with _session(stub, clock) as s:
        assert s.get_json("accounts")["value"] == [{"accountid": "1"}]
    assert stub.count("GET") == 2
    assert clock.sleeps == [pytest.approx(7.0)]
    assert s.governor.throttle_count == 1


def test_retry_after_as_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_503_with_http_date_retry_after_is_honoured(stub: Stub) -> None:
    clock = FakeClock()
    when = email.utils.formatdate(__import__("time").time() + 20, usegmt=True)
    stub.on("/api/data/v9.2/accounts", Reply(503, None, {"Retry-After": when}), Reply(200))
    with _session(stub, clock) as s:
        s.get_json("accounts")
    assert len(clock.sleeps) == 1 and 15 <= clock.sleeps[0] <= 21


def test_total_wait_cap_ends_in_throttled_error(stub: Stub) -> None:
    clock = FakeClock()
    throttled = json.loads((PAYLOADS / "dataverse_error_429.json").read_text())
    stub.on("/api/data/v9.2/accounts", Reply(429, throttled, {"Retry-After": "100", "REQ_ID": "req-42"}))
    with _session(stub, clock, policy=RetryPolicy(max_total_wait=250)) as s, \
            pytest.raises(ThrottledError) as info:
        s.get_json("accounts")
    err = info.value
    assert err.status == 429 and err.service_code == "0x80072322" and err.request_id == "req-42"
    assert err.retry_after is not None and err.transient
    assert "concurrency" in err.hint
    assert stub.count() == 3  # waited 100 + 100, a third pause would pass the 250 s cap
    assert sum(clock.sleeps) <= 250


def test_unsafe_write_is_not_retried_on_5xx(stub: Stub) -> None:
    clock = FakeClock()
    stub.on("/api/data/v9.2/accounts", Reply(503, {"error": {"code": "", "message": "busy"}}), Reply(204, None))
    with _session(stub, clock) as s, pytest.raises(TransientError):
        s.request("POST", "accounts", json={"name": "x"})
    assert stub.count("POST") == 1


def test_throttled_write_is_retried_because_it_was_not_executed(stub: Stub) -> None:
    clock = FakeClock()
    stub.on("/api/data/v9.2/accounts", Reply(429, None, {"Retry-After": "1"}), Reply(204, None))
    with _session(stub, clock) as s:
        assert s.request("POST", "accounts", json={"name": "x"}).status_code == 204
    assert stub.count("POST") == 2


def test_idempotent_write_is_retried_on_5xx_and_dropped_connection(stub: Stub) -> None:
    clock = FakeClock()
    stub.on("/api/data/v9.2/accounts(1)", Reply(500), DROP, Reply(204, None))
    with _session(stub, clock) as s:
        r = s.request("PATCH", "accounts(1)", json={"name": "x"}, headers={"If-Match": "*"}, idempotent=True)
    assert r.status_code == 204
    assert stub.count("PATCH") == 3
    assert len(clock.sleeps) == 2  # jittered back-off between the attempts


def test_dropped_connection_on_a_create_is_not_retried(stub: Stub) -> None:
    clock = FakeClock()
    stub.on("/api/data/v9.2/accounts", DROP, Reply(204, None))
    with _session(stub, clock) as s, pytest.raises(TransientError) as info:
        s.request("POST", "accounts", json={"name": "x"})
    assert "connection failed" in info.value.message
    assert stub.count("POST") == 1


def test_write_that_never_reached_the_server_is_retried() -> None:
    clock = FakeClock()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: every connect is refused
    governor = Governor(2, sleep=clock.sleep, clock=clock.now)
    s = ServiceSession(f"http://127.0.0.1:{port}/api", service="dataverse", governor=governor,
                       policy=RetryPolicy(max_attempts=3), sleep=clock.sleep)
    with pytest.raises(TransientError):
        s.request("POST", "accounts", json={})
    assert len(clock.sleeps) == 2  # three attempts


@pytest.mark.parametrize(("status", "payload", "cls"), [
    (404, "dataverse_error_404.json", NotFoundError),
    (403, "graph_error_forbidden.json", PermissionDeniedError),
    (412, None, ConflictError),
    (401, None, AuthError),
    (400, "dataverse_error_change_tracking.json", ApiError),
])
def test_error_statuses_map_to_typed_errors(stub: Stub, status: int, payload: str | None, cls: type) -> None:
    clock = FakeClock()
    body = json.loads((PAYLOADS / payload).read_text()) if payload else {"error": {"code": "", "message": "m"}}
    stub.on("/api/data/v9.2/thing", Reply(status, body, {"x-ms-service-request-id": "hdr-id"}))
    with _session(stub, clock) as s, pytest.raises(cls) as info:
        s.get_json("thing")
    err = info.value
    assert type(err) is cls
    assert stub.count() == 1  # client errors are never retried
    if isinstance(err, ApiError):
        assert err.status == status
        expected_id = "a1b2c3d4-0000-4000-8000-000000000003" if status == 403 else "hdr-id"
        assert err.request_id == expected_id
    if payload == "dataverse_error_404.json":
        assert err.service_code == "0x80040217" and "Does Not Exist" in err.message
    if status == 403:
        assert err.service_code == "Authorization_RequestDenied"


def test_error_messages_never_carry_secrets_from_the_url(stub: Stub) -> None:
    clock = FakeClock()
    stub.on("/api/data/v9.2/x", Reply(400, {"error": {"code": "", "message": "bad"}}))
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3gifQ.c2lnbmF0dXJlc2ln"
    with _session(stub, clock) as s, pytest.raises(ApiError) as info:
        s.get_json(f"x?access_token={jwt}&code=s3cr3t")
    text = str(info.value) + json.dumps(info.value.to_dict())
    assert jwt not in text and "s3cr3t" not in text


def test_links_to_another_host_are_refused(stub: Stub) -> None:
    with _session(stub, FakeClock()) as s, pytest.raises(ConfigError):
        s.get_json("https://evil.example/api/data/v9.2/accounts?$skiptoken=1")


def test_shared_pause_holds_every_thread() -> None:
    clock = FakeClock()
    g = Governor(4, sleep=clock.sleep, clock=clock.now)
    g.pause(12)
    assert g.wait_turn(100) == pytest.approx(12)  # another caller, same governor, waits the pause out
    assert g.wait_turn(100) == 0
    g.pause(50)
    with pytest.raises(ThrottledError):
        g.wait_turn(10)


def test_governor_paces_before_the_burst_budget_runs_out() -> None:
    clock = FakeClock()
    g = Governor(4, sleep=clock.sleep, clock=clock.now)
    g.observe({"x-ms-ratelimit-burst-remaining-xrm-requests": "6000"})
    assert g.wait_turn(100) == 0 and g.wait_turn(100) == 0  # plenty left: no spacing
    g.observe({"x-ms-ratelimit-burst-remaining-xrm-requests": "3"})
    waits = [g.wait_turn(100) for _ in range(3)]
    assert waits[0] == 0 and all(w == pytest.approx(0.05) for w in waits[1:])  # 300 s / 6000 requests
    g.observe({"x-ms-ratelimit-burst-remaining-xrm-requests": "5999"})
    assert g.wait_turn(100) == 0


def test_concurrency_never_exceeds_the_profile_or_52(stub: Stub) -> None:
    assert Governor(500).max_concurrency == 52
    stub.on("/api/data/v9.2/slow", Reply(200, {"value": []}, delay=0.05))
    s = ServiceSession(stub.url + "/api/data/v9.2", service="dataverse", max_concurrency=3)
    threads = [threading.Thread(target=s.get_json, args=("slow",)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stub.count() == 12
    assert 1 <= stub.max_in_flight <= 3


# -- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from bridgekit.emulator.tls import ensure_tls

    files = ensure_tls(tmp_path_factory.mktemp("tls"))
    s = Stub()
    s.on("/api/data/v9.2/WhoAmI", Reply(200, {"UserId": "u"}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.server_cert, files.server_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", str(files.ca_cert)
    server.shutdown()
    server.server_close()


def test_tls_trusts_the_profile_ca_even_with_requests_ca_bundle_set(
        https_stub: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = https_stub
    system = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", os.environ.get("REQUESTS_CA_BUNDLE", system))
    monkeypatch.setenv("CURL_CA_BUNDLE", os.environ.get("CURL_CA_BUNDLE", system))
    profile = Profile(name="t", auth="certificate", dataverse_url=url, ca_bundle=ca)
    with build_session(profile, "dataverse") as s:
        assert s.get_json("WhoAmI") == {"UserId": "u"}
        assert "bridgekit/" in s.session.headers["User-Agent"]
    # Without the CA the system bundle is used, and the emulator's certificate is rejected: never unverified.
    with build_session(profile.with_values(ca_bundle=None), "dataverse") as s, pytest.raises(ConfigError) as info:
        s.get_json("WhoAmI")
    assert info.value.key == "ca_bundle"
