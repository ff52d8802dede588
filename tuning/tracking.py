"""Every MLflow write of a search, from the driver: a parent run per search, a child run per trial.

While the search runs, a Ray Tune :class:`~ray.tune.Callback` mirrors the trials, so trials never
talk to the tracking server (a worker node needs no route to it); a resumed search finds its
runs again by tag (:mod:`tuning.runs`) instead of creating duplicates:

- parent run (tag ``prunetune.search_dir``): the experiment file and settings as params, package
  versions and git commit as tags; after the search (:meth:`MlflowTracking.finish`) the tables,
  the plot, the front's hypervolume and the registered models (:mod:`tuning.registry`);
- child run per trial (tags ``mlflow.parentRunId`` so the UI nests it, ``prunetune.trial_id``):
  the sampled config as params, ``val_accuracy``/``train_loss``/``images_per_second`` with
  ``step = epoch``; when the trial completes, its objectives, its sweep as ``sweep.csv`` and as
  metrics ``sweep_<metric>/<method>`` with ``step = ratio x 100`` (the UI draws them as curves);
  a diverged trial is tagged ``prunetune.status = diverged`` and ends FAILED. Once the front is
  final, the checkpoints :mod:`tuning.retention` keeps (:meth:`MlflowTracking.file_checkpoints`).

If the tracking server goes away mid-search, logging warns and training goes on: Ray keeps
every reported result. A trial's run ends only once every one of its results reached MLflow, so
after the search (and on ``prunetune resume``) :meth:`MlflowTracking.backfill` logs every trial
whose run is missing or has not ended from the results Ray kept. Nothing is retried in a loop.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from mlflow.entities import Metric, Param
from ray.tune import Callback, ResultGrid

from trainables.names import DIVERGED, DONE, EPOCH_METRICS, POINT_METRICS, TRAIN
from tuning.names import (ACCURACY_FLOOR, CHECKPOINT_DIR, CHECKPOINT_TAG, CURVE_METRICS, DENSE_ACCURACY, ERROR_TAG,
                          EXPERIMENT_JSON, EXPERIMENT_TAGS, HYPERVOLUME, KEPT, KIND_TAG, LOST, PARENT_TAG, REMOVED,
                          SEARCH, SEARCH_DIR_TAG, STATUS_TAG, STOPPED, SWEEP_CSV, TRIAL, TRIAL_ID_TAG)
from tuning import registry, report, runs, storage
from tuning.report import TrialReport

if TYPE_CHECKING:
    from trainables.data import Splits
    from tuning.results import SearchResult

_ENDED = ("FINISHED", "FAILED")
_BATCH = 900  # metrics per log_batch call (MLflow's limit is 1000)


def _never_stop_the_search(hook):
    """Tracking is a mirror: if the server goes away mid-search, warn (once per outage) and let
    training go on; the trial is marked missed, so its run stays open until
    :meth:`MlflowTracking.backfill` logs what Ray kept. A hook that returns False sent nothing,
    so it says nothing of whether the server is back."""

    @functools.wraps(hook)
    def wrapper(self: "MlflowTracking", iteration: int, trials: list, trial: Any, *args: Any, **kwargs: Any) -> None:
        try:
            sent = hook(self, iteration, trials, trial, *args, **kwargs)
        except Exception as e:  # any client or server error
            self.missed.add(trial.trial_id)
            if not self.failing:
                print(f"prunetune: warning: MLflow logging failed in {hook.__name__} ({type(e).__name__}: "
                      f"{runs.first_line(e)[:200]}); the search goes on, results stay in {self.exp_dir} and are "
                      "back-filled into MLflow after the search (further failures are not shown)",
                      file=sys.stderr, flush=True)
            self.failing = True
            return
        if self.failing and sent is not False:
            print("prunetune: MLflow answers again", file=sys.stderr, flush=True)
            self.failing = False

    return wrapper


class MlflowTracking(Callback):
    """Tune callback that mirrors a search into MLflow (see the module docstring)."""

    def __init__(self, uri: str, spec_dict: dict[str, Any], exp_dir: str | Path) -> None:
        self.uri = uri
        self.client = runs.check_reachable(uri)
        self.spec = spec_dict
        self.exp_dir = str(exp_dir) if storage.is_remote(exp_dir) else str(Path(exp_dir).resolve())  # where it lives
        name = spec_dict["name"]
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        for key, value in EXPERIMENT_TAGS.items():  # a model-development experiment (MLflow 3's UI kinds)
            self.client.set_experiment_tag(self.experiment_id, key, value)
        self.parent_id = self._find_or_create_parent()
        self.runs: dict[str, str] = {}  # trial id -> run id
        self._refresh_runs()
        self.failing = False  # inside an outage of the tracking server
        self.missed: set[str] = set()  # trials with a result that did not reach MLflow

    # Tune pickles its callbacks with the experiment; a restored search reconnects and finds
    # its parent and child runs again by tag (no duplicates).
    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "spec_dict": self.spec, "exp_dir": self.exp_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # --------------------------------------------------------------- Tune callback
    @_never_stop_the_search
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._child(trial.trial_id, trial.config)

    @_never_stop_the_search
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.log_result(report.of({**result, "trial_id": trial.trial_id}, trial.config))

    @_never_stop_the_search
    def on_trial_complete(self, iteration, trials, trial, **info) -> bool:
        return self.end_trial(report.of({**trial.last_result, "trial_id": trial.trial_id}, trial.config))

    @_never_stop_the_search
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.fail_trial(trial.trial_id, trial.config)

    # --------------------------------------------------------------- one trial, as plain data
    def log_result(self, rep: TrialReport) -> None:
        """One report of a trial: its epoch metrics (``step`` = epoch), or its end."""
        rid = self._child(rep.trial_id, rep.config)
        if rep.phase == TRAIN:
            self._log_metrics(rid, [Metric(k, float(rep.metrics[k]), rep.timestamp_ms, rep.epoch)
                                    for k in EPOCH_METRICS if k in rep.metrics])
        elif rep.phase == DIVERGED:
            self.client.set_tag(rid, STATUS_TAG, DIVERGED)
            self.client.set_tag(rid, ERROR_TAG, str(rep.error or "")[:5000])
        elif rep.phase == DONE:
            self._log_done(rid, rep)

    def end_trial(self, last: TrialReport) -> bool:
        """A trial that completed (``last``: its last report): the run ends FINISHED (FAILED if it
        diverged). A trial that missed a result keeps its run open for the back-fill: nothing is
        sent (returns False)."""
        if last.trial_id in self.missed:
            return False
        rid = self._child(last.trial_id, last.config)
        if last.phase == TRAIN:  # stopped while training (early_stop, asha, the stop rule): no objectives
            self.client.set_tag(rid, STATUS_TAG, STOPPED)
        self._end(last.trial_id, rid, "FAILED" if last.phase == DIVERGED else "FINISHED")
        return True

    def fail_trial(self, trial_id: str, config: dict[str, Any]) -> None:
        """A trial that raised (its worker died past ``max_failures``, a bug): tagged error, FAILED."""
        rid = self._child(trial_id, config)
        self.client.set_tag(rid, STATUS_TAG, "error")
        self._end(trial_id, rid, "FAILED")

    # --------------------------------------------------------------- after the search
    def backfill(self, grid: ResultGrid) -> list[str]:
        """Log every trial of ``grid`` whose child run is missing or has not ended (it missed a
        result while the server was away, or the driver died) from the results Ray kept
        (``Result.metrics_dataframe``: every report, in order). Returns the trial ids logged.

        A run of no trial of ``grid`` that has not ended is a trial the driver started but Tune never
        recorded (the driver died first; the resumed search went on without it): it ends FAILED,
        tagged ``prunetune.status = lost``, instead of staying RUNNING for ever."""
        ended = self._refresh_runs()
        done, known = [], set()
        for result in grid:
            reports = report.history(result)
            known.update(r.trial_id for r in reports[-1:])
            if not reports or reports[-1].trial_id in ended:
                continue
            trial_id = reports[-1].trial_id
            for rep in reports:
                self.log_result(rep)
            self.missed.discard(trial_id)
            if result.error:
                self.fail_trial(trial_id, result.config)
            else:
                self.end_trial(reports[-1])
            done.append(trial_id)
        for trial_id in sorted(set(self.runs) - known - ended):
            self.client.set_tag(self.runs[trial_id], STATUS_TAG, LOST)
            self.client.set_tag(self.runs[trial_id], ERROR_TAG, "the driver stopped before Ray Tune recorded this "
                                "trial; the resumed search went on without it")
            self.client.set_terminated(self.runs[trial_id], "FAILED")
        return done

    def log_search(self, files: list[Path], hypervolume: float | None, metrics: dict[str, float] | None = None) -> None:
        """The search's tables and plot as artifacts of the parent run, the front's hypervolume and
        ``metrics`` (the accuracy floor the front obeys, the dense reference)."""
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        if hypervolume is not None:
            self.client.log_metric(self.parent_id, HYPERVOLUME, hypervolume)
        for key, value in (metrics or {}).items():
            if math.isfinite(value):
                self.client.log_metric(self.parent_id, key, value)

    def finish(self, res: SearchResult, splits: Splits) -> bool:
        """MLflow after the search: back-fill the trial runs an outage missed, the tables on the
        parent run, the front's models with their aliases (:mod:`tuning.registry`), the parent run
        ended. If MLflow still fails, warn and return False: every result stays on disk and
        ``prunetune resume`` logs it later."""
        spec, front = res.spec, res.front
        try:
            filled = self.backfill(res.grid)
            if filled:
                print(f"MLflow: back-filled {len(filled)} trial run(s) missed while the server was away: "
                      f"{', '.join(filled)}", flush=True)
            self.log_search(res.files(), front.hypervolume, {ACCURACY_FLOOR: front.rules.floor,
                                                             DENSE_ACCURACY: front.dense_accuracy})
            if len(front) and spec.search.register_models:  # any number of objectives
                aliases = registry.register_front(self, front, res.checkpoints(), spec, splits)
                print(f"registered model {spec.name!r}: " + ", ".join(f"{a} -> version {v}" for a, v in aliases.items()),
                      flush=True)
            self.end()
            print(runs.where_to_look(self.uri, self.experiment_id), flush=True)
            return True
        except Exception as e:
            print(f"prunetune: warning: MLflow logging after the search failed ({type(e).__name__}: "
                  f"{runs.first_line(e)[:200]}); every result is in {res.path}. When {self.uri} answers again, "
                  f"`prunetune resume {res.path}` logs the missing runs, the tables and the registered models",
                  file=sys.stderr, flush=True)
            return False

    def end(self) -> None:
        """The search is over: its parent run ends FINISHED."""
        self.client.set_terminated(self.parent_id, "FINISHED")

    def ended(self) -> bool:
        """The parent run is FINISHED: MLflow holds the search's tables, front and registered models."""
        return self.client.get_run(self.parent_id).info.status == "FINISHED"

    def file_checkpoints(self, kept: dict[str, Path], removed: list[str]) -> None:
        """``kept`` (trial id -> its checkpoint directory) as artifacts of the trial runs
        (``checkpoint/``: every file of it, the dense weights and what the trial saved beside them),
        ``removed`` as a tag; runs already tagged are skipped (a resumed search applies it again)."""
        children = runs.child_runs(self.client, self.experiment_id, self.parent_id)
        for trial_id, state in [*((t, KEPT) for t in kept), *((t, REMOVED) for t in removed)]:
            run = children.get(trial_id)
            if run is None or run.data.tags.get(CHECKPOINT_TAG) == state:
                continue
            if state == KEPT:
                self.client.log_artifacts(run.info.run_id, str(kept[trial_id]), CHECKPOINT_DIR)
            self.client.set_tag(run.info.run_id, CHECKPOINT_TAG, state)

    # --------------------------------------------------------------- runs
    def _find_or_create_parent(self) -> str:
        found = runs.search_run(self.client, self.experiment_id, self.exp_dir)
        if found:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=Path(self.exp_dir).name, tags={
            SEARCH_DIR_TAG: self.exp_dir, KIND_TAG: SEARCH, **runs.provenance(),
        })
        rid = run.info.run_id
        params = {f"{section}.{k}": json.dumps(v) if isinstance(v, list) else str(v)
                  for section in ("search", "sweep", "train", "data") for k, v in self.spec[section].items()}
        self.client.log_batch(rid, params=[Param(k, v[:6000]) for k, v in params.items()])
        self.client.log_text(rid, json.dumps(self.spec, indent=2), EXPERIMENT_JSON)
        return rid

    def _refresh_runs(self) -> set[str]:
        """Learn the child runs as the server has them (under Ray Client, or after a restore,
        another copy of this callback logged them); return the trial ids whose run has ended."""
        children = runs.child_runs(self.client, self.experiment_id, self.parent_id)
        self.runs.update({trial_id: r.info.run_id for trial_id, r in children.items()})
        return {trial_id for trial_id, r in children.items() if r.info.status in _ENDED}

    def _child(self, trial_id: str, config: dict[str, Any]) -> str:
        if trial_id not in self.runs:
            run = self.client.create_run(self.experiment_id, run_name=trial_id, tags={
                PARENT_TAG: self.parent_id, TRIAL_ID_TAG: trial_id, KIND_TAG: TRIAL})
            for k, v in config.items():
                self.client.log_param(run.info.run_id, k, v)
            self.runs[trial_id] = run.info.run_id
        return self.runs[trial_id]

    def _end(self, trial_id: str, rid: str, status: str) -> None:
        if trial_id not in self.missed:  # else it stays open for the back-fill
            self.client.set_terminated(rid, status)

    def _log_done(self, rid: str, rep: TrialReport) -> None:
        """The trial's objectives at its own point, and its sweep as curves and as ``sweep.csv``."""
        self.client.set_tag(rid, STATUS_TAG, DONE)
        ts = rep.timestamp_ms
        metrics = [Metric(k, float(rep.metrics[k]), ts, 0) for k in POINT_METRICS if rep.metrics.get(k) is not None]
        sweep = rep.points
        keyed = sweep if "finetune_epochs" in sweep else sweep.assign(finetune_epochs=0)
        for (method, int8, tuned), rows in keyed.groupby(["method", "int8", "finetune_epochs"]):
            suffix = f"{method}{'_int8' if int8 else ''}{f'_ft{tuned}' if tuned else ''}"  # fine-tuned points apart
            for row in rows.itertuples():
                step = int(round(row.ratio * 100))
                metrics += [Metric(f"sweep_{m}/{suffix}", float(getattr(row, m)), ts, step) for m in CURVE_METRICS
                            if pd.notna(getattr(row, m))]
        self._log_metrics(rid, metrics)
        self.client.log_text(rid, sweep.to_csv(index=False), SWEEP_CSV)

    def _log_metrics(self, rid: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(rid, metrics=metrics[i : i + _BATCH])
