"""What a search samples and how: the search space, the sampler, the sweep-feedback searcher.

- :func:`optuna_space`: ``lr`` log-uniform in ``[lr_min, lr_max]``, ``prune_ratio`` uniform in
  ``[ratio_min, ratio_max]``, ``method`` among the ``[sweep] methods`` when searched, ``int8``
  when the sweep measures INT8.
- :func:`make_sampler`: Gaussian-process BO (``gp``, the default: it reaches a 20-trial TPE search's
  hypervolume in 44% of the trial-epochs, 40% with early stopping; BENCHMARKS.md), multivariate
  TPE, NSGA-II or random, seeded.
- :class:`SweepFeedbackSearch`: Ray's ``OptunaSearch``, multi-objective, its study in the
  experiment directory (``optuna.db``, so ``prunetune resume`` keeps it) or in the database of
  ``[search] study_storage`` (:mod:`tuning.studies`). When a trial
  completes, every other point of its sweep is added to the study as a completed trial with
  its own (lr, prune_ratio[, method, int8]) and objective values (:func:`sweep_evidence`): one
  training gives the sampler a whole curve of evidence, not one point.
- :func:`sampling`: what Tune gets from all this; ``sampler = "grid"`` runs ``grid_lrs``
  with no searcher instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray.tune.search.optuna import OptunaSearch

from trainables import compress
from trainables.names import TRAIN
from tuning import report, studies
from tuning.front import Rules
from tuning.names import STUDY_FILE
from tuning.pareto import Objective
from tuning.report import TrialReport
from tuning.spec import Spec

Space = dict[str, optuna.distributions.BaseDistribution]
# Objectives only removed work improves, and objectives that zeroed weights improve too.
WORK_METRICS = {"latency_ms", "latency_p90_ms", "macs", "throughput_ips"}
SIZE_METRICS = {"size_mb", "nonzero_params", "sparsity"}
_CONSTRAINTS_KEY = "constraints"  # where Optuna's samplers read a trial's constraint values (set by add_trial's callers)


def own_methods(spec: Spec) -> list[str]:
    """The methods a trial's own (deployable) point is drawn from. With an objective only removed
    work improves (latency), the ``[sweep] methods`` that remove work (channel pruning; INT8 comes
    on top of any): an unstructured mask has the dense architecture and latency, so its point is
    dominated by the dense point of the same trial. The unstructured methods stay in the
    no-retrain curve, and enter this space when an objective rewards them (size, sparsity)."""
    metrics = {o.metric for o in spec.search.objectives}
    if metrics & SIZE_METRICS or not metrics & WORK_METRICS:
        return list(spec.sweep.methods)
    return [m for m in spec.sweep.methods if m in compress.STRUCTURED] or list(spec.sweep.methods)


def optuna_space(spec: Spec) -> Space:
    """The distributions a trial's config is sampled from."""
    q = spec.search
    space: Space = {
        "lr": optuna.distributions.FloatDistribution(q.lr_min, q.lr_max, log=True),
        "prune_ratio": optuna.distributions.FloatDistribution(q.ratio_min, q.ratio_max),
    }
    methods = own_methods(spec)
    if q.search_method and len(methods) > 1:
        space["method"] = optuna.distributions.CategoricalDistribution(methods)
    if spec.sweep.int8:
        space["int8"] = optuna.distributions.CategoricalDistribution([False, True])
    return space


class Budgets:
    """Optuna's ``constraints_func`` for the search's budgets (:meth:`tuning.front.Rules.excess`,
    the test the front's ``pick`` makes): values <= 0 are met. Optuna calls it while a result is
    being told, before the trial holds its values, so the searcher hands it that report
    (:attr:`current`); the accuracy drop is against the best equal-compute dense accuracy seen so
    far (each trial reports its own)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.dense_accuracy = -math.inf
        self.current: TrialReport | None = None

    def values(self, point: dict[str, Any]) -> tuple[float, ...]:
        return self.rules.excess(point, self.dense_accuracy)

    def __call__(self, trial: optuna.trial.FrozenTrial) -> tuple[float, ...]:
        if self.current is None or self.current.values(["latency_ms", "accuracy"]) is None:
            return (1.0,) * (2 + len(self.rules.limits))  # a pruned (diverged) trial meets nothing
        return self.values(self.current.metrics)


def make_sampler(spec: Spec, budgets: Budgets | None = None) -> optuna.samplers.BaseSampler:
    """The ``[search] sampler``, seeded with ``[search] seed``; TPE, GP and NSGA-II steer into the
    region that meets the ``budgets`` (random sampling ignores them)."""
    q = spec.search
    if q.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=q.seed, population_size=max(4, min(50, q.num_samples // 2)),
                                             constraints_func=budgets)
    if q.sampler == "random":
        return optuna.samplers.RandomSampler(seed=q.seed)
    if q.sampler == "gp":  # Gaussian-process BO: for few, expensive trials
        return optuna.samplers.GPSampler(seed=q.seed, constraints_func=budgets,
                                         n_startup_trials=min(10, max(2, q.num_samples // 3)))
    return optuna.samplers.TPESampler(seed=q.seed, multivariate=True, constraints_func=budgets,
                                      n_startup_trials=min(10, max(2, q.num_samples // 3)))


class SweepFeedbackSearch(OptunaSearch):
    """``OptunaSearch`` that also tells the study every sweep point of a completed trial."""

    def __init__(self, space: Space, objectives: list[Objective], sampler: optuna.samplers.BaseSampler,
                 study_name: str, storage: optuna.storages.BaseStorage, feedback: bool = True,
                 budgets: Budgets | None = None, curve: bool = False) -> None:
        metrics = [o.metric for o in objectives]
        super().__init__(space=space, metric=metrics, mode=[o.direction for o in objectives], sampler=sampler,
                         study_name=study_name, storage=storage)
        self.space, self.metrics, self.feedback, self.budgets, self.curve = space, metrics, feedback, budgets, curve
        self.study = optuna.load_study(study_name=study_name, storage=storage)  # the one Ray just made

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        done = report.of(result) if result else None
        stopped = None
        if done is not None and done.values(self.metrics) is None:
            # diverged or early-stopped: no objectives, so Optuna records it as pruned (Ray's
            # OptunaSearch would try to tell [None, None] as COMPLETE and leave it RUNNING)
            stopped = done if done.phase == TRAIN else None
            result = done = None
        if self.budgets is not None:
            if done is not None and done.metrics.get("dense_accuracy") is not None:
                self.budgets.dense_accuracy = max(self.budgets.dense_accuracy, done.metrics["dense_accuracy"])
            self.budgets.current = done
        super().on_trial_complete(trial_id, result, error)
        if stopped is not None:
            self._tell_predicted(trial_id, stopped)
        if not self.feedback or done is None or done.points is None:
            return
        for params, values, row in sweep_evidence(done.points, done.metrics, self.space, self.metrics, self.curve):
            attrs = {}
            if self.budgets is not None:
                attrs[_CONSTRAINTS_KEY] = self.budgets.values(row)
            self.study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: self.space[k] for k in params}, values=values,
                user_attrs={"source": "sweep", "ray_trial_id": trial_id}, system_attrs=attrs,
            ))

    def _tell_predicted(self, trial_id: str, stopped: TrialReport) -> None:
        """An early-stopped trial stays pruned in the study, and its predicted point at the rung it
        stopped at (``predicted_accuracy``, ``predicted_latency_ms``) is added as evidence at its
        own params (``source = predicted``): GP learns only from completed trials, so without it
        GP proposes the region it was just stopped in again and again (BENCHMARKS.md, early
        stopping). Told only when every objective is one a prediction measures."""
        row = {k.removeprefix("predicted_"): v for k, v in stopped.metrics.items() if k.startswith("predicted_")}
        values = [row.get(m) for m in self.metrics]
        params = {k: stopped.config[k] for k in self.space if k in stopped.config}
        if any(v is None for v in values) or len(params) < len(self.space):
            return
        attrs = {}
        if self.budgets is not None and {"accuracy", "latency_ms"} <= row.keys():
            attrs[_CONSTRAINTS_KEY] = self.budgets.values(row)
        self.study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: self.space[k] for k in params}, values=values,
            user_attrs={"source": "predicted", "ray_trial_id": trial_id, "epoch": stopped.epoch}, system_attrs=attrs,
        ))


def sweep_evidence(table: pd.DataFrame, trial: dict[str, Any], space: Space, metrics: list[str],
                   curve: bool = False) -> list[tuple[dict, list[float], dict[str, Any]]]:
    """(params, objective values, row) for every point of a trial's sweep ``table`` that the search
    space can express and that measures what the trial's objective measures, except the trial's
    own point (Tune already told the study that one). ``trial``: its sampled ``lr``, ``method``,
    ``prune_ratio`` and ``int8``: a trial's objective is its deployable point (built and measured
    as the file that ships), so the study learns only from the points built alike (the dense one
    given the same epochs, the other INT8 variant), never from the no-retrain curve, whose
    accuracy at a high ratio says little of what fine-tuning recovers there and whose latency is
    another runtime's. ``curve``: take the curve too, as if it were built (``[search]
    feedback_curve``; see ``experiments/bench_search.py``)."""
    out = []
    own = (trial.get("method"), trial.get("prune_ratio"), bool(trial.get("int8", False)))
    ratio_dist = space["prune_ratio"]
    for p in table.to_dict("records"):
        built = isinstance(p.get("artifact"), str)
        if (built and (p["method"], p["ratio"], bool(p["int8"])) == own) or not (curve or built):
            continue
        if ("method" not in space and p["method"] != own[0]) or ("int8" not in space and p["int8"]):
            continue
        if "method" in space and p["method"] not in space["method"].choices:
            continue  # the curve of a method the trials' own points are not drawn from
        if not ratio_dist.low <= p["ratio"] <= ratio_dist.high:
            continue
        values = [p.get(m) for m in metrics]
        if any(v is None or not math.isfinite(v) for v in values):
            continue
        params = {"lr": trial["lr"], "prune_ratio": p["ratio"]}
        params.update({k: p[k] for k in ("method", "int8") if k in space})
        out.append((params, values, p))
    return out


def end_study(spec: Spec, exp_dir: Path) -> optuna.Study | None:
    """The search's Optuna study once every trial has ended (None for a grid search). A study trial
    still RUNNING was asked for by a driver that died before Tune recorded its trial (the resumed
    search went on without it): it is told FAIL, so the study says what happened."""
    if spec.search.sampler == "grid" or not (spec.search.study_storage or (exp_dir / STUDY_FILE).is_file()):
        return None
    try:
        study = optuna.load_study(study_name=studies.name(spec, exp_dir),
                                  storage=studies.connect(studies.url(spec, exp_dir)))
    except KeyError:  # a database that never got this search's study (it stopped before sampling)
        return None
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return study


def make_searcher(spec: Spec, exp_dir: Path) -> SweepFeedbackSearch:
    """The searcher of a new search, its study in ``exp_dir`` or in ``[search] study_storage``."""
    q = spec.search
    storage = studies.connect(studies.url(spec, exp_dir))
    rules = Rules(max_latency_ms=q.max_latency_ms, max_accuracy_drop=q.max_accuracy_drop, limits=tuple(q.limits))
    budgets = Budgets(rules) if rules.budgeted else None
    return SweepFeedbackSearch(optuna_space(spec), q.objectives, make_sampler(spec, budgets),
                               study_name=studies.name(spec, exp_dir), storage=storage, feedback=q.sweep_feedback,
                               budgets=budgets, curve=q.feedback_curve)


@dataclass(frozen=True)
class Sampling:
    """What Tune gets from the search space (:func:`sampling`)."""

    param_space: dict[str, Any]  # Tune's (a grid search's lrs; empty with a searcher)
    searcher: SweepFeedbackSearch | None  # None: a grid search, or a restored one (Tune restores its own)
    num_samples: int
    columns: list[str]  # what is sampled, for the progress table (method only when there is a choice)
    methods: list[str]  # what the trials' own points are drawn from (own_methods); the first when not sampled


def sampling(spec: Spec, exp_dir: Path, restore: bool = False) -> Sampling:
    """Optuna sampling ``num_samples`` trials, its study in ``exp_dir`` (or ``[search] study_storage``), or
    with ``sampler = "grid"`` one trial per ``grid_lrs`` value and no searcher."""
    from ray import tune

    q, columns, methods = spec.search, list(optuna_space(spec)), own_methods(spec)
    if q.sampler == "grid":
        return Sampling({"lr": tune.grid_search(q.grid_lrs), "prune_ratio": q.ratio_min}, None, 1, columns, methods)
    return Sampling({}, None if restore else make_searcher(spec, exp_dir), q.num_samples, columns, methods)
