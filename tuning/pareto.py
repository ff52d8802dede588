"""Pareto fronts over sweep points: non-dominated filter, 2-D hypervolume, knee point.

Objectives are :class:`Objective` s (``(column, "max" | "min")`` pairs), any number of them.
Internally every objective is turned into one to minimise (max columns are negated).
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import numpy as np
import pandas as pd

from trainables.names import POINT_METRICS


class Objective(NamedTuple):
    """One objective of a search: a point metric, maximised or minimised.

    Written ``"accuracy:max"`` in an experiment file (:meth:`parse` reads it, ``str()`` writes
    it back); a plain ``(metric, mode)`` pair everywhere else.
    """

    metric: str
    mode: Literal["max", "min"]

    @classmethod
    def parse(cls, text: str) -> "Objective":
        """``"accuracy:max"`` -> ``Objective("accuracy", "max")``; ValueError naming what is allowed."""
        metric, _, mode = text.partition(":")
        if metric not in POINT_METRICS or mode not in ("max", "min"):
            raise ValueError(f"objective {text!r} must be METRIC:max or METRIC:min with METRIC one of "
                             f"{', '.join(POINT_METRICS)}")
        return cls(metric, mode)

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


def _as_min(df: pd.DataFrame, objectives: Sequence[Objective]) -> np.ndarray:
    cols = [df[name].astype(float).to_numpy() * (-1.0 if mode == "max" else 1.0) for name, mode in objectives]
    return np.stack(cols, axis=1) if cols else np.empty((len(df), 0))


def non_dominated(df: pd.DataFrame, objectives: Sequence[Objective]) -> pd.Series:
    """Boolean mask of rows no other row dominates (as good in every objective, strictly better
    in one). Rows with NaN in an objective are never on the front; identical rows all are."""
    values = _as_min(df, objectives)
    finite = np.isfinite(values).all(axis=1)
    mask = finite.copy()
    idx = np.flatnonzero(finite)
    for i in idx:
        others = values[idx]
        dominated = (others <= values[i]).all(axis=1) & (others < values[i]).any(axis=1)
        mask[i] = not dominated.any()
    return pd.Series(mask, index=df.index)


def front(df: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """The non-dominated rows, sorted by the first objective (best first)."""
    name, mode = objectives[0]
    return df[non_dominated(df, objectives)].sort_values(name, ascending=(mode == "min"))


def hypervolume_2d(df: pd.DataFrame, objectives: Sequence[Objective], reference: Sequence[float]) -> float:
    """Exact area dominated by the points of ``df`` and bounded by ``reference``.

    ``reference`` is given in the objectives' own units (e.g. ``(0.0, 50.0)`` for accuracy:max
    and latency_ms:min: accuracy 0 and 50 ms); points not strictly better than it add nothing.
    """
    if len(objectives) != 2:
        raise ValueError("hypervolume_2d needs exactly two objectives")
    ref = np.array([r * (-1.0 if mode == "max" else 1.0) for r, (_, mode) in zip(reference, objectives)])
    pts = _as_min(df, objectives)
    pts = pts[np.isfinite(pts).all(axis=1) & (pts < ref).all(axis=1)]
    if not len(pts):
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]  # by first objective, then second
    area, best_second = 0.0, ref[1]
    for x, y in pts:
        if y < best_second:
            area += (ref[0] - x) * (best_second - y)
            best_second = y
    return float(area)


def knee(front_df: pd.DataFrame, objectives: Sequence[Objective]) -> int:
    """Index label of the front point closest to the ideal point after scaling each objective
    to [0, 1] over the front: the balanced choice between the extremes."""
    values = _as_min(front_df, objectives)
    lo, hi = values.min(axis=0), values.max(axis=0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    return front_df.index[int(np.argmin(np.linalg.norm(scaled, axis=1)))]
