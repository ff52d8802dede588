"""tuning.models against a real MLflow SQLite store: picking the aliases, re-deriving a point
from a dense checkpoint, registering the front, resolving a run or an alias, exporting."""
from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from trainables import compress, data
from trainables.model import ARCH, cifar_resnet18
from trainables.names import CHECKPOINT_ARTIFACT, CHECKPOINT_FILE, DEPLOYABLE_FILE, CheckpointMeta
from trainables.checkpoint import save_checkpoint
from tuning import models, registry, selection
from tuning.models import ModelError, Point
from tuning.pareto import Objective
from tuning.spec import from_dict

OBJECTIVES = [Objective("accuracy", "max"), Objective("latency_ms", "min")]


@pytest.fixture(scope="module")
def spec():
    return from_dict({"name": "unitmodels", "data": {"train_size": 60, "test_size": 20, "val_fraction": 0.25},
                      "sweep": {"calibration_size": 16}})


@pytest.fixture(scope="module")
def splits(spec):
    return data.load(spec.data)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spec):
    """A dense checkpoint as `prunetune train` and a trial write it (an untrained model)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / CHECKPOINT_FILE
    save_checkpoint(path, {"arch": ARCH, "num_classes": 10, "epoch": 1, "model": cifar_resnet18().state_dict(),
                           "meta": CheckpointMeta(spec=spec.to_dict(), config={"lr": 0.01}), "history": []})
    return path


def test_dense_from_checkpoint_brings_back_its_spec(checkpoint, spec):
    model, again = models.dense_from_checkpoint(checkpoint)
    assert again.to_dict() == spec.to_dict() and not model.training


def test_derive_is_deterministic_and_checks_the_point(checkpoint, spec, splits):
    dense, _ = models.dense_from_checkpoint(checkpoint)
    point = Point("run", "channel_l1", 0.5, False)
    a, b = models.derive(dense, spec, point, splits), models.derive(dense, spec, point, splits)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert sum(p.numel() for p in a.parameters()) < 0.5 * sum(p.numel() for p in dense.parameters())
    assert compress.is_quantized(models.derive(dense, spec, Point("run", "global_l1", 0.3, True), splits))
    with pytest.raises(ModelError, match="unknown method 'magic'; methods: global_l1"):
        models.derive(dense, spec, Point("run", "magic", 0.5, False), splits)
    with pytest.raises(ModelError, match=r"ratio 1.0 is outside \[0, 1\)"):
        models.derive(dense, spec, Point("run", "global_l1", 1.0, False), splits)


def test_export_packs_the_model_with_its_preprocessing(checkpoint, spec, splits, tmp_path):
    import onnxruntime as rt

    dense, _ = models.dense_from_checkpoint(checkpoint)
    assert models.export(dense, "onnx", tmp_path / "m.onnx", splits.test) == 1.0
    session = rt.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    images = splits.test.x[:4].permute(0, 2, 3, 1).contiguous().numpy()  # uint8 NHWC, as decoded
    label, probs = session.run(["label", "probabilities"], {"images": images})
    with torch.inference_mode():
        want = dense(data.normalize(splits.test.x[:4]))
    assert list(label) == want.argmax(1).tolist() and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    int8 = models.derive(dense, spec, Point("run", "global_l1", 0.0, True), splits)
    assert models.export(int8, "torchscript", tmp_path / "q.pt", splits.test) == 1.0
    assert torch.jit.load(str(tmp_path / "q.pt"))(torch.from_numpy(images)).shape == (4, 10)
    with pytest.raises(ModelError, match="has no ONNX form"):
        models.export(int8, "onnx", tmp_path / "q.onnx", splits.test)


def _front_rows() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": ["t1", "t1"], "lr": [0.01, 0.01], "method": ["global_l1", "channel_l1"],
                         "ratio": [0.0, 0.5], "int8": [False, False], "accuracy": [0.5, 0.3],
                         "test_accuracy": [0.5, 0.3], "latency_ms": [9.0, 3.0], "latency_p90_ms": [9.5, 3.2],
                         "latency_cv": [0.01, 0.02], "latency_source": ["quiet", "quiet"], "cpu": ["cpu", "cpu"],
                         "threads": [1, 1], "size_mb": [40.0, 10.0], "macs": [5.5e8, 1.4e8],
                         "nonzero_params": [11_000_000, 2_800_000], "sparsity": [0.0, 0.0], "finetune_epochs": [2, 2]})


@pytest.fixture(scope="module")
def registered(tmp_path_factory, checkpoint, spec, splits):
    """The front of a (pretend) search registered in a SQLite store: two points of one trial, the
    pruned one with fine-tuned weights filed beside the checkpoint (its fc zeroed: every image
    then gets the label the bias favours)."""
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(spec.name, artifact_location=str(store / "artifacts"))  # not ./mlruns
    parent = client.create_run(exp).info.run_id
    trial = client.create_run(exp, tags={"mlflow.parentRunId": parent})
    client.log_param(trial.info.run_id, "method", "channel_l1")
    client.log_param(trial.info.run_id, "prune_ratio", 0.5)
    dense, _ = models.dense_from_checkpoint(checkpoint)
    tuned = models.derive(dense, spec, Point("", "channel_l1", 0.5, False))
    torch.nn.init.zeros_(tuned.fc.weight)
    with torch.no_grad():
        tuned.fc.bias.copy_(torch.arange(10.0))  # label 9, whatever the image
    torch.save({"channel_l1@0.5": tuned.state_dict()}, checkpoint.with_name(DEPLOYABLE_FILE))
    for f in (checkpoint, checkpoint.with_name(DEPLOYABLE_FILE)):
        client.log_artifact(trial.info.run_id, str(f), "checkpoint")
    front = _front_rows()
    picks = selection.pick(front, OBJECTIVES, selection.Rules(max_accuracy_drop=0.3), 0.5)
    aliases = registry.register_front(uri, parent, front, picks, {"t1": checkpoint}, {"t1": trial.info.run_id},
                                      spec, splits)
    return uri, trial.info.run_id, aliases


def test_register_front_sets_the_aliases_tags_and_card(registered, spec):
    uri, trial_run, aliases = registered
    client = MlflowClient(uri)
    assert set(aliases) == set(selection.ALIASES) and len(client.search_model_versions(f"name='{spec.name}'")) == 2
    fastest = client.get_model_version_by_alias(spec.name, "fastest")
    assert (fastest.tags["method"], fastest.tags["ratio"], fastest.tags["trial_run_id"]) == ("channel_l1", "0.5",
                                                                                           trial_run)
    assert fastest.tags["latency_source"] == "quiet" and aliases["pick"] == aliases["fastest"]
    assert client.get_model_version_by_alias(spec.name, "best-accuracy").tags["method"] == "global_l1"
    card = fastest.description
    assert "channel_l1 at ratio 0.5" in card and "fine-tuned 2 epochs" in card and "3.000 ms" in card
    assert "uint8 images" in card


def test_a_registered_model_takes_uint8_images_and_returns_labels(registered, spec, splits):
    import mlflow

    uri, _, aliases = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{spec.name}@fastest")
    images = splits.test.x[:3].permute(0, 2, 3, 1).contiguous().numpy()
    out = model.predict(images)
    assert list(out.columns[:2]) == ["label", "class"] and len(out.columns) == 12
    assert list(out.label) == [9, 9, 9]  # the fine-tuned weights, not the dense checkpoint's
    assert np.allclose(out.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match=r"expected shape \(-1, 32, 32, 3\)"):
        model.predict(data.normalize(splits.test.x[:3]).numpy().astype(np.uint8))  # NCHW
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{spec.name}@fastest")
    assert f"torch=={torch.__version__.split('+')[0]}" in open(reqs).read()


def trial_run_experiment(uri: str) -> str:
    return MlflowClient(uri).get_experiment_by_name("unitmodels").experiment_id


def test_export_point_rederives_from_the_trial_run(registered, tmp_path, monkeypatch):
    uri, trial_run, _ = registered
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    agreement, n, tuned = models.export_point(uri, Point(trial_run, "channel_l1", 0.5, False), "onnx",
                                              tmp_path / "p.onnx")
    assert agreement == 1.0 and n == 20 and tuned and (tmp_path / "p.onnx").stat().st_size > 0
    assert list(scratch.iterdir()) == []  # the downloaded checkpoints are gone
    agreement, _, tuned = models.export_point(uri, Point(trial_run, "channel_l1", 0.37, True), "onnx",
                                              tmp_path / "q.onnx")  # an unswept ratio, ORT INT8
    assert agreement == 1.0 and not tuned
    with pytest.raises(ModelError, match=f"has no {CHECKPOINT_ARTIFACT} artifact"):
        models.dense_from_run(uri, MlflowClient(uri).create_run(trial_run_experiment(uri)).info.run_id, tmp_path)  # no checkpoint
