"""Mailbox deltas through Graph JSON batching: throttled items, expired links per mailbox, kills, users coming and going."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import duckdb
import pytest

from bridgekit.graph import GraphClient, GraphResponse
from bridgekit.warehouse import Warehouse
from tests.test_resume import _assert_same, _bridgekit, _kill_at_checkpoint
from tests.test_sync import _compare, _store

MAILBOX_TABLES = ("graph.messages", "graph.events")


def _workbench(emulator: Any, path: Path) -> Any:
    from bridgekit.config import SyncPlan, load_profile
    from bridgekit.workbench import Workbench, resolve_runtime

    prof = resolve_runtime(load_profile("emulator"))
    return Workbench(prof.with_values(warehouse=str(path), sync=SyncPlan((), ("users", "messages", "events"))))


def _statuses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every $batch item's status as the client received it."""
    seen: list[int] = []
    send = GraphClient._send_batch

    def spy(self: GraphClient, chunk: Any, done: Any) -> list[GraphResponse]:
        out = send(self, chunk, done)
        seen.extend(r.status for r in out)
        return out
    monkeypatch.setattr(GraphClient, "_send_batch", spy)
    return seen


@pytest.fixture(scope="module")
def synced(emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A warehouse holding users and every mailbox's messages and events (one full sync)."""
    wb = _workbench(emulator, tmp_path_factory.mktemp("mailboxes") / "wh.duckdb")
    report = wb.sync(progress=False)
    assert report.ok, report.render()
    return wb


def test_a_batched_mailbox_delta_retries_items_answered_429_and_ends_exact(
        emulator: Any, synced: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator.admin("mutate", {"creates": 60, "updates": 120, "deletes": 30, "seed": 1501})
    seen = _statuses(monkeypatch)
    with emulator.faults(throttle_rate=0.3, retry_after_s=0, services=["graph"], seed=15):
        report = synced.sync(progress=False)
    assert report.ok, report.render()
    for table in MAILBOX_TABLES:
        rep = report.table(table)
        assert rep.mode == "delta" and not rep.resynced and rep.fetched > 0
    assert 429 in seen and 200 in seen  # items were throttled one by one, the batch itself answered
    _compare(emulator, synced.warehouse, MAILBOX_TABLES)


def _ghost(conn: duckdb.DuckDBPyConnection, rid: str, user: str, folder: str) -> None:
    conn.execute("insert into graph.messages (id, user_id, parentFolderId, subject) values (?, ?, ?, 'ghost')",
                 [rid, user, folder])


def test_a_mailbox_whose_link_expired_is_read_again_alone_while_the_others_go_on(
        emulator: Any, synced: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One mailbox's link answered syncStateNotFound inside a batch: only that mailbox is read again, and
    what the warehouse held of it and the service no longer has goes; then 410 Gone for every mailbox."""
    path = synced.warehouse.path
    with duckdb.connect(str(path)) as conn:
        (token,) = conn.execute("select delta_link from bridgekit.sync_state where table_name = 'graph.messages'"
                                ).fetchone()
        links = json.loads(token)
        expired, other = sorted(links)[:2]
        links[expired] = links[expired].split("$deltatoken=")[0] + "$deltatoken=bm90LWEtdG9rZW4"
        conn.execute("update bridgekit.sync_state set delta_link = ? where table_name = 'graph.messages'",
                     [json.dumps(links, sort_keys=True)])
        # Rows the service does not have: the one in the mailbox read again goes, the other stays (its
        # mailbox goes on from its delta link, which never reports it).
        _ghost(conn, "ghost-expired", *expired.split("/"))
        _ghost(conn, "ghost-other", *other.split("/"))
    seen = _statuses(monkeypatch)
    report = synced.sync(progress=False)
    assert report.ok, report.render()
    rep = report.table("graph.messages")
    assert rep.mode == "delta" and not rep.resynced
    assert 400 in seen
    assert rep.deleted >= 1  # the ghost of the mailbox read again is counted among what the run deleted
    ids = set(synced.sql("select id from graph.messages where subject = 'ghost'")["id"])
    assert ids == {"ghost-other"}
    with duckdb.connect(str(path)) as conn:
        conn.execute("delete from graph.messages where id = 'ghost-other'")
    _compare(emulator, synced.warehouse, MAILBOX_TABLES)

    emulator.admin("mutate", {"creates": 30, "updates": 60, "deletes": 20, "seed": 1502})
    seen.clear()
    with emulator.faults(force_delta_expiry=True):
        report = synced.sync(progress=False)
    assert report.ok, report.render()
    assert 410 in seen
    for table in MAILBOX_TABLES:
        assert report.table(table).mode == "delta" and not report.table(table).resynced
    _compare(emulator, synced.warehouse, MAILBOX_TABLES)


def test_a_user_added_then_removed_starts_then_stops_being_synced(emulator: Any, synced: Any) -> None:
    from bridgekit.emulator.store import Store
    from bridgekit.emulator.synth import folder_id

    store = Store(Path(emulator.home) / "store.sqlite")
    con = _store(emulator)
    user = json.loads(con.execute('select data from "c_graph.users" order by id limit 1').fetchone()[0])
    mail = json.loads(con.execute('select data from "c_graph.messages" limit 1').fetchone()[0])
    con.close()
    uid = "0badcafe-0000-4000-8000-" + f"{random.Random(15).getrandbits(48):012x}"
    user.update(id=uid, userPrincipalName=f"newcomer-{uid[-6:]}@contoso.example", mail=None, displayName="Newcomer")
    store.put("graph.users", uid, user)
    mids = [f"AAMkNewcomer{i:04d}" for i in range(3)]
    for mid in mids:
        store.put("graph.messages", mid, {**mail, "id": mid, "subject": "welcome", "@emu.user": uid,
                                          "@emu.folder": "inbox", "parentFolderId": folder_id(uid, "inbox")})
    try:
        report = synced.sync(progress=False)
        assert report.ok, report.render()
        got = synced.sql("select id, user_id from graph.messages where user_id = ?", [uid])
        assert sorted(got["id"]) == mids
        token = json.loads(synced.warehouse.state()["graph.events"]["delta_link"])
        assert uid in token
    finally:
        store.delete_many("graph.messages", mids)
        store.delete("graph.users", uid)
        store.close()
    report = synced.sync(progress=False)
    assert report.ok, report.render()
    assert synced.sql("select count(*) as n from graph.messages where user_id = ?", [uid])["n"][0] == 0
    assert report.table("graph.users").deleted == 1
    for table in ("graph.messages", "graph.events"):
        assert not any(s.startswith(uid) for s in json.loads(synced.warehouse.state()[table]["delta_link"]))
    _compare(emulator, synced.warehouse, MAILBOX_TABLES)


def test_a_batched_poll_killed_at_a_checkpoint_resumes_exact(emulator: Any, tmp_path: Path) -> None:
    toml = tmp_path / "kill.toml"
    toml.write_text(f'[profiles.local]\nauth = "emulator"\nwarehouse = "{tmp_path / "kill.duckdb"}"\n'
                    'sync = { dataverse = [], graph = ["users", "messages", "events"] }\n')
    assert _bridgekit(toml, "sync").returncode == 0
    emulator.admin("mutate", {"creates": 200, "updates": 400, "deletes": 100, "seed": 1503})
    # The delta of messages is a batched round over every mailbox: killed after its third checkpoint (a
    # delta over the bound, so checkpointed page by page).
    _kill_at_checkpoint(toml, "graph.messages", 3, ["sync"], delta_commit_rows=0)
    assert Warehouse(tmp_path / "kill.duckdb").state()["graph.messages"]["delta_link"]
    emulator.admin("mutate", {"creates": 50, "updates": 100, "deletes": 25, "seed": 1504})
    resumed = _bridgekit(toml, "sync")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("graph.messages"))
    assert "resumed" in line
    # A small delta stages in one transaction: killed mid-poll, the next run fetches it again from the links.
    emulator.admin("mutate", {"creates": 40, "updates": 80, "deletes": 20, "seed": 1505})
    _kill_at_checkpoint(toml, "graph.messages", 2, ["sync"])
    again = _bridgekit(toml, "sync")
    assert again.returncode == 0, again.stderr[-2000:]
    line = next(x for x in again.stdout.splitlines() if x.startswith("graph.messages"))
    assert "resumed" not in line and " delta " in line
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(toml.read_text().replace("kill.duckdb", "fresh.duckdb"))
    assert _bridgekit(fresh, "sync", "--full").returncode == 0
    _assert_same(tmp_path / "kill.duckdb", tmp_path / "fresh.duckdb")
