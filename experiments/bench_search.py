"""Search efficiency: Pareto hypervolume of the deployable front vs trained trials, by what the
sampler is told.

A trained trial here is what ``trainables.trainable`` does: train, sweep the no-retrain curve
(both methods, ratios 0.0-0.8 step 0.1), and fine-tune two deployable points: its own sampled
(method, ratio) and the dense model given the same epochs. The trial's objective is its own
fine-tuned point. Four strategies, each over ``--seeds`` seeds, on a cheap surrogate:

- ``random``: Optuna's RandomSampler, told the trial's objective only.
- ``optuna``: the project's multi-objective TPE sampler (``tuning.space.make_sampler``), told
  the trial's objective only.
- ``optuna+feedback``: the chosen design: TPE, and after each trial the points fine-tuned like
  its objective (its equal-compute dense point) are added to the study, through
  ``tuning.space.sweep_evidence`` exactly as ``SweepFeedbackSearch.on_trial_complete`` does.
- ``optuna+curve``: ``[search] feedback_curve = true``, the design before fine-tuning: TPE, and
  every no-retrain curve point is added too, as if it measured what the objective measures.

What is scored: the hypervolume of the front over the deployable (fine-tuned) points of all
trained trials so far -- the front a search registers; the no-retrain curve is not shipped.
``tuning.pareto.hypervolume_2d`` on (accuracy 0-1: max, latency_ms: min), reference (accuracy
0.0, ``REF_MS`` = 50 ms); units accuracy x ms, at most about 0.95 x 49 ~ 46.

Surrogate (no training): no-retrain accuracy is the origin report's Table 1
(``shared/data/seed_tables.csv``: global_l1 without retraining at lr 0.001 and 0.01, ratios
0-0.8) interpolated linearly over ratio. In t = log10(lr) the two columns are mixed with weight
w = t + 3 (w = 0 at lr 0.001, 1 at 0.01), extrapolated up to w = 1.15 (reached at lr ~0.014,
held to 0.02), then w falls by 1.5 per decade and dense accuracy loses up to 6 points at lr
0.1. A pruned point never beats the dense model of its lr. channel_l1 at ratio r = global_l1 at
min(0.8, 1.6 r) minus 5 r points. Fine-tuning (the deployable points): the dense model gains
``FT_GAIN`` points; a pruned point recovers ``RECOVERY[method]`` of its no-retrain drop below the
dense model of its lr (channel_l1 0.8: ``experiments/bench_deployable.py`` measured 0.78 for
channel_l1 at 0.5 after 3 epochs on the CIFAR-10 subset; global_l1 0.9), so the curve ranks
pruning too harshly at high ratios. Accuracy is clipped below at 10 % (chance). One
Gaussian offset (0.3 points) per trained trial, seeded by (seed, trial index). Latency: global_l1
46 ms at every ratio (the report's Table 2); channel_l1 46 (1 - r)^2 + 1 ms.

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
from tuning.space import make_sampler, optuna_space, own_methods, sweep_evidence
from tuning.spec import Spec, from_dict

TABLE = Path(__file__).resolve().parents[1].parent / "shared/data/seed_tables.csv"
REF_MS = 50.0
OBJECTIVES = [pareto.Objective("accuracy", "max"), pareto.Objective("latency_ms", "min")]
METRICS = [o.metric for o in OBJECTIVES]
STRATEGIES = ("random", "optuna", "optuna+feedback", "optuna+curve")
FINETUNE = 2  # the deployable points' fine-tuning epochs (the fidelity)
FT_GAIN = 1.0  # points the dense model gains from the fine-tuning epochs
RECOVERY = {"global_l1": 0.9, "channel_l1": 0.8}  # share of the no-retrain drop fine-tuning wins back
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

    def point(self, lr: float, method: str, ratio: float, offset: float, tuned: bool = False) -> tuple[float, float]:
        if method == "channel_l1":
            pct, ms = self.global_pct(lr, min(0.8, 1.6 * ratio)) - 5.0 * ratio, 46.0 * (1 - ratio) ** 2 + 1.0
        else:
            pct, ms = self.global_pct(lr, ratio), 46.0
        if tuned:
            dense = self.global_pct(lr, 0.0)
            pct = dense + FT_GAIN - (1 - RECOVERY[method]) * (dense - pct)
        return max(pct + offset, 10.0) / 100.0, ms


def make_spec(seed: int, budget: int, sampler: str) -> Spec:
    return from_dict({
        "sweep": {"methods": ["global_l1", "channel_l1"], "ratios": [round(0.1 * i, 1) for i in range(9)]},
        "search": {"lr_min": 1e-3, "lr_max": 1e-1, "ratio_min": 0.0, "ratio_max": 0.8, "sampler": sampler,
                   "seed": seed, "num_samples": budget, "sweep_feedback": True},
    }, source="bench_search")


def train_and_sweep(sur: Surrogate, spec: Spec, params: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    """What the trainable reports, with the surrogate in place of training, sweep and fine-tuning."""
    lr, method = float(params["lr"]), params.get("method", own_methods(spec)[0])  # as the search plans it
    ratio = round(float(params["prune_ratio"]), 4)  # as trainables.trainable does
    offset = float(np.random.default_rng([seed, index]).normal(0.0, NOISE_POINTS))
    keys = ("method", "ratio", "int8", "finetune_epochs", *METRICS)
    curve = [dict(zip(keys, (m, r, False, 0, *sur.point(lr, m, r, offset))))
             for m in spec.sweep.methods for r in spec.sweep.ratios]
    tuned = [dict(zip(keys, (method, r, False, FINETUNE, *sur.point(lr, method, r, offset, tuned=True))),
                  artifact=f"points/{method}@{r:g}.onnx")  # built as a file, as a trial's deployable points are
             for r in sorted({0.0, ratio})]
    df = pd.DataFrame(curve + tuned)
    own = df[(df.method == method) & (df.ratio == ratio) & (df.finetune_epochs == FINETUNE)].iloc[0]
    return {"lr": lr, "method": method, "prune_ratio": ratio, "int8": False, "finetune_epochs": FINETUNE,
            "sweep": df, **{m: float(own[m]) for m in METRICS}}


def run(strategy: str, seed: int, budget: int, sur: Surrogate) -> list[float]:
    """Hypervolume over the deployable points after each of ``budget`` trained trials."""
    spec = make_spec(seed, budget, "random" if strategy == "random" else "tpe")
    space = optuna_space(spec)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(spec))
    points: list[pd.DataFrame] = []
    hv: list[float] = []
    for i in range(budget):
        trial = study.ask(space)
        result = train_and_sweep(sur, spec, trial.params, seed, i)
        study.tell(trial, [result[m] for m in METRICS])
        if strategy in ("optuna+feedback", "optuna+curve"):  # curve: [search] feedback_curve = true
            for params, values, _ in sweep_evidence(result["sweep"], result, space, METRICS,
                                                    curve=strategy == "optuna+curve"):
                study.add_trial(optuna.trial.create_trial(
                    params=params, distributions={k: space[k] for k in params}, values=values))
        points.append(result["sweep"][result["sweep"].finetune_epochs == FINETUNE])  # the deployable points
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
          f"latency_ms:min front over the deployable points, reference (accuracy 0.0, {REF_MS:g} ms); surrogate, "
          f"{args.seeds} seeds, mean ± std")
    rows = {b: {s: f"{hv[s][:, b - 1].mean():.3f} ± {hv[s][:, b - 1].std(ddof=1) if args.seeds > 1 else 0.0:.3f}"
                for s in STRATEGIES} for b in budgets}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "trials"
    print(table.to_string())
    print(f"# {time.perf_counter() - t0:.1f} s of search (imports excluded)")


if __name__ == "__main__":
    main()
