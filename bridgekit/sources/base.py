"""What the sync engine reads: the :class:`Source` protocol, its pages and full-load plans (no HTTP here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import pyarrow as pa

from bridgekit.errors import SyncError
from bridgekit.warehouse import TableSpec, carrier

__all__ = ["BatchSource", "FullPlan", "Page", "RawPage", "Source", "SourceFactory", "SplitSource", "as_batch", "as_split",
           "to_arrow"]


@dataclass
class Page:
    """One page of a table, shaped for the warehouse.

    Attributes:
        rows: Upserted rows, as dicts keyed by the spec's column names holding carrier values (see
            :func:`bridgekit.warehouse.carrier`), or an Arrow table with those columns.
        deletes: Keys of deleted rows.
        versions: Each row's version string (``_bk_version``), as a list or an Arrow string array, or None.
        next: The position to fetch the next page of this partition from; None at its end.
        token: The delta link, on the last page of a tracked read (of this partition).
        reset: Columns and values naming a slice of the table (``{"user_id": ...}``: one mailbox) whose rows
            this partition now reads afresh: rows of the slice staged before this page, or merged before,
            are dropped unless a page from here on brings them again (a mailbox whose delta link the
            service no longer accepts, read again from its first page; a mailbox no longer synced).
    """

    rows: list[dict[str, Any]] | pa.Table = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    versions: list[str | None] | pa.Array | None = None
    next: str | None = None
    token: str | None = None
    reset: dict[str, str] | None = None


@dataclass
class RawPage:
    """A page fetched but not yet shaped (see :meth:`SplitSource.fetch`).

    ``next`` is known as soon as the page is in, so the fetching thread asks for the next page at once
    while the writer thread decodes and shapes this one (:meth:`SplitSource.shape`).

    Attributes:
        body: The page as the source chooses to hand it over (raw bytes or a decoded body).
        next: The position of the next page of this partition, None at its end.
        cursor: The position this page was fetched from.
    """

    body: Any
    next: str | None
    cursor: str


@dataclass
class FullPlan:
    """How to read a table in full: start positions (one per partition) and, optionally, a delta link.

    ``token`` is a delta link taken *before* the reads started (so changes made during the load are
    replayed by the next delta). When it is None the last page of partition 0 must carry it (a tracked
    single-partition read), or the table has no change tracking.
    """

    cursors: list[str]
    token: str | None = None
    estimate: int | None = None  # rows expected, for the progress bar


class Source(Protocol):
    """One mirrored table as resumable pages (implemented over the Dataverse and Graph clients)."""

    table: str  # "dataverse.account", "graph.users"

    @property
    def tracked(self) -> bool:
        """True when the table supports deltas (change tracking / Graph delta)."""
        ...

    def spec(self) -> TableSpec:
        """The table's columns and types, from the service's metadata."""
        ...

    def plan_full(self, partitions: int) -> FullPlan:
        """Start positions for a full read in up to ``partitions`` disjoint partitions."""
        ...

    def delta_start(self, token: str) -> list[str]:
        """The positions (one per partition) of the first pages of changes since ``token``."""
        ...

    def join_tokens(self, tokens: list[str]) -> str:
        """The table's delta token from its partitions' delta links (in partition order)."""
        ...

    def page(self, cursor: str) -> Page:
        """Fetch the page at ``cursor``.

        Raises:
            ResyncRequired: the delta link (or the position) is no longer valid.
        """
        ...


class SplitSource(Source, Protocol):
    """A source that fetches and shapes in two steps, so fetching never waits for shaping.

    ``page(c)`` is ``shape(fetch(c))``; the engine fetches on one thread and shapes on the writer's.
    """

    def fetch(self, cursor: str) -> RawPage:
        """Fetch and decode the page at ``cursor`` (raises like :meth:`Source.page`)."""
        ...

    def shape(self, raw: RawPage) -> Page:
        """Turn a fetched page into warehouse-shaped rows, deletes and positions."""
        ...


class BatchSource(Source, Protocol):
    """A source that fetches the pages at many positions in one go (Graph mailboxes through ``$batch``).

    A delta run of a table with many partitions then costs a few round trips per round, not one per
    partition.
    """

    def pages(self, cursors: list[str]) -> list[Page | BaseException]:
        """The page at each of ``cursors`` (in order), or the error that answered it."""
        ...


SourceFactory = Callable[[str], Source]


def as_batch(source: Source) -> BatchSource | None:
    """``source`` as a :class:`BatchSource` when it fetches many positions in one go."""
    if callable(getattr(source, "pages", None)):
        return cast(BatchSource, source)
    return None


def as_split(source: Source) -> SplitSource | None:
    """``source`` as a :class:`SplitSource` when it fetches and shapes in two steps."""
    if callable(getattr(source, "fetch", None)) and callable(getattr(source, "shape", None)):
        return cast(SplitSource, source)
    return None


def to_arrow(spec: TableSpec, rows: list[dict[str, Any]] | pa.Table) -> pa.Table:
    """Build the carrier-typed Arrow batch for ``rows`` (column by column, no per-row objects kept)."""
    if isinstance(rows, pa.Table):
        return rows
    arrays = []
    for col in spec.columns:
        name = col.name
        try:
            arrays.append(pa.array([r.get(name) for r in rows], carrier(col.type)))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SyncError(f"{spec.id}.{name}: a value does not fit {col.type}: {exc}", table=spec.id,
                            hint="the table's metadata may have changed during the sync; run it again") from exc
    return pa.Table.from_arrays(arrays, names=[c.name for c in spec.columns])
