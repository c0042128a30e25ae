"""Account health: engagement trends from CRM activity and Graph mail and calendars, and at-risk accounts with reasons.

An account is *at risk* when at least one rule fires (each rule is a reason shown to the user):

* **engagement falling**: interactions in the recent window fell by ``drop`` or more against the window
  before it (from at least ``min_prior`` interactions, so 2 -> 0 does not count as a collapse);
* **stale opportunities**: open deals whose estimated close passed, or that nobody touched, ``stale_days`` ago;
* **silent with open pipeline**: no interaction for ``silent_days`` while a deal is open;
* **open cases**: unresolved service cases (when ``dataverse.incident`` is synced);
* **owner gone**: the account's owner is disabled in Dataverse or in Entra ID (a departed rep).

The risk score adds the rules' weights (a steeper fall weighs more); accounts are ranked by score, then by
the money at stake (open pipeline plus the last year's won revenue).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bridgekit.analytics.features import (
    SqlSource,
    account_features,
    data_time,
    interactions,
    weekly_engagement,
)

__all__ = ["HealthRules", "account_health", "at_risk", "engagement_trend"]


@dataclass(frozen=True)
class HealthRules:
    """Thresholds of the at-risk rules (see the module docstring).

    Attributes:
        recent_days: length of the recent window (the prior window has the same length, just before it).
        drop: relative fall of interactions that counts as "engagement falling" (0.5 = halved).
        min_prior: the prior window needs at least this many interactions for a fall to count.
        stale_days: an open deal is stale when its estimated close, or its last touch, is this old.
        silent_days: no interaction for this long while a deal is open.
    """

    recent_days: int = 90
    drop: float = 0.5
    min_prior: int = 3
    stale_days: int = 30
    silent_days: int = 60


def _money(value: float) -> str:
    return f"{value / 1000:,.0f}k" if abs(value) >= 1000 else f"{value:,.0f}"


def account_health(source: SqlSource, *, as_of: dt.datetime | dt.date | str | None = None,
                   rules: HealthRules = HealthRules(), events: pd.DataFrame | None = None) -> pd.DataFrame:
    """Health of every active account: engagement trend, risk flags, score and readable reasons.

    Args:
        source: a Workbench or Warehouse.
        as_of: the snapshot time (default: the warehouse's data time).
        rules: the thresholds.
        events: the :func:`~bridgekit.analytics.features.interactions` frame, when already loaded.

    Returns:
        :func:`~bridgekit.analytics.features.account_features` columns plus ``change`` (relative change
        of interactions, recent vs prior), ``falling``, ``stale``, ``silent``, ``cases``, ``owner_gone``
        (flags), ``risk_score``, ``at_stake`` (open pipeline + won revenue of the last 365 days),
        ``at_risk`` and ``reasons``; ranked, riskiest first.

    Example:
        >>> health = account_health(wb)                       # doctest: +SKIP
        >>> health[health["at_risk"]].head(10)[["account", "reasons"]]  # doctest: +SKIP
    """
    snapshot = as_of if as_of is not None else data_time(source)
    df = account_features(source, as_of=snapshot, recent_days=rules.recent_days, stale_days=rules.stale_days,
                          events=events)
    prior = df["prior"].astype(float)
    df["change"] = np.where(prior > 0, (df["recent"] - prior) / prior.where(prior > 0, 1.0), np.nan)
    df["falling"] = (df["prior"] >= rules.min_prior) & (df["change"] <= -rules.drop)
    df["stale"] = df["stale_opportunities"] > 0
    silent_for = df["days_since_interaction"].fillna(np.inf)
    df["silent"] = (df["open_opportunities"] > 0) & (silent_for >= rules.silent_days)
    df["cases"] = df["open_cases"] > 0
    df["owner_gone"] = df["owner_disabled"]
    # Weights: a collapse of engagement is the strongest early signal, then deals going stale unattended.
    df["risk_score"] = (df["falling"] * (1.0 + (-df["change"].fillna(0)).clip(0, 1))
                        + df["stale"] * (1.0 + np.log1p(df["stale_opportunities"]))
                        + df["silent"] * 1.0 + df["cases"] * (0.5 + 0.25 * df["open_cases"])
                        + df["owner_gone"] * 1.5)
    df["at_stake"] = df["open_value"] + df["won_value_365d"]
    df["at_risk"] = df["risk_score"] > 0
    df["reasons"] = [_reasons(row, rules) for row in df.itertuples(index=False)]
    df = df.sort_values(["risk_score", "at_stake"], ascending=[False, False]).reset_index(drop=True)
    df.attrs["as_of"] = pd.Timestamp(snapshot)
    return df


def _reasons(row: object, rules: HealthRules) -> str:
    r: Any = row  # a namedtuple from itertuples
    out = []
    if r.falling:
        out.append(f"engagement down {-r.change:.0%} ({r.prior} -> {r.recent} "
                   f"interactions, last {rules.recent_days} days vs the {rules.recent_days} before)")
    if r.stale:
        out.append(f"{r.stale_opportunities} stale open opportunit"
                   f"{'y' if r.stale_opportunities == 1 else 'ies'} "
                   f"({_money(r.stale_value)} past close date or untouched for {rules.stale_days}+ days)")
    if r.silent:
        days = r.days_since_interaction
        out.append("no interaction at all while a deal is open" if not np.isfinite(days) or pd.isna(days)
                   else f"no interaction for {days:.0f} days while a deal is open")
    if r.cases:
        out.append(f"{r.open_cases} open service case(s)")
    if r.owner_gone:
        out.append(f"owner {r.owner} is disabled (left the company?)")
    return "; ".join(out)


def at_risk(health: pd.DataFrame, *, top: int = 20) -> pd.DataFrame:
    """The ranked at-risk accounts with the columns a reader needs."""
    cols = ["account", "owner", "industry_label", "risk_score", "recent", "prior", "open_opportunities",
            "open_value", "at_stake", "reasons"]
    return health[health["at_risk"]].head(top)[cols].reset_index(drop=True)


def engagement_trend(source: SqlSource, *, as_of: dt.datetime | dt.date | str | None = None, weeks: int = 26,
                     accounts: list[object] | None = None, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """Weekly interactions (CRM and Graph) over the last ``weeks`` weeks, per account or company-wide.

    Returns:
        ``week_start``, ``channel`` (``crm``/``graph``), ``n`` and, when ``accounts`` is given,
        ``accountid``.
    """
    snapshot = data_time(source) if as_of is None else pd.Timestamp(as_of).to_pydatetime()
    ev = events if events is not None else interactions(source, until=snapshot)
    weekly = weekly_engagement(ev, as_of=snapshot, weeks=weeks, accounts=accounts)
    if accounts is not None:
        return weekly
    return weekly.groupby(["week_start", "channel"], as_index=False)["n"].sum()
