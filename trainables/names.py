"""Names a trial reports and files, in one place.

A trial reports them and the driver reads them (CSV columns, MLflow metrics), so a name changes
here or nowhere. The driver's own vocabulary (its files, MLflow tags and artifacts) is in
:mod:`tuning.names`. Pure data, no imports: ``trainables`` and ``tuning`` both use it.
"""
from __future__ import annotations

from typing import Any, TypedDict

# What every point of a sweep measures (DESIGN.md, "Metric names"); any of them can be an objective.
POINT_METRICS = ("accuracy", "test_accuracy", "latency_ms", "latency_p90_ms", "size_mb", "macs",
                 "nonzero_params", "sparsity", "throughput_ips")
# What a trial reports after every training epoch (MLflow: step = epoch).
EPOCH_METRICS = ("val_accuracy", "train_loss", "images_per_second")

# A trial's reports: PHASE says which kind. Every epoch reports TRAIN; the last report is DONE
# (the objectives at the trial's own point, and the whole sweep table under SWEEP_TABLE) or
# DIVERGED (with ERROR, and no objectives).
PHASE = "phase"
TRAIN, DIVERGED, DONE = "train", "diverged", "done"
SWEEP_TABLE = "sweep_json"
ERROR = "error"

# A trial's files, in its checkpoint directory.
CHECKPOINT_FILE = "checkpoint.pt"  # the dense checkpoint of a trial or of `prunetune train`
# beside it, a trial's fine-tuned (deployable) points' fp32 weights, "method@ratio" -> state dict
DEPLOYABLE_FILE = "deployable.pt"


class CheckpointMeta(TypedDict):
    """The ``meta`` of every checkpoint, from ``prunetune train`` and from a trial alike."""

    spec: dict[str, Any]  # the experiment spec it trained with (``Spec.to_dict``; ``train`` as used)
    config: dict[str, Any]  # the values a search sampled for the trial; {} outside a search
