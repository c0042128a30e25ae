"""Win probability: a scikit-learn model of won/lost trained on closed opportunities, its baseline and evaluation.

The model is a regularised logistic regression over a small set of readable features (engagement counts
and deal size on a log scale, age per 100 days, the close quarter, the owner's prior win rate, account
size and industry). A logistic model is chosen on purpose: it is calibrated by construction, and its
coefficients read directly as drivers that an analyst can defend and compare with what is known (on the
emulator, with the documented generating model).

Evaluation is time-based: the model is fitted on the deals that closed before a split date and judged on
the deals that closed after it (the held-out period), the way it will be used, on deals that close later.

The baseline is the historical win rate by stage and industry, computed the way the stage can honestly be
used. A closed opportunity's recorded stage is its *final* stage: lost deals keep the stage they died in,
won deals end at the last one. So "win rate by recorded stage" is a leak (on the emulator no deal that
ended before 4-Close was won) and would score the held-out period with the answer. The baseline therefore
uses stage *conversion* rates: P(won | the deal reached stage s, industry) = wins / deals whose final
stage is at least s, shrunk toward the all-industry rate. An open deal is scored at its current stage; a
held-out closed deal is scored at the stage every deal is known to have reached before its outcome (the
first), which makes the baseline the historical win rate of its industry. :func:`stage_leakage` shows the
leak itself.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

from bridgekit.errors import InsufficientDataError

__all__ = [
    "DEFAULT_FEATURES",
    "GENERATING_MODEL_MAP",
    "Feature",
    "StageIndustryBaseline",
    "WinModel",
    "calibration_table",
    "compare_with_generating_model",
    "score_open",
    "split_by_time",
    "stage_leakage",
    "train_win_model",
]

MIN_CLOSED = 60  # fewer closed deals than this cannot give a meaningful held-out AUC


@dataclass(frozen=True)
class Feature:
    """One model input: a column of :func:`~bridgekit.analytics.features.opportunity_features`.

    Attributes:
        column: the features-frame column.
        transform: ``log1p`` (counts and money), ``linear`` or ``category``.
        label: how charts and tables name it.
        scale: ``linear`` values are divided by this (age per 100 days), so coefficients read per unit.
    """

    column: str
    transform: str
    label: str
    scale: float = 1.0


#: The default win-model inputs.
DEFAULT_FEATURES: tuple[Feature, ...] = (
    Feature("touches_90d", "log1p", "CRM touches, last 90 days (log)"),
    Feature("mails_90d", "log1p", "Graph mails with the account's contacts, 90 days (log)"),
    Feature("meetings_90d", "log1p", "Graph meetings with the account's contacts, 90 days (log)"),
    Feature("value", "log1p", "deal size, base currency (log)"),
    Feature("age_days", "linear", "age at close, per 100 days", 100.0),
    Feature("closes_in_q4", "linear", "closes in Q4"),
    Feature("owner_win_rate", "linear", "owner's prior win rate"),
    Feature("employees", "log1p", "account employees (log)"),
    Feature("industry", "category", "account industry"),
)

#: Emulator generating-model term -> (feature column, factor from the model's unit to the feature's).
#: ``size`` is per ln(value / 50000) and ``engagement`` per ln(1 + touches), the units of the features.
GENERATING_MODEL_MAP: dict[str, tuple[str, str]] = {
    "engagement": ("touches_90d", "CRM touches in the 90 days before close, ln(1 + n)"),
    "size": ("value", "deal size, ln(value / 50,000)"),
    "age": ("age_days", "age at close, per 100 days"),
    "q4": ("closes_in_q4", "closed in Q4"),
}


def _scale(x: Any, factors: Sequence[float]) -> Any:
    return np.asarray(x, dtype=float) / np.asarray(factors, dtype=float)


def _log1p(x: Any) -> Any:
    return np.log1p(np.clip(np.asarray(x, dtype=float), 0, None))


def _pipeline(features: Sequence[Feature], c: float) -> Pipeline:
    logs = [f.column for f in features if f.transform == "log1p"]
    lins = [f for f in features if f.transform == "linear"]
    cats = [f.column for f in features if f.transform == "category"]
    parts: list[tuple[str, Any, list[str]]] = []
    if logs:
        parts.append(("log", FunctionTransformer(_log1p, feature_names_out="one-to-one"), logs))
    if lins:
        parts.append(("lin", FunctionTransformer(_scale, kw_args={"factors": [f.scale for f in lins]},
                                                 feature_names_out="one-to-one"), [f.column for f in lins]))
    if cats:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore", min_frequency=5), cats))
    pre = ColumnTransformer(parts, verbose_feature_names_out=True)
    return Pipeline([("features", pre), ("model", LogisticRegression(C=c, max_iter=5000))])


def _inputs(frame: pd.DataFrame, features: Sequence[Feature]) -> pd.DataFrame:
    cols = {}
    for f in features:
        s = frame[f.column]
        if f.transform == "category":
            cols[f.column] = s.astype("string").fillna("(none)").astype(object)
        else:
            cols[f.column] = pd.to_numeric(s, errors="coerce").astype(float).fillna(0.0)
    return pd.DataFrame(cols, index=frame.index)


def split_by_time(frame: pd.DataFrame, *, holdout: float = 0.25,
                  split_date: dt.datetime | dt.date | str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """Closed opportunities split by close time: (train, held-out, split date).

    Args:
        holdout: the share of closed deals, the latest ones, to hold out (ignored with ``split_date``).
        split_date: deals closed on or after it are held out.
    """
    closed = frame[frame["status"] != "open"].sort_values("as_of")
    if len(closed) < MIN_CLOSED:
        raise InsufficientDataError(f"only {len(closed)} closed opportunities; a win model needs at least {MIN_CLOSED}",
                                    hint="sync more history, or use a larger emulator scale")
    if split_date is not None:
        cut = pd.Timestamp(split_date)
        cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut.tz_convert("UTC")
    else:
        # Whole days only, so deals closed the same day are never on both sides.
        cut = closed["as_of"].iloc[int(len(closed) * (1.0 - holdout))].floor("D")
    train, test = closed[closed["as_of"] < cut], closed[closed["as_of"] >= cut]
    if train["won"].nunique() < 2 or test["won"].nunique() < 2:
        raise InsufficientDataError(f"the split at {cut.date()} leaves a side with only one outcome",
                                    hint="choose another split_date or holdout share")
    return train, test, cut


class StageIndustryBaseline:
    """Historical win rate by stage and industry, from stage conversion rates (see the module docstring).

    Example:
        >>> base = StageIndustryBaseline().fit(train)        # doctest: +SKIP
        >>> base.predict(open_deals)                          # doctest: +SKIP
    """

    def __init__(self, *, prior_weight: float = 20.0) -> None:
        self.prior_weight = prior_weight
        self.stages: list[int] = []
        self.by_stage: dict[int, float] = {}
        self.by_stage_industry: dict[tuple[int, str], float] = {}

    def fit(self, closed: pd.DataFrame) -> StageIndustryBaseline:
        """Learn conversion rates from closed deals (``salesstage`` is their final stage)."""
        stage = closed["salesstage"].fillna(0).astype(int)
        ind = closed["industry"].astype("string").fillna("(none)")
        won = closed["won"].astype(int)
        self.stages = sorted(stage.unique().tolist())
        overall = float(won.mean())
        for s in self.stages:
            reached = stage >= s
            n, w = int(reached.sum()), int(won[reached].sum())
            self.by_stage[s] = (w + overall) / (n + 1.0)
            for i, grp in won[reached].groupby(ind[reached]):
                self.by_stage_industry[(s, str(i))] = (
                    (grp.sum() + self.prior_weight * self.by_stage[s]) / (len(grp) + self.prior_weight))
        return self

    def entry_stage(self) -> int:
        """The first stage, which every deal is known to have reached."""
        return self.stages[0] if self.stages else 0

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """P(won) at each deal's known stage: the current one when open, the entry stage when closed."""
        entry = self.entry_stage()
        stage = frame["salesstage"].fillna(entry).astype(int).where(frame["status"] == "open", entry)
        ind = frame["industry"].astype("string").fillna("(none)")
        out = []
        for s, i in zip(stage, ind, strict=True):
            s_known = max([x for x in self.stages if x <= s] or [entry])
            out.append(self.by_stage_industry.get((s_known, str(i)), self.by_stage.get(s_known, 0.5)))
        return np.asarray(out, dtype=float)


def stage_leakage(frame: pd.DataFrame) -> pd.DataFrame:
    """Win rate by the *recorded* stage of closed deals: why the final stage cannot be a predictor."""
    closed = frame[frame["status"] != "open"]
    out = closed.groupby(["salesstage", "stepname"], dropna=False)["won"].agg(["count", "sum"]).reset_index()
    out = out.rename(columns={"count": "closed", "sum": "won"})
    out["win_rate"] = out["won"] / out["closed"]
    return out


def calibration_table(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, *, bins: int = 10) -> pd.DataFrame:
    """Observed win rate against mean predicted probability in equal-count bins of the prediction."""
    df = pd.DataFrame({"y": np.asarray(y, dtype=float), "p": np.asarray(p, dtype=float)})
    q = min(bins, max(1, df["p"].nunique()))
    df["bin"] = pd.qcut(df["p"].rank(method="first"), q, labels=False)
    out = df.groupby("bin").agg(predicted=("p", "mean"), observed=("y", "mean"), n=("y", "size")).reset_index()
    return out.drop(columns="bin")


@dataclass
class WinModel:
    """A trained win-probability model with its held-out evaluation.

    Attributes:
        pipeline: the fitted scikit-learn pipeline (inputs: the feature columns).
        features: the inputs, in order.
        baseline: the fitted stage/industry baseline.
        split_date: deals closed on or after it were held out.
        train, test: the closed deals on each side (features frame rows).
        metrics: ``auc``, ``baseline_auc``, ``auc_margin``, ``brier``, ``baseline_brier``, ``log_loss``,
            ``baseline_log_loss``, ``n_train``, ``n_test``, ``win_rate_train``, ``win_rate_test``.
        importance: permutation importance on the held-out period (drop in ROC AUC when a feature is
            shuffled), by feature, largest first.
        coefficients: the logistic coefficients per model column (one-hot columns per industry).
    """

    pipeline: Pipeline
    features: tuple[Feature, ...]
    baseline: StageIndustryBaseline
    split_date: pd.Timestamp
    train: pd.DataFrame
    test: pd.DataFrame
    metrics: dict[str, float] = field(default_factory=dict)
    importance: pd.DataFrame = field(default_factory=pd.DataFrame)
    coefficients: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """P(won) for each row of a features frame."""
        proba: np.ndarray = self.pipeline.predict_proba(_inputs(frame, self.features))[:, 1]
        return proba

    def roc(self) -> pd.DataFrame:
        """ROC curves of the model and the baseline on the held-out period (long form)."""
        y = self.test["won"].astype(int).to_numpy()
        rows = []
        for name, p in (("model", self.predict(self.test)), ("baseline", self.baseline.predict(self.test))):
            fpr, tpr, _ = roc_curve(y, p)
            rows.append(pd.DataFrame({"scorer": name, "false_positive_rate": fpr, "true_positive_rate": tpr}))
        return pd.concat(rows, ignore_index=True)

    def calibration(self, *, bins: int = 10) -> pd.DataFrame:
        """Calibration tables of model and baseline on the held-out period (long form)."""
        y = self.test["won"].astype(int).to_numpy()
        return pd.concat([
            calibration_table(y, self.predict(self.test), bins=bins).assign(scorer="model"),
            calibration_table(y, self.baseline.predict(self.test), bins=bins).assign(scorer="baseline"),
        ], ignore_index=True)

    def drivers(self) -> pd.DataFrame:
        """Per feature: label, permutation importance, and the coefficient with its direction.

        Categorical features (industry) have no single coefficient; their spread is given instead.
        """
        rows = []
        coef = self.coefficients
        for f in self.features:
            imp = self.importance.loc[f.column] if f.column in self.importance.index else None
            if f.transform == "category":
                sub = coef[[c for c in coef.index if c.startswith(f"cat__{f.column}_")]]
                value = float(sub.max() - sub.min()) if len(sub) else math.nan
                direction = "varies"
            else:
                value = float(coef.get(f"{'log' if f.transform == 'log1p' else 'lin'}__{f.column}", math.nan))
                direction = "raises" if value > 0 else "lowers"
            rows.append({"feature": f.column, "label": f.label,
                         "importance": float(imp["importance"]) if imp is not None else math.nan,
                         "importance_std": float(imp["importance_std"]) if imp is not None else math.nan,
                         "coefficient": value, "effect": direction})
        return pd.DataFrame(rows).sort_values("importance", ascending=False).reset_index(drop=True)

    def coefficient(self, column: str) -> float:
        """The fitted coefficient of a numeric feature, in the feature's model unit."""
        f = next(x for x in self.features if x.column == column)
        return float(self.coefficients[f"{'log' if f.transform == 'log1p' else 'lin'}__{column}"])

    def industry_effects(self) -> pd.Series:
        """The fitted industry coefficients, centred on their mean (industry code -> effect)."""
        coef = self.coefficients
        sub = coef[[c for c in coef.index if c.startswith("cat__industry_")]]
        sub.index = [c.removeprefix("cat__industry_") for c in sub.index]
        return sub - sub.mean()


def train_win_model(frame: pd.DataFrame, *, features: Sequence[Feature] = DEFAULT_FEATURES,
                    holdout: float = 0.25, split_date: dt.datetime | dt.date | str | None = None,
                    c: float = 1.0, importance_repeats: int = 30, random_state: int = 0) -> WinModel:
    """Fit the win model on deals closed before the split and evaluate it on those closed after.

    Args:
        frame: :func:`~bridgekit.analytics.features.opportunity_features` output.
        features: the model inputs (default :data:`DEFAULT_FEATURES`).
        holdout: the latest share of closed deals held out (when ``split_date`` is not given).
        split_date: deals closed on or after this date are held out.
        c: inverse L2 regularisation strength of the logistic regression.
        importance_repeats: shuffles per feature for permutation importance (0 skips it).
        random_state: seed for the permutation shuffles.

    Returns:
        The :class:`WinModel` with metrics, permutation importance and coefficients.

    Raises:
        InsufficientDataError: too few closed deals, or a side of the split with one outcome only.

    Example:
        >>> model = train_win_model(opportunity_features(wb))    # doctest: +SKIP
        >>> model.metrics["auc"], model.metrics["baseline_auc"]  # doctest: +SKIP
    """
    feats = tuple(features)
    train, test, cut = split_by_time(frame, holdout=holdout, split_date=split_date)
    pipe = _pipeline(feats, c)
    y_train = train["won"].astype(int).to_numpy()
    y_test = test["won"].astype(int).to_numpy()
    pipe.fit(_inputs(train, feats), y_train)
    baseline = StageIndustryBaseline().fit(train)
    model = WinModel(pipe, feats, baseline, cut, train, test)
    p, b = model.predict(test), baseline.predict(test)
    model.metrics = {
        "auc": float(roc_auc_score(y_test, p)), "baseline_auc": float(roc_auc_score(y_test, b)),
        "brier": float(brier_score_loss(y_test, p)), "baseline_brier": float(brier_score_loss(y_test, b)),
        "log_loss": float(log_loss(y_test, p, labels=[0, 1])),
        "baseline_log_loss": float(log_loss(y_test, b, labels=[0, 1])),
        "n_train": float(len(train)), "n_test": float(len(test)),
        "win_rate_train": float(y_train.mean()), "win_rate_test": float(y_test.mean()),
    }
    model.metrics["auc_margin"] = model.metrics["auc"] - model.metrics["baseline_auc"]
    names = pipe.named_steps["features"].get_feature_names_out()
    model.coefficients = pd.Series(pipe.named_steps["model"].coef_[0], index=names)
    if importance_repeats > 0:
        imp = permutation_importance(pipe, _inputs(test, feats), y_test, scoring="roc_auc",
                                     n_repeats=importance_repeats, random_state=random_state)
        model.importance = pd.DataFrame(
            {"importance": imp.importances_mean, "importance_std": imp.importances_std},
            index=[f.column for f in feats]).sort_values("importance", ascending=False)
    return model


def compare_with_generating_model(model: WinModel, truth: Mapping[str, Any]) -> pd.DataFrame:
    """The fitted drivers next to a known generating model (the emulator's, from ``Workbench.emulator_truth``).

    Args:
        truth: ``{"engagement": .., "size": .., "age": .., "q4": .., "industry": {code: effect}}``, the
            coefficients of the logistic model that decided won/lost (see docs/emulator-company.md), or the
            emulator's ``generating_model`` record (``coefficients`` and ``industry_effect``).

    Returns:
        One row per driver: ``driver``, ``feature``, ``meaning``, ``true``, ``fitted``, ``same_sign``,
        ``importance`` (held-out permutation importance, when the feature is in the model); the last
        row, ``industry``, compares the centred industry effects (``fitted`` is their correlation with
        the true ones).
    """
    if "coefficients" in truth:
        truth = {**truth["coefficients"], "industry": truth.get("industry_effect") or {}}
    rows = []
    columns = {f.column for f in model.features}
    for term, (column, meaning) in GENERATING_MODEL_MAP.items():
        if term not in truth or column not in columns:
            continue
        fitted = model.coefficient(column)
        true = float(truth[term])
        imp = float(model.importance.loc[column, "importance"]) if column in model.importance.index else math.nan
        rows.append({"driver": term, "feature": column, "meaning": meaning, "true": true, "fitted": fitted,
                     "same_sign": bool(np.sign(true) == np.sign(fitted)), "importance": imp})
    industry = truth.get("industry")
    if isinstance(industry, Mapping) and "industry" in columns:
        fitted_ind = model.industry_effects()
        true_ind = pd.Series({str(k): float(v) for k, v in industry.items()})
        common = [i for i in fitted_ind.index if i in true_ind.index]
        if len(common) >= 3:
            t = true_ind.reindex(fitted_ind.index).fillna(0.0)
            corr = float(np.corrcoef(t.to_numpy(), fitted_ind.to_numpy())[0, 1])
            imp = float(model.importance.loc["industry", "importance"]) if "industry" in model.importance.index else math.nan
            rows.append({"driver": "industry", "feature": "industry", "meaning": "industry effects (correlation)",
                         "true": 1.0, "fitted": corr, "same_sign": corr > 0, "importance": imp})
    return pd.DataFrame(rows)


def score_open(model: WinModel, frame: pd.DataFrame, *, top: int = 3) -> pd.DataFrame:
    """Score the open pipeline: probability, baseline, expected value and the strongest reasons.

    Each deal's reasons are the features that move its log-odds most away from the average training
    deal (coefficient x (value - training mean), in the model's units), e.g. ``"CRM touches, last 90
    days (log): -0.8"``.

    Returns:
        The open rows with ``win_probability``, ``baseline_probability``, ``crm_probability`` (the CRM's
        own ``closeprobability``), ``expected_value``, ``value_at_risk`` and ``reasons``; sorted by
        expected value.
    """
    open_ = frame[frame["status"] == "open"].copy()
    if open_.empty:
        return open_.assign(win_probability=[], baseline_probability=[], crm_probability=[],
                            expected_value=[], value_at_risk=[], reasons=[])
    open_["win_probability"] = model.predict(open_)
    open_["baseline_probability"] = model.baseline.predict(open_)
    open_["crm_probability"] = open_["closeprobability"].astype(float) / 100.0
    open_["expected_value"] = open_["win_probability"] * open_["value"]
    open_["value_at_risk"] = (1.0 - open_["win_probability"]) * open_["value"]
    open_["reasons"] = _reasons(model, open_, top)
    return open_.sort_values("expected_value", ascending=False).reset_index(drop=True)


def _reasons(model: WinModel, frame: pd.DataFrame, top: int) -> list[str]:
    pre = model.pipeline.named_steps["features"]
    names = list(pre.get_feature_names_out())
    x = pre.transform(_inputs(frame, model.features))
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    x_train = pre.transform(_inputs(model.train, model.features))
    x_train = x_train.toarray() if hasattr(x_train, "toarray") else np.asarray(x_train)
    contrib = (x - x_train.mean(axis=0)) * model.coefficients.reindex(names).to_numpy()
    labels = {f.column: f.label for f in model.features}
    groups: dict[str, list[int]] = {}
    for j, n in enumerate(names):
        column = n.split("__", 1)[1]
        column = next((f.column for f in model.features if f.transform == "category"
                       and column.startswith(f.column + "_")), column)
        groups.setdefault(column, []).append(j)
    by_feature = np.column_stack([contrib[:, idx].sum(axis=1) for idx in groups.values()])
    keys = list(groups)
    out = []
    for row in by_feature:
        order = np.argsort(-np.abs(row))[:top]
        out.append("; ".join(f"{labels.get(keys[k], keys[k])}: {row[k]:+.2f}" for k in order))
    return out
