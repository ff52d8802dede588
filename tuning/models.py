"""Compressed models from a search: re-derive a point, export it.

A compressed model is never stored per sweep point. Each trial's MLflow run holds its dense
checkpoint (artifact ``checkpoint/checkpoint.pt``) and, when the search fine-tunes, the
fine-tuned fp32 weights of its deployable points (``checkpoint/deployable.pt``); a point's model
is re-derived from them with ``(method, ratio, int8)`` deterministically (:func:`derive`, and
:func:`runtime_model` for the runtime the search timed it in). ``prunetune export`` turns a run
or a ``models:/NAME@ALIAS`` into a self-contained ONNX or TorchScript file (:mod:`tuning.deploy`)
and checks it against the model it packs. :mod:`tuning.registry` registers the front.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from trainables import compress, data, ort
from trainables.errors import CheckpointError, ModelError
from trainables.names import CHECKPOINT_ARTIFACT, DEPLOYABLE_ARTIFACT, DEPLOYABLE_FILE, CheckpointMeta
from trainables.sweep import point_key
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from tuning import deploy, retention, selection
from tuning.spec import Spec, from_dict


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
                raise ModelError(f"{ref}: use models:/NAME@ALIAS (aliases: {', '.join(selection.ALIASES)})")
            tags = client.get_model_version_by_alias(name, alias).tags
            missing = {"trial_run_id", "method", "ratio", "int8"} - set(tags)
            if missing:
                raise ModelError(f"{ref} is not a version prunetune registered: its tags lack {', '.join(sorted(missing))}")
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


def dense_from_run(uri: str, run_id: str, where: str | Path) -> tuple[nn.Module, Spec, Path]:
    """Download the trial's dense checkpoint (and its fine-tuned points' weights, when it has
    them) into the directory ``where`` and rebuild the model and its experiment spec; also
    returns the local checkpoint."""
    client = _client(uri)
    try:
        local = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, where))
    except Exception as e:
        raise ModelError(retention.why_missing(client, run_id) or f"run {run_id} has no {CHECKPOINT_ARTIFACT} "
                         f"artifact (is it a completed prunetune trial run?): {str(e).splitlines()[0]}") from None
    try:
        client.download_artifacts(run_id, DEPLOYABLE_ARTIFACT, where)
    except Exception:  # a trial without fine-tuned points: export derives from the dense weights
        pass
    return (*dense_from_checkpoint(local), local)


def dense_from_checkpoint(path: str | Path) -> tuple[nn.Module, Spec]:
    """A checkpoint written by training (``prunetune train`` or a trial) -> dense model and the
    experiment spec it was trained with (so sweeps and exports use the same data splits)."""
    ckpt = load_checkpoint(path)
    meta: CheckpointMeta = ckpt["meta"]
    if not isinstance(meta.get("spec"), dict):
        raise CheckpointError(f"{path} records no experiment spec (its meta has {sorted(meta) or 'nothing'}): it was "
                              "not written by `prunetune train` or a search, so its data splits are unknown")
    return model_from_checkpoint(ckpt).eval(), from_dict(meta["spec"], source=f"{path} (its experiment)")


def load_trained(path: str | Path) -> tuple[nn.Module, Spec, data.Splits]:
    """A checkpoint -> its dense model, spec and data splits, on this machine's device."""
    from trainables.train import pick_device

    model, spec = dense_from_checkpoint(path)
    # where this runs is this machine's business, not the recipe's: a checkpoint trained with
    # device = "cuda" sweeps on a laptop's CPU (only an explicit "cpu" is kept)
    device = pick_device("cpu" if spec.train.device == "cpu" else "auto")
    return model.to(device), spec, data.load(spec.data).to(device)


def derive(dense: nn.Module, spec: Spec, point: Point, splits: data.Splits | None = None,
           calibration: torch.Tensor | None = None, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The deployable model of ``point``: prune -> bake masks in -> (``weights``: the point's
    fine-tuned fp32 weights, from its trial's :data:`~trainables.names.DEPLOYABLE_FILE`) -> INT8
    (calibrated on the same training images as the sweep: ``calibration``, else the first of
    ``splits``, loaded if not given). Without ``weights`` any ratio in [0, 1) works, swept or
    not, with the dense checkpoint's weights (no fine-tuning)."""
    try:
        compress.check_method(point.method)
        compress.check_ratio(point.ratio)
    except ValueError as e:
        raise ModelError(str(e)) from None
    pruned = compress.prune(dense, point.method, point.ratio, seed=spec.sweep.seed, round_to=spec.sweep.round_to)
    model = compress.make_permanent(pruned).eval()
    if weights is not None:
        model.load_state_dict(weights)
    if point.int8:
        model = compress.quantize_int8(model, calibration_images(spec, splits) if calibration is None else calibration)
    return model


def runtime_model(dense: nn.Module, spec: Spec, point: Point, calibration: torch.Tensor,
                  weights: dict[str, torch.Tensor] | None = None, runtime: str | None = None) -> nn.Module | ort.OrtModel:
    """``point`` as ``runtime`` (default: the search's) runs it: a torch model (fp32 or FX INT8), or
    an ONNX Runtime session (fp32, or ORT's own static INT8)."""
    if (runtime or spec.sweep.runtime) == "torch":
        return derive(dense, spec, point, calibration=calibration, weights=weights)
    name = f"{point.method} at ratio {point.ratio:g}"
    fp32 = derive(dense, spec, dataclasses.replace(point, int8=False), weights=weights)
    onnx = ort.export(fp32, spec.sweep.latency_threads, name)
    return ort.quantize(onnx, calibration, name) if point.int8 else onnx


def fine_tuned_weights(checkpoint: str | Path, point: Point) -> dict[str, torch.Tensor] | None:
    """The fine-tuned fp32 weights of ``point`` filed beside a trial's dense ``checkpoint``, or
    None (a no-retrain point, a search without fine-tuning, a ratio that was not the trial's)."""
    path = Path(checkpoint).with_name(DEPLOYABLE_FILE)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get(point_key(point.method, point.ratio))


def calibration_images(spec: Spec, splits: data.Splits | None = None) -> torch.Tensor:
    """The normalised training images INT8 is calibrated on (the sweep's: the first
    ``[sweep] calibration_size``); ``splits`` loaded from the spec if not given."""
    return data.normalize((splits or data.load(spec.data)).train.x[: spec.sweep.calibration_size])


def export_point(uri: str, point: Point, fmt: str, out: str | Path) -> tuple[float, int, bool]:
    """Derive ``point`` from its trial's run and :func:`export` it. Returns the top-1 agreement of
    the file with the model it packs, the number of held-out test images that was measured on,
    and whether the point's fine-tuned weights were found (else: derived without fine-tuning)."""
    with tempfile.TemporaryDirectory(prefix="prunetune-export-") as where:  # ~200 MB of checkpoints
        dense, spec, checkpoint = dense_from_run(uri, point.run_id, where)
        weights = fine_tuned_weights(checkpoint, point)
    splits = data.load(spec.data)
    runtime = "onnxruntime" if fmt == "onnx" else "torch"  # ONNX INT8 is ORT's own quantization
    model = runtime_model(dense, spec, point, calibration_images(spec, splits), weights, runtime)
    return export(model, fmt, out, splits.test), len(splits.test), weights is not None


def export(model: nn.Module | ort.OrtModel, fmt: str, out: str | Path, test: data.Split) -> float:
    """Write ``model`` self-contained (uint8 images in, :mod:`tuning.deploy`) as TorchScript (a
    torch model) or ONNX (an :class:`~trainables.ort.OrtModel`; a torch fp32 model is exported
    first), reload the file (``torch.jit.load`` / an ONNX Runtime session) and return the top-1
    agreement of the file on the raw test images with ``model`` on normalised ones."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt not in ("onnx", "torchscript"):
        raise ModelError(f"unknown format {fmt!r}; use onnx or torchscript")
    if fmt == "onnx" and isinstance(model, nn.Module):
        if compress.is_quantized(model):
            raise ModelError("a torch INT8 model has no ONNX form: export the point with --format onnx (ORT's "
                             "own INT8) or --format torchscript")
        model = ort.export(model)
    if fmt == "torchscript" and not isinstance(model, nn.Module):
        raise ModelError("an ONNX Runtime model exports as --format onnx")
    images, normalised = test.x.permute(0, 2, 3, 1).contiguous(), data.normalize(test.x)
    with torch.inference_mode():
        ref = _predict(lambda b: np.asarray(model(b)).argmax(1), normalised)
    if fmt == "torchscript":
        out.write_bytes(deploy.torchscript(model))
        loaded = torch.jit.load(str(out)).eval()
        with torch.inference_mode():
            got = _predict(lambda b: loaded(b).argmax(1).numpy(), images)
    else:
        out.write_bytes(deploy.onnx_classifier(model.onnx_bytes))
        session = ort.OrtModel(out.read_bytes(), name=str(out)).session
        got = _predict(lambda b: session.run([deploy.LABEL], {deploy.IMAGES: b.numpy()})[0], images)
    return float((ref == got).mean())


def _predict(fn, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch]) for i in range(0, len(x), batch)])
