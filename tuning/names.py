"""The driver's names: its files, MLflow tags, metrics and artifacts, in one place.

The driver writes them and users read them (CSV files, MLflow tags and artifacts, the UI), so a
name changes here or nowhere. What a trial reports is named in :mod:`trainables.names`.
"""
from __future__ import annotations

from trainables.names import CHECKPOINT_FILE, DEPLOYABLE_FILE

# Sweep metrics drawn per method as curves over the ratio (MLflow: sweep_<metric>/<method>, step = ratio x 100).
CURVE_METRICS = ("accuracy", "latency_ms", "size_mb")

# Files and MLflow artifacts.
CHECKPOINT_DIR = "checkpoint"  # a trial run's artifact directory holding its checkpoint directory's files ...
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"  # ... so the dense checkpoint's artifact path is this
DEPLOYABLE_ARTIFACT = f"{CHECKPOINT_DIR}/{DEPLOYABLE_FILE}"
SWEEP_CSV = "sweep.csv"  # a trial run's sweep table
EXPERIMENT_JSON = "experiment.json"  # the parent run's experiment spec
# in the experiment directory, and artifacts of the parent run after the search
TRIALS_CSV, POINTS_CSV, FRONT_CSV, FRONT_PNG = "trials.csv", "all_points.csv", "pareto.csv", "pareto.png"
HYPERVOLUME = "pareto_hypervolume"  # the parent run's metrics: the front's hypervolume,
ACCURACY_FLOOR = "accuracy_floor"  # the floor it obeys (resolved: twice chance by default),
DENSE_ACCURACY = "dense_accuracy"  # the best equal-compute dense accuracy (what a drop is against)
# in the experiment directory only: what `prunetune resume` reads back
SPEC_FILE, STUDY_FILE, TRACKING_FILE = "prunetune_spec.json", "optuna.db", "tracking_uri"
LOCK_FILE = ".prunetune.lock"  # held by the live search of the directory (its pid and host inside)
# in a submitted job's working directory: the MLflow credentials `prunetune submit` hands over (read, then deleted)
CREDENTIALS_FILE = ".prunetune-mlflow-credentials.json"

# MLflow tags.
KIND_TAG = "prunetune.kind"  # "search" on the parent run, "trial" on a child run
SEARCH, TRIAL = "search", "trial"
SEARCH_DIR_TAG = "prunetune.search_dir"  # the parent run of the search in that directory
TRIAL_ID_TAG = "prunetune.trial_id"  # the child run of that Ray Tune trial
STATUS_TAG = "prunetune.status"  # a trial's end: done | diverged | stopped (early) | error | lost (never recorded by Tune)
LOST, STOPPED = "lost", "stopped"
CHECKPOINT_TAG = "prunetune.checkpoint"  # a trial's dense checkpoint once the front is final: kept | removed
KEPT, REMOVED = "kept", "removed"
ERROR_TAG = "prunetune.error"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent in the UI
# on the experiment: MLflow 3's kind for it (its UI still opens on GenAI unless the address asks: runs.ui_address)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
