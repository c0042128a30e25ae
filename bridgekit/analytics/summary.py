"""The analytics notebooks' reports: executive summaries, explained figures and readable tables.

Each notebook computes first, then shows :func:`executive_summary` (the few numbers that matter, each in a
sentence a customer's analyst can act on), then the detail: every chart and table followed by
:func:`explain` (what it means, what to do with it). Amounts are in the organisation's base currency
(:func:`base_currency`), probabilities are percentages, and no table shows an index or a raw float.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from bridgekit import report
from bridgekit.analytics.features import SqlSource, table_names

__all__ = [
    "Point",
    "base_currency",
    "comparison_table",
    "drivers_table",
    "executive_summary",
    "explain",
    "forecast_points",
    "forecast_tables",
    "health_points",
    "health_table",
    "leakage_table",
    "money_of",
    "opportunity_table",
    "pipeline_table",
    "quality_points",
    "reason_counts",
    "style",
    "win_points",
]

#: One line of an executive summary: a headline figure, what it means, and what to do (may be empty).
Point = tuple[str, str, str]

REASON_LABELS = {"falling": "engagement falling", "stale": "stale open deals", "silent": "silent while a deal is open",
                 "cases": "open support cases", "owner_gone": "owner disabled in Entra"}


def base_currency(source: SqlSource) -> str:
    """The ISO code of the currency whose exchange rate is 1 (Dataverse's base currency), or ``""``."""
    if "dataverse.transactioncurrency" not in table_names(source):
        return ""
    rows = source.sql("SELECT isocurrencycode FROM dataverse.transactioncurrency WHERE exchangerate = 1 LIMIT 1")
    return str(rows["isocurrencycode"].iloc[0]) if len(rows) else ""


def money_of(currency: str) -> Any:
    """A formatter for amounts in ``currency`` (``$1,234``), or plain grouped numbers when it is unknown."""
    return (lambda v: report.money(v, currency)) if currency else (lambda v: report.num(v, 0))


def explain(meaning: str, action: str = "") -> report.Html:
    """The sentence under a chart or table: what it means and, when there is one, what to do with it."""
    todo = f' <b>What to do:</b> {html.escape(action)}' if action else ""
    return report.Html(f'<p class="bk-explain" style="margin:0.2em 0 1.4em;max-width:60em">'
                       f"<b>What it means:</b> {html.escape(meaning)}{todo}</p>")


def executive_summary(points: Sequence[Point], *, as_of: dt.datetime | None = None, profile: str = "",
                      scope: str = "") -> report.Html:
    """The report's first section: data as of, then each point as a headline with its meaning and action."""
    when = f"Data as of {as_of:%Y-%m-%d %H:%M} UTC" if as_of is not None else ""
    lead = "; ".join(x for x in (when, f"profile {profile}" if profile else "", scope) if x)
    items = "".join(
        f"<li style='margin-bottom:0.5em'><b>{html.escape(head)}</b> {html.escape(meaning)}"
        + (f" <i>Next step:</i> {html.escape(action)}" if action else "") + "</li>"
        for head, meaning, action in points)
    return report.section("Executive summary", f"<p>{html.escape(lead)}.</p>" if lead else "",
                          f"<ul style='max-width:62em'>{items}</ul>", page_break=False, anchor="summary")


def style(fig: Any, *, log_x: bool = False, percent_y: bool = False, percent_x: bool = False,
          height: int | None = 460) -> Any:
    """:func:`bridgekit.report.style_figure`, plus: a log axis labelled by powers of ten only (no 2..9 clutter),
    percentages on a fraction axis."""
    report.style_figure(fig, height=height)
    if log_x:
        fig.update_xaxes(dtick=1, tickformat="~s")
    if percent_y:
        fig.update_yaxes(tickformat=".0%")
    if percent_x:
        fig.update_xaxes(tickformat=".0%")
    return fig


# -- win probability ---------------------------------------------------------------------------------------


def win_points(model: Any, scored: pd.DataFrame, *, currency: str, comparison: pd.DataFrame | None = None,
               risk_below: float = 0.35) -> list[Point]:
    """The win-probability report's summary: model quality, the pipeline's expected value, the deals at risk,
    the strongest driver and (on the emulator) whether the drivers match the generating model."""
    m, fmt = model.metrics, money_of(currency)
    auc, base = float(m["auc"]), float(m["baseline_auc"])
    drivers = model.drivers()
    top = drivers.iloc[0]
    risky = scored[scored["win_probability"] < risk_below]
    points: list[Point] = [
        (f"The model ranks deals better than the stage-and-industry rule of thumb: AUC {auc:.2f} against {base:.2f}.",
         f"Given a deal that was won and one that was lost among the {int(m['n_test']):,} deals closed since "
         f"{model.split_date:%Y-%m-%d} (not used for training), the model puts the won one higher "
         f"{auc:.0%} of the time; the rule of thumb {base:.0%} (a coin toss is 50%).",
         "use the model's probability, not the CRM's stage percentage, to rank deals for pipeline reviews."
         if auc - base >= 0.05 else "treat the scores as a rough ranking only; the model adds little here."),
        (f"{len(scored):,} open deals worth {fmt(scored['value'].sum())} are expected to bring "
         f"{fmt(scored['expected_value'].sum())}.",
         "The expected amount is each deal's value times its win probability, added up; it is what the open "
         "pipeline is worth on today's evidence.",
         "plan on the expected amount, not the pipeline total."),
        (f"{len(risky):,} deals ({fmt(risky['value'].sum())}) have less than a {risk_below:.0%} chance of winning.",
         "They are listed under \"Deals most at risk\" with the reasons the model sees.",
         "review the largest ones with their owners this week: re-engage the customer or close them as lost."),
        (f"The strongest driver of a win is {top['label']}.",
         f"Shuffling it costs the model {top['importance'] * 100:.1f} AUC points; it "
         f"{'raises' if top['effect'] == 'raises' else 'lowers' if top['effect'] == 'lowers' else 'changes'} "
         "the odds of winning.",
         "make sure every deal's activities are logged in the CRM, so this signal stays reliable."
         if "touch" in str(top["feature"]) else ""),
    ]
    if comparison is not None and len(comparison):
        same = int(comparison["same_sign"].sum())
        points.append((
            f"Check against the test tenant: {same} of {len(comparison)} drivers point the same way as the model "
            "that generated its deals.",
            "The emulator knows the rules it used to decide which deals were won; a model that recovers their "
            "directions has learnt real effects, not noise." if same == len(comparison) else
            "Some drivers point the other way than the rules that generated the data: the model mistakes noise "
            "for an effect there.", ""))
    return points


def opportunity_table(scored: pd.DataFrame, *, currency: str, rows: int = 10) -> report.Html:
    """Open deals with the model's and the CRM's win chance (percentages), amounts and reasons."""
    fmt = money_of(currency)
    cols = ["name", "owner", "stepname", "value", "win_probability", "crm_probability", "expected_value", "reasons"]
    shown = scored.head(rows).reset_index(drop=True).assign(
        reasons=lambda d: d["reasons"].str.replace(r" \(log\)", "", regex=True).str.replace("; ", "<br>"))
    return report.table(shown, cols, formats={
        "value": fmt, "expected_value": fmt, "win_probability": "pct", "crm_probability": "pct", "reasons": "html"},
        labels={"stepname": "stage", "win_probability": "win chance", "crm_probability": "CRM says",
                "expected_value": "expected", "reasons": "why (effect on the log-odds)"})


def drivers_table(drivers: pd.DataFrame) -> report.Html:
    """The model's inputs: importance in AUC points (of 100; noise shows as 0.0) and the direction of their effect."""
    rows = [{"input": r["label"],
             "importance": f"{max(0.0, r['importance'] * 100):.1f} ± {r['importance_std'] * 100:.1f}",
             "effect": r["effect"]} for _, r in drivers.iterrows()]
    return report.table(rows, labels={"importance": "importance (AUC points lost when shuffled)",
                                      "effect": "effect on the odds of winning"})


def comparison_table(comparison: pd.DataFrame) -> report.Html:
    """Fitted drivers next to the generating model's (the emulator's ground truth)."""
    rows = [{"driver": r["meaning"], "true": f"{r['true']:+.2f}", "fitted": f"{r['fitted']:+.2f}",
             "same_direction": bool(r["same_sign"])} for _, r in comparison.iterrows()]
    return report.table(rows, labels={"true": "generating model", "fitted": "fitted model",
                                      "same_direction": "same direction"})


def leakage_table(leakage: pd.DataFrame) -> report.Html:
    """Win rate by the stage a closed deal was left in."""
    return report.table(leakage.reset_index(drop=True), ["stepname", "closed", "won", "win_rate"],
                        formats={"win_rate": "pct"}, labels={"stepname": "recorded stage", "win_rate": "win rate"})


# -- revenue forecast --------------------------------------------------------------------------------------


def forecast_points(bt: Any, fc: pd.DataFrame, pipeline: pd.DataFrame, *, currency: str) -> list[Point]:
    """The forecast report's summary: the next months, the forecast's accuracy, the pipeline against it."""
    fmt = money_of(currency)
    nxt = fc.iloc[0]
    total = float(fc["forecast"].sum())
    months = len(fc)
    first, last = pd.Timestamp(fc["month"].iloc[0]), pd.Timestamp(fc["month"].iloc[-1])
    weighted = float(pipeline["weighted_model"].sum()) if len(pipeline) else 0.0
    overdue = int(pipeline["overdue"].sum()) if len(pipeline) else 0
    return [
        (f"Won revenue forecast for {first:%B %Y}: {fmt(nxt['forecast'])} "
         f"({fmt(nxt['lower'])} to {fmt(nxt['upper'])}).",
         f"The range holds the actual amount {bt.level:.0%} of the time; {fmt(total)} is expected over the "
         f"{months} months to {last:%B %Y}.",
         "budget on the forecast and plan for the low end of the range."),
        (f"Typical error one month ahead: {bt.mape:.0%}, against {bt.naive_mape:.0%} for \"same month last year\".",
         f"Measured on the last {len(bt.table)} months, each forecast from the months before it only; "
         f"{bt.coverage:.0%} of the actual amounts fell inside the {bt.level:.0%} range.",
         "" if bt.mape < bt.naive_mape else "do not rely on this forecast: it is no better than last year's figures."),
        (f"The open pipeline, weighted by each deal's win chance, is worth {fmt(weighted)}.",
         f"{overdue:,} open deals are past their estimated close date; they are counted in the current month.",
         "ask the owners to re-date or close the overdue deals: they inflate the pipeline." if overdue else ""),
    ]


def forecast_tables(bt: Any, fc: pd.DataFrame, *, currency: str) -> tuple[report.Html, report.Html]:
    """The backtest's error measures and the forecast by month, formatted."""
    fmt = money_of(currency)
    errors = report.table([
        {"measure": "MAPE: mean error per month, in % of that month", "model": bt.mape, "same month last year": bt.naive_mape},
        {"measure": "WAPE: all errors over all revenue", "model": bt.wape, "same month last year": bt.naive_wape},
    ], formats={"model": "pct", "same month last year": "pct"})
    rows = [{"month": f"{pd.Timestamp(r['month']):%B %Y}", "forecast": r["forecast"], "low": r["lower"],
             "high": r["upper"]} for _, r in fc.iterrows()]
    return errors, report.table(rows, formats={"forecast": fmt, "low": fmt, "high": fmt})


def pipeline_table(pipeline: pd.DataFrame, *, currency: str) -> report.Html:
    """Open pipeline by estimated close month: total, weighted by the model and by the CRM."""
    fmt = money_of(currency)
    rows = [{"close_month": f"{pd.Timestamp(r['month']):%B %Y}", "deals": int(r["deals"]), "pipeline": r["pipeline"],
             "weighted_model": r["weighted_model"], "weighted_crm": r["weighted_crm"], "overdue": int(r["overdue"])}
            for _, r in pipeline.iterrows()]
    return report.table(rows, formats={"pipeline": fmt, "weighted_model": fmt, "weighted_crm": fmt},
                        labels={"weighted_model": "weighted by the model", "weighted_crm": "weighted by CRM probability",
                                "overdue": "of them overdue"})


# -- account health ----------------------------------------------------------------------------------------


def reason_counts(flagged: pd.DataFrame) -> pd.DataFrame:
    """How many at-risk accounts carry each reason, with readable labels."""
    counts = flagged[list(REASON_LABELS)].sum()
    return pd.DataFrame({"reason": [REASON_LABELS[k] for k in counts.index], "accounts": counts.astype(int).values},
                        index=counts.index)


def reason_meaning(rules: Any) -> dict[str, str]:
    """What each at-risk reason means under ``rules``, one sentence each."""
    return {
        "falling": f"Engagement falling: the interactions of the last {rules.recent_days} days are down by "
                   f"{rules.drop:.0%} or more against the {rules.recent_days} before (from at least {rules.min_prior}).",
        "stale": f"Stale open deals: an open opportunity past its close date or untouched for {rules.stale_days} days.",
        "silent": f"Silent while a deal is open: no interaction for {rules.silent_days} days.",
        "cases": "Open support cases: the customer has unresolved cases.",
        "owner_gone": "Owner disabled in Entra: the account's owner has left or lost access.",
    }


def health_points(health: pd.DataFrame, *, currency: str, rules: Any) -> list[Point]:
    """The account-health report's summary: how many accounts are at risk, what is at stake, why, and who."""
    fmt = money_of(currency)
    flagged = health[health["at_risk"]]
    reasons = reason_counts(flagged).sort_values("accounts", ascending=False)
    gone = flagged[flagged["owner_gone"]]
    top = flagged.head(3)["account"].tolist()
    points: list[Point] = [
        (f"{len(flagged):,} of {len(health):,} active accounts are at risk, with {fmt(flagged['at_stake'].sum())} "
         "at stake.",
         "At stake: their open pipeline plus what they bought in the last year.",
         f"start with the highest-ranked: {', '.join(top)}." if top else ""),
    ]
    if len(flagged):
        points.append((f"Most common reason: {reasons.iloc[0]['reason']} ({int(reasons.iloc[0]['accounts']):,} "
                       "accounts).", reason_meaning(rules)[str(reasons.index[0])],
                       "ask each owner for a next step with the customer."))
    if len(gone):
        points.append((f"{len(gone):,} at-risk accounts are owned by people disabled in Entra ID.",
                       "Nobody is looking after them: the owner has left or lost access.",
                       "reassign them to an active owner (Dataverse admin or sales manager)."))
    return points


def health_table(health: pd.DataFrame, *, currency: str, rows: int = 20) -> report.Html:
    """The ranked at-risk accounts with the reasons, one per line."""
    fmt = money_of(currency)
    flagged = health[health["at_risk"]].head(rows).reset_index(drop=True)
    shown = flagged.assign(interactions=[f"{int(r)} (before: {int(p)})" for r, p in zip(
        flagged["recent"], flagged["prior"], strict=True)], why=flagged["reasons"].map(
        lambda t: "<br>".join(html.escape(x) for x in str(t).split("; "))))
    return report.table(shown, ["account", "owner", "risk_score", "interactions", "open_value", "at_stake", "why"],
                        formats={"open_value": fmt, "at_stake": fmt, "why": "html",
                                 "risk_score": lambda v: report.num(v, 1)},
                        labels={"risk_score": "risk score", "interactions": "interactions, recent",
                                "open_value": "open deals", "at_stake": "at stake"})


# -- explore -----------------------------------------------------------------------------------------------


def quality_points(state: pd.DataFrame, checks: Iterable[Any]) -> list[Point]:
    """The explore report's summary: what was synced, and the red and amber findings of the checks."""
    failed = state[state["last_status"] != "ok"]
    rows = int(state["row_count"].fillna(0).sum())
    points: list[Point] = [(
        f"{len(state):,} tables synced, {rows:,} rows"
        + (f"; {len(failed)} failed ({', '.join(failed['table_name'])})." if len(failed) else ", all current."),
        "Every figure below is read from this local copy, not from the live systems.",
        "re-run the sync for the failed tables first." if len(failed) else "")]
    for c in sorted(checks, key=lambda c: {"red": 0, "amber": 1}.get(c.status, 2)):
        if c.status in ("red", "amber"):
            points.append((f"{report.status_word(c.status)}: {c.title}.", f"{c.finding}.", c.recommendation or ""))
    if len(points) == 1:
        points.append(("No data-quality or cross-system finding is amber or red.", "", ""))
    return points


def checks_table(checks: Iterable[Any]) -> report.Html:
    """Checks as status, title, finding and recommendation."""
    return report.table([{"status": c.status, "check": c.title, "finding": c.finding,
                          "recommendation": c.recommendation or ""} for c in checks],
                        formats={"finding": "text", "recommendation": "text"})


def frame(df: pd.DataFrame, formats: Mapping[str, Any] | None = None, **kw: Any) -> report.Html:
    """A query result as a report table (no index, formatted cells)."""
    return report.table(df.reset_index(drop=True), formats=formats, **kw)
