"""The sync engine: mirror Dataverse tables and Graph resources into the warehouse, exactly, resumably, and keep it current.

How a run goes (:meth:`SyncEngine.run`), top to bottom:

1. Take the warehouse's sync lock (a second sync gets a :class:`~bridgekit.errors.SyncError` naming the
   pid), create/migrate the warehouse, read each table's delta link from ``bridgekit.sync_state``.
2. For each selected table, through its :class:`Source`:

   * a table staged by an earlier, interrupted run resumes from its checkpointed positions and ends with
     a catch-up round (a delta from the link its staged rounds end with, which predates their first
     page), so pages read long ago are merged with what changed since (``sync_runs.caught_up``); a
     table without change tracking reloads instead;
   * no delta link yet, ``--full``, or no change tracking on the table -> a **full load**: the source
     splits the table into partitions (:meth:`Source.plan_full`) that are fetched concurrently, each page
     checkpointed with the position reached (:meth:`bridgekit.warehouse.Staging.write_page`), then a
     catch-up delta from a link taken before the load, so what changed meanwhile is in the same merge;
   * otherwise a **delta**: the changes since the stored delta link, page by page, upserts and deletes;
   * :class:`~bridgekit.errors.ResyncRequired` (expired token, 410 Gone) -> the staged delta is dropped
     and the table reloads in full, reported as ``resynced``;
   * a failure that every other table of the service (or of both) would meet too, after the same waits
     (credentials refused, the identity provider or the service not answering, throttled out), stops
     those tables: they are reported as not attempted, the tables fetched so far are merged, and the
     report's exit code says why (4 for a transient failure: run again, it resumes).

3. Apply every fetched table to the warehouse in one transaction (readers see the run whole or not at all)
   and record ``bridgekit.sync_runs``; return a :class:`SyncReport`.

The engine knows nothing about HTTP: each table is a :class:`Source` yielding pages by *position*
(a next/delta link), which is what makes resuming after a crash possible. A :class:`SplitSource` hands
over each page as soon as it knows the next position, so its fetcher thread keeps the service busy
while the writer thread decodes, shapes and checkpoints (the service is what a full load waits on).
The sources live in :mod:`bridgekit.sources`; the Workbench builds them over its clients.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bridgekit.errors import (
    ApiError,
    AuthError,
    BridgekitError,
    ConfigError,
    ExitCode,
    ResyncRequired,
    SyncError,
    TransientError,
    UnknownTableError,
    exit_code_for,
    shown,
)
from bridgekit.sources.base import (
    BatchSource,
    Page,
    RawPage,
    Source,
    SourceFactory,
    as_batch,
    as_split,
    to_arrow,
)
from bridgekit.warehouse import RunRecord, StagedPage, StageState, Staging, Warehouse

__all__ = [
    "SyncEngine",
    "SyncReport",
    "TableReport",
    "resolve_selection",
    "responsive_threads",
]

log = logging.getLogger("bridgekit.sync")

#: How many times one table may restart from scratch in one run after ResyncRequired.
MAX_RESYNCS = 2
#: Partitions numbered from here are the catch-up delta that ends a full load (see SyncEngine._fetch); each
#: further catch-up round (after a resume) numbers its partitions from the next multiple. Above any table's
#: partition count: a mailbox resource has one per mailbox folder (1,200 for 600 users), and a read whose
#: partitions ran past it was taken for a catch-up round, keeping only the links of the partitions beyond it.
CATCH_UP = 1_000_000
#: Rows a delta run stages in one transaction before it checkpoints page by page (SyncEngine.delta_commit_rows).
DELTA_COMMIT_ROWS = 50_000


def _rounds(state: StageState) -> int:
    """How many catch-up rounds the staged table has (0: only its first read)."""
    return max(state.cursors, default=0) // CATCH_UP


# -- reports ---------------------------------------------------------------------------------------------


@dataclass
class TableReport:
    """What one run did to one table."""

    table: str
    mode: str  # full | delta | skipped
    status: str  # ok | error | skipped
    created: int = 0
    updated: int = 0
    deleted: int = 0
    fetched: int = 0
    pages: int = 0
    duration_s: float = 0.0
    resynced: bool = False
    resumed: bool = False
    message: str | None = None
    error: str | None = None
    failure: BridgekitError | None = field(default=None, repr=False, compare=False)  # the error itself

    @property
    def throughput(self) -> float:
        """Rows fetched per second."""
        return self.fetched / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class SyncReport:
    """The result of one sync run: per-table counts, duration and throughput.

    Example:
        >>> report = wb.sync(only=["account"])  # doctest: +SKIP
        >>> print(report)                       # doctest: +SKIP
        >>> report.to_frame()                   # doctest: +SKIP
    """

    run_id: str
    started_at: datetime
    ended_at: datetime
    tables: list[TableReport]

    @property
    def duration_s(self) -> float:
        """Wall time of the run."""
        return (self.ended_at - self.started_at).total_seconds()

    @property
    def fetched(self) -> int:
        """Rows and deletes fetched over all tables."""
        return sum(t.fetched for t in self.tables)

    @property
    def throughput(self) -> float:
        """Rows fetched per second over the whole run."""
        return self.fetched / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when no table failed."""
        return all(t.status != "error" for t in self.tables)

    @property
    def changed(self) -> int:
        """Rows created, updated or deleted in the warehouse."""
        return sum(t.created + t.updated + t.deleted for t in self.tables)

    def failures(self) -> list[tuple[list[str], BridgekitError]]:
        """Each distinct error of this run with the tables it failed (an error shared by many is listed once)."""
        out: dict[tuple[type, str], tuple[list[str], BridgekitError]] = {}
        for t in self.tables:
            if t.status == "error" and t.failure is not None:
                out.setdefault((type(t.failure), t.failure.message), ([], t.failure))[0].append(t.table)
        return list(out.values())

    @property
    def exit_code(self) -> ExitCode:
        """The documented exit code of this run: 0, or what its failures mean for a scheduler.

        Only transient failures: 4 (retry later). Otherwise usage (2) before auth (3) before anything else (1).
        """
        codes = {exit_code_for(exc) for _, exc in self.failures()}
        if not self.ok and not codes:
            codes = {ExitCode.ERROR}
        if not codes:
            return ExitCode.OK
        if codes == {ExitCode.TRANSIENT}:
            return ExitCode.TRANSIENT
        return next((c for c in (ExitCode.USAGE, ExitCode.AUTH) if c in codes), ExitCode.ERROR)

    def raise_for_failures(self) -> None:
        """Raise the error that decides :attr:`exit_code` when a table failed (a runbook cell's way to fail)."""
        code = self.exit_code
        if code == ExitCode.OK:
            return
        for _tables, exc in self.failures():
            if exit_code_for(exc) == code or code == ExitCode.ERROR:
                raise exc
        raise SyncError(f"{len([t for t in self.tables if t.status == 'error'])} table(s) failed")

    def table(self, name: str) -> TableReport:
        """The report of one table (``dataverse.account`` or ``account``)."""
        for t in self.tables:
            if name in (t.table, t.table.split(".", 1)[1]):
                return t
        raise KeyError(name)

    def to_frame(self) -> Any:
        """One row per table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame([{
            "table": t.table, "mode": t.mode, "status": t.status, "created": t.created, "updated": t.updated,
            "deleted": t.deleted, "fetched": t.fetched, "pages": t.pages, "duration_s": round(t.duration_s, 3),
            "rows_per_s": round(t.throughput, 1), "resynced": t.resynced, "resumed": t.resumed,
            "message": t.message or t.error or "",
        } for t in self.tables])

    def render(self) -> str:
        """A plain-text table for terminals and logs."""
        head = ("table", "mode", "status", "created", "updated", "deleted", "fetched", "secs", "rows/s", "note")
        rows = [head]
        for t in self.tables:
            note = "; ".join(x for x in (
                "resynced" if t.resynced else "", "resumed" if t.resumed else "", t.error or t.message or "") if x)
            rows.append((t.table, t.mode, t.status, str(t.created), str(t.updated), str(t.deleted), str(t.fetched),
                         f"{t.duration_s:.2f}", f"{t.throughput:.0f}", note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
                 + "  " + r[-1] for r in rows]
        lines.insert(1, "-" * max(len(x) for x in lines))
        lines.append(f"run {self.run_id}: {len(self.tables)} table(s), {self.changed} row change(s), "
                     f"{self.fetched} fetched in {self.duration_s:.2f}s ({self.throughput:.0f} rows/s)"
                     + ("" if self.ok else "; SOME TABLES FAILED"))
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.render()

    def _repr_html_(self) -> str:
        html: str = self.to_frame().to_html(index=False)
        return f"<p>sync run <code>{self.run_id}</code>: {self.duration_s:.2f}s</p>{html}"


# -- selection ------------------------------------------------------------------------------------------


def resolve_selection(available: Sequence[str], only: Iterable[str] | str | None) -> list[str]:
    """The table ids to sync: all of ``available`` or those named in ``only``.

    Names may be qualified (``graph.users``) or bare (``account``) when that is unambiguous.

    Raises:
        UnknownTableError: a name matches no (or more than one) table (exit 2).
    """
    if only is None:
        return list(available)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    chosen: list[str] = []
    for name in names:
        matches = [t for t in available if name in (t, t.split(".", 1)[1])]
        if len(matches) != 1:
            what = "is ambiguous" if matches else "is not in the profile's sync plan"
            raise UnknownTableError(f"table '{shown(name)}' {what}", table=shown(name),
                                    hint=f"choose from: {', '.join(available)}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


def _failure_scope(exc: BridgekitError) -> str | None:
    """Which tables a failure stops: ``*`` (the profile, its credential or the identity provider failed: every
    table), ``service`` (a token for that service was refused), or None (only the table it happened on)."""
    if isinstance(exc, AuthError):
        return "service" if exc.service_code in _RESOURCE_AUTH_CODES else "*"
    if isinstance(exc, ConfigError) or (isinstance(exc, ApiError) and exc.service == "identity"):
        return "*"
    # No answer at all (the link or the host is down): likely every table; throttled out or failing
    # with 5xx: that service's. Either way the next tables would wait as long again.
    if isinstance(exc, TransientError):
        return "*" if exc.status is None else "service"
    return None


# Token errors about one resource, not the app (Entra ID error codes): no consent for it (AADSTS65001), the
# resource is unknown to the tenant (AADSTS500011), an invalid scope (AADSTS70011). Any other token error
# (wrong or expired secret, unknown tenant or app) fails every resource alike.
_RESOURCE_AUTH_CODES = frozenset({"AADSTS65001", "AADSTS500011", "AADSTS70011"})


# -- the engine ------------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


#: The interpreter's thread switch interval while a sync runs (Python's default is 5 ms).
SWITCH_INTERVAL_S = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def responsive_threads() -> Iterator[None]:
    """Shorten the interpreter's thread switch interval while a sync (or a migration's writes) runs.

    A fetcher thread gives up the GIL hundreds of times per page (every TLS record read, every
    syscall) and, while the writer thread shapes rows, waits up to a whole switch interval each time
    to get it back: at the default 5 ms the service sat idle ~20% of a million-row load
    (BENCHMARKS.md). The previous interval is restored when the last running sync ends.
    """
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, SWITCH_INTERVAL_S))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class _Progress:
    """A tqdm bar per table (notebook-aware) or nothing."""

    def __init__(self, enabled: bool, table: str, total: int | None) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=table, unit="rows", leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Round:
    """A delta's first positions and the first page at each: one page (or its error), or a batch source's list."""

    cursors: list[str]
    answers: Page | BaseException | list[Page | BaseException] | None


def _first_round(source: Source, token: str) -> _Round:
    cursors = source.delta_start(token)  # an error here is the job's: the normal path reports it
    batch = as_batch(source)
    if batch is not None and len(cursors) > 1:
        return _Round(cursors, batch.pages(cursors))
    if len(cursors) != 1:
        return _Round(cursors, None)
    try:
        return _Round(cursors, source.page(cursors[0]))
    except Exception as exc:
        return _Round(cursors, exc)


class SyncEngine:
    """Runs syncs of one warehouse from a set of sources.

    Args:
        warehouse: The target warehouse.
        tables: The table ids the profile plans to sync, in order.
        factory: Builds the :class:`Source` of a table id (called lazily, once per table).
        concurrency: Partitions (range reads, mailboxes) fetched at once.
        partitions: How many range partitions a large table's full load is split into (None: as many
            as ``concurrency``). Concurrent range reads pay off against a service that serves them in
            parallel (Dataverse does); against a single-process server they only add work.
        progress: Show tqdm bars (None: only when stderr is a terminal).
        untracked: ``"reload"`` (full reload each run) or ``"skip"`` for tables without change tracking.
        label: Stored in ``sync_state.source`` (the profile name).

    Example:
        >>> engine = SyncEngine(Warehouse("demo.duckdb"), ["dataverse.account"], factory)  # doctest: +SKIP
        >>> print(engine.run())                                                               # doctest: +SKIP
    """

    def __init__(self, warehouse: Warehouse, tables: Sequence[str], factory: SourceFactory, *,
                 concurrency: int = 4, partitions: int | None = None, progress: bool | None = None,
                 untracked: str = "reload", label: str = "") -> None:
        if untracked not in ("reload", "skip"):
            raise ValueError("untracked must be 'reload' or 'skip'")
        self.warehouse = warehouse
        self.tables = list(tables)
        self.factory = factory
        self.concurrency = max(1, concurrency)
        self.partitions = max(1, partitions if partitions is not None else self.concurrency)
        self.progress = progress
        self.untracked = untracked
        self.label = label
        self._sources: dict[str, Source] = {}
        self._tokens: dict[str, str | None] | None = None
        self._estimates: dict[str, int | None] = {}
        self._jobs: dict[str, Future[_Round]] = {}  # table -> its prefetched first round (see _prefetching)
        self._digests: dict[str, str] = {}  # untracked tables: digest of the reload last merged
        self._merged_stages: dict[str, str | None] = {}  # table -> stage id of its last merge (at start)
        self._staging: Staging | None = None  # a watcher's staging file, open from poll to poll
        #: A delta run stages up to this many rows in one transaction (a kill before the merge fetches them
        #: again from the stored links); beyond it every page is checkpointed, so a large delta resumes.
        self.delta_commit_rows = DELTA_COMMIT_ROWS

    def source(self, table: str) -> Source:
        """The (cached) source of ``table``."""
        if table not in self._sources:
            self._sources[table] = self.factory(table)
        return self._sources[table]

    def _show_progress(self) -> bool:
        if self.progress is not None:
            return self.progress
        return bool(getattr(sys.stderr, "isatty", lambda: False)())

    # -- public entry points ---------------------------------------------------------------------------
    def run(self, only: Iterable[str] | str | None = None, *, full: bool = False) -> SyncReport:
        """One sync run over the selected tables; see the module docstring.

        Raises:
            SyncError: another sync holds the warehouse, or a table name is unknown.
            WarehouseError: the warehouse cannot be written.
        """
        selection = resolve_selection(self.tables, only)
        with self.warehouse.lock(), responsive_threads():
            return self._run(selection, full=full, quiet_noop=False)

    def watch(self, only: Iterable[str] | str | None = None, *, interval: float = 1.0,
              on_report: Callable[[SyncReport], None] | None = None,
              stop: threading.Event | None = None, full: bool = False) -> None:
        """Sync, then poll deltas every ``interval`` seconds until ``stop`` is set (or Ctrl-C).

        The lock is held throughout. Polls that find no change do not touch the warehouse file, so
        readers are not delayed by an idle watcher; ``on_report`` is called for runs that changed
        something (and for the first run).
        """
        stop = stop or threading.Event()
        with self.polling(only, full=full) as poll:
            first = True
            while not stop.is_set():
                try:
                    report = poll()
                except TransientError as exc:
                    # A one-shot sync reports it (exit 4); a watcher keeps what it merged and tries again.
                    log.warning("%s; polling again in %gs", exc.message, interval)
                    stop.wait(interval)
                    continue
                if on_report is not None and (first or report.changed or not report.ok
                                              or any(t.resynced for t in report.tables)):
                    on_report(report)
                first = False
                stop.wait(interval)

    @contextlib.contextmanager
    def polling(self, only: Iterable[str] | str | None = None, *, full: bool = False) -> Iterator[Callable[[], SyncReport]]:
        """Hold what a watcher holds (the lock, one staging connection) and give a function that runs one poll.

        The first call syncs (``full`` forces full loads); later calls are polls: tables whose delta is empty
        are not merged, so an idle poll leaves the warehouse file alone.
        """
        selection = resolve_selection(self.tables, only)
        with self.warehouse.lock(), responsive_threads(), self.warehouse.staging() as staging:
            # One staging connection for every poll: opening and closing it (a checkpoint) cost each poll
            # more than an idle poll's requests. Its commits are durable as they happen, as before.
            self._staging = staging
            runs = 0

            def poll() -> SyncReport:
                nonlocal runs
                report = self._run(selection, full=full and runs == 0, quiet_noop=runs > 0)
                runs += 1
                return report
            try:
                yield poll
            finally:
                self._staging = None

    # -- one run -----------------------------------------------------------------------------------------
    def _run(self, selection: list[str], *, full: bool, quiet_noop: bool) -> SyncReport:
        run_id = _now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        started = _now()
        if self._tokens is None:
            self.warehouse.bootstrap()
            stored = self.warehouse.state()
            self._tokens = {t: s.get("delta_link") for t, s in stored.items()}
            self._merged_stages = {t: s.get("stage_id") for t, s in stored.items()}
        reports: list[TableReport] = []
        records: list[RunRecord] = []
        fetched: list[StageState] = []
        noop: list[StageState] = []
        broken: dict[str, BridgekitError] = {}  # service, or * for all: the failure that stops its tables
        opened = contextlib.nullcontext(self._staging) if self._staging is not None else self.warehouse.staging()
        with opened as staging, self._prefetching(staging, selection, full=full):
            # A delta run stages every table in one transaction (a full load, even one started by a resync,
            # settles it and checkpoints its pages one by one, as they are what a resume goes on from).
            fetching = staging.one_transaction(up_to_rows=self.delta_commit_rows) if not full \
                else contextlib.nullcontext()
            with fetching:
                for table in self._in_arrival_order(selection):
                    t0, clock = _now(), time.monotonic()
                    if quiet_noop and self._unchanged(table):
                        # A watcher's poll found nothing new: nothing to stage, the stored link stays valid.
                        reports.append(TableReport(table=table, mode="delta", status="ok",
                                                   duration_s=time.monotonic() - clock))
                        continue
                    rep = TableReport(table=table, mode="full", status="ok")
                    service = table.split(".", 1)[0]
                    stop = broken.get("*") or broken.get(service)
                    try:
                        if stop is not None:
                            raise stop
                        state = self._fetch(staging, table, run_id=run_id, full=full, report=rep)
                    except BridgekitError as exc:
                        rep.status, rep.error, rep.failure = "error", exc.message, exc
                        if stop is not None:
                            rep.mode, rep.error = "skipped", f"not attempted: {exc.message}"
                        else:
                            log.debug("%s: %s", table, exc)
                            # The profile, the credential or the identity provider failed: every other table
                            # (of the service, or of both) would fail the same way, after the same retries.
                            scope = _failure_scope(exc)
                            if scope is not None:
                                broken[scope if scope == "*" else service] = exc
                        state = None
                    if state is not None:
                        rep.mode, rep.resynced = state.mode, state.resynced
                        rep.fetched, rep.pages = state.fetched, state.pages
                        rep.message = rep.message or state.message
                        if state.mode == "full" and not self.source(table).tracked:
                            state.digest = staging.digest(state)
                        if quiet_noop and self._same_as_merged(state):
                            noop.append(state)
                        else:
                            fetched.append(state)
                    rep.duration_s = time.monotonic() - clock
                    reports.append(rep)
                    records.append(RunRecord(run_id=run_id, table=table, mode=rep.mode, started_at=t0, ended_at=_now(),
                                             status=rep.status, fetched=rep.fetched, pages=rep.pages,
                                             resynced=rep.resynced, error=rep.error, message=rep.message,
                                             caught_up=state is not None and state.caught_up))
                # Nothing changed: keep the stored delta link (it still answers "no changes") and leave the
                # warehouse file alone, so an idle watcher never blocks readers.
                staging.discard(*(state.table for state in noop))
            if fetched or not quiet_noop or any(r.status == "error" for r in records):
                merge_clock = time.monotonic()
                counts = staging.merge(fetched, records, run_id=run_id, source=self.label)
                merge_s = time.monotonic() - merge_clock
                for rep in reports:
                    c = counts.get(rep.table)
                    if c is not None:
                        rep.created, rep.updated, rep.deleted = c.created, c.updated, c.deleted
                for state in fetched:
                    self._tokens[state.table] = state.token
                    if state.digest is not None:
                        self._digests[state.table] = state.digest
                log.debug("run %s merged %d table(s) in %.3fs", run_id, len(fetched), merge_s)
        rank = {t: i for i, t in enumerate(selection)}
        reports.sort(key=lambda r: rank.get(r.table, len(rank)))
        report = SyncReport(run_id, started, _now(), reports)
        quiet = {state.table for state in noop}
        for rep in reports:
            if rep.status == "error":
                continue
            if rep.table not in quiet and not (quiet_noop and rep.mode == "delta" and rep.fetched == 0):
                log.info("%s: %s%s, +%d ~%d -%d, %d fetched in %.2fs (%.0f rows/s)", rep.table, rep.mode,
                         " (resynced)" if rep.resynced else "", rep.created, rep.updated, rep.deleted,
                         rep.fetched, rep.duration_s, rep.throughput)
        return report

    @contextlib.contextmanager
    def _prefetching(self, staging: Staging, selection: list[str], *, full: bool) -> Iterator[None]:
        """Start every table's delta at once, before the tables are staged one by one.

        A delta run is mostly one small page per table (or per mailbox); fetched one after the other, the
        round trips add up. For each table with a delta link and nothing staged (no resume pending), one
        job finds the delta's first positions (for mailboxes: the users and their folders) and fetches
        the first page at each (a batch source's round at once): all tables' jobs run together. The
        checkpoint order is unchanged: the pages are still written by the staging thread, in order.
        """
        if full or self._tokens is None:
            yield
            return
        wanted: list[tuple[str, Source, str]] = []
        for table in selection:
            token = self._tokens.get(table)
            if not token or staging.get(table) is not None:
                continue
            source = self.source(table)
            if source.tracked:
                wanted.append((table, source, token))
        if len(wanted) < 2:
            yield
            return
        # One thread per table: the services' sessions bound what is in flight (their governors' slots).
        with ThreadPoolExecutor(max_workers=len(wanted), thread_name_prefix="bk-prefetch") as pool:
            self._jobs = {t: pool.submit(_first_round, src, token) for t, src, token in wanted}
            try:
                yield
            finally:
                for future in self._jobs.values():
                    future.cancel()
                self._jobs = {}

    def _in_arrival_order(self, selection: list[str]) -> Iterator[str]:
        """The tables to stage: those without a prefetched round first, then each as its round arrives.

        A poll's tables are staged one by one; taken in plan order, a table whose answer came back early
        waited for the slow ones before it (mailbox rounds queue behind each other in the session's slots).
        In arrival order the staging of each overlaps the requests still in flight.
        """
        jobs = {future: table for table, future in self._jobs.items() if table in selection}
        yield from (t for t in selection if t not in jobs.values())
        for future in as_completed(jobs):
            yield jobs[future]

    def _same_as_merged(self, state: StageState) -> bool:
        """True when a watcher's poll fetched nothing new for the table: an empty delta, or a table without
        change tracking whose full reload is row for row what the last merge of this engine wrote (so an
        idle watcher does not rewrite it, and lock readers out, at every poll)."""
        if state.mode == "delta":
            return state.fetched == 0
        return state.digest is not None and self._digests.get(state.table) == state.digest

    def _job(self, table: str) -> _Round | None:
        """The table's prefetched first round (None when there is none, or it is used up)."""
        future = self._jobs.get(table)
        if future is None:
            return None
        try:
            return future.result()
        except BaseException:
            self._jobs.pop(table, None)
            raise

    def _unchanged(self, table: str) -> bool:
        """True when the table's prefetched first round says nothing changed (the round is consumed)."""
        try:
            job = self._job(table)
        except Exception:
            return False  # the normal path finds the positions again and reports (or handles) the error
        if job is None:
            return False
        answers = job.answers if isinstance(job.answers, list) else [job.answers]
        for page in answers:
            if not isinstance(page, Page) or len(page.rows) or page.deletes or page.next is not None \
                    or page.reset is not None:
                return False
        self._jobs.pop(table, None)
        return True

    def _starts(self, source: Source, token: str) -> list[str]:
        """The delta's first positions: those the prefetch found, else the source's."""
        job = self._job(source.table)
        return list(job.cursors) if job is not None else source.delta_start(token)

    def _has_prefetched(self, source: Source, cursor: str) -> bool:
        job = self._jobs.get(source.table)
        if job is None or job.exception() is not None:  # waits for the job
            return False
        got = job.result()
        return got.cursors == [cursor] and isinstance(got.answers, Page | BaseException)

    def _page(self, source: Source, cursor: str) -> Page:
        """The page at ``cursor``: the prefetched one when there is one (its error, if it failed)."""
        job = self._jobs.get(source.table)
        if job is not None:
            got = job.result()
            if got.cursors == [cursor] and isinstance(got.answers, Page | BaseException):
                self._jobs.pop(source.table, None)
                if isinstance(got.answers, BaseException):
                    raise got.answers
                return got.answers
        return source.page(cursor)

    def _round(self, source: BatchSource, cursors: list[str]) -> list[Page | BaseException]:
        """The pages at ``cursors``: the prefetched first round when it asked for exactly these."""
        job = self._jobs.get(source.table)
        if job is not None:
            got = job.result()
            if got.cursors == cursors and isinstance(got.answers, list):
                self._jobs.pop(source.table, None)
                return got.answers
        return source.pages(cursors)

    def _fetch(self, staging: Staging, table: str, *, run_id: str, full: bool, report: TableReport) -> StageState | None:
        """Fetch one table into staging (resuming, full, or delta) and return its fetched state.

        Pages staged by an earlier, interrupted process were read at some time in the past: a resumed
        table always ends with a catch-up round, a delta from the link its staged rounds end with (a
        link taken before their first page), so what changed meanwhile, deletes included, is in the
        same merge. A table without change tracking has no such link and is reloaded instead.
        """
        assert self._tokens is not None
        source = self.source(table)
        state = staging.get(table)
        if state is not None and self._merged_stages.get(table) == state.stage_id:
            # The interrupted process merged these pages and died before clearing them: the stored link
            # is theirs, so this run goes on from it like any other.
            staging.discard(table)
            state = None
        if state is not None and ((full and state.mode == "delta") or not source.tracked):
            staging.discard(table)  # --full overrides an interrupted delta; an untracked table reloads
            state = None
        resumed = state is not None
        if state is not None and state.mode == "full" and source.tracked:
            staging.settle()  # a resumed full load checkpoints each page
        if state is not None:
            report.resumed = True
            log.info("%s: resuming an interrupted %s fetch (%d rows staged%s)", table, state.mode, state.fetched,
                     ", fetched" if state.status == "fetched" else "")
        else:
            token = self._tokens.get(table)
            if not source.tracked and self.untracked == "skip":
                report.mode, report.status = "skipped", "skipped"
                report.message = "change tracking is not enabled on this table; skipped (use --full to load it)"
                if not full:
                    return None
            if full or not token or not source.tracked:
                state = self._begin_full(staging, source, run_id, resynced=False)
            else:
                state = staging.begin(source.spec(), run_id=run_id, mode="delta",
                                      cursors=self._starts(source, token), base_token=token)
                state.position_at = _now()
        resyncs = 0
        no_link = False
        link: str | None = None
        while True:
            try:
                if state.status != "fetched":
                    self._fetch_parts(staging, source, state)
                    # A delta link taken before a full load: replay what changed since then before the
                    # merge, so the merged table is current, not a mix of old and new pages.
                    if state.mode == "full" and state.token and source.tracked and _rounds(state) == 0:
                        issued_here = not resumed
                        self._add_round(staging, source, state, state.token)
                        state.caught_up, resumed = resumed, False  # this round starts now: it is the catch-up
                        try:
                            self._fetch_parts(staging, source, state)
                        except ResyncRequired:
                            if not issued_here:
                                raise  # a link issued long ago: reload (below)
                            # The service refuses the link it has just issued: reloading again would not
                            # help. Keep this (fresh) load and no link, so the next run reloads in full.
                            no_link = True
                    link = None if no_link or not source.tracked else self._link(source, state)
                elif source.tracked:
                    link = state.token
                if resumed and link is not None:
                    # Pages staged by an earlier process: catch up from the link their rounds end with.
                    resumed = False
                    self._add_round(staging, source, state, link)
                    self._fetch_parts(staging, source, state)
                    state.caught_up = True
                    link = self._link(source, state)
                break
            except ResyncRequired as exc:
                resyncs += 1
                if resyncs > MAX_RESYNCS:
                    raise SyncError(f"{table}: the service keeps asking for a resync ({exc.message})",
                                    table=table) from exc
                log.warning("%s: %s; reloading in full", table, exc.message)
                resumed = False
                state = self._begin_full(staging, source, run_id, resynced=True)
        if not source.tracked:
            state.message = "change tracking is not enabled on this table: reloaded in full"
        elif no_link:
            state.message = "the service refused a fresh delta link: the next run reloads in full"
        elif state.caught_up:
            state.message = "caught up with the changes made since the staged pages were read"
        staging.mark_fetched(state, link)
        return state

    def _add_round(self, staging: Staging, source: Source, state: StageState, link: str) -> None:
        """Start a catch-up round (a delta from ``link``) after the staged rounds of ``state``."""
        state.position_at = _now()
        staging.add_cursors(state, source.delta_start(link), first=(_rounds(state) + 1) * CATCH_UP)

    def _link(self, source: Source, state: StageState) -> str:
        """The table's delta link: its last round's partitions' links, joined."""
        last = _rounds(state)
        parts = [state.part_tokens.get(p) for p in sorted(state.cursors) if p // CATCH_UP == last]
        if not parts or any(t is None for t in parts):
            raise SyncError(f"{source.table}: the read ended without a delta link", table=source.table,
                            hint="the service did not return @odata.deltaLink; run the sync again")
        return source.join_tokens([t for t in parts if t is not None])

    def _begin_full(self, staging: Staging, source: Source, run_id: str, *, resynced: bool) -> StageState:
        if source.tracked:
            # A tracked table's full load checkpoints each page: a resume goes on from them. (An untracked
            # table is reloaded whole every run, resumed or not: its pages stay in the run's transaction.)
            staging.settle()
        plan = source.plan_full(self.partitions)
        msg = "delta token expired: reloaded in full" if resynced else None
        state = staging.begin(source.spec(), run_id=run_id, mode="full", cursors=plan.cursors, token=plan.token,
                              resynced=resynced, message=msg)
        state.message = msg
        state.position_at = _now()
        self._estimates[source.table] = plan.estimate
        return state

    def _write(self, staging: Staging, state: StageState, part: int, page: Page, bar: _Progress) -> None:
        batch = to_arrow(state.spec, page.rows) if len(page.rows) else None
        staging.write_page(state, part, batch, page.deletes, page.versions, page.next, token=page.token,
                           reset=page.reset)
        bar.update(len(page.rows) + len(page.deletes))

    def _fetch_parts(self, staging: Staging, source: Source, state: StageState) -> None:
        """Fetch the unfinished partitions concurrently; one thread writes the checkpoints, in order."""
        todo = [(p, c) for p, c in state.cursors.items() if c is not None]
        bar = _Progress(self._show_progress(), source.table,
                        self._estimates.get(source.table) if state.mode == "full" else None)
        if state.fetched:
            bar.update(state.fetched)
        try:
            if not todo:
                return
            batch = as_batch(source)
            if batch is not None and len(todo) > 1 and state.mode == "delta":
                self._fetch_rounds(staging, batch, state, todo, bar)
                return
            # Even one partition goes through a fetcher thread: it fetches the next page while this thread
            # shapes and checkpoints the current one. A bounded queue keeps memory flat: fetchers wait
            # while the writer catches up.
            pages: queue.Queue[tuple[int, Page | RawPage | BaseException | None]] = queue.Queue(
                maxsize=len(todo) + 1)
            stop = threading.Event()
            split = as_split(source)

            def fetch(part: int, cursor: str) -> None:
                cur: str | None = cursor
                try:
                    while cur is not None and not stop.is_set():
                        # A split source hands over the page as fetched and goes on to the next request
                        # while the writer decodes and shapes it: the service never waits for that.
                        item = self._page(source, cur) if split is None or self._has_prefetched(source, cur) \
                            else split.fetch(cur)
                        pages.put((part, item))
                        cur = item.next
                    pages.put((part, None))
                except BaseException as exc:  # handed to the writer thread, which re-raises it
                    pages.put((part, exc))

            with ThreadPoolExecutor(max_workers=min(len(todo), self.concurrency),
                                    thread_name_prefix="bk-sync") as pool:
                for part, cursor in todo:
                    pool.submit(fetch, part, cursor)
                running = len(todo)
                error: BaseException | None = None
                try:
                    while running:
                        part, item = pages.get()
                        if item is None:
                            running -= 1
                        elif isinstance(item, BaseException):
                            running -= 1
                            if error is None:
                                error = item
                                stop.set()
                        elif error is None:
                            if isinstance(item, RawPage):
                                assert split is not None
                                item = split.shape(item)  # an error stops the fetchers (finally below)
                            self._write(staging, state, part, item, bar)
                finally:
                    stop.set()
                    # Unblock fetchers waiting on a full queue so the pool can shut down.
                    while True:
                        try:
                            pages.get_nowait()
                        except queue.Empty:
                            break
                if error is not None:
                    raise error
        finally:
            bar.close()

    def _fetch_rounds(self, staging: Staging, source: BatchSource, state: StageState, todo: list[tuple[int, str]],
                      bar: _Progress) -> None:
        """A delta of many partitions (mailboxes): each round asks every unfinished partition for its next page
        at once (the source batches them), then checkpoints the pages in partition order.

        Full loads keep the per-partition fetchers: their pages are large, and a round of them at once
        would hold them all in memory.
        """
        while todo:
            answers = self._round(source, [c for _, c in todo])
            error: BaseException | None = None
            following: list[tuple[int, str]] = []
            done: list[StagedPage] = []
            for (part, _cursor), answer in zip(todo, answers, strict=True):
                if isinstance(answer, BaseException):
                    error = error or answer
                    continue
                done.append(StagedPage(part, to_arrow(state.spec, answer.rows) if len(answer.rows) else None,
                                       answer.deletes, answer.versions, answer.next, answer.token, answer.reset))
                if answer.next is not None:
                    following.append((part, answer.next))
            # Every page that came back is checkpointed, even when another partition failed: the round in
            # one transaction.
            if done:
                staging.write_pages(state, done)
                bar.update(sum((p.rows.num_rows if p.rows is not None else 0) + len(p.deletes) for p in done))
            if error is not None:
                raise error
            todo = following
