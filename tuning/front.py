"""The front of a search: which points may be shipped, which are Pareto-optimal, which one to ship.

:func:`compute` turns every point, the :class:`Rules` and the objectives into one frozen
:class:`Front` (its rows, the floor, the dense reference, the aliases, the hypervolume); the
tables, the plot, the registry and the summary are all written from it. A search measures
many points; users leave with one. The rules, in order:

- **deployable**: a point that is a file: the ONNX classifier a trial built of its own point
  and of its equal-compute dense point (fine-tuned for ``[search] finetune_epochs``), measured
  as that file (``artifact``). The no-retrain sweep is the cheap curve beside them.
- **the floor** (``[search] min_accuracy``; by default twice chance, ``2 / classes``: 0.2 for
  CIFAR-10): a model below it guesses, whatever its latency. It never enters the front, the
  registry or the front line of ``pareto.png``.
- **the budgets** (``[search] max_latency_ms``, ``max_accuracy_drop``; ``inf``: none): the
  accuracy drop is measured against the best equal-compute dense point of the search (the
  dense model given the same fine-tuning epochs), so a drop is never the extra epochs' gain.
- **the front**: the non-dominated shippable points over every objective, in any order and any
  number; its hypervolume is taken over two of them by role (:func:`tuning.pareto.plane`:
  accuracy and latency, else accuracy and size) against a reference point fixed by the
  experiment file (:func:`tuning.pareto.reference_point`), so two searches of one file compare;
- **the aliases**, by what they mean, never by an objective's position: ``best-accuracy``,
  ``fastest`` and ``knee`` among the front; ``pick``, the fastest point that meets both budgets
  (the fastest feasible point is always on the front: whatever dominates it meets them too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd

from trainables.names import POINT_METRICS
from trainables.sweep import is_dense
from tuning import pareto
from tuning.pareto import Objective

if TYPE_CHECKING:
    from tuning.spec import SearchConfig

ALIASES = ("best-accuracy", "fastest", "knee", "pick")


@dataclass(frozen=True)
class Limit:
    """A budget on any point metric (``[search] limits``): ``"size_mb<=5"`` or ``"throughput_ips>=1000"``."""

    metric: str
    bound: float
    upper: bool  # at most bound (<=), else at least (>=)

    @classmethod
    def parse(cls, text: str) -> "Limit":
        """``"size_mb<=5"`` -> ``Limit("size_mb", 5.0, True)``; ValueError naming what is allowed."""
        op = "<=" if "<=" in text else ">="
        metric, _, value = (part.strip() for part in text.partition(op))
        try:
            bound = float(value)
        except ValueError:
            bound = math.nan
        if metric not in POINT_METRICS or metric == "test_accuracy" or not math.isfinite(bound):
            raise ValueError(f"limit {text!r} must be METRIC<=NUMBER or METRIC>=NUMBER with METRIC one of "
                             f"{', '.join(m for m in POINT_METRICS if m != 'test_accuracy')}, e.g. \"size_mb<=5\"")
        return cls(metric, bound, op == "<=")

    def excess(self, value: Any) -> float:
        """How far past the bound ``value`` is (<= 0: met); a point without the metric meets nothing."""
        if value is None or not math.isfinite(float(value)):
            return 1.0
        return float(value) - self.bound if self.upper else self.bound - float(value)

    def __str__(self) -> str:
        return f"{self.metric}{'<=' if self.upper else '>='}{self.bound:g}"


@dataclass(frozen=True)
class Rules:
    """What decides which points may be shipped and which is picked."""

    finetune_epochs: int = 0  # the deployable points' fine-tuning epochs (0: every point)
    floor: float = 0.0  # minimum validation accuracy (0-1)
    max_latency_ms: float = math.inf
    max_accuracy_drop: float = math.inf  # below the best equal-compute dense point, 0-1
    limits: tuple[Limit, ...] = ()  # on any point metric

    @property
    def budgeted(self) -> bool:
        return math.isfinite(self.max_latency_ms) or math.isfinite(self.max_accuracy_drop) or bool(self.limits)

    def excess(self, point: Mapping[str, Any], dense_accuracy: float) -> tuple[float, ...]:
        """How far over each budget ``point`` (a row) is, latency, accuracy drop, then each limit
        (<= 0: met; -1 where there is no budget). A point meets no accuracy-drop budget while there
        is no dense reference to measure it against. Optuna's constraints are these values."""
        lat = point["latency_ms"] - self.max_latency_ms if math.isfinite(self.max_latency_ms) else -1.0
        drop = -1.0
        if math.isfinite(self.max_accuracy_drop):
            drop = ((dense_accuracy - point["accuracy"]) - self.max_accuracy_drop - 1e-12
                    if math.isfinite(dense_accuracy) else 1.0)
        return (lat, drop, *(limit.excess(point.get(limit.metric)) for limit in self.limits))

    def describe(self) -> str:
        parts = [f"floor accuracy >= {self.floor:.3f}"]
        if math.isfinite(self.max_latency_ms):
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if math.isfinite(self.max_accuracy_drop):
            parts.append(f"accuracy drop <= {100 * self.max_accuracy_drop:g} points")
        return ", ".join(parts + [str(limit) for limit in self.limits])


def rules_for(search: SearchConfig, num_classes: int) -> Rules:
    """The rules of a search: its ``[search]`` settings, the floor resolved for ``num_classes``."""
    floor = search.min_accuracy if search.min_accuracy >= 0 else default_floor(num_classes)
    return Rules(finetune_epochs=search.finetune_epochs, floor=floor, max_latency_ms=search.max_latency_ms,
                 max_accuracy_drop=search.max_accuracy_drop, limits=tuple(search.limits))


@dataclass(frozen=True)
class Front:
    """A search's front, computed once (:func:`compute`); never changed in place."""

    points: pd.DataFrame  # every point of every completed trial (all_points.csv)
    rows: pd.DataFrame  # the Pareto-optimal points among the shippable ones (pareto.csv)
    rules: Rules
    objectives: tuple[Objective, ...]
    dense_accuracy: float = math.nan  # of the best equal-compute dense point (the accuracy-drop reference)
    aliases: dict[str, Any] = field(default_factory=dict)  # alias -> row (index label); "pick" if feasible
    hypervolume: float | None = None  # over plane, from reference; None without a plane or a point
    plane: tuple[Objective, Objective] | None = None  # the two objectives of the hypervolume and the plot
    reference: tuple[float, ...] = ()  # the hypervolume's reference point, one value per objective

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shippable(self) -> pd.DataFrame:
        return candidates(self.points, self.rules)

    @property
    def feasible(self) -> bool:
        """A point meets the budgets (always, without budgets, when there is a front)."""
        return "pick" in self.aliases

    def with_points(self, points: pd.DataFrame) -> "Front":
        """The front of ``points`` under the same rules, objectives and reference (after the
        quiet re-measurement changed their latencies)."""
        return compute(points, self.rules, self.objectives, self.reference)


def for_search(points: pd.DataFrame, search: SearchConfig, num_classes: int) -> Front:
    """The front of a search's points under its ``[search]`` rules, objectives and reference."""
    return compute(points, rules_for(search, num_classes), search.objectives, search.hypervolume_reference)


def compute(points: pd.DataFrame, rules: Rules, objectives: Sequence[Objective],
            reference: Sequence[float] = ()) -> Front:
    """The front of ``points`` (see the module docstring); ``reference``: one value per objective
    (default :func:`tuning.pareto.reference_point`)."""
    objectives = tuple(objectives)
    shippable, dense = candidates(points, rules), dense_reference(points, rules)
    found = pareto.analyse(shippable, objectives, reference)
    aliases = _aliases(found.rows, found.knee, rules, dense) if len(found.rows) else {}
    return Front(points, found.rows, rules, objectives, dense, aliases, found.hypervolume, found.plane, found.reference)


def default_floor(num_classes: int) -> float:
    """Twice chance: ``2 / num_classes`` (0.2 for 10 classes)."""
    return 2.0 / max(num_classes, 2)


def deployable(points: pd.DataFrame, rules: Rules) -> pd.Series:
    """Rows that are shippable models (see the module docstring), with finite accuracy. A search
    recorded before points were files: its fine-tuned points (or, without fine-tuning, all)."""
    if not len(points):
        return pd.Series(dtype=bool)
    ok = points["accuracy"].notna()
    if "artifact" in points:
        return ok & points["artifact"].notna()
    if rules.finetune_epochs and "finetune_epochs" in points:
        ok &= points["finetune_epochs"] == rules.finetune_epochs
    return ok


def candidates(points: pd.DataFrame, rules: Rules) -> pd.DataFrame:
    """The deployable rows above the floor: what the front is computed over."""
    if not len(points):
        return points
    return points[deployable(points, rules) & (points["accuracy"] >= rules.floor)]


def dense_reference(points: pd.DataFrame, rules: Rules) -> float:
    """Accuracy of the best equal-compute dense point (ratio 0, fp32, deployable); NaN if none."""
    if not len(points):
        return math.nan
    dense = points[deployable(points, rules) & is_dense(points)]
    return float(dense["accuracy"].max()) if len(dense) else math.nan


def feasible(points: pd.DataFrame, rules: Rules, dense_accuracy: float) -> pd.Series:
    """Rows that meet every budget (:meth:`Rules.excess`)."""
    met = [max(rules.excess(row, dense_accuracy)) <= 0 for row in points.to_dict("records")]
    return pd.Series(met, index=points.index, dtype=bool)


def pick(front: pd.DataFrame, objectives: list[Objective], rules: Rules, dense_accuracy: float) -> dict[str, Any]:
    """Alias -> the front row (index label) it names, by what the alias means, whatever the order
    or number of the objectives: ``best-accuracy`` the most accurate (validation), ``fastest`` the
    lowest latency (ties: the more accurate), ``knee`` the balanced one over every objective, and
    ``pick`` the fastest within the budgets, there only when a point meets them (always, without
    budgets: then it is the fastest)."""
    return _aliases(front, pareto.knee(front, objectives), rules, dense_accuracy)


def _aliases(front: pd.DataFrame, knee: Any, rules: Rules, dense_accuracy: float) -> dict[str, Any]:
    out = {
        "best-accuracy": front.sort_values(["accuracy", "latency_ms"], ascending=[False, True]).index[0],
        "fastest": front.sort_values(["latency_ms", "accuracy"], ascending=[True, False]).index[0],
        "knee": knee,
    }
    chosen = fastest_feasible(front, rules, dense_accuracy)
    if chosen is not None:
        out["pick"] = chosen
    return out


def fastest_feasible(points: pd.DataFrame, rules: Rules, dense_accuracy: float) -> Any | None:
    """Index label of the fastest point (ties: the more accurate) that meets both budgets, or None."""
    ok = points[feasible(points, rules, dense_accuracy)]
    return ok.sort_values(["latency_ms", "accuracy"], ascending=[True, False]).index[0] if len(ok) else None


def closest(points: pd.DataFrame, rules: Rules, dense_accuracy: float) -> str:
    """Why no point meets the budgets, naming the points closest to them: the fastest within the
    accuracy budget and the most accurate within the latency budget."""
    lines = [f"no point meets the budgets ({rules.describe()}; best equal-compute dense accuracy "
             f"{dense_accuracy:.4f})."]
    if rules.limits:  # the latency and accuracy budgets among the points within the limits
        points = points[[all(limit.excess(row.get(limit.metric)) <= 0 for limit in rules.limits)
                         for row in points.to_dict("records")]]
        if not len(points):
            return "\n".join(lines + [f"  no point is within the limits ({', '.join(map(str, rules.limits))}); relax "
                                      "[search] limits, or search further (more trials, more fine-tuning epochs)."])
    drop = dense_accuracy - points["accuracy"]
    within_drop = points[drop <= rules.max_accuracy_drop + 1e-12]
    if len(within_drop):
        r = within_drop.sort_values("latency_ms").iloc[0]
        lines.append(f"  fastest within the accuracy budget: {_name(r)} at {r.latency_ms:.3f} ms "
                     f"({r.latency_ms - rules.max_latency_ms:+.3f} ms over)")
    within_latency = points[points["latency_ms"] <= rules.max_latency_ms]
    if len(within_latency):
        r = within_latency.sort_values("accuracy", ascending=False).iloc[0]
        lines.append(f"  most accurate within the latency budget: {_name(r)}, accuracy {r.accuracy:.4f} "
                     f"(drop {100 * (dense_accuracy - r.accuracy):.2f} points, budget "
                     f"{100 * rules.max_accuracy_drop:g})")
    if len(lines) == 1:
        lines.append("  every point misses both budgets; the fastest: " +
                     _name(points.sort_values("latency_ms").iloc[0]))
    lines.append("Relax --max-latency-ms / --max-accuracy-drop ([search] max_latency_ms / max_accuracy_drop), "
                 "or search further (more trials, more fine-tuning epochs).")
    return "\n".join(lines)


def _name(r: pd.Series) -> str:
    return (f"trial {r.trial_id} {r.method} ratio {r.ratio:g}{' int8' if bool(r.int8) else ''} "
            f"(lr {r.lr:.3g})")
