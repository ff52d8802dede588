"""The front in MLflow's model registry: every version a file someone could ship, as it was measured.

After a search, the front's points (above the floor, latencies measured quiet) are registered
under one registered model named after the experiment: the aliased points first
(``best-accuracy``, ``fastest``, ``knee``, and ``pick`` when a point meets the budgets), then the
rest of the front, up to ``[search] register_models``. Each version holds exactly the bytes the
trial built and measured (its ONNX classifier: uint8 images in, ``label``, ``probabilities`` and
``class`` out), logged with MLflow's ONNX flavour, which loads it with ONNX Runtime and runs no
code of ours. Its tags carry the point and its record (:class:`tuning.verify.Record`: the
bytes' SHA-256, the test accuracy and labels, the CPU it ran on), its description is a short
model card, and its logged model is named after the point (``channel_l1-r30-int8-<trial>``) with
the point's accuracy, latency and size as metrics, so MLflow's Models view sorts and compares them.

The end phase may run twice (``prunetune resume`` of a finished search, a crash inside it):
an artifact registered before keeps its version, and an alias moves only to a point whose
latency was measured quietly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from trainables import data
from trainables.errors import ModelError
from tuning import _scoped, deploy, front as front_mod, runs
from tuning.front import Front
from tuning.models import Point
from tuning.results import LATENCY_QUIET
from tuning.spec import Spec
from tuning.verify import Record

if TYPE_CHECKING:
    from tuning.tracking import MlflowTracking

_PARETO_COLUMNS = ("run_id", "lr", "method", "ratio", "int8", "accuracy", "test_accuracy", "latency_ms", "latency_p90_ms",
                   "latency_cv", "latency_source", "size_mb", "sparsity", "nonzero_params", "macs", "version",
                   "aliases", "picked")
_TAGS = ("accuracy", "accuracy_no_finetune", "latency_ms", "latency_p90_ms", "latency_cv", "latency_source", "size_mb",
         "finetune_epochs", "threads")
_MODEL_METRICS = ("accuracy", "test_accuracy", "latency_ms", "latency_p90_ms", "latency_cv", "size_mb", "macs")


def point_name(row: pd.Series) -> str:
    """A logged model's name that says what it is: ``channel_l1-r30-int8-<trial id>`` (ratio in %;
    MLflow allows no '.' in it)."""
    ratio = f"{100 * float(row.ratio):g}".replace(".", "_")
    return f"{row.method}-r{ratio}{'-int8' if bool(row.int8) else ''}-{row.trial_id}"


def register_front(tracker: MlflowTracking, front: Front, checkpoints: dict[str, Path], spec: Spec,
                   splits: data.Splits) -> dict[str, int]:
    """Register the front (see the module docstring) on the search's parent run (``tracker``);
    ``checkpoints``: trial id -> local dense checkpoint (its artifacts beside it). Returns alias ->
    version for the aliases set."""
    import mlflow

    aliases, trial_runs, client = front.aliases, tracker.runs, tracker.client
    rows = front.rows.drop_duplicates(["trial_id", "method", "ratio", "int8"])
    order = list(dict.fromkeys([*aliases.values(), *rows.index]))
    order = order[:max(spec.search.register_models, len(set(aliases.values())))]
    known = _registered_artifacts(client, spec.name)
    example = splits.test.x[:2].permute(0, 2, 3, 1).contiguous().numpy()  # two real test images, as uint8 NHWC
    versions: dict[Any, int] = {}
    with _scoped.tracking_uri(tracker.uri), mlflow.start_run(run_id=tracker.parent_id):
        for idx in order:
            row = rows.loc[idx]
            if row.artifact_sha256 in known:  # registered by an earlier end phase of this search
                versions[idx] = known[row.artifact_sha256]
                continue
            point = Point(trial_runs.get(row.trial_id, ""), row.method, float(row.ratio), bool(row.int8))
            record = Record.from_row(row, dataclasses.asdict(spec.data))
            version = deploy.log_model(artifact_bytes(row, checkpoints), point_name(row), spec.name, example,
                                       splits.classes, {k: float(row[k]) for k in _MODEL_METRICS if pd.notna(row.get(k))},
                                       {"latency_source": str(row.get("latency_source")), "cpu": str(row.cpu),
                                        "cpu_flags": record.cpu_flags, "runtime": record.runtime})
            versions[idx] = version
            for k, v in {**_tags(row, point), **record.tags()}.items():
                client.set_model_version_tag(spec.name, str(version), k, v)
            client.update_model_version(spec.name, str(version), description=model_card(row, point, spec, splits))
    moved = {}
    for alias, idx in aliases.items():
        if rows.loc[idx].get("latency_source") != LATENCY_QUIET:
            print(f"registry: alias {alias!r} not moved: its point's latency is provisional (the quiet re-measurement "
                  "did not time it); `prunetune resume DIR` measures it and sets the alias", flush=True)
            continue
        client.set_registered_model_alias(spec.name, alias, str(versions[idx]))
        moved[alias] = versions[idx]
    return moved


def artifact_bytes(row: pd.Series, checkpoints: dict[str, Path]) -> bytes:
    """The point's artifact as its trial filed it, checked against the SHA-256 it was measured as."""
    path = checkpoints[row.trial_id].parent / row.artifact
    if not path.is_file():
        raise ModelError(f"the artifact of trial {row.trial_id} {row.method} ratio {row.ratio:g} is gone ({path})")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != row.artifact_sha256:
        raise ModelError(f"{path} is not the file its trial measured (SHA-256 differs from the record): not registered")
    return payload


def _registered_artifacts(client, name: str) -> dict[str, int]:
    """SHA-256 -> version, for the versions of ``name`` that hold a recorded artifact."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return {}
    return {v.tags["artifact_sha256"]: int(v.version) for v in found if "artifact_sha256" in v.tags}


def _tags(row: pd.Series, point: Point) -> dict[str, str]:
    tags = {"method": row.method, "ratio": str(row.ratio), "int8": str(bool(row.int8)), "lr": str(row.lr),
            "trial_id": str(row.trial_id), "trial_run_id": point.run_id, "artifact": str(row.artifact)}
    tags.update({k: str(row[k]) for k in _TAGS if k in row and pd.notna(row[k])})
    return tags


def model_card(row: pd.Series, point: Point, spec: Spec, splits: data.Splits) -> str:
    """What a user needs to know before shipping this version, in a few lines of Markdown."""
    tuned = int(row.get("finetune_epochs", 0) or 0)
    how = (f"fine-tuned {tuned} epochs{' with distillation from the dense model' if spec.sweep.distill else ''}"
           if tuned else "not fine-tuned")
    cv = f", CV {row.latency_cv:.3f}" if pd.notna(row.get("latency_cv")) else ""
    h, w = splits.test.x.shape[2:]
    io = f"uint8 images, batch x {h} x {w} x 3 (RGB, as decoded) -> `label`, `probabilities`, `class`"
    return "\n".join([
        f"**{point.method} at ratio {point.ratio:g}{', INT8' if point.int8 else ''}**, {how}; trial "
        f"{row.trial_id} (lr {row.lr:.3g}), trial run `{point.run_id}`.",
        f"- accuracy: validation {row.accuracy:.4f}, test {row.test_accuracy:.4f} on {spec.data.dataset} "
        f"({len(splits.val)} validation / {len(splits.test)} test images)",
        f"- latency: {row.latency_ms:.3f} ms median (p90 {row.latency_p90_ms:.3f}{cv}), ONNX Runtime "
        f"{row.get('runtime_version', '')}, batch 1, {int(row.threads)} thread(s) on {row.cpu} "
        f"[{row.get('cpu_flags', '') if isinstance(row.get('cpu_flags'), str) else ''}]; measured "
        f"{row.get('latency_source', 'in the trial')}",
        f"- size {row.size_mb:.2f} MB, {row.macs / 1e6:.0f} M MACs, {int(row.nonzero_params):,} nonzero parameters, "
        f"sparsity {row.sparsity:.2f}",
        f"- input / output: {io}; the training normalisation is inside",
        f"- the file: ONNX, SHA-256 `{row.artifact_sha256}`; `prunetune verify models:/{spec.name}/VERSION` runs it "
        "on your machine against this record",
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


def provisional(uri: str, experiment: str | None) -> str | None:
    """``prunetune pareto`` while a search runs: the front of the trials it completed so far, with
    the latencies they timed themselves (the quiet re-measurement comes at the end), marked
    provisional; None when no search is running."""
    client = runs.check_reachable(uri)
    parent = runs.running_search(client, experiment)
    if parent is None:
        return None
    q, points = runs.logged_spec(client, parent).search, runs.trial_points(client, parent)
    rules = front_mod.Rules(finetune_epochs=q.finetune_epochs, floor=max(q.min_accuracy, 0.0),
                            max_latency_ms=q.max_latency_ms, max_accuracy_drop=q.max_accuracy_drop, limits=tuple(q.limits))
    front = front_mod.compute(points, rules, q.objectives, q.hypervolume_reference)
    head = (f"PROVISIONAL: search {parent.info.run_name} (parent run {parent.info.run_id}) is still running; the front "
            f"of its {points.trial_id.nunique() if len(points) else 0} completed trial(s), latencies as timed inside "
            "the trials (the final front is timed quietly at the end)")
    cols = [c for c in _PARETO_COLUMNS if c in front.rows.columns]
    with pd.option_context("display.width", 240, "display.max_columns", 24, "display.precision", 4):
        return head + (":\n" + front.rows[cols].to_string(index=False) if len(front) else ": no point above the floor yet")


def answer(uri: str, experiment: str | None, max_latency_ms: float | None,
           max_accuracy_drop: float | None) -> tuple[pd.DataFrame, str, bool]:
    """``prunetune pareto``: the latest finished search's front with each point's registered
    version and aliases, the floor and budgets (the search's, or the ones given now), and the
    point they pick (``picked``). Returns (table, text to print, whether a point meets the budgets)."""
    found = runs.load_search(uri, experiment)
    q = found.spec.search
    rules = front_mod.Rules(finetune_epochs=q.finetune_epochs, floor=found.floor,
                            max_latency_ms=q.max_latency_ms if max_latency_ms is None else max_latency_ms,
                            max_accuracy_drop=q.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop,
                            limits=tuple(q.limits))
    dense = front_mod.dense_reference(found.points, rules)
    table = annotate(found.front, versions(uri, found.name, found.parent.info.run_id))
    chosen = front_mod.fastest_feasible(table, rules, dense) if len(table) else None
    table["picked"] = table.index == chosen
    cols = [c for c in _PARETO_COLUMNS if c in table.columns]
    with pd.option_context("display.width", 240, "display.max_columns", 24, "display.precision", 4):
        shown = table[cols].to_string(index=False)
    lines = [f"Pareto front of search {found.parent.info.run_name} (parent run {found.parent.info.run_id}), "
             f"{len(table)} points; {rules.describe()}; best equal-compute dense accuracy {dense:.4f}:", shown]
    lines += elsewhere(uri, found.name, found.parent.info.run_id)
    if chosen is None:
        lines.append(front_mod.closest(front_mod.candidates(found.points, rules), rules, dense))
    else:
        row = table.loc[chosen]
        where = (f"registered as models:/{found.name}/{int(row.version)}" if pd.notna(row.version) else
                 "not registered; `" + shlex.join(["prunetune", "export", str(row.run_id), "--method", str(row.method),
                                                   "--ratio", f"{row.ratio:g}", *(["--int8"] if row.int8 else []),
                                                   "--format", "onnx", "-o", "model.onnx"]) + "` derives it")
        lines.append(f"pick: trial {row.trial_id} {row.method} ratio {row.ratio:g}{' int8' if row.int8 else ''}, "
                     f"accuracy {row.accuracy:.4f}, {row.latency_ms:.3f} ms; {where}")
    return table[[c for c in ["trial_id", *_PARETO_COLUMNS] if c in table.columns]], "\n".join(lines), chosen is not None
