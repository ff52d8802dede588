"""Compressed models from a search: find the file a point shipped as, re-derive one that never was, export.

A deployable point is a file its trial built and measured: the ONNX classifier filed beside the
trial's dense checkpoint (``checkpoint/points/*.onnx`` of the trial's MLflow run) and, once
registered, the bytes of a model version. :func:`shipped` finds that file and its record
(:class:`tuning.verify.Record`); ``prunetune export`` of such a point hands out exactly those
bytes and checks them on this machine against the record (:mod:`tuning.verify`).

Any other point (another ratio, a method the trial did not build) is re-derived from the trial's
dense checkpoint and ``(method, ratio, int8)`` (:func:`derive`; with the trial's fine-tuned
weights when it has them), and said to be so: nothing measured it. :mod:`tuning.registry`
registers the front.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from trainables import compress, data, ort
from trainables.checkpoint import input_stats, load_checkpoint, model_from_checkpoint
from trainables.errors import CheckpointError, ModelError
from trainables.names import DEPLOYABLE_FILE, CheckpointMeta
from tuning.names import (CHECKPOINT_ARTIFACT, CHECKPOINT_DIR, DEPLOYABLE_ARTIFACT, EXPERIMENT_JSON, PARENT_TAG,
                          SWEEP_CSV)
from trainables.sweep import point_key, prune_point
from tuning import _scoped, deploy, front, retention
from tuning.spec import Spec, from_dict
from tuning.verify import Record, Verdict, check


@dataclass
class Point:
    run_id: str  # the trial's MLflow run (holds the dense checkpoint and the point's artifact)
    method: str
    ratio: float
    int8: bool
    version: str = ""  # "models:/NAME/VERSION" when the point came from the registry as it is


@dataclass
class Shipped:
    """The file a point shipped as, its record, and where it came from."""

    payload: bytes
    record: Record
    source: str


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _model_version(client, ref: str):
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the model version."""
    name, at, alias = ref.removeprefix("models:/").partition("@")
    if at:
        return client.get_model_version_by_alias(name, alias)
    name, slash, number = name.partition("/")
    if not slash or not number.isdigit():
        raise ModelError(f"{ref}: use models:/NAME@ALIAS (aliases: {', '.join(front.ALIASES)}) or "
                         "models:/NAME/VERSION")
    return client.get_model_version(name, number)


def resolve(uri: str, ref: str, method: str | None, ratio: float | None, int8: bool | None) -> Point:
    """``RUN_ID`` or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (+ overrides) -> the point."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        if ref.startswith("models:/"):
            v = _model_version(client, ref)
            missing = {"trial_run_id", "method", "ratio", "int8"} - set(v.tags)
            if missing:
                raise ModelError(f"{ref} is not a version prunetune registered: its tags lack {', '.join(sorted(missing))}")
            found = Point(v.tags["trial_run_id"], v.tags["method"], float(v.tags["ratio"]), v.tags["int8"] == "True",
                          f"models:/{v.name}/{v.version}")
        else:
            p = client.get_run(ref).data.params
            found = Point(ref, p.get("method", "global_l1"), float(p.get("prune_ratio", 0.0)),
                          p.get("int8", "False") == "True")
    except MlflowException as e:
        raise ModelError(f"{ref} not found in the tracking store {uri}: {str(e).splitlines()[0]}") from None
    asked = dataclasses.replace(found, method=method or found.method, ratio=found.ratio if ratio is None else ratio,
                                int8=found.int8 if int8 is None else int8)
    return asked if asked == found else dataclasses.replace(asked, version="")  # another point: not that version


def shipped(uri: str, point: Point) -> Shipped | None:
    """The file the search built and measured for ``point``, with its record: the registered
    version's bytes, or the artifact its trial filed; None when the search never built that point."""
    import mlflow

    client = _client(uri)
    with tempfile.TemporaryDirectory(prefix="prunetune-export-") as where:
        if point.version:
            v = _model_version(client, point.version)
            record = Record.from_tags(v.tags, point.version)
            with _scoped.tracking_uri(uri):  # MLflow resolves models:/ against its global registry URI, whatever is passed
                local = mlflow.artifacts.download_artifacts(point.version, dst_path=where, tracking_uri=uri)
            return Shipped((Path(local) / "model.onnx").read_bytes(), record, point.version)
        row = _built_row(client, point, where)
        if row is None:
            return None
        path = f"{CHECKPOINT_DIR}/{row['artifact']}"
        try:
            local = client.download_artifacts(point.run_id, path, where)
        except Exception as e:
            raise ModelError(retention.why_missing(client, point.run_id) or f"trial run {point.run_id} has no {path} "
                             f"artifact: {str(e).splitlines()[0]}") from None
        return Shipped(Path(local).read_bytes(), Record.from_row(row, _data_config(client, point.run_id, where)),
                       f"trial run {point.run_id}: {path}")


def _built_row(client, point: Point, where: str) -> dict[str, Any] | None:
    """The trial's row for ``point`` among the points it built (its ``sweep.csv``), or None."""
    try:
        table = pd.read_csv(client.download_artifacts(point.run_id, SWEEP_CSV, where))
    except Exception:
        return None
    if "artifact" not in table:
        return None
    rows = table[table.artifact.notna() & (table.method == point.method) & (table.ratio == point.ratio)
                 & (table.int8.astype(bool) == point.int8)]
    return rows.iloc[0].to_dict() if len(rows) else None


def _data_config(client, run_id: str, where: str) -> dict[str, Any]:
    """The ``[data]`` config of the search a trial run belongs to (its parent run's experiment file)."""
    parent = client.get_run(run_id).data.tags.get(PARENT_TAG, "")
    try:
        return json.loads(Path(client.download_artifacts(parent, EXPERIMENT_JSON, where)).read_text())["data"]
    except Exception as e:
        raise ModelError(f"trial run {run_id}: its search's {EXPERIMENT_JSON} cannot be read ({str(e).splitlines()[0]}), "
                         "so its test images are unknown") from None


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
    experiment spec it was trained with (so sweeps and exports use the same data splits,
    normalised with the statistics the checkpoint records: CIFAR-10's for one written before
    per-dataset statistics)."""
    ckpt = load_checkpoint(path)
    meta: CheckpointMeta = ckpt["meta"]
    if not isinstance(meta.get("spec"), dict):
        raise CheckpointError(f"{path} records no experiment spec (its meta has {sorted(meta) or 'nothing'}): it was "
                              "not written by `prunetune train` or a search, so its data splits are unknown")
    spec = from_dict(meta["spec"], source=f"{path} (its experiment)")
    spec.data.mean, spec.data.std = (list(s) for s in input_stats(ckpt))
    return model_from_checkpoint(ckpt).eval(), spec


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
    """The deployable model of ``point``: prune as the sweep did (``prune_point``; without
    ``weights``, a channel-pruned model re-estimates its BatchNorm statistics on ``splits``'
    training images, loaded if not given) -> bake masks in -> (``weights``: the point's
    fine-tuned fp32 weights, from its trial's :data:`~trainables.names.DEPLOYABLE_FILE`) -> INT8
    (calibrated on the same training images as the sweep: ``calibration``, else the first of
    ``splits``, loaded if not given). Without ``weights`` any ratio in [0, 1) works, swept or
    not, with the dense checkpoint's weights (no fine-tuning)."""
    try:
        compress.check_method(point.method)
        compress.check_ratio(point.ratio)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if weights is None:  # the sweep's no-retrain point: BatchNorm re-estimated on its training images
        splits = splits if splits is not None else data.load(spec.data)
    pruned = prune_point(dense, point.method, point.ratio, spec.sweep, splits.train if weights is None else None)
    model = compress.make_permanent(pruned).eval()
    if weights is not None:
        model.load_state_dict(weights)
    if point.int8:
        model = compress.quantize_int8(model, calibration_images(spec, splits) if calibration is None else calibration)
    return model


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
    return (splits or data.load(spec.data)).train.normalized(spec.sweep.calibration_size)


@dataclass
class Exported:
    """What ``prunetune export`` wrote: where it came from, and what it gives here."""

    source: str  # the registered version or trial artifact, or "re-derived ..."
    verdict: Verdict | None  # against the record of what was measured; None: nothing measured this point
    test_accuracy: float  # on this machine, on the held-out test images
    images: int


def export_point(uri: str, point: Point, fmt: str, out: str | Path) -> Exported:
    """Write ``point`` to ``out``: as ONNX, the very file the search built and measured when it built
    one (checked here against its record), else re-derived from its trial's checkpoint; as
    TorchScript (deprecated, eager PyTorch), always re-derived."""
    if fmt not in ("onnx", "torchscript"):
        raise ModelError(f"unknown format {fmt!r}; use onnx or torchscript")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    found = shipped(uri, point) if fmt == "onnx" else None
    if found is not None:
        out.write_bytes(found.payload)
        verdict = check(out.read_bytes(), found.record)
        return Exported(found.source, verdict, verdict.test_accuracy, found.record.test_images)
    with tempfile.TemporaryDirectory(prefix="prunetune-export-") as where:  # ~200 MB of checkpoints
        dense, spec, checkpoint = dense_from_run(uri, point.run_id, where)
        weights = fine_tuned_weights(checkpoint, point)
    splits = data.load(spec.data)
    n = spec.sweep.eval_size or len(splits.test)
    test = splits.test.head(n)
    fp32 = derive(dense, spec, dataclasses.replace(point, int8=False), splits, weights=weights)
    how = f"re-derived from trial run {point.run_id}'s dense checkpoint" + (
        " and its fine-tuned weights" if weights is not None else " (no fine-tuned weights for this point)")
    if fmt == "onnx":
        calibration = calibration_images(spec, splits) if point.int8 else None
        model = ort.build(fp32, splits.classes, splits.stats, name=str(out),
                          calibration=calibration)[-1]
        model.save(out)
        return Exported(how, None, ort.OrtModel(out.read_bytes()).evaluate(test)[0], len(test))
    model = compress.quantize_int8(fp32, calibration_images(spec, splits)) if point.int8 else fp32
    out.write_bytes(deploy.torchscript(model, splits.stats))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated: it is what reads this file
        probs = torch.jit.load(str(out))(test.x.permute(0, 2, 3, 1).contiguous())
    return Exported(how + ", as TorchScript", None, float((probs.argmax(1) == test.y).float().mean()), len(test))
