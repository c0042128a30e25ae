"""Predictive analytics over the synced warehouse: features, win probability, revenue forecast, account health.

Needs scikit-learn (the ``lab`` extra: ``pip install 'bridgekit[lab]'``). Every function takes a source
with ``sql()`` (a :class:`~bridgekit.workbench.Workbench` or a :class:`~bridgekit.warehouse.Warehouse`)
or the frames the others return, so notebooks stay thin::

    import bridgekit
    from bridgekit import analytics

    wb = bridgekit.connect()
    feats = analytics.opportunity_features(wb)
    model = analytics.train_win_model(feats)
    model.metrics["auc"], model.metrics["baseline_auc"]
    scored = analytics.score_open(model, feats)
    analytics.write_table(wb, "win_scores", scored[["opportunityid", "win_probability"]])

Modules: :mod:`~bridgekit.analytics.features` (as-of features, interactions),
:mod:`~bridgekit.analytics.models` (win model and baseline), :mod:`~bridgekit.analytics.forecast`
(monthly won revenue, backtest, weighted pipeline), :mod:`~bridgekit.analytics.health` (account health),
:mod:`~bridgekit.analytics.writeback` (schema ``analytics``, and a read-only connection for ``%sql``).
"""

from __future__ import annotations

from bridgekit.analytics.features import (
    InsufficientDataError,
    account_features,
    data_time,
    interactions,
    missing_sources,
    opportunity_features,
)
from bridgekit.analytics.forecast import (
    Backtest,
    SeasonalTrendForecaster,
    backtest,
    forecast_revenue,
    monthly_history,
    monthly_won_revenue,
    weighted_pipeline,
)
from bridgekit.analytics.health import HealthRules, account_health, at_risk, engagement_trend
from bridgekit.analytics.models import (
    StageIndustryBaseline,
    WinModel,
    compare_with_generating_model,
    score_open,
    stage_leakage,
    train_win_model,
)
from bridgekit.analytics.writeback import read_only_connection, read_table, write_table

__all__ = [
    "Backtest",
    "HealthRules",
    "InsufficientDataError",
    "SeasonalTrendForecaster",
    "StageIndustryBaseline",
    "WinModel",
    "account_features",
    "account_health",
    "at_risk",
    "backtest",
    "compare_with_generating_model",
    "data_time",
    "engagement_trend",
    "forecast_revenue",
    "interactions",
    "missing_sources",
    "monthly_history",
    "monthly_won_revenue",
    "opportunity_features",
    "read_only_connection",
    "read_table",
    "score_open",
    "stage_leakage",
    "train_win_model",
    "weighted_pipeline",
    "write_table",
]
