"""Compressed models from a search: re-derive, register the Pareto front, export.

A compressed model is never stored per sweep point. Each trial's MLflow run holds its dense
checkpoint (artifact ``checkpoint/checkpoint.pt``); a point's model is re-derived from it with
``(method, ratio, int8)`` deterministically (:func:`derive`). After a search the Pareto-optimal
points are logged with MLflow's PyTorch flavour and registered under one registered model with
the aliases ``best-accuracy``, ``fastest`` and ``knee``; ``prunetune export`` turns a run or a
``models:/NAME@ALIAS`` into an ONNX or TorchScript file and checks it against PyTorch.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from trainables import compress, data
from trainables.names import CHECKPOINT_ARTIFACT, CheckpointMeta
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from tuning import pareto
from tuning.pareto import Objective
from tuning.spec import Spec, from_dict


class ModelError(ValueError):
    """A run, model alias or export request that cannot be served; says why."""


ALIASES = ("best-accuracy", "fastest", "knee")  # what pick() names; register_front sets them


@dataclass
class Point:
    run_id: str  # the trial's MLflow run (holds the dense checkpoint)
    method: str
    ratio: float
    int8: bool


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def resolve(uri: str, ref: str, method: str | None, ratio: float | None, int8: bool | None) -> Point:
    """``RUN_ID`` or ``models:/NAME@ALIAS`` (+ overrides) -> the point to derive."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    defaults: dict[str, Any]
    try:
        if ref.startswith("models:/"):
            name, _, alias = ref.removeprefix("models:/").partition("@")
            if not alias:
                raise ModelError(f"{ref}: use models:/NAME@ALIAS (aliases: {', '.join(ALIASES)})")
            tags = client.get_model_version_by_alias(name, alias).tags
            run_id = tags["trial_run_id"]
            defaults = {"method": tags["method"], "ratio": float(tags["ratio"]), "int8": tags["int8"] == "True"}
        else:
            run = client.get_run(ref)
            run_id, p = ref, run.data.params
            defaults = {"method": p.get("method", "global_l1"), "ratio": float(p.get("prune_ratio", 0.0)),
                        "int8": p.get("int8", "False") == "True"}
    except MlflowException as e:
        raise ModelError(f"{ref} not found in the tracking store {uri}: {str(e).splitlines()[0]}") from None
    return Point(run_id, method or defaults["method"], defaults["ratio"] if ratio is None else ratio,
                 defaults["int8"] if int8 is None else int8)


def dense_from_run(uri: str, run_id: str) -> tuple[nn.Module, Spec]:
    """Download the trial's dense checkpoint and rebuild the model and its experiment spec."""
    client = _client(uri)
    try:
        local = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tempfile.mkdtemp(prefix="prunetune-"))
    except Exception as e:
        from tuning import retention  # why the run has none, when retention removed it

        raise ModelError(retention.why_missing(client, run_id) or f"run {run_id} has no {CHECKPOINT_ARTIFACT} "
                         f"artifact (is it a completed prunetune trial run?): {str(e).splitlines()[0]}") from None
    return dense_from_checkpoint(local)


def dense_from_checkpoint(path: str | Path) -> tuple[nn.Module, Spec]:
    """A checkpoint written by training (``prunetune train`` or a trial) -> dense model and the
    experiment spec it was trained with (so sweeps and exports use the same data splits)."""
    ckpt = load_checkpoint(path)
    meta: CheckpointMeta = ckpt["meta"]
    return model_from_checkpoint(ckpt).eval(), from_dict(meta["spec"], source=f"{path} (its experiment)")


def load_trained(path: str | Path) -> tuple[nn.Module, Spec, data.Splits]:
    """A checkpoint -> its dense model, spec and data splits, on this machine's device."""
    from trainables.train import pick_device

    model, spec = dense_from_checkpoint(path)
    # where this runs is this machine's business, not the recipe's: a checkpoint trained with
    # device = "cuda" sweeps on a laptop's CPU (only an explicit "cpu" is kept)
    device = pick_device("cpu" if spec.train.device == "cpu" else "auto")
    return model.to(device), spec, data.load(spec.data).to(device)


def derive(dense: nn.Module, spec: Spec, point: Point, splits: data.Splits | None = None) -> nn.Module:
    """The deployable model of ``point``: prune -> bake masks in -> INT8 (calibrated on the same
    training images as the sweep). Any ratio in [0, 1) works, swept or not."""
    try:
        compress.check_method(point.method)
        compress.check_ratio(point.ratio)
    except ValueError as e:
        raise ModelError(str(e)) from None
    pruned = compress.prune(dense, point.method, point.ratio, seed=spec.sweep.seed, round_to=spec.sweep.round_to)
    model = compress.make_permanent(pruned).eval()
    if point.int8:
        splits = splits or data.load(spec.data)
        model = compress.quantize_int8(model, data.normalize(splits.train.x[: spec.sweep.calibration_size]))
    return model


def export_point(uri: str, point: Point, fmt: str, out: str | Path) -> tuple[float, int]:
    """Derive ``point`` from its trial's run and :func:`export` it; returns the top-1 agreement
    and the number of held-out test images it was measured on."""
    dense, spec = dense_from_run(uri, point.run_id)
    splits = data.load(spec.data)
    images = data.normalize(splits.test.x)
    return export(derive(dense, spec, point, splits), fmt, out, images), len(images)


def _predict(fn, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def export(model: nn.Module, fmt: str, out: str | Path, images: torch.Tensor) -> float:
    """Write ``model`` as ONNX or TorchScript to ``out``, reload it with ONNX Runtime /
    torch.jit and return top-1 agreement with the PyTorch model on ``images`` (normalised)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = images[:1]
    with torch.inference_mode():
        ref = _predict(lambda b: model(b).argmax(1).numpy(), images)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": still the format asked for
            torch.jit.trace(model, example).save(str(out))
            loaded = torch.jit.load(str(out)).eval()
        with torch.inference_mode():
            got = _predict(lambda b: loaded(b).argmax(1).numpy(), images)
    elif fmt == "onnx":
        if compress.is_quantized(model):
            raise ModelError("INT8 models export as --format torchscript (torch's FX INT8 kernels have no "
                             "ONNX equivalent here); use --format torchscript or drop --int8")
        import onnxruntime as ort

        torch.onnx.export(model, (example,), str(out), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = _predict(lambda b: session.run(None, {"image": b.numpy()})[0].argmax(1), images)
    else:
        raise ModelError(f"unknown format {fmt!r}; use onnx or torchscript")
    return float((ref == got).mean())


def pick(front: pd.DataFrame, objectives: list[Objective]) -> dict[str, Any]:
    """Alias -> the front row (index label) it names: ``best-accuracy`` (best first objective),
    ``fastest`` (best second objective) and ``knee`` (:func:`tuning.pareto.knee`)."""
    (acc, acc_mode), (lat, lat_mode) = objectives[0], objectives[1]
    return {
        "best-accuracy": front[acc].idxmax() if acc_mode == "max" else front[acc].idxmin(),
        "fastest": front[lat].idxmin() if lat_mode == "min" else front[lat].idxmax(),
        "knee": pareto.knee(front, objectives),
    }


def register_front(uri: str, parent_run_id: str, front: pd.DataFrame, picks: dict[str, Any],
                   checkpoints: dict[str, Path], trial_runs: dict[str, str], spec: Spec,
                   splits: data.Splits | None = None) -> dict[str, int]:
    """Log the Pareto-optimal models on the parent run and register them under ``spec.name``:
    the ``picks`` (alias -> front row) first, always, then the rest of the front in order, up to
    ``[search] register_models``; each alias is set on its version. ``checkpoints``: trial id ->
    local dense checkpoint; ``trial_runs``: trial id -> its MLflow run; ``splits``: the search's
    data (loaded if not given). Returns alias -> version."""
    import mlflow

    front = front.drop_duplicates(["trial_id", "method", "ratio", "int8"])
    order = list(dict.fromkeys([*picks.values(), *front.index]))
    order = order[:max(spec.search.register_models, len(set(picks.values())))]
    splits = splits or data.load(spec.data)
    example = data.normalize(splits.test.x[:2])
    client = _client(uri)
    mlflow.set_tracking_uri(uri)
    versions: dict[Any, int] = {}
    with mlflow.start_run(run_id=parent_run_id):
        for i, idx in enumerate(order):
            row = front.loc[idx]
            point = Point(trial_runs.get(row.trial_id, ""), row.method, float(row.ratio), bool(row.int8))
            dense = model_from_checkpoint(load_checkpoint(checkpoints[row.trial_id])).eval()
            versions[idx] = _log_model(f"pareto-{i}", derive(dense, spec, point, splits), example, spec.name)
            tags = {"method": row.method, "ratio": str(row.ratio), "int8": str(bool(row.int8)), "lr": str(row.lr),
                    "trial_id": row.trial_id, "trial_run_id": point.run_id}
            tags.update({k: str(row[k]) for k in ("accuracy", "test_accuracy", "latency_ms", "size_mb") if k in row})
            for k, v in tags.items():
                client.set_model_version_tag(spec.name, str(versions[idx]), k, v)
    for alias, idx in picks.items():
        client.set_registered_model_alias(spec.name, alias, str(versions[idx]))
    return {alias: versions[idx] for alias, idx in picks.items()}


def _log_model(name: str, model: nn.Module, example: torch.Tensor, registered_name: str) -> int:
    """Log ``model`` on the active run with MLflow's PyTorch flavour (signature, input example)
    and register it under ``registered_name``; returns the new version."""
    import mlflow
    from mlflow.models import infer_signature

    with torch.inference_mode():
        signature = infer_signature(example.numpy(), model(example).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pytorch.log_model(model, name=name, signature=signature, input_example=example.numpy(),
                                        registered_model_name=registered_name, pip_requirements=["torch", "torchvision"],
                                        await_registration_for=60)
    return int(info.registered_model_version)
