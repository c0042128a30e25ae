"""The deterministic synthetic company behind the emulator: Dataverse rows, Entra users and Outlook data.

:func:`generate` fills a :class:`~bridgekit.emulator.store.Store` with one coherent tenant: a sales
organisation ("Alpine Ridge Systems") with about three years of CRM history. The same seed and anchor
date always give the same data. The generating model (the won/lost logistic model with its coefficients)
and the defects planted on purpose are documented in ``docs/emulator-company.md`` and recorded in store
meta (``company``, ``generating_model``, ``planted_defects``) so that tests and analysts can check what
they find against the truth.

Speed matters (the ``large`` scale writes over a million Dataverse rows): records are built from
precomputed pools and templates, ids increase within each collection so SQLite appends instead of
splitting pages, and everything is streamed into :meth:`Store.bulk_load`.
"""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import gc
import itertools
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bridgekit.emulator.platform import generate_platform
from bridgekit.emulator.schema import ACTIVITY_TYPES, GRAPH_RESOURCES, INDUSTRY, TABLES, Table
from bridgekit.emulator.store import Store

__all__ = [
    "COMPANY_DOMAIN",
    "COMPANY_NAME",
    "LOOKUP_INDEXES",
    "MODEL",
    "POINTER_STATUS",
    "PRESETS",
    "dataverse_guid",
    "folder_id",
    "generate",
    "graph_item_id",
    "record_template",
    "resolve_counts",
    "type_keys",
]

_T = TypeVar("_T")

COMPANY_NAME = "Alpine Ridge Systems"
COMPANY_DOMAIN = "alpineridge.example"
VERSION_FIELD = "versionnumber"

# Sizes per scale. "activities" are background activities on top of the opportunity touches, which the
# model derives from the opportunities (about 3.4 per opportunity); every activity is also written to
# activitypointer, so Dataverse rows ~= accounts + contacts + leads + opportunities + 2 x activities.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"users": 12, "accounts": 40, "contacts": 110, "leads": 30, "opportunities": 70,
             "activities": 60, "internal_messages": 60, "internal_events": 20},
    "small": {"users": 40, "accounts": 400, "contacts": 1200, "leads": 300, "opportunities": 700,
              "activities": 600, "internal_messages": 400, "internal_events": 120},
    "medium": {"users": 150, "accounts": 4000, "contacts": 12000, "leads": 3000, "opportunities": 7000,
               "activities": 6000, "internal_messages": 4000, "internal_events": 1200},
    "large": {"users": 600, "accounts": 40000, "contacts": 120000, "leads": 30000, "opportunities": 85000,
              "activities": 70000, "internal_messages": 20000, "internal_events": 5000},
}

#: The won/lost model (see docs/emulator-company.md, "Opportunity outcomes"). Every closed opportunity
#: is won with probability sigmoid(z), where
#: z = intercept + engagement*ln(1+touches_90d) + size*ln(value_base/50000) + age*(age_days/100)
#:     + q4*[closed in Q4] + industry[industrycode] + skill[owner] + noise, noise ~ N(0, noise_sd).
MODEL: dict[str, Any] = {
    "intercept": -1.1,
    "engagement": 0.85,
    "size": -0.45,
    "age": -0.30,
    "q4": 0.25,
    "noise_sd": 0.25,
    "skill_sd": 0.5,
    "industry": {16: 0.30, 20: 0.20, 7: 0.20, 6: 0.10, 11: 0.10, 12: -0.20, 33: -0.25, 30: -0.30, 24: -0.40},
    "value_reference": 50000.0,
    "touch_window_days": 90,
}

# Defect rates (fractions of the table they live in); counts are rounded, at least 1 where it applies.
#: activitypointer's statuscode for each statecode (its own generic status reasons).
POINTER_STATUS = {0: 1, 1: 2, 2: 3, 3: 4}

#: Expression indexes generate() asks the store for: (collection, JSON field).
LOOKUP_INDEXES = (("activitypointer", "_regardingobjectid_value"), ("account", "_primarycontactid_value"),
                  ("opportunity", "_parentcontactid_value"), ("lead", "_parentcontactid_value"),
                  ("contact", "_parentcustomerid_value"))

RATES = {"duplicate_accounts": 0.02, "missing_email": 0.05, "malformed_email": 0.03, "orphan_contacts": 0.01,
         "orphan_opportunities": 0.005, "stale_open_opportunities": 0.04, "departed_reps": 0.10}

DAY = 86400

# -- name pools (built once; generation only indexes into them) --------------------------------------

_FIRST = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen", "Daniel", "Lisa", "Matthew", "Nancy", "Anthony", "Betty", "Mark", "Sandra", "Donald", "Margaret", "Steven", "Ashley", "Paul", "Kimberly", "Andrew", "Emily", "Joshua", "Donna", "Kenneth", "Michelle", "Kevin", "Carol", "Brian", "Amanda", "George", "Melissa", "Timothy", "Deborah", "Ronald", "Stephanie", "Jason", "Rebecca", "Edward", "Sharon", "Jeffrey", "Laura", "Ryan", "Cynthia", "Jacob", "Amy", "Gary", "Kathleen", "Nicholas", "Angela", "Eric", "Shirley", "Jonathan", "Brenda", "Stephen", "Emma", "Larry", "Anna", "Justin", "Pamela", "Scott", "Nicole", "Brandon", "Samantha", "Benjamin", "Katherine", "Samuel", "Christine", "Gregory", "Helen", "Alexander", "Debra", "Patrick", "Rachel", "Frank", "Carolyn", "Raymond", "Janet", "Jack", "Maria", "Dennis", "Olivia", "Jerry", "Heather", "Tyler", "Diane", "Aaron", "Julie", "Jose", "Joyce", "Adam", "Victoria", "Nathan", "Ruth", "Henry", "Virginia", "Zachary", "Lauren", "Douglas", "Kelly", "Peter", "Christina", "Kyle", "Joan", "Noah", "Evelyn", "Ethan", "Judith", "Jeremy", "Andrea", "Walter", "Hannah", "Christian", "Megan", "Keith", "Cheryl", "Roger", "Jacqueline", "Terry", "Martha", "Austin", "Madison", "Sean", "Teresa", "Gerald", "Gloria", "Carl", "Sara", "Harold", "Janice", "Dylan", "Ann", "Arthur", "Kathryn", "Lawrence", "Abigail", "Jordan", "Sophia", "Jesse", "Frances", "Bryan", "Jean", "Billy", "Alice", "Bruce", "Judy", "Gabriel", "Isabella", "Joe", "Julia", "Logan", "Grace", "Alan", "Amber", "Juan", "Denise", "Albert", "Danielle", "Willie", "Marilyn", "Elijah", "Beverly", "Wayne", "Charlotte", "Randy", "Natalie", "Vincent", "Theresa", "Mason", "Diana", "Roy", "Brittany", "Ralph", "Doris", "Bobby", "Kayla", "Russell", "Alexis", "Bradley", "Lori", "Philip", "Marie", "Eugene", "Priya", "Rahul", "Aiko", "Kenji", "Mei", "Wei", "Lars", "Ingrid", "Sven", "Astrid", "Pierre", "Camille", "Luca", "Giulia", "Mateo", "Lucia", "Hugo", "Chloe", "Finn", "Freya", "Omar", "Leila", "Tariq", "Amara", "Kwame", "Zara"]
_LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Gomez", "Phillips", "Evans", "Turner", "Diaz", "Parker", "Cruz", "Edwards", "Collins", "Reyes", "Stewart", "Morris", "Morales", "Murphy", "Cook", "Rogers", "Gutierrez", "Ortiz", "Morgan", "Cooper", "Peterson", "Bailey", "Reed", "Kelly", "Howard", "Ramos", "Kim", "Cox", "Ward", "Richardson", "Watson", "Brooks", "Chavez", "Wood", "James", "Bennett", "Gray", "Mendoza", "Ruiz", "Hughes", "Price", "Alvarez", "Castillo", "Sanders", "Patel", "Myers", "Long", "Ross", "Foster", "Jimenez", "Powell", "Jenkins", "Perry", "Russell", "Sullivan", "Bell", "Coleman", "Butler", "Henderson", "Barnes", "Gonzales", "Fisher", "Vasquez", "Simmons", "Romero", "Jordan", "Patterson", "Alexander", "Hamilton", "Graham", "Reynolds", "Griffin", "Wallace", "Moreno", "West", "Cole", "Hayes", "Bryant", "Herrera", "Gibson", "Ellis", "Tran", "Medina", "Aguilar", "Stevens", "Murray", "Ford", "Castro", "Marshall", "Owens", "Harrison", "Fernandez", "McDonald", "Woods", "Washington", "Kennedy", "Wells", "Vargas", "Henry", "Chen", "Freeman", "Webb", "Tucker", "Guzman", "Burns", "Crawford", "Olson", "Simpson", "Porter", "Hunter", "Gordon", "Mendez", "Silva", "Shaw", "Snyder", "Mason", "Dixon", "Munoz", "Hunt", "Hicks", "Holmes", "Palmer", "Wagner", "Black", "Robertson", "Boyd", "Rose", "Stone", "Salazar", "Fox", "Warren", "Mills", "Meyer", "Rice", "Schmidt", "Garza", "Daniels", "Ferguson", "Nichols", "Stephens", "Soto", "Weaver", "Ryan", "Gardner", "Payne", "Grant", "Dunn", "Kelley", "Spencer", "Hawkins", "Arnold", "Pierce", "Hansen", "Peters", "Santos", "Hart", "Bradley", "Knight", "Elliott", "Cunningham", "Duncan", "Armstrong", "Hudson", "Carroll", "Lane", "Riley", "Andrews", "Ray", "Berry", "Perkins", "Hoffman", "Johansson", "Lindqvist", "Nakamura", "Tanaka", "Yamamoto", "Schneider", "Fischer", "Weber", "Dubois", "Moreau", "Rossi", "Bianchi", "Novak", "Kowalski", "Okafor", "Mensah", "Haddad", "Kaur", "Singh", "Sharma", "Iyer", "Wong", "Liu", "Zhang", "Park", "Choi", "OBrien", "Murphy", "Byrne"]
_CO_A = ["Blue", "Green", "Red", "Silver", "Golden", "North", "South", "East", "West", "Summit", "Pinnacle", "Harbor", "River", "Lake", "Mountain", "Valley", "Cedar", "Oak", "Pine", "Maple", "Willow", "Aspen", "Birch", "Granite", "Iron", "Copper", "Crystal", "Bright", "Clear", "Swift", "Rapid", "Prime", "First", "Atlas", "Apex", "Vertex", "Nova", "Stellar", "Solar", "Lunar", "Orbit", "Quantum", "Fusion", "Vector", "Matrix", "Delta", "Sigma", "Omega", "Alpha", "Northern", "Southern", "Eastern", "Western", "Pacific", "Atlantic", "Coastal", "Prairie", "Desert", "Canyon", "Ridge", "Meadow", "Forest", "Falcon", "Eagle", "Hawk", "Raven", "Wolf", "Bear", "Fox", "Lion", "Tiger", "Orca", "Heron", "Sparrow", "Bison", "Stag", "Lynx", "Otter", "Badger", "Liberty", "Heritage", "Legacy", "Pioneer", "Frontier", "Horizon", "Meridian", "Keystone", "Cornerstone", "Beacon", "Lighthouse", "Anchor", "Compass", "Sterling", "Regal", "Royal", "Noble", "Crown", "Empire", "Union", "Metro", "Urban", "Civic", "Global", "Trans", "Inter", "United", "Allied"]
_CO_B = ["Logistics", "Foods", "Systems", "Solutions", "Industries", "Manufacturing", "Analytics", "Networks", "Partners", "Holdings", "Dynamics", "Technologies", "Labs", "Works", "Motors", "Energy", "Power", "Health", "Medical", "Pharma", "Bio", "Capital", "Finance", "Insurance", "Consulting", "Advisors", "Media", "Publishing", "Retail", "Outfitters", "Supply", "Distribution", "Transport", "Freight", "Aviation", "Marine", "Construction", "Builders", "Engineering", "Design", "Studios", "Software", "Robotics", "Devices", "Electronics", "Textiles", "Apparel", "Brewing", "Farms", "Organics", "Materials", "Chemicals", "Metals", "Plastics", "Paper", "Packaging", "Hospitality", "Travel", "Realty", "Properties", "Utilities", "Water", "Telecom", "Security", "Services", "Staffing", "Education", "Learning", "Foundation", "Group"]
_CO_C = ("Inc.", "Ltd", "LLC", "Corp.", "GmbH", "Group", "Co.", "AG", "Pty Ltd", "S.A.", "plc", "")
_STREETS = ("Main Street", "Oak Avenue", "Park Road", "High Street", "Market Street", "Church Lane", "Mill Road",
            "Station Road", "King Street", "Queen Street", "Bridge Street", "Harbour View", "Lakeside Drive",
            "Industrial Way", "Commerce Boulevard", "Innovation Drive", "Riverside Walk", "Hill Street")
# (city, state/province, postal-code pattern, country, region, currency ISO code, phone prefix)
_PLACES = (
    ("Seattle", "WA", "981##", "United States", "North America", "USD", "+1 206"),
    ("Redmond", "WA", "980##", "United States", "North America", "USD", "+1 425"),
    ("San Francisco", "CA", "941##", "United States", "North America", "USD", "+1 415"),
    ("Austin", "TX", "787##", "United States", "North America", "USD", "+1 512"),
    ("Chicago", "IL", "606##", "United States", "North America", "USD", "+1 312"),
    ("New York", "NY", "100##", "United States", "North America", "USD", "+1 212"),
    ("Boston", "MA", "021##", "United States", "North America", "USD", "+1 617"),
    ("Atlanta", "GA", "303##", "United States", "North America", "USD", "+1 404"),
    ("Denver", "CO", "802##", "United States", "North America", "USD", "+1 303"),
    ("Toronto", "ON", "M5# #A#", "Canada", "North America", "CAD", "+1 416"),
    ("Vancouver", "BC", "V6# #B#", "Canada", "North America", "CAD", "+1 604"),
    ("London", "", "EC#A #AA", "United Kingdom", "EMEA", "GBP", "+44 20"),
    ("Manchester", "", "M# #AB", "United Kingdom", "EMEA", "GBP", "+44 161"),
    ("Dublin", "", "D0#", "Ireland", "EMEA", "EUR", "+353 1"),
    ("Paris", "", "750##", "France", "EMEA", "EUR", "+33 1"),
    ("Lyon", "", "690##", "France", "EMEA", "EUR", "+33 4"),
    ("Berlin", "", "10###", "Germany", "EMEA", "EUR", "+49 30"),
    ("Munich", "", "80###", "Germany", "EMEA", "EUR", "+49 89"),
    ("Amsterdam", "", "10## AB", "Netherlands", "EMEA", "EUR", "+31 20"),
    ("Madrid", "", "280##", "Spain", "EMEA", "EUR", "+34 91"),
    ("Milan", "", "201##", "Italy", "EMEA", "EUR", "+39 02"),
    ("Stockholm", "", "111 ##", "Sweden", "EMEA", "EUR", "+46 8"),
    ("Sydney", "NSW", "20##", "Australia", "APAC", "AUD", "+61 2"),
    ("Melbourne", "VIC", "30##", "Australia", "APAC", "AUD", "+61 3"),
    ("Tokyo", "", "100-00##", "Japan", "APAC", "JPY", "+81 3"),
    ("Osaka", "", "530-00##", "Japan", "APAC", "JPY", "+81 6"),
    ("Singapore", "", "0189##", "Singapore", "APAC", "USD", "+65"),
)
_REGIONS = ("North America", "EMEA", "APAC")
_REGION_WEIGHT = (0.5, 0.35, 0.15)
_CURRENCIES = (  # ISO, name, symbol, units per 1 USD (Dataverse exchangerate), precision
    ("USD", "US Dollar", "$", 1.0, 2), ("EUR", "Euro", "€", 0.92, 2), ("GBP", "Pound Sterling", "£", 0.79, 2),
    ("CAD", "Canadian Dollar", "CA$", 1.36, 2), ("AUD", "Australian Dollar", "A$", 1.52, 2),
    ("JPY", "Japanese Yen", "¥", 149.5, 0),
)
# Industry weights: a B2B customer base leans on services, manufacturing and finance.
_INDUSTRY_WEIGHT = {c: 1.0 for c in INDUSTRY} | {6: 4.0, 7: 3.0, 12: 3.0, 16: 3.5, 20: 2.0, 30: 2.0,
                                                 33: 2.5, 10: 2.0, 24: 1.5, 11: 1.5, 26: 0.2}
_JOB_TITLES = ("Chief Executive Officer", "Chief Financial Officer", "Chief Technology Officer", "VP Operations",
               "VP Sales", "Head of Procurement", "Procurement Manager", "IT Director", "IT Manager",
               "Operations Manager", "Finance Manager", "Purchasing Agent", "Office Manager", "Project Manager",
               "Business Analyst", "Engineering Manager", "Facilities Manager", "Marketing Director",
               "Account Payable Specialist", "Solutions Architect")
_DEPARTMENTS = ("Executive", "Finance", "IT", "Operations", "Procurement", "Engineering", "Marketing", "Sales")
_PRODUCTS = ("Annual support renewal", "Cloud migration", "Data platform upgrade", "Field service rollout",
             "Managed network services", "Security assessment", "ERP integration", "Hardware refresh",
             "Analytics subscription", "Training programme", "Warehouse automation", "Fleet telematics",
             "Customer portal", "Backup and recovery", "Licence expansion", "Pilot project", "IoT sensors",
             "Consulting retainer", "Edge computing kit", "Contact centre upgrade")
_EMAIL_SUBJECTS = ("Proposal for {p}", "Re: {p} pricing", "Follow-up: {p}", "Next steps on {p}",
                   "Quote for {p}", "Re: Questions about {p}", "{p} - revised scope", "Contract draft: {p}",
                   "Meeting notes: {p}", "Re: Timeline for {p}")
_MEETING_SUBJECTS = ("{p} discovery call", "{p} demo", "{p} workshop", "Review {p} proposal",
                     "{p} negotiation", "Quarterly business review", "{p} kickoff")
_CALL_SUBJECTS = ("Call about {p}", "Check-in on {p}", "Pricing call: {p}", "Follow-up call")
_TASK_SUBJECTS = ("Send proposal for {p}", "Prepare quote", "Update account plan", "Schedule follow-up",
                  "Confirm budget", "Send case study", "Renewal reminder", "Collect requirements for {p}")
_INTERNAL_SUBJECTS = ("Pipeline review", "Forecast for this quarter", "Re: Territory plan", "Team offsite",
                      "Deal desk approval", "Pricing exception request", "Weekly sync notes",
                      "Re: Customer escalation", "Commission statement", "Training schedule",
                      "Re: Lunch on Friday?", "Updated sales deck")
_LOCATIONS = ("Microsoft Teams Meeting", "Customer office", "Conference Room A", "Conference Room B",
              "Zoom", "Head office", "Phone")
_STEPS = ("1-Qualify", "2-Develop", "3-Propose", "4-Close")
_STAGE_PROB = (10, 25, 50, 75)


# -- small helpers shared with activity.py ------------------------------------------------------------

def record_template(table: Table) -> dict[str, Any]:
    """Every JSON property of ``table`` set to None, in schema order (a fresh record starts as a copy)."""
    return {c.json_name: None for c in table.columns}


def type_keys(table: Table) -> tuple[str, ...]:
    """JSON names of the polymorphic lookups whose target table is stored as ``@emu.<name>.type``."""
    return tuple(c.json_name for c in table.columns
                 if c.type in ("Customer", "Owner") or (c.is_lookup and len(c.targets) > 1))


def dataverse_guid(counter: int, bits: int) -> str:
    """A Dataverse-looking GUID whose first group is ``counter`` (ids increase as they are issued).

    Dataverse issues sequential GUIDs too, which is also what keeps SQLite inserts cheap here.
    """
    return f"{counter & 0xFFFFFFFF:08x}-{bits >> 48 & 0xFFFF:04x}-ef11-{0x8000 | bits >> 32 & 0x3FFF:04x}-{bits & 0xFFFFFFFF:08x}6045"


def graph_item_id(counter: int, tail: bytes) -> str:
    """An Outlook-looking item id (``AAMkA...``) that sorts in issue order (hex counter, then noise)."""
    return f"AAMkAGI2{counter:012x}AAA{base64.urlsafe_b64encode(tail).decode()}AAA="


def folder_id(user_id: str, folder: str) -> str:
    """The ``parentFolderId`` of a user's well-known mail folder (``inbox`` or ``sentitems``)."""
    raw = uuid.UUID(user_id).bytes + folder.encode()
    return "AAMkAGI2" + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "AAEMAAA="


def resolve_counts(scale: str | dict[str, int]) -> dict[str, int]:
    """The record counts for a preset name, or a dict of counts over the ``small`` preset."""
    if isinstance(scale, str):
        if scale not in PRESETS:
            raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(PRESETS)} or a dict of counts")
        return dict(PRESETS[scale])
    unknown = set(scale) - set(PRESETS["small"])
    if unknown:
        raise ValueError(f"unknown count keys: {', '.join(sorted(unknown))}")
    counts = dict(PRESETS["small"]) | {k: int(v) for k, v in scale.items()}
    if counts["users"] < 8 or counts["accounts"] < 5:
        raise ValueError("need at least 8 users and 5 accounts")
    return counts


class _Clock:
    """Epoch seconds -> the Web API's ``YYYY-MM-DDTHH:MM:SSZ`` through precomputed day and second strings."""

    def __init__(self, start: int, days: int) -> None:
        self.start = start
        base = dt.datetime.fromtimestamp(start, dt.UTC)
        self.days = [(base + dt.timedelta(days=i)).strftime("%Y-%m-%d") for i in range(days)]
        self.secs = [f"T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(DAY)]

    def iso(self, t: int) -> str:
        d, r = divmod(t - self.start, DAY)
        return self.days[d] + self.secs[r] + "Z"

    def graph(self, t: int) -> str:
        """Graph's dateTimeTimeZone form (seven fractional digits, no zone suffix)."""
        d, r = divmod(t - self.start, DAY)
        return self.days[d] + self.secs[r] + ".0000000"

    def month_quarter(self, t: int) -> tuple[int, int]:
        day = self.days[(t - self.start) // DAY]
        month = int(day[5:7])
        return month, (month - 1) // 3 + 1


def _slug(name: str) -> str:
    words = [w for w in name.lower().replace("&", " ").replace(".", " ").replace(",", " ").split()
             if w not in ("inc", "ltd", "llc", "corp", "gmbh", "co", "ag", "pty", "s", "a", "plc", "group")]
    return "-".join(words[:3]) or "company"


def _ascii(s: str) -> str:
    return s.lower().replace(" ", "").replace("'", "")


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation is plenty for the tail
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _pick(rng: random.Random, seq: Sequence[_T]) -> _T:
    # random.choice costs ~1 us (rejection sampling); a float draw is plenty for synthetic data.
    return seq[int(rng.random() * len(seq))]


def _rr(rng: random.Random, a: int, b: int | None = None) -> int:
    """randrange(a, b) (or randrange(a)) from one float draw."""
    if b is None:
        a, b = 0, a
    return a + int(rng.random() * (b - a))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# -- the generator -------------------------------------------------------------------------------------

@dataclass(slots=True)
class _User:
    idx: int
    graph_id: str
    sys_id: str | None  # None: an Entra-only user (no CRM licence)
    first: str
    last: str
    email: str
    role: str  # admin, manager, rep, success, marketing, finance, it
    region: str
    department: str
    title: str
    created: int
    enabled: bool = True
    crm_disabled: bool = False
    skill: float = 0.0
    bu: str = ""
    team: int = -1

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(slots=True)
class _Account:
    id: str
    name: str
    domain: str
    region: str
    place: int
    industry: int
    employees: int
    currency: int
    owner: int  # user index, or -1 - team index for team-owned
    rep: int  # the user who works the account (the owner, or a member of the owning team)
    created: int
    contacts: list[int] = field(default_factory=list)
    valid_contacts: list[int] = field(default_factory=list)
    duplicate_of: int = -1


@dataclass(slots=True)
class _Contact:
    id: str
    first: str
    last: str
    email: str | None
    account: int  # -1: none, -2: orphan
    created: int
    phone: str


@dataclass(slots=True)
class _Activity:
    kind: str  # email, appointment, phonecall, task
    end: int  # actualend (or due / scheduled end for open ones)
    owner: int
    reg_type: str
    reg_id: str
    contact: int  # contact index or -1
    outgoing: bool
    subject: str
    minutes: int
    done: bool
    account: int = -1
    address: str | None = None  # the external party's email address (contact or lead)
    party: str = ""  # the external party's display name
    phone: str | None = None
    id: str = ""
    ref: str = ""  # messageid (emails) or iCalUId (appointments), shared with the Graph copy


_CHUNK = 10000


class _Writer:
    """Writes chunks into the store on a second thread.

    SQLite releases the GIL while it steps, so B-tree and file work overlaps with building the next
    records in Python. Chunks are written strictly in the order they were queued, so row versions are
    as deterministic as the data.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: queue.Queue[tuple[str, list[tuple[str, dict[str, Any]]], str | None] | None] = queue.Queue(4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="synth-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.bulk_load(job[0], job[1], version_field=job[2], chunk=len(job[1]) or 1)
                except BaseException as exc:  # re-raised in the generating thread by close()
                    self.error = exc

    def put(self, coll: str, items: list[tuple[str, dict[str, Any]]], version_field: str | None) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((coll, items, version_field))

    def stop(self) -> None:
        """Discard what is still queued and end the thread (generation failed)."""
        self.error = self.error or RuntimeError("generation stopped")
        self.queue.put(None)
        self.thread.join()

    def close(self) -> None:
        """Wait for every queued chunk; raise the first write error, if any."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Gen:
    """One generation run: the random stream, the clock and everything generated so far."""

    def __init__(self, store: Store, seed: int, counts: dict[str, int], anchor: dt.date) -> None:
        self.store = store
        self.seed = seed
        self.rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
        self.counts = counts
        self.anchor_date = anchor
        self.now = int(dt.datetime(anchor.year, anchor.month, anchor.day, tzinfo=dt.UTC).timestamp())
        self.go_live = self.now - 3 * 365 * DAY  # the CRM went live three years before the anchor
        self.clock = _Clock(self.go_live - 400 * DAY, 3 * 365 + 400 + 400)
        self.counter = _rr(self.rng, 0x10000000, 0x20000000)
        self.graph_counter = _rr(self.rng, 1 << 40, 1 << 44)
        self.tpl = {name: record_template(t) for name, t in TABLES.items()}
        self.summary: dict[str, int] = {}
        self.defects: dict[str, Any] = {}
        self.users: list[_User] = []
        self.accounts: list[_Account] = []
        self.contacts: list[_Contact] = []
        self.activities: list[_Activity] = []
        self.bu_ids: dict[str, str] = {}
        self.team_ids: list[str] = []
        self.team_groups: list[str] = []
        self.team_members: list[list[int]] = []
        self.currency_ids: list[str] = []
        self.opp_truth: list[tuple[str, int, float]] = []
        self.won = 0
        self.reps: list[int] = []
        self.departed: list[int] = []
        self.departed_sys: set[str | None] = set()
        self.owned: dict[str, int] = {}
        self.writer = _Writer(store)

    # ids ---------------------------------------------------------------------------------------------
    def guid(self) -> str:
        self.counter += 1 + self.rng.getrandbits(2)
        return dataverse_guid(self.counter, self.rng.getrandbits(64))

    def graph_id(self) -> str:
        self.graph_counter += 1
        return graph_item_id(self.graph_counter, self.rng.randbytes(27))

    def entra_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def iso(self, t: int) -> str:
        return self.clock.iso(t)

    def load(self, coll: str, records: Iterable[tuple[str, dict[str, Any]]], *, dataverse: bool = True) -> None:
        """Hand records to the writer thread in chunks, counting rows owned by departed users on the way."""
        vf = VERSION_FIELD if dataverse else None
        departed = self.departed_sys
        count_owned = dataverse and coll not in ("activitypointer", "systemuser", "team")
        owned = self.owned
        chunk: list[tuple[str, dict[str, Any]]] = []
        n = 0
        for item in records:
            chunk.append(item)
            if count_owned and item[1].get("_ownerid_value") in departed:
                rec = item[1]
                owned[coll] = owned.get(coll, 0) + 1
                if coll == "opportunity" and rec["statecode"] == 0:
                    owned["opportunity_open"] = owned.get("opportunity_open", 0) + 1
            if len(chunk) >= _CHUNK:
                self.writer.put(coll, chunk, vf)
                n += len(chunk)
                chunk = []
        if chunk:
            self.writer.put(coll, chunk, vf)
            n += len(chunk)
        self.summary[coll] = self.summary.get(coll, 0) + n

    def system(self, rec: dict[str, Any], created: int, modified: int, owner_sys: str, by: str,
               owner_type: str = "systemuser") -> dict[str, Any]:
        rec["createdon"] = self.iso(created)
        rec["modifiedon"] = self.iso(modified)
        rec["_createdby_value"] = by
        rec["_modifiedby_value"] = by
        rec["_ownerid_value"] = owner_sys
        rec["@emu._ownerid_value.type"] = owner_type
        return rec

    def phone(self, place: int) -> str:
        return f"{_PLACES[place][6]} 555 {_rr(self.rng, 100, 1000)} {_rr(self.rng, 1000, 10000)}"

    def postal(self, place: int) -> str:
        out = []
        for ch in _PLACES[place][2]:
            if ch == "#":
                out.append(str(_rr(self.rng, 10)))
            elif ch in "AB":
                out.append(chr(65 + _rr(self.rng, 26)))
            else:
                out.append(ch)
        return "".join(out)

    # organisation -------------------------------------------------------------------------------------
    def organisation(self) -> None:
        rng, _now = self.rng, self.now
        setup = self.go_live - 30 * DAY
        admin_sys = self.guid()
        self.admin_sys = admin_sys
        # Currencies: USD is the base currency.
        recs = []
        for iso, name, sym, rate, prec in _CURRENCIES:
            cid = self.guid()
            self.currency_ids.append(cid)
            r = dict(self.tpl["transactioncurrency"])
            r.update(transactioncurrencyid=cid, currencyname=name, isocurrencycode=iso, currencysymbol=sym,
                     exchangerate=rate, currencyprecision=prec, statecode=0, statuscode=1)
            r.update(createdon=self.iso(setup), modifiedon=self.iso(setup), _createdby_value=admin_sys,
                     _modifiedby_value=admin_sys)
            recs.append((cid, r))
        self.load("transactioncurrency", recs)
        # Business units: the root organisation unit and one per sales region.
        recs = []
        root = self.guid()
        self.bu_ids[COMPANY_NAME] = root
        for name in (COMPANY_NAME, *_REGIONS):
            bid = root if name == COMPANY_NAME else self.guid()
            self.bu_ids[name] = bid
            r = dict(self.tpl["businessunit"])
            r.update(businessunitid=bid, name=name, divisionname="Sales" if name != COMPANY_NAME else None,
                     emailaddress=f"{_slug(name)}@{COMPANY_DOMAIN}", websiteurl=f"https://www.{COMPANY_DOMAIN}",
                     address1_city={"North America": "Seattle", "EMEA": "London", "APAC": "Sydney"}.get(name, "Seattle"),
                     _parentbusinessunitid_value=None if bid == root else root, isdisabled=False)
            r.update(createdon=self.iso(setup), modifiedon=self.iso(setup), _createdby_value=admin_sys,
                     _modifiedby_value=admin_sys)
            recs.append((bid, r))
        self.load("businessunit", recs)
        # People. Roles are dealt out in a fixed pattern so small tenants still have every role.
        n = self.counts["users"]
        roles = ["admin", "manager", "manager", "manager", "success", "marketing", "finance", "it"]
        reps = max(4, int(n * 0.6))
        roles += ["rep"] * reps
        extra = ("success", "marketing", "rep", "finance", "success", "it", "manager")
        while len(roles) < n:
            roles.append(extra[len(roles) % len(extra)])
        roles = roles[:max(n, 12)] if n >= 12 else roles[:n]
        if roles.count("rep") < 3:
            roles[-3:] = ["rep"] * 3
        used: set[str] = set()
        region_cycle = 0
        for i, role in enumerate(roles):
            while True:
                first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
                email = f"{_ascii(first)}.{_ascii(last)}@{COMPANY_DOMAIN}"
                if email not in used:
                    used.add(email)
                    break
            if role in ("manager", "rep"):
                region = _REGIONS[region_cycle % 3] if role == "manager" else rng.choices(_REGIONS, _REGION_WEIGHT)[0]
                region_cycle += role == "manager"
            else:
                region = "North America"
            dept, title = {
                "admin": ("IT", "CRM Administrator"), "manager": ("Sales", f"Sales Manager, {region}"),
                "rep": ("Sales", _pick(rng, ("Account Executive", "Senior Account Executive", "Sales Representative"))),
                "success": ("Customer Success", "Customer Success Manager"),
                "marketing": ("Marketing", _pick(rng, ("Marketing Specialist", "Campaign Manager"))),
                "finance": ("Finance", _pick(rng, ("Financial Analyst", "Controller"))),
                "it": ("IT", _pick(rng, ("Systems Engineer", "Service Desk Analyst"))),
            }[role]
            crm = role in ("admin", "manager", "rep", "success", "marketing")
            created = setup - _rr(rng, 0, 360) * DAY if i < n * 0.7 else self.go_live + _rr(rng, 0, 900) * DAY
            u = _User(i, self.entra_id(), admin_sys if role == "admin" else (self.guid() if crm else None),
                      first, last, email, role, region, dept, title, created,
                      skill=round(rng.gauss(0.0, MODEL["skill_sd"]), 4) if role in ("rep", "manager") else 0.0,
                      bu=self.bu_ids[region] if role in ("manager", "rep") else self.bu_ids[COMPANY_NAME])
            self.users.append(u)
        # Departed reps: gone from Entra, still owning CRM records (the planted defect).
        rep_idx = [u.idx for u in self.users if u.role == "rep"]
        n_departed = max(1, round(len(rep_idx) * RATES["departed_reps"]))
        departed = sorted(rng.sample(rep_idx, n_departed))
        for k, i in enumerate(departed):
            self.users[i].enabled = False
            self.users[i].crm_disabled = k % 2 == 1  # every other one was also disabled in CRM
        self.departed = departed
        self.departed_sys = {self.users[i].sys_id for i in departed}
        # Teams: one sales team per region (an Entra M365 group team) plus each business unit's default team.
        for region in _REGIONS:
            members = [u.idx for u in self.users if u.region == region and u.role in ("manager", "rep")]
            for u_i in members:
                self.users[u_i].team = len(self.team_members)
            self.team_members.append(members)
            self.team_ids.append(self.guid())
            self.team_groups.append(self.entra_id())
        self.write_users()

    def write_users(self) -> None:
        rng = self.rng
        users = self.users
        managers = {u.region: u for u in users if u.role == "manager"}
        recs = []
        for u in users:
            if u.sys_id is None:
                continue
            r = dict(self.tpl["systemuser"])
            mgr = managers.get(u.region)
            r.update(systemuserid=u.sys_id, fullname=u.name, firstname=u.first, lastname=u.last,
                     domainname=u.email, internalemailaddress=u.email, azureactivedirectoryobjectid=u.graph_id,
                     isdisabled=u.crm_disabled, islicensed=True, accessmode=0, _businessunitid_value=u.bu,
                     _parentsystemuserid_value=mgr.sys_id if mgr and u.role == "rep" else None,
                     title=u.title, jobtitle=u.title, mobilephone=self.phone(0), address1_telephone1=self.phone(1),
                     address1_city="Seattle", address1_country="United States", _ownerid_value=u.sys_id)
            r["@emu._ownerid_value.type"] = "systemuser"
            created = max(u.created, self.go_live - 30 * DAY)
            r.update(createdon=self.iso(created), modifiedon=self.iso(created + _rr(rng, 0, 400) * DAY),
                     _createdby_value=self.admin_sys, _modifiedby_value=self.admin_sys)
            recs.append((u.sys_id, r))
        self.load("systemuser", recs)
        # Teams in Dataverse (default BU teams + regional sales teams backed by Entra groups).
        recs = []
        setup = self.go_live - 30 * DAY
        for name, bid in self.bu_ids.items():
            tid = self.guid()
            r = dict(self.tpl["team"])
            r.update(teamid=tid, name=name, description=f"Default team of the {name} business unit.", teamtype=0,
                     isdefault=True, _businessunitid_value=bid, _administratorid_value=self.admin_sys,
                     _ownerid_value=self.admin_sys)
            r["@emu._ownerid_value.type"] = "systemuser"
            self.system(r, setup, setup, self.admin_sys, self.admin_sys)
            recs.append((tid, r))
        for k, region in enumerate(_REGIONS):
            tid = self.team_ids[k]
            r = dict(self.tpl["team"])
            r.update(teamid=tid, name=f"Sales {region}", description=f"Account team for {region}.",
                     emailaddress=f"sales-{_slug(region)}@{COMPANY_DOMAIN}", teamtype=3,
                     azureactivedirectoryobjectid=self.team_groups[k], isdefault=False,
                     _businessunitid_value=self.bu_ids[region], _administratorid_value=self.admin_sys)
            self.system(r, setup, setup + 10 * DAY, self.admin_sys, self.admin_sys)
            recs.append((tid, r))
        self.load("team", recs)
        # Entra users and groups (Graph v1.0 shapes).
        recs = []
        for u in users:
            recs.append((u.graph_id, {
                "id": u.graph_id, "displayName": u.name, "givenName": u.first, "surname": u.last, "mail": u.email,
                "userPrincipalName": u.email, "accountEnabled": u.enabled, "jobTitle": u.title,
                "department": u.department, "officeLocation": {"EMEA": "London", "APAC": "Sydney"}.get(u.region, "Seattle"),
                "businessPhones": [self.phone(0)], "mobilePhone": self.phone(1) if rng.random() < 0.7 else None,
                "preferredLanguage": "en-US", "createdDateTime": self.iso(u.created),
                # A rep reports to the region's sales manager (as systemuser.parentsystemuserid says).
                "@emu.manager": mgr.graph_id if (mgr := managers.get(u.region)) and u.role == "rep" else None,
            }))
        self.load("graph.users", recs, dataverse=False)
        groups = []
        for k, region in enumerate(_REGIONS):
            nick = f"sales-{_slug(region)}"
            groups.append((self.team_groups[k], f"Sales {region}", f"Account team for {region}.", nick, True,
                           False, ["Unified"], [users[i].graph_id for i in self.team_members[k]]))
        everyone = [u.graph_id for u in users]
        groups.append((self.entra_id(), "All Staff", f"Everyone at {COMPANY_NAME}.", "allstaff", True, False,
                       ["Unified"], everyone))
        for name, dept in (("IT Admins", "IT"), ("Finance", "Finance"), ("Marketing", "Marketing"),
                           ("Customer Success", "Customer Success")):
            groups.append((self.entra_id(), name, f"{name} security group.", _slug(name), False, True, [],
                           [u.graph_id for u in users if u.department == dept]))
        recs = []
        for gid, name, desc, nick, mail_enabled, security, types, members in groups:
            recs.append((gid, {
                "id": gid, "displayName": name, "description": desc,
                "mail": f"{nick}@{COMPANY_DOMAIN}" if mail_enabled else None, "mailEnabled": mail_enabled,
                "mailNickname": nick, "securityEnabled": security, "groupTypes": types,
                "visibility": "Private" if types else None, "createdDateTime": self.iso(setup),
                "@emu.members": members,
            }))
        self.load("graph.groups", recs, dataverse=False)

    # accounts and contacts ----------------------------------------------------------------------------
    def accounts_and_contacts(self) -> None:
        rng, c = self.rng, self.counts
        n_acc = c["accounts"]
        n_dup = max(1, round(n_acc * RATES["duplicate_accounts"]))
        n_orig = n_acc - n_dup
        combos = len(_CO_A) * len(_CO_B) * len(_CO_C)
        picks = rng.sample(range(combos), n_orig)
        places_by_region = {r: [i for i, p in enumerate(_PLACES) if p[4] == r] for r in _REGIONS}
        reps_by_region = {r: [u.idx for u in self.users if u.region == r and u.role == "rep"] for r in _REGIONS}
        for r in _REGIONS:  # a region without reps borrows the manager
            if not reps_by_region[r]:
                reps_by_region[r] = [u.idx for u in self.users if u.region == r and u.role == "manager"] or \
                    [u.idx for u in self.users if u.role == "rep"]
        ind_codes = list(_INDUSTRY_WEIGHT)
        ind_w = list(_INDUSTRY_WEIGHT.values())
        iso_index = {cur[0]: i for i, cur in enumerate(_CURRENCIES)}
        span = self.now - self.go_live
        for k in range(n_orig):
            p = picks[k]
            a, rest = divmod(p, len(_CO_B) * len(_CO_C))
            b, s = divmod(rest, len(_CO_C))
            name = f"{_CO_A[a]} {_CO_B[b]} {_CO_C[s]}".strip()
            region = rng.choices(_REGIONS, _REGION_WEIGHT)[0]
            place = _pick(rng, places_by_region[region])
            # 40% came over in the go-live migration; the rest arrived steadily, a little faster lately.
            created = (self.go_live - _rr(rng, 0, 20 * DAY) if rng.random() < 0.4
                       else self.go_live + int(span * math.sqrt(rng.random())) - _rr(rng, 0, DAY))
            team_owned = rng.random() < 0.03
            rep = _pick(rng, reps_by_region[region])
            owner = -1 - _REGIONS.index(region) if team_owned else rep
            employees = max(3, int(math.exp(rng.gauss(math.log(250), 1.3))))
            self.accounts.append(_Account(self.guid(), name, f"{_slug(name)}.example", region, place,
                                          rng.choices(ind_codes, ind_w)[0], employees,
                                          iso_index[_PLACES[place][5]], owner, rep, created))
        # Duplicates: another record for an existing company, entered later with a near-identical name.
        for k in range(n_dup):
            orig_i = _rr(rng, n_orig)
            o = self.accounts[orig_i]
            name = (o.name, o.name.upper(), o.name + " ", o.name.replace(" Inc.", ", Inc."),
                    o.name.rsplit(" ", 1)[0] if " " in o.name else o.name + " Inc.")[k % 5]
            created = min(self.now - DAY, max(o.created, self.go_live) + _rr(rng, 30, 700) * DAY)
            self.accounts.append(_Account(self.guid(), name, o.domain, o.region, o.place, o.industry,
                                          o.employees, o.currency, o.owner if rng.random() < 0.5 else
                                          _pick(rng, reps_by_region[o.region]), o.rep, created, duplicate_of=orig_i))
        self.defects["duplicate_accounts"] = {
            "rate": RATES["duplicate_accounts"], "count": n_dup,
            "ids": [a.id for a in self.accounts[n_orig:]],
            "pairs": [[a.id, self.accounts[a.duplicate_of].id] for a in self.accounts[n_orig:]],
            "rule": "same name up to case, whitespace, punctuation or a dropped last word; same email domain",
        }
        self.n_orig_accounts = n_orig
        # Contacts: one per account first, the rest spread by company size.
        n_con = c["contacts"]
        weights = [math.log(a.employees + 1) for a in self.accounts[:n_orig]]
        assign = list(range(min(n_orig, n_con)))
        if n_con > len(assign):
            assign += rng.choices(range(n_orig), weights, k=n_con - len(assign))
        n_orphan = max(1, round(n_con * RATES["orphan_contacts"]))
        n_missing = max(1, round(n_con * RATES["missing_email"]))
        n_bad = max(1, round(n_con * RATES["malformed_email"]))
        special = rng.sample(range(n_con), n_orphan + n_missing + n_bad + n_con // 33)
        orphan_set = set(special[:n_orphan])
        missing_set = set(special[n_orphan:n_orphan + n_missing])
        bad_set = set(special[n_orphan + n_missing:n_orphan + n_missing + n_bad])
        no_parent = set(special[n_orphan + n_missing + n_bad:])
        self.ghost_accounts = [self.guid() for _ in range(max(1, n_orphan // 3 + 1))]
        for ci in range(n_con):
            ai = assign[ci]
            acc = self.accounts[ai]
            first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
            good = f"{_ascii(first)}.{_ascii(last)}@{acc.domain}"
            email: str | None = good
            if ci in missing_set:
                email = None
            elif ci in bad_set:
                local, dom = good.split("@")
                email = (f"{local}@@{dom}", f"{local}.{dom}", f"{first.lower()} {last.lower()}@{dom}",
                         f"{local}@", dom.replace(".", ",", 1).join((local + "@", "")))[ci % 5]
            account = -2 if ci in orphan_set else (-1 if ci in no_parent else ai)
            created = max(acc.created, self.go_live - 20 * DAY) + int(rng.random() * 0.6 * (self.now - max(acc.created, self.go_live)))
            con = _Contact(self.guid(), first, last, email, account, min(created, self.now - 3600),
                           self.phone(acc.place))
            self.contacts.append(con)
            if account >= 0:
                acc.contacts.append(ci)
                if email == good:
                    acc.valid_contacts.append(ci)
        self.defects["contacts_missing_email"] = {"rate": RATES["missing_email"], "count": n_missing,
                                                  "ids": [self.contacts[i].id for i in sorted(missing_set)]}
        self.defects["contacts_malformed_email"] = {
            "rate": RATES["malformed_email"], "count": n_bad,
            "ids": [self.contacts[i].id for i in sorted(bad_set)],
            "rule": "fails ^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$ (double @, no @, a space, no domain, comma for dot)"}
        self.orphan_contacts = sorted(orphan_set)
        self.write_accounts(iso_index)
        self.write_contacts()

    def owner_of(self, owner: int) -> tuple[str, str]:
        """(owner id, owner table) for a user index, or a negative team index."""
        if owner < 0:
            return self.team_ids[-1 - owner], "team"
        sid = self.users[owner].sys_id
        assert sid is not None
        return sid, "systemuser"

    def write_accounts(self, iso_index: dict[str, int]) -> None:
        rng = self.rng
        recs = []
        for k, a in enumerate(self.accounts):
            place = _PLACES[a.place]
            rate = _CURRENCIES[a.currency][3]
            owner, otype = self.owner_of(a.owner)
            migrated = a.created < self.go_live
            by = self.admin_sys if migrated or otype == "team" else owner
            primary = (a.valid_contacts or a.contacts or [-1])[0]
            parent = None
            if a.duplicate_of < 0 and k > 10 and rng.random() < 0.04:
                parent = self.accounts[_rr(rng, k)].id
            revenue = round(a.employees * math.exp(rng.gauss(math.log(160000), 0.5)) * rate, -3)
            r = dict(self.tpl["account"])
            r.update(
                accountid=a.id, name=a.name, accountnumber=f"ACC-{100001 + k:06d}", telephone1=self.phone(a.place),
                emailaddress1=f"info@{a.domain}", websiteurl=f"https://www.{a.domain}",
                address1_line1=f"{_rr(rng, 1, 2000)} {_pick(rng, _STREETS)}", address1_city=place[0],
                address1_stateorprovince=place[1] or None, address1_postalcode=self.postal(a.place),
                address1_country=place[3], industrycode=a.industry,
                customertypecode=rng.choices((3, 8, 5, 9, 10, 1), (70, 15, 6, 4, 3, 2))[0],
                accountcategorycode=1 if a.employees > 1000 else 2, revenue=revenue,
                numberofemployees=a.employees,
                _primarycontactid_value=self.contacts[primary].id if primary >= 0 else None,
                _parentaccountid_value=parent, _transactioncurrencyid_value=self.currency_ids[a.currency],
                description=None if rng.random() < 0.7 else f"{a.name} works with us in {place[0]}.",
                creditonhold=rng.random() < 0.03, creditlimit=round(revenue * 0.02, -3) or None,
                donotemail=rng.random() < 0.04,
            )
            inactive = rng.random() < 0.04
            r["statecode"], r["statuscode"] = (1, 2) if inactive else (0, 1)
            r["_owningbusinessunit_value"] = self.bu_ids[a.region]
            self.system(r, a.created, a.created + int(rng.random() * (self.now - a.created)), owner, by, otype)
            recs.append((a.id, r))
        self.load("account", recs)

    def write_contacts(self) -> None:
        rng = self.rng
        tpl = self.tpl["contact"]
        ghosts = self.ghost_accounts
        orphan_ids: list[str] = []

        def records() -> Iterator[tuple[str, dict[str, Any]]]:
            for ci, c in enumerate(self.contacts):
                r = dict(tpl)
                acc = self.accounts[c.account] if c.account >= 0 else None
                r.update(contactid=c.id, firstname=c.first, lastname=c.last, fullname=f"{c.first} {c.last}",
                         emailaddress1=c.email, telephone1=c.phone,
                         mobilephone=c.phone if rng.random() < 0.5 else None, jobtitle=_pick(rng, _JOB_TITLES),
                         department=_pick(rng, _DEPARTMENTS), employeeid=f"CT-{1000001 + ci}",
                         preferredcontactmethodcode=_pick(rng, (1, 1, 1, 2, 2, 3)), donotemail=rng.random() < 0.05)
                if rng.random() < 0.4:
                    r["birthdate"] = dt.date.fromordinal(_rr(rng, 715000, 730000)).isoformat()
                if rng.random() < 0.5:
                    r["gendercode"] = _pick(rng, (1, 2))
                if acc is not None:
                    place = _PLACES[acc.place]
                    r.update(_parentcustomerid_value=acc.id, address1_city=place[0], address1_country=place[3],
                             _transactioncurrencyid_value=self.currency_ids[acc.currency])
                    r["@emu._parentcustomerid_value.type"] = "account"
                    owner, otype = self.owner_of(acc.owner)
                    region = acc.region
                elif c.account == -2:  # planted orphan: the account it points at does not exist
                    r["_parentcustomerid_value"] = ghosts[len(orphan_ids) % len(ghosts)]
                    r["@emu._parentcustomerid_value.type"] = "account"
                    orphan_ids.append(c.id)
                    owner, otype, region = (*self.owner_of(self.reps[ci % len(self.reps)]), "North America")
                else:
                    owner, otype, region = (*self.owner_of(self.reps[ci % len(self.reps)]), "North America")
                inactive = rng.random() < 0.03
                r["statecode"], r["statuscode"] = (1, 2) if inactive else (0, 1)
                r["_owningbusinessunit_value"] = self.bu_ids[region]
                self.system(r, c.created, c.created + int(rng.random() * (self.now - c.created)), owner,
                            owner if otype == "systemuser" else self.admin_sys, otype)
                yield c.id, r

        self.load("contact", records())
        self.orphan_contact_ids = orphan_ids

    # opportunities, leads, activities -------------------------------------------------------------------
    def season_days(self, k: int) -> list[int]:
        """``k`` close days (midnight epoch seconds) with quarter-end and Q4 peaks, busier lately."""
        first = self.go_live + 30 * DAY
        days = list(range(first, self.now, DAY))
        weights = []
        for i, d in enumerate(days):
            month, quarter = self.clock.month_quarter(d)
            w = (0.8, 1.0, 0.85, 1.45)[quarter - 1] * (1.35 if month % 3 == 0 else 1.0)
            if dt.datetime.fromtimestamp(d, dt.UTC).weekday() >= 5:
                w *= 0.15
            weights.append(w * (1.0 + 0.4 * i / len(days)))
        return self.rng.choices(days, weights, k=k)

    def contact_party(self, ci: int) -> tuple[str | None, str, str | None]:
        c = self.contacts[ci]
        return c.email, f"{c.first} {c.last}", c.phone

    def touch(self, t: int, owner: int, reg_type: str, reg_id: str, ai: int, main_contact: int | None,
              product: str, *, done: bool = True, kind: str | None = None) -> _Activity:
        """One activity with a contact of account ``ai`` (kind drawn 55/20/25 email/meeting/call if not given)."""
        rng = self.rng
        acc = self.accounts[ai]
        if kind is None:
            r = rng.random()
            kind = "email" if r < 0.55 else ("appointment" if r < 0.75 else "phonecall")
        if kind in ("email", "appointment") and not acc.valid_contacts:
            kind = "phonecall"  # nobody to write to or invite
        if kind in ("email", "appointment") and acc.valid_contacts:
            ci = main_contact if (main_contact is not None and main_contact in acc.valid_contacts
                                  and rng.random() < 0.6) else _pick(rng, acc.valid_contacts)
        elif acc.contacts:
            ci = _pick(rng, acc.contacts)
        else:
            ci = -1
        address, party, phone = self.contact_party(ci) if ci >= 0 else (None, "", self.phone(acc.place))
        if kind == "email":
            subject, minutes = _pick(rng, _EMAIL_SUBJECTS).format(p=product), 0
        elif kind == "appointment":
            subject, minutes = _pick(rng, _MEETING_SUBJECTS).format(p=product), _pick(rng, (30, 30, 45, 60, 60, 90))
        elif kind == "phonecall":
            subject, minutes = _pick(rng, _CALL_SUBJECTS).format(p=product), _pick(rng, (5, 10, 15, 20, 30))
        else:
            subject, minutes = _pick(rng, _TASK_SUBJECTS).format(p=product.lower()), 30
        return _Activity(kind, t, owner, reg_type, reg_id, ci, rng.random() < 0.6, subject, minutes, done, ai,
                         address, party, phone)

    def account_before(self, limit: int) -> int:
        """A size-weighted random original account created before ``limit`` (the oldest if none is)."""
        k = max(1, bisect.bisect_left(self.acc_created, limit))
        j = bisect.bisect_right(self.acc_cum, self.rng.random() * self.acc_cum[k - 1], 0, k)
        return self.acc_by_age[min(j, k - 1)]

    def opportunities(self) -> None:
        rng, n, m = self.rng, self.counts["opportunities"], MODEL
        n_orig = self.n_orig_accounts
        by_age = sorted(range(n_orig), key=lambda k: self.accounts[k].created)
        self.acc_by_age = by_age
        self.acc_created = [self.accounts[k].created for k in by_age]
        self.acc_cum = list(itertools.accumulate(math.sqrt(self.accounts[k].employees) for k in by_age))
        n_stale = max(1, round(n * RATES["stale_open_opportunities"]))
        n_open = round(n * 0.14)
        kinds = ["stale"] * n_stale + ["open"] * n_open + ["closed"] * (n - n_stale - n_open)
        rng.shuffle(kinds)
        closes = iter(self.season_days(kinds.count("closed")))
        orphans = set(rng.sample(range(n), max(1, round(n * RATES["orphan_opportunities"]))))
        qualified = set(rng.sample(range(n), min(round(n * 0.3), round(self.counts["leads"] * 0.5))))
        reps_by_region = {r: [u.idx for u in self.users if u.region == r and u.role == "rep"] or self.reps
                          for r in _REGIONS}
        tpl = self.tpl["opportunity"]
        recs: list[tuple[str, dict[str, Any]]] = []
        self.lead_recs: list[tuple[str, dict[str, Any]]] = []
        stale_ids: list[str] = []
        orphan_ids: list[str] = []
        today = self.now
        for i in range(n):
            kind = kinds[i]
            # The timeline comes first; the account is then drawn among those that existed a day before
            # the deal was created (weighted by size), so no deal predates its account.
            if kind == "closed":
                close = next(closes)
                life = min(420.0, max(10.0, math.exp(rng.gauss(math.log(70), 0.6))))
                created = max(close - int(life * DAY) - _rr(rng, DAY), self.go_live - 10 * DAY)
            elif kind == "open":
                created = today - _rr(rng, 5, 150) * DAY - _rr(rng, DAY)
                est = today + _rr(rng, -60, 181) * DAY
                est = max(est, (created // DAY + 14) * DAY)
            else:
                est = today - _rr(rng, 91, 400) * DAY
                created = max(est - _rr(rng, 30, 240) * DAY, self.go_live - 10 * DAY)
            ai = self.account_before(created - DAY)
            acc = self.accounts[ai]
            if acc.created > created - DAY:  # only when no account is old enough (tiny scales)
                created = acc.created + DAY
                if kind == "closed" and created > close - 7 * DAY:
                    close = min(today - DAY, created + 30 * DAY)
            owner = acc.rep if rng.random() < 0.85 else _pick(rng, reps_by_region[acc.region])
            owner_sys, _ = self.owner_of(owner)
            product = _pick(rng, _PRODUCTS)
            rate = _CURRENCIES[acc.currency][3]
            value_base = max(1000.0, round(math.exp(rng.gauss(math.log(30000) + 0.35 * math.log(acc.employees / 250),
                                                              0.8)), -2))
            value = round(value_base * rate, -2)
            value_base = value / rate  # exactly what an analyst recomputes from estimatedvalue / exchangerate
            if kind == "open":
                end = today
            elif kind == "stale":
                end = min(today - DAY, est + _rr(rng, 0, 20) * DAY)
            else:
                end = close
            oid = self.guid()
            # Engagement: a latent activeness drives how many touches the deal gets over its life.
            activeness = rng.gammavariate(1.5, 1.0)
            n_touch = min(60, _poisson(rng, 0.03 * activeness * (end - created) / DAY))
            main_contact = _pick(rng, acc.valid_contacts or acc.contacts) if acc.contacts else None
            times = sorted(created + int(rng.random() * (end - created)) for _ in range(n_touch))
            for t in times:
                self.activities.append(self.touch(t, owner, "opportunity", oid, ai, main_contact, product))
            r = dict(tpl)
            stage = 3
            if kind == "closed":
                touches_90d = sum(1 for t in times if t >= close - m["touch_window_days"] * DAY)
                age_days = (close - created) / DAY
                _, quarter = self.clock.month_quarter(close)
                z = (m["intercept"] + m["engagement"] * math.log1p(touches_90d)
                     + m["size"] * math.log(value_base / m["value_reference"]) + m["age"] * age_days / 100
                     + m["q4"] * (quarter == 4) + m["industry"].get(acc.industry, 0.0)
                     + self.users[owner].skill + rng.gauss(0.0, m["noise_sd"]))
                won = rng.random() < _sigmoid(z)
                self.won += won
                self.opp_truth.append((oid, touches_90d, z))
                stage = 3 if won else _pick(rng, (0, 1, 1, 2, 2, 3))
                r.update(actualvalue=round(value * rng.uniform(0.9, 1.05), -2) if won else None,
                         actualclosedate=self.iso(close), estimatedclosedate=self.iso(close + _rr(rng, -20, 21) * DAY),
                         closeprobability=100 if won else 0, statecode=1 if won else 2,
                         statuscode=3 if won else _pick(rng, (4, 5, 5)))
                modified = close + _rr(rng, 3600, DAY - 3600)
            else:
                age = (today - created) / DAY
                stage = min(3, int(age / 40 + rng.random()))
                r.update(estimatedclosedate=self.iso(est), closeprobability=_STAGE_PROB[stage], statecode=0,
                         statuscode=2 if rng.random() < 0.1 else 1)
                modified = (times[-1] if times else created) + _rr(rng, 60, 3600)
                modified = min(modified, today - 60)
                if kind == "stale":
                    stale_ids.append(oid)
                else:  # some upcoming meetings and to-dos on live deals (not touches: no actualend yet)
                    if rng.random() < 0.3 and acc.valid_contacts:
                        self.activities.append(self.touch(
                            today + _rr(rng, DAY, 20 * DAY), owner, "opportunity", oid, ai, main_contact,
                            product, done=False, kind="appointment"))
            acc_id, con_id = acc.id, (self.contacts[main_contact].id if main_contact is not None else None)
            if i in orphans:
                acc_id = self.ghost_accounts[len(orphan_ids) % len(self.ghost_accounts)]
                orphan_ids.append(oid)
            lead_id = None
            if i in qualified:
                lead_id = self.guid()
                self.lead_recs.append((lead_id, self.qualified_lead(lead_id, acc, oid, owner_sys, created,
                                                                    value, main_contact)))
            r.update(opportunityid=oid, name=f"{acc.name.split(' ')[0]} {acc.name.split(' ')[1] if ' ' in acc.name else ''} - {product}".replace("  ", " "),
                     estimatedvalue=value, budgetamount=round(value * rng.uniform(0.8, 1.3), -2) if rng.random() < 0.5 else None,
                     stepname=_STEPS[stage], salesstage=stage, opportunityratingcode=_pick(rng, (1, 2, 2, 3)),
                     purchasetimeframe=_pick(rng, (0, 1, 2, 3, 4)), prioritycode=1,
                     _parentaccountid_value=acc_id, _parentcontactid_value=con_id, _customerid_value=acc_id,
                     _originatingleadid_value=lead_id, _transactioncurrencyid_value=self.currency_ids[acc.currency],
                     description=None if rng.random() < 0.6 else f"{product} for {acc.name}.")
            r["@emu._customerid_value.type"] = "account"
            r["_owningbusinessunit_value"] = self.users[owner].bu
            self.system(r, created, max(modified, created), owner_sys, owner_sys)
            recs.append((oid, r))
        self.load("opportunity", recs)
        self.defects["stale_open_opportunities"] = {
            "rate": RATES["stale_open_opportunities"], "count": len(stale_ids), "ids": stale_ids,
            "rule": "statecode 0 (open) and estimatedclosedate more than 90 days before the anchor date"}
        self.orphan_opportunity_ids = orphan_ids

    def qualified_lead(self, lid: str, acc: _Account, oid: str, owner_sys: str, opp_created: int, value: float,
                       contact: int | None) -> dict[str, Any]:
        rng = self.rng
        if contact is not None:
            c = self.contacts[contact]
            first, last, email = c.first, c.last, c.email
        else:
            first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
            email = f"{_ascii(first)}.{_ascii(last)}@{acc.domain}"
        created = max(self.go_live - 20 * DAY, opp_created - _rr(rng, 1, 30) * DAY)
        r = self.lead_record(lid, first, last, acc.name, email, acc.place, acc.industry, value, created)
        r.update(_parentaccountid_value=acc.id, _customerid_value=acc.id, _qualifyingopportunityid_value=oid,
                 statecode=1, statuscode=3,
                 _parentcontactid_value=self.contacts[contact].id if contact is not None else None)
        r["@emu._customerid_value.type"] = "account"
        self.system(r, created, opp_created, owner_sys, owner_sys)
        return r

    def lead_record(self, lid: str, first: str, last: str, company: str, email: str | None, place: int,
                    industry: int, value: float, created: int) -> dict[str, Any]:
        rng = self.rng
        r = dict(self.tpl["lead"])
        r.update(leadid=lid, subject=f"Interest in {_pick(rng, _PRODUCTS).lower()}", firstname=first, lastname=last,
                 fullname=f"{first} {last}", companyname=company, jobtitle=_pick(rng, _JOB_TITLES),
                 emailaddress1=email, telephone1=self.phone(place), address1_city=_PLACES[place][0],
                 address1_country=_PLACES[place][3], leadsourcecode=_pick(rng, (1, 2, 3, 4, 6, 7, 8, 8, 8, 9, 10)),
                 leadqualitycode=_pick(rng, (1, 2, 2, 3)), industrycode=industry, estimatedamount=value,
                 numberofemployees=max(5, int(math.exp(rng.gauss(math.log(150), 1.2)))),
                 _transactioncurrencyid_value=self.currency_ids[0])
        return r

    def other_leads(self) -> None:
        rng = self.rng
        n = max(0, self.counts["leads"] - len(self.lead_recs))
        ind_codes = list(_INDUSTRY_WEIGHT)
        self.open_leads: list[tuple[str, str, str, int, int]] = []
        for _ in range(n):
            lid = self.guid()
            first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
            company = f"{_pick(rng, _CO_A)} {_pick(rng, _CO_B)} {_pick(rng, _CO_C)}".strip()
            email = f"{_ascii(first)}.{_ascii(last)}@{_slug(company)}.example"
            place = _rr(rng, len(_PLACES))
            is_open = rng.random() < 0.3
            created = (self.now - _rr(rng, 1, 120) * DAY if is_open
                       else self.go_live + _rr(rng, 0, 3 * 365 - 30) * DAY) + _rr(rng, DAY)
            created = min(created, self.now - 3600)
            r = self.lead_record(lid, first, last, company, email, place, _pick(rng, ind_codes),
                                 round(math.exp(rng.gauss(math.log(20000), 0.8)), -2), created)
            owner = _pick(rng, self.reps)
            owner_sys, _ = self.owner_of(owner)
            if is_open:
                r["statecode"], r["statuscode"] = 0, _pick(rng, (1, 1, 2))
                self.open_leads.append((lid, f"{first} {last}", email, owner, created))
            else:
                r["statecode"], r["statuscode"] = 2, _pick(rng, (4, 5, 6, 7))
            self.system(r, created, min(self.now - 60, created + _rr(rng, DAY, 60 * DAY)), owner_sys, owner_sys)
            self.lead_recs.append((lid, r))
        self.load("lead", self.lead_recs)
        del self.lead_recs

    def background_activities(self) -> None:
        """Activities that are not opportunity touches: account and contact upkeep, lead follow-ups, tasks.

        None of them regards an opportunity as an email, meeting or call, so they never count as touches.
        """
        rng, now = self.rng, self.now
        n_orig = self.n_orig_accounts
        for _ in range(self.counts["activities"]):
            r = rng.random()
            kind = "task" if r < 0.4 else ("phonecall" if r < 0.65 else ("email" if r < 0.9 else "appointment"))
            target = rng.random()
            if target < 0.1 and self.open_leads and kind != "task":
                lid, party, email, owner, created = _pick(rng, self.open_leads)
                t = created + int(rng.random() * (now - 60 - created))
                subject = {"email": "Introduction", "phonecall": "Intro call"}.get(kind, "First meeting")
                self.activities.append(_Activity(kind, t, owner, "lead", lid, -1, True, subject,
                                                 30 if kind == "appointment" else 10, True, -1, email, party, None))
                continue
            ai = _rr(rng, n_orig)
            acc = self.accounts[ai]
            start = max(acc.created, self.go_live)
            # Tasks and meetings reach 30 days ahead (still open); the rest happened before the anchor.
            horizon = now + (30 * DAY if kind in ("task", "appointment") else -60)
            t = start + int(rng.random() * max(60, horizon - start))
            done = t < now and not (kind == "task" and rng.random() < 0.1)  # some tasks are overdue
            a = self.touch(t, acc.rep, "account", acc.id, ai, None, _pick(rng, _PRODUCTS), done=done, kind=kind)
            if a.kind in ("email", "phonecall"):
                a.done, a.end = True, min(a.end, now - 60)
            if target < 0.4 and a.contact >= 0:
                a.reg_type, a.reg_id = "contact", self.contacts[a.contact].id
            self.activities.append(a)

    def write_activities(self) -> None:
        rng, clock = self.rng, self.clock
        acts = self.activities
        for a in acts:
            a.id = self.guid()
        pointer_keys = [c.json_name for c in TABLES["activitypointer"].columns if c.json_name != "activitytypecode"]
        tpls = {k: self.tpl[k] for k in ACTIVITY_TYPES}
        iso = clock.iso
        users = self.users
        built: dict[str, list[tuple[str, dict[str, Any]]]] = {k: [] for k in ACTIVITY_TYPES}
        pointers: list[tuple[str, dict[str, Any]]] = []
        now = self.now
        for a in acts:
            u = users[a.owner]
            owner = u.sys_id
            r = dict(tpls[a.kind])
            r["activityid"] = a.id
            r["subject"] = a.subject
            r["_regardingobjectid_value"] = a.reg_id
            r["@emu._regardingobjectid_value.type"] = a.reg_type
            r["prioritycode"] = 1 if rng.random() < 0.85 else _pick(rng, (0, 2))
            r["isregularactivity"] = True
            start = a.end - a.minutes * 60
            created = min(start - _rr(rng, 60, 5 * DAY), now - 3600) if a.kind in ("appointment", "task") \
                else a.end - _rr(rng, 10, 600)
            created = max(created, self.go_live - 20 * DAY)
            modified = min(a.end + _rr(rng, 60, 7200), now - 30) if a.done else created
            if a.kind == "email":
                mine, theirs = u.email, a.address
                a.ref = f"<{rng.getrandbits(64):016x}{rng.getrandbits(32):08x}@{(mine if a.outgoing else theirs or mine).split('@')[-1]}>"
                r.update(directioncode=a.outgoing, sender=mine if a.outgoing else theirs,
                         torecipients=(theirs if a.outgoing else mine), messageid=a.ref,
                         attachmentcount=1 if rng.random() < 0.2 else 0, actualend=iso(a.end),
                         statecode=1, statuscode=3 if a.outgoing else 4)
            elif a.kind == "appointment":
                a.ref = "040000008200E00074C5B7101A82E008" + f"{rng.getrandbits(128):032X}"
                r.update(scheduledstart=iso(start), scheduledend=iso(a.end), scheduleddurationminutes=a.minutes,
                         location=_pick(rng, _LOCATIONS), isalldayevent=False,
                         isonlinemeeting=rng.random() < 0.6, globalobjectid=a.ref)
                if a.done:
                    r.update(actualstart=iso(start), actualend=iso(a.end), actualdurationminutes=a.minutes,
                             statecode=1, statuscode=3)
                else:
                    r.update(statecode=3, statuscode=5)
            elif a.kind == "phonecall":
                r.update(directioncode=a.outgoing, phonenumber=a.phone, actualend=iso(a.end),
                         actualdurationminutes=a.minutes, statecode=1, statuscode=2 if a.outgoing else 4)
            else:
                r.update(scheduledend=iso(a.end), category=_pick(rng, ("Sales", "Follow-up", "Admin")))
                if a.done:
                    r.update(actualend=iso(a.end), percentcomplete=100, statecode=1, statuscode=5)
                else:
                    r.update(percentcomplete=_pick(rng, (0, 0, 25, 50)), statecode=0, statuscode=_pick(rng, (2, 3)))
            r["_ownerid_value"] = owner
            r["@emu._ownerid_value.type"] = "systemuser"
            r["_owningbusinessunit_value"] = u.bu
            r["createdon"] = iso(created)
            r["modifiedon"] = iso(max(modified, created))
            r["_createdby_value"] = owner
            r["_modifiedby_value"] = owner
            built[a.kind].append((a.id, r))
            p = {k: r[k] for k in pointer_keys}
            p["statuscode"] = POINTER_STATUS[r["statecode"]]
            p["activitytypecode"] = a.kind
            p["@emu._regardingobjectid_value.type"] = a.reg_type
            p["@emu._ownerid_value.type"] = "systemuser"
            pointers.append((a.id, p))
        for kind in ACTIVITY_TYPES:
            self.load(kind, built[kind])
        del built
        self.load("activitypointer", pointers)

    # Graph: Outlook copies of the CRM mail and meetings, plus internal traffic ---------------------------
    def graph_mail(self) -> None:
        rng, clock, users = self.rng, self.clock, self.users
        now = self.now
        folder_cache: dict[tuple[str, str], str] = {}

        def folder(uid: str, name: str) -> str:
            key = (uid, name)
            if key not in folder_cache:
                folder_cache[key] = folder_id(uid, name)
            return folder_cache[key]

        def addr(name: str, address: str) -> dict[str, Any]:
            return {"emailAddress": {"name": name, "address": address}}

        def message(uid: str, box: str, subject: str, frm: dict[str, Any], to: list[dict[str, Any]], t: int,
                    ref: str, conv: str, preview: str) -> tuple[str, dict[str, Any]]:
            mid = self.graph_id()
            return mid, {
                "id": mid, "createdDateTime": clock.iso(t), "lastModifiedDateTime": clock.iso(t + 60),
                "receivedDateTime": clock.iso(t), "sentDateTime": clock.iso(t - 2), "hasAttachments": False,
                "internetMessageId": ref, "subject": subject, "bodyPreview": preview, "importance": "normal",
                "body": {"contentType": "text", "content": preview},
                "parentFolderId": folder(uid, box), "conversationId": conv,
                "isRead": box == "sentitems" or t < now - 2 * DAY or rng.random() < 0.4, "isDraft": False,
                "from": frm, "sender": frm, "toRecipients": to, "ccRecipients": [], "categories": [],
                "@emu.user": uid, "@emu.folder": box,
            }

        def messages() -> Iterator[tuple[str, dict[str, Any]]]:
            for a in self.activities:
                if a.kind != "email" or not a.address:
                    continue
                u = users[a.owner]
                me, them = addr(u.name, u.email), addr(a.party, a.address)
                conv = "AAQkAGI2" + base64.urlsafe_b64encode(uuid.UUID(a.reg_id).bytes).decode()
                yield message(u.graph_id, "sentitems" if a.outgoing else "inbox", a.subject,
                              me if a.outgoing else them, [them if a.outgoing else me], a.end, a.ref, conv,
                              f"Hi {(a.party if a.outgoing else u.name).split(' ')[0]}, regarding {a.subject.lower()}")
            for _ in range(self.counts["internal_messages"]):
                s = _pick(rng, users)
                team = self.team_members[s.team] if s.team >= 0 and len(self.team_members[s.team]) > 1 else None
                rcp = users[_pick(rng, team)] if team and rng.random() < 0.7 else _pick(rng, users)
                if rcp.idx == s.idx:
                    rcp = users[(s.idx + 1) % len(users)]
                t = now - _rr(rng, 60, 700 * DAY)
                subject = _pick(rng, _INTERNAL_SUBJECTS)
                ref = f"<{rng.getrandbits(96):024x}@{COMPANY_DOMAIN}>"
                conv = "AAQkAGI2" + base64.urlsafe_b64encode(rng.randbytes(16)).decode()
                frm, to = addr(s.name, s.email), [addr(rcp.name, rcp.email)]
                yield message(s.graph_id, "sentitems", subject, frm, to, t, ref, conv, f"Hi {rcp.first}, ...")
                yield message(rcp.graph_id, "inbox", subject, frm, to, t + 5, ref, conv, f"Hi {rcp.first}, ...")

        self.load("graph.messages", messages(), dataverse=False)

    def graph_calendar(self) -> None:
        rng, clock, users = self.rng, self.clock, self.users
        now = self.now

        def party(name: str, address: str) -> dict[str, Any]:
            return {"emailAddress": {"name": name, "address": address}}

        def event(uid: str, organizer: _User, subject: str, start: int, end: int, attendees: list[dict[str, Any]],
                  ical: str, location: str, online: bool) -> tuple[str, dict[str, Any]]:
            eid = self.graph_id()
            created = min(start - 3 * DAY, now - 3600)
            return eid, {
                "id": eid, "createdDateTime": clock.iso(created), "lastModifiedDateTime": clock.iso(created + 600),
                "iCalUId": ical, "subject": subject, "bodyPreview": "", "importance": "normal", "isAllDay": False,
                "body": {"contentType": "text", "content": ""},
                "isCancelled": False, "isOnlineMeeting": online, "showAs": "busy", "type": "singleInstance",
                "start": {"dateTime": clock.graph(start), "timeZone": "UTC"},
                "end": {"dateTime": clock.graph(end), "timeZone": "UTC"},
                "location": {"displayName": location}, "organizer": party(organizer.name, organizer.email),
                "attendees": attendees, "@emu.user": uid,
            }

        def attendee(name: str, address: str, response: str, t: int) -> dict[str, Any]:
            return {"type": "required", "status": {"response": response, "time": clock.iso(t)},
                    "emailAddress": {"name": name, "address": address}}

        def events() -> Iterator[tuple[str, dict[str, Any]]]:
            for a in self.activities:
                if a.kind != "appointment" or not a.address:
                    continue
                u = users[a.owner]
                start = a.end - a.minutes * 60
                resp = "accepted" if a.done or rng.random() < 0.6 else "none"
                yield event(u.graph_id, u, a.subject, start, a.end,
                            [attendee(a.party, a.address, resp, min(start, now) - 3600)], a.ref,
                            "Microsoft Teams Meeting" if rng.random() < 0.6 else "Customer office", rng.random() < 0.6)
            for _ in range(self.counts["internal_events"]):
                org = _pick(rng, users)
                others = [users[i] for i in rng.sample(range(len(users)), min(len(users), rng.randint(2, 4)))
                          if i != org.idx][:3]
                day = (now - _rr(rng, -30, 700) * DAY) // DAY * DAY
                start = day + _pick(rng, (8, 9, 10, 13, 14, 15)) * 3600
                end = start + _pick(rng, (30, 60)) * 60
                att = [attendee(o.name, o.email, _pick(rng, ("accepted", "accepted", "tentativelyAccepted", "none")),
                                min(start, now) - 7200) for o in others]
                ical = "040000008200E00074C5B7101A82E008" + f"{rng.getrandbits(128):032X}"
                subject = _pick(rng, ("Pipeline review", "1:1", "Forecast call", "Team meeting", "Deal review"))
                for holder in (org, *others):
                    yield event(holder.graph_id, org, subject, start, end, att, ical, "Microsoft Teams Meeting", True)

        self.load("graph.events", events(), dataverse=False)

    def graph_contacts(self) -> None:
        rng, clock = self.rng, self.clock
        by_rep: dict[int, list[int]] = {}
        for a in self.accounts[:self.n_orig_accounts]:
            by_rep.setdefault(a.rep, []).extend(a.valid_contacts)

        def records() -> Iterator[tuple[str, dict[str, Any]]]:
            for rep in sorted(by_rep):
                u = self.users[rep]
                pool = by_rep[rep]
                for ci in sorted(rng.sample(pool, min(len(pool) * 3 // 10, 300))):
                    c = self.contacts[ci]
                    acc = self.accounts[c.account]
                    gid = self.graph_id()
                    t = max(c.created, u.created)
                    yield gid, {
                        "id": gid, "createdDateTime": clock.iso(t), "lastModifiedDateTime": clock.iso(t + 3600),
                        "displayName": f"{c.first} {c.last}", "givenName": c.first, "surname": c.last,
                        "emailAddresses": [{"name": f"{c.first} {c.last}", "address": c.email}],
                        "companyName": acc.name, "jobTitle": None, "businessPhones": [c.phone], "mobilePhone": None,
                        "@emu.user": u.graph_id,
                    }

        self.load("graph.contacts", records(), dataverse=False)

    # defects and meta ----------------------------------------------------------------------------------
    def finish(self, scale: str | dict[str, int], seconds: float) -> dict[str, Any]:
        dep = [self.users[i] for i in self.departed]
        dep_sys = [u.sys_id for u in dep if u.sys_id]
        owned = dict(self.owned)
        open_opps = owned.pop("opportunity_open", 0)
        self.defects["orphan_lookups"] = {
            "rate": RATES["orphan_contacts"],
            "count": len(self.orphan_contact_ids) + len(self.orphan_opportunity_ids),
            "contact": {"column": "_parentcustomerid_value", "count": len(self.orphan_contact_ids),
                        "ids": self.orphan_contact_ids},
            "opportunity": {"column": "_parentaccountid_value", "count": len(self.orphan_opportunity_ids),
                            "ids": self.orphan_opportunity_ids, "rate": RATES["orphan_opportunities"]},
            "missing_account_ids": self.ghost_accounts,
        }
        self.defects["disabled_users_active_in_crm"] = {
            "count": sum(1 for u in dep if not u.crm_disabled),
            "ids": [u.sys_id for u in dep if not u.crm_disabled],
            "entra_ids": [u.graph_id for u in dep if not u.crm_disabled],
            "rule": "Entra accountEnabled false but systemuser isdisabled false"}
        self.defects["disabled_users_owning_records"] = {
            "count": len(dep_sys), "ids": dep_sys, "entra_ids": [u.graph_id for u in dep],
            "records": owned, "open_opportunities": open_opps,
            "rule": "Entra accountEnabled false and still the owner of CRM rows"}
        dataverse = sum(v for k, v in self.summary.items() if not k.startswith("graph."))
        graph = sum(v for k, v in self.summary.items() if k.startswith("graph."))
        summary: dict[str, Any] = {"collections": dict(sorted(self.summary.items())), "dataverse_rows": dataverse,
                                   "graph_records": graph, "total": dataverse + graph, "seed": self.seed,
                                   "scale": scale if isinstance(scale, str) else "custom",
                                   "anchor": self.anchor_date.isoformat(), "seconds": round(seconds, 3)}
        closed = len(self.opp_truth)
        self.store.set_meta("planted_defects", self.defects)
        self.store.set_meta("company", {
            "name": COMPANY_NAME, "domain": COMPANY_DOMAIN, "seed": self.seed, "scale": summary["scale"],
            "counts": self.counts, "anchor": self.anchor_date.isoformat(),
            "go_live": dt.datetime.fromtimestamp(self.go_live, dt.UTC).date().isoformat(),
            "records": summary["collections"], "dataverse_rows": dataverse, "graph_records": graph,
        })
        self.store.set_meta("generating_model", {
            "outcome": "won with probability sigmoid(z) for closed opportunities; see docs/emulator-company.md",
            "coefficients": {k: v for k, v in MODEL.items() if k != "industry"},
            "industry_effect": {str(k): v for k, v in MODEL["industry"].items()},
            "owner_skill": {u.sys_id: u.skill for u in self.users if u.role in ("rep", "manager") and u.sys_id},
            "closed_opportunities": closed,
            "won": self.won,
            "features": {
                "touches_90d": "email, appointment and phonecall rows whose _regardingobjectid_value is the "
                               "opportunity and whose actualend is in [actualclosedate - 90 days, actualclosedate)",
                "value_base": "estimatedvalue / exchangerate of the opportunity's transactioncurrency",
                "age_days": "(actualclosedate - createdon) in days",
                "q4": "actualclosedate in October, November or December",
            },
        })
        return summary


def generate(store: Store, *, seed: int = 42, scale: str | dict[str, int] = "small",
             anchor: dt.date | str | None = None, integration_defects: bool = True) -> dict[str, Any]:
    """Replace the store's content with the synthetic company and return the record counts.

    Everything (collections, tombstones, meta) except the row-version counter is dropped first, so callers
    that keep their own meta (app registrations) must write it again afterwards.

    Args:
        store: the emulator store to fill.
        seed: the random seed; the same seed and anchor give identical data.
        scale: ``tiny`` (~1k records), ``small`` (~10k), ``medium`` (~100k), ``large`` (1M+ Dataverse
            rows), or a dict of counts (keys of :data:`PRESETS`) laid over ``small``.
        anchor: the "today" of the data (a date or ISO string); history runs three years back from it.
            Defaults to the current UTC date.
        integration_defects: plant the integration-layer defects (False: a clean integration layer, see
            :mod:`bridgekit.emulator.platform`); the business data is the same either way.

    Returns:
        ``{"collections": {name: count}, "dataverse_rows", "graph_records", "total", "seed", "scale",
        "anchor", "seconds"}``.

    Example:
        >>> s = Store(":memory:")
        >>> generate(s, seed=1, scale="tiny", anchor="2026-01-15")["collections"]["systemuser"] > 0
        True
    """
    started = time.perf_counter()
    counts = resolve_counts(scale)
    if anchor is None:
        day = dt.datetime.now(dt.UTC).date()
    elif isinstance(anchor, str):
        day = dt.date.fromisoformat(anchor)
    else:
        day = anchor
    store.drop_all()
    with store.deferred_indexes():
        result = _generate_all(store, seed, scale, counts, day, started, integration_defects)
    # Lookups that live activity follows when a contact is deleted (cascade and "remove link").
    for coll, col in LOOKUP_INDEXES:
        store.ensure_index(coll, col.strip("_"), [col])
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _generate_all(store: Store, seed: int, scale: str | dict[str, int], counts: dict[str, int], day: dt.date,
                  started: float, integration_defects: bool = True) -> dict[str, Any]:
    # Millions of small long-lived objects make the cyclic GC rescan the heap over and over; nothing
    # here creates reference cycles, so pause it for the run.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _generate(store, seed, scale, counts, day, started, integration_defects)
    finally:
        if gc_was_enabled:
            gc.enable()


def _generate(store: Store, seed: int, scale: str | dict[str, int], counts: dict[str, int], day: dt.date,
              started: float, integration_defects: bool = True) -> dict[str, Any]:
    for coll in [*TABLES, *(f"graph.{r}" for r in GRAPH_RESOURCES)]:
        store.ensure_collection(coll)
    g = _Gen(store, seed, counts, day)
    try:
        g.organisation()
        g.reps = [u.idx for u in g.users if u.role == "rep"]
        g.accounts_and_contacts()
        g.opportunities()
        g.other_leads()
        g.background_activities()
        g.write_activities()
        g.graph_mail()
        g.graph_calendar()
        g.graph_contacts()
        generate_platform(g, defects=integration_defects)
    except BaseException:
        g.writer.stop()
        raise
    g.writer.close()
    return g.finish(scale, time.perf_counter() - started)
