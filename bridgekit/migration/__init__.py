"""Migrations into Dataverse: validated against live metadata, dry-run first, batched, resumable, reconciled.

::

    from bridgekit.migration import Migration, reconcile, rollback
    mig = Migration(wb, "accounts.yaml", source="legacy/accounts.csv")
    print(mig.plan())                      # dry run: creates / updates / unchanged, samples, rejects
    report = mig.execute(run_id="acc-1")   # $batch change sets, checkpointed; rerun the id to resume
    reconcile(wb, "acc-1").status          # green / amber / red
    rollback(wb, "acc-1")                  # delete what run acc-1 created

Environment to environment: :func:`cutover` (snapshot copy, delta catch-up rounds, cutover report).
"""

from __future__ import annotations

from bridgekit.migration.cutover import CutoverReport, cutover
from bridgekit.migration.engine import (
    ExecutionReport,
    Migration,
    MigrationIncomplete,
    MigrationOutcome,
    Plan,
    Reconciliation,
    RollbackReport,
    new_run_id,
    reconcile,
    rejects,
    results,
    rollback,
    run_migration,
    sync_tables,
)
from bridgekit.migration.mapping import (
    ColumnMap,
    LookupMap,
    Mapping,
    MigrationOptions,
    load_mapping,
    parse_mapping,
)
from bridgekit.migration.sources import CsvSource, ParquetSource, Source, WarehouseSource, open_source

__all__ = [
    "ColumnMap",
    "CsvSource",
    "CutoverReport",
    "ExecutionReport",
    "LookupMap",
    "Mapping",
    "Migration",
    "MigrationIncomplete",
    "MigrationOptions",
    "MigrationOutcome",
    "ParquetSource",
    "Plan",
    "Reconciliation",
    "RollbackReport",
    "Source",
    "WarehouseSource",
    "cutover",
    "load_mapping",
    "new_run_id",
    "open_source",
    "parse_mapping",
    "reconcile",
    "rejects",
    "results",
    "rollback",
    "run_migration",
    "sync_tables",
]
