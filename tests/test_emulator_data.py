"""The emulator's data: schema, the synthetic company (determinism, coherence, planted defects) and mutate."""

from __future__ import annotations

import datetime as dt
import math
import re
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridgekit.emulator import activity, synth
from bridgekit.emulator.schema import ACTIVITY_TYPES, GRAPH_RESOURCES, PLATFORM_TABLES, TABLES, table_by_set
from bridgekit.emulator.store import Store

ANCHOR = "2026-01-15"
VALID_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def rows(store: Store, coll: str) -> list[dict[str, Any]]:
    return [r.load() for r in store.query(coll)]


def by_id(store: Store, coll: str) -> dict[str, dict[str, Any]]:
    return {r.id: r.load() for r in store.query(coll)}


@pytest.fixture(scope="module")
def company(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The small test tenant, generated once and only read."""
    store = Store(tmp_path_factory.mktemp("company") / "emulator.db")
    synth.generate(store, seed=42, scale="small", anchor=ANCHOR)
    return store


@pytest.fixture
def tiny(tmp_path: Path) -> Store:
    store = Store(tmp_path / "emulator.db")
    synth.generate(store, seed=7, scale="tiny", anchor=ANCHOR)
    return store


# -- schema -----------------------------------------------------------------------------------------

def test_schema_covers_every_collection_of_the_store_contract() -> None:
    expected = {"account", "contact", "lead", "opportunity", "systemuser", "team", "businessunit",
                "transactioncurrency", "email", "appointment", "phonecall", "task", "activitypointer"}
    assert set(TABLES) == expected | set(PLATFORM_TABLES)
    assert set(GRAPH_RESOURCES) == {"users", "groups", "messages", "events", "contacts"}
    assert table_by_set("opportunities") is TABLES["opportunity"]
    # Dataverse tracks none of the platform (system) tables either.
    assert [t for t, d in TABLES.items() if not d.change_tracking] == ["businessunit", *PLATFORM_TABLES]
    for t in TABLES.values():
        names = [c.json_name for c in t.columns]
        assert len(names) == len(set(names)), t.logical_name
        assert t.column(t.primary_id) is not None and t.column(t.primary_name) is not None
        for key in t.alternate_keys:
            assert all(t.column(k) is not None for k in key)


def test_status_options_belong_to_existing_states() -> None:
    for t in TABLES.values():
        state, status = t.column("statecode"), t.column("statuscode")
        if state is None:
            continue
        assert state.options is not None and status is not None and status.options is not None
        assert set(status.options.state_of.values()) == set(state.options.options)
        for s, default in state.options.default_status.items():
            assert status.options.state_of[default] == s


# -- the synthetic company ---------------------------------------------------------------------------

def test_same_seed_gives_identical_data_and_another_seed_does_not(tmp_path: Path) -> None:
    def snapshot(seed: int, name: str) -> dict[str, list[tuple[str, str]]]:
        store = Store(tmp_path / name)
        synth.generate(store, seed=seed, scale="tiny", anchor=ANCHOR)
        return {c: [(r.id, r.data) for r in store.query(c)] for c in store.collections()}

    first, again, other = snapshot(3, "a.db"), snapshot(3, "b.db"), snapshot(4, "c.db")
    assert first == again
    assert first["account"] != other["account"]


def test_summary_counts_match_the_store_and_scale(company: Store) -> None:
    meta = company.get_meta("company")
    for coll, n in meta["records"].items():
        assert company.count(coll) == n, coll
    assert 8_000 <= meta["dataverse_rows"] + meta["graph_records"] <= 16_000
    assert meta["anchor"] == ANCHOR and meta["seed"] == 42


def test_records_carry_every_schema_column_with_valid_choices(company: Store) -> None:
    for name, table in TABLES.items():
        expected = {c.json_name for c in table.columns}
        choices = {c.json_name: c.options for c in table.columns
                   if c.type in ("Picklist", "State", "Status") and c.options}
        status = table.column("statuscode")
        for rec in rows(company, name)[:300]:
            assert {k for k in rec if not k.startswith("@emu.")} == expected, name
            assert rec[table.primary_id] == rec[table.primary_id].lower()
            assert isinstance(rec["versionnumber"], int)
            for col, opts in choices.items():
                assert rec[col] is None or rec[col] in opts.options, (name, col, rec[col])
            if status is not None and status.options and status.options.state_of and rec["statuscode"] is not None:
                assert status.options.state_of[rec["statuscode"]] == rec["statecode"], name
            if "createdon" not in expected:
                continue  # an intersect table (systemuserroles) has no system columns
            for key in ("createdon", "modifiedon"):
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec[key])
            assert rec["modifiedon"] >= rec["createdon"]


def test_history_spans_about_three_years_before_the_anchor(company: Store) -> None:
    created = sorted(r["createdon"] for r in rows(company, "opportunity"))
    assert created[0] < "2023-02-01" and created[-1] < "2026-01-15"


def test_every_systemuser_is_an_entra_user_with_the_same_email(company: Store) -> None:
    users = by_id(company, "graph.users")
    sysusers = rows(company, "systemuser")
    apps = [su for su in sysusers if su["applicationid"]]  # application users stand for a service principal
    assert sysusers and [a["accessmode"] for a in apps] == [4]
    for su in sysusers:
        if su["applicationid"]:
            continue
        g = users[su["azureactivedirectoryobjectid"]]
        assert g["mail"] == su["internalemailaddress"] == su["domainname"]
        assert g["displayName"] == su["fullname"]


def test_sales_teams_are_entra_groups_with_their_members(company: Store) -> None:
    groups = by_id(company, "graph.groups")
    users = by_id(company, "graph.users")
    aad_teams = [t for t in rows(company, "team") if t["azureactivedirectoryobjectid"]]
    assert len(aad_teams) == 3
    for t in aad_teams:
        members = groups[t["azureactivedirectoryobjectid"]]["@emu.members"]
        assert members and all(m in users for m in members)


def test_lookups_resolve_except_the_planted_orphans(company: Store) -> None:
    defects = company.get_meta("planted_defects")["orphan_lookups"]
    accounts, contacts = by_id(company, "account"), by_id(company, "contact")
    owners = {"systemuser": by_id(company, "systemuser"), "team": by_id(company, "team")}
    dangling_opps = {o["opportunityid"] for o in rows(company, "opportunity")
                     if o["_parentaccountid_value"] not in accounts}
    assert dangling_opps == set(defects["opportunity"]["ids"]) and dangling_opps
    dangling_contacts = {c["contactid"] for c in contacts.values()
                         if c["_parentcustomerid_value"] and c["_parentcustomerid_value"] not in accounts}
    assert dangling_contacts == set(defects["contact"]["ids"]) and dangling_contacts
    for name in ("account", "contact", "opportunity", "lead", *ACTIVITY_TYPES):
        for rec in rows(company, name):
            assert rec["_ownerid_value"] in owners[rec["@emu._ownerid_value.type"]], name
    for o in rows(company, "opportunity"):
        assert o["_parentcontactid_value"] is None or o["_parentcontactid_value"] in contacts


def test_activities_and_activitypointer_agree(company: Store) -> None:
    pointers = by_id(company, "activitypointer")
    total = 0
    for kind in ACTIVITY_TYPES:
        for rec in rows(company, kind):
            p = pointers[rec["activityid"]]
            assert p["activitytypecode"] == kind
            assert p["subject"] == rec["subject"] and p["statecode"] == rec["statecode"]
            assert p["_regardingobjectid_value"] == rec["_regardingobjectid_value"]
            assert p["@emu._regardingobjectid_value.type"] == rec["@emu._regardingobjectid_value.type"]
            total += 1
    assert total == len(pointers)


def test_tracked_emails_and_meetings_are_in_the_owners_mailbox(company: Store) -> None:
    graph_of = {u["systemuserid"]: u["azureactivedirectoryobjectid"] for u in rows(company, "systemuser")}
    messages = {(m["@emu.user"], m["internetMessageId"]): m for m in rows(company, "graph.messages")}
    emails = rows(company, "email")
    assert emails
    for e in emails:
        m = messages[(graph_of[e["_ownerid_value"]], e["messageid"])]
        assert m["subject"] == e["subject"]
        assert m["@emu.folder"] == ("sentitems" if e["directioncode"] else "inbox")
        outside = e["torecipients"] if e["directioncode"] else e["sender"]
        people = [m["from"]["emailAddress"]["address"]] + [r["emailAddress"]["address"] for r in m["toRecipients"]]
        assert outside in people
    events = {(ev["@emu.user"], ev["iCalUId"]) for ev in rows(company, "graph.events")}
    for a in rows(company, "appointment"):
        assert (graph_of[a["_ownerid_value"]], a["globalobjectid"]) in events


def test_contact_addresses_appear_in_graph_mail(company: Store) -> None:
    contact_mail = {c["emailaddress1"] for c in rows(company, "contact") if c["emailaddress1"]}
    seen = {r["emailAddress"]["address"] for m in rows(company, "graph.messages")
            for r in [m["from"], *m["toRecipients"]]}
    assert len(contact_mail & seen) > len(contact_mail) // 3


def test_planted_defects_match_the_data(company: Store) -> None:
    d = company.get_meta("planted_defects")
    contacts = rows(company, "contact")
    missing = {c["contactid"] for c in contacts if c["emailaddress1"] is None}
    malformed = {c["contactid"] for c in contacts
                 if c["emailaddress1"] is not None and not VALID_EMAIL.match(c["emailaddress1"])}
    assert missing == set(d["contacts_missing_email"]["ids"]) and len(missing) == d["contacts_missing_email"]["count"]
    assert malformed == set(d["contacts_malformed_email"]["ids"])
    assert len(malformed) == d["contacts_malformed_email"]["count"]
    assert math.isclose(len(missing) / len(contacts), 0.05, abs_tol=0.01)
    assert math.isclose(len(malformed) / len(contacts), 0.03, abs_tol=0.01)

    cutoff = (dt.date.fromisoformat(ANCHOR) - dt.timedelta(days=90)).isoformat()
    stale = {o["opportunityid"] for o in rows(company, "opportunity")
             if o["statecode"] == 0 and o["estimatedclosedate"] < cutoff}
    assert stale == set(d["stale_open_opportunities"]["ids"]) and len(stale) == d["stale_open_opportunities"]["count"]

    accounts = by_id(company, "account")

    def norm(name: str) -> str:
        return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()

    for dup, orig in d["duplicate_accounts"]["pairs"]:
        a, b = norm(accounts[dup]["name"]), norm(accounts[orig]["name"])
        assert a == b or b.startswith(a) or a.startswith(b)
        assert accounts[dup]["websiteurl"] == accounts[orig]["websiteurl"]
    assert len(d["duplicate_accounts"]["ids"]) == d["duplicate_accounts"]["count"] == 8  # 2% of 400


def test_disabled_users_defects_match_the_data(company: Store) -> None:
    d = company.get_meta("planted_defects")
    disabled = {u["id"] for u in rows(company, "graph.users") if not u["accountEnabled"]}
    sysusers = {u["azureactivedirectoryobjectid"]: u for u in rows(company, "systemuser")}
    active = {sysusers[g]["systemuserid"] for g in disabled if g in sysusers and not sysusers[g]["isdisabled"]}
    assert active == set(d["disabled_users_active_in_crm"]["ids"]) and active
    owning = d["disabled_users_owning_records"]
    assert set(owning["entra_ids"]) == disabled
    for table, n in owning["records"].items():
        assert sum(1 for r in rows(company, table) if r["_ownerid_value"] in owning["ids"]) == n
    assert sum(owning["records"].values()) > 0


def _touches_90d(store: Store) -> dict[str, int]:
    """The model's engagement feature, recomputed from the rows as docs/emulator-company.md defines it."""
    opps = {o["opportunityid"]: o for o in rows(store, "opportunity") if o["statecode"] in (1, 2)}
    count = Counter[str]()
    for kind in ("email", "appointment", "phonecall"):
        for a in rows(store, kind):
            o = opps.get(a["_regardingobjectid_value"])
            if o is None or a["actualend"] is None:
                continue
            close = dt.datetime.fromisoformat(o["actualclosedate"])
            end = dt.datetime.fromisoformat(a["actualend"])
            if close - dt.timedelta(days=90) <= end < close:
                count[o["opportunityid"]] += 1
    return {oid: count[oid] for oid in opps}


def test_deals_with_more_engagement_are_won_more_often(company: Store) -> None:
    touches = _touches_90d(company)
    won = {o["opportunityid"] for o in rows(company, "opportunity") if o["statecode"] == 1}
    low = [oid for oid, n in touches.items() if n == 0]
    high = [oid for oid, n in touches.items() if n >= 3]
    assert len(low) > 30 and len(high) > 30

    def rate(ids: list[str]) -> float:
        return sum(i in won for i in ids) / len(ids)

    assert rate(high) > rate(low) + 0.15
    model = company.get_meta("generating_model")
    assert model["won"] == len(won) and model["closed_opportunities"] == len(touches)
    assert model["coefficients"]["engagement"] > 0 > model["coefficients"]["size"]


def test_won_deals_peak_in_the_fourth_quarter(company: Store) -> None:
    quarters = Counter((int(o["actualclosedate"][5:7]) - 1) // 3 + 1
                       for o in rows(company, "opportunity") if o["statecode"] == 1)
    assert quarters[4] > max(quarters[1], quarters[2], quarters[3])


def test_explicit_counts_and_bad_scales(tmp_path: Path) -> None:
    store = Store(tmp_path / "e.db")
    out = synth.generate(store, seed=1, scale={"users": 10, "accounts": 30, "contacts": 60, "opportunities": 40,
                                               "leads": 20, "activities": 10}, anchor=ANCHOR)
    assert out["collections"]["account"] == 30 and out["collections"]["contact"] == 60
    assert out["collections"]["opportunity"] == 40 and out["collections"]["lead"] == 20
    with pytest.raises(ValueError, match="unknown scale"):
        synth.generate(store, scale="huge")
    with pytest.raises(ValueError, match="unknown count keys"):
        synth.generate(store, scale={"acounts": 5})


# -- live activity -----------------------------------------------------------------------------------

def _feed(store: Store, since: int) -> dict[str, tuple[set[str], set[str]]]:
    out = {}
    for coll in store.collections():
        changes = store.changes_since(coll, since, limit=10**7)
        ups = {c.id for c in changes if not c.deleted}
        dels = {c.id for c in changes if c.deleted}
        if ups or dels:
            out[coll] = (ups, dels)
    return out


def test_mutate_reports_exactly_what_the_change_feed_shows(tiny: Store) -> None:
    before, called = tiny.current_version(), time.time()
    out = activity.mutate(tiny, creates=40, updates=40, deletes=25, seed=11)
    assert called <= out["committed_at"] <= time.time()
    assert out["counts"]["creates"] == 40 and out["counts"]["updates"] == 40 and out["counts"]["deletes"] == 25
    assert out["version_before"] == before and out["version"] == tiny.current_version()
    expected = {}
    for coll in set(out["created"]) | set(out["updated"]) | set(out["deleted"]):
        ups = set(out["created"].get(coll, [])) | set(out["updated"].get(coll, []))
        expected[coll] = (ups, set(out["deleted"].get(coll, [])))
        assert not set(out["created"].get(coll, [])) & set(out["updated"].get(coll, []))
    assert _feed(tiny, before) == expected
    touched = {c.split(".")[0] for c in expected}
    assert {"graph", "activitypointer"} <= touched


def test_mutate_keeps_activitypointer_consistent(tiny: Store) -> None:
    activity.mutate(tiny, creates=60, updates=60, deletes=60, seed=5)
    pointers = by_id(tiny, "activitypointer")
    kinds = {r["activityid"]: k for k in ACTIVITY_TYPES for r in rows(tiny, k)}
    assert set(pointers) == set(kinds)
    assert all(pointers[i]["activitytypecode"] == k for i, k in kinds.items())


def test_deleting_contacts_cascades_like_dataverse(tiny: Store) -> None:
    out = activity.mutate(tiny, deletes=60, seed=2)
    gone = set(out["deleted"].get("contact", []))
    assert gone
    assert not [p for p in rows(tiny, "activitypointer") if p["_regardingobjectid_value"] in gone]
    for coll, col in (("opportunity", "_parentcontactid_value"), ("account", "_primarycontactid_value"),
                      ("lead", "_parentcontactid_value")):
        assert not [r for r in rows(tiny, coll) if r[col] in gone], coll


def test_mutate_with_a_seed_is_repeatable(tmp_path: Path) -> None:
    reports = []
    for name in ("a.db", "b.db"):
        store = Store(tmp_path / name)
        synth.generate(store, seed=9, scale="tiny", anchor=ANCHOR)
        out = activity.mutate(store, creates=20, updates=20, deletes=20, seed=4)
        reports.append((out["created"], out["updated"], out["deleted"]))
    assert reports[0] == reports[1]


def test_group_membership_change_is_a_new_group_version(tiny: Store) -> None:
    before = {r.id: (r.version, r.load()["@emu.members"]) for r in tiny.query("graph.groups")}
    out = {}
    for seed in range(40):  # updates are dealt at random: repeat until one lands on groups
        out = activity.mutate(tiny, updates=5, seed=seed)
        if out["updated"].get("graph.groups"):
            break
    changed = out["updated"]["graph.groups"]
    for gid in changed:
        row = tiny.get("graph.groups", gid)
        assert row is not None and row.version > before[gid][0]
        assert row.load()["@emu.members"] != before[gid][1]


def test_mutate_on_an_empty_store_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "empty.db")
    out = activity.mutate(store, creates=5, updates=5, deletes=5, seed=1)
    assert out["counts"]["records"] == 0 and out["created"] == {} and out["deleted"] == {}


def test_versions_allocated_in_a_transaction_are_seen_inside_it_and_stored_at_commit(tmp_path: Path) -> None:
    """The version counter lives in memory during a write transaction: what it hands out must still be
    strictly increasing, visible to reads inside the transaction, invisible outside it until commit,
    persisted by the commit, and forgotten when the transaction rolls back."""
    store = Store(tmp_path / "v.db")
    store.ensure_collection("thing")
    start = store.current_version()
    seen_outside: list[int] = []
    with store.write():
        first = store.put("thing", "a", {"n": 1})
        with pytest.raises(RuntimeError), store.savepoint():
            store.put("thing", "b", {"n": 2})
            raise RuntimeError("undo this part")
        second = store.put("thing", "c", {"n": 3})
        assert store.current_version() == second
        with sqlite3.connect(tmp_path / "v.db") as other:
            seen_outside.append(int(other.execute("SELECT v FROM meta WHERE k='version'").fetchone()[0]))
    assert first == start + 1 and second > first
    assert seen_outside == [start]  # other connections see only committed versions
    assert store.get("thing", "b") is None
    assert Store(tmp_path / "v.db").current_version() == second
    with pytest.raises(RuntimeError), store.write():
        store.put("thing", "d", {"n": 4})
        raise RuntimeError("roll the whole transaction back")
    assert store.current_version() == second and store.get("thing", "d") is None
    assert store.put("thing", "e", {"n": 5}) == second + 1
    changed = [(c.id, c.version) for c in store.changes_since("thing", start)]
    assert changed == [("a", first), ("c", second), ("e", second + 1)]
