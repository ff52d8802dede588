"""The Ray Tune function trainable: train (checkpointed every epoch) -> sweep -> report.

The only module of ``trainables`` that imports Ray. One trial:

1. restores from ``tune.get_checkpoint()`` when Tune restarts it (a lost node, a resumed
   search) and continues at the saved epoch;
2. trains with the trial's sampled ``lr`` (and any other searched keys), reporting
   ``val_accuracy``, ``train_loss``, ``epoch`` and ``images_per_second`` every epoch with a
   checkpoint (one kept per trial);
3. sweeps the experiment's (method, ratio[, int8]) grid on the trained weights without
   retraining (the cheap curve) and builds its deployable points: its own sampled
   ``(method, prune_ratio)`` pruned and fine-tuned for ``[search] finetune_epochs`` with
   distillation from the trained weights, and the dense model given the same epochs (the
   equal-compute reference), fp32 and INT8; latencies are shared across trials through the
   :class:`LatencyCache` actor (provisional: the driver re-measures the front quietly);
4. reports the objectives at its own deployable point (``accuracy_no_finetune`` beside) and
   the whole table (``sweep_json``), from which the searcher feeds Optuna.

A diverging lr ends the trial with ``phase = "diverged"`` and no objectives (Optuna records it
as pruned); the search goes on. The trial uses exactly the CPUs (threads) and GPU Ray gave it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune

from trainables.data import Splits
from trainables.model import ModelConfig
from trainables.names import (CHECKPOINT_FILE, DEPLOYABLE_FILE, DIVERGED, DONE, EPOCH_METRICS, ERROR, PHASE, SWEEP_TABLE, TRAIN,
                              CheckpointMeta)
from trainables.ort import OrtModel
from trainables.sweep import SweepConfig, is_dense, run_sweep, table_to_json
from trainables.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, scratch_dir
from trainables.train import DeviceError, Diverged, TrainConfig, fit

LATENCY_CACHE = "prunetune_latency_cache"


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """What every trial of a search runs: the experiment's typed ``[model]``, ``[train]`` and
    ``[sweep]`` sections and what the search asks beyond them (the trial does not read the
    driver's ``[search]`` table, nor any dict)."""

    model: ModelConfig
    train: TrainConfig
    sweep: SweepConfig
    finetune_epochs: int  # the deployable points' fine-tuning epochs (0: built without)
    method: str  # the own point's method when the search does not sample one
    record: dict[str, Any]  # the experiment spec as each checkpoint records it (written, never read here)
    rungs: tuple[int, ...] = ()  # epochs after which the trial predicts its point (early stopping: tuning.stopping)


@ray.remote(num_cpus=0)
class LatencyCache:
    """Latency per architecture signature, shared by every trial of a search. The first
    measurement of an architecture wins, so the same (method, ratio, int8) point gets the same
    latency in every trial, even when two trials measured it at the same time."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.table.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.table.setdefault(key, value)


class _SharedCache:
    """The mapping ``run_sweep`` expects, backed by the search's LatencyCache actor; if the
    actor is gone (its node died), the trial keeps its own measurements rather than failing."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.local: dict[str, dict[str, Any]] = {}

    def _call(self, method: str, *args: Any) -> Any:
        if self.actor is not None:
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except ray.exceptions.RayActorError:
                print("prunetune: the shared latency cache is gone; this trial measures on its own", flush=True)
                self.actor = None
        return self.local.get(args[0]) if method == "get" else self.local.setdefault(*args)

    def __contains__(self, key: str) -> bool:
        return self[key] is not None

    def __getitem__(self, key: str) -> dict[str, Any] | None:
        return self._call("get", key)

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self._call("put", key, value)


def _resources(requested: str = "auto") -> tuple[int, torch.device]:
    """Threads and device from what Ray assigned to this trial.

    A trial given a GPU trains on it; with a fraction of one (``gpus_per_trial = 0.25``) its
    CUDA allocator is capped at that fraction of the card's memory, so one trial cannot starve
    the others sharing it. A GPU that torch cannot use is an error, not a silent CPU run,
    unless ``[train] device = "cpu"`` says the GPUs are scheduling slots only.
    """
    assigned = ray.get_runtime_context().get_assigned_resources()
    threads = max(1, int(assigned.get("CPU", 1)))
    gpu_ids = ray.get_gpu_ids()
    if requested == "cuda" and not gpu_ids:
        raise DeviceError("[train] device = \"cuda\" but Ray gave this trial no GPU: set [search] gpus_per_trial "
                          "(e.g. 1, or 0.5 to share a GPU between two trials)")
    if not gpu_ids or requested == "cpu":
        return threads, torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"Ray assigned GPU {','.join(map(str, gpu_ids))} to this trial, but torch {torch.__version__} "
            f"cannot use it (CUDA build: {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}). Install a CUDA build of torch on the worker "
            "nodes, or set [train] device = \"cpu\" to use the GPUs as scheduling slots only")
    fraction = float(assigned.get("GPU", 1.0))
    if fraction < 1.0:
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return threads, torch.device("cuda")


def _sweep(model: torch.nn.Module, splits: Splits, cfg: SweepConfig, train_cfg: TrainConfig, cache: Any,
           method: str, ratio: float, finetune_epochs: int, shipped: dict[str, torch.nn.Module],
           artifacts: dict[str, OrtModel]) -> pd.DataFrame:
    """The trial's points: the cheap no-retrain curve over the ``[sweep]`` grid (fp32, in the
    ``[sweep]`` runtime: it is not shipped), and the deployable ones: its own (method, ratio)
    pruned and fine-tuned with distillation from the trained weights, beside the dense model given
    the same epochs (the equal-compute reference), each built as the ONNX classifier that ships,
    fp32 and, when ``[sweep] int8``, ONNX Runtime INT8, and measured as that very file.
    ``artifacts`` receives those files' models, ``shipped`` the fine-tuned fp32 weights (for a
    torch export of the point): both are filed beside the checkpoint."""
    curve = run_sweep(model, splits, dataclasses.replace(cfg, int8=False), train_cfg, latency_cache=cache,
                      progress=False)
    deployable = dataclasses.replace(cfg, methods=[method], ratios=sorted({0.0, ratio}), finetune_epochs=finetune_epochs,
                                     runtime="onnxruntime")
    points = run_sweep(model, splits, deployable, train_cfg, latency_cache=cache, progress=False,
                       models_out=shipped if finetune_epochs else None, artifacts_out=artifacts)
    return pd.concat([curve, points], ignore_index=True)


def _latency_cache() -> Any:
    """The search's shared latency table, or a dict of this trial's own when the trainable runs
    without the search driver (which creates the actor)."""
    try:
        return _SharedCache(ray.get_actor(LATENCY_CACHE))
    except ValueError:
        return {}


def _predict(ckpt_path: Path, splits: Splits, plan: TrialPlan, train_cfg: TrainConfig, cache: Any,
             point: tuple[str, float, bool]) -> dict[str, float]:
    """The trial's deployable point predicted from the weights it has (the checkpoint just written):
    its (method, ratio, int8) pruned without retraining (BatchNorm re-estimated where structured
    pruning needs it), built and measured as the ONNX file that ships, on the validation images;
    the latency is its architecture's (shared through the latency cache: timed once a search)."""
    method, ratio, int8 = point
    model = model_from_checkpoint(load_checkpoint(ckpt_path), trusted=plan.model.arch).to(splits.train.x.device)
    cfg = dataclasses.replace(plan.sweep, methods=[method], ratios=[ratio], int8=int8, finetune_epochs=0,
                              runtime="onnxruntime")
    quick = dataclasses.replace(splits, test=splits.val.head(1))  # a prediction reads the validation split only
    rows = run_sweep(model.eval(), quick, cfg, train_cfg, latency_cache=cache, progress=False)
    row = rows[rows.int8 == int8].iloc[0]
    return {"predicted_accuracy": float(row.accuracy), "predicted_latency_ms": float(row.latency_ms)}


def _restored() -> dict[str, Any] | None:
    """The checkpoint Tune restored this trial from (a restarted trial, a resumed search), or None."""
    restored = tune.get_checkpoint()
    if restored is None:
        return None
    with restored.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def _own_point(df: pd.DataFrame, method: str, ratio: float, int8: bool) -> dict[str, Any]:
    """The trial's own deployable point, with the equal-compute dense accuracy an accuracy drop
    is measured against."""
    built = df[df.artifact.notna()]
    rows = built[(built.method == method) & (built.ratio == ratio) & (built.int8 == int8)]
    own = rows.iloc[0].to_dict()
    own.pop("method"), own.pop("ratio"), own.pop("int8")
    dense = built[is_dense(built)]
    own["dense_accuracy"] = float(dense.accuracy.max()) if len(dense) else None
    return own


def _sampled(train: TrainConfig, config: dict[str, Any], threads: int) -> TrainConfig:
    """``[train]`` with the values the search sampled for this trial (lr, and any other ``[train]``
    key) and the threads Ray gave it. The device stays the one the user asked for ("auto"), so the
    checkpoint sweeps and exports anywhere; the device this trial used is recorded beside it."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(train, **{k: v for k, v in config.items() if k in fields}, threads=threads)


def train_and_sweep(config: dict[str, Any], splits: Splits, plan: TrialPlan) -> None:
    """Function trainable; ``splits`` and ``plan`` come once per search via ``tune.with_parameters``."""
    # one "Checkpoint successfully created" line per epoch per trial drowns the progress table
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    threads, device = _resources(plan.train.device)
    torch.set_num_threads(threads)
    splits = splits.to(device)  # once: training and the sweep both keep it on the device
    train_cfg, sweep_cfg, model_cfg = _sampled(plan.train, config, threads), plan.sweep, plan.model
    method = config.get("method", plan.method)
    ratio = round(float(config.get("prune_ratio", 0.0)), 4)
    int8 = bool(config.get("int8", False))
    base = {"trial_start": time.time(), "lr": train_cfg.lr, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()), "device": device.type,
            "node_id": ray.get_runtime_context().get_node_id(), "threads": threads}

    resume, cache = _restored(), _latency_cache()
    scratch = scratch_dir()  # deleted when this local goes (the trial returns): tune.report copies
    workdir = Path(scratch.name)  # each checkpoint into storage_path before it returns
    ckpt_path = workdir / CHECKPOINT_FILE

    def report_epoch(m: dict[str, float]) -> None:
        metrics = {**base, PHASE: TRAIN, "epoch": int(m["epoch"]), **{k: m[k] for k in EPOCH_METRICS}}
        if metrics["epoch"] in plan.rungs:
            metrics.update(_predict(ckpt_path, splits, plan, train_cfg, cache, (method, ratio, int8)))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(workdir)))

    try:
        if resume is not None and resume["epoch"] >= train_cfg.epochs:
            model = model_from_checkpoint(resume, trusted=model_cfg.arch).to(device)  # trained already; sweep only
            val_acc = resume["history"][-1]["val_accuracy"]
        else:
            meta = CheckpointMeta(spec={**plan.record, "train": dataclasses.asdict(train_cfg)}, config=config)
            result = fit(splits, train_cfg, checkpoint_path=ckpt_path, resume=resume, meta=meta, on_epoch=report_epoch,
                         model_cfg=model_cfg)
            model, val_acc = result.model, result.val_accuracy
    except Diverged as e:
        tune.report({**base, PHASE: DIVERGED, "epoch": e.epoch, ERROR: str(e)})
        return

    epochs, shipped, artifacts = plan.finetune_epochs, {}, {}
    df = _sweep(model.eval(), splits, sweep_cfg, train_cfg, cache, method, ratio, epochs, shipped, artifacts)
    # next to the dense checkpoint, kept with it (the final report's checkpoint)
    if not ckpt_path.is_file():  # trained before a restart: the dense weights came from the restored checkpoint
        save_checkpoint(ckpt_path, resume)
    if shipped:
        torch.save({k: m.state_dict() for k, m in shipped.items()}, workdir / DEPLOYABLE_FILE)
    for name, onnx in artifacts.items():
        (workdir / name).parent.mkdir(exist_ok=True)
        onnx.save(workdir / name)
    own = _own_point(df, method, ratio, int8)
    if device.type == "cuda":  # what the trial needed of its GPU share
        base["gpu_memory_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    tune.report({**base, **own, PHASE: DONE, "epoch": train_cfg.epochs, "val_accuracy": val_acc,
                 "method": method, "prune_ratio": ratio, "int8": int8, "trial_end": time.time(),
                 SWEEP_TABLE: table_to_json(df)},
                checkpoint=tune.Checkpoint.from_directory(str(workdir)))
