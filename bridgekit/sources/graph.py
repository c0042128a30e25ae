"""A Graph resource as resumable delta pages for the sync engine, over :class:`bridgekit.graph.GraphClient`.

What each resource's table holds (columns, scope, select) is its :class:`bridgekit.catalog.GraphResource`.
"""

from __future__ import annotations

import json

import pyarrow as pa

from bridgekit.catalog import EVENTS_WINDOW, GRAPH_RESOURCES
from bridgekit.errors import ResyncRequired, SyncError
from bridgekit.graph import GraphClient
from bridgekit.sources.base import FullPlan, Page
from bridgekit.warehouse import TableSpec, carrier

__all__ = ["GraphSource"]


class GraphSource:
    """A Graph resource as resumable delta pages, over :class:`bridgekit.graph.GraphClient`.

    Directory resources (users, groups) have one delta; mailbox resources have one per scope (a user's
    mail folder, calendar or contacts), each a partition of the full load and of every delta, and the
    table's token is the JSON object ``{scope: deltaLink}``. Mailboxes of users created after the first
    load join at their next delta run (an initial round); the positions are ``<scope> <link>``.
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
        scopes = []
        for uid in users:
            for page in self.client.pages(f"users/{uid}/mailFolders", select=["id"]):
                scopes += [f"{uid}/{f['id']}" for f in page.value]
        return scopes

    def plan_full(self, partitions: int) -> FullPlan:
        return FullPlan([f"{scope} {self._initial(scope)}" for scope in self._scopes()])

    def delta_start(self, token: str) -> list[str]:

        links: dict[str, str] = json.loads(token) if token.startswith("{") else {"": token}
        cursors = [f"{scope} {link}" for scope, link in links.items()]
        if self.res.per_user is not None:
            # New mailboxes join with an initial round (everything in them is new).
            cursors += [f"{scope} {self._initial(scope)}" for scope in self._scopes() if scope not in links]
        return cursors

    def join_tokens(self, tokens: list[str]) -> str:

        links = dict(t.split(" ", 1) for t in tokens)
        return links.get("", "") if self.res.per_user is None else json.dumps(links, sort_keys=True)

    def page(self, cursor: str) -> Page:
        scope, _, url = cursor.partition(" ")
        try:
            page = next(iter(self.client.delta_changes(url)))
        except ResyncRequired as exc:
            exc.table = self.table
            raise
        items = page.items
        if self.res.per_user is not None:
            user = scope.split("/", 1)[0]
            for item in items:
                item["@bk.user"] = user
        spec = self.spec()
        arrays = []
        for name, typ, get in self.res.columns:
            try:
                arrays.append(pa.array([get(i) for i in items], carrier(typ)))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise SyncError(f"{self.table}.{name}: a value does not fit {typ}: {exc}", table=self.table) from exc
        rows = pa.Table.from_arrays(arrays, names=[c.name for c in spec.columns])
        versions = [i.get("@odata.etag") or i.get("changeKey") for i in items]
        # Graph may list one object twice in a round (replays); the later occurrence wins in staging.
        return Page(rows=rows, deletes=[r.id for r in page.removed], versions=versions,
                    next=f"{scope} {page.next_link}" if page.next_link else None,
                    token=f"{scope} {page.delta_link}" if page.delta_link else None)
