"""Feature building from the warehouse: opportunities, accounts, owners, CRM activity and Graph engagement.

Every feature of an opportunity is computed *as of* one moment and uses only rows timestamped before it:
a closed opportunity is seen as of its ``actualclosedate`` (the moment its outcome became known), an open
one as of the snapshot time (by default the last sync of ``dataverse.opportunity``). So a model trained on
closed deals sees the same kind of inputs it is later given for the open pipeline, and nothing from after
an outcome leaks into the features that predict it.

Sources (the layout :mod:`bridgekit.sync` fills):

* ``dataverse.opportunity`` / ``account`` / ``systemuser`` / ``team`` / ``transactioncurrency``: the deal,
  its customer, its owner and the base-currency value (``estimatedvalue / exchangerate``, as Dataverse
  derives ``estimatedvalue_base``: https://learn.microsoft.com/power-apps/developer/data-platform/transaction-currency-currency-entity).
* ``dataverse.email`` / ``appointment`` / ``phonecall``: *touches*, completed activities whose
  ``regardingobjectid`` is the opportunity, timed by ``actualend``.
* ``graph.messages`` / ``graph.events``: Graph engagement, mails and meetings between the owner's team
  (the CRM users of the owner's business unit, matched to Entra by ``azureactivedirectoryobjectid``) and
  the account's contacts (matched by e-mail address), each mail or meeting counted once.

Tables that are not synced are treated as empty (the features are 0), so the same code runs on a tenant
that only syncs Dataverse; :func:`missing_sources` says which ones were absent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from bridgekit.errors import InsufficientDataError

__all__ = [
    "DEFAULT_WINDOWS",
    "ENGAGEMENT_WINDOW",
    "InsufficientDataError",
    "SqlSource",
    "account_features",
    "data_time",
    "interactions",
    "missing_sources",
    "opportunity_features",
    "summarize",
    "table_names",
    "weekly_engagement",
]

#: Trailing windows (days) the activity and engagement counts are computed over.
DEFAULT_WINDOWS: tuple[int, ...] = (30, 90, 180)
#: The window the win model reads its engagement features from.
ENGAGEMENT_WINDOW = 90

# What each feature family reads; absent tables are replaced by empty relations.
_NEEDED = ("dataverse.opportunity", "dataverse.account", "dataverse.systemuser")
_OPTIONAL = ("dataverse.team", "dataverse.transactioncurrency", "dataverse.contact", "dataverse.email",
             "dataverse.appointment", "dataverse.phonecall", "dataverse.task", "graph.messages", "graph.events",
             "graph.users")
_TOUCH_KINDS = ("email", "appointment", "phonecall")


class SqlSource(Protocol):
    """Anything with ``sql(query, params) -> pandas.DataFrame``: a Workbench or a Warehouse."""

    def sql(self, query: str, params: Any = None) -> Any:  # pragma: no cover - protocol
        """Run a read-only query."""


def table_names(source: SqlSource) -> set[str]:
    """``schema.table`` of every table in the warehouse."""
    df = source.sql("SELECT schema_name || '.' || table_name AS t FROM duckdb_tables()")
    return set(df["t"].tolist())


def missing_sources(source: SqlSource) -> list[str]:
    """The optional source tables (activities, Graph mail and calendars ...) that are not in the warehouse."""
    have = table_names(source)
    return [t for t in _OPTIONAL if t not in have]


def _require(have: set[str], needed: Sequence[str]) -> None:
    absent = [t for t in needed if t not in have]
    if absent:
        raise InsufficientDataError(f"the warehouse has no {', '.join(absent)}")


def data_time(source: SqlSource) -> dt.datetime:
    """The moment the warehouse describes: the latest ``modifiedon`` of ``dataverse.opportunity`` (UTC).

    Capped at the last sync of the table. Open opportunities are scored as of this time, so a warehouse
    synced a week ago (or a tenant copied from a backup) is analysed as it was then, not as if a week of
    silence had passed.
    """
    _require(table_names(source), ("dataverse.opportunity",))
    df = source.sql("SELECT least(max(modifiedon), max(_bk_synced_at)) AS t, max(modifiedon) AS m "
                    "FROM dataverse.opportunity")
    value = df["t"].iloc[0]
    if pd.isna(value):
        value = df["m"].iloc[0]
    if pd.isna(value):
        raise InsufficientDataError("dataverse.opportunity is empty")
    stamp: dt.datetime = pd.Timestamp(value).tz_convert("UTC").to_pydatetime()
    return stamp


def _utc(value: dt.datetime | dt.date | str | None, source: SqlSource) -> dt.datetime:
    if value is None:
        return data_time(source)
    ts = pd.Timestamp(value)
    stamp: dt.datetime = (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()
    return stamp


def _rel(have: set[str], table: str, select: str, empty: str) -> str:
    """``select`` when ``table`` exists, else a typed empty relation with the same columns."""
    return select if table in have else f"SELECT {empty} WHERE false"


def _touch_sql(have: set[str], *, regarding: str) -> str:
    parts = [
        f"SELECT regardingobjectid AS rid, actualend AS ts, '{k}' AS kind FROM dataverse.{k} "
        f"WHERE regardingobjectid_entitytype = '{regarding}' AND actualend IS NOT NULL"
        for k in _TOUCH_KINDS if f"dataverse.{k}" in have
    ]
    return " UNION ALL ".join(parts) or "SELECT NULL::UUID AS rid, NULL::TIMESTAMPTZ AS ts, NULL::VARCHAR AS kind WHERE false"


def _graph_ctes(have: set[str]) -> str:
    """CTEs ``addr`` (contact address -> account), ``mbx`` (mailbox -> business unit), ``gmail``, ``gmeet``.

    ``gmail``/``gmeet`` hold one row per (business unit, account, mail or meeting): a mail that sits in
    two team members' mailboxes (sender and recipient) counts once, by ``internetMessageId``/``iCalUId``.
    """
    addr = _rel(have, "dataverse.contact",
                "SELECT DISTINCT lower(trim(emailaddress1)) AS address, parentcustomerid AS accountid "
                "FROM dataverse.contact WHERE parentcustomerid IS NOT NULL "
                "AND parentcustomerid_entitytype = 'account' AND emailaddress1 LIKE '%_@_%'",
                "NULL::VARCHAR AS address, NULL::UUID AS accountid")
    mbx = ("SELECT lower(CAST(azureactivedirectoryobjectid AS VARCHAR)) AS user_id, businessunitid AS bu "
           "FROM dataverse.systemuser WHERE azureactivedirectoryobjectid IS NOT NULL")
    mail_party = _rel(
        have, "graph.messages",
        "SELECT lower(user_id) AS user_id, coalesce(internetMessageId, id) AS key, "
        "coalesce(sentDateTime, receivedDateTime) AS ts, "
        "lower(trim(unnest(list_concat([from_address], coalesce(to_addresses, []), "
        "coalesce(cc_addresses, []))))) AS address FROM graph.messages WHERE NOT coalesce(isDraft, false)",
        "NULL::VARCHAR AS user_id, NULL::VARCHAR AS key, NULL::TIMESTAMPTZ AS ts, NULL::VARCHAR AS address")
    meet_party = _rel(
        have, "graph.events",
        "SELECT lower(user_id) AS user_id, coalesce(iCalUId, id) AS key, start_utc AS ts, "
        "lower(trim(unnest(list_concat([organizer_address], coalesce(attendee_addresses, []))))) AS address "
        "FROM graph.events WHERE NOT coalesce(isCancelled, false)",
        "NULL::VARCHAR AS user_id, NULL::VARCHAR AS key, NULL::TIMESTAMPTZ AS ts, NULL::VARCHAR AS address")
    return f"""
addr AS ({addr}),
mbx AS ({mbx}),
mail_party AS ({mail_party}),
meet_party AS ({meet_party}),
gmail AS (SELECT b.bu, a.accountid, p.key, min(p.ts) AS ts FROM mail_party p
          JOIN mbx b ON b.user_id = p.user_id JOIN addr a ON a.address = p.address GROUP BY ALL),
gmeet AS (SELECT b.bu, a.accountid, p.key, min(p.ts) AS ts FROM meet_party p
          JOIN mbx b ON b.user_id = p.user_id JOIN addr a ON a.address = p.address GROUP BY ALL)"""


def _windowed(alias: str, ts: str, anchor: str, windows: Sequence[int], prefix: str, distinct: str = "*") -> str:
    """Count columns ``<prefix>_<w>d`` for each window (``distinct`` counts a key once)."""
    agg = "count(*)" if distinct == "*" else f"count(DISTINCT {distinct})"
    return ", ".join(
        f"{agg} FILTER (WHERE {alias}.{ts} >= {anchor} - INTERVAL {int(w)} DAY) AS {prefix}_{int(w)}d"
        for w in windows)


def opportunity_features(source: SqlSource, *, as_of: dt.datetime | dt.date | str | None = None,
                         windows: Sequence[int] = DEFAULT_WINDOWS) -> pd.DataFrame:
    """One row per opportunity (open and closed) with its features as of its own moment.

    Args:
        source: a Workbench or Warehouse (anything with ``sql``).
        as_of: the snapshot time for open opportunities (default :func:`data_time`); open opportunities
            created after it are left out. Closed ones are always seen as of their close.
        windows: trailing windows in days for the touch and engagement counts.

    Returns:
        A DataFrame with identifiers (``opportunityid``, ``name``, ``accountid``, ``account``,
        ``ownerid``, ``owner``), outcome (``status`` won/lost/open, ``won`` 1/0/NA, ``as_of``,
        ``actualclosedate``, ``estimatedclosedate``, ``close_month``), opportunity features
        (``value`` in base currency, ``actual_value``, ``age_days``, ``closes_in_q4``, ``salesstage``,
        ``stepname``, ``closeprobability``, ``has_budget``, ``from_lead``), account features
        (``industry``, ``industry_label``, ``employees``, ``account_age_days``, ``account_prior_won``,
        ``account_prior_closed``), owner features (``owner_prior_won``, ``owner_prior_closed``,
        ``owner_win_rate``, ``owner_disabled``), CRM activity (``touches_<w>d``, ``touches_total``,
        ``days_since_touch``) and Graph engagement (``mails_<w>d``, ``meetings_<w>d``).

    Raises:
        InsufficientDataError: opportunity, account or systemuser is not in the warehouse.

    Example:
        >>> feats = opportunity_features(wb)                  # doctest: +SKIP
        >>> feats.groupby("status")["touches_90d"].mean()     # doctest: +SKIP
    """
    have = table_names(source)
    _require(have, _NEEDED)
    wins = sorted({int(w) for w in windows} | {ENGAGEMENT_WINDOW})
    if wins[0] <= 0:
        raise ValueError("windows must be positive numbers of days")
    snapshot = _utc(as_of, source)
    longest = wins[-1]
    cur = _rel(have, "dataverse.transactioncurrency",
               "SELECT transactioncurrencyid, CAST(exchangerate AS DOUBLE) AS rate FROM dataverse.transactioncurrency",
               "NULL::UUID AS transactioncurrencyid, NULL::DOUBLE AS rate")
    team = _rel(have, "dataverse.team", "SELECT teamid, businessunitid FROM dataverse.team",
                "NULL::UUID AS teamid, NULL::UUID AS businessunitid")
    entra = _rel(have, "graph.users", 'SELECT lower(id) AS user_id, "accountEnabled" AS enabled FROM graph.users',
                 "NULL::VARCHAR AS user_id, NULL::BOOLEAN AS enabled")
    query = f"""
WITH
cur AS ({cur}),
team AS ({team}),
entra AS ({entra}),
opp AS (
  SELECT o.opportunityid, o.name, o.parentaccountid AS accountid, o.ownerid, o.statecode, o.salesstage,
         o.stepname, o.createdon, o.actualclosedate, o.estimatedclosedate, o.closeprobability,
         o.budgetamount IS NOT NULL AS has_budget, o.originatingleadid IS NOT NULL AS from_lead,
         CAST(o.estimatedvalue AS DOUBLE) / coalesce(c.rate, 1.0) AS value,
         CAST(o.actualvalue AS DOUBLE) / coalesce(c.rate, 1.0) AS actual_value,
         CASE o.statecode WHEN 1 THEN 'won' WHEN 2 THEN 'lost' ELSE 'open' END AS status,
         CASE WHEN o.statecode IN (1, 2) THEN o.actualclosedate ELSE $as_of::TIMESTAMPTZ END AS as_of,
         coalesce(u.businessunitid, t.businessunitid, o.owningbusinessunit) AS team_bu,
         u.fullname AS owner, coalesce(u.isdisabled, false) OR coalesce(NOT e.enabled, false) AS owner_disabled
  FROM dataverse.opportunity o
  LEFT JOIN cur c ON c.transactioncurrencyid = o.transactioncurrencyid
  LEFT JOIN dataverse.systemuser u ON u.systemuserid = o.ownerid
  LEFT JOIN team t ON t.teamid = o.ownerid
  LEFT JOIN entra e ON e.user_id = lower(CAST(u.azureactivedirectoryobjectid AS VARCHAR))
  WHERE (o.statecode IN (1, 2) AND o.actualclosedate IS NOT NULL)
     OR (o.statecode = 0 AND o.createdon < $as_of::TIMESTAMPTZ)
),
touch_src AS ({_touch_sql(have, regarding="opportunity")}),
touch AS (
  SELECT o.opportunityid, {_windowed("a", "ts", "o.as_of", wins, "touches")},
         count(*) AS touches_total, max(a.ts) AS last_touch
  FROM opp o JOIN touch_src a ON a.rid = o.opportunityid AND a.ts < o.as_of
  GROUP BY 1
),
{_graph_ctes(have)},
mails AS (
  SELECT o.opportunityid, {_windowed("m", "ts", "o.as_of", wins, "mails", "m.key")}
  FROM opp o JOIN gmail m ON m.accountid = o.accountid AND m.bu = o.team_bu
   AND m.ts < o.as_of AND m.ts >= o.as_of - INTERVAL {longest} DAY
  GROUP BY 1
),
meets AS (
  SELECT o.opportunityid, {_windowed("m", "ts", "o.as_of", wins, "meetings", "m.key")}
  FROM opp o JOIN gmeet m ON m.accountid = o.accountid AND m.bu = o.team_bu
   AND m.ts < o.as_of AND m.ts >= o.as_of - INTERVAL {longest} DAY
  GROUP BY 1
),
-- Running win/close counts by close day (peers share a value, so ties on a day are all in or all out).
closed AS (SELECT ownerid, accountid, as_of AS closed_at, (status = 'won')::INT AS won FROM opp WHERE status <> 'open'),
by_owner AS (SELECT ownerid, closed_at,
               sum(won) OVER (PARTITION BY ownerid ORDER BY closed_at) AS prior_won,
               count(*) OVER (PARTITION BY ownerid ORDER BY closed_at) AS prior_closed FROM closed),
by_account AS (SELECT accountid, closed_at,
               sum(won) OVER (PARTITION BY accountid ORDER BY closed_at) AS prior_won,
               count(*) OVER (PARTITION BY accountid ORDER BY closed_at) AS prior_closed FROM closed),
by_all AS (SELECT closed_at, sum(won) OVER (ORDER BY closed_at) AS prior_won,
               count(*) OVER (ORDER BY closed_at) AS prior_closed FROM closed),
hist AS (
  SELECT o.opportunityid,
         coalesce(bo.prior_won, 0) AS owner_prior_won, coalesce(bo.prior_closed, 0) AS owner_prior_closed
  FROM opp o ASOF LEFT JOIN by_owner bo ON bo.ownerid = o.ownerid AND o.as_of > bo.closed_at
),
ahist AS (
  SELECT o.opportunityid,
         coalesce(ba.prior_won, 0) AS account_prior_won, coalesce(ba.prior_closed, 0) AS account_prior_closed
  FROM opp o ASOF LEFT JOIN by_account ba ON ba.accountid = o.accountid AND o.as_of > ba.closed_at
),
ghist AS (
  SELECT o.opportunityid, coalesce(g.prior_won, 0) AS all_prior_won, coalesce(g.prior_closed, 0) AS all_prior_closed
  FROM opp o ASOF LEFT JOIN by_all g ON o.as_of > g.closed_at
)
SELECT o.opportunityid, o.name, o.accountid, a.name AS account, o.ownerid, o.owner, o.status, o.as_of,
       o.createdon, o.actualclosedate, o.estimatedclosedate, o.value, o.actual_value, o.salesstage, o.stepname,
       o.closeprobability, o.has_budget, o.from_lead, o.owner_disabled,
       a.industrycode AS industry, a.industrycode_label AS industry_label, a.numberofemployees AS employees,
       a.createdon AS account_createdon,
       {", ".join(f"coalesce(t.touches_{w}d, 0) AS touches_{w}d" for w in wins)},
       coalesce(t.touches_total, 0) AS touches_total, t.last_touch,
       {", ".join(f"coalesce(m.mails_{w}d, 0) AS mails_{w}d" for w in wins)},
       {", ".join(f"coalesce(e.meetings_{w}d, 0) AS meetings_{w}d" for w in wins)},
       h.owner_prior_won, h.owner_prior_closed, ah.account_prior_won, ah.account_prior_closed,
       g.all_prior_won, g.all_prior_closed
FROM opp o
LEFT JOIN dataverse.account a ON a.accountid = o.accountid
LEFT JOIN touch t USING (opportunityid)
LEFT JOIN mails m USING (opportunityid)
LEFT JOIN meets e USING (opportunityid)
LEFT JOIN hist h USING (opportunityid)
LEFT JOIN ahist ah USING (opportunityid)
LEFT JOIN ghist g USING (opportunityid)
ORDER BY o.as_of, o.opportunityid
"""
    df = source.sql(query, {"as_of": snapshot})
    return _finish_opportunities(df, wins)


def _days(later: pd.Series, earlier: pd.Series) -> pd.Series:
    return (later - earlier).dt.total_seconds() / 86400.0


def _finish_opportunities(df: pd.DataFrame, wins: Sequence[int]) -> pd.DataFrame:
    """Derived columns: outcome flag, ages, Q4 flag, shrunk owner win rate, tidy dtypes."""
    for col in ("as_of", "createdon", "actualclosedate", "estimatedclosedate", "account_createdon", "last_touch"):
        df[col] = pd.to_datetime(df[col], utc=True)
    df["won"] = df["status"].map({"won": 1, "lost": 0}).astype("Int64")
    df["age_days"] = _days(df["as_of"], df["createdon"]).clip(lower=0)
    df["account_age_days"] = _days(df["as_of"], df["account_createdon"]).clip(lower=0)
    df["days_since_touch"] = _days(df["as_of"], df["last_touch"])
    # The quarter the deal closes in: the actual close, or the expected one for open deals.
    closes = df["actualclosedate"].where(df["status"] != "open", df["estimatedclosedate"])
    df["closes_in_q4"] = (closes.dt.quarter == 4).astype(int)
    df["close_month"] = closes.dt.tz_convert("UTC").dt.tz_localize(None).dt.to_period("M").dt.to_timestamp()
    # Owner win rate before the deal, shrunk toward the company rate so far (a new rep starts at the
    # company average instead of 0/0): (won + k * p) / (closed + k) with k = 10 deals.
    k = 10.0
    base = (df["all_prior_won"] + 1.0) / (df["all_prior_closed"] + 2.0)
    df["owner_win_rate"] = (df["owner_prior_won"] + k * base) / (df["owner_prior_closed"] + k)
    df["account_win_rate"] = (df["account_prior_won"] + 2.0 * base) / (df["account_prior_closed"] + 2.0)
    df["industry"] = df["industry"].astype("Int64")
    df["industry_label"] = df["industry_label"].fillna("(none)")
    df["employees"] = df["employees"].astype(float)
    for col in ("value", "actual_value"):
        df[col] = df[col].astype(float)
    for w in wins:
        for prefix in ("touches", "mails", "meetings"):
            df[f"{prefix}_{w}d"] = df[f"{prefix}_{w}d"].astype(int)
    df["touches_total"] = df["touches_total"].astype(int)
    df["owner"] = df["owner"].fillna("(unknown)")
    df["account"] = df["account"].fillna("(missing account)")
    df["owner_disabled"] = df["owner_disabled"].fillna(False).astype(bool)
    return df.drop(columns=["all_prior_won", "all_prior_closed"]).reset_index(drop=True)


def interactions(source: SqlSource, *, since: dt.datetime | dt.date | str | None = None,
                 until: dt.datetime | dt.date | str | None = None) -> pd.DataFrame:
    """Every customer interaction per account: CRM activities and Graph mail and meetings, one row each.

    CRM activities count when they regard the account, one of its contacts or one of its opportunities
    (completed ones, timed by ``actualend``). Graph mail and meetings count when a party is one of the
    account's contacts and the mailbox belongs to a CRM user; a message seen in two mailboxes counts once.
    A Graph mail that is also tracked in CRM counts in both channels (they are different signals: the CRM
    row says someone tracked it).

    Args:
        since: only interactions at or after this time (default: all).
        until: only interactions before this time (default: :func:`data_time`).

    Returns:
        Columns ``accountid``, ``ts`` (UTC), ``channel`` (``crm_email``, ``crm_appointment``,
        ``crm_phonecall``, ``crm_task``, ``mail``, ``meeting``), ``source`` (``dataverse``/``graph``).
    """
    have = table_names(source)
    _require(have, _NEEDED)
    end = _utc(until, source)
    start = _utc(since, source) if since is not None else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    crm_parts = []
    for kind in (*_TOUCH_KINDS, "task"):
        if f"dataverse.{kind}" not in have:
            continue
        crm_parts.append(f"SELECT regardingobjectid AS rid, regardingobjectid_entitytype AS rtype, actualend AS ts, "
                         f"'crm_{kind}' AS channel FROM dataverse.{kind} WHERE actualend IS NOT NULL")
    crm = " UNION ALL ".join(crm_parts) or (
        "SELECT NULL::UUID AS rid, NULL::VARCHAR AS rtype, NULL::TIMESTAMPTZ AS ts, NULL::VARCHAR AS channel WHERE false")
    contact = _rel(have, "dataverse.contact",
                   "SELECT contactid, parentcustomerid FROM dataverse.contact WHERE parentcustomerid_entitytype = 'account'",
                   "NULL::UUID AS contactid, NULL::UUID AS parentcustomerid")
    query = f"""
WITH crm AS ({crm}),
contact AS ({contact}),
{_graph_ctes(have)},
crm_acc AS (
  SELECT coalesce(CASE WHEN c.rtype = 'account' THEN c.rid END, ct.parentcustomerid, o.parentaccountid) AS accountid,
         c.ts, c.channel, 'dataverse' AS source
  FROM crm c
  LEFT JOIN contact ct ON c.rtype = 'contact' AND ct.contactid = c.rid
  LEFT JOIN dataverse.opportunity o ON c.rtype = 'opportunity' AND o.opportunityid = c.rid
)
SELECT accountid, ts, channel, source FROM crm_acc WHERE accountid IS NOT NULL AND ts >= $since AND ts < $until
UNION ALL
SELECT DISTINCT ON (accountid, key) accountid, ts, 'mail', 'graph' FROM gmail WHERE ts >= $since AND ts < $until
UNION ALL
SELECT DISTINCT ON (accountid, key) accountid, ts, 'meeting', 'graph' FROM gmeet WHERE ts >= $since AND ts < $until
"""
    df = source.sql(query, {"since": start, "until": end})
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    return df.sort_values(["accountid", "ts"]).reset_index(drop=True)


def account_features(source: SqlSource, *, as_of: dt.datetime | dt.date | str | None = None,
                     recent_days: int = 90, stale_days: int = 30,
                     events: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per active account: engagement now and before, open pipeline, stale deals, owner state.

    Args:
        as_of: the snapshot time (default :func:`data_time`).
        recent_days: the length of the recent window; the prior window is the same length just before it.
        stale_days: an open opportunity is *stale* when its estimated close date passed more than this
            many days ago, or it had no completed activity for that long (and was created before that).
        events: the :func:`interactions` frame when the caller already has it.

    Returns:
        Columns ``accountid``, ``account``, ``industry_label``, ``ownerid``, ``owner``, ``owner_disabled``,
        ``recent`` and ``prior`` (interaction counts), ``recent_graph``/``prior_graph`` (the Graph part),
        ``last_interaction``, ``days_since_interaction``, ``open_opportunities``, ``open_value`` (base
        currency), ``stale_opportunities``, ``stale_value``, ``open_cases`` (0 when ``incident`` is not
        synced), ``won_value_365d``.
    """
    have = table_names(source)
    _require(have, _NEEDED)
    snapshot = _utc(as_of, source)
    ev = events if events is not None else interactions(source, until=snapshot)
    ev = ev[ev["ts"] < pd.Timestamp(snapshot)]
    recent_start = pd.Timestamp(snapshot) - pd.Timedelta(days=recent_days)
    prior_start = recent_start - pd.Timedelta(days=recent_days)
    is_graph = ev["source"] == "graph"
    agg = pd.DataFrame({
        "recent": ev[ev["ts"] >= recent_start].groupby("accountid").size(),
        "prior": ev[(ev["ts"] >= prior_start) & (ev["ts"] < recent_start)].groupby("accountid").size(),
        "recent_graph": ev[is_graph & (ev["ts"] >= recent_start)].groupby("accountid").size(),
        "prior_graph": ev[is_graph & (ev["ts"] >= prior_start) & (ev["ts"] < recent_start)].groupby("accountid").size(),
        "last_interaction": ev.groupby("accountid")["ts"].max(),
    })
    cur = _rel(have, "dataverse.transactioncurrency",
               "SELECT transactioncurrencyid, CAST(exchangerate AS DOUBLE) AS rate FROM dataverse.transactioncurrency",
               "NULL::UUID AS transactioncurrencyid, NULL::DOUBLE AS rate")
    touch = _touch_sql(have, regarding="opportunity")
    cases = _rel(have, "dataverse.incident",
                 "SELECT customerid AS accountid, count(*) AS n FROM dataverse.incident WHERE statecode = 0 GROUP BY 1",
                 "NULL::UUID AS accountid, NULL::BIGINT AS n")
    entra = _rel(have, "graph.users", 'SELECT lower(id) AS user_id, "accountEnabled" AS enabled FROM graph.users',
                 "NULL::VARCHAR AS user_id, NULL::BOOLEAN AS enabled")
    query = f"""
WITH cur AS ({cur}), touch AS ({touch}), cases AS ({cases}), entra AS ({entra}),
last_touch AS (SELECT rid, max(ts) AS ts FROM touch WHERE ts < $as_of GROUP BY 1),
opp AS (
  SELECT o.parentaccountid AS accountid, o.statecode, o.createdon, o.actualclosedate, o.estimatedclosedate,
         CAST(coalesce(o.actualvalue, o.estimatedvalue) AS DOUBLE) / coalesce(c.rate, 1.0) AS value,
         lt.ts AS last_touch
  FROM dataverse.opportunity o LEFT JOIN cur c ON c.transactioncurrencyid = o.transactioncurrencyid
  LEFT JOIN last_touch lt ON lt.rid = o.opportunityid
  WHERE o.createdon < $as_of
),
pipe AS (
  SELECT accountid,
         count(*) FILTER (WHERE statecode = 0) AS open_opportunities,
         coalesce(sum(value) FILTER (WHERE statecode = 0), 0) AS open_value,
         count(*) FILTER (WHERE statecode = 0 AND (estimatedclosedate < $as_of - INTERVAL {int(stale_days)} DAY
             OR (coalesce(last_touch, createdon) < $as_of - INTERVAL {int(stale_days)} DAY))) AS stale_opportunities,
         coalesce(sum(value) FILTER (WHERE statecode = 0 AND (estimatedclosedate < $as_of - INTERVAL {int(stale_days)} DAY
             OR (coalesce(last_touch, createdon) < $as_of - INTERVAL {int(stale_days)} DAY))), 0) AS stale_value,
         coalesce(sum(value) FILTER (WHERE statecode = 1 AND actualclosedate >= $as_of - INTERVAL 365 DAY), 0)
             AS won_value_365d
  FROM opp GROUP BY 1
)
SELECT a.accountid, a.name AS account, a.industrycode_label AS industry_label, a.ownerid,
       coalesce(u.fullname, tm.name) AS owner,
       coalesce(u.isdisabled, false) OR coalesce(NOT e.enabled, false) AS owner_disabled,
       a.createdon, coalesce(p.open_opportunities, 0) AS open_opportunities,
       coalesce(p.open_value, 0) AS open_value, coalesce(p.stale_opportunities, 0) AS stale_opportunities,
       coalesce(p.stale_value, 0) AS stale_value, coalesce(cs.n, 0) AS open_cases,
       coalesce(p.won_value_365d, 0) AS won_value_365d
FROM dataverse.account a
LEFT JOIN dataverse.systemuser u ON u.systemuserid = a.ownerid
LEFT JOIN {"dataverse.team" if "dataverse.team" in have else "(SELECT NULL::UUID AS teamid, NULL::VARCHAR AS name WHERE false)"} tm
       ON tm.teamid = a.ownerid
LEFT JOIN entra e ON e.user_id = lower(CAST(u.azureactivedirectoryobjectid AS VARCHAR))
LEFT JOIN pipe p ON p.accountid = a.accountid
LEFT JOIN cases cs ON cs.accountid = a.accountid
WHERE a.statecode = 0 AND a.createdon < $as_of
ORDER BY a.name, a.accountid
"""
    df = source.sql(query, {"as_of": snapshot})
    df = df.join(agg, on="accountid")
    for col in ("recent", "prior", "recent_graph", "prior_graph"):
        df[col] = df[col].fillna(0).astype(int)
    for col in ("open_value", "stale_value", "won_value_365d"):
        df[col] = df[col].astype(float)
    for col in ("open_opportunities", "stale_opportunities", "open_cases"):
        df[col] = df[col].astype(int)
    df["last_interaction"] = pd.to_datetime(df["last_interaction"], utc=True)
    df["days_since_interaction"] = _days(pd.Series(pd.Timestamp(snapshot), index=df.index), df["last_interaction"])
    df["owner"] = df["owner"].fillna("(unknown)")
    df["owner_disabled"] = df["owner_disabled"].fillna(False).astype(bool)
    df["industry_label"] = df["industry_label"].fillna("(none)")
    df.attrs["as_of"] = snapshot
    df.attrs["recent_days"] = recent_days
    return df.reset_index(drop=True)


def weekly_engagement(events: pd.DataFrame, *, as_of: dt.datetime, weeks: int = 26,
                      accounts: Sequence[Any] | None = None) -> pd.DataFrame:
    """Interactions per account per week over the last ``weeks`` weeks (weeks end at ``as_of``).

    Returns:
        Long form: ``accountid``, ``week_start`` (UTC, naive), ``channel`` group (``crm``/``graph``), ``n``.
    """
    end = pd.Timestamp(as_of).ceil("D")  # whole days, so weeks start at midnight
    start = end - pd.Timedelta(weeks=weeks)
    ev = events[(events["ts"] >= start) & (events["ts"] < end)]
    if accounts is not None:
        ev = ev[ev["accountid"].isin(list(accounts))]
    week = ((ev["ts"] - start) // pd.Timedelta(weeks=1)).astype(int)
    out = pd.DataFrame({
        "accountid": ev["accountid"].to_numpy(),
        "week_start": (start + pd.to_timedelta(week * 7, unit="D")).dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(),
        "channel": np.where(ev["source"] == "graph", "graph", "crm"),
    })
    return out.groupby(["accountid", "week_start", "channel"]).size().rename("n").reset_index()


def summarize(frame: pd.DataFrame, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Mean of selected feature columns by outcome (a quick look at what separates won from lost)."""
    cols = dict(columns or {"touches_90d": "CRM touches, 90 d", "mails_90d": "Graph mails, 90 d",
                            "meetings_90d": "Graph meetings, 90 d", "value": "deal value (base currency)",
                            "age_days": "age at close (days)", "owner_win_rate": "owner's prior win rate"})
    closed = frame[frame["status"] != "open"]
    out = closed.groupby("status")[list(cols)].mean().T
    out.index = [cols[c] for c in out.index]
    return out
