"""GraphClient: Microsoft Graph v1.0 seen from bridgekit: paged reads, delta queries with @removed and resync, JSON $batch.

Example:
    >>> graph = GraphClient(profile)                                      # doctest: +SKIP
    >>> for page in graph.users_delta(select=["displayName", "mail"]):   # doctest: +SKIP
    ...     print(len(page.items), len(page.removed), page.delta_link)
    >>> graph.batch([GraphRequest("1", "GET", "/users?$top=1")])[0].body  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests

from bridgekit.auth import TokenProvider, resource_scope
from bridgekit.catalog import GRAPH_BATCH_LIMIT, GRAPH_MAILBOX_CONCURRENCY, graph_max_top
from bridgekit.config import Profile
from bridgekit.errors import ApiError, BridgekitError, ResyncRequired, TransientError
from bridgekit.http import ServiceSession, build_session, error_from_response, parse_retry_after
from bridgekit.odata import Expr, Page, prefer, with_query

__all__ = [
    "BATCH_LIMIT",
    "DeltaPage",
    "GraphClient",
    "GraphRequest",
    "GraphResponse",
    "Removed",
    "mailbox_of",
    "max_page_size",
]

log = logging.getLogger("bridgekit.graph")

#: Requests per JSON batch (json-batching.md).
BATCH_LIMIT = GRAPH_BATCH_LIMIT
#: The largest ``$top`` Graph accepts for the collection at a path (None when unknown).
max_page_size = graph_max_top
_RESYNC_CODES = {"syncstatenotfound", "resyncrequired", "syncstateinvalid"}
# A request that reads or writes one user's mailbox (Outlook's limits are per app and mailbox).
_MAILBOX = re.compile(r"^/?(?:v1\.0/)?users/([^/?]+)/(?:messages|mailFolders|events|calendarView|calendar|calendars|"
                      r"contacts|contactFolders)\b", re.IGNORECASE)


def mailbox_of(url: str) -> str | None:
    """The mailbox (user id or UPN, lower case) a Graph request addresses, None for directory requests."""
    m = _MAILBOX.match(url)
    return m.group(1).lower() if m else None


class _MailboxSlots:
    """Outlook allows 4 concurrent requests per app and mailbox (throttling-limits, "Outlook service
    limits"): every batch item of this client holds one of its mailbox's slots while its batch is out."""

    def __init__(self, per_mailbox: int = GRAPH_MAILBOX_CONCURRENCY) -> None:
        self.per_mailbox = per_mailbox
        self.cond = threading.Condition()
        self.busy: dict[str, int] = {}

    def pick(self, queue: deque[GraphRequest], limit: int) -> list[GraphRequest]:
        """Take up to ``limit`` requests off ``queue`` whose mailbox has a free slot (call with ``cond`` held)."""
        chunk: list[GraphRequest] = []
        skipped: list[GraphRequest] = []
        while queue and len(chunk) < limit:
            req = queue.popleft()
            box = mailbox_of(req.url)
            if box is not None and self.busy.get(box, 0) >= self.per_mailbox:
                skipped.append(req)
                continue
            if box is not None:
                self.busy[box] = self.busy.get(box, 0) + 1
            chunk.append(req)
        queue.extendleft(reversed(skipped))
        return chunk

    def release(self, chunk: Sequence[GraphRequest]) -> None:
        with self.cond:
            for req in chunk:
                box = mailbox_of(req.url)
                if box is not None:
                    left = self.busy.get(box, 1) - 1
                    if left > 0:
                        self.busy[box] = left
                    else:
                        self.busy.pop(box, None)
            self.cond.notify_all()


@dataclass(frozen=True)
class Removed:
    """An ``@removed`` entry: ``reason`` is ``changed`` (soft-deleted, restorable) or ``deleted``."""

    id: str
    reason: str


@dataclass
class DeltaPage:
    """One page of a delta round.

    Attributes:
        items: Added or changed objects (with ``<rel>@delta`` arrays such as ``members@delta``).
        removed: Objects removed since the last round.
        delta_link: On the last page of the round: keep it for :meth:`GraphClient.delta_changes`.
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    removed: list[Removed] = field(default_factory=list)
    next_link: str | None = None
    delta_link: str | None = None


@dataclass(frozen=True)
class GraphRequest:
    """One request of a JSON batch; ``url`` is relative to the version root (``/users/{id}``)."""

    id: str
    method: str
    url: str
    body: Any = None
    headers: Mapping[str, str] | None = None
    depends_on: Sequence[str] = ()

    def to_json(self, keep_depends: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "method": self.method.upper(), "url": self.url}
        headers = dict(self.headers or {})
        if self.body is not None:
            out["body"] = self.body
            headers.setdefault("Content-Type", "application/json")  # required with a body
        if headers:
            out["headers"] = headers
        deps = [d for d in self.depends_on if d in set(keep_depends)]
        if deps:
            out["dependsOn"] = deps
        return out


@dataclass
class GraphResponse:
    """The answer to one :class:`GraphRequest`."""

    id: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error: BridgekitError | None = None

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300


class GraphClient:
    """The Microsoft Graph v1.0 client.

    Args:
        profile: The resolved profile (``graph_url``, auth, CA, concurrency).
        session: The HTTP channel; built from the profile (token for ``{graph_url}/.default``) when omitted.
        tokens: The token provider to use when building the session.
    """

    def __init__(self, profile: Profile, session: ServiceSession | None = None, *,
                 tokens: TokenProvider | None = None) -> None:
        self.profile = profile
        if session is None:
            provider = tokens or TokenProvider(profile)
            session = build_session(profile, "graph", auth=provider.bearer(resource_scope(profile.graph_url)))
        self.session = session
        self._slots = _MailboxSlots()
        #: Batches one :meth:`batch` call keeps in flight (each holds one of the session's concurrency slots).
        self.batches_in_flight = session.governor.max_concurrency
        #: Requests sent as ``$batch`` items so far (the session counts each ``$batch`` once).
        self.batch_items = 0
        self._count_lock = threading.Lock()

    # -- reads --------------------------------------------------------------------------------------

    def pages(self, path: str, *, select: str | Sequence[str] | None = None, filter: Expr | str | None = None,
              top: int | None = None, orderby: str | None = None, expand: str | None = None,
              search: str | None = None, count: bool = False, params: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None) -> Iterator[Page]:
        """Yield pages of the collection at ``path`` (``users``, ``users/{id}/messages`` ...).

        ``top`` is the page size, defaulting to the resource's maximum. ``search``/``count`` are advanced
        queries and add ``ConsistencyLevel: eventual`` (aad-advanced-queries.md).
        """
        size = top if top is not None else max_page_size(path)
        query: dict[str, Any] = {"$select": _names(select) or None, "$filter": filter, "$top": size, "$orderby": orderby,
                                 "$expand": expand, "$search": search, "$count": True if count else None}
        query.update(params or {})
        hdrs = dict(headers or {})
        if search or count:
            hdrs["ConsistencyLevel"] = "eventual"
        url: str | None = with_query(path, query)
        while url is not None:
            page = Page.from_json(self.session.get_json(url, headers=hdrs))
            yield page
            url = page.next_link

    def items(self, path: str, **options: Any) -> Iterator[dict[str, Any]]:
        """Yield the objects of the collection at ``path``; takes the options of :meth:`pages`."""
        for page in self.pages(path, **options):
            yield from page.value

    def users(self, **options: Any) -> Iterator[Page]:
        """Pages of ``/users`` (999 per page unless ``top`` says otherwise)."""
        return self.pages("users", **options)

    def groups(self, **options: Any) -> Iterator[Page]:
        """Pages of ``/groups``."""
        return self.pages("groups", **options)

    def messages(self, user: str, *, folder: str | None = None, **options: Any) -> Iterator[Page]:
        """Pages of a user's messages (all folders, or one folder)."""
        base = f"users/{_seg(user)}"
        path = f"{base}/mailFolders/{_seg(folder)}/messages" if folder else f"{base}/messages"
        return self.pages(path, **options)

    def calendar_view(self, user: str, start: dt.datetime, end: dt.datetime, **options: Any) -> Iterator[Page]:
        """Pages of a user's calendarView between ``start`` and ``end``."""
        params = {"startDateTime": _iso(start), "endDateTime": _iso(end)}
        return self.pages(f"users/{_seg(user)}/calendarView", params=params, **options)

    # -- delta --------------------------------------------------------------------------------------

    def delta(self, path: str, *, select: str | Sequence[str] | None = None, params: Mapping[str, Any] | None = None,
              page_size: int | None = None) -> Iterator[DeltaPage]:
        """Start a delta round at ``path`` (``users/delta``...): every page, the last one with the delta link.

        Raises:
            ResyncRequired: the service reset the sync state (410) or the token expired.
        """
        url = with_query(path, {"$select": _names(select) or None, **(params or {})})
        yield from self._delta_pages(url, page_size)

    def delta_changes(self, delta_link: str, *, page_size: int | None = None) -> Iterator[DeltaPage]:
        """Continue from a saved delta link: changes since then, ending with a new delta link.

        Raises:
            ResyncRequired: 410 Gone, ``syncStateNotFound`` or ``resyncRequired``: start over with :meth:`delta`.
        """
        yield from self._delta_pages(delta_link, page_size)

    def users_delta(self, *, select: str | Sequence[str] | None = None) -> Iterator[DeltaPage]:
        """Delta of ``/users`` (``$select`` limits which properties are tracked)."""
        return self.delta("users/delta", select=select)

    def groups_delta(self, *, select: str | Sequence[str] | None = None, members: bool = True) -> Iterator[DeltaPage]:
        """Delta of ``/groups``; with ``members`` the changes of membership arrive as ``members@delta``."""
        names = list(_names(select).split(",")) if select else []
        if members and "members" not in names:
            names = [*names, "members"] if names else ["displayName", "description", "members"]
        return self.delta("groups/delta", select=names or None)

    def _delta_pages(self, url: str, page_size: int | None) -> Iterator[DeltaPage]:
        value = prefer(maxpagesize=page_size) if page_size else None
        headers = {"Prefer": value} if value else {}
        next_url: str | None = url
        while next_url is not None:
            try:
                response = self.session.request("GET", next_url, headers=headers, allow=(410,))
            except ApiError as exc:
                if (exc.service_code or "").lower() in _RESYNC_CODES:
                    raise ResyncRequired(f"Graph delta token is no longer valid: {exc.message}",
                                         service_code=exc.service_code) from exc
                raise
            if response.status_code == 410:
                # 410 Gone + Location: a synchronization reset (delta-query-overview.md).
                err = error_from_response(response, "graph")
                raise ResyncRequired(f"Graph reset the sync state (410 Gone): {err.message}",
                                     service_code=getattr(err, "service_code", None) or "resyncRequired")
            page = _delta_page(self.session.decode_json(response.content, next_url, status=response.status_code))
            yield page
            next_url = page.next_link

    # -- JSON $batch --------------------------------------------------------------------------------

    def batch(self, requests_: Iterable[GraphRequest], *, max_rounds: int = 6) -> list[GraphResponse]:
        """Run requests through ``$batch`` (20 per call, several calls in flight); return responses in input order.

        Up to :attr:`batches_in_flight` batches are out at once, and no mailbox ever has more than 4 of
        this client's requests in flight (Outlook's limit per app and mailbox), whichever call sent them.
        Sub-requests answered 429 (each is throttled on its own, json-batching.md), 503/504 for reads, and
        requests that failed only because such a dependency failed (424), are sent again after the
        longest ``Retry-After`` seen, up to ``max_rounds`` rounds.
        """
        reqs = list(requests_)
        ids = [r.id for r in reqs]
        if len({i.lower() for i in ids}) != len(ids):
            raise ValueError("batch request ids must be unique (compared case-insensitively)")
        by_id = {r.id: r for r in reqs}
        results: dict[str, GraphResponse] = {}
        pending = list(reqs)
        for round_no in range(1, max_rounds + 1):
            again: list[GraphRequest] = []
            wait = 0.0
            for resp in self._send_all(pending, results):
                results[resp.id] = resp
                if round_no < max_rounds and self._retryable(resp, by_id[resp.id], results, by_id):
                    again.append(by_id[resp.id])
                    wait = max(wait, parse_retry_after(resp.headers.get("retry-after")) or 0.0)
            if not again:
                break
            log.debug("Graph $batch round %d: re-sending %d requests", round_no, len(again))
            if wait:
                self.session.governor.pause(wait)
            else:
                self.session.wait(self.session.policy.backoff(round_no))
            order = {r.id: i for i, r in enumerate(reqs)}
            pending = sorted(again, key=lambda r: order[r.id])
        return [results[r.id] for r in reqs]

    def _send_all(self, pending: Sequence[GraphRequest], done: Mapping[str, GraphResponse]) -> list[GraphResponse]:
        """Send ``pending`` in batches of up to 20, several in flight, within each mailbox's slots."""
        if any(r.depends_on for r in pending):
            # Dependencies order requests across chunks: keep them in sequence, in input order.
            out: list[GraphResponse] = []
            for start in range(0, len(pending), BATCH_LIMIT):
                out += self._send_batch(pending[start:start + BATCH_LIMIT], {**done, **{r.id: r for r in out}})
            return out
        queue: deque[GraphRequest] = deque(pending)
        answered: list[GraphResponse] = []
        failed: list[BaseException] = []
        slots = self._slots

        def worker() -> None:
            while not failed:
                with slots.cond:
                    chunk: list[GraphRequest] = []
                    while queue and not failed:
                        chunk = slots.pick(queue, BATCH_LIMIT)
                        if chunk:
                            break
                        slots.cond.wait(0.05)  # every pending request's mailbox is busy: wait for a release
                    if not chunk:
                        return
                try:
                    got = self._send_batch(chunk, done)
                except BaseException as exc:
                    failed.append(exc)
                    raise
                finally:
                    slots.release(chunk)
                with self._count_lock:
                    answered.extend(got)

        workers = max(1, min(self.batches_in_flight, -(-len(pending) // BATCH_LIMIT)))
        if workers == 1:
            worker()
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bk-batch") as pool:
                futures = [pool.submit(worker) for _ in range(workers)]
                for f in futures:
                    f.exception()
        if failed:
            raise failed[0]
        return answered

    def delta_batch(self, urls: Sequence[str], *, page_size: int | None = None) -> list[DeltaPage | BridgekitError]:
        """One page of each delta round at ``urls`` (first-request URLs, next links or delta links), through
        ``$batch``: what :meth:`delta_changes` yields first for each, or the error that answered it.

        ``page_size`` asks for pages that large (``Prefer: odata.maxpagesize`` on each item): Outlook's
        message and event deltas send 10 items a page unless asked, so a mailbox with 25 changes would
        take three rounds of the whole batch.

        An item answered 410 Gone or ``syncStateNotFound``/``resyncRequired`` comes back as
        :class:`~bridgekit.errors.ResyncRequired` for that round alone; throttled items (429) and 503/504
        are sent again after their ``Retry-After`` (see :meth:`batch`).
        """
        value = prefer(maxpagesize=page_size) if page_size else None
        headers = {"Prefer": value} if value else None
        reqs = [GraphRequest(str(i), "GET", self._relative(u), headers=headers) for i, u in enumerate(urls)]
        with self._count_lock:
            self.batch_items += len(reqs)
        out: list[DeltaPage | BridgekitError] = []
        for resp in self.batch(reqs):
            if resp.ok and isinstance(resp.body, Mapping):
                out.append(_delta_page(resp.body))
                continue
            err = resp.error or ApiError(f"Graph $batch item answered {resp.status}", status=resp.status,
                                         service="graph")
            code = (getattr(err, "service_code", None) or "").lower()
            if resp.status == 410 or code in _RESYNC_CODES:
                why = "reset the sync state (410 Gone)" if resp.status == 410 else "no longer accepts the delta token"
                out.append(ResyncRequired(f"Graph {why}: {err.message}", service_code=getattr(
                    err, "service_code", None) or "resyncRequired"))
            else:
                out.append(err)
        return out

    def _relative(self, url: str) -> str:
        """A link the service gave (absolute) as a batch item's URL, relative to the version root."""
        full = self.session.url(url)  # refuses links to another host, as a direct request would
        root = self.session.base_url
        return "/" + (full[len(root):] if full.startswith(root) else full.lstrip("/"))

    @staticmethod
    def _retryable(resp: GraphResponse, req: GraphRequest, results: Mapping[str, GraphResponse],
                   by_id: Mapping[str, GraphRequest]) -> bool:
        if resp.status == 429:
            return True
        if resp.status in (503, 504) and req.method.upper() == "GET":
            return True
        if resp.status == 424:
            # Failed only because a dependency was throttled: retry with it.
            return any(d in results and results[d].status in (429, 503, 504, 424) for d in req.depends_on)
        return False

    def _send_batch(self, chunk: Sequence[GraphRequest], done: Mapping[str, GraphResponse]) -> list[GraphResponse]:
        in_chunk = {r.id for r in chunk}
        out: list[GraphResponse] = []
        to_send: list[GraphRequest] = []
        for r in chunk:
            # A dependency from an earlier call that failed: answer 424 locally, as Graph would.
            failed = [d for d in r.depends_on if d not in in_chunk and d in done and not done[d].ok]
            if failed:
                out.append(GraphResponse(r.id, 424, body={"error": {"code": "FailedDependency",
                                                                    "message": f"dependency {failed[0]} failed"}}))
            else:
                to_send.append(r)
        if not to_send:
            return out
        sent_ids = {r.id for r in to_send}
        payload = {"requests": [r.to_json(sent_ids) for r in to_send]}
        safe = all(r.method.upper() == "GET" for r in to_send)
        try:
            response = self.session.request("POST", "$batch", json=payload, idempotent=safe,
                                            headers={"Content-Type": "application/json"})
        except TransientError as exc:
            # Auth, permission and configuration errors concern the whole call and are raised.
            return out + [GraphResponse(r.id, int(exc.status or 0), error=exc) for r in to_send]
        body = self.session.decode_json(response.content, "$batch", status=response.status_code)
        answers = {str(a.get("id")).lower(): a for a in (body.get("responses", []) if isinstance(body, dict) else [])}
        for r in to_send:
            a = answers.get(r.id.lower())
            if a is None:
                out.append(GraphResponse(r.id, 0, error=ApiError("no response for this request in the batch",
                                                                  service="graph")))
                continue
            status = int(a.get("status", 0))
            headers = {str(k).lower(): str(v) for k, v in (a.get("headers") or {}).items()}
            resp = GraphResponse(r.id, status, headers=headers, body=a.get("body"))
            if not resp.ok:
                resp.error = _sub_error(resp, r, response)
            out.append(resp)
        return out


def _delta_page(body: Mapping[str, Any]) -> DeltaPage:
    page = DeltaPage(next_link=body.get("@odata.nextLink"), delta_link=body.get("@odata.deltaLink"))
    for item in body.get("value", []):
        removed = item.get("@removed")
        if isinstance(removed, Mapping):
            page.removed.append(Removed(id=str(item.get("id")), reason=str(removed.get("reason", "deleted"))))
        else:
            page.items.append(item)
    return page


def _sub_error(resp: GraphResponse, req: GraphRequest, outer: requests.Response) -> BridgekitError:
    fake = requests.Response()
    fake.status_code = resp.status
    fake._content = json.dumps(resp.body).encode() if resp.body is not None else b""
    fake.headers.update(resp.headers)
    prepared = requests.Request(req.method.upper(), outer.url.rsplit("/$batch", 1)[0] + "/" + req.url.lstrip("/"))
    fake.request = prepared.prepare()
    return error_from_response(fake, "graph")


def _names(select: str | Sequence[str] | None) -> str:
    if select is None:
        return ""
    return select if isinstance(select, str) else ",".join(select)


def _seg(value: str) -> str:
    """A user id/UPN or folder id as one path segment (``/``, ``#``, ``?`` and spaces encoded)."""
    return quote(value, safe="@'")


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
