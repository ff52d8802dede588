"""tuning.models against a real MLflow SQLite store: picking the aliases, re-deriving a point
from a dense checkpoint, registering the front, resolving a run or an alias, exporting."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from trainables import compress, data
from trainables.model import ARCH, cifar_resnet18
from trainables.names import CHECKPOINT_ARTIFACT, CHECKPOINT_FILE, CheckpointMeta
from trainables.checkpoint import save_checkpoint
from tuning import models
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


def test_pick_names_the_best_the_fastest_and_the_knee():
    front = pd.DataFrame({"accuracy": [0.9, 0.85, 0.5], "latency_ms": [10.0, 3.0, 1.0]}, index=[7, 8, 9])
    assert models.pick(front, OBJECTIVES) == {"best-accuracy": 7, "fastest": 9, "knee": 8}
    assert set(models.pick(front, OBJECTIVES)) == set(models.ALIASES)


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


def test_export_checks_agreement_and_refuses_int8_onnx(checkpoint, spec, splits, tmp_path):
    dense, _ = models.dense_from_checkpoint(checkpoint)
    images = data.normalize(splits.test.x)
    assert models.export(dense, "onnx", tmp_path / "m.onnx", images) == 1.0
    int8 = models.derive(dense, spec, Point("run", "global_l1", 0.0, True), splits)
    with pytest.raises(ModelError, match="--format torchscript"):
        models.export(int8, "onnx", tmp_path / "q.onnx", images)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, checkpoint, spec, splits):
    """The front of a (pretend) search registered in a SQLite store: two points of one trial."""
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(spec.name, artifact_location=str(store / "artifacts"))  # not ./mlruns
    parent = client.create_run(exp).info.run_id
    trial = client.create_run(exp, tags={"mlflow.parentRunId": parent})
    client.log_param(trial.info.run_id, "method", "channel_l1")
    client.log_param(trial.info.run_id, "prune_ratio", 0.5)
    client.log_artifact(trial.info.run_id, str(checkpoint), "checkpoint")
    front = pd.DataFrame({"trial_id": ["t1", "t1"], "lr": [0.01, 0.01], "method": ["global_l1", "channel_l1"],
                          "ratio": [0.0, 0.5], "int8": [False, False], "accuracy": [0.5, 0.3],
                          "test_accuracy": [0.5, 0.3], "latency_ms": [9.0, 3.0], "size_mb": [40.0, 10.0]})
    aliases = models.register_front(uri, parent, front, models.pick(front, OBJECTIVES), {"t1": checkpoint},
                                    {"t1": trial.info.run_id}, spec, splits)
    return uri, trial.info.run_id, aliases


def test_register_front_sets_the_aliases_and_tags(registered, spec):
    uri, trial_run, aliases = registered
    client = MlflowClient(uri)
    assert set(aliases) == set(models.ALIASES) and len(client.search_model_versions(f"name='{spec.name}'")) == 2
    fastest = client.get_model_version_by_alias(spec.name, "fastest").tags
    assert (fastest["method"], fastest["ratio"], fastest["trial_run_id"]) == ("channel_l1", "0.5", trial_run)
    assert client.get_model_version_by_alias(spec.name, "best-accuracy").tags["method"] == "global_l1"


def test_resolve_a_run_or_an_alias(registered, spec):
    uri, trial_run, _ = registered
    assert models.resolve(uri, f"models:/{spec.name}@fastest", None, None, None) == Point(
        trial_run, "channel_l1", 0.5, False)
    assert models.resolve(uri, trial_run, None, 0.25, True) == Point(trial_run, "channel_l1", 0.25, True)
    for ref in (f"models:/{spec.name}@nosuch", "0123456789abcdef"):
        with pytest.raises(ModelError, match=f"{ref} not found"):
            models.resolve(uri, ref, None, None, None)
    with pytest.raises(ModelError, match="use models:/NAME@ALIAS"):
        models.resolve(uri, f"models:/{spec.name}", None, None, None)


def trial_run_experiment(uri: str) -> str:
    return MlflowClient(uri).get_experiment_by_name("unitmodels").experiment_id


def test_export_point_rederives_from_the_trial_run(registered, tmp_path):
    uri, trial_run, _ = registered
    agreement, n = models.export_point(uri, Point(trial_run, "channel_l1", 0.5, False), "onnx", tmp_path / "p.onnx")
    assert agreement == 1.0 and n == 20 and (tmp_path / "p.onnx").stat().st_size > 0
    with pytest.raises(ModelError, match=f"has no {CHECKPOINT_ARTIFACT} artifact"):
        models.dense_from_run(uri, MlflowClient(uri).create_run(trial_run_experiment(uri)).info.run_id)  # no checkpoint
