"""The migration engine: validate against live metadata, plan against the synced target, write in checkpointed $batch calls, reconcile, roll back.

How a run goes (:meth:`Migration.execute`), top to bottom:

1. **Metadata.** The target table's live metadata is read and the mapping checked against it
   (:func:`~bridgekit.migration.target.load_target`): unknown or read-only columns, a key that is not
   an alternate key, unmapped required columns. Nothing is read from the source until this passes.
2. **Current state.** A delta sync brings the target table (and tables that lookups resolve through
   the warehouse) up to date in the profile's warehouse.
3. **Validation and plan.** Source rows stream in chunks: transforms, then each value checked against
   its column (type, length, option values, required), lookups resolved in bulk (by alternate key with
   a live query, or through a synced warehouse). A row with any problem goes to the ``rejects`` table
   with every reason; a valid row is compared with the target row of the same key: ``create``,
   ``update`` (only the differing fields are sent) or ``unchanged``. Each chunk's plan is written to the
   run's checkpoint (:mod:`bridgekit.migration.checkpoint`) before any of its rows is written to
   Dataverse. A dry run plans everything and stops here (:meth:`Migration.plan`).
4. **Execution.** Batches of the plan go out as ``$batch`` calls with atomic change sets, several at
   once (never more than the session's governor allows, which also pauses every thread on a 429).
   An execution sends each batch as soon as planned rows fill it, while later chunks are still being
   planned; a run stopped while planning resumes by planning only the source rows not planned yet.
   Creates are sent with ``If-None-Match: *`` and updates with ``If-Match: *`` (protocols.md §1.8), so
   each answer says exactly what happened and a row created meanwhile by someone else is never
   overwritten blindly. Each batch is marked *in flight* before it is sent and *done*, with its rows'
   results, in one transaction after. A killed run resumes from the checkpoint: batches in flight are
   checked against the live rows first, so what already landed is not written again.
5. **Reconciliation.** Another delta sync, then counts and per-column checksums of the intended values
   against the target's, and the rows that differ, graded green / amber / red (:func:`reconcile`).
6. **Rollback.** Rows this run created (answered 204 to a create) are deleted by their alternate key
   (:func:`rollback`); rows it updated are left as they are.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bridgekit.errors import ConfigError, MigrationIncomplete, SyncError
from bridgekit.http import json_text
from bridgekit.migration.checkpoint import Checkpoint, checkpoint_path
from bridgekit.migration.mapping import LookupMap, load_mapping, parse_mapping
from bridgekit.migration.mapping import Mapping as MigrationMapping
from bridgekit.migration.sources import Source, open_source
from bridgekit.migration.target import PLATFORM_DEFAULTED, TargetColumn, TargetSchema, load_target
from bridgekit.migration.values import ValueProblem, apply_transforms, canon, coerce, json_value

__all__ = [
    "ExecutionReport",
    "Migration",
    "MigrationIncomplete",
    "MigrationOutcome",
    "Plan",
    "Reconciliation",
    "RollbackReport",
    "new_run_id",
    "reconcile",
    "rejects",
    "results",
    "rollback",
    "run_migration",
    "sync_tables",
]

log = logging.getLogger("bridgekit.migration")

_PLAN_CHUNK = 2000  # source rows validated and diffed per warehouse query (each opens the warehouse once)
# An execution plans its first rows in pieces growing from one batch to _PLAN_CHUNK, so the first batch
# goes out after one batch of rows is planned instead of a whole chunk; later chunks stay large.
_RAMP = 2
_LOOKUP_CHUNK = 50  # values per live lookup query (an `or` of `eq`s; URLs stay short)
_SEP = "\x1f"
_LOOKUP_TYPES = ("Lookup", "Customer", "Owner")
_MASK = (1 << 128) - 1


def new_run_id() -> str:
    """``mig-<UTC timestamp>-<random>``."""
    return "mig-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def sync_tables(workbench: Any, tables: Iterable[str]) -> Any:
    """Delta-sync Dataverse ``tables`` into ``workbench``'s warehouse (whether or not its profile plans them).

    Raises:
        SyncError: a table failed to sync.
    """
    ids = list(dict.fromkeys(f"dataverse.{t}" for t in tables))
    report = workbench.sync_engine(progress=False, tables=ids).run()
    if not report.ok:
        bad = [t for t in report.tables if t.status == "error"]
        raise SyncError(f"syncing {', '.join(t.table for t in bad)} failed: {bad[0].error}", table=bad[0].table)
    return report


def _key_norm(values: Sequence[Any], cols: Sequence[TargetColumn]) -> str:
    return _SEP.join((canon(v, c.type, date_only=c.date_only) or "").lower() for v, c in zip(values, cols, strict=True))


def _multiset_hash(items: Iterable[str]) -> str:
    """An order-independent checksum: the sum of each item's SHA-256 (first 128 bits), mod 2^128."""
    total = 0
    for item in items:
        total = (total + int.from_bytes(hashlib.sha256(item.encode("utf-8")).digest()[:16], "big")) & _MASK
    return f"{total:032x}"


def _state_dir(workbench: Any, state_dir: str | Path | None) -> Path:
    if state_dir:
        return Path(state_dir).expanduser()
    return Path(workbench.profile.warehouse_path).parent / "migrations"


def _md_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str("" if v is None else v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


# -- reports --------------------------------------------------------------------------------------------------


class _Markdown:
    """Reports render as markdown: in notebooks (``_repr_markdown_``) and as their ``str``."""

    def to_markdown(self) -> str:
        raise NotImplementedError

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()


@dataclass
class Plan(_Markdown):
    """What a run would do (or did plan): counts, samples with field-level differences, and rejects.

    Attributes:
        run_id: The run whose checkpoint holds the full plan.
        target: The table.
        source: The source description.
        counts: ``{"source_rows", "create", "update", "unchanged", "rejected", "batches"}``.
        samples: Per action, a few rows: ``{"key", "row_no", "changes": {column: [current, intended]}}``.
        reject_samples: A few rejects: ``{"row_no", "key", "columns", "reason"}``.
        dry_run: True when nothing will be written.
    """

    run_id: str
    target: str
    source: str
    counts: dict[str, int]
    samples: dict[str, list[dict[str, Any]]]
    reject_samples: list[dict[str, Any]]
    dry_run: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for run records)."""
        return {"run_id": self.run_id, "target": self.target, "source": self.source, "counts": self.counts,
                "samples": self.samples, "reject_samples": self.reject_samples, "dry_run": self.dry_run}

    def to_markdown(self) -> str:
        """The plan as a markdown report."""
        c = self.counts
        lines = [f"### Migration plan{' (dry run: nothing written)' if self.dry_run else ''}",
                 f"run `{self.run_id}`: `{self.source}` -> Dataverse `{self.target}`", ""]
        lines += _md_table(("source rows", "create", "update", "unchanged", "rejected", "batches"),
                           [(c.get("source_rows"), c.get("create"), c.get("update"), c.get("unchanged"),
                             c.get("rejected"), c.get("batches"))])
        for action in ("create", "update", "unchanged"):
            rows = self.samples.get(action) or []
            if not rows:
                continue
            lines += ["", f"**{action}** (first {len(rows)})", ""]
            if action == "update":
                lines += _md_table(("row", "key", "column", "current", "intended"),
                                   [(s["row_no"], s["key"], col, cur, new) for s in rows
                                    for col, (cur, new) in s["changes"].items()])
            else:
                lines += _md_table(("row", "key"), [(s["row_no"], s["key"]) for s in rows])
        if self.reject_samples:
            lines += ["", f"**rejected** (first {len(self.reject_samples)} of {c.get('rejected')})", ""]
            lines += _md_table(("row", "key", "columns", "reason"),
                               [(r["row_no"], r["key"], r["columns"], r["reason"]) for r in self.reject_samples])
        return "\n".join(lines)


@dataclass
class ExecutionReport(_Markdown):
    """What an execution wrote: per status counts, batches, sends, time, and whether it resumed."""

    run_id: str
    target: str
    plan: Plan
    counts: dict[str, int]
    batches: int
    duration_s: float
    resumed: bool = False
    verified_after_interruption: int = 0
    throttled: int = 0
    #: From the start to the last source row planned (metadata, sync, validation and plan).
    plan_s: float = 0.0
    #: From the first batch sent to the last one answered; it overlaps ``plan_s`` because batches go out
    #: as soon as they are full, while later rows are still being planned.
    write_s: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every planned row was written, found unchanged, or refused for good."""
        return self.counts.get("pending", 0) == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"run_id": self.run_id, "target": self.target, "counts": self.counts, "batches": self.batches,
                "duration_s": round(self.duration_s, 3), "resumed": self.resumed,
                "verified_after_interruption": self.verified_after_interruption, "throttled": self.throttled,
                "plan_s": round(self.plan_s, 3), "write_s": round(self.write_s, 3), "plan": self.plan.counts}

    def to_markdown(self) -> str:
        """The execution as a markdown report."""
        c = self.counts
        lines = [f"### Migration executed{' (resumed)' if self.resumed else ''}",
                 f"run `{self.run_id}` -> `{self.target}` in {self.duration_s:.1f}s, {self.batches} batches", ""]
        lines += _md_table(("created", "updated", "unchanged", "failed", "pending", "rejected"),
                           [(c.get("created"), c.get("updated"), c.get("unchanged"), c.get("failed"),
                             c.get("pending"), c.get("rejected"))])
        lines += ["", f"validation and plan {self.plan_s:.1f}s, writes {self.write_s:.1f}s "
                      f"({(c.get('created', 0) + c.get('updated', 0)) / self.write_s if self.write_s else 0:.0f} rows/s)"
                      + (", overlapping" if self.plan_s + self.write_s > self.duration_s + 0.05 else "")]
        if self.verified_after_interruption:
            lines += ["", f"{self.verified_after_interruption} row(s) of batches in flight when the previous "
                          "process stopped were found already written and were not sent again."]
        return "\n".join(lines)


@dataclass
class Reconciliation(_Markdown):
    """Source (intended values) against target (the synced table) after a run.

    Attributes:
        status: ``green`` (everything matches), ``amber`` (matches, but rows were rejected, failed or are
            pending), ``red`` (rows missing or fields differing).
        counts: ``source_rows``, ``compared``, ``matched``, ``missing``, ``mismatched``, ``rejected``,
            ``failed``, ``pending``.
        checksums: Per column ``{"source", "target", "match"}``.
        differences: A sample of ``{"key", "column", "source", "target"}`` (``column`` is ``*`` for a
            missing row).
    """

    run_id: str
    target: str
    status: str
    counts: dict[str, int]
    checksums: dict[str, dict[str, Any]]
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def detail(self) -> str:
        """One line for a check record."""
        c = self.counts
        return (f"{c['matched']}/{c['compared']} rows match; {c['missing']} missing, {c['mismatched']} differing, "
                f"{c['rejected']} rejected, {c['failed']} failed, {c['pending']} pending")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"run_id": self.run_id, "target": self.target, "status": self.status, "counts": self.counts,
                "checksums": self.checksums, "differences": self.differences}

    def to_markdown(self) -> str:
        """The reconciliation as a markdown report."""
        lines = [f"### Reconciliation: **{self.status.upper()}**", f"run `{self.run_id}` -> `{self.target}`: "
                 + self.detail, ""]
        lines += _md_table(("column", "source checksum", "target checksum", "match"),
                           [(col, v["source"][:12], v["target"][:12], "yes" if v["match"] else "NO")
                            for col, v in self.checksums.items()])
        if self.differences:
            lines += ["", "**differences**", ""]
            lines += _md_table(("key", "column", "source", "target"),
                               [(d["key"], d["column"], d["source"], d["target"]) for d in self.differences])
        return "\n".join(lines)


@dataclass
class RollbackReport:
    """What a rollback deleted: rows this run created, by alternate key."""

    run_id: str
    target: str
    deleted: int
    already_gone: int
    failed: int
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"run_id": self.run_id, "target": self.target, "deleted": self.deleted,
                "already_gone": self.already_gone, "failed": self.failed, "errors": self.errors}

    def to_markdown(self) -> str:
        """The rollback as a markdown report."""
        return "\n".join([f"### Rollback of run `{self.run_id}`", "", *_md_table(("deleted", "already gone", "failed"), [(self.deleted, self.already_gone, self.failed)])])

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


# -- the engine -----------------------------------------------------------------------------------------------


class Migration:
    """A migration of one source into one Dataverse table, described by a mapping.

    Args:
        workbench: The target :class:`~bridgekit.workbench.Workbench` (its Dataverse client and warehouse).
        mapping: A :class:`~bridgekit.migration.mapping.Mapping` or the path of a mapping YAML file.
        source: A :class:`~bridgekit.migration.sources.Source`, a spec for
            :func:`~bridgekit.migration.sources.open_source`, or None for the mapping's own ``source``.
        state_dir: Where run checkpoints go (default: ``migrations/`` next to the profile's warehouse).
        batch_size, change_set_size, concurrency: Override the mapping's options.

    Example:
        >>> mig = Migration(wb, "mappings/accounts.yaml", source="legacy/accounts.csv")  # doctest: +SKIP
        >>> mig.plan()                                  # dry run: counts, samples, rejects  # doctest: +SKIP
        >>> report = mig.execute(run_id="acc-2024-06")  # writes; rerun the same id to resume  # doctest: +SKIP
        >>> reconcile(wb, "acc-2024-06").status         # doctest: +SKIP
        'green'
    """

    def __init__(self, workbench: Any, mapping: MigrationMapping | str | Path, source: Any = None, *,
                 state_dir: str | Path | None = None,
                 batch_size: int | None = None, change_set_size: int | None = None,
                 concurrency: int | None = None) -> None:
        self.workbench = workbench
        self.mapping = mapping if isinstance(mapping, MigrationMapping) else load_mapping(mapping)
        spec = source if source not in (None, "") else self.mapping.source
        if spec is None:
            raise ConfigError("no source: give one, or add `source:` to the mapping",
                              hint="e.g. source='accounts.csv' or 'profile:legacy:dataverse.account'")
        if isinstance(spec, Mapping) and spec.get("profile") and not spec.get("kind"):
            spec = {**spec, "kind": "warehouse"}  # another profile's synced warehouse
        self.source: Source = open_source(spec, base_dir=self.mapping.base_dir, workbench=workbench)
        opts = self.mapping.options
        self.batch_size = max(1, min(batch_size or opts.batch_size, 1000))
        self.change_set_size = max(1, change_set_size or opts.change_set_size)
        self.concurrency = max(1, concurrency or opts.concurrency)
        self.sample_size = opts.sample_size
        self.state_dir = _state_dir(workbench, state_dir)
        self._schema: TargetSchema | None = None
        self._lookup_cache: dict[tuple[str, str], str | tuple[str, ...] | None] = {}
        self._cache_lock = threading.Lock()
        self._reader: Any = None  # the target warehouse's held reader while a plan runs

    # -- public entry points ----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The target's Dataverse client."""
        return self.workbench.dataverse

    def schema(self) -> TargetSchema:
        """The target's live metadata, checked against the mapping (cached per migration)."""
        if self._schema is None:
            self._schema = load_target(self.client, self.mapping)
            for lk in self.mapping.lookups:
                if lk.key and (lk.key,) not in [tuple(k) for k in self.client.alternate_keys(lk.table)]:
                    raise ConfigError(f"lookups.{lk.target}: '{lk.key}' is not an alternate key of {lk.table}",
                                      hint="resolve through the warehouse instead: {match: <column>, via: warehouse}")
        return self._schema

    def plan(self, run_id: str | None = None) -> Plan:
        """Dry run: validate every source row and plan creates/updates/unchanged. Writes nothing to Dataverse.

        The plan and the rejects are kept in the run's checkpoint (see :func:`rejects`).
        """
        run_id = run_id or new_run_id()
        self.schema()  # a mapping that does not fit the table fails before anything is recorded
        with self._open(run_id, fresh=True) as cp:
            plan = self._plan(cp, run_id, mode="dry_run")
            cp.set_status("planned", {"plan": plan.to_dict()})
            return plan

    def execute(self, run_id: str | None = None, *, raise_on_incomplete: bool = True) -> ExecutionReport:
        """Validate, plan and write; or resume run ``run_id`` where it stopped.

        Raises:
            MigrationIncomplete: rows are still pending (throttled out / service unavailable) and
                ``raise_on_incomplete`` is true; run again with the same run id.
            ConfigError: the mapping does not fit the table, or the run id belongs to another mapping.
        """
        run_id = run_id or new_run_id()
        started = time.monotonic()
        self.schema()
        path = checkpoint_path(self.state_dir, run_id)
        resumed = path.exists()
        # While rows are planned, the sender threads give up the GIL at every TLS record and, at the default
        # 5 ms switch interval, wait behind the planning thread to get it back: the service sits idle
        # between batches. The sync's shorter interval (counted, restored by the last user) applies here too.
        from bridgekit.sync import responsive_threads

        with Checkpoint(path) as cp, responsive_threads():
            run = cp.run()
            if run is not None and run["mode"] != "execute":
                raise ConfigError(f"run {run_id} was a {run['mode']}; executions take a new run id",
                                  hint="omit run_id to get a fresh one")
            if run is not None and run["mapping_sha"] != self.mapping.sha256:
                raise ConfigError(f"run {run_id} was planned with a different mapping",
                                  hint="resume with the mapping the run started with, or use a new run id")
            sender = _Sender(self, cp)
            try:
                if run is None or run["status"] == "planning":
                    if run is not None and not cp.writes_started():  # killed while planning, before any write
                        cp.close()
                        path.unlink()
                        for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                            extra.unlink(missing_ok=True)
                        return self.execute(run_id, raise_on_incomplete=raise_on_incomplete)
                    if run is None:
                        cp.start(run_id=run_id, target=self.mapping.target, key=self.mapping.key,
                                 mapping=self.mapping.text, mapping_sha=self.mapping.sha256,
                                 source=self.source.description, profile=self.workbench.profile.name, mode="execute")
                        resumed, verified, after = False, 0, 0
                    else:
                        # Killed while planning, after writing had started: check what was in flight, then
                        # plan the source rows not planned yet. Rows already planned keep their plan.
                        verified, after = self._verify_in_flight(cp), cp.last_planned_row()
                    # Batches are written as soon as they are full, while later rows are still planned.
                    plan = self._plan(cp, run_id, mode="execute", after_row=after, on_batches=sender.send_pending)
                    cp.set_status("executing", {"plan": plan.to_dict()})
                else:
                    plan = _stored_plan(cp)
                    verified = self._verify_in_flight(cp)
                planned = time.monotonic()
                sender.send_pending()
                throttled = sender.finish()
            except BaseException:
                # Stop sending on an error that is not per-row (auth, permissions, a source failure while
                # planning): batches not started stay pending, the ones in flight are verified by the next run.
                sender.abort()
                raise
            counts = _result_counts(cp)
            ended = time.monotonic()
            first_sent = sender.first_sent if sender.first_sent is not None else planned
            report = ExecutionReport(run_id, self.mapping.target, plan, counts, int(plan.counts.get("batches", 0)),
                                     ended - started, resumed=resumed, verified_after_interruption=verified,
                                     throttled=throttled, plan_s=planned - started, write_s=ended - first_sent)
            cp.set_status("executed" if report.complete else "executing",
                          {"plan": plan.to_dict(), "execution": report.to_dict()})
        if not report.complete and raise_on_incomplete:
            raise MigrationIncomplete(f"run {run_id}: {counts['pending']} row(s) not written yet "
                                      "(throttled or service unavailable)", status=None, service="dataverse")
        return report

    def reconcile(self, run_id: str) -> Reconciliation:
        """Delta-sync the target and compare it with the run's intended values (see :func:`reconcile`)."""
        return reconcile(self.workbench, run_id, state_dir=self.state_dir)

    def rollback(self, run_id: str) -> RollbackReport:
        """Delete the rows run ``run_id`` created (see :func:`rollback`)."""
        return rollback(self.workbench, run_id, state_dir=self.state_dir, batch_size=self.batch_size)

    # -- planning ---------------------------------------------------------------------------------------

    def _open(self, run_id: str, *, fresh: bool) -> Checkpoint:
        path = checkpoint_path(self.state_dir, run_id)
        if fresh and path.exists():
            raise ConfigError(f"run id {run_id} already exists in {self.state_dir}",
                              hint="dry runs take a new run id (omit it to get one)")
        cp = Checkpoint(path)
        if fresh:
            cp.start(run_id=run_id, target=self.mapping.target, key=self.mapping.key, mapping=self.mapping.text,
                     mapping_sha=self.mapping.sha256, source=self.source.description,
                     profile=self.workbench.profile.name, mode="dry_run")
        return cp

    def _workbench(self, profile: str | None) -> Any:
        return self.workbench.other(profile) if profile else self.workbench

    def _plan(self, cp: Checkpoint, run_id: str, *, mode: str, after_row: int = 0,
              on_batches: Callable[[], None] | None = None) -> Plan:
        """Validate and plan every source row after ``after_row``; ``on_batches`` is called whenever planned
        rows fill new batches (numbered already), so they can be written while planning goes on."""
        schema = self.schema()
        have = set(self.source.columns())
        missing = [c for c in self.mapping.source_columns if c not in have]
        if missing:
            raise ConfigError(f"source {self.source.description} has no column(s) {', '.join(missing)}",
                              hint=f"source columns: {', '.join(sorted(have))}")
        # The current target (and warehouse lookup tables of this profile), synced before any comparison.
        own = [lk.table for lk in self.mapping.lookups if lk.via_warehouse and not lk.profile]
        sync_tables(self.workbench, [schema.table, *own])
        key_cols = [schema.columns[k] for k in self.mapping.key]
        # A dry run has no writes to start early: it plans whole chunks from the first.
        piece = self.batch_size if on_batches is not None else _PLAN_CHUNK
        # Each chunk's current target rows come from the warehouse: one connection serves the chunks of
        # a second instead of one file open per chunk.
        with self.workbench.warehouse.held_reader() as reader:
            self._reader = reader
            try:
                source_rows = self._plan_source(cp, schema, key_cols, piece, after_row, on_batches)
            finally:
                self._reader = None
        batches = cp.number_batches(self.batch_size)
        return _summarise(cp, run_id, schema.table, self.source.description, source_rows, batches,
                          dry_run=mode == "dry_run", sample_size=self.sample_size)

    def _plan_source(self, cp: Checkpoint, schema: TargetSchema, key_cols: list[TargetColumn], piece: int,
                     after_row: int, on_batches: Callable[[], None] | None) -> int:
        """Plan the source rows after ``after_row`` in pieces (the first ones ``piece`` rows); returns the
        number of source rows read."""
        source_rows = 0
        row_no = 0
        for chunk in self.source.batches(_PLAN_CHUNK):
            numbered = []
            for row in chunk:
                row_no += 1
                numbered.append((row_no, row))
            source_rows += len(chunk)
            numbered = [(n, row) for n, row in numbered if n > after_row]
            start = 0
            while start < len(numbered):
                part = numbered[start:start + piece]
                start += len(part)
                piece = min(piece * _RAMP, _PLAN_CHUNK)
                self._plan_chunk(cp, schema, key_cols, part)
                if on_batches is not None:
                    cp.number_batches(self.batch_size, complete=False)
                    on_batches()
        return source_rows

    def _plan_chunk(self, cp: Checkpoint, schema: TargetSchema, key_cols: list[TargetColumn],
                    rows: list[tuple[int, dict[str, Any]]]) -> None:
        m = self.mapping
        prepared: list[tuple[int, dict[str, Any], dict[str, Any], dict[str, str]]] = []
        problems: dict[int, list[tuple[str, str]]] = {}
        lookup_values: dict[str, dict[int, str]] = {lk.target: {} for lk in m.lookups}
        for row_no, row in rows:
            values: dict[str, Any] = {}
            errs: list[tuple[str, str]] = []
            for cm in m.columns:
                col = schema.columns[cm.target]
                raw = row.get(cm.source) if cm.source else cm.value
                try:
                    value = apply_transforms(raw, cm.transforms)
                    values[cm.target] = coerce(value, type=col.type, max_length=col.max_length, options=col.options,
                                               precision=col.precision, date_only=col.date_only,
                                               choice_labels=cm.choice_labels)
                except ValueProblem as exc:
                    errs.append((cm.target, f"{cm.target}: {exc.reason}"))
                    continue
                if values[cm.target] is None and (col.required or cm.target in m.key):
                    what = "alternate key column" if cm.target in m.key else "required column"
                    errs.append((cm.target, f"{cm.target}: {what} is empty"))
            for lk in m.lookups:
                try:
                    value = apply_transforms(row.get(lk.source), lk.transforms)
                except ValueProblem as exc:
                    errs.append((lk.target, f"{lk.target}: {exc.reason}"))
                    continue
                if value is not None and str(value).strip():
                    lookup_values[lk.target][row_no] = str(value).strip()
                elif schema.columns[lk.target].required:
                    errs.append((lk.target, f"{lk.target}: required lookup is empty"))
            if errs:
                problems[row_no] = errs
            prepared.append((row_no, row, values, {}))
        resolved: dict[str, dict[int, str | tuple[str, ...] | None]] = {}
        for lk in m.lookups:
            resolved[lk.target] = self._resolve(lk, lookup_values[lk.target])
        ids: dict[int, dict[str, str]] = {}
        for row_no, _row, _values, _ in prepared:
            ids[row_no] = {}
            for lk in m.lookups:
                if row_no not in lookup_values[lk.target]:
                    continue
                hit = resolved[lk.target].get(row_no)
                shown = lookup_values[lk.target][row_no]
                where = f"{lk.key}" if lk.key else f"{lk.match} (warehouse{' of ' + lk.profile if lk.profile else ''})"
                if hit is None:
                    problems.setdefault(row_no, []).append(
                        (lk.target, f"{lk.target}: no {lk.table} with {where} = '{shown}'"))
                elif isinstance(hit, tuple):
                    problems.setdefault(row_no, []).append(
                        (lk.target, f"{lk.target}: {len(hit)} {lk.table} rows have {where} = '{shown}' (ambiguous)"))
                else:
                    ids[row_no][lk.target] = hit
        valid = [(n, r, v) for n, r, v, _ in prepared if n not in problems]
        keys = {n: _key_norm([v[k] for k in m.key], key_cols) for n, _r, v in valid}
        current = self._current(schema, key_cols, list(keys.values()))
        with cp.transaction() as conn:
            for row_no, row, _values, _ in prepared:
                if row_no in problems:
                    errs = problems[row_no]
                    key_text = "/".join(str(row.get(c.source) or "") for c in m.columns if c.target in m.key and c.source)
                    cp.reject(conn, row_no=row_no, key=key_text or None, columns=[c for c, _ in errs],
                              reason="; ".join(r for _, r in errs), row=row)
            # The first source row with a key wins; a later one is rejected naming it. Rows are in source
            # order, so the winner is in an earlier chunk (one lookup) or earlier in this one.
            first = cp.planned_keys(conn, list(keys.values()))
            planned: list[tuple[Any, ...]] = []
            duplicates: list[tuple[int, dict[str, Any], dict[str, Any], int]] = []
            for row_no, row, values in valid:
                key = keys[row_no]
                if key in first:
                    duplicates.append((row_no, row, values, first[key]))
                    continue
                first[key] = row_no
                entry = self._entry(schema, values, ids[row_no], current.get(key))
                planned.append((row_no, key, json_text({k: json_value(values[k]) for k in m.key}), entry["action"],
                                json_text(entry["payload"]), json_text(entry["intended"]), json_text(entry["diff"]),
                                "unchanged" if entry["action"] == "unchanged" else "planned"))
            cp.add_planned(conn, planned)
            for row_no, row, values, first_row in duplicates:
                cp.reject(conn, row_no=row_no, key="/".join(str(values[k]) for k in m.key), columns=list(m.key),
                          reason=f"duplicate alternate key: source row {first_row} has the same key", row=row)

    def _entry(self, schema: TargetSchema, values: dict[str, Any], lookup_ids: dict[str, str],
               current: dict[str, str | None] | None) -> dict[str, Any]:
        """The planned action for one valid row: payload to send, intended canonical values, field diff."""
        m = self.mapping
        intended: dict[str, str | None] = {}
        web: dict[str, Any] = {}
        for cm in m.columns:
            col = schema.columns[cm.target]
            intended[cm.target] = canon(values[cm.target], col.type, date_only=col.date_only)
            web[cm.target] = json_value(values[cm.target])
        binds: dict[str, Any] = {}
        for lk in m.lookups:
            guid = lookup_ids.get(lk.target)
            intended[lk.target] = canon(guid, "Lookup") if guid else None
            nav = schema.nav(lk.target, lk.table)
            binds[lk.target] = (f"{nav}@odata.bind", f"/{schema.entity_sets[lk.table]}({guid})" if guid else None)
        # An empty owner/state column means "the platform's default" (the caller, active), not "clear it":
        # such columns are neither sent nor compared.
        for name in [k for k, v in intended.items() if v is None and k in PLATFORM_DEFAULTED]:
            del intended[name]
            binds.pop(name, None)
            web.pop(name, None)
        if current is None:
            payload = {k: v for k, v in web.items() if v is not None and k not in m.key
                       and schema.columns[k].creatable}
            payload |= {prop: ref for prop, ref in binds.values() if ref is not None}
            return {"action": "create", "payload": payload, "intended": intended, "diff": {}}
        diff = {k: [current.get(k), v] for k, v in intended.items()
                if k not in m.key and v != current.get(k) and schema.columns[k].updatable}
        if not diff:
            return {"action": "unchanged", "payload": {}, "intended": intended, "diff": {}}
        payload = {}
        for k in diff:
            if k in binds:
                prop, ref = binds[k]
                payload[prop] = ref
            else:
                payload[k] = web[k]
        return {"action": "update", "payload": payload, "intended": intended, "diff": diff}

    def _current(self, schema: TargetSchema, key_cols: list[TargetColumn], keys: list[str]
                 ) -> dict[str, dict[str, str | None]]:
        """Canonical current values of the target rows with these normalised keys (from the synced warehouse)."""
        return _warehouse_rows(self._reader or self.workbench.warehouse, schema, self.mapping, key_cols, keys)

    def _resolve(self, lk: LookupMap, values: dict[int, str]) -> dict[int, str | tuple[str, ...] | None]:
        """Row number -> id (str), None (no match) or a tuple of ids (ambiguous)."""
        wanted = sorted({v.lower() for v in values.values()} - {k for (t, k) in self._lookup_cache if t == lk.target})
        if wanted:
            found: dict[str, list[str]] = {v: [] for v in wanted}
            if lk.via_warehouse:
                wb = self._workbench(lk.profile)
                # The referenced table's primary key name is the same in every environment.
                info = self.client.table(lk.table)
                from bridgekit.warehouse import quote

                for start in range(0, len(wanted), 500):
                    part = wanted[start:start + 500]
                    marks = ",".join("?" * len(part))
                    tbl = wb.warehouse.arrow(
                        f"SELECT CAST({quote(info.primary_id)} AS VARCHAR) AS id, lower(CAST({quote(str(lk.match))} "
                        f"AS VARCHAR)) AS v FROM dataverse.{quote(lk.table)} WHERE lower(CAST({quote(str(lk.match))} "
                        f"AS VARCHAR)) IN ({marks})", part)
                    for rid, v in zip(tbl.column("id").to_pylist(), tbl.column("v").to_pylist(), strict=True):
                        found.setdefault(v, []).append(str(rid).lower())
            else:
                from bridgekit.odata import in_

                info = self.client.table(lk.table)
                for start in range(0, len(wanted), _LOOKUP_CHUNK):
                    part = wanted[start:start + _LOOKUP_CHUNK]
                    for row in self.client.rows(lk.table, select=[info.primary_id, str(lk.key)],
                                                filter=in_(str(lk.key), part)):
                        v = str(row.get(str(lk.key)) or "").lower()
                        found.setdefault(v, []).append(str(row[info.primary_id]).lower())
            with self._cache_lock:
                for v, hits in found.items():
                    self._lookup_cache[(lk.target, v)] = (None if not hits else hits[0] if len(set(hits)) == 1
                                                          else tuple(sorted(set(hits))))
        return {n: self._lookup_cache.get((lk.target, v.lower())) for n, v in values.items()}

    # -- execution --------------------------------------------------------------------------------------

    def _ops(self, schema: TargetSchema, rows: Sequence[Any]) -> list[Any]:
        from bridgekit.dataverse import Operation

        ops = []
        for r in rows:
            key = _loads(r["key_json"])
            payload = r["payload_json"]  # sent as planned: the checkpoint holds it as JSON text
            if r["action"] == "create":
                # If-None-Match: * -> create only; a 412 means the row appeared since planning.
                ops.append(Operation("PATCH", schema.table, key, payload, {"If-None-Match": "*"}, idempotent=True))
            else:
                ops.append(Operation.update(schema.table, key, payload))
        return ops

    def _send_batch(self, cp: Checkpoint, schema: TargetSchema, batch: int) -> int:
        rows = cp.pending_rows(batch)
        if not rows:
            with cp.transaction() as conn:
                conn.execute("UPDATE batches SET state = 'done', finished_at = ? WHERE batch = ?", (_now(), batch))
            return 0
        cp.mark_in_flight(batch)
        results = self.client.batch(self._ops(schema, rows), change_set_size=self.change_set_size,
                                    continue_on_error=True, chunk_size=len(rows))
        outcome: dict[int, dict[str, Any]] = {}
        conflicts = []
        for r, res in zip(rows, results, strict=True):
            status = res.status
            if res.ok:
                outcome[r["seq"]] = {"status": "done", "http": status, "created": int(r["action"] == "create"),
                                     "id": res.id, "error": None, "note": None}
            elif (r["action"] == "create" and status == 412) or (r["action"] == "update" and status == 404):
                conflicts.append(r)
            else:
                outcome[r["seq"]] = _failure(r, res)
        if conflicts:
            outcome |= self._settle_conflicts(schema, conflicts)
        left = sum(1 for o in outcome.values() if o["status"] == "retry")
        now = _now()  # the batch's rows were answered by one call: one finish time for all of them
        with cp.transaction() as conn:
            updates = []
            for r in rows:
                o = outcome[r["seq"]]
                updates.append((o["status"], o["http"], o["created"], o["id"], o["error"], o["note"], now, r["seq"]))
            conn.executemany("UPDATE rows SET status = ?, http_status = ?, created = ?, target_id = ?, error = ?, "
                             "note = ?, attempts = attempts + 1, finished_at = ? WHERE seq = ?", updates)
            for r in rows:
                o = outcome[r["seq"]]
                if o["status"] == "failed":
                    cp.reject(conn, row_no=r["row_no"], key=_shown_key(r["key_json"]), columns=[],
                              reason=f"refused by Dataverse ({o['http']}): {o['error']}", row=None, stage="write")
            conn.execute("UPDATE batches SET state = ?, finished_at = ? WHERE batch = ?",
                         ("pending" if left else "done", now, batch))
        return left

    def _settle_conflicts(self, schema: TargetSchema, rows: list[Any]) -> dict[int, dict[str, Any]]:
        """Rows that appeared (412 on create) or vanished (404 on update) since planning: re-plan against live."""
        live = _live_rows(self.client, schema, self.mapping, [json.loads(r["key_json"]) for r in rows])
        from bridgekit.dataverse import Operation

        out: dict[int, dict[str, Any]] = {}
        ops, again = [], []
        for r in rows:
            intended = json.loads(r["intended_json"])
            current = live.get(r["key_norm"])
            if current is None:  # vanished: create it (full payload from the intended values)
                payload = self._payload_for(schema, intended, creating=True, full=json.loads(r["payload_json"]))
                ops.append(Operation("PATCH", schema.table, json.loads(r["key_json"]), payload,
                                     {"If-None-Match": "*"}, idempotent=True))
                again.append((r, True))
                continue
            diff = {k: v for k, v in intended.items() if k not in self.mapping.key and current.get(k) != v
                    and schema.columns[k].updatable}
            if not diff:
                # Present with exactly the intended values. Not counted as created by this run: a rollback
                # must never delete a row that this run cannot prove it created.
                out[r["seq"]] = {"status": "done", "http": 412 if r["action"] == "create" else None, "created": 0,
                                 "id": None, "error": None, "note": "already present with the intended values"}
                continue
            payload = self._payload_for(schema, {k: intended[k] for k in diff}, creating=False,
                                        full=json.loads(r["payload_json"]))
            ops.append(Operation.update(schema.table, json.loads(r["key_json"]), payload))
            again.append((r, False))
        if ops:
            results = self.client.batch(ops, change_set_size=1, continue_on_error=True, chunk_size=len(ops))
            for (r, creating), res in zip(again, results, strict=True):
                if res.ok:
                    out[r["seq"]] = {"status": "done", "http": res.status, "created": int(creating), "id": res.id,
                                     "error": None, "note": "re-planned against the live row"}
                else:
                    out[r["seq"]] = _failure(r, res)
        return out

    def _payload_for(self, schema: TargetSchema, intended: dict[str, Any], *, creating: bool,
                     full: dict[str, Any]) -> dict[str, Any]:
        """A payload for the intended canonical values of some columns (used when re-planning a conflict)."""
        m = self.mapping
        payload: dict[str, Any] = {}
        for name, value in intended.items():
            if name in m.key:
                continue
            lk = next((x for x in m.lookups if x.target == name), None)
            if lk is not None:
                prop = f"{schema.nav(name, lk.table)}@odata.bind"
                if value is not None:
                    payload[prop] = f"/{schema.entity_sets[lk.table]}({value})"
                elif not creating:
                    payload[prop] = None
                continue
            col = schema.columns[name]
            if creating and (value is None or not col.creatable):
                continue
            if name in full:
                payload[name] = full[name]
            else:
                payload[name] = None if value is None else json_value(coerce(
                    value, type=col.type, max_length=None, options=None, precision=col.precision,
                    date_only=col.date_only))
        return payload

    def _verify_in_flight(self, cp: Checkpoint) -> int:
        """Batches a killed process left in flight: rows already written as planned are marked done, not resent."""
        batches = cp.batches_in("in_flight")
        if not batches:
            return 0
        schema = self.schema()
        verified = 0
        for batch in batches:
            rows = cp.pending_rows(batch)
            live = _live_rows(self.client, schema, self.mapping, [json.loads(r["key_json"]) for r in rows])
            with cp.transaction() as conn:
                for r in rows:
                    current = live.get(r["key_norm"])
                    intended = json.loads(r["intended_json"])
                    if current is not None and all(current.get(k) == v for k, v in intended.items()):
                        verified += 1
                        conn.execute("UPDATE rows SET status = 'done', created = ?, note = ?, finished_at = ? "
                                     "WHERE seq = ?", (int(r["action"] == "create"),
                                                       "written before the interruption (verified, not resent)",
                                                       _now(), r["seq"]))
                conn.execute("UPDATE batches SET state = 'pending' WHERE batch = ?", (batch,))
        log.info("resume: %d row(s) of %d in-flight batch(es) were already written", verified, len(batches))
        return verified


class _Sender:
    """Sends a run's pending batches, ``concurrency`` at a time, as they become pending (each batch once)."""

    def __init__(self, migration: Migration, cp: Checkpoint) -> None:
        self.migration = migration
        self.cp = cp
        self.workers = max(1, min(migration.concurrency, migration.client.session.governor.max_concurrency))
        self._pool: ThreadPoolExecutor | None = None
        self._sent: set[int] = set()
        self._futures: list[Future[int]] = []
        self.first_sent: float | None = None  # time.monotonic() when the first batch was queued

    def send_pending(self) -> None:
        """Queue every pending batch not queued yet; raises the error of a batch that failed as a whole."""
        for future in self._futures:
            if future.done():
                future.result()
        new = [b for b in self.cp.batches_in("pending") if b not in self._sent]
        if not new:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bk-migrate")
            self.first_sent = time.monotonic()
        schema = self.migration.schema()
        for batch in new:
            self._sent.add(batch)
            self._futures.append(self._pool.submit(self.migration._send_batch, self.cp, schema, batch))

    def finish(self) -> int:
        """Wait for every queued batch; returns how many rows ended throttled (still pending)."""
        throttled = sum(future.result() for future in self._futures)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return throttled

    def abort(self) -> None:
        """Send nothing more; wait for the batches already being sent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# -- helpers shared by execute, reconcile and rollback ----------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # text written by the json module that orjson does not read back
        return json.loads(text)


def _failure(row: Any, res: Any) -> dict[str, Any]:
    transient = res.status is None or res.status == 429 or res.status >= 500
    message = res.error.message if res.error is not None else f"status {res.status}"
    return {"status": "retry" if transient else "failed", "http": res.status, "created": 0, "id": None,
            "error": message[:500], "note": None}


def _warehouse_rows(warehouse: Any, schema: TargetSchema, mapping: MigrationMapping, key_cols: list[TargetColumn],
                    keys: Sequence[str]) -> dict[str, dict[str, str | None]]:
    """Canonical values of the mapped columns of target rows, by normalised key, from the synced warehouse."""
    from bridgekit.warehouse import quote

    if not keys:
        return {}
    names = [c.target for c in mapping.columns] + [lk.target for lk in mapping.lookups]
    key_expr = " || chr(31) || ".join(f"lower(coalesce(CAST({quote(k)} AS VARCHAR), ''))" for k in mapping.key)
    out: dict[str, dict[str, str | None]] = {}
    uniq = sorted(set(keys))
    # The keys go as one list parameter: binding a list is several times faster than thousands of `?`s,
    # and one query (one warehouse open) serves any number of keys. COLUMNS picks the mapped columns the
    # synced table has (a column never synced reads as null), so no query for the table's columns first.
    table = warehouse.arrow(f"SELECT {key_expr} AS _bk_key, COLUMNS(lambda c: list_contains(?::VARCHAR[], c)) "
                            f"FROM dataverse.{quote(schema.table)} WHERE {key_expr} IN (SELECT unnest(?::VARCHAR[]))",
                            [names, uniq])
    data = table.to_pydict()
    types = [(n, schema.columns[n]) for n in names]
    for i, k in enumerate(data["_bk_key"]):
        row: dict[str, str | None] = {}
        for n, col in types:
            value = data[n][i] if n in data else None
            row[n] = canon(value, col.type, date_only=col.date_only)
        out[str(k)] = row
    return out


def _live_rows(client: Any, schema: TargetSchema, mapping: MigrationMapping, keys: Sequence[Mapping[str, Any]]
               ) -> dict[str, dict[str, str | None]]:
    """Canonical values of the mapped columns of target rows read live from Dataverse, by normalised key."""
    from bridgekit.odata import and_, eq, in_, or_

    if not keys:
        return {}
    names = [c.target for c in mapping.columns] + [lk.target for lk in mapping.lookups]
    select = [schema.primary_id] + [f"_{n}_value" if schema.columns[n].type in _LOOKUP_TYPES else n for n in names]
    key_cols = [schema.columns[k] for k in mapping.key]
    out: dict[str, dict[str, str | None]] = {}
    for start in range(0, len(keys), _LOOKUP_CHUNK):
        part = keys[start:start + _LOOKUP_CHUNK]
        if len(mapping.key) == 1:
            flt = in_(mapping.key[0], [k[mapping.key[0]] for k in part])
        else:
            flt = or_(*[and_(*[eq(c, k[c]) for c in mapping.key]) for k in part])
        for row in client.rows(schema.table, select=select, filter=flt):
            values: dict[str, str | None] = {}
            for n in names:
                col = schema.columns[n]
                raw = row.get(f"_{n}_value") if col.type in _LOOKUP_TYPES else row.get(n)
                values[n] = canon(raw, col.type, date_only=col.date_only)
            out[_key_norm([row.get(k) for k in mapping.key], key_cols)] = values
    return out


def _result_counts(cp: Checkpoint) -> dict[str, int]:
    q = cp.scalar
    return {
        "planned": int(q("SELECT count(*) FROM rows") or 0),
        "created": int(q("SELECT count(*) FROM rows WHERE status = 'done' AND created = 1") or 0),
        "updated": int(q("SELECT count(*) FROM rows WHERE status = 'done' AND created = 0") or 0),
        "unchanged": int(q("SELECT count(*) FROM rows WHERE status = 'unchanged'") or 0),
        "failed": int(q("SELECT count(*) FROM rows WHERE status = 'failed'") or 0),
        "pending": int(q("SELECT count(*) FROM rows WHERE status IN ('planned', 'retry')") or 0),
        "rejected": int(q("SELECT count(*) FROM rejects WHERE stage = 'validation'") or 0),
    }


def _summarise(cp: Checkpoint, run_id: str, target: str, source: str, source_rows: int, batches: int, *,
               dry_run: bool, sample_size: int) -> Plan:
    # Validation rejects only: when writing overlaps planning, rows refused on write are rejects too.
    counts = {"source_rows": source_rows, "batches": batches,
              "rejected": int(cp.scalar("SELECT count(*) FROM rejects WHERE stage = 'validation'") or 0)}
    samples: dict[str, list[dict[str, Any]]] = {}
    for action in ("create", "update", "unchanged"):
        counts[action] = int(cp.scalar("SELECT count(*) FROM rows WHERE action = ?", (action,)) or 0)
        rows = cp.query("SELECT row_no, key_json, diff_json FROM rows WHERE action = ? ORDER BY seq LIMIT ?",
                        (action, sample_size))
        samples[action] = [{"row_no": r["row_no"], "key": _shown_key(r["key_json"]),
                            "changes": json.loads(r["diff_json"] or "{}")} for r in rows]
    rejects = [dict(r) for r in cp.query("SELECT row_no, key, columns, reason FROM rejects WHERE stage = 'validation' "
                                         "ORDER BY row_no LIMIT ?", (sample_size,))]
    return Plan(run_id, target, source, counts, samples, rejects, dry_run=dry_run)


def _shown_key(key_json: str) -> str:
    return "/".join(str(v) for v in json.loads(key_json).values())


def _stored_plan(cp: Checkpoint) -> Plan:
    run = cp.run() or {}
    summary = json.loads(run.get("summary_json") or "{}").get("plan") or {}
    return Plan(summary.get("run_id", run.get("run_id", "")), summary.get("target", run.get("target", "")),
                summary.get("source", run.get("source", "")), dict(summary.get("counts") or {}),
                dict(summary.get("samples") or {}), list(summary.get("reject_samples") or []), dry_run=False)


def _existing(workbench: Any, run_id: str, state_dir: str | Path | None) -> Checkpoint:
    path = checkpoint_path(_state_dir(workbench, state_dir), run_id)
    if not path.exists():
        raise ConfigError(f"no migration run {run_id} in {path.parent}",
                          hint="check the run id and state_dir (the run's checkpoint is <state_dir>/<run_id>.sqlite)")
    return Checkpoint(path)


def _stored_mapping(cp: Checkpoint) -> MigrationMapping:
    import yaml

    run = cp.run() or {}
    return parse_mapping(yaml.safe_load(run.get("mapping") or ""), where=f"run {run.get('run_id')}",
                         text=run.get("mapping") or "")


def _iter_rows(cp: Checkpoint, where: str, size: int = 1000) -> Iterator[list[Any]]:
    last = 0
    while True:
        rows = cp.query(f"SELECT * FROM rows WHERE seq > ? AND ({where}) ORDER BY seq LIMIT ?", (last, size))
        if not rows:
            return
        yield rows
        last = rows[-1]["seq"]


def reconcile(workbench: Any, run_id: str, *, state_dir: str | Path | None = None, sync: bool = True,
              max_differences: int = 20) -> Reconciliation:
    """Compare a run's intended values with the target after a delta sync: counts, checksums, differing rows.

    Rows written or found unchanged are compared column by column (canonical values); rows rejected,
    refused or still pending are counted, not compared.

    Args:
        workbench: The target workbench.
        run_id: The run to reconcile.
        state_dir: Where the run's checkpoint is.
        sync: Delta-sync the target table first (turn off only when it was just synced).
        max_differences: How many differing fields to list.
    """
    with _existing(workbench, run_id, state_dir) as cp:
        mapping = _stored_mapping(cp)
        schema = load_target(workbench.dataverse, mapping)
        if sync:
            sync_tables(workbench, [schema.table])
        key_cols = [schema.columns[k] for k in mapping.key]
        names = [c.target for c in mapping.columns] + [lk.target for lk in mapping.lookups]
        src_items: dict[str, list[str]] = {n: [] for n in names}
        dst_items: dict[str, list[str]] = {n: [] for n in names}
        src_sums = dict.fromkeys(names, 0)
        dst_sums = dict.fromkeys(names, 0)
        compared = matched = missing = mismatched = 0
        differences: list[dict[str, Any]] = []
        for rows in _iter_rows(cp, "status IN ('done', 'unchanged')", size=2000):
            current = _warehouse_rows(workbench.warehouse, schema, mapping, key_cols, [r["key_norm"] for r in rows])
            for r in rows:
                compared += 1
                intended = json.loads(r["intended_json"])
                target = current.get(r["key_norm"])
                shown = _shown_key(r["key_json"])
                if target is None:
                    missing += 1
                    if len(differences) < max_differences:
                        differences.append({"key": shown, "column": "*", "source": "row", "target": "missing"})
                differs = False
                for n in names:
                    if n not in intended:  # not compared (a platform default was left to the platform)
                        continue
                    s = intended.get(n)
                    t = target.get(n) if target is not None else None
                    src_items[n].append(f"{r['key_norm']}{_SEP}{s}")
                    dst_items[n].append(f"{r['key_norm']}{_SEP}{t if target is not None else chr(0)}")
                    if target is not None and s != t:
                        differs = True
                        if len(differences) < max_differences:
                            differences.append({"key": shown, "column": n, "source": s, "target": t})
                if target is not None:
                    mismatched += int(differs)
                    matched += int(not differs)
            for n in names:  # fold per chunk so memory stays one chunk
                src_sums[n] = (src_sums[n] + int(_multiset_hash(src_items[n]), 16)) & _MASK
                dst_sums[n] = (dst_sums[n] + int(_multiset_hash(dst_items[n]), 16)) & _MASK
                src_items[n].clear()
                dst_items[n].clear()
        counts = _result_counts(cp)
        out_counts = {"source_rows": int(cp.scalar("SELECT count(*) FROM rows") or 0)
                      + counts["rejected"], "compared": compared, "matched": matched, "missing": missing,
                      "mismatched": mismatched, "rejected": counts["rejected"], "failed": counts["failed"],
                      "pending": counts["pending"]}
        checksums = {n: {"source": f"{src_sums[n]:032x}", "target": f"{dst_sums[n]:032x}",
                         "match": src_sums[n] == dst_sums[n]} for n in names}
        if missing or mismatched:
            status = "red"
        elif counts["rejected"] or counts["failed"] or counts["pending"]:
            status = "amber"
        else:
            status = "green"
        result = Reconciliation(run_id, schema.table, status, out_counts, checksums, differences)
        cp.event("reconciliation", result.to_dict())
        return result


def rollback(workbench: Any, run_id: str, *, state_dir: str | Path | None = None, batch_size: int = 100,
             concurrency: int = 4) -> RollbackReport:
    """Delete the rows run ``run_id`` created, by their alternate key; safe to run again.

    Only rows this run created (a 204 to its create-only upsert, or verified as its own after an
    interruption) are deleted; rows it updated keep their new values (their previous values are in the
    checkpoint's ``diff_json``). A row already gone counts as rolled back.
    """
    from bridgekit.dataverse import Operation

    with _existing(workbench, run_id, state_dir) as cp:
        mapping = _stored_mapping(cp)
        client = workbench.dataverse
        table = client.table(mapping.target).logical_name
        chunks = list(_iter_rows(cp, "created = 1 AND rolled_back = 0", size=max(1, min(batch_size, 1000))))
        deleted = gone = failed = 0
        errors: list[str] = []
        lock = threading.Lock()

        def remove(rows: list[Any]) -> None:
            nonlocal deleted, gone, failed
            # DELETE by key is safe to repeat (a second one answers 404, which counts as done).
            ops = [Operation("DELETE", table, json.loads(r["key_json"]), None, {}, idempotent=True) for r in rows]
            results = client.batch(ops, change_set_size=1, continue_on_error=True, chunk_size=len(ops))
            with cp.transaction() as conn, lock:
                for r, res in zip(rows, results, strict=True):
                    if res.ok or res.status == 404:
                        conn.execute("UPDATE rows SET rolled_back = 1 WHERE seq = ?", (r["seq"],))
                        deleted += int(res.ok)
                        gone += int(res.status == 404)
                    else:
                        failed += 1
                        if len(errors) < 10:
                            errors.append(f"{_shown_key(r['key_json'])}: "
                                          f"{res.error.message if res.error else res.status}")

        workers = max(1, min(concurrency, client.session.governor.max_concurrency, len(chunks) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bk-rollback") as pool:
            for future in [pool.submit(remove, rows) for rows in chunks]:
                future.result()
        report = RollbackReport(run_id, table, deleted, gone, failed, errors)
        cp.event("rollback", report.to_dict())
        if not failed:
            cp.set_status("rolled_back")
        return report


def results(workbench: Any, run_id: str, *, state_dir: str | Path | None = None) -> Any:
    """Per-row results of a run as a pandas DataFrame (row, key, action, status, http status, created, error)."""
    import pandas as pd

    with _existing(workbench, run_id, state_dir) as cp:
        rows = cp.query("SELECT row_no, key_json, action, status, http_status, created, error, note, attempts, "
                        "batch, finished_at, rolled_back FROM rows ORDER BY seq")
    columns = ["row_no", "key", "action", "status", "http_status", "created", "error", "note", "attempts", "batch",
               "finished_at", "rolled_back"]
    return pd.DataFrame([{"key": _shown_key(r["key_json"]), **{k: r[k] for k in columns if k != "key"}}
                         for r in rows], columns=columns)


def rejects(workbench: Any, run_id: str, *, state_dir: str | Path | None = None) -> Any:
    """The rejects table of a run as a pandas DataFrame (row, key, columns, reason, stage, source row)."""
    import pandas as pd

    with _existing(workbench, run_id, state_dir) as cp:
        rows = cp.query("SELECT row_no, key, columns, reason, stage, row_json FROM rejects ORDER BY row_no")
    return pd.DataFrame([dict(r) for r in rows], columns=["row_no", "key", "columns", "reason", "stage", "row_json"])


@dataclass
class MigrationOutcome(_Markdown):
    """What :func:`run_migration` did: the run id and its reports, in order (plan, execution, reconciliation)."""

    run_id: str
    mode: str
    reports: list[Any] = field(default_factory=list)

    def to_markdown(self) -> str:
        """Every report, as markdown."""
        return "\n\n".join(r.to_markdown() for r in self.reports)

    def status(self) -> str:
        """The worst status of the run: the reconciliation's, rejects (amber), failed or pending rows (red)."""
        from bridgekit.checks import worst

        found = []
        for r in self.reports:
            if isinstance(r, Plan):
                found.append("amber" if r.counts.get("rejected") else "green")
            elif isinstance(r, ExecutionReport):
                found.append("red" if r.counts.get("failed") or r.counts.get("pending") else "green")
            elif isinstance(r, Reconciliation):
                found.append(r.status)
            elif isinstance(r, RollbackReport):
                found.append("red" if r.failed else "green")
        return worst(found) if found else "green"

    def to_html(self) -> str:
        """The outcome in the report style: a summary first (status, what happened, what to do), then each step."""
        from bridgekit import report

        return str(report.join(self._summary_html(), *(_step_html(r) for r in self.reports)))

    def _repr_html_(self) -> str:
        return self.to_html()

    def _summary_html(self) -> str:
        from bridgekit import report

        lines: list[str] = []
        todo: list[str] = []
        for r in self.reports:
            if isinstance(r, Plan):
                c = r.counts
                lines.append(f"{report.num(c.get('source_rows', 0))} source rows for <b>{html.escape(r.target)}</b>: "
                             f"{report.num(c.get('create', 0))} to create, {report.num(c.get('update', 0))} to update, "
                             f"{report.num(c.get('unchanged', 0))} already right, {report.num(c.get('rejected', 0))} "
                             "rejected" + (" (dry run: nothing was written)." if r.dry_run else "."))
                if c.get("rejected"):
                    todo.append("correct the rejected rows in the source (the reasons are listed below) and run "
                                "again with the same run id")
                if r.dry_run:
                    todo.append("when the plan is right, run again with mode execute")
            elif isinstance(r, ExecutionReport):
                c = r.counts
                lines.append(f"Written in {report.duration(r.duration_s)}: {report.num(c.get('created', 0))} created, "
                             f"{report.num(c.get('updated', 0))} updated, {report.num(c.get('failed', 0))} failed, "
                             f"{report.num(c.get('pending', 0))} pending" + (" (resumed)." if r.resumed else "."))
                if c.get("pending"):
                    todo.append("run again with the same run id to write the pending rows")
            elif isinstance(r, Reconciliation):
                c = r.counts
                lines.append(f"Checked against Dataverse after a sync: {report.num(c['matched'])} of "
                             f"{report.num(c['compared'])} rows match, {report.num(c['missing'])} missing, "
                             f"{report.num(c['mismatched'])} differ.")
                if r.status == "red":
                    todo.append("look at the differences below before switching users over")
            elif isinstance(r, RollbackReport):
                lines.append(f"Rollback: {report.num(r.deleted)} rows deleted, {report.num(r.already_gone)} already "
                             f"gone, {report.num(r.failed)} failed.")
        mode = {"dry_run": "Dry run", "execute": "Execution", "rollback": "Rollback"}.get(self.mode, self.mode)
        body = [f"<p><b>Outcome:</b> {report.badge(self.status())} {html.escape(mode)} of migration run "
                f"<code>{html.escape(self.run_id)}</code>.</p>",
                "<ul>" + "".join(f"<li>{x}</li>" for x in lines) + "</ul>"]
        if todo:
            body.append("<p><b>Next steps:</b> " + html.escape("; ".join(todo)) + ".</p>")
        return str(report.section("Summary", *body, page_break=False, anchor="summary"))


def _step_html(r: Any) -> str:
    """One step of a migration (plan, execution, reconciliation, rollback) as a report section."""
    from bridgekit import report

    if isinstance(r, Plan):
        c = r.counts
        parts: list[str] = [report.table([{"source_rows": c.get("source_rows", 0), "create": c.get("create", 0),
                                "update": c.get("update", 0), "unchanged": c.get("unchanged", 0),
                                "rejected": c.get("rejected", 0), "batches": c.get("batches", 0)}])]
        upd = r.samples.get("update") or []
        if upd:
            parts += [report.heading(f"Updates: the fields that change (first {len(upd)} rows)", 3), report.table(
                [{"row": s["row_no"], "key": s["key"], "column": col, "now": cur, "after": new}
                 for s in upd for col, (cur, new) in s["changes"].items()],
                formats={"key": "text", "now": "text", "after": "text"})]
        new = r.samples.get("create") or []
        if new:
            parts += [report.heading(f"Creates (first {len(new)} rows)", 3),
                      report.table([{"row": s["row_no"], "key": s["key"]} for s in new], formats={"key": "text"})]
        if r.reject_samples:
            parts += [report.heading(f"Rejected rows (first {len(r.reject_samples)} of "
                                     f"{report.num(c.get('rejected', 0))})", 3),
                      report.table([{"row": x["row_no"], "key": x["key"], "columns": x["columns"], "reason": x["reason"]}
                                    for x in r.reject_samples], formats={"key": "text", "reason": "text"})]
        title = "Plan (dry run: nothing written)" if r.dry_run else "Plan"
        return str(report.section(title, *parts, page_break=False))
    if isinstance(r, ExecutionReport):
        c = r.counts
        rate = (c.get("created", 0) + c.get("updated", 0)) / r.write_s if r.write_s else 0.0
        parts = [report.table([{k: c.get(k, 0) for k in ("created", "updated", "unchanged", "failed", "pending",
                                                          "rejected")}]),
                 report.paragraph(f"{report.num(r.batches)} batch{'es' if r.batches != 1 else ''}; validation and plan {report.duration(r.plan_s)}, "
                                  f"writes {report.duration(r.write_s)} ({report.num(rate, 0)} rows/s).")]
        if r.verified_after_interruption:
            parts.append(report.paragraph(f"{report.num(r.verified_after_interruption)} rows of batches in flight when "
                                          "the previous process stopped were found already written and not sent again."))
        return str(report.section("Execution" + (" (resumed)" if r.resumed else ""), *parts, page_break=False))
    if isinstance(r, Reconciliation):
        parts = [f"<p>{report.badge(r.status)} {html.escape(r.detail)}.</p>",
                 report.table([{"column": col, "matches": bool(v["match"])} for col, v in r.checksums.items()],
                              labels={"matches": "source and target checksums match"})]
        if r.differences:
            parts += [report.heading("Differences", 3), report.table(
                [{"key": d["key"], "column": "(whole row missing)" if d["column"] == "*" else d["column"],
                  "source": d["source"], "target": d["target"]} for d in r.differences],
                formats={"key": "text", "source": "text", "target": "text"})]
        return str(report.section("Reconciliation", *parts, page_break=False))
    if isinstance(r, RollbackReport):
        parts = [report.table([{"deleted": r.deleted, "already_gone": r.already_gone, "failed": r.failed}])]
        if r.errors:
            parts.append(report.table([{"error": e} for e in r.errors], formats={"error": "text"}))
        return str(report.section("Rollback", *parts, page_break=False))
    return str(report.paragraph(str(r)))


def run_migration(workbench: Any, mapping: str | Path | MigrationMapping | None, *, source: Any = None,
                  mode: str = "dry_run", run_id: str | None = None, state_dir: str | Path | None = None,
                  reconcile_after: bool = True, concurrency: int | None = None) -> MigrationOutcome:
    """The migrate runbook's body: one mode of a migration, with its results and checks recorded.

    ``dry_run`` plans (writes nothing); ``execute`` plans and writes, or resumes ``run_id``, then
    reconciles; ``rollback`` deletes what ``run_id`` created. Results and checks go to
    :mod:`bridgekit.record` (``validation`` is amber when rows were rejected; ``reconciliation`` carries
    the reconciliation's colour, so a red one makes ``bridgekit run`` exit 6).

    Raises:
        ConfigError: unknown mode, missing mapping or run id.
        MigrationIncomplete: rows are still pending after an execution (exit 4: run again to resume).
    """
    from bridgekit import record

    if mode not in ("dry_run", "execute", "rollback"):
        raise ConfigError(f"unknown mode {mode!r}", hint="use dry_run, execute or rollback")
    if mode == "rollback":
        if not run_id:
            raise ConfigError("rollback needs the run id of the execution to undo", hint="pass run_id")
        done = rollback(workbench, run_id, state_dir=state_dir)
        record.result("rollback", done.to_dict())
        record.check("rollback", "red" if done.failed else "green",
                     detail=f"{done.deleted} deleted, {done.already_gone} already gone, {done.failed} failed")
        return MigrationOutcome(run_id, mode, [done])
    if not mapping:
        raise ConfigError("a dry run or execution needs a mapping file", hint="pass mapping=<path to YAML>")
    mig = Migration(workbench, mapping, source, state_dir=state_dir, concurrency=concurrency)
    if mode == "dry_run":
        plan = mig.plan(run_id or None)
        outcome = MigrationOutcome(plan.run_id, mode, [plan])
        record.result("run_id", plan.run_id)
        record.result("plan", plan.counts)
        _record_validation(plan)
        return outcome
    report = mig.execute(run_id or None)
    outcome = MigrationOutcome(report.run_id, mode, [report.plan, report])
    record.result("run_id", report.run_id)
    record.result("plan", report.plan.counts)
    record.result("execution", report.counts)
    _record_validation(report.plan)
    if reconcile_after:
        rec = reconcile(workbench, report.run_id, state_dir=mig.state_dir)
        outcome.reports.append(rec)
        record.result("reconciliation", rec.counts)
        record.check("reconciliation", rec.status, detail=rec.detail)
    return outcome


def _record_validation(plan: Plan) -> None:
    from bridgekit import record

    rejected = int(plan.counts.get("rejected", 0))
    record.check("validation", "amber" if rejected else "green",
                 detail=f"{rejected} of {plan.counts.get('source_rows', 0)} source rows rejected (see the rejects table)")
