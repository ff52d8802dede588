"""What ships is what was measured, against a real MLflow SQLite store: a front of real ONNX
artifacts registered (bytes, record, logged model), registered twice (nothing duplicated),
served through MLflow's ONNX flavour, exported (the same bytes, verified here), a tampered file
refused, and a point nobody built re-derived and said to be so."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import prunetune_here
from trainables import compress, data, ort
from trainables.checkpoint import save_checkpoint
from trainables.errors import ModelError
from trainables.model import DEFAULT_ARCH
from trainables.names import CHECKPOINT_FILE, DEPLOYABLE_FILE, CheckpointMeta
from trainables.sweep import artifact_name
from trainables.train import TrainConfig, fit
from tuning import front as front_mod, models, registry
from tuning.front import Front, Rules
from tuning.tracking import MlflowTracking
from tuning.models import Point
from tuning.pareto import Objective
from tuning.spec import from_dict

OBJECTIVES = [Objective("accuracy", "max"), Objective("latency_ms", "min")]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spec():
    # digits at 16 x 16, as the quickstart: a quarter of 32 x 32's compute for the same digits
    return from_dict({"name": "unitmodels", "sweep": {"calibration_size": 32},
                      "data": {"train_size": 300, "test_size": 60, "val_fraction": 0.2, "image_size": 16}})


@pytest.fixture(scope="module")
def splits(spec):
    return data.load(spec.data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spec, splits):
    """A dense checkpoint as a trial writes it (three epochs: ~0.84 on the test digits, so a worse
    file shows; at two, ~0.71, a model so near its decision boundaries that INT8 moved 6 of 360 labels)."""
    path = tmp_path_factory.mktemp("ckpt") / CHECKPOINT_FILE
    cfg = TrainConfig(epochs=3, batch_size=30, lr=0.002, optimizer="adam", threads=1)
    fit(splits, cfg, checkpoint_path=path, meta=CheckpointMeta(spec=spec.to_dict(), config={"lr": 0.002}))
    return path


def _point_row(model: torch.nn.Module, spec, splits, ckpt, method: str, ratio: float, int8: bool) -> dict:
    """Build a point's artifact as a trial does, file it beside ``ckpt``, and return its row."""
    built = ort.build(model, splits.classes, splits.stats, calibration=models.calibration_images(spec, splits) if int8 else None)[-1]
    name = artifact_name(method, ratio, int8)
    (ckpt.parent / name).parent.mkdir(exist_ok=True)
    built.save(ckpt.parent / name)
    (val, _), (test, labels) = built.evaluate(splits.val), built.evaluate(splits.test)
    lat = built.latency(runs=5, warmup=1)
    return {"trial_id": "t1", "lr": 0.002, "method": method, "ratio": ratio, "int8": int8, "accuracy": val,
            "test_accuracy": test, "latency_ms": lat["latency_ms"], "latency_p90_ms": lat["latency_p90_ms"],
            "latency_cv": 0.01, "latency_source": "quiet", "cpu": lat["cpu"], "cpu_flags": lat["cpu_flags"],
            "threads": 1, "size_mb": built.size_mb(), "macs": 5e8, "nonzero_params": 1_000_000, "sparsity": 0.0,
            "finetune_epochs": 1, "artifact": name, "artifact_sha256": built.sha256,
            "test_labels_sha256": ort.labels_digest(labels), "test_images": len(splits.test), "runtime": "onnxruntime",
            "runtime_version": "x", "arch": f"{method}{ratio}{int8}"}


@pytest.fixture(scope="module")
def front(trained, spec, splits):
    """Two points of one trial, built and filed as a trial does: dense INT8 and channel 0.5 fp32
    (with fine-tuned weights filed beside the checkpoint)."""
    dense, _ = models.dense_from_checkpoint(trained)
    pruned = models.derive(dense, spec, Point("", "channel_l1", 0.5, False))
    torch.save({"channel_l1@0.5": pruned.state_dict()}, trained.with_name(DEPLOYABLE_FILE))
    rows = [_point_row(compress.make_permanent(dense), spec, splits, trained, "channel_l1", 0.0, True),
            _point_row(pruned, spec, splits, trained, "channel_l1", 0.5, False)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained, spec, front):
    """A pretend search in a SQLite store: a parent run with its experiment file, a trial run with
    its checkpoint directory (artifacts included) and sweep.csv, as retention and tracking log them."""
    where = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{where}/mlflow.db"
    MlflowClient(uri).create_experiment(spec.name, artifact_location=str(where / "artifacts"))  # not ./mlruns
    tracker = MlflowTracking(uri, spec.to_dict(), where / "search")  # the parent run, with experiment.json
    trial = tracker._child("t1", {"method": "channel_l1", "prune_ratio": 0.5})
    tracker.client.log_artifacts(trial, str(trained.parent), "checkpoint")
    tracker.client.log_text(trial, front.to_csv(index=False), "sweep.csv")
    return uri, tracker, trial


def _front(rows: pd.DataFrame, rules: Rules) -> Front:
    """``rows`` as the front the registry gets (both points, whichever dominates), with their aliases."""
    aliases = front_mod.pick(rows, OBJECTIVES, rules, rows.accuracy.max())
    return Front(rows, rows, rules, tuple(OBJECTIVES), rows.accuracy.max(), aliases)


@pytest.fixture(scope="module")
def registered(store, trained, spec, splits, front):
    uri, tracker, trial = store
    registering = _front(front, Rules(max_accuracy_drop=1.0))
    aliases = registry.register_front(tracker, registering, {"t1": trained}, spec, splits)
    return uri, trial, aliases, registering.aliases


def test_register_front_holds_the_measured_bytes_with_their_record(registered, spec, front, trained):
    uri, trial, aliases, picks = registered
    client = MlflowClient(uri)
    assert set(aliases) == set(front_mod.ALIASES) and len(client.search_model_versions(f"name='{spec.name}'")) == 2
    fastest = client.get_model_version_by_alias(spec.name, "fastest")
    row = front.loc[picks["fastest"]]
    assert (fastest.tags["method"], float(fastest.tags["ratio"]), fastest.tags["trial_run_id"]) == (
        row.method, row.ratio, trial)
    assert fastest.tags["artifact_sha256"] == row.artifact_sha256 and fastest.tags["latency_source"] == "quiet"
    assert json.loads(fastest.tags["data"]) == dataclasses.asdict(spec.data)
    assert float(fastest.tags["test_accuracy"]) == row.test_accuracy and fastest.tags["cpu_flags"] == row.cpu_flags
    # the version holds exactly the bytes the trial measured (MLflow's ONNX flavour, no external data)
    import mlflow

    mlflow.set_tracking_uri(uri)  # registering left the caller's URI alone: the fluent API below needs it
    path = mlflow.artifacts.download_artifacts(f"models:/{spec.name}/{fastest.version}", tracking_uri=uri)
    assert hashlib.sha256(open(f"{path}/model.onnx", "rb").read()).hexdigest() == row.artifact_sha256
    card = fastest.description
    assert f"ratio {row.ratio:g}" in card and row.artifact_sha256 in card and "prunetune verify" in card
    # the logged model is named after the point and carries its metrics (MLflow's Models view sorts by them)
    logged = mlflow.get_logged_model(logged_model_id(fastest))
    assert logged.name == registry.point_name(row) and "." not in logged.name
    assert {m.key: m.value for m in logged.metrics}["latency_ms"] == pytest.approx(row.latency_ms)
    assert logged.params["latency_source"] == "quiet"


def test_a_second_end_phase_registers_nothing_twice_and_moves_no_alias_to_a_provisional_latency(
        registered, store, trained, spec, splits, front):
    uri, tracker, trial = store
    client = MlflowClient(uri)
    before = {a: client.get_model_version_by_alias(spec.name, a).version for a in front_mod.ALIASES}
    provisional = front.assign(latency_source="trial", latency_ms=front.latency_ms[::-1].to_numpy())
    moved = registry.register_front(tracker, _front(provisional, Rules()), {"t1": trained}, spec, splits)
    assert moved == {} and len(client.search_model_versions(f"name='{spec.name}'")) == 2
    assert {a: client.get_model_version_by_alias(spec.name, a).version for a in front_mod.ALIASES} == before


def test_the_registered_model_takes_uint8_images_and_answers_with_class_names(registered, spec, splits):
    import mlflow

    uri, _, _, _ = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{spec.name}@fastest")
    images = splits.test.x[:3].permute(0, 2, 3, 1).contiguous().numpy()
    out = model.predict(images)
    assert set(out) == {"label", "probabilities", "class"}
    assert list(out["class"]) == [splits.classes[i] for i in out["label"]]
    assert np.allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match=r"(?i)shape"):
        model.predict(splits.test.normalized(3).numpy().astype(np.uint8))  # NCHW
    reqs = open(mlflow.pyfunc.get_model_dependencies(f"models:/{spec.name}@fastest")).read()
    assert "onnxruntime==" in reqs and "torch" not in reqs  # nothing of prunetune or torch runs when it is served


def test_export_hands_out_the_registered_bytes_verified_here(registered, spec, front, tmp_path):
    uri, _, _, picks = registered
    r = prunetune_here("export", f"models:/{spec.name}@knee", "-o", str(tmp_path / "knee.onnx"), "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    row = front.loc[picks["knee"]]
    assert hashlib.sha256((tmp_path / "knee.onnx").read_bytes()).hexdigest() == row.artifact_sha256
    assert "verified on " in r.stdout and "the same bytes" in r.stdout and "the same labels as recorded" in r.stdout
    r = prunetune_here("verify", f"models:/{spec.name}@knee", "--file", str(tmp_path / "knee.onnx"),
                       "--tracking-uri", uri)
    assert r.returncode == 0 and "ok: within the tolerance" in r.stdout, r.stderr


def test_a_file_that_loses_accuracy_here_fails_verification(registered, spec, splits, front, trained, tmp_path):
    """A tampered artifact: the registered version's bytes replaced by a network that answers one class."""
    uri, _, _, picks = registered
    dense, _ = models.dense_from_checkpoint(trained)
    broken = compress.make_permanent(dense)
    torch.nn.init.zeros_(broken.fc.weight)
    with torch.no_grad():
        broken.fc.bias.copy_(torch.arange(10.0))  # label 9, whatever the image
    (tmp_path / "bad.onnx").write_bytes(ort.build(broken, splits.classes, splits.stats)[0].onnx_bytes)
    version = MlflowClient(uri).get_model_version_by_alias(spec.name, "best-accuracy").version
    r = prunetune_here("verify", f"models:/{spec.name}/{version}", "--file", str(tmp_path / "bad.onnx"),
                       "--tracking-uri", uri)
    assert r.returncode == 1 and "points below the record" in r.stderr and "NOT the bytes" in r.stderr, r.stderr
    # the same file in the registry's place: export hands it out, and refuses it
    _local_model_file(uri, spec.name, version).write_bytes((tmp_path / "bad.onnx").read_bytes())
    r = prunetune_here("export", f"models:/{spec.name}/{version}", "-o", str(tmp_path / "x.onnx"), "--tracking-uri", uri)
    assert r.returncode == 1 and "below the record" in r.stderr and "NOT the bytes" in r.stderr, r.stderr


def _local_model_file(uri: str, name: str, version: str):
    """The registry's own copy of a version's model.onnx (a local artifact store)."""
    from pathlib import Path

    import mlflow

    mlflow.set_tracking_uri(uri)
    logged = mlflow.get_logged_model(logged_model_id(MlflowClient(uri).get_model_version(name, version)))
    return Path(logged.artifact_location.removeprefix("file://")) / "model.onnx"


def logged_model_id(version) -> str:
    """The logged model a registered version came from (its source is ``models:/<model id>``)."""
    return version.model_id or version.source.removeprefix("models:/")


def test_a_point_nobody_built_is_re_derived_and_said_to_be(registered, tmp_path, monkeypatch):
    import tempfile

    uri, trial, _, _ = registered
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = prunetune_here("export", trial, "--ratio", "0.37", "--int8", "-o", str(tmp_path / "q.onnx"),
                       "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    assert "re-derived from trial run" in r.stdout and "never measured by the search" in r.stdout
    assert ort.OrtModel((tmp_path / "q.onnx").read_bytes()).uint8
    assert list(scratch.iterdir()) == []  # the downloaded checkpoints are gone
    r = prunetune_here("verify", trial, "--ratio", "0.37", "--tracking-uri", uri)
    assert r.returncode == 2 and "was never built by its search" in r.stderr
    with pytest.raises(ModelError, match="has no checkpoint/checkpoint.pt artifact"):
        client = MlflowClient(uri)
        models.dense_from_run(uri, client.create_run(client.get_run(trial).info.experiment_id).info.run_id, tmp_path)


def test_a_point_nobody_fine_tuned_is_derived_as_the_sweep_measured_it(trained, spec, splits):
    """A channel-pruned point without fine-tuned weights (the no-retrain curve, an unswept ratio)
    re-estimates its BatchNorm statistics on the same training images as the sweep, so the model
    an export re-derives scores what the sweep recorded."""
    from trainables.sweep import run_sweep
    from trainables.train import evaluate

    dense, _ = models.dense_from_checkpoint(trained)
    cfg = dataclasses.replace(spec.sweep, methods=["channel_l1"], ratios=[0.5], int8=False, latency_runs=1)
    swept = run_sweep(dense, splits, cfg, spec.train, progress=False).set_index("ratio").loc[0.5]
    derived = models.derive(dense, spec, Point("run", "channel_l1", 0.5, False))
    assert (evaluate(derived, splits.val), evaluate(derived, splits.test)) == (swept.accuracy, swept.test_accuracy)


def test_derive_is_deterministic_and_checks_the_point(trained, spec, splits):
    dense, _ = models.dense_from_checkpoint(trained)
    point = Point("run", "channel_l1", 0.5, False)
    a, b = models.derive(dense, spec, point, splits), models.derive(dense, spec, point, splits)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert sum(p.numel() for p in a.parameters()) < 0.5 * sum(p.numel() for p in dense.parameters())
    with pytest.raises(ModelError, match="unknown method 'magic'; methods: global_l1"):
        models.derive(dense, spec, Point("run", "magic", 0.5, False), splits)
    with pytest.raises(ModelError, match=r"ratio 1.0 is outside \[0, 1\)"):
        models.derive(dense, spec, Point("run", "global_l1", 1.0, False), splits)


def test_dense_from_checkpoint_brings_back_its_spec(trained, spec):
    model, again = models.dense_from_checkpoint(trained)
    saved = torch.load(trained, weights_only=True)
    assert (saved["arch"], saved["stem"], saved["input_shape"]) == (DEFAULT_ARCH, "cifar", [3, 16, 16])
    # the spec it was trained with, its data normalised with the statistics the checkpoint records
    recorded = spec.to_dict()
    recorded["data"].update(mean=saved["mean"], std=saved["std"])
    assert again.to_dict() == recorded and not model.training
    assert data.load(again.data).stats == data.load(spec.data).stats  # the ones computed from the images
    save_checkpoint(trained.with_name("copy.pt"), torch.load(trained, weights_only=True))
    assert models.dense_from_checkpoint(trained.with_name("copy.pt"))[1].to_dict() == recorded


def test_int8_holds_within_one_point_of_fp32_on_the_digits(trained, splits):
    """The INT8 scheme a search ships (ort.INT8_SCHEME) against its fp32 twin, on every held-out
    digit (360 images: one point is 3.6 of them), on this machine's CPU."""
    dense, spec = models.dense_from_checkpoint(trained)
    test = data.load(dataclasses.replace(spec.data, test_size=0)).test
    fp32, int8 = ort.build(compress.make_permanent(dense), splits.classes, splits.stats,
                           calibration=models.calibration_images(spec, splits))
    a, b = fp32.evaluate(test)[0], int8.evaluate(test)[0]
    assert a > 0.15 and abs(a - b) <= 0.01, (a, b)  # better than chance (0.1), and INT8 within a point
