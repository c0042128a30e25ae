"""Live activity in the emulated tenant: business-like creates, updates and deletes across both services.

:func:`mutate` is what makes delta queries and change tracking worth testing: it changes the data the
way a sales team and its mail system would (new contacts, deals moving through stages and closing,
mail and meetings, people changing jobs, group membership changes, deleted mail) and returns exactly
which ids it created, updated and deleted in each collection, so a test can compare a delta feed with
the truth.

Consistency rules kept on every change:

* every email/appointment/phonecall/task row has its twin in ``activitypointer`` (same ``activityid``),
  created, updated and deleted together;
* deleting a contact behaves like Dataverse's cascade: activities regarding it are deleted, and lookups
  to it (account primary contact, opportunity/lead parent contact, contact parent customer) are cleared
  ("remove link"), which counts as an update of the referring rows;
* a group membership change rewrites the group (new version), which Graph delta reports as a change.
"""

from __future__ import annotations

import base64
import datetime as dt
import random
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bridgekit.emulator.schema import ACTIVITY_TYPES, TABLES
from bridgekit.emulator.store import Row, Store
from bridgekit.emulator.synth import (
    COMPANY_DOMAIN,
    POINTER_STATUS,
    VERSION_FIELD,
    folder_id,
    record_template,
)

__all__ = ["mutate"]

_HEX = "0123456789abcdef"
_VALID_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

# Relative weights of the business operations behind each kind of change.
_CREATE_MIX = (("contact", 14), ("opportunity", 10), ("lead", 5), ("email", 20), ("phonecall", 8),
               ("task", 8), ("appointment", 5), ("graph.messages", 18), ("graph.events", 6),
               ("graph.contacts", 6))
_UPDATE_MIX = (("account", 10), ("contact", 18), ("opportunity", 20), ("lead", 4), ("activity", 10),
               ("graph.users", 10), ("graph.groups", 5), ("graph.messages", 17), ("graph.events", 6))
_DELETE_MIX = (("activity", 40), ("contact", 10), ("graph.messages", 32), ("graph.events", 10),
               ("graph.contacts", 8))
# Lookups that point at a contact and are cleared when it goes ("remove link").
_CONTACT_REFS = (("account", "_primarycontactid_value"), ("opportunity", "_parentcontactid_value"),
                 ("lead", "_parentcontactid_value"), ("contact", "_parentcustomerid_value"))
_FIRST = ("Alex", "Sam", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Avery", "Quinn", "Robin",
          "Drew", "Harper", "Rowan", "Sasha", "Kai")
_LAST = ("Keller", "Brandt", "Osei", "Lindgren", "Moreau", "Tanaka", "Rivera", "Novak", "Abbott", "Fischer",
         "Costa", "Nyberg", "Quinlan", "Sato", "Varga", "Walsh")
_TITLES = ("Procurement Manager", "IT Director", "Operations Manager", "Head of Finance", "CTO",
           "Project Manager", "Buyer", "Facilities Manager", "VP Operations")
_PRODUCTS = ("Support renewal", "Cloud migration", "Analytics subscription", "Hardware refresh",
             "Security assessment", "Licence expansion", "Training programme", "IoT sensors")
_STEPS = ("1-Qualify", "2-Develop", "3-Propose", "4-Close")
_STAGE_PROB = (10, 25, 50, 75)


def mutate(store: Store, *, creates: int = 0, updates: int = 0, deletes: int = 0,
           seed: int | None = None) -> dict[str, Any]:
    """Apply ``creates`` + ``updates`` + ``deletes`` business operations to the store.

    Each operation changes one primary record; some bring companions, all reported: an activity's
    ``activitypointer`` twin, a deleted contact's cascade (its activities deleted, lookups to it cleared).
    The created, updated and deleted id sets are disjoint within a collection, so after the call a
    change feed from the version before it shows exactly ``created | updated`` as upserts and
    ``deleted`` as deletes.

    Args:
        store: a store filled by :func:`bridgekit.emulator.synth.generate`.
        creates: new records (contacts, opportunities, leads, activities, mail, meetings, Outlook contacts).
        updates: changed records (phones, titles, stages, won/lost, read flags, group members ...).
        deletes: removed records (activities, contacts, mail, meetings, Outlook contacts).
        seed: make the choice of changes repeatable (the timestamps are still the current time).

    Returns:
        ``{"created": {coll: [ids]}, "updated": {coll: [ids]}, "deleted": {coll: [ids]},
        "counts": {"creates", "updates", "deletes", "records"}, "version_before", "version",
        "committed_at"}``: ``committed_at`` is when the changes became visible (Unix seconds), for
        measuring how long a reader takes to see them.
        Operations that found nothing to act on (an empty store) are skipped and not counted.

    Example:
        >>> from bridgekit.emulator import synth
        >>> s = Store(":memory:")
        >>> _ = synth.generate(s, seed=1, scale="tiny", anchor="2026-01-15")
        >>> out = mutate(s, creates=5, updates=5, deletes=5, seed=3)
        >>> out["counts"]["creates"]
        5
    """
    for name, n in (("creates", creates), ("updates", updates), ("deletes", deletes)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0")
    rng = random.Random(seed)  # noqa: S311 - synthetic changes, not security
    m = _Mutation(store, rng)
    m.version_before = store.current_version()
    done = {"creates": 0, "updates": 0, "deletes": 0}
    for op in _deal(rng, _DELETE_MIX, deletes):
        done["deletes"] += m.delete(op)
    m.cascade_contacts()
    for op in _deal(rng, _UPDATE_MIX, updates):
        done["updates"] += m.update(op)
    for op in _deal(rng, _CREATE_MIX, creates):
        done["creates"] += m.create(op)
    m.flush()
    committed_at = time.time()
    out = m.report()
    out["counts"] = done | {"records": sum(len(v) for part in ("created", "updated", "deleted")
                                           for v in out[part].values())}
    out["version_before"] = m.version_before
    out["version"] = store.current_version()
    out["committed_at"] = committed_at
    return out


def _deal(rng: random.Random, mix: Sequence[tuple[str, int]], n: int) -> list[str]:
    return rng.choices([k for k, _ in mix], [w for _, w in mix], k=n) if n > 0 else []


def _now() -> tuple[str, str]:
    """(Web API timestamp, Graph dateTimeTimeZone) for the current second."""
    t = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ"), t.strftime("%Y-%m-%dT%H:%M:%S.0000000")


class _Mutation:
    """One mutate call: samples existing rows, stages writes, keeps the id sets disjoint."""

    def __init__(self, store: Store, rng: random.Random) -> None:
        self.store = store
        self.rng = rng
        self.now, self.now_graph = _now()
        self.version_before = 0
        self.puts: dict[str, dict[str, dict[str, Any]]] = {}
        self.dels: dict[str, list[str]] = {}
        # Insertion-ordered id sets per collection.
        self.created: dict[str, dict[str, None]] = {}
        self.updated: dict[str, dict[str, None]] = {}
        self.touched: dict[str, set[str]] = {}
        self._bounds: dict[str, tuple[str, str] | None] = {}
        self.pools: dict[str, list[str]] = {}  # ids not drawn yet (for rows about to change)
        self.every: dict[str, list[str]] = {}  # all ids at the start (for rows only read)
        self.gone: dict[str, set[str]] = {}
        self.doomed_contacts: list[str] = []
        sysusers = [r.load() for r in store.query("systemuser")]
        self.sys_to_graph = {u["systemuserid"]: u["azureactivedirectoryobjectid"] for u in sysusers}
        self.sys_active = [u["systemuserid"] for u in sysusers if not u.get("isdisabled")]
        self.graph_users = [r.load() for r in store.query("graph.users")]
        self.graph_by_id = {u["id"]: u for u in self.graph_users}
        self.groups = [r.load() for r in store.query("graph.groups")]
        self.currency = next((r.id for r in store.query("transactioncurrency", limit=1)), None)

    # -- sampling ----------------------------------------------------------------------------------
    def _range(self, coll: str) -> tuple[str, str] | None:
        if coll not in self._bounds:
            lo = self.store.query(coll, limit=1)
            hi = self.store.query(coll, order_by=[("id", True)], limit=1)
            self._bounds[coll] = (lo[0].id, hi[0].id) if lo and hi else None
        return self._bounds[coll]

    def sample(self, coll: str, *, fresh: bool = True) -> Row | None:
        """A random existing row that this call has not deleted.

        With ``fresh`` the row must also be untouched by this call (it is about to be changed). The
        first tries seek to a random key (O(log n), fine for big collections); when they keep hitting
        rows already used, the collection's ids are read once and drawn from directly.
        """
        bounds = self._range(coll)
        if bounds is None:
            return None
        skip = self.touched.get(coll, set()) if fresh else set()
        gone = self.gone.setdefault(coll, set())
        pool = self.pools.get(coll)
        if pool is None:
            lo, hi = bounds
            p = 0
            while p < min(len(lo), len(hi)) and lo[p] == hi[p]:
                p += 1
            for _ in range(3):
                if p < min(len(lo), len(hi)):
                    key = lo[:p] + chr(self.rng.randint(ord(lo[p]), ord(hi[p]))) + f"{self.rng.getrandbits(40):010x}"
                else:
                    key = lo
                rows = self.store.query(coll, where="id >= ?", params=(key,), limit=1)
                if rows and rows[0].id not in skip and rows[0].id not in gone:
                    return rows[0]
            every = self.store.ids(coll)
            self.pools[coll] = pool = list(every)
            self.every[coll] = every
        if not fresh:  # any live row will do: draw from all ids
            every = self.every[coll]
            for _ in range(20):
                rid = every[self.rng.randrange(len(every))]
                if rid not in gone and (row := self.store.get(coll, rid)) is not None:
                    return row
            return None
        while pool:
            i = self.rng.randrange(len(pool))
            rid = pool[i]
            pool[i] = pool[-1]  # swap-remove: a drawn row is not drawn again in this call
            pool.pop()
            if rid in gone or rid in skip:
                continue
            row = self.store.get(coll, rid)
            if row is not None:
                return row
        return None

    def record(self, coll: str, row: Row) -> dict[str, Any]:
        """The staged version of a row if this call already changed it, else the stored one."""
        staged = self.puts.get(coll, {}).get(row.id)
        return staged if staged is not None else row.load()

    # -- staging -----------------------------------------------------------------------------------
    def put(self, coll: str, rid: str, rec: dict[str, Any], *, new: bool) -> None:
        self.puts.setdefault(coll, {})[rid] = rec
        self.touched.setdefault(coll, set()).add(rid)
        if new:
            self.created.setdefault(coll, {})[rid] = None
        elif rid not in self.created.get(coll, {}):
            self.updated.setdefault(coll, {})[rid] = None

    def delete(self, op: str) -> int:
        if op == "activity":
            row = self.sample("activitypointer")
            if row is None:
                return 0
            rec = row.load()
            self.drop(rec["activitytypecode"], row.id)
            self.drop("activitypointer", row.id)
            return 1
        if op == "contact":
            row = self.sample("contact")
            if row is None:
                return 0
            self.drop("contact", row.id)
            self.doomed_contacts.append(row.id)
            return 1
        row = self.sample(op)
        if row is None:
            return 0
        self.drop(op, row.id)
        return 1

    def drop(self, coll: str, rid: str) -> None:
        if rid in self.gone.get(coll, ()):
            return
        self.dels.setdefault(coll, []).append(rid)
        self.gone.setdefault(coll, set()).add(rid)
        self.touched.setdefault(coll, set()).add(rid)
        self.puts.get(coll, {}).pop(rid, None)
        self.created.get(coll, {}).pop(rid, None)
        self.updated.get(coll, {}).pop(rid, None)

    def cascade_contacts(self) -> None:
        """What Dataverse does when contacts are deleted: delete their activities, clear links to them.

        One indexed ``IN`` query per referring table (see ``synth.LOOKUP_INDEXES``).
        """
        doomed = self.doomed_contacts
        for start in range(0, len(doomed), 500):
            chunk = doomed[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.store.query("activitypointer",
                                        where=f"{Store.field('_regardingobjectid_value')} IN ({marks})",
                                        params=chunk):
                self.drop(row.load()["activitytypecode"], row.id)
                self.drop("activitypointer", row.id)
            for coll, col in _CONTACT_REFS:
                for row in self.store.query(coll, where=f"{Store.field(col)} IN ({marks})", params=chunk):
                    if row.id in self.gone.get(coll, ()):
                        continue
                    rec = self.record(coll, row)
                    rec[col] = None
                    rec.pop(f"@emu.{col}.type", None)
                    self.stamp(rec)
                    self.put(coll, row.id, rec, new=False)
        doomed.clear()

    def stamp(self, rec: dict[str, Any], by: str | None = None) -> None:
        rec["modifiedon"] = self.now
        rec["_modifiedby_value"] = by or rec.get("_ownerid_value") or rec.get("_modifiedby_value")

    # -- updates -----------------------------------------------------------------------------------
    def update(self, op: str) -> int:
        rng = self.rng
        if op == "activity":
            prow = self.sample("activitypointer")
            if prow is None:
                return 0
            kind = prow.load()["activitytypecode"]
            row = self.store.get(kind, prow.id)
            if row is None:
                return 0
            rec = self.record(kind, row)
            if rec.get("statecode") in (0, 3):  # complete an open task / held meeting
                rec["statecode"], rec["statuscode"] = 1, {"task": 5, "appointment": 3, "phonecall": 2,
                                                          "email": 3}[kind]
                rec["actualend"] = self.now
                if kind == "task":
                    rec["percentcomplete"] = 100
            else:
                rec["subject"] = rec["subject"].removesuffix(" (updated)") + " (updated)"
                rec["prioritycode"] = rng.choice((0, 1, 2))
            self.stamp(rec)
            self.put(kind, row.id, rec, new=False)
            self.put("activitypointer", row.id, _pointer(rec, kind), new=False)
            return 1
        if op.startswith("graph."):
            return self.update_graph(op)
        row = self.sample(op)
        if row is None:
            return 0
        rec = self.record(op, row)
        if op == "account":
            choice = rng.random()
            if choice < 0.4:
                rec["telephone1"] = _phone(rng)
            elif choice < 0.7:
                rec["numberofemployees"] = max(1, int((rec.get("numberofemployees") or 50) * rng.uniform(0.9, 1.2)))
                rec["revenue"] = round((rec.get("revenue") or 1e6) * rng.uniform(0.9, 1.25), -3)
            else:
                rec["websiteurl"] = (rec.get("websiteurl") or "https://www.example.com").replace("https://www.",
                                                                                              "https://")
        elif op == "contact":
            choice = rng.random()
            if choice < 0.4:
                rec["telephone1"] = _phone(rng)
            elif choice < 0.75:
                rec["jobtitle"] = rng.choice(_TITLES)
            else:  # fix or change the address (also repairs planted missing/malformed ones)
                first = (rec.get("firstname") or "info").lower()
                last = (rec.get("lastname") or "contact").lower().replace(" ", "")
                domain = (rec.get("emailaddress1") or "").rpartition("@")[2].replace(",", ".") or "example.com"
                rec["emailaddress1"] = f"{first}.{last}@{domain}" if "." in domain else f"{first}.{last}@example.com"
        elif op == "opportunity":
            self.advance_opportunity(rec)
        elif op == "lead":
            if rec.get("statecode") == 0:
                rec["statecode"], rec["statuscode"] = (2, rng.choice((4, 5, 6))) if rng.random() < 0.6 else (0, 2)
            else:
                rec["leadqualitycode"] = rng.choice((1, 2, 3))
        self.stamp(rec)
        self.put(op, row.id, rec, new=False)
        return 1

    def advance_opportunity(self, rec: dict[str, Any]) -> None:
        rng = self.rng
        if rec.get("statecode") != 0:  # closed deals only get their description touched
            rec["description"] = (rec.get("description") or "Closed.") + " Reviewed."
            return
        stage = rec.get("salesstage") or 0
        if stage < 3 and rng.random() < 0.6:
            stage += 1
            rec.update(salesstage=stage, stepname=_STEPS[stage], closeprobability=_STAGE_PROB[stage])
        elif rng.random() < 0.6:
            won = rng.random() < 0.45
            rec.update(statecode=1 if won else 2, statuscode=3 if won else rng.choice((4, 5)),
                       actualclosedate=self.now[:10] + "T00:00:00Z", closeprobability=100 if won else 0,
                       actualvalue=rec.get("estimatedvalue") if won else None)
        else:
            rec["estimatedvalue"] = round((rec.get("estimatedvalue") or 10000) * rng.uniform(0.8, 1.3), -2)

    def update_graph(self, coll: str) -> int:
        rng = self.rng
        if coll == "graph.users":
            if not self.graph_users:
                return 0
            candidates = [u for u in self.graph_users if u["id"] not in self.touched.get(coll, set())]
            if not candidates:
                return 0
            u = dict(rng.choice(candidates))
            field = rng.choice(("jobTitle", "mobilePhone", "officeLocation", "department"))
            u[field] = {"jobTitle": rng.choice(("Senior Account Executive", "Sales Director", "Account Manager")),
                        "mobilePhone": _phone(rng), "officeLocation": rng.choice(("Seattle", "London", "Remote")),
                        "department": rng.choice(("Sales", "Customer Success", "Marketing"))}[field]
            self.put(coll, u["id"], u, new=False)
            return 1
        if coll == "graph.groups":
            candidates = [g for g in self.groups if g["id"] not in self.touched.get(coll, set())]
            if not candidates or not self.graph_users:
                return 0
            g = dict(rng.choice(candidates))
            members = list(g.get("@emu.members") or [])
            outsiders = [u["id"] for u in self.graph_users if u["id"] not in members]
            if members and (not outsiders or rng.random() < 0.4):
                members.remove(rng.choice(members))
            elif outsiders:
                members.append(rng.choice(outsiders))
            g["@emu.members"] = members
            self.put(coll, g["id"], g, new=False)
            return 1
        row = self.sample(coll)
        if row is None:
            return 0
        rec = self.record(coll, row)
        if coll == "graph.messages":
            rec["isRead"] = not rec.get("isRead")
            if rng.random() < 0.2:
                rec["importance"] = "high"
        else:
            if rng.random() < 0.3:
                rec["isCancelled"] = True
                rec["subject"] = "Canceled: " + str(rec.get("subject", "")).removeprefix("Canceled: ")
            else:
                rec["location"] = {"displayName": rng.choice(("Microsoft Teams Meeting", "Conference Room C"))}
        rec["lastModifiedDateTime"] = self.now
        self.put(coll, row.id, rec, new=False)
        return 1

    # -- creates -----------------------------------------------------------------------------------
    def create(self, op: str) -> int:
        if op in ("contact", "opportunity", "lead") or op in ACTIVITY_TYPES:
            return self.create_dataverse(op)
        return self.create_graph(op)

    def contact_with_email(self) -> dict[str, Any] | None:
        for _ in range(6):
            row = self.sample("contact", fresh=False)
            if row is None:
                return None
            rec = self.record("contact", row)
            if _VALID_EMAIL.match(rec.get("emailaddress1") or ""):
                return rec
        return None

    def owner_for(self, rec: dict[str, Any]) -> str | None:
        owner = rec.get("_ownerid_value")
        if owner in self.sys_to_graph:
            return str(owner)
        return self.rng.choice(self.sys_active) if self.sys_active else None

    def create_dataverse(self, op: str) -> int:
        rng = self.rng
        new_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if op in ("contact", "opportunity"):
            arow = self.sample("account", fresh=False)
            if arow is None:
                return 0
            acc = self.record("account", arow)
            owner = self.owner_for(acc)
            if owner is None:
                return 0
            domain = (acc.get("websiteurl") or "https://www.example.com").split("//")[-1].removeprefix("www.")
            if op == "contact":
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                rec = _base("contact", new_id, owner, self.now)
                rec.update(firstname=first, lastname=last, fullname=f"{first} {last}",
                           emailaddress1=f"{first.lower()}.{last.lower()}@{domain}", telephone1=_phone(rng),
                           jobtitle=rng.choice(_TITLES), employeeid=f"CT-N{new_id[:8]}",
                           _parentcustomerid_value=acc["accountid"], address1_city=acc.get("address1_city"),
                           address1_country=acc.get("address1_country"), donotemail=False,
                           _transactioncurrencyid_value=acc.get("_transactioncurrencyid_value"),
                           statecode=0, statuscode=1)
                rec["@emu._parentcustomerid_value.type"] = "account"
            else:
                product = rng.choice(_PRODUCTS)
                value = float(round(rng.lognormvariate(10.3, 0.8), -2))
                rec = _base("opportunity", new_id, owner, self.now)
                rec.update(name=f"{acc.get('name', 'New')} - {product}", estimatedvalue=value,
                           estimatedclosedate=(dt.datetime.now(dt.UTC) + dt.timedelta(days=rng.randint(20, 150)))
                           .strftime("%Y-%m-%dT00:00:00Z"), closeprobability=10, stepname=_STEPS[0],
                           salesstage=0, opportunityratingcode=2, purchasetimeframe=rng.choice((1, 2, 3)),
                           prioritycode=1, _parentaccountid_value=acc["accountid"],
                           _customerid_value=acc["accountid"], statecode=0, statuscode=1,
                           _transactioncurrencyid_value=acc.get("_transactioncurrencyid_value"))
                rec["@emu._customerid_value.type"] = "account"
            rec["_owningbusinessunit_value"] = acc.get("_owningbusinessunit_value")
            self.put(op, new_id, rec, new=True)
            return 1
        if op == "lead":
            owner = rng.choice(self.sys_active) if self.sys_active else None
            if owner is None:
                return 0
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            company = f"{rng.choice(_LAST)} {rng.choice(('Systems', 'Foods', 'Logistics', 'Labs'))} Ltd"
            rec = _base("lead", new_id, owner, self.now)
            rec.update(subject=f"Interest in {rng.choice(_PRODUCTS).lower()}", firstname=first, lastname=last,
                       fullname=f"{first} {last}", companyname=company,
                       emailaddress1=f"{first.lower()}.{last.lower()}@{company.split()[0].lower()}.example",
                       telephone1=_phone(rng), leadsourcecode=8, leadqualitycode=2, statecode=0, statuscode=1,
                       _transactioncurrencyid_value=self.currency)
            self.put("lead", new_id, rec, new=True)
            return 1
        # An activity with a contact, regarding its account or an open deal of the account.
        contact = self.contact_with_email()
        if contact is None:
            return 0
        owner = self.owner_for(contact)
        if owner is None:
            return 0
        regarding_type, regarding = "contact", contact["contactid"]
        if contact.get("_parentcustomerid_value") and rng.random() < 0.6:
            regarding_type, regarding = "account", contact["_parentcustomerid_value"]
        rec = _base(op, new_id, owner, self.now)
        rec.update(_regardingobjectid_value=regarding, prioritycode=1, isregularactivity=True)
        rec["@emu._regardingobjectid_value.type"] = regarding_type
        owner_user = self.graph_by_id.get(self.sys_to_graph.get(owner, ""), {})
        mine = owner_user.get("mail") or f"crm@{COMPANY_DOMAIN}"
        theirs = contact["emailaddress1"]
        name = contact.get("fullname") or theirs
        if op == "email":
            outgoing = rng.random() < 0.6
            ref = f"<{rng.getrandbits(96):024x}@{(mine if outgoing else theirs).split('@')[-1]}>"
            subject = f"Re: {rng.choice(_PRODUCTS)}"
            rec.update(subject=subject, directioncode=outgoing, sender=mine if outgoing else theirs,
                       torecipients=theirs if outgoing else mine, messageid=ref, attachmentcount=0,
                       actualend=self.now, statecode=1, statuscode=3 if outgoing else 4)
            if owner_user:  # the tracked mail also lands in the owner's mailbox
                me = {"emailAddress": {"name": owner_user.get("displayName"), "address": mine}}
                them = {"emailAddress": {"name": name, "address": theirs}}
                self.graph_message(owner_user["id"], "sentitems" if outgoing else "inbox", subject,
                                   me if outgoing else them, [them if outgoing else me], ref)
        elif op == "appointment":
            start = (dt.datetime.now(dt.UTC) + dt.timedelta(days=rng.randint(1, 20))).replace(
                minute=0, second=0, microsecond=0, hour=rng.choice((9, 10, 14, 15)))
            end = start + dt.timedelta(hours=1)
            ical = "040000008200E00074C5B7101A82E008" + f"{rng.getrandbits(128):032X}"
            rec.update(subject=f"{rng.choice(_PRODUCTS)} meeting", scheduledstart=_iso(start),
                       scheduledend=_iso(end), scheduleddurationminutes=60, location="Microsoft Teams Meeting",
                       isalldayevent=False, isonlinemeeting=True, globalobjectid=ical, statecode=3, statuscode=5)
            if owner_user:
                self.graph_event(owner_user, rec["subject"], start, end,
                                 [{"type": "required", "status": {"response": "none", "time": self.now},
                                   "emailAddress": {"name": name, "address": theirs}}], ical)
        elif op == "phonecall":
            outgoing = rng.random() < 0.6
            rec.update(subject="Follow-up call", directioncode=outgoing, phonenumber=contact.get("telephone1"),
                       actualend=self.now, actualdurationminutes=rng.choice((5, 10, 15)), statecode=1,
                       statuscode=2 if outgoing else 4)
        else:
            due = dt.datetime.now(dt.UTC) + dt.timedelta(days=rng.randint(1, 14))
            rec.update(subject=f"Send {rng.choice(_PRODUCTS).lower()} proposal", scheduledend=_iso(due),
                       percentcomplete=0, category="Sales", statecode=0, statuscode=2)
        self.put(op, new_id, rec, new=True)
        self.put("activitypointer", new_id, _pointer(rec, op), new=True)
        return 1

    def graph_message(self, uid: str, box: str, subject: str, frm: dict[str, Any], to: list[dict[str, Any]],
                      ref: str) -> str:
        mid = _graph_id(self.rng)
        self.put("graph.messages", mid, {
            "id": mid, "createdDateTime": self.now, "lastModifiedDateTime": self.now, "receivedDateTime": self.now,
            "sentDateTime": self.now, "hasAttachments": False, "internetMessageId": ref, "subject": subject,
            "bodyPreview": f"{subject} ...", "importance": "normal",
            "body": {"contentType": "text", "content": f"{subject} ..."}, "parentFolderId": folder_id(uid, box),
            "conversationId": "AAQkAGI2" + base64.urlsafe_b64encode(self.rng.randbytes(16)).decode(),
            "isRead": box == "sentitems", "isDraft": False, "from": frm, "sender": frm, "toRecipients": to,
            "ccRecipients": [], "categories": [], "@emu.user": uid, "@emu.folder": box,
        }, new=True)
        return mid

    def graph_event(self, organizer: dict[str, Any], subject: str, start: dt.datetime, end: dt.datetime,
                    attendees: list[dict[str, Any]], ical: str) -> str:
        eid = _graph_id(self.rng)
        self.put("graph.events", eid, {
            "id": eid, "createdDateTime": self.now, "lastModifiedDateTime": self.now, "iCalUId": ical,
            "subject": subject, "bodyPreview": "", "importance": "normal", "isAllDay": False,
            "body": {"contentType": "text", "content": ""},
            "isCancelled": False, "isOnlineMeeting": True, "showAs": "busy", "type": "singleInstance",
            "start": {"dateTime": start.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"},
            "end": {"dateTime": end.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": "UTC"},
            "location": {"displayName": "Microsoft Teams Meeting"},
            "organizer": {"emailAddress": {"name": organizer.get("displayName"), "address": organizer.get("mail")}},
            "attendees": attendees, "@emu.user": organizer["id"],
        }, new=True)
        return eid

    def create_graph(self, coll: str) -> int:
        rng = self.rng
        users = [u for u in self.graph_users if u.get("mail")]
        if len(users) < 2:
            return 0
        if coll == "graph.messages":  # internal mail: the sender's copy and the recipient's copy
            s, r = rng.sample(users, 2)
            frm = {"emailAddress": {"name": s.get("displayName"), "address": s["mail"]}}
            to = [{"emailAddress": {"name": r.get("displayName"), "address": r["mail"]}}]
            ref = f"<{rng.getrandbits(96):024x}@{COMPANY_DOMAIN}>"
            subject = rng.choice(("Pipeline review", "Quick question", "Re: Forecast", "Customer escalation"))
            self.graph_message(s["id"], "sentitems", subject, frm, to, ref)
            self.graph_message(r["id"], "inbox", subject, frm, to, ref)
            return 1
        if coll == "graph.events":
            org, other = rng.sample(users, 2)
            start = (dt.datetime.now(dt.UTC) + dt.timedelta(days=rng.randint(1, 20))).replace(
                minute=0, second=0, microsecond=0, hour=rng.choice((9, 11, 13, 16)))
            self.graph_event(org, "Deal review", start, start + dt.timedelta(minutes=30),
                             [{"type": "required", "status": {"response": "none", "time": self.now},
                               "emailAddress": {"name": other.get("displayName"), "address": other["mail"]}}],
                             "040000008200E00074C5B7101A82E008" + f"{rng.getrandbits(128):032X}")
            return 1
        contact = self.contact_with_email()
        if contact is None:
            return 0
        owner = self.sys_to_graph.get(self.owner_for(contact) or "") or rng.choice(users)["id"]
        gid = _graph_id(rng)
        name = contact.get("fullname") or contact["emailaddress1"]
        self.put("graph.contacts", gid, {
            "id": gid, "createdDateTime": self.now, "lastModifiedDateTime": self.now, "displayName": name,
            "givenName": contact.get("firstname"), "surname": contact.get("lastname"),
            "emailAddresses": [{"name": name, "address": contact["emailaddress1"]}], "companyName": None,
            "jobTitle": contact.get("jobtitle"), "businessPhones": [contact.get("telephone1")],
            "mobilePhone": None, "@emu.user": owner,
        }, new=True)
        return 1

    # -- writing and reporting ---------------------------------------------------------------------
    def flush(self) -> None:
        """Write staged upserts, then deletes, in one transaction (readers never see half a change)."""
        with self.store.write():
            for coll, recs in self.puts.items():
                if recs:
                    vf = None if coll.startswith("graph.") else VERSION_FIELD
                    self.store.put_many(coll, list(recs.items()), version_field=vf)
            for coll, ids in self.dels.items():
                if ids:
                    self.store.delete_many(coll, ids)

    def report(self) -> dict[str, Any]:
        return {part: {k: list(v) for k, v in ids.items() if v}
                for part, ids in (("created", self.created), ("updated", self.updated), ("deleted", self.dels))}


def _base(table: str, rid: str, owner: str, now: str) -> dict[str, Any]:
    rec = record_template(TABLES[table])
    rec[TABLES[table].primary_id] = rid
    rec.update(createdon=now, modifiedon=now, _createdby_value=owner, _modifiedby_value=owner,
               _ownerid_value=owner)
    rec["@emu._ownerid_value.type"] = "systemuser"
    return rec


_POINTER_KEYS = tuple(c.json_name for c in TABLES["activitypointer"].columns if c.json_name != "activitytypecode")


def _pointer(rec: dict[str, Any], kind: str) -> dict[str, Any]:
    """The activitypointer twin of an activity row."""
    p = {k: rec.get(k) for k in _POINTER_KEYS}
    p["statuscode"] = POINTER_STATUS.get(rec.get("statecode") or 0, 1)
    p["activitytypecode"] = kind
    for key in ("@emu._regardingobjectid_value.type", "@emu._ownerid_value.type"):
        if key in rec:
            p[key] = rec[key]
    return p


def _phone(rng: random.Random) -> str:
    return f"+1 425 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _graph_id(rng: random.Random) -> str:
    # Same shape as synth's ids; a random (not sequential) counter part keeps new ids from colliding.
    return (f"AAMkAGI2{rng.getrandbits(48):012x}AAA"
            f"{base64.urlsafe_b64encode(rng.randbytes(27)).decode()}AAA=")
