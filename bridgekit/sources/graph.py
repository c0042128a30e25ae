"""A Graph resource as resumable delta pages for the sync engine, over :class:`bridgekit.graph.GraphClient`.

What each resource's table holds (columns, scope, select) is its :class:`bridgekit.catalog.GraphResource`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa

from bridgekit.catalog import EVENTS_WINDOW, GRAPH_RESOURCES
from bridgekit.errors import ResyncRequired, SyncError
from bridgekit.graph import DeltaPage, GraphClient, GraphRequest
from bridgekit.sources.base import FullPlan, Page
from bridgekit.warehouse import TableSpec, carrier

__all__ = ["FOLDER_REFRESH_S", "GraphSource"]

log = logging.getLogger("bridgekit.sync")

#: How often a long-running source lists its users' mail folders again (new users' folders: at once).
FOLDER_REFRESH_S = 60.0
# The position of a mailbox no longer synced: its next (and last) page drops its rows.
GONE = "-"


class GraphSource:
    """A Graph resource as resumable delta pages, over :class:`bridgekit.graph.GraphClient`.

    Directory resources (users, groups) have one delta; mailbox resources have one per scope (a user's
    mail folder, calendar or contacts), each a partition of the full load and of every delta, and the
    table's token is the JSON object ``{scope: deltaLink}``. Mailboxes of users created after the first
    load join at their next delta run (an initial round); those of users gone stop being synced and their
    rows are dropped; the positions are ``<scope> <link>``. Mailbox pages are fetched many at once through
    JSON ``$batch`` (:meth:`pages`), and a mailbox whose delta link the service no longer accepts is read
    again alone, its rows replaced (:attr:`Page.reset`), while the others go on.
    """

    def __init__(self, client: GraphClient, name: str) -> None:
        if name not in GRAPH_RESOURCES:
            raise SyncError(f"Graph resource {name!r} cannot be synced", table=f"graph.{name}",
                            hint=f"choose from: {', '.join(GRAPH_RESOURCES)}")
        self.client = client
        self.name = name
        self.table = f"graph.{name}"
        self.res = GRAPH_RESOURCES[name]
        self._spec: TableSpec | None = None
        self._folders: dict[str, list[str]] = {}  # user id -> mail folder ids, as last listed
        self._folders_at = 0.0
        self._empty: pa.Table | None = None  # the rows of a page with no items (most pages of a poll)

    @property
    def tracked(self) -> bool:
        return True

    def spec(self) -> TableSpec:
        if self._spec is None:
            from bridgekit.warehouse import Column

            self._spec = TableSpec("graph", self.name, "id", tuple(Column(n, t) for n, t, _ in self.res.columns))
        return self._spec

    def _initial(self, scope: str) -> str:
        from bridgekit.odata import with_query

        select = ",".join(self.res.select) or None
        if self.res.per_user is None:
            return str(with_query(f"{self.name}/delta", {"$select": select}))
        user, _, folder = scope.partition("/")
        if self.res.per_user == "folders":
            return str(with_query(f"users/{user}/mailFolders/{folder}/messages/delta", {"$select": select}))
        if self.res.per_user == "calendar":
            start, end = (d.strftime("%Y-%m-%dT%H:%M:%S") for d in EVENTS_WINDOW)
            return str(with_query(f"users/{user}/calendarView/delta", {"startDateTime": start, "endDateTime": end}))
        return str(with_query(f"users/{user}/contacts/delta", {"$select": select}))

    def _scopes(self) -> list[str]:
        if self.res.per_user is None:
            return [""]
        users = [str(u["id"]) for page in self.client.users(select=["id"]) for u in page.value]
        if self.res.per_user != "folders":
            return users
        now = time.monotonic()
        # A mailbox's folders are listed again at most every FOLDER_REFRESH_S (new users at once): listing
        # them is a request per user, which a poll would otherwise pay every time. A folder created
        # meanwhile joins at the next listing with an initial round (nothing in it is missed).
        if now - self._folders_at > FOLDER_REFRESH_S:
            stale, self._folders_at = users, now
        else:
            stale = [u for u in users if u not in self._folders]
        if stale:
            reqs = [GraphRequest(str(i), "GET", f"/users/{uid}/mailFolders?$select=id&$top=1000")
                    for i, uid in enumerate(stale)]
            for uid, resp in zip(stale, self.client.batch(reqs), strict=True):
                if resp.status == 404:
                    self._folders[uid] = []  # the user (or the mailbox) is gone since the listing
                    continue
                if not resp.ok or not isinstance(resp.body, dict):
                    raise resp.error or SyncError(f"{self.table}: listing the mail folders of a user failed "
                                                  f"({resp.status})", table=self.table)
                folders = [str(f["id"]) for f in resp.body.get("value", [])]
                if resp.body.get("@odata.nextLink"):
                    folders += [str(f["id"]) for page in self.client.pages(resp.body["@odata.nextLink"])
                                for f in page.value]
                self._folders[uid] = folders
        return [f"{uid}/{f}" for uid in users for f in self._folders.get(uid, [])]

    def plan_full(self, partitions: int) -> FullPlan:
        return FullPlan([f"{scope} {self._initial(scope)}" for scope in self._scopes()])

    def delta_start(self, token: str) -> list[str]:

        links: dict[str, str] = json.loads(token) if token.startswith("{") else {"": token}
        if self.res.per_user is None:
            return [f"{scope} {link}" for scope, link in links.items()]
        scopes = self._scopes()
        listed = set(scopes)
        # Mailboxes no longer listed (their user left, or the folder is gone) stop being synced: their rows go.
        cursors = [f"{scope} {link if scope in listed else GONE}" for scope, link in links.items()]
        # New mailboxes join with an initial round (everything in them is new).
        cursors += [f"{scope} {self._initial(scope)}" for scope in scopes if scope not in links]
        return cursors

    def join_tokens(self, tokens: list[str]) -> str:

        links = dict(t.split(" ", 1) for t in tokens)
        if self.res.per_user is None:
            return links.get("", "")
        return json.dumps({s: link for s, link in links.items() if link != GONE}, sort_keys=True)

    def _reset(self, scope: str) -> dict[str, str]:
        user, _, folder = scope.partition("/")
        return {"user_id": user, "parentFolderId": folder} if folder else {"user_id": user}

    def page(self, cursor: str) -> Page:
        scope, _, url = cursor.partition(" ")
        if url == GONE:
            return Page(token=f"{scope} {GONE}", reset=self._reset(scope))
        # Deltas ask for full pages: Outlook sends 10 items unless asked, the directory 100.
        try:
            page = next(iter(self.client.delta_changes(url, page_size=self.res.delta_page)))
        except ResyncRequired as exc:
            exc.table = self.table
            raise
        return self._shape(scope, page)

    def pages(self, cursors: list[str]) -> list[Page | BaseException]:
        """The page at each cursor, mailboxes through ``$batch``; a mailbox whose link the service no longer
        accepts (410, ``syncStateNotFound``) is read again from its first page, the others go on."""
        if self.res.per_user is None:
            out: list[Page | BaseException] = []
            for cursor in cursors:
                try:
                    out.append(self.page(cursor))
                except Exception as exc:
                    out.append(exc)
            return out
        split = [c.partition(" ") for c in cursors]
        results: list[Page | BaseException | None] = [None] * len(cursors)
        asked = [i for i, (_, _, url) in enumerate(split) if url != GONE]
        for i, (scope, _, url) in enumerate(split):
            if url == GONE:
                results[i] = Page(token=f"{scope} {GONE}", reset=self._reset(scope))
        size = self.res.delta_page
        got = self.client.delta_batch([split[i][2] for i in asked], page_size=size) if asked else []
        again = []
        for i, answer in zip(asked, got, strict=True):
            if isinstance(answer, ResyncRequired):
                again.append(i)
            elif isinstance(answer, BaseException):
                results[i] = answer
            else:
                results[i] = self._shape(split[i][0], answer)
        if again:
            fresh = self.client.delta_batch([self._initial(split[i][0]) for i in again], page_size=size)
            for i, answer in zip(again, fresh, strict=True):
                scope = split[i][0]
                if isinstance(answer, BaseException):
                    if isinstance(answer, ResyncRequired):
                        answer.table = self.table
                    results[i] = answer
                    continue
                log.warning("%s: the delta link of mailbox %s is no longer valid; reading it again", self.table,
                            scope)
                page = self._shape(scope, answer)
                page.reset = self._reset(scope)
                results[i] = page
        return [r if r is not None else SyncError("no answer", table=self.table) for r in results]

    def _shape(self, scope: str, page: DeltaPage) -> Page:
        items = page.items
        if self.res.per_user is not None:
            user = scope.split("/", 1)[0]
            for item in items:
                item["@bk.user"] = user
        spec = self.spec()
        if not items and self._empty is not None:
            rows = self._empty
        else:
            rows = self._rows(spec, items)
            if not items:
                self._empty = rows
        versions = [i.get("@odata.etag") or i.get("changeKey") for i in items]
        # Graph may list one object twice in a round (replays); the later occurrence wins in staging.
        return Page(rows=rows, deletes=[r.id for r in page.removed], versions=versions,
                    next=f"{scope} {page.next_link}" if page.next_link else None,
                    token=f"{scope} {page.delta_link}" if page.delta_link else None)

    def _rows(self, spec: TableSpec, items: list[dict[str, Any]]) -> pa.Table:
        arrays = []
        for name, typ, get in self.res.columns:
            try:
                arrays.append(pa.array([get(i) for i in items], carrier(typ)))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise SyncError(f"{self.table}.{name}: a value does not fit {typ}: {exc}", table=self.table) from exc
        return pa.Table.from_arrays(arrays, names=[c.name for c in spec.columns])
