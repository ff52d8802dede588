"""Which trial checkpoints outlive a search: ``[search] keep_checkpoints``.

While a search runs, every trial keeps its dense checkpoint in ``storage_path`` (Ray keeps one
per trial): a trial whose worker dies, or a search that is resumed, continues from it. After
the search only the checkpoints someone derives a model from are worth their size (fp32
weights and optimizer state: 134 MB for CIFAR-ResNet18 with Adam), so once the front is
final (the search ended and MLflow holds its front and registered models: the parent run is
FINISHED) :func:`apply` does what the setting says:

- ``front`` (default): the trials with a point on the Pareto front keep their checkpoint in
  storage and get it as MLflow artifacts of their run (``checkpoint/``: ``checkpoint.pt`` and
  whatever the trial saved beside it, what ``prunetune export`` derives from); every other
  finished trial's checkpoint directories are deleted from storage and never reach MLflow, its
  run tagged ``prunetune.checkpoint = removed`` so that ``export`` says why (:func:`why_missing`);
- ``all``: every finished trial keeps its checkpoint and (unless it diverged) gets the
  artifact; nothing is deleted.

A trial that ended in error keeps its checkpoint (``prunetune resume`` retries it from there).
If MLflow cannot be reached, nothing is deleted: ``prunetune resume DIR`` applies the setting
once the front is logged. Applying it again changes nothing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from trainables.names import CHECKPOINT_FILE, DIVERGED, DONE
from tuning.names import CHECKPOINT_DIR, CHECKPOINT_TAG, KIND_TAG, REMOVED, STATUS_TAG, TRIAL
from tuning import runs, storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from tuning.results import SearchResult
    from tuning.spec import Spec
    from tuning.tracking import MlflowTracking

_FINISHED = ("done", DIVERGED, "stopped")  # trials.csv statuses of trials that will not run again


@dataclass
class Plan:
    log: list[str]  # trial ids whose checkpoint is kept and logged to MLflow
    remove: list[str]  # trial ids whose checkpoints are deleted from storage


def plan(trials: pd.DataFrame, front: pd.DataFrame, keep: str) -> Plan:
    """What ``keep`` (``front`` | ``all``) does to the finished trials of ``trials`` (``trials.csv``)
    with a checkpoint, given the final ``front``; errored and unknown trials are left alone."""
    on_front = set(front.trial_id) if len(front) else set()
    finished = trials[trials.status.isin(_FINISHED) & trials.checkpoint.notna()] if len(trials) else trials
    log = [t.trial_id for t in finished.itertuples()
           if t.trial_id in on_front or (keep == "all" and t.status != DIVERGED)]  # a diverged model is no model
    remove = [t.trial_id for t in finished.itertuples() if keep == "front" and t.trial_id not in on_front]
    return Plan(log, remove)


def apply(spec: Spec, res: SearchResult, tracker: MlflowTracking | None) -> Plan | None:
    """Apply ``[search] keep_checkpoints`` to a finished search (see the module docstring);
    returns what was done, None when it waits for MLflow."""
    keep = spec.search.keep_checkpoints
    todo = plan(res.trials, res.front.rows, keep)
    if tracker is not None:
        try:
            if not tracker.ended():
                print("checkpoints: every trial's kept until MLflow holds the search's front; `prunetune resume "
                      f"{res.path}` applies keep_checkpoints = {keep!r} then", flush=True)
                return None
            checkpoints = res.checkpoints()
            tracker.file_checkpoints({t: checkpoints[t].parent for t in todo.log}, todo.remove)
        except Exception as e:
            print(f"prunetune: warning: checkpoints not logged to MLflow ({type(e).__name__}: "
                  f"{runs.first_line(e)[:200]}); none removed. `prunetune resume {res.path}` tries again",
                  file=sys.stderr, flush=True)
            return None
    dirs = res.trials.set_index("trial_id").loc[todo.remove, "trial_dir"] if todo.remove else []
    freed = sum(storage.remove_checkpoints(d) for d in dirs)
    other = ('keep_checkpoints = "front" keeps only those' if keep == "all" else
             'keep_checkpoints = "all" keeps every one')
    logged = " and logged to MLflow" if tracker is not None else ""
    print(f"checkpoints ([search] keep_checkpoints = {keep!r}): {len(todo.log)} kept{logged} "
          f"({'every finished trial' if keep == 'all' else 'the trials with a point on the Pareto front'}), "
          f"{len(todo.remove)} removed from storage ({freed / 1e6:.0f} MB); {other}", flush=True)
    return todo


def why_missing(client: MlflowClient, run_id: str) -> str | None:
    """Why the trial run ``run_id`` has no checkpoint artifact, if retention knows (else None)."""
    try:
        tags = client.get_run(run_id).data.tags
    except Exception:
        return None
    if tags.get(CHECKPOINT_TAG) == REMOVED:
        return (f"trial run {run_id}: its checkpoint was not kept. The trial has no point on its search's Pareto "
                "front, and [search] keep_checkpoints = \"front\" (the default) removes those checkpoints once the "
                "front is final. Export a point of the front (`prunetune pareto` lists them), or run the search "
                "with keep_checkpoints = \"all\" (--set search.keep_checkpoints=all) to keep every trial's")
    if tags.get(KIND_TAG) == TRIAL and tags.get(STATUS_TAG) == DONE and CHECKPOINT_TAG not in tags:
        return (f"trial run {run_id} has no {CHECKPOINT_DIR}/{CHECKPOINT_FILE} in MLflow yet: checkpoints are "
                "logged once the search's front is final (is the search still running, or did its MLflow logging "
                "fail? `prunetune resume DIR` logs them)")
    return None
