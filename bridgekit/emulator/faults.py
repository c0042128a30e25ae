"""Fault injection and service-protection limits for the ``/org`` (Dataverse) and ``/graph`` prefixes.

One ASGI middleware applies, in order: injected latency, dropped connections, injected 429/503
(``ctx.faults``), then the services' own limits (``ctx.settings``):

* Dataverse service protection per caller (token ``oid``, else client IP), protocols.md §1.12: a
  sliding-window request count (``0x80072322``), combined execution time (``0x80072321``) and concurrent
  requests (``0x80072326``), answered 429 with an integer ``Retry-After``; normal responses carry
  ``x-ms-ratelimit-burst-remaining-xrm-requests`` and ``x-ms-ratelimit-time-remaining-xrm-requests``.
  A ``$batch`` is one HTTP request, so it counts once, with its whole execution time.
* Graph throttling per app (§2.4): a request window per app and an Outlook concurrency limit per
  app + mailbox, answered 429 ``TooManyRequests`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import math
import random
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridgekit.emulator.context import EmulatorContext

__all__ = ["FaultMiddleware", "Limiter", "dataverse_error_body", "graph_error_body"]

_MAILBOX = re.compile(r"^/graph/v1\.0/users/([^/]+)/(messages|mailFolders|events|calendarView|calendar|"
                      r"calendars|contacts|contactFolders)\b")


def dataverse_error_body(code: str, message: str) -> bytes:
    """Dataverse Web API error JSON (protocols.md §1.9)."""
    return orjson.dumps({"error": {"code": code, "message": message}})


def graph_error_body(code: str, message: str, *, status: int, client_request_id: str | None = None) -> bytes:
    """Graph error JSON with ``innerError`` (protocols.md §2.6)."""
    inner: dict[str, Any] = {"code": str(status), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                             "message": message, "request-id": str(uuid.uuid4()), "status": str(status)}
    if client_request_id:
        inner["client-request-id"] = client_request_id
    return orjson.dumps({"error": {"code": code, "message": message, "innerError": inner}})


@dataclass
class _Caller:
    """Sliding-window accounting for one Dataverse caller or one Graph app."""

    starts: deque[float] = field(default_factory=deque)
    spent: deque[tuple[float, float]] = field(default_factory=deque)  # (finished_at, ms)
    spent_ms: float = 0.0
    active: int = 0

    def expire(self, now: float, window: float) -> None:
        while self.starts and self.starts[0] <= now - window:
            self.starts.popleft()
        while self.spent and self.spent[0][0] <= now - window:
            self.spent_ms -= self.spent.popleft()[1]


class Limiter:
    """Per-caller counters for Dataverse service protection and Graph throttling.

    The Dataverse counters are touched on the event loop only. The Graph counters are shared with the
    ``$batch`` items, which are admitted one by one from worker threads: ``lock`` guards them (held for a
    few dictionary operations, never across an ``await``), so an item needs no hop to the event loop.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dataverse: dict[str, _Caller] = {}
        self.graph: dict[str, _Caller] = {}
        self.mailboxes: dict[tuple[str, str], int] = {}
        self.mailbox_windows: dict[tuple[str, str], _Caller] = {}

    def reset(self) -> None:
        """Forget all usage (after settings change, so a lowered limit starts from zero)."""
        with self.lock:
            self.dataverse, self.graph, self.mailboxes, self.mailbox_windows = {}, {}, {}, {}

    def admit_graph(self, app: str, mailbox: tuple[str, str] | None, s: Any) -> float | None:
        """Count one Graph request, or return the seconds to wait (the caller answers 429).

        Outlook requests (a mailbox's mail, calendar, contacts) count against that app + mailbox: 4 at once and
        ``graph_mailbox_requests_per_window`` per ``graph_mailbox_window_s``; the others against the app's
        identity-and-access window (throttling-limits: "Outlook service limits", "Identity and access service
        limits", protocols.md §2.4). Call with ``lock`` held.
        """
        now = time.monotonic()
        if mailbox is None:
            caller = self.graph.setdefault(app, _Caller())
            window, limit = float(s.graph_window_s), s.graph_requests_per_window
        else:
            if self.mailboxes.get(mailbox, 0) >= s.graph_mailbox_concurrency:
                return 1.0
            caller = self.mailbox_windows.setdefault(mailbox, _Caller())
            window, limit = float(s.graph_mailbox_window_s), s.graph_mailbox_requests_per_window
        caller.expire(now, window)
        if len(caller.starts) >= limit:
            return caller.starts[0] + window - now
        # Graph keeps counting requests while a client is throttled (§2.4); we count admitted ones only.
        caller.starts.append(now)
        if mailbox is not None:
            self.mailboxes[mailbox] = self.mailboxes.get(mailbox, 0) + 1
        return None

    def release_mailbox(self, mailbox: tuple[str, str]) -> None:
        """One request to ``mailbox`` has finished."""
        with self.lock:
            left = self.mailboxes.get(mailbox, 1) - 1
            if left > 0:
                self.mailboxes[mailbox] = left
            else:
                self.mailboxes.pop(mailbox, None)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return str(v.decode("latin-1"))
    return None


def _caller_claims(scope: Scope) -> dict[str, Any]:
    """The token's claims *without* verifying it: only used to pick a counter (the service verifies)."""
    auth = _header(scope, b"authorization") or ""
    if not auth.lower().startswith("bearer "):
        return {}
    parts = auth[7:].strip().split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = orjson.loads(payload)
    except (ValueError, orjson.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


class FaultMiddleware:
    """ASGI middleware: fault injection plus Dataverse/Graph limits for ``/org`` and ``/graph``."""

    def __init__(self, app: ASGIApp, ctx: EmulatorContext) -> None:
        self.app = app
        self.ctx = ctx
        self.limiter = Limiter()
        ctx.limiter = self.limiter
        self._rng = random.Random()  # noqa: S311 - fault dice, not security
        self._rng_seed: int | None = None

    def _roll(self) -> float:
        seed = self.ctx.faults.seed
        if seed != self._rng_seed:
            self._rng = random.Random(seed)  # noqa: S311 - reproducible fault dice
            self._rng_seed = seed
        return self._rng.random()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path.startswith("/org/"):
            service = "dataverse"
        elif path.startswith("/graph/"):
            service = "graph"
        else:
            await self.app(scope, receive, send)
            return
        f = self.ctx.faults
        faulted = service in f.services
        if faulted:
            if f.drop_rate and self._roll() < f.drop_rate:
                await self._drop(scope, send)
                return
            if f.throttle_rate and self._roll() < f.throttle_rate:
                await self._throttled(scope, send, service, f.retry_after_s, injected=True)
                return
            if f.error_5xx_rate and self._roll() < f.error_5xx_rate:
                await self._unavailable(scope, send, service, f.retry_after_s)
                return
        inner = self._slow if faulted and f.latency_ms else self.app
        if service == "dataverse":
            await self._dataverse(inner, scope, receive, send)
        else:
            await self._graph(inner, scope, receive, send)

    async def _slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Injected latency is served inside the limits' accounting: it behaves like a slow server, so it
        # counts as execution time and keeps a concurrency slot busy.
        await asyncio.sleep(self.ctx.faults.latency_ms / 1000)
        await self.app(scope, receive, send)

    # -- injected faults ---------------------------------------------------------------------------
    async def _drop(self, scope: Scope, send: Send) -> None:
        # Close the TCP connection without a response, like a reset mid-request. uvicorn's send is a
        # bound method of the request cycle, which holds the transport.
        cycle = getattr(send, "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is not None:
            transport.abort()
            # Wait for the protocol to see connection_lost before returning, or uvicorn tries to send a 500.
            for _ in range(200):
                if getattr(cycle, "disconnected", True):
                    break
                await asyncio.sleep(0.005)
            return
        raise ConnectionAbortedError("injected connection drop")

    async def _respond(self, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        base = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"x-bridgekit-emulator", b"1")]
        await send({"type": "http.response.start", "status": status, "headers": base + headers})
        await send({"type": "http.response.body", "body": body})

    async def _throttled(self, scope: Scope, send: Send, service: str, retry_after: int, *, injected: bool) -> None:
        s = self.ctx.settings
        headers = [(b"retry-after", str(max(retry_after, 0)).encode())]
        if service == "dataverse":
            body = dataverse_error_body("0x80072322", f"Number of requests exceeded the limit of "
                                        f"{s.dataverse_requests_per_window} over time window of "
                                        f"{s.dataverse_window_s} seconds.")
        else:
            body = graph_error_body("TooManyRequests", "Please retry again later.", status=429,
                                    client_request_id=_header(scope, b"client-request-id"))
        if injected:
            headers.append((b"x-bridgekit-fault", b"throttle"))
        await self._respond(send, 429, body, headers)

    async def _unavailable(self, scope: Scope, send: Send, service: str, retry_after: int) -> None:
        if service == "dataverse":
            body = dataverse_error_body("0x80040216", "An unexpected error occurred. The service is temporarily "
                                        "unavailable; retry later.")
        else:
            body = graph_error_body("serviceNotAvailable", "The service is temporarily unavailable. Retry later.",
                                    status=503, client_request_id=_header(scope, b"client-request-id"))
        await self._respond(send, 503, body, [(b"retry-after", str(retry_after).encode()),
                                              (b"x-bridgekit-fault", b"error")])

    # -- Dataverse service protection --------------------------------------------------------------
    async def _dataverse(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.ctx.settings
        claims = _caller_claims(scope)
        key = f"oid:{claims['oid']}" if claims.get("oid") else _client_ip(scope)
        caller = self.limiter.dataverse.setdefault(key, _Caller())
        now = time.monotonic()
        window = float(s.dataverse_window_s)
        caller.expire(now, window)
        # Concurrency fails at once; count and time are enforced once exceeded (protocols.md §1.12).
        if caller.active >= s.dataverse_concurrency:
            await self._dataverse_429(send, "0x80072326", f"Number of concurrent requests exceeded the limit of "
                                      f"{s.dataverse_concurrency}.", 1)
            return
        if len(caller.starts) >= s.dataverse_requests_per_window:
            wait = caller.starts[0] + window - now
            await self._dataverse_429(send, "0x80072322", f"Number of requests exceeded the limit of "
                                      f"{s.dataverse_requests_per_window} over time window of "
                                      f"{s.dataverse_window_s} seconds.", wait)
            return
        if caller.spent_ms >= s.dataverse_execution_ms_per_window:
            wait = caller.spent[0][0] + window - now if caller.spent else 1.0
            await self._dataverse_429(send, "0x80072321", f"Combined execution time of incoming requests exceeded "
                                      f"limit of {s.dataverse_execution_ms_per_window:,} milliseconds over time "
                                      f"window of {s.dataverse_window_s} seconds. Decrease number of concurrent "
                                      "requests or reduce the duration of requests and try again later.", wait)
            return
        caller.starts.append(now)
        caller.active += 1
        burst_left = max(s.dataverse_requests_per_window - len(caller.starts), 0)
        time_left_s = max(int((s.dataverse_execution_ms_per_window - caller.spent_ms) / 1000), 0)
        extra = [(b"x-ms-ratelimit-burst-remaining-xrm-requests", str(burst_left).encode()),
                 (b"x-ms-ratelimit-time-remaining-xrm-requests", str(time_left_s).encode())]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        started = time.monotonic()
        try:
            await app(scope, receive, send_with_headers)
        finally:
            finished = time.monotonic()
            caller.active -= 1
            ms = (finished - started) * 1000
            caller.spent.append((finished, ms))
            caller.spent_ms += ms

    async def _dataverse_429(self, send: Send, code: str, message: str, wait: float) -> None:
        await self._respond(send, 429, dataverse_error_body(code, message),
                            [(b"retry-after", str(max(1, math.ceil(wait))).encode())])

    # -- Graph throttling --------------------------------------------------------------------------
    async def _graph(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.ctx.settings
        claims = _caller_claims(scope)
        app_key = str(claims.get("azp") or claims.get("appid") or _client_ip(scope))
        m = _MAILBOX.match(scope.get("path", ""))
        mailbox = (app_key, m.group(1).lower()) if m else None
        with self.limiter.lock:
            wait = self.limiter.admit_graph(app_key, mailbox, s)
        if wait is not None:
            await self._graph_429(scope, send, wait)
            return
        try:
            await app(scope, receive, send)
        finally:
            if mailbox is not None:
                self.limiter.release_mailbox(mailbox)

    async def _graph_429(self, scope: Scope, send: Send, wait: float) -> None:
        body = graph_error_body("TooManyRequests", "Please retry again later.", status=429,
                                client_request_id=_header(scope, b"client-request-id"))
        await self._respond(send, 429, body, [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
