"""Search efficiency: Pareto hypervolume vs trained trials, with and without sweep feedback.

Three strategies, each over ``--seeds`` seeds, on a cheap surrogate instead of training:

- ``random``: Optuna's RandomSampler; the study is told one point per trained trial.
- ``optuna``: the project's multi-objective TPE sampler (``tuning.space.make_sampler``:
  multivariate, seeded); the study is told one point per trained trial.
- ``optuna+feedback``: the same sampler, and after each trained trial every other point of
  its sweep is added to the study as a completed trial, through
  ``tuning.space.sweep_evidence`` exactly as ``SweepFeedbackSearch.on_trial_complete`` does.

What is scored: every trained trial always runs its whole sweep (both methods, ratios
0.0-0.8 step 0.1 plus its own ratio), so for **every** strategy the hypervolume is taken over
all sweep points of all trained trials so far -- the points the user really gets. The only
difference between strategies is what the sampler sees, so the benchmark asks whether
feedback makes the sampler pick better (lr, method, ratio) trials, not whether it has more
points. Hypervolume: ``tuning.pareto.hypervolume_2d`` on (accuracy 0-1: max, latency_ms: min)
with reference point (accuracy 0.0, ``REF_MS`` = 50 ms); units are accuracy x ms, at most
about 0.95 x 49 ~ 46.

Surrogate (no training): the origin report's Table 1 (``shared/data/seed_tables.csv``:
global_l1 accuracy without retraining at lr 0.001 and 0.01, ratios 0-0.8) interpolated
linearly over ratio. In t = log10(lr) the two columns are mixed with weight w = t + 3 (w = 0
at lr 0.001, 1 at 0.01), extrapolated up to w = 1.15 (reached at lr ~0.014, held to 0.02: the
knee keeps moving right), then w falls by 1.5 per decade (too high an lr makes the weights
fragile, the knee moves back left) and dense accuracy loses up to 6 points at lr 0.1. A pruned
point never beats the dense model of its lr (the extrapolation would, the table being noisy).
channel_l1 at ratio r = global_l1 at min(0.8, 1.6 r) minus 5 r points (steeper collapse).
Accuracy is clipped below at 10 % (chance). One Gaussian offset (0.3 points) per trained trial, from a generator seeded by
(seed, trial index), so all strategies see the same training noise. Latency: global_l1 46 ms
at every ratio (the report's Table 2: masks remove no work); channel_l1 46 (1 - r)^2 + 1 ms.

    python experiments/bench_search.py --seeds 5 --budget 20
"""
from __future__ import annotations

import argparse
import datetime
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from tuning import pareto
from tuning.space import make_sampler, optuna_space, sweep_evidence
from tuning.spec import Spec, from_dict

TABLE = Path(__file__).resolve().parents[1].parent / "shared/data/seed_tables.csv"
REF_MS = 50.0
OBJECTIVES = [("accuracy", "max"), ("latency_ms", "min")]
METRICS = [name for name, _ in OBJECTIVES]
STRATEGIES = ("random", "optuna", "optuna+feedback")
REPORT_BUDGETS = (2, 4, 6, 8, 12, 16, 20)
T_PEAK, W_PEAK = math.log10(0.02), 1.15  # lr where the knee is furthest right, and its mix weight
NOISE_POINTS = 0.3


class Surrogate:
    """accuracy (0-1) and latency (ms) of a trained trial's sweep point; see the module doc."""

    def __init__(self, path: Path = TABLE):
        if not path.is_file():
            raise FileNotFoundError(f"surrogate table {path} not found: it is the origin report's Table 1 "
                                    "(prune_ratio, acc_lr0.001, acc_lr0.01); the shared/ checkout is needed")
        t = pd.read_csv(path)
        self.r, self.a1, self.a2 = (t[c].to_numpy(float) for c in ("prune_ratio", "acc_lr0.001", "acc_lr0.01"))

    def global_pct(self, lr: float, ratio: float) -> float:
        t = math.log10(lr)
        w = t + 3.0 if t <= T_PEAK else W_PEAK - 1.5 * (t - T_PEAK)
        w = min(max(w, 0.0), W_PEAK)

        def mix(r: float) -> float:
            return float((1 - w) * np.interp(r, self.r, self.a1) + w * np.interp(r, self.r, self.a2))

        penalty = 6.0 * max(0.0, (t - T_PEAK) / (-1.0 - T_PEAK)) ** 2  # too-high lr: dense accuracy drops
        return min(mix(ratio), mix(0.0)) - penalty

    def point(self, lr: float, method: str, ratio: float, offset: float) -> tuple[float, float]:
        if method == "channel_l1":
            pct, ms = self.global_pct(lr, min(0.8, 1.6 * ratio)) - 5.0 * ratio, 46.0 * (1 - ratio) ** 2 + 1.0
        else:
            pct, ms = self.global_pct(lr, ratio), 46.0
        return max(pct + offset, 10.0) / 100.0, ms


def make_spec(seed: int, budget: int, sampler: str) -> Spec:
    return from_dict({
        "sweep": {"methods": ["global_l1", "channel_l1"], "ratios": [round(0.1 * i, 1) for i in range(9)]},
        "search": {"lr_min": 1e-3, "lr_max": 1e-1, "ratio_min": 0.0, "ratio_max": 0.8, "sampler": sampler,
                   "seed": seed, "num_samples": budget, "sweep_feedback": True},
    }, source="bench_search")


def train_and_sweep(sur: Surrogate, spec: Spec, params: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    """What the trainable reports, with the surrogate in place of training + sweep."""
    lr, method = float(params["lr"]), params.get("method", spec.sweep.methods[0])
    ratio = round(float(params["prune_ratio"]), 4)  # as trainables.trainable does
    offset = float(np.random.default_rng([seed, index]).normal(0.0, NOISE_POINTS))
    rows = [dict(zip(("method", "ratio", "int8", *METRICS), (m, r, False, *sur.point(lr, m, r, offset))))
            for m in spec.sweep.methods for r in sorted(set(spec.sweep.ratios) | {ratio})]
    df = pd.DataFrame(rows)
    own = df[(df.method == method) & (df.ratio == ratio)].iloc[0]
    return {"lr": lr, "method": method, "prune_ratio": ratio, "int8": False, "sweep": df,
            **{m: float(own[m]) for m in METRICS}}


def run(strategy: str, seed: int, budget: int, sur: Surrogate) -> list[float]:
    """Hypervolume over all sweep points after each of ``budget`` trained trials."""
    spec = make_spec(seed, budget, "random" if strategy == "random" else "tpe")
    space = optuna_space(spec)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
    points: list[pd.DataFrame] = []
    hv: list[float] = []
    for i in range(budget):
        trial = study.ask(space)
        result = train_and_sweep(sur, spec, trial.params, seed, i)
        study.tell(trial, [result[m] for m in METRICS])
        if strategy == "optuna+feedback":
            for params, values in sweep_evidence(result["sweep"], result, space, METRICS):
                study.add_trial(optuna.trial.create_trial(
                    params=params, distributions={k: space[k] for k in params}, values=values))
        points.append(result["sweep"])
        hv.append(pareto.hypervolume_2d(pd.concat(points, ignore_index=True), OBJECTIVES, (0.0, REF_MS)))
    return hv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per strategy (0..N-1)")
    ap.add_argument("--budget", type=int, default=20, help="trained trials per search")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sur, t0 = Surrogate(), time.perf_counter()
    hv = {s: np.array([run(s, seed, args.budget, sur) for seed in range(args.seeds)]) for s in STRATEGIES}
    budgets = sorted({b for b in REPORT_BUDGETS if b <= args.budget} | {args.budget})
    print(f"# bench_search {datetime.date.today().isoformat()}: hypervolume (accuracy x ms) of the accuracy:max / "
          f"latency_ms:min front over all sweep points, reference (accuracy 0.0, {REF_MS:g} ms); surrogate, "
          f"{args.seeds} seeds, mean ± std")
    rows = {b: {s: f"{hv[s][:, b - 1].mean():.3f} ± {hv[s][:, b - 1].std(ddof=1) if args.seeds > 1 else 0.0:.3f}"
                for s in STRATEGIES} for b in budgets}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "trials"
    print(table.to_string())
    print(f"# {time.perf_counter() - t0:.1f} s of search (imports excluded)")


if __name__ == "__main__":
    main()
