"""What the sync reads: one :class:`Source` per mirrored table, built over a service client (never the facade).

Modules:
    base.py       the Source protocol, pages, full-load plans
    dataverse.py  :class:`DataverseSource` (change tracking, createdon ranges, Arrow page shaping)
    graph.py      :class:`GraphSource` (Graph delta per resource, per mailbox scope for mail and calendars)
A new Graph resource is an entry in :data:`bridgekit.catalog.GRAPH_RESOURCES`; a new kind of source implements
:class:`Source`.
"""

from __future__ import annotations

from bridgekit.sources.base import (
           BatchSource,
           FullPlan,
           Page,
           RawPage,
           Source,
           SourceFactory,
           SplitSource,
           as_batch,
           as_split,
           to_arrow,
)
from bridgekit.sources.dataverse import DataverseSource
from bridgekit.sources.graph import GraphSource

__all__ = ["BatchSource", "DataverseSource", "FullPlan", "GraphSource", "Page", "RawPage", "Source",
           "SourceFactory", "SplitSource", "as_batch", "as_split", "to_arrow"]
