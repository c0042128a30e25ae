"""Environment-to-environment cutover: snapshot copy, delta catch-up rounds until the lag is near zero, then a cutover report.

The source environment is read through its profile's synced warehouse (change tracking keeps the
catch-up cheap: a round reads only the rows the last delta sync touched); the target is written through
the migration engine, so every round is validated, checkpointed and resumable under its own run id
(``<cutover id>-r0`` for the snapshot, ``-r1`` ... for catch-ups). Source deletes are propagated by
alternate key. The final check is a dry run of the whole source against the target: nothing left to
create or update and nothing left to delete means the environments agree, and users can be switched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridgekit.migration.engine import Migration, _md_table, new_run_id, sync_tables
from bridgekit.migration.mapping import Mapping as MigrationMapping
from bridgekit.migration.mapping import load_mapping
from bridgekit.migration.sources import WarehouseSource
from bridgekit.migration.values import ValueProblem, apply_transforms, canon

__all__ = ["CutoverReport", "cutover"]


@dataclass
class CutoverReport:
    """Rounds of a cutover and the final comparison.

    Attributes:
        cutover_id: The prefix of the rounds' run ids.
        rounds: Per round: ``round``, ``kind`` (snapshot | catch-up), ``run_id``, ``source_changes`` (rows the
            source's delta sync brought), ``created``, ``updated``, ``unchanged``, ``deleted``, ``rejected``,
            ``lag`` (rows that had to be written or deleted), ``seconds``.
        final: The closing dry run: ``in_sync``, ``to_create``, ``to_update``, ``to_delete``, ``rejected``.
        status: ``green`` (environments agree), ``amber`` (they agree, but source rows were rejected),
            ``red`` (rows still differ: catch up again before switching).
    """

    cutover_id: str
    source: str
    target: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, int] = field(default_factory=dict)
    status: str = "red"

    @property
    def lag(self) -> int:
        """Rows still to write or delete at the end (0 when the target has caught up)."""
        return self.final.get("to_create", 0) + self.final.get("to_update", 0) + self.final.get("to_delete", 0)

    @property
    def ready(self) -> bool:
        """True when the target holds exactly what the source holds (within the mapping)."""
        return self.status in ("green", "amber")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"cutover_id": self.cutover_id, "source": self.source, "target": self.target, "rounds": self.rounds,
                "final": self.final, "status": self.status, "lag": self.lag, "ready": self.ready}

    def to_markdown(self) -> str:
        """The cutover report as markdown."""
        lines = [f"### Cutover `{self.cutover_id}`: **{self.status.upper()}**"
                 f" ({'ready to switch' if self.ready else 'not ready'})",
                 f"`{self.source}` -> `{self.target}`", ""]
        lines += _md_table(("round", "kind", "source changes", "created", "updated", "deleted", "unchanged",
                            "rejected", "lag", "secs"),
                           [(r["round"], r["kind"], r["source_changes"], r["created"], r["updated"], r["deleted"],
                             r["unchanged"], r["rejected"], r["lag"], f"{r['seconds']:.1f}") for r in self.rounds])
        f = self.final
        lines += ["", "**final comparison** (dry run of the whole source against the target)", ""]
        lines += _md_table(("in sync", "to create", "to update", "to delete", "rejected"),
                           [(f.get("in_sync"), f.get("to_create"), f.get("to_update"), f.get("to_delete"),
                             f.get("rejected"))])
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()


def _keys(warehouse: Any, table: str, mapping: MigrationMapping) -> dict[str, dict[str, Any]]:
    """Alternate-key values of every row of a source warehouse table, after the key columns' transforms.

    Returns normalised key -> ``{key column: value}`` (what a DELETE by alternate key needs).
    """
    from bridgekit.warehouse import quote

    schema, _, name = table.rpartition(".")
    cols = [c for c in mapping.columns if c.target in mapping.key]
    if any(c.source is None for c in cols):
        return {}
    select = ", ".join(quote(str(c.source)) for c in cols)
    got = warehouse.arrow(f"SELECT DISTINCT {select} FROM {quote(schema)}.{quote(name)}").to_pylist()
    out: dict[str, dict[str, Any]] = {}
    for row in got:
        try:
            values = {c.target: apply_transforms(row[str(c.source)], c.transforms) for c in cols}
        except ValueProblem:
            continue
        if any(v is None or str(v) == "" for v in values.values()):
            continue
        out[_norm(values, mapping)] = values
    return out


def _norm(values: dict[str, Any], mapping: MigrationMapping) -> str:
    return "\x1f".join((canon(values[k], "String") or "").lower() for k in mapping.key)


def cutover(source: Any, target: Any, mapping: MigrationMapping | str | Path, *, table: str | None = None,
            cutover_id: str | None = None, state_dir: str | Path | None = None, max_rounds: int = 5,
            lag_threshold: int = 0, between_rounds: Callable[[int], None] | None = None,
            pause_s: float = 0.0, concurrency: int | None = None) -> CutoverReport:
    """Copy a table from one environment to another and catch up until the lag is at most ``lag_threshold``.

    Args:
        source: The source environment's :class:`~bridgekit.workbench.Workbench` (its warehouse is synced).
        target: The target environment's workbench.
        mapping: The mapping (source columns are the source warehouse table's columns).
        table: The source warehouse table (default ``dataverse.<mapping target>``).
        cutover_id: Prefix of the rounds' run ids (default: a new id).
        state_dir: Where the rounds' checkpoints go.
        max_rounds: Catch-up rounds at most (after the snapshot).
        lag_threshold: Stop catching up once a round had to write at most this many rows.
        between_rounds: Called with the round number before each catch-up round (a hook for tests and
            for operators who freeze writes before the last round).
        pause_s: Seconds to wait between rounds (to let changes accumulate).
        concurrency: Batches in flight (default: the mapping's option).

    Returns:
        The :class:`CutoverReport`; ``ready`` says whether users can be switched over.
    """
    mapping = mapping if isinstance(mapping, MigrationMapping) else load_mapping(mapping)
    table = table or f"dataverse.{mapping.target}"
    cutover_id = cutover_id or new_run_id().replace("mig-", "cut-")
    source_name = f"{source.profile.name}:{table}"
    report = CutoverReport(cutover_id, source_name, f"{target.profile.name}:dataverse.{mapping.target}")
    src_table = table.rpartition(".")[2]
    previous: dict[str, dict[str, Any]] = {}
    for round_no in range(0, max_rounds + 1):
        if round_no and between_rounds is not None:
            between_rounds(round_no)
        if round_no and pause_s:
            time.sleep(pause_s)
        clock = time.monotonic()
        sync = sync_tables(source, [src_table])
        changes = sum(t.created + t.updated + t.deleted for t in sync.tables)
        where = None if round_no == 0 else f"_bk_run_id = '{sync.run_id}'"
        src = WarehouseSource(source.warehouse, table=table, where=where, label=source.profile.name)
        mig = Migration(target, mapping, src, state_dir=state_dir, concurrency=concurrency)
        run_id = f"{cutover_id}-r{round_no}"
        executed = mig.execute(run_id)
        current = _keys(source.warehouse, table, mapping)
        gone = [previous[k] for k in sorted(set(previous) - set(current))] if round_no else []
        deleted = _delete(target, mapping, gone)
        previous = current
        c = executed.counts
        lag = c["created"] + c["updated"] + deleted + c["pending"] + c["failed"]
        report.rounds.append({"round": round_no, "kind": "snapshot" if round_no == 0 else "catch-up",
                              "run_id": run_id, "source_changes": changes, "created": c["created"],
                              "updated": c["updated"], "unchanged": c["unchanged"], "deleted": deleted,
                              "rejected": c["rejected"], "lag": lag, "seconds": time.monotonic() - clock})
        if round_no and lag <= lag_threshold:
            break
    # The closing comparison: the whole source as a dry run against the (freshly synced) target.
    final = Migration(target, mapping, WarehouseSource(source.warehouse, table=table, label=source.profile.name),
                      state_dir=state_dir).plan(f"{cutover_id}-final")
    target_keys = _target_keys(target, mapping)
    to_delete = len(target_keys & _migrated_keys(target, mapping, cutover_id, state_dir) - set(previous))
    report.final = {"in_sync": final.counts.get("unchanged", 0), "to_create": final.counts.get("create", 0),
                    "to_update": final.counts.get("update", 0), "to_delete": to_delete,
                    "rejected": final.counts.get("rejected", 0)}
    if report.lag:
        report.status = "red"
    elif report.final["rejected"]:
        report.status = "amber"
    else:
        report.status = "green"
    return report


def _delete(target: Any, mapping: MigrationMapping, keys: list[dict[str, Any]]) -> int:
    """Delete target rows by alternate key (the source deleted them); returns rows deleted."""
    if not keys:
        return 0
    from bridgekit.dataverse import Operation

    client = target.dataverse
    # DELETE by key is safe to repeat: a second one answers 404.
    ops = [Operation("DELETE", mapping.target, values, None, {}, idempotent=True) for values in keys]
    deleted = 0
    for start in range(0, len(ops), 500):
        for res in client.batch(ops[start:start + 500], change_set_size=1, continue_on_error=True):
            deleted += int(res.ok)
    return deleted


def _target_keys(target: Any, mapping: MigrationMapping) -> set[str]:
    from bridgekit.warehouse import quote

    expr = " || chr(31) || ".join(f"lower(coalesce(CAST({quote(k)} AS VARCHAR), ''))" for k in mapping.key)
    got = target.warehouse.arrow(f"SELECT {expr} AS k FROM dataverse.{quote(mapping.target)}")
    return {str(k) for k in got.column("k").to_pylist() if k}


def _migrated_keys(target: Any, mapping: MigrationMapping, cutover_id: str, state_dir: str | Path | None) -> set[str]:
    """Keys the cutover's rounds wrote or matched (from their checkpoints)."""
    from bridgekit.migration.checkpoint import Checkpoint, checkpoint_path
    from bridgekit.migration.engine import _state_dir

    base = _state_dir(target, state_dir)
    keys: set[str] = set()
    for path in sorted(base.glob(f"{cutover_id}-r*.sqlite")):
        with Checkpoint(checkpoint_path(base, path.stem)) as cp:
            for r in cp.query("SELECT key_json FROM rows WHERE status IN ('done', 'unchanged')"):
                keys.add(_norm(json.loads(r["key_json"]), mapping))
    return keys
