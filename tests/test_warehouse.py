"""Warehouse: bootstrap and migrations, staging checkpoints, merges (full swap, delta), schema evolution, locks, export."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from bridgekit.errors import SyncError, WarehouseError
from bridgekit.warehouse import Column, RunRecord, TableSpec, Warehouse, widen

SPEC = TableSpec("dataverse", "thing", "thingid", (
    Column("thingid", "UUID"), Column("name", "VARCHAR"), Column("amount", "DECIMAL(38,4)"),
    Column("code", "INTEGER"), Column("code_label", "VARCHAR"), Column("seen", "TIMESTAMPTZ"),
), labels={"code": {1: "One", 2: "Two"}})


def _id(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def _rows(ids: list[int], name: str = "x") -> pa.Table:
    return pa.table({
        "thingid": [_id(i) for i in ids], "name": [f"{name}{i}" for i in ids],
        "amount": pa.array([i + 0.25 for i in ids], pa.float64()), "code": pa.array([1] * len(ids), pa.int64()),
        "code_label": ["One"] * len(ids), "seen": ["2024-05-01T10:00:00Z"] * len(ids),
    })


def _record(run: str, table: str = "dataverse.thing", mode: str = "full") -> RunRecord:
    now = datetime.now(UTC)
    return RunRecord(run_id=run, table=table, mode=mode, started_at=now, ended_at=now, status="ok")


def _stage(wh: Warehouse, spec: TableSpec, mode: str, pages: list[tuple[pa.Table | None, list[str]]],
           token: str | None = "tok") -> dict[str, object]:
    with wh.staging() as stg:
        st = stg.begin(spec, run_id="r", mode=mode, cursors=["c0"])
        for i, (rows, dels) in enumerate(pages):
            last = i == len(pages) - 1
            stg.write_page(st, 0, rows, dels, None, None if last else f"c{i + 1}", token=token if last else None)
        stg.mark_fetched(st, token)
        counts = stg.merge([st], [_record("r", spec.id, mode)], run_id="r")
        assert stg.pending() == []
    c = counts[spec.id]
    return {"created": c.created, "updated": c.updated, "deleted": c.deleted, "rows": c.rows}


def test_full_then_delta_merge_counts_and_contents(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    assert _stage(wh, SPEC, "full", [(_rows([1, 2]), []), (_rows([3]), [])]) == \
        {"created": 3, "updated": 0, "deleted": 0, "rows": 3}
    got = _stage(wh, SPEC, "delta", [(_rows([2, 4], "y"), [_id(1)]), (None, [_id(99)])])
    assert got == {"created": 1, "updated": 1, "deleted": 1, "rows": 3}
    df = wh.sql("select thingid::varchar as id, name, amount, code_label, _bk_run_id from dataverse.thing order by 1")
    assert list(df["name"]) == ["y2", "x3", "y4"]
    assert df["amount"][0] == 2.25
    assert set(df["_bk_run_id"]) == {"r"}
    labels = wh.sql("select value, label from bridgekit.option_labels order by 1")
    assert list(labels["label"]) == ["One", "Two"]
    state = wh.state()["dataverse.thing"]
    assert state["delta_link"] == "tok" and state["row_count"] == 3
    assert len(wh.sql("select * from bridgekit.sync_runs")) == 2
    assert wh.sql("select max(version) as v from bridgekit._migrations")["v"][0] >= 1


def test_full_reload_counts_changes_and_removals(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    _stage(wh, SPEC, "full", [(_rows([1, 2, 3]), [])])
    # 1 unchanged, 2 changed, 3 gone, 5 new
    changed = _rows([1, 2, 5])
    changed = changed.set_column(1, "name", pa.array(["x1", "changed", "x5"]))
    assert _stage(wh, SPEC, "full", [(changed, [])]) == {"created": 1, "updated": 1, "deleted": 1, "rows": 3}


def test_later_occurrence_of_a_key_wins(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    _stage(wh, SPEC, "full", [(_rows([1]), [])])
    _stage(wh, SPEC, "delta", [(_rows([7], "first"), []), (None, [_id(7)]), (_rows([7], "again"), [])])
    assert list(wh.sql("select name from dataverse.thing order by name")["name"]) == ["again7", "x1"]


def test_schema_evolution_adds_and_widens_never_drops(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    _stage(wh, SPEC, "full", [(_rows([1]), [])])
    cols = (*tuple(c if c.name != "code" else Column("code", "BIGINT") for c in SPEC.columns if c.name != "name"), Column("extra", "VARCHAR"))
    spec2 = TableSpec(SPEC.schema, SPEC.name, SPEC.key, cols)
    rows = _rows([2]).drop_columns(["name"]).append_column("extra", pa.array(["e"]))
    _stage(wh, spec2, "delta", [(rows, [])])
    types = dict(wh.sql("select column_name, data_type from duckdb_columns() where table_name='thing'").values)
    assert types["code"] == "BIGINT" and types["extra"] == "VARCHAR" and "name" in types
    # a full reload keeps the vanished column too
    _stage(wh, spec2, "full", [(rows, [])])
    assert "name" in set(wh.sql("select column_name from duckdb_columns() where table_name='thing'")["column_name"])


def test_widen_rules() -> None:
    assert widen("INTEGER", "BIGINT") == "BIGINT"
    assert widen("BIGINT", "INTEGER") is None
    assert widen("DECIMAL(38,2)", "DECIMAL(38,4)") == "DECIMAL(38,4)"
    assert widen("INTEGER", "VARCHAR") == "VARCHAR"
    assert widen("VARCHAR", "INTEGER") is None


def test_interrupted_merge_is_not_applied_twice(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    _stage(wh, SPEC, "full", [(_rows([1]), [])])
    with wh.staging() as stg:
        st = stg.begin(SPEC, run_id="r2", mode="delta", cursors=["c"])
        stg.write_page(st, 0, _rows([2]), [], None, None, token="t2")
        stg.mark_fetched(st, "t2")
        stg.merge([st], [_record("r2", mode="delta")], run_id="r2")
    # Pretend the process died before clearing staging: put the same stage back and merge again.
    with wh.staging() as stg:
        st2 = stg.begin(SPEC, run_id="r2", mode="delta", cursors=["c"])
        stg.conn.execute("update stage_tables set stage_id = ?", [st.stage_id])
        stg.write_page(st2, 0, _rows([2]), [], None, None, token="t2")
        again = stg.get("dataverse.thing")
        assert again is not None
        assert stg.merge([again], [], run_id="r3") == {}
    assert len(wh.sql("select * from dataverse.thing")) == 2


def _hold_write_lock(path: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    conn = duckdb.connect(path)
    ready.set()
    release.wait(30)
    conn.close()


@contextlib.contextmanager
def _writer_elsewhere(path: Path) -> Iterator[Any]:
    """Another process opens the warehouse read-write (holding its lock) once it can; yields the event
    it sets when it has (``.wait(30)`` it) and ends when the block does."""
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_write_lock, args=(str(path), ready, release))
    proc.start()
    try:
        yield ready, release
    finally:
        release.set()
        proc.join(30)


def test_reader_waits_for_a_writer_then_reads(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb", lock_timeout=20)
    _stage(wh, SPEC, "full", [(_rows([1, 2]), [])])
    with _writer_elsewhere(wh.path) as (ready, release):
        assert ready.wait(30)
        timer = __import__("threading").Timer(0.5, release.set)
        timer.start()
        assert wh.sql("select count(*) as n from dataverse.thing")["n"][0] == 2


def test_reader_gives_up_clearly_when_locked_too_long(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb", lock_timeout=0.3)
    wh.bootstrap()
    with _writer_elsewhere(wh.path) as (ready, _release):
        assert ready.wait(30)
        with pytest.raises(WarehouseError, match="stayed locked"):
            wh.sql("select 1")


def test_missing_warehouse_says_to_sync_first(tmp_path: Path) -> None:
    with pytest.raises(WarehouseError) as info:
        Warehouse(tmp_path / "none.duckdb").sql("select 1")
    assert "bridgekit sync" in info.value.hint


def test_second_lock_holder_gets_sync_error_with_pid(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    # flock is per open file description, so a second acquire in this process conflicts too.
    with wh.lock(), pytest.raises(SyncError, match=f"pid {os.getpid()}"):
        wh.lock().acquire()
    with wh.lock():
        pass  # released cleanly


def test_export_parquet_and_delta(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "w.duckdb")
    _stage(wh, SPEC, "full", [(_rows([1, 2, 3]), [])])
    out = wh.export(tmp_path / "pq", format="parquet")
    assert out == [tmp_path / "pq" / "dataverse" / "thing.parquet"]
    assert duckdb.sql(f"select count(*) from '{out[0]}'").fetchall() == [(3,)]
    from deltalake import DeltaTable

    (path,) = wh.export(tmp_path / "dl", format="delta")
    table = DeltaTable(str(path)).to_pyarrow_table()
    assert table.num_rows == 3 and "thingid" in table.column_names


def test_held_reader_reuses_its_connection_for_a_while_then_lets_a_writer_in(tmp_path: Path) -> None:
    """A run of small queries shares one read connection; ``hold_s`` after it opened it is released even
    with no query coming, so a merge in another process is not kept out for longer; the next query opens
    a new one."""
    wh = Warehouse(tmp_path / "w.duckdb", lock_timeout=0.5)
    _stage(wh, SPEC, "full", [(_rows([1, 2, 3]), [])])
    opened = []
    real = wh.reader

    def counting_reader() -> Any:
        opened.append(1)
        return real()

    wh.reader = counting_reader  # type: ignore[method-assign]
    with wh.held_reader(hold_s=0.3) as reader:
        for n in (1, 2, 3):
            got = reader.arrow("select name from dataverse.thing where thingid = ?", [_id(n)])
            assert got.column("name").to_pylist() == [f"x{n}"]
        assert len(opened) == 1
        time.sleep(0.6)
        with _writer_elsewhere(wh.path) as (ready, _release):  # another process gets the write lock at once
            assert ready.wait(30)
        assert reader.arrow("select count(*) as n from dataverse.thing").column("n").to_pylist() == [3]
        assert len(opened) == 2
        with pytest.raises(WarehouseError, match="query failed"):
            reader.arrow("select * from dataverse.nothing_here")
    with _writer_elsewhere(wh.path) as (ready, _release):  # closed with the block
        assert ready.wait(30)
