"""Monthly won-revenue forecast with prediction intervals, its backtest against seasonal-naive, and weighted pipeline.

Won revenue in a month is (deals closed) x (share of them won) x (average won deal). The forecaster models
the three parts separately, because they differ a lot in how noisy they are: the number of deals closed
per month is a count with a strong, regular seasonality; the win rate moves slowly; the average deal is
heavy-tailed (a few large deals make a month), so it is best estimated over a long window. Fitting the
seasonality on counts instead of on money removes the large-deal noise from the seasonal estimates.

* closed deals per month: a Poisson GLM (log link) on a trend, the quarter of the year and a
  last-month-of-the-quarter flag (deals are pushed to close before quarter end), with the month's
  selling days as exposure (weekend days weighted by how often deals close on weekends in the history);
* win rate: per quarter of the year, shrunk toward the overall rate;
* average won deal: over the last 12 months.

Prediction intervals are multiplicative: the spread of the in-sample log residuals of monthly revenue
(with a degrees-of-freedom correction) around the point forecast. The backtest reports how often the
actuals fell inside them.

The backtest is rolling-origin: for each of the last ``test_months`` months, the model is fitted only on the
months that ended ``horizon`` months before it, and its forecast is compared with the actual and with the
seasonal-naive forecast (the same month a year earlier), by MAPE and WAPE.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd
from sklearn.linear_model import PoissonRegressor

from bridgekit.errors import InsufficientDataError

__all__ = [
    "Backtest",
    "SeasonalTrendForecaster",
    "backtest",
    "forecast_revenue",
    "monthly_history",
    "monthly_won_revenue",
    "seasonal_naive",
    "weighted_pipeline",
]

MIN_MONTHS = 13  # a seasonal-naive comparison needs a year of history plus one month
_VALUE_WINDOW = 12  # months of wins the average deal is taken over
_WIN_RATE_PRIOR = 50.0  # pseudo-deals pulling a quarter's win rate toward the overall rate


def monthly_history(frame: pd.DataFrame, *, as_of: dt.datetime | None = None) -> pd.DataFrame:
    """Closed deals, won deals and won revenue (base currency) per complete calendar month.

    A month counts only when it is complete: from the first whole month after the first close to the
    last month that ended before ``as_of`` (default: the frame's snapshot time). Revenue is
    ``actual_value``, else ``value`` when the CRM has no actual value.

    Returns:
        Columns ``closed``, ``won``, ``won_revenue``, ``exposure`` (selling days, weekend days weighted),
        indexed by month start (naive UTC). ``attrs["weekend_weight"]`` holds the weekend weight.
    """
    closed = frame[frame["status"] != "open"]
    if closed.empty:
        raise InsufficientDataError("no closed opportunities")
    snapshot = pd.Timestamp(as_of) if as_of is not None else frame["as_of"].max()
    snapshot = snapshot.tz_localize("UTC") if snapshot.tzinfo is None else snapshot.tz_convert("UTC")
    close_day = closed["as_of"].dt.tz_convert("UTC").dt.tz_localize(None)
    first_close = close_day.min()
    start = first_close.normalize() + pd.offsets.MonthBegin(1)
    end = snapshot.tz_localize(None).to_period("M").to_timestamp()  # the running month is excluded
    months = pd.date_range(start, end, freq="MS", inclusive="left")
    # How much a weekend day sells compared with a weekday, from the history itself.
    days = pd.date_range(first_close.normalize(), end, freq="D", inclusive="left")
    weekend = days.day_of_week >= 5
    per_weekday = (close_day.dt.day_of_week < 5).sum() / max(1, int((~weekend).sum()))
    per_weekend = (close_day.dt.day_of_week >= 5).sum() / max(1, int(weekend.sum()))
    weekend_weight = float(per_weekend / per_weekday) if per_weekday else 1.0
    won = frame[frame["status"] == "won"]
    revenue = won["actual_value"].fillna(won["value"]).astype(float)
    month_of = closed["close_month"]
    out = pd.DataFrame({
        "closed": closed.groupby(month_of).size().reindex(months, fill_value=0).astype(float),
        "won": won.groupby(won["close_month"]).size().reindex(months, fill_value=0).astype(float),
        "won_revenue": revenue.groupby(won["close_month"]).sum().reindex(months, fill_value=0.0),
        "exposure": _exposure(months, weekend_weight),
    }, index=months)
    out.index.name = "month"
    out.attrs["weekend_weight"] = weekend_weight
    return out


def monthly_won_revenue(frame: pd.DataFrame, *, as_of: dt.datetime | None = None) -> pd.Series:
    """Won revenue (base currency) per complete calendar month (see :func:`monthly_history`)."""
    return monthly_history(frame, as_of=as_of)["won_revenue"]


def _exposure(months: pd.DatetimeIndex, weekend_weight: float) -> np.ndarray:
    """Selling days per month (weekend days count ``weekend_weight``), relative to an average month."""
    out = []
    for m in months:
        d = pd.date_range(m, m + pd.offsets.MonthEnd(0), freq="D")
        out.append(float(np.where(d.day_of_week < 5, 1.0, weekend_weight).sum()))
    return np.asarray(out) / (21.74 + 8.69 * weekend_weight)


def _design(months: pd.DatetimeIndex, origin: pd.Timestamp) -> np.ndarray:
    t = ((months.year - origin.year) * 12 + (months.month - origin.month)) / 12.0
    q = (months.month - 1) // 3 + 1
    return np.column_stack([np.asarray(t, dtype=float), *(np.asarray(q == k, dtype=float) for k in (2, 3, 4)),
                            np.asarray(months.month % 3 == 0, dtype=float)])


def _quarter(months: pd.DatetimeIndex) -> np.ndarray:
    return np.asarray((months.month - 1) // 3 + 1)


@dataclass
class SeasonalTrendForecaster:
    """Closed deals (trend x quarter x quarter-end, per selling day) x win rate by quarter x average won deal.

    Example:
        >>> f = SeasonalTrendForecaster().fit(monthly_history(feats))   # doctest: +SKIP
        >>> f.predict(6, level=0.8)                                     # doctest: +SKIP
    """

    alpha: float = 1e-4
    origin: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    scale: float = 1.0
    weekend_weight: float = 1.0
    win_rate: dict[int, float] = field(default_factory=dict)
    deal_value: float = math.nan
    sigma: float = math.nan
    model: PoissonRegressor | None = field(default=None, repr=False)

    def fit(self, history: pd.DataFrame) -> SeasonalTrendForecaster:
        """Fit on :func:`monthly_history` output (or any frame with ``closed``, ``won``, ``won_revenue``)."""
        if len(history) < 6:
            raise InsufficientDataError(f"only {len(history)} complete months of history; need at least 6")
        idx = pd.DatetimeIndex(history.index)
        self.origin, self.last = idx[0], idx[-1]
        self.weekend_weight = float(history.attrs.get("weekend_weight", 1.0))
        exposure = _exposure(idx, self.weekend_weight)
        closed = history["closed"].to_numpy(dtype=float)
        self.scale = float(np.mean(closed)) or 1.0  # the GLM on a unit scale: its tolerances are absolute
        # Poisson with exposure: rate = count / exposure, weighted by exposure (the same likelihood).
        self.model = PoissonRegressor(alpha=self.alpha, max_iter=1000).fit(
            _design(idx, self.origin), closed / self.scale / exposure, sample_weight=exposure)
        won = history["won"].to_numpy(dtype=float)
        overall = won.sum() / max(1.0, closed.sum())
        quarters = _quarter(idx)
        self.win_rate = {q: float((won[quarters == q].sum() + _WIN_RATE_PRIOR * overall)
                                  / (closed[quarters == q].sum() + _WIN_RATE_PRIOR)) for q in (1, 2, 3, 4)}
        recent = history.iloc[-_VALUE_WINDOW:]
        self.deal_value = float(recent["won_revenue"].sum() / max(1.0, recent["won"].sum()))
        whole_value = float(history["won_revenue"].sum() / max(1.0, won.sum()))
        fitted = self._point(idx) * whole_value / self.deal_value
        y = history["won_revenue"].to_numpy(dtype=float)
        ok = (y > 0) & (fitted > 0)
        dof = max(1, int(ok.sum()) - 7)
        self.sigma = float(np.sqrt(np.sum(np.log(y[ok] / fitted[ok]) ** 2) / dof)) if ok.sum() > 1 else math.nan
        return self

    def _point(self, months: pd.DatetimeIndex) -> np.ndarray:
        assert self.model is not None and self.origin is not None
        closed = self.model.predict(_design(months, self.origin)) * self.scale * _exposure(months, self.weekend_weight)
        rate = np.asarray([self.win_rate[q] for q in _quarter(months)])
        result: np.ndarray = closed * rate * self.deal_value
        return result

    def predict(self, horizon: int = 6, *, level: float = 0.8,
                months: pd.DatetimeIndex | None = None) -> pd.DataFrame:
        """Forecast the next ``horizon`` months (or the given ``months``).

        Returns:
            ``month``, ``forecast``, ``lower``, ``upper`` (the central ``level`` interval).
        """
        if self.model is None or self.last is None:
            raise RuntimeError("fit() first")
        if months is None:
            months = pd.date_range(self.last + pd.offsets.MonthBegin(1), periods=horizon, freq="MS")
        point = self._point(pd.DatetimeIndex(months))
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        spread = math.exp(z * self.sigma) if math.isfinite(self.sigma) else math.inf
        return pd.DataFrame({"month": months, "forecast": point, "lower": point / spread, "upper": point * spread})


def forecast_revenue(history: pd.DataFrame, *, horizon: int = 6, level: float = 0.8) -> pd.DataFrame:
    """Fit :class:`SeasonalTrendForecaster` on the whole history and forecast ``horizon`` months ahead."""
    return SeasonalTrendForecaster().fit(history).predict(horizon, level=level)


def seasonal_naive(series: pd.Series, months: pd.DatetimeIndex) -> pd.Series:
    """The seasonal-naive forecast: each month's value a year earlier (NaN when not in the series)."""
    prior = pd.DatetimeIndex(months) - pd.DateOffset(years=1)
    return pd.Series(series.reindex(prior).to_numpy(), index=months, name="seasonal_naive")


@dataclass
class Backtest:
    """A rolling-origin backtest.

    Attributes:
        table: per test month: ``month``, ``actual``, ``forecast``, ``lower``, ``upper``,
            ``seasonal_naive``, ``ape`` and ``naive_ape`` (absolute percentage errors).
        mape: mean absolute percentage error of the model.
        naive_mape: the same for seasonal-naive.
        wape: the model's absolute errors summed over the test months, over the actuals summed
            (a big month weighs more, a near-empty month cannot dominate as it does in MAPE).
        naive_wape: the same for seasonal-naive.
        coverage: share of actuals inside the prediction interval.
        level: the interval's nominal coverage.
        horizon: months between the last month fitted and the month forecast.
    """

    table: pd.DataFrame
    mape: float
    naive_mape: float
    wape: float
    naive_wape: float
    coverage: float
    level: float
    horizon: int

    @property
    def improvement(self) -> float:
        """Relative MAPE reduction over seasonal-naive (0.25 = a quarter fewer percentage-error points)."""
        return 1.0 - self.mape / self.naive_mape if self.naive_mape else math.nan

    def summary(self) -> pd.DataFrame:
        """MAPE and WAPE of the model and of seasonal-naive, side by side."""
        return pd.DataFrame({"model": [self.mape, self.wape], "seasonal_naive": [self.naive_mape, self.naive_wape]},
                            index=["MAPE", "WAPE"])


def backtest(history: pd.DataFrame, *, test_months: int = 12, horizon: int = 1, level: float = 0.8) -> Backtest:
    """Rolling-origin backtest of :class:`SeasonalTrendForecaster` against seasonal-naive.

    Args:
        history: :func:`monthly_history` output.
        test_months: how many of the latest months are forecast (each from its own past only).
        horizon: forecast this many months ahead (1 = next month).
        level: prediction-interval level whose coverage is reported.

    Raises:
        InsufficientDataError: fewer than a year of history before the first test month.
    """
    idx = pd.DatetimeIndex(history.index)
    series = history["won_revenue"]
    n_test = min(test_months, len(history) - 12)
    if len(history) < MIN_MONTHS or n_test < 1:
        raise InsufficientDataError(f"{len(history)} complete months of won revenue; a backtest against "
                                    f"seasonal-naive needs at least {MIN_MONTHS}")
    rows = []
    for i in range(len(history) - n_test, len(history)):
        month = idx[i]
        past = history.iloc[: i - horizon + 1]
        if len(past) < 6:
            continue
        pred = SeasonalTrendForecaster().fit(past).predict(months=pd.DatetimeIndex([month]), level=level)
        rows.append({"month": month, "actual": float(series.iloc[i]), "forecast": float(pred["forecast"].iloc[0]),
                     "lower": float(pred["lower"].iloc[0]), "upper": float(pred["upper"].iloc[0]),
                     "seasonal_naive": float(series.iloc[i - 12])})
    table = pd.DataFrame(rows)
    if table.empty:
        raise InsufficientDataError("no month could be backtested")
    actual = table["actual"].where(table["actual"] > 0)
    table["ape"] = (table["forecast"] - actual).abs() / actual
    table["naive_ape"] = (table["seasonal_naive"] - actual).abs() / actual
    total = float(table["actual"].sum()) or math.nan
    inside = (table["actual"] >= table["lower"]) & (table["actual"] <= table["upper"])
    return Backtest(table, float(table["ape"].mean()), float(table["naive_ape"].mean()),
                    float((table["forecast"] - table["actual"]).abs().sum() / total),
                    float((table["seasonal_naive"] - table["actual"]).abs().sum() / total),
                    float(inside.mean()), level, horizon)


def weighted_pipeline(scored: pd.DataFrame, *, as_of: dt.datetime | None = None) -> pd.DataFrame:
    """Open pipeline by expected close month: total, weighted by the model, and by the CRM's own probability.

    Deals whose estimated close date has already passed are gathered in the current month and counted in
    ``overdue`` (they still need a decision, and a forecast should not pretend they closed in the past).

    Args:
        scored: :func:`~bridgekit.analytics.models.score_open` output (``value``, ``win_probability``,
            ``crm_probability``, ``estimatedclosedate``).
        as_of: the snapshot time (default: the frame's ``as_of``).

    Returns:
        ``month``, ``deals``, ``pipeline``, ``weighted_model``, ``weighted_crm``, ``overdue``.
    """
    cols = ["month", "deals", "pipeline", "weighted_model", "weighted_crm", "overdue"]
    if scored.empty:
        return pd.DataFrame(columns=cols)
    snapshot = pd.Timestamp(as_of) if as_of is not None else scored["as_of"].max()
    snapshot = snapshot.tz_localize("UTC") if snapshot.tzinfo is None else snapshot.tz_convert("UTC")
    current = snapshot.tz_localize(None).to_period("M").to_timestamp()
    month = scored["estimatedclosedate"].dt.tz_convert("UTC").dt.tz_localize(None).dt.to_period("M").dt.to_timestamp()
    overdue = month < current
    df = pd.DataFrame({
        "month": month.where(~overdue, current).fillna(current),
        "value": scored["value"].astype(float),
        "weighted_model": scored["value"].astype(float) * scored["win_probability"].astype(float),
        "weighted_crm": scored["value"].astype(float) * scored["crm_probability"].astype(float),
        "overdue": overdue.astype(int),
    })
    out = df.groupby("month").agg(deals=("value", "size"), pipeline=("value", "sum"),
                                  weighted_model=("weighted_model", "sum"), weighted_crm=("weighted_crm", "sum"),
                                  overdue=("overdue", "sum")).reset_index()
    return out[cols]
