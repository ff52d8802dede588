"""Spend the cluster's hours where the front is: multi-objective early stopping and a stop rule.

**Early stopping** (``[search] early_stop = "pareto"``). A trial trains for ``[train] epochs``;
at its rungs (epochs 1, eta, eta^2, ... before the last: :func:`rungs`) it predicts its
deployable point from the weights it has: its own (method, ratio[, int8]) pruned without
retraining (BatchNorm re-estimated where structured pruning needs it) and measured as the ONNX
file that ships, its latency that of its architecture (shared by every trial through the
latency cache). :class:`ParetoStopping` compares the prediction with the predictions of every
trial that reached the same rung (apples to apples: the same epochs of training) and stops the
trial when

- another trial's point at the rung dominates it by a margin (at most its latency, at least
  ``early_stop_margin`` more accuracy): more epochs would have to buy more than that margin, or
- it is not in the best 1/eta of the rung by non-dominated sorting (MO-ASHA's rule, applied
  once the rung holds eta points).

A latency objective rewards a slow-to-train but easy-to-compress trial, which ASHA on
validation accuracy alone throws away; here both objectives decide. A stopped trial ends as
Tune's TERMINATED with no objectives: Optuna records it as pruned, MLflow tags its run
``prunetune.status = stopped``, its checkpoint stays until the front is final. The rung records
are kept in the experiment directory (``stopping.json``; on an object store, there too), so a
resumed search decides as the first one did; a stopped trial is never restarted (Tune resumes unfinished trials only).

**The stop rule** (:class:`StopRule`): the search ends when ``[search] stop_after_minutes`` of
wall clock or ``stop_after_epochs`` trial-epochs (the cluster's cost) are spent, or when the
hypervolume of the completed trials' own points gained no more than ``stop_tolerance`` (relative)
over the last ``stop_patience`` completed trials.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from ray.tune import Stopper
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from trainables.names import DONE, PHASE, TRAIN
from tuning import pareto, storage

STOPPING_FILE = "stopping.json"
PREDICTED = ("predicted_accuracy", "predicted_latency_ms")  # what a trial reports at a rung
_PLANE = (pareto.Objective("accuracy", "max"), pareto.Objective("latency_ms", "min"))

Point = tuple[float, float]  # (accuracy, latency_ms)


def rungs(epochs: int, eta: int) -> tuple[int, ...]:
    """The epochs a trial predicts its point at: 1, eta, eta^2, ... below ``epochs``."""
    out, r = [], 1
    while r < epochs:
        out.append(r)
        r *= eta
    return tuple(out)


def layers(points: Sequence[Point]) -> list[int]:
    """Each point's non-dominated sorting layer (0: on the front of all of them)."""
    df = pd.DataFrame(points, columns=["accuracy", "latency_ms"])
    layer, left, n = [0] * len(df), df, 0
    while len(left):
        on = pareto.non_dominated(left, _PLANE)
        for i in left.index[on]:
            layer[i] = n
        left, n = left[~on], n + 1
    return layer


def verdict(point: Point, others: Sequence[Point], margin: float, eta: int) -> str | None:
    """Why a trial whose prediction at a rung is ``point`` stops, given the predictions ``others``
    of the trials that reached the rung before it; None: it goes on."""
    acc, lat = point
    for a, lt in others:
        if lt <= lat and a >= acc + margin:
            return f"dominated at its rung: another trial predicts {a:.3f} at {lt:.3f} ms (this one {acc:.3f} at {lat:.3f} ms)"
    everyone = [*others, point]
    if len(everyone) < eta:
        return None
    layer = layers(everyone)
    better = sum(1 for x in layer[:-1] if x < layer[-1])
    if better >= math.ceil(len(everyone) / eta):
        return f"not in the best 1/{eta} of its rung by non-dominated sorting ({better} of {len(everyone)} ahead)"
    return None


class ParetoStopping(FIFOScheduler):
    """Tune's scheduler for ``early_stop = "pareto"`` (see the module docstring)."""

    def __init__(self, exp_dir: str | Path, rung_epochs: Sequence[int], eta: int, margin: float,
                 remote: str | None = None) -> None:
        super().__init__()
        self.path, self.remote = Path(exp_dir) / STOPPING_FILE, remote  # remote: the experiment's object-store URI
        self.rung_epochs, self.eta, self.margin = tuple(rung_epochs), eta, margin
        self._load()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A restored Tuner unpickles the scheduler it was created with: read the records the search
        had kept since (on an object store, where this machine keeps its copy of the experiment)."""
        self.__dict__.update(state)
        if self.remote:
            self.path = storage.work_dir(self.remote) / STOPPING_FILE
        self._load()

    def _load(self) -> None:
        text = storage.read_text(storage.join(self.remote, STOPPING_FILE)) if self.remote else (
            self.path.read_text() if self.path.is_file() else None)
        saved = json.loads(text) if text else {}
        self.records: dict[str, dict[str, Point]] = {r: {t: tuple(p) for t, p in v.items()}
                                                     for r, v in saved.get("rungs", {}).items()}
        self.stopped: dict[str, str] = saved.get("stopped", {})

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.decide(trial.trial_id, result)

    def decide(self, trial_id: str, result: dict) -> str:
        """CONTINUE or STOP, for one report of a trial."""
        epoch = result.get("epoch")
        if result.get(PHASE) != TRAIN or epoch not in self.rung_epochs or any(result.get(k) is None for k in PREDICTED):
            return TrialScheduler.CONTINUE
        rung = self.records.setdefault(str(epoch), {})
        point = (float(result[PREDICTED[0]]), float(result[PREDICTED[1]]))
        why = verdict(point, [p for t, p in rung.items() if t != trial_id], self.margin, self.eta)
        rung[trial_id] = point
        if why:
            self.stopped[trial_id] = f"epoch {epoch}: {why}"
            print(f"early stop: trial {trial_id} at epoch {epoch}: {why}", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"rungs": self.records, "stopped": self.stopped}, indent=1))
        if self.remote:  # a driver that resumes elsewhere reads them there
            storage.push(self.path.parent, self.remote, [STOPPING_FILE])
        return TrialScheduler.STOP if why else TrialScheduler.CONTINUE


class StopRule(Stopper):
    """Tune's experiment stopper for ``[search] stop_after_minutes``, ``stop_after_epochs`` and
    ``stop_patience`` / ``stop_tolerance`` (see the module docstring)."""

    def __init__(self, minutes: float = 0.0, epochs: int = 0, patience: int = 0, tolerance: float = 0.0,
                 reference: Sequence[float] = ()) -> None:
        self.minutes, self.epochs, self.patience, self.tolerance = minutes, epochs, patience, tolerance
        self.reference = list(reference) or pareto.reference_point(_PLANE)
        self.start, self.spent, self.own = time.time(), 0, []
        self.hypervolumes: list[float] = []  # after each completed trial
        self.why = ""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get(PHASE) == TRAIN:
            self.spent += 1
        elif result.get(PHASE) == DONE and result.get("accuracy") is not None:
            self.own.append((float(result["accuracy"]), float(result["latency_ms"])))
            df = pd.DataFrame(self.own, columns=["accuracy", "latency_ms"])
            self.hypervolumes.append(pareto.hypervolume_2d(df, _PLANE, self.reference))
        return False

    def stop_all(self) -> bool:
        if self.minutes and time.time() - self.start >= 60 * self.minutes:
            self.why = f"{self.minutes:g} minutes spent ([search] stop_after_minutes)"
        elif self.epochs and self.spent >= self.epochs:
            self.why = f"{self.spent} trial-epochs spent ([search] stop_after_epochs = {self.epochs})"
        elif self.patience and len(self.hypervolumes) > self.patience:
            before, now = self.hypervolumes[-1 - self.patience], self.hypervolumes[-1]
            if now - before <= self.tolerance * max(before, np.finfo(float).tiny):
                self.why = (f"the hypervolume gained {now - before:.4g} (<= {self.tolerance:g} relative) over the last "
                            f"{self.patience} completed trials ([search] stop_patience)")
        if self.why:
            print(f"stop rule: the search ends: {self.why}", flush=True)
        return bool(self.why)
