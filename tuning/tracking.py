"""MLflow tracking of a search, from the driver: a parent run per search, a child run per trial.

Everything is logged by a Ray Tune :class:`~ray.tune.Callback` on the driver, so trials never
talk to the tracking server (a worker node needs no route to it) and a resumed search finds
its runs again by tag instead of creating duplicates:

- parent run (tag ``prunetune.search_dir``): the experiment file and search settings as params,
  package versions and git commit as tags; after the search ``trials.csv``, ``all_points.csv``
  and ``pareto.csv`` as artifacts and the front's hypervolume as a metric;
- child run per trial (tags ``mlflow.parentRunId`` so the UI nests it, ``prunetune.trial_id``):
  the sampled config as params, ``val_accuracy``/``train_loss``/``images_per_second`` with
  ``step = epoch``; when the trial completes, its objectives, its sweep as ``sweep.csv`` and as
  metrics ``sweep_<metric>/<method>`` (accuracy, latency_ms, size_mb) with ``step = ratio x 100``
  so the UI's charts draw accuracy-vs-ratio and latency-vs-ratio curves per trial; a diverged
  trial is tagged ``prunetune.status = diverged`` and ends FAILED.

If the tracking server goes away mid-search, logging warns and training goes on: Ray keeps
every reported result in the experiment directory. After the search (and on ``prunetune
resume``, which is how a search that ended while MLflow was down catches up) every trial whose
child run is missing or unfinished is **back-filled** from those results (:meth:`backfill`),
then the tables and models are logged. Nothing is retried in a loop; nothing is lost.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.tune import Callback

from trainables.names import CHECKPOINT_DIR, CHECKPOINT_FILE
from trainables.sweep import table_from_report
from tuning import runs

_SWEEP_METRICS = ("accuracy", "latency_ms", "size_mb")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{k}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in d.items()}


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def _never_stop_the_search(method):
    """Tracking is a mirror: if the server goes away mid-search, warn (once per outage) and let
    training go on; Ray keeps every result and checkpoint, and :meth:`MlflowTracking.backfill`
    logs what was missed once the server answers again."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            out = method(self, *args, **kwargs)
        except Exception as e:  # any client or server error
            trial = args[2] if len(args) > 2 else kwargs.get("trial")
            if trial is not None:
                self.missed.add(trial.trial_id)
            if not self.failing:
                print(f"prunetune: warning: MLflow logging failed in {method.__name__} ({_first_line(e)}); the "
                      f"search goes on, results stay in {self.exp_dir} and are back-filled into MLflow after "
                      "the search (further failures are not shown)", file=sys.stderr, flush=True)
            self.failing = True
            return None
        if self.failing:
            print("prunetune: MLflow answers again", file=sys.stderr, flush=True)
            self.failing = False
        return out

    return wrapper


class MlflowTracking(Callback):
    """Tune callback that mirrors a search into MLflow (see the module docstring)."""

    latest: "MlflowTracking | None" = None  # the one made last (by a new search or a restore)

    def __init__(self, uri: str, spec_dict: dict[str, Any], exp_dir: Path) -> None:
        self.uri = uri
        self.client = runs.check_reachable(uri)
        self.spec = spec_dict
        self.exp_dir = str(Path(exp_dir).resolve())
        name = spec_dict["name"]
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.parent_id = self._find_or_create_parent()
        self.runs: dict[str, str] = self._existing_children()
        self.failing = False  # inside an outage of the tracking server
        self.missed: set[str] = set()  # trials with a result that did not reach MLflow
        MlflowTracking.latest = self

    # Tune pickles its callbacks with the experiment; a restored search reconnects and finds
    # its parent and child runs again by tag (no duplicates).
    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "spec_dict": self.spec, "exp_dir": self.exp_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # --------------------------------------------------------------- runs
    def _find_or_create_parent(self) -> str:
        found = runs.search_run(self.client, self.experiment_id, self.exp_dir)
        if found:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=Path(self.exp_dir).name, tags={
            "prunetune.search_dir": self.exp_dir, "prunetune.kind": "search", "git_commit": _git_commit(),
            **{f"version.{p}": _version(p) for p in ("torch", "ray", "optuna", "mlflow", "torch-pruning")},
        })
        rid = run.info.run_id
        params = {**_flat("search", self.spec["search"]), **_flat("sweep", self.spec["sweep"]),
                  **_flat("train", self.spec["train"]), **_flat("data", self.spec["data"])}
        from mlflow.entities import Param

        self.client.log_batch(rid, params=[Param(k, v[:6000]) for k, v in params.items()])
        self.client.log_text(rid, json.dumps(self.spec, indent=2), "experiment.json")
        return rid

    def _existing_children(self) -> dict[str, str]:
        children = runs.child_runs(self.client, self.experiment_id, self.parent_id)
        return {trial_id: r.info.run_id for trial_id, r in children.items()}

    def _child(self, trial) -> str:
        if trial.trial_id not in self.runs:
            run = self.client.create_run(self.experiment_id, run_name=trial.trial_id, tags={
                "mlflow.parentRunId": self.parent_id, "prunetune.trial_id": trial.trial_id,
                "prunetune.kind": "trial"})
            for k, v in trial.config.items():
                self.client.log_param(run.info.run_id, k, v)
            self.runs[trial.trial_id] = run.info.run_id
        return self.runs[trial.trial_id]

    # --------------------------------------------------------------- Tune callback
    @_never_stop_the_search
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._child(trial)

    @_never_stop_the_search
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric

        rid = self._child(trial)
        ts = int(result.get("timestamp", 0) * 1000)
        phase = result.get("phase")
        if phase == "train":
            step = int(result["epoch"])
            keys = ("val_accuracy", "train_loss", "images_per_second")
            self.client.log_batch(rid, metrics=[Metric(k, float(result[k]), ts, step) for k in keys if k in result])
        elif phase == "diverged":
            self.client.set_tag(rid, "prunetune.status", "diverged")
            self.client.set_tag(rid, "prunetune.error", str(result.get("error", ""))[:5000])
        elif phase == "done":
            self.client.set_tag(rid, "prunetune.status", "done")
            sweep = table_from_report(result)
            metrics = [Metric(k, float(result[k]), ts, 0) for k in ("accuracy", "test_accuracy", "latency_ms",
                       "latency_p90_ms", "size_mb", "sparsity", "macs", "nonzero_params") if result.get(k) is not None]
            for (method, int8), rows in sweep.groupby(["method", "int8"]):
                suffix = f"{method}{'_int8' if int8 else ''}"
                for _, row in rows.iterrows():
                    step = int(round(row.ratio * 100))
                    metrics += [Metric(f"sweep_{m}/{suffix}", float(row[m]), ts, step) for m in _SWEEP_METRICS]
            for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000 metrics
                self.client.log_batch(rid, metrics=metrics[i : i + 900])
            self.client.log_text(rid, sweep.to_csv(index=False), "sweep.csv")

    @_never_stop_the_search
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        rid = self._child(trial)
        diverged = trial.last_result.get("phase") == "diverged"
        ckpt = getattr(trial, "checkpoint", None)
        if not diverged and ckpt is not None and (Path(ckpt.path) / CHECKPOINT_FILE).is_file():
            # the dense weights every compressed model of this trial is re-derived from
            self.client.log_artifact(rid, str(Path(ckpt.path) / CHECKPOINT_FILE), CHECKPOINT_DIR)
        self.client.set_terminated(rid, "FAILED" if diverged else "FINISHED")

    @_never_stop_the_search
    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        rid = self._child(trial)
        self.client.set_tag(rid, "prunetune.status", "error")
        self.client.set_terminated(rid, "FAILED")

    # --------------------------------------------------------------- after the search
    def backfill(self, results) -> list[str]:
        """Log every trial of ``results`` (a Tune ResultGrid) whose child run is missing, did
        not end, or missed a result during an outage, from what Ray persisted in the trial's
        directory (``result.json``: every report, in order). Returns the trial ids logged."""
        children = runs.child_runs(self.client, self.experiment_id, self.parent_id)
        # the runs as the server has them (under Ray Client, Tune's copy of this callback logged them)
        self.runs.update({trial_id: r.info.run_id for trial_id, r in children.items()})
        ended = {trial_id for trial_id, r in children.items() if r.info.status in ("FINISHED", "FAILED")}
        done = []
        for r in results:
            reports = _reports(r.path)
            if not reports or (reports[-1]["trial_id"] in ended and reports[-1]["trial_id"] not in self.missed):
                continue
            trial = SimpleNamespace(trial_id=reports[-1]["trial_id"], config=r.config, last_result=reports[-1],
                                    checkpoint=r.checkpoint)
            self._child(trial)
            for report in reports:
                MlflowTracking.on_trial_result.__wrapped__(self, None, None, trial, report)
            if r.error:
                MlflowTracking.on_trial_error.__wrapped__(self, None, None, trial)
            else:
                MlflowTracking.on_trial_complete.__wrapped__(self, None, None, trial)
            self.missed.discard(trial.trial_id)
            done.append(trial.trial_id)
        return done

    def finish(self, res, spec, results, splits=None) -> bool:
        """After the search: back-fill what an outage missed, then the tables, the front's plot
        and hypervolume, the registered models. Warns and returns False if MLflow still fails:
        the results stay on disk and ``prunetune resume`` logs them later."""
        try:
            filled = self.backfill(results)
            if filled:
                print(f"MLflow: back-filled {len(filled)} trial run(s) missed while the server was away: "
                      f"{', '.join(filled)}", flush=True)
            self._finish(res, spec, splits)
            return True
        except Exception as e:
            print(f"prunetune: warning: MLflow logging after the search failed ({_first_line(e)}); every result "
                  f"is in {res.path}. When {self.uri} answers again, `prunetune resume {res.path}` logs the "
                  "missing runs, the tables and the registered models", file=sys.stderr, flush=True)
            return False

    def _finish(self, res, spec, splits) -> None:
        from tuning import models

        exp_dir = Path(res.path)
        objectives = spec.search.objectives
        if len(res.front) and len(objectives) == 2:
            models.plot_front(res.points, res.front, objectives, exp_dir / "pareto.png")
        for name in ("trials.csv", "all_points.csv", "pareto.csv", "pareto.png"):
            if (exp_dir / name).is_file():
                self.client.log_artifact(self.parent_id, str(exp_dir / name))
        if res.hypervolume is not None:
            self.client.log_metric(self.parent_id, "pareto_hypervolume", res.hypervolume)
        if len(res.front) and len(objectives) == 2 and spec.search.register_models:
            checkpoints = {r.trial_id: str(Path(r.checkpoint) / CHECKPOINT_FILE)
                           for r in res.trials.itertuples() if isinstance(r.checkpoint, str)}
            aliases = models.register_front(self.uri, self.parent_id, res.front, objectives, checkpoints,
                                            self.runs, spec, splits)
            print("registered model " + repr(spec.name) + ": " +
                  ", ".join(f"{a} -> version {v}" for a, v in aliases.items()), flush=True)
        self.client.set_terminated(self.parent_id, "FINISHED")


def _reports(trial_dir: str | None) -> list[dict[str, Any]]:
    """Every result a trial reported, in order, from Ray's ``result.json`` in its directory."""
    f = Path(trial_dir or "") / "result.json"
    if not trial_dir or not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
