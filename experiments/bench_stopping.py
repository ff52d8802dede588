"""Hypervolume against trial-epochs spent (the cluster's cost): samplers with and without
multi-objective early stopping, and the stop rule.

The surrogate is ``bench_search.py``'s (the origin report's Table 1 mixed over lr, channel_l1
faster, fine-tuning recovering most of a pruned point's drop), given a **training curve**: a
trial trains ``EPOCHS`` epochs, and its accuracy after epoch e is chance plus the final gain
times ``(1 - exp(-e / tau)) / (1 - exp(-EPOCHS / tau))``, tau = 1.5 epochs at lr 0.01 and
longer at lower lr (``tau = 1.5 * (0.01 / lr) ** 0.5``, up to 6 at lr 0.001): what the subset's
logs show (a good lr reaches most of its accuracy in the first few of 10 epochs; lr 0.001
keeps climbing). A completed trial costs ``EPOCHS`` plus 2 x ``FINETUNE`` epochs (its own point
and the equal-compute dense one); a trial stopped at epoch e costs e.

Early stopping is ``tuning.stopping.verdict`` itself: at rungs 1, 2, 4, 8 each trial predicts
its no-retrain point at its own (method, ratio) with the accuracy its curve has reached, and is
stopped when another trial's point at the rung dominates it by ``MARGIN`` or it is not in the best
1/eta of the rung. Stopped trials are told to Optuna as pruned, and their predicted point at the
rung is added as evidence at their params (``tuning.space.SweepFeedbackSearch._tell_predicted``);
completed ones with sweep feedback (the default design). Scored: the hypervolume of the deployable points of the
completed trials (``tuning.pareto.hypervolume_2d``, reference accuracy 0, ``REF_MS`` ms).

The stop rule (``tuning.stopping.StopRule``: no relative hypervolume gain above ``--tolerance``
over the last ``--patience`` completed trials) is replayed on 40-trial TPE + early-stopping runs.

    python experiments/bench_stopping.py --seeds 8
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import FINETUNE, METRICS, OBJECTIVES, REF_MS, Surrogate, make_spec, train_and_sweep  # noqa: E402

from tuning import pareto, stopping  # noqa: E402
from tuning.space import make_sampler, optuna_space, sweep_evidence  # noqa: E402

EPOCHS, ETA, MARGIN = 10, 2, 0.02
FULL = EPOCHS + 2 * FINETUNE  # trial-epochs of a completed trial
STRATEGIES = ("random", "tpe", "tpe+es", "gp", "gp+es")
CHANCE = 0.10


def tau(lr: float) -> float:
    return min(6.0, 1.5 * (0.01 / lr) ** 0.5)


def progress(lr: float, epoch: int) -> float:
    """Share of its final gain over chance a trial has after ``epoch`` epochs."""
    return (1 - math.exp(-epoch / tau(lr))) / (1 - math.exp(-EPOCHS / tau(lr)))


def run(strategy: str, seed: int, budget_epochs: int, sur: Surrogate, planned: int, max_trials: int = 200) -> pd.DataFrame:
    """One search until ``budget_epochs`` trial-epochs are spent: after each trial, its cost so far,
    the hypervolume of the completed trials' deployable points, and whether it completed.
    ``planned``: the trials the search is set up for (num_samples: the sampler's random start-up)."""
    spec = make_spec(seed, planned, {"random": "random", "gp": "gp"}.get(strategy.split("+")[0], "tpe"))
    space = optuna_space(spec)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
    rungs = {r: [] for r in stopping.rungs(EPOCHS, ETA)}
    points, rows, spent = [], [], 0
    for i in range(max_trials):
        trial = study.ask(space)
        result = train_and_sweep(sur, spec, trial.params, seed, i)
        stopped_at, predicted = _early_stop(result, sur, seed, i, rungs) if strategy.endswith("+es") else (None, None)
        if stopped_at is not None:
            spent += stopped_at
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            if strategy != "random":  # the searcher's _tell_predicted: the point it was heading to
                study.add_trial(optuna.trial.create_trial(
                    params=trial.params, distributions={k: space[k] for k in trial.params}, values=list(predicted)))
        else:
            spent += FULL
            study.tell(trial, [result[m] for m in METRICS])
            if strategy != "random":
                for params, values, _ in sweep_evidence(result["sweep"], result, space, METRICS):
                    study.add_trial(optuna.trial.create_trial(
                        params=params, distributions={k: space[k] for k in params}, values=values))
            points.append(result["sweep"][result["sweep"].finetune_epochs == FINETUNE])
        hv = pareto.hypervolume_2d(pd.concat(points, ignore_index=True), OBJECTIVES, (0.0, REF_MS)) if points else 0.0
        rows.append({"trial": i + 1, "epochs": spent, "hv": hv, "completed": stopped_at is None})
        if spent >= budget_epochs:
            break
    return pd.DataFrame(rows)


def _early_stop(result: dict, sur: Surrogate, seed: int, index: int, rungs: dict) -> tuple[int | None, tuple | None]:
    """The epoch ``tuning.stopping.verdict`` stops this trial at and its predicted point there, or
    (None, None)."""
    lr, method, ratio = result["lr"], result["method"], result["prune_ratio"]
    offset = float(np.random.default_rng([seed, index]).normal(0.0, 0.3))
    final, latency = sur.point(lr, method, ratio, offset)
    for epoch, seen in rungs.items():
        point = (CHANCE + (final - CHANCE) * progress(lr, epoch), latency)
        why = stopping.verdict(point, seen, MARGIN, ETA)
        seen.append(point)
        if why:
            return epoch, point
    return None, None


def at(df: pd.DataFrame, epochs: int) -> float:
    """Hypervolume reached within ``epochs`` trial-epochs."""
    within = df[df.epochs <= epochs]
    return float(within.hv.iloc[-1]) if len(within) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--trials", type=int, default=20, help="the full-trial budget TPE is measured at")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.005)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sur, t0, budget = Surrogate(), time.perf_counter(), args.trials * FULL
    runs = {s: [run(s, seed, budget, sur, args.trials) for seed in range(args.seeds)] for s in STRATEGIES}
    marks = [budget // 5 * k for k in range(1, 6)]
    print(f"# bench_stopping {datetime.date.today().isoformat()}: hypervolume (accuracy x ms, reference 0, {REF_MS:g} ms) "
          f"of the completed trials' deployable points by trial-epochs spent; {EPOCHS} epochs + {2 * FINETUNE} "
          f"fine-tuning per completed trial; early stopping eta {ETA}, margin {MARGIN}; {args.seeds} seeds, mean ± std")
    table = pd.DataFrame({s: [f"{np.mean([at(d, m) for d in runs[s]]):.3f} ± {np.std([at(d, m) for d in runs[s]], ddof=1):.3f}"
                              for m in marks] for s in STRATEGIES}, index=pd.Index(marks, name="trial-epochs"))
    print(table.to_string())
    target = np.mean([at(d, budget) for d in runs["tpe"]])
    for s in STRATEGIES:
        reach = [d[d.hv >= target].epochs.min() for d in runs[s]]
        share = np.nanmean([r / budget if pd.notna(r) else np.nan for r in reach])
        done = np.mean([d.completed.sum() for d in runs[s]])
        print(f"{s:8s}: reaches TPE's {args.trials}-trial hypervolume ({target:.3f}) in {sum(pd.notna(r) for r in reach)}"
              f"/{args.seeds} seeds, at {100 * share:.0f}% of its {budget} trial-epochs (mean); "
              f"{done:.1f} completed trials, {np.mean([len(d) for d in runs[s]]) - done:.1f} stopped")
    _stop_rule(sur, args)
    print(f"# {time.perf_counter() - t0:.1f} s")


def _stop_rule(sur: Surrogate, args: argparse.Namespace) -> None:
    """Replay the stop rule on 40-full-trial budgets of TPE + early stopping."""
    ends, shares = [], []
    for seed in range(args.seeds):
        df = run("tpe+es", seed, 40 * FULL, sur, 40)
        rule = stopping.StopRule(patience=args.patience, tolerance=args.tolerance)
        hv_done = df[df.completed].hv.tolist()
        rule.hypervolumes = []
        end = len(hv_done)
        for k, hv in enumerate(hv_done):
            rule.hypervolumes.append(hv)
            if rule.stop_all():
                end = k + 1
                break
        ends.append(df[df.completed].epochs.iloc[end - 1] / df.epochs.iloc[-1])
        shares.append(hv_done[end - 1] / hv_done[-1])
    print(f"stop rule (patience {args.patience}, tolerance {args.tolerance}): ends at {100 * np.mean(ends):.0f}% of the "
          f"40-trial budget's trial-epochs (mean), holding {100 * np.mean(shares):.1f}% (min {100 * min(shares):.1f}%) "
          f"of the hypervolume the whole budget reaches")


if __name__ == "__main__":
    main()
