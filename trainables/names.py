"""Names that cross module and process lines, in one place.

A trial reports them, the driver collects them, the tracker logs them and users read them
(CSV columns, MLflow metrics, tags and artifacts), so a name changes here or nowhere. They
are plain strings: pandas, JSON, Ray and MLflow take them as they are. Pure data, no imports:
``trainables`` and ``tuning`` both use it.
"""
from __future__ import annotations

from typing import Any, TypedDict

# What every point of a sweep measures (DESIGN.md, "Metric names"); any of them can be an objective.
POINT_METRICS = ("accuracy", "test_accuracy", "latency_ms", "latency_p90_ms", "size_mb", "macs",
                 "nonzero_params", "sparsity", "throughput_ips")
# What a trial reports after every training epoch (MLflow: step = epoch).
EPOCH_METRICS = ("val_accuracy", "train_loss", "images_per_second")
# Sweep metrics drawn per method as curves over the ratio (MLflow: sweep_<metric>/<method>, step = ratio x 100).
CURVE_METRICS = ("accuracy", "latency_ms", "size_mb")

# A trial's reports: PHASE says which kind. Every epoch reports TRAIN; the last report is DONE
# (the objectives at the trial's own point, and the whole sweep table under SWEEP_TABLE) or
# DIVERGED (with ERROR, and no objectives).
PHASE = "phase"
TRAIN, DIVERGED, DONE = "train", "diverged", "done"
SWEEP_TABLE = "sweep_json"
ERROR = "error"

# Files and MLflow artifacts.
CHECKPOINT_FILE = "checkpoint.pt"  # the dense checkpoint of a trial or of `prunetune train`
CHECKPOINT_DIR = "checkpoint"  # a trial run's artifact directory holding it ...
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"  # ... so its artifact path is this
# beside it, a trial's fine-tuned (deployable) points' fp32 weights, "method@ratio" -> state dict
DEPLOYABLE_FILE = "deployable.pt"
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
STATUS_TAG = "prunetune.status"  # a trial's end: done | diverged | error | lost (started, never recorded by Tune)
LOST = "lost"
CHECKPOINT_TAG = "prunetune.checkpoint"  # a trial's dense checkpoint once the front is final: kept | removed
KEPT, REMOVED = "kept", "removed"
ERROR_TAG = "prunetune.error"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent in the UI
# on the experiment: MLflow 3's kind for it (its UI still opens on GenAI unless the address asks: runs.ui_address)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class CheckpointMeta(TypedDict):
    """The ``meta`` of every checkpoint, from ``prunetune train`` and from a trial alike."""

    spec: dict[str, Any]  # the experiment spec it trained with (``Spec.to_dict``; ``train`` as used)
    config: dict[str, Any]  # the values a search sampled for the trial; {} outside a search
