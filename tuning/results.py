"""What a search found: its trials, every sweep point, the Pareto front; the tables, plot and summary.

After the trials end, :func:`collect` turns Ray's results into three tables, written in the
experiment directory: ``trials.csv`` (one row per trial: status, sampled values, node, GPU,
checkpoint), ``all_points.csv`` (every sweep point of every completed trial) and ``pareto.csv``
(the non-dominated points over the objectives), plus the front's hypervolume.
:func:`plot_front` draws ``pareto.png``; :func:`print_summary` is the table a user reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Result, ResultGrid

from trainables.names import CHECKPOINT_FILE, ERROR, PHASE, TRAIN
from tuning.names import FRONT_CSV, FRONT_PNG, POINTS_CSV, TRIALS_CSV
from trainables.sweep import table_from_report
from tuning import pareto, selection
from tuning.pareto import Objective
from tuning.selection import Rules
from tuning.spec import Spec

LATENCY_TRIAL, LATENCY_QUIET = "trial", "quiet"  # latency_source: timed inside a trial, or re-measured quiet

# what trials.csv keeps of a trial's last report, beside its status and sampled values
_TRIAL_COLUMNS = ("method", "int8", "node_id", "cuda_visible_devices", "trial_start", "trial_end", ERROR)


@dataclass
class SearchResult:
    path: Path  # the experiment directory (what `prunetune resume` takes)
    trials: pd.DataFrame  # one row per trained trial
    points: pd.DataFrame  # one row per sweep point of every completed trial
    front: pd.DataFrame  # the Pareto-optimal points among the shippable ones (selection.candidates)
    hypervolume: float | None = None  # of the front, 2 objectives only (reference: see reference_point)
    rules: Rules = field(default_factory=Rules)  # the floor and budgets the front and the aliases obey
    dense_accuracy: float = math.nan  # of the best equal-compute dense point (the accuracy-drop reference)
    aliases: dict[str, Any] = field(default_factory=dict)  # alias -> front row (index label); "pick" if feasible

    def files(self) -> list[Path]:
        """The tables (and the plot, once drawn) in the experiment directory."""
        return [f for f in (self.path / n for n in (TRIALS_CSV, POINTS_CSV, FRONT_CSV, FRONT_PNG)) if f.is_file()]

    def checkpoints(self) -> dict[str, Path]:
        """Trial id -> its dense checkpoint file, for the trials that have one."""
        return {r.trial_id: Path(r.checkpoint) / CHECKPOINT_FILE
                for r in self.trials.itertuples() if isinstance(r.checkpoint, str)}


def collect(spec: Spec, exp_dir: Path, grid: ResultGrid, rules: Rules) -> SearchResult:
    """Trials, every sweep point and the Pareto front of a finished search; written to ``exp_dir``.
    Latencies are the trials' own (``latency_source = trial``) until :mod:`tuning.quiet` re-measures."""
    trials = pd.DataFrame([_trial_row(r) for r in grid])
    tables = [t for t in (_points(r) for r in grid) if t is not None]
    points = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(points):
        points["latency_source"] = LATENCY_TRIAL
    trials.to_csv(exp_dir / TRIALS_CSV, index=False)
    return refresh(SearchResult(exp_dir, trials, points, points.iloc[:0], rules=rules), spec)


def refresh(res: SearchResult, spec: Spec) -> SearchResult:
    """Recompute the front (over the shippable points above the floor), its hypervolume and the
    dense reference from ``res.points``, and write ``all_points.csv`` and ``pareto.csv``."""
    objectives = spec.search.objectives
    shippable = selection.candidates(res.points, res.rules)
    res.front = pareto.front(shippable, objectives) if len(shippable) else shippable
    res.hypervolume = None
    if len(objectives) == 2 and len(shippable):
        res.hypervolume = pareto.hypervolume_2d(shippable, objectives, reference_point(shippable, objectives))
    res.dense_accuracy = selection.dense_reference(res.points, res.rules)
    res.aliases = selection.pick(res.front, objectives, res.rules, res.dense_accuracy) if len(res.front) else {}
    res.points.to_csv(res.path / POINTS_CSV, index=False)
    res.front.to_csv(res.path / FRONT_CSV, index=False)
    return res


def reference_point(points: pd.DataFrame, objectives: list[Objective]) -> list[float]:
    """The hypervolume's reference: 0 for a max objective (accuracy), 1.1 x the worst value
    seen for a min one (latency), so every point with a nonzero max objective counts."""
    return [0.0 if mode == "max" else 1.1 * points[name].max() for name, mode in objectives]


def _trial_id(r: Result) -> str:
    return (r.metrics or {}).get("trial_id", Path(r.path).name if r.path else "?")


def _trial_row(r: Result) -> dict[str, Any]:
    m = r.metrics or {}
    status = "error" if r.error else {TRAIN: "stopped"}.get(m.get(PHASE), m.get(PHASE, "unknown"))
    return {"trial_id": _trial_id(r), "lr": r.config.get("lr"),
            "prune_ratio": r.config.get("prune_ratio"), "status": status, "epoch": m.get("epoch"),
            "val_accuracy": m.get("val_accuracy"), **{k: m.get(k) for k in _TRIAL_COLUMNS},
            "checkpoint": r.checkpoint.path if r.checkpoint else None, "trial_dir": r.path}


def _points(r: Result) -> pd.DataFrame | None:
    """A completed trial's sweep table, with its trial id and lr in front."""
    m = r.metrics or {}
    table = None if r.error else table_from_report(m)
    if table is not None:
        table.insert(0, "trial_id", _trial_id(r))
        table.insert(1, "lr", m.get("lr"))
    return table


def plot_front(res: SearchResult, objectives: list[Objective]) -> Path | None:
    """``pareto.png``: the shippable points above the floor in blue, every other point grey (the
    no-retrain curve, points below the floor), the floor dashed, the front in red with each point
    labelled with the recipe a user exports (lr, method, ratio, int8). Two objectives only (with
    more, the front is in ``pareto.csv`` and the registry, not drawn).

    Optuna's ``plot_pareto_front`` draws a study's trials instead, and the study holds only
    the points its search space can express: a grid search has no study, and sweep points at
    ratios outside ``[ratio_min, ratio_max]`` or of methods the search does not sample
    (``search_method = false``) are not in it, so its front can differ from ``pareto.csv``;
    it labels no point, and its matplotlib version is experimental in Optuna 5.0. This plot
    draws exactly ``all_points.csv`` and ``pareto.csv``.
    """
    if len(res.front) == 0 or len(objectives) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # accuracy up the y axis, the other objective along x, whatever the order in the experiment file
    (y, _), (x, _) = sorted(objectives, key=lambda o: o.metric != "accuracy")
    shippable = selection.candidates(res.points, res.rules)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(res.points[x], res.points[y], s=12, c="lightgrey", label="not shippable (no-retrain, below the floor)")
    ax.scatter(shippable[x], shippable[y], s=16, c="tab:blue", alpha=0.6, label="shippable points")
    if y == "accuracy":
        ax.axhline(res.rules.floor, ls="--", c="grey", lw=1, label=f"accuracy floor {res.rules.floor:.2f}")
    f = res.front.sort_values(x)
    ax.plot(f[x], f[y], "o-", c="tab:red", label="Pareto front")
    for _, r in f.iterrows():
        ax.annotate(f"lr {r.lr:.2g} {r.method} {r.ratio:.2f}{' int8' if r.int8 else ''}", (r[x], r[y]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = res.path / FRONT_PNG
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def print_summary(res: SearchResult, spec: Spec) -> None:
    """Trial counts by status, the front's points, where the tables are."""
    t = res.trials
    print(f"\n{len(t)} trials: " + ", ".join(f"{n} {s}" for s, n in t.status.value_counts().items()))
    if len(res.front):
        names = [o.metric for o in spec.search.objectives]
        extra = ["test_accuracy", "accuracy_no_finetune", "latency_cv", "latency_source", "size_mb"]
        cols = ["trial_id", "lr", "method", "ratio", "int8", *dict.fromkeys(names + extra)]
        cols = [c for c in cols if c in res.front]
        with pd.option_context("display.width", 220, "display.max_columns", 20, "display.precision", 4):
            print(f"Pareto front ({', '.join(map(str, spec.search.objectives))}) of {len(res.front)} points among "
                  f"{len(res.points)}; {res.rules.describe()}; best equal-compute dense accuracy "
                  f"{res.dense_accuracy:.4f}:")
            print(res.front[cols].to_string(index=False))
    else:
        print("no shippable point above the floor: no Pareto front" if len(res.points) else
              "no completed trial: no Pareto front")
    print(f"results: {res.path} ({TRIALS_CSV}, {POINTS_CSV}, {FRONT_CSV})")
