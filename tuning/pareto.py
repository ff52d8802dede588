"""Pareto fronts over sweep points: objectives by role, non-dominated filter, 2-D hypervolume from a
fixed reference point, knee point; :func:`analyse` does them all for :mod:`tuning.front`.

Objectives are :class:`Objective` s (a column, ``"max"`` or ``"min"``, and the role the column
plays), any number of them. Internally every objective is turned into one to minimise (max
columns are negated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
import pandas as pd

from trainables.names import POINT_METRICS


# What each metric stands for. Aliases and plots go by role, never by an objective's position.
ROLES = {"accuracy": "accuracy", "test_accuracy": "accuracy", "latency_ms": "latency", "latency_p90_ms": "latency",
         "throughput_ips": "latency", "size_mb": "size", "nonzero_params": "size", "sparsity": "size", "macs": "size"}
# The hypervolume's reference for a min objective, fixed so that two searches of one experiment
# file compare (``[search] hypervolume_reference`` sets others): a point worse than it adds nothing.
# A max objective's reference is 0.
MIN_REFERENCE = {"latency_ms": 100.0, "latency_p90_ms": 100.0, "size_mb": 1000.0, "nonzero_params": 1e9,
                 "macs": 1e11, "sparsity": 1.0}


@dataclass(frozen=True)
class Objective:
    """One objective of a search: a point metric, its direction, and its role (``accuracy``,
    ``latency`` or ``size``, from the metric).

    Written ``"accuracy:max"`` in an experiment file (:meth:`parse` reads it, ``str()`` writes
    it back).
    """

    metric: str
    direction: Literal["max", "min"]

    @property
    def role(self) -> str:
        return ROLES[self.metric]

    @property
    def sign(self) -> float:
        """-1 for a max objective: every objective is minimised inside this module."""
        return -1.0 if self.direction == "max" else 1.0

    @classmethod
    def parse(cls, text: str) -> "Objective":
        """``"accuracy:max"`` -> ``Objective("accuracy", "max")``; ValueError naming what is allowed."""
        metric, _, direction = text.partition(":")
        if metric not in POINT_METRICS or direction not in ("max", "min"):
            raise ValueError(f"objective {text!r} must be METRIC:max or METRIC:min with METRIC one of "
                             f"{', '.join(POINT_METRICS)}")
        return cls(metric, direction)

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


def plane(objectives: Sequence[Objective]) -> tuple[Objective, Objective] | None:
    """The two objectives a hypervolume and a plot are drawn over: the accuracy one and the first
    of another role (latency before size), whatever their order; None without both."""
    quality = [o for o in objectives if o.role == "accuracy"]
    cost = sorted((o for o in objectives if o.role != "accuracy"), key=lambda o: o.role != "latency")
    return (quality[0], cost[0]) if quality and cost else None


def reference_point(objectives: Sequence[Objective], given: Sequence[float] = ()) -> list[float]:
    """The hypervolume's reference point: ``given`` (one value per objective), else 0 for a max
    objective and :data:`MIN_REFERENCE` for a min one."""
    if given:
        return list(given)
    return [0.0 if o.direction == "max" else MIN_REFERENCE[o.metric] for o in objectives]


class Analysis(NamedTuple):
    """What :func:`analyse` finds in a set of points."""

    rows: pd.DataFrame  # the non-dominated ones, best first in the first objective
    knee: Any  # index label of the balanced one (None without rows)
    plane: tuple[Objective, Objective] | None  # the two objectives of the hypervolume
    reference: tuple[float, ...]  # one value per objective
    hypervolume: float | None  # over plane from reference; None without a plane or points


def analyse(df: pd.DataFrame, objectives: Sequence[Objective], reference: Sequence[float] = ()) -> Analysis:
    """The front of ``df`` over every objective, its knee, and its hypervolume over :func:`plane`
    from the fixed :func:`reference_point` (``reference``: one value per objective, else the defaults)."""
    objectives = tuple(objectives)
    rows = front(df, objectives) if len(df) else df
    plane_, ref = plane(objectives), tuple(reference_point(objectives, reference))
    hv = None
    if plane_ is not None and len(df):
        hv = hypervolume_2d(df, plane_, [ref[objectives.index(o)] for o in plane_])
    return Analysis(rows, knee(rows, objectives) if len(rows) else None, plane_, ref, hv)


def _as_min(df: pd.DataFrame, objectives: Sequence[Objective]) -> np.ndarray:
    cols = [df[o.metric].astype(float).to_numpy() * o.sign for o in objectives]
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
    first = objectives[0]
    return df[non_dominated(df, objectives)].sort_values(first.metric, ascending=(first.direction == "min"))


def hypervolume_2d(df: pd.DataFrame, objectives: Sequence[Objective], reference: Sequence[float]) -> float:
    """Exact area dominated by the points of ``df`` and bounded by ``reference``.

    ``reference`` is given in the objectives' own units (e.g. ``(0.0, 50.0)`` for accuracy:max
    and latency_ms:min: accuracy 0 and 50 ms); points not strictly better than it add nothing.
    """
    if len(objectives) != 2:
        raise ValueError("hypervolume_2d needs exactly two objectives")
    ref = np.array([r * o.sign for r, o in zip(reference, objectives)])
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
