"""What a search found: its trials, every sweep point, the front; the tables, plot and summary.

After the trials end, :func:`collect` turns Tune's results into two tables, one row per trial and
one per sweep point of every completed trial; :mod:`tuning.front` computes the front from the
points. Once the front is final, :func:`write` writes them, once, in the experiment directory:
``trials.csv`` (status, sampled values, node, GPU, checkpoint), ``all_points.csv``,
``pareto.csv`` (the front's rows) and ``pareto.png``; :func:`summary` is the table a user reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.names import CHECKPOINT_FILE, ERROR
from tuning import report
from tuning.front import Front
from tuning.names import FRONT_CSV, FRONT_PNG, POINTS_CSV, TRIALS_CSV

LATENCY_TRIAL, LATENCY_QUIET = "trial", "quiet"  # latency_source: timed inside a trial, or re-measured quiet

# what trials.csv keeps of a trial's last report, beside its status and sampled values
_TRIAL_COLUMNS = ("method", "int8", "node_id", "cuda_visible_devices", "trial_start", "trial_end", ERROR)


@dataclass(frozen=True)
class SearchResult:
    """A finished search, as :func:`tuning.search` returns it."""

    path: Path  # the experiment directory (what `prunetune resume` takes)
    trials: pd.DataFrame  # one row per trial
    front: Front  # every point, the Pareto-optimal ones, the aliases, the hypervolume
    grid: Any = None  # Ray Tune's ResultGrid
    study: Any = None  # the Optuna study the searcher kept (None for a grid search)
    spec: Any = None  # the experiment spec it ran (tuning.spec.Spec)

    @property
    def points(self) -> pd.DataFrame:
        return self.front.points

    def files(self) -> list[Path]:
        """The tables and the plot written in the experiment directory."""
        return [f for f in (self.path / n for n in (TRIALS_CSV, POINTS_CSV, FRONT_CSV, FRONT_PNG)) if f.is_file()]

    def checkpoints(self) -> dict[str, Path]:
        """Trial id -> its dense checkpoint file, for the trials that have one."""
        return checkpoints(self.trials)


def checkpoints(trials: pd.DataFrame) -> dict[str, Path]:
    """Trial id -> its dense checkpoint file, for the trials of ``trials`` that have one."""
    return {r.trial_id: Path(r.checkpoint) / CHECKPOINT_FILE for r in trials.itertuples() if isinstance(r.checkpoint, str)}


def collect(grid: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tune's results (a ``ResultGrid``) as (trials, points): one row per trial, and one per sweep
    point of every completed trial, with its trial id and lr in front. Latencies are the trials'
    own (``latency_source = trial``) until :mod:`tuning.quiet` re-measures."""
    reports = [(report.last(r), r) for r in grid]
    trials = pd.DataFrame([_trial_row(rep, r) for rep, r in reports])
    tables = [rep.points.assign(trial_id=rep.trial_id, lr=rep.metrics.get("lr"))
              for rep, _ in reports if rep.points is not None and not rep.error]
    points = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(points):
        points = points[["trial_id", "lr", *(c for c in points if c not in ("trial_id", "lr"))]]
        points["latency_source"] = LATENCY_TRIAL
    return trials, points


def _trial_row(rep: report.TrialReport, r: Any) -> dict[str, Any]:
    m = rep.metrics
    return {"trial_id": rep.trial_id, "lr": rep.config.get("lr"), "prune_ratio": rep.config.get("prune_ratio"),
            "status": rep.status, "epoch": rep.epoch, "val_accuracy": m.get("val_accuracy"),
            **{k: m.get(k) for k in _TRIAL_COLUMNS}, "checkpoint": r.checkpoint.path if r.checkpoint else None,
            "trial_dir": r.path}


def write(res: SearchResult) -> list[Path]:
    """The tables and the plot of the final front, in the experiment directory; the files written."""
    res.trials.to_csv(res.path / TRIALS_CSV, index=False)
    res.points.to_csv(res.path / POINTS_CSV, index=False)
    res.front.rows.to_csv(res.path / FRONT_CSV, index=False)
    _plot(res.front, res.path / FRONT_PNG)
    return res.files()


def _plot(front: Front, out: Path) -> Path | None:
    """``pareto.png`` over the front's plane (:func:`tuning.pareto.plane`: accuracy up the y axis,
    latency, else size, along x, whatever the objectives' order): the shippable points above the
    floor in blue, every other point grey (the no-retrain curve, points below the floor), the
    floor dashed, the front in red with each point labelled with the recipe a user exports (lr,
    method, ratio, int8). A third objective's front is in ``pareto.csv``, not drawn.

    Optuna's ``plot_pareto_front`` draws a study's trials instead, and the study holds only
    the points its search space can express: a grid search has no study, and sweep points at
    ratios outside ``[ratio_min, ratio_max]`` or of methods the search does not sample
    (``search_method = false``) are not in it, so its front can differ from ``pareto.csv``;
    it labels no point, and its matplotlib version is experimental in Optuna 5.0. This plot
    draws exactly ``all_points.csv`` and ``pareto.csv``.
    """
    out.unlink(missing_ok=True)
    if not len(front) or front.plane is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, x = (o.metric for o in front.plane)
    points, shippable = front.points, front.shippable
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(points[x], points[y], s=12, c="lightgrey", label="not shippable (no-retrain, below the floor)")
    ax.scatter(shippable[x], shippable[y], s=16, c="tab:blue", alpha=0.6, label="shippable points")
    if y == "accuracy":
        ax.axhline(front.rules.floor, ls="--", c="grey", lw=1, label=f"accuracy floor {front.rules.floor:.2f}")
    f = front.rows.sort_values(x)
    ax.plot(f[x], f[y], "o-", c="tab:red", label="Pareto front")
    for _, r in f.iterrows():
        ax.annotate(f"lr {r.lr:.2g} {r.method} {r.ratio:.2f}{' int8' if r.int8 else ''}", (r[x], r[y]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary(res: SearchResult, where: str | None = None) -> str:
    """Trial counts by status, the front's points, where the tables are: ``where``, the
    experiment's URI on an object store (``res.path`` is then the driver's local copy)."""
    t, front = res.trials, res.front
    lines = [f"\n{len(t)} trials: " + ", ".join(f"{n} {s}" for s, n in t.status.value_counts().items())]
    if len(front):
        names = [o.metric for o in front.objectives]
        extra = ["test_accuracy", "accuracy_no_finetune", "latency_cv", "latency_source", "size_mb"]
        cols = [c for c in ["trial_id", "lr", "method", "ratio", "int8", *dict.fromkeys(names + extra)] if c in front.rows]
        hv = ("" if front.hypervolume is None else f"; hypervolume {front.hypervolume:.4g} over "
              f"{' x '.join(map(str, front.plane))} from {[front.reference[front.objectives.index(o)] for o in front.plane]}")
        with pd.option_context("display.width", 220, "display.max_columns", 20, "display.precision", 4):
            lines += [f"Pareto front ({', '.join(map(str, front.objectives))}) of {len(front)} points among "
                      f"{len(res.points)}; {front.rules.describe()}; best equal-compute dense accuracy "
                      f"{front.dense_accuracy:.4f}{hv}:", front.rows[cols].to_string(index=False)]
    else:
        lines.append("no shippable point above the floor: no Pareto front" if len(res.points) else
                     "no completed trial: no Pareto front")
    at = f"{where} (local copy: {res.path})" if where else res.path
    lines.append(f"results: {at} ({TRIALS_CSV}, {POINTS_CSV}, {FRONT_CSV})")
    return "\n".join(lines)
