"""The front in MLflow's model registry: every version a model someone could ship and call.

After a search, the front's points (above the floor, latencies measured quiet) are logged on
the parent run and registered under one registered model named after the experiment: the
aliased points first (``best-accuracy``, ``fastest``, ``knee``, and ``pick`` when a point meets
the budgets), then the rest of the front, up to ``[search] register_models``. Each version is
the point's fine-tuned weights (re-derived with its compression), packed to take uint8 images
and return labels and class probabilities (:mod:`tuning.deploy`): a pyfunc around TorchScript,
or with ``[sweep] runtime = "onnxruntime"`` the ONNX model the search timed, with MLflow's ONNX
flavour. Its tags name the point (what ``prunetune export models:/NAME@ALIAS`` re-derives) and
its description is a short model card.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from trainables import data
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from tuning import deploy, models, runs, selection
from tuning.models import Point
from tuning.spec import Spec

_PARETO_COLUMNS = ("run_id", "lr", "method", "ratio", "int8", "accuracy", "test_accuracy", "latency_ms", "latency_p90_ms",
                   "latency_cv", "latency_source", "size_mb", "sparsity", "nonzero_params", "macs", "version",
                   "aliases", "picked")
_TAGS = ("accuracy", "test_accuracy", "accuracy_no_finetune", "latency_ms", "latency_p90_ms", "latency_cv",
         "latency_source", "size_mb", "finetune_epochs")


def register_front(uri: str, parent_run_id: str, front: pd.DataFrame, aliases: dict[str, Any],
                   checkpoints: dict[str, Path], trial_runs: dict[str, str], spec: Spec,
                   splits: data.Splits) -> dict[str, int]:
    """Log and register the front (see the module docstring); ``aliases``: alias -> front row,
    ``checkpoints``: trial id -> local dense checkpoint, ``trial_runs``: trial id -> its MLflow
    run. Returns alias -> version."""
    import mlflow
    from mlflow import MlflowClient

    front = front.drop_duplicates(["trial_id", "method", "ratio", "int8"])
    order = list(dict.fromkeys([*aliases.values(), *front.index]))
    order = order[:max(spec.search.register_models, len(set(aliases.values())))]
    client = MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    example = splits.test.x[:2].permute(0, 2, 3, 1).contiguous().numpy()  # two real test images, as uint8 NHWC
    classes = splits.classes
    calibration = models.calibration_images(spec, splits)
    versions: dict[Any, int] = {}
    with mlflow.start_run(run_id=parent_run_id):
        for i, idx in enumerate(order):
            row = front.loc[idx]
            point = Point(trial_runs.get(row.trial_id, ""), row.method, float(row.ratio), bool(row.int8))
            packed, onnx_flavour = _pack(point, checkpoints[row.trial_id], spec, calibration)
            version = deploy.log_model(packed, onnx_flavour, f"pareto-{i}", spec.name, example, classes)
            versions[idx] = version
            for k, v in _tags(row, point).items():
                client.set_model_version_tag(spec.name, str(version), k, v)
            client.update_model_version(spec.name, str(version), description=model_card(row, point, spec, splits))
    for alias, idx in aliases.items():
        client.set_registered_model_alias(spec.name, alias, str(versions[idx]))
    return {alias: versions[idx] for alias, idx in aliases.items()}


def _pack(point: Point, checkpoint: Path, spec: Spec, calibration) -> tuple[bytes, bool]:
    """The point's deployable model, packed for its runtime: (bytes, ONNX flavour?)."""
    dense = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    weights = models.fine_tuned_weights(checkpoint, point)
    model = models.runtime_model(dense, spec, point, calibration, weights)
    if spec.sweep.runtime == "onnxruntime":
        return deploy.onnx_classifier(model.onnx_bytes), True
    return deploy.torchscript(model), False


def _tags(row: pd.Series, point: Point) -> dict[str, str]:
    tags = {"method": row.method, "ratio": str(row.ratio), "int8": str(bool(row.int8)), "lr": str(row.lr),
            "trial_id": str(row.trial_id), "trial_run_id": point.run_id}
    tags.update({k: str(row[k]) for k in _TAGS if k in row and pd.notna(row[k])})
    return tags


def model_card(row: pd.Series, point: Point, spec: Spec, splits: data.Splits) -> str:
    """What a user needs to know before shipping this version, in a few lines of Markdown."""
    tuned = int(row.get("finetune_epochs", 0) or 0)
    how = (f"fine-tuned {tuned} epochs{' with distillation from the dense model' if spec.sweep.distill else ''}"
           if tuned else "not fine-tuned")
    cv = f", CV {row.latency_cv:.3f}" if pd.notna(row.get("latency_cv")) else ""
    io = ("uint8 images, batch x 32 x 32 x 3 (RGB, as decoded) -> `label`, `class`, `prob_<class>`"
          if spec.sweep.runtime == "torch" else "uint8 images, batch x 32 x 32 x 3 -> `label`, `probabilities`")
    return "\n".join([
        f"**{point.method} at ratio {point.ratio:g}{', INT8' if point.int8 else ''}**, {how}; trial "
        f"{row.trial_id} (lr {row.lr:.3g}), trial run `{point.run_id}`.",
        f"- accuracy: validation {row.accuracy:.4f}, test {row.test_accuracy:.4f} on {spec.data.dataset} "
        f"({len(splits.val)} validation / {len(splits.test)} test images)",
        f"- latency: {row.latency_ms:.3f} ms median (p90 {row.latency_p90_ms:.3f}{cv}), {spec.sweep.runtime}, "
        f"batch 1, {int(row.threads)} thread(s) on {row.cpu}; measured {row.get('latency_source', 'in the trial')}",
        f"- size {row.size_mb:.2f} MB, {row.macs / 1e6:.0f} M MACs, {int(row.nonzero_params):,} nonzero parameters, "
        f"sparsity {row.sparsity:.2f}",
        f"- input / output: {io}; the training normalisation is inside",
    ])


def versions(uri: str, name: str, parent_run_id: str) -> pd.DataFrame:
    """The versions a search registered: one row per version with the point it holds
    (``trial_id``, ``method``, ``ratio``, ``int8``), its ``version`` and its ``aliases``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{parent_run_id}'")
        aliases = client.get_registered_model(name).aliases
    except MlflowException:  # nothing registered (register_models = 0, or MLflow was down)
        return pd.DataFrame(columns=["trial_id", "method", "ratio", "int8", "version", "aliases"])
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return pd.DataFrame([{"trial_id": v.tags.get("trial_id"), "method": v.tags.get("method"),
                          "ratio": float(v.tags.get("ratio", "nan")), "int8": v.tags.get("int8") == "True",
                          "version": int(v.version), "aliases": ",".join(sorted(by_version.get(str(v.version), [])))}
                         for v in found], columns=["trial_id", "method", "ratio", "int8", "version", "aliases"])


def elsewhere(uri: str, name: str, parent_run_id: str) -> list[str]:
    """One line per alias of the registered model ``name`` that names a version of another search
    than ``parent_run_id`` (an overlapping or older search set it): say which, so a user does not
    take ``models:/NAME@ALIAS`` for a point of the front shown."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    lines = []
    for alias, version in sorted(aliases.items()):
        run_id = client.get_model_version(name, str(version)).run_id
        if run_id != parent_run_id:
            lines.append(f"note: models:/{name}@{alias} is version {version} of another search (parent run {run_id}), "
                         "not of this one")
    return lines


def annotate(table: pd.DataFrame, registered: pd.DataFrame) -> pd.DataFrame:
    """``table`` (points) with the ``version`` and ``aliases`` of each point that is registered."""
    key = ["trial_id", "method", "ratio", "int8"]
    out = table.merge(registered, on=key, how="left")
    out["aliases"] = out["aliases"].fillna("")
    return out


def answer(uri: str, experiment: str | None, max_latency_ms: float | None,
           max_accuracy_drop: float | None) -> tuple[pd.DataFrame, str, bool]:
    """``prunetune pareto``: the latest finished search's front with each point's registered
    version and aliases, the floor and budgets (the search's, or the ones given now), and the
    point they pick (``picked``). Returns (table, text to print, whether a point meets the budgets)."""
    found = runs.load_search(uri, experiment)
    rules = selection.rules_from_run(found.parent.data.params, found.parent.data.metrics, max_latency_ms,
                                     max_accuracy_drop)
    dense = selection.dense_reference(found.points, rules)
    table = annotate(found.front, versions(uri, found.name, found.parent.info.run_id))
    chosen = selection.fastest_feasible(table, rules, dense) if len(table) else None
    table["picked"] = table.index == chosen
    cols = [c for c in _PARETO_COLUMNS if c in table.columns]
    with pd.option_context("display.width", 240, "display.max_columns", 24, "display.precision", 4):
        shown = table[cols].to_string(index=False)
    lines = [f"Pareto front of search {found.parent.info.run_name} (parent run {found.parent.info.run_id}), "
             f"{len(table)} points; {rules.describe()}; best equal-compute dense accuracy {dense:.4f}:", shown]
    lines += elsewhere(uri, found.name, found.parent.info.run_id)
    if chosen is None:
        lines.append(selection.closest(selection.candidates(found.points, rules), rules, dense))
    else:
        row = table.loc[chosen]
        where = (f"registered as models:/{found.name}/{int(row.version)}" if pd.notna(row.version) else
                 "not registered; `" + shlex.join(["prunetune", "export", str(row.run_id), "--method", str(row.method),
                                                   "--ratio", f"{row.ratio:g}", *(["--int8"] if row.int8 else []),
                                                   "--format", "onnx", "-o", "model.onnx"]) + "` derives it")
        lines.append(f"pick: trial {row.trial_id} {row.method} ratio {row.ratio:g}{' int8' if row.int8 else ''}, "
                     f"accuracy {row.accuracy:.4f}, {row.latency_ms:.3f} ms; {where}")
    return table[[c for c in ["trial_id", *_PARETO_COLUMNS] if c in table.columns]], "\n".join(lines), chosen is not None
