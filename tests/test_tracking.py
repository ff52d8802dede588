"""tuning.tracking and tuning.runs against a real MLflow SQLite store: the run layout a search
leaves, a trial mirrored report by report, the back-fill from a real Ray Tune experiment, and
the lookups that read the layout back."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from trainables.names import DIVERGED, DONE, ERROR, PHASE, SWEEP_TABLE, TRAIN
from tuning.names import FRONT_CSV, POINTS_CSV, STATUS_TAG, TRIAL_ID_TAG
from trainables.sweep import table_to_json
from tuning import runs
from tuning.report import of
from tuning.spec import from_dict
from tuning.tracking import MlflowTracking

SWEEP = pd.DataFrame([
    {"method": m, "ratio": r, "int8": False, "accuracy": 0.9 - r, "test_accuracy": 0.8 - r, "latency_ms": 5.0 - 4 * r,
     "size_mb": 40.0 * (1 - r), "arch": "0123456789abcdef"}
    for m in ("global_l1", "channel_l1") for r in (0.0, 0.5)])


def reports(trial_id: str, epochs: int = 2, diverge: bool = False) -> list[dict]:
    """The reports train_and_sweep makes, in order (what Tune hands the callback)."""
    out = [{PHASE: TRAIN, "trial_id": trial_id, "epoch": e, "val_accuracy": 0.1 * e, "train_loss": 2.0 / e,
            "images_per_second": 100.0, "timestamp": 1_700_000_000 + e} for e in range(1, epochs + 1)]
    if diverge:
        return out + [{PHASE: DIVERGED, "trial_id": trial_id, "epoch": epochs + 1, ERROR: "loss is nan",
                       "timestamp": 1_700_000_100}]
    own = SWEEP.iloc[1].to_dict()
    return out + [{PHASE: DONE, "trial_id": trial_id, "epoch": epochs, "accuracy": own["accuracy"],
                   "test_accuracy": own["test_accuracy"], "latency_ms": own["latency_ms"], "size_mb": own["size_mb"],
                   "lr": 0.01, "method": "global_l1", "prune_ratio": 0.5, "int8": False,
                   SWEEP_TABLE: table_to_json(SWEEP), "timestamp": 1_700_000_200}]


@pytest.fixture
def store(tmp_path):
    """A SQLite store whose experiment keeps its artifacts in tmp_path (not ./mlruns)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = from_dict({"name": "unit", "search": {"storage_path": str(tmp_path / "rr")}}).to_dict()
    return uri, spec, tmp_path / "rr" / "unit-1"


def experiment(uri: str, where: Path) -> None:
    MlflowClient(uri).create_experiment("unit", artifact_location=str(where / "artifacts"))


def children(uri: str, tracker: MlflowTracking) -> dict:
    return runs.child_runs(MlflowClient(uri), tracker.experiment_id, tracker.parent_id)


def test_parent_run_is_found_again_not_duplicated(store):
    uri, spec, exp_dir = store
    experiment(uri, exp_dir.parent)
    first = MlflowTracking(uri, spec, exp_dir)
    client = MlflowClient(uri)
    parent = client.get_run(first.parent_id)
    assert parent.data.tags["prunetune.kind"] == "search" and parent.data.params["search.num_samples"] == "4"
    assert parent.data.params["search.objectives"] == '["accuracy:max", "latency_ms:min"]'
    assert "experiment.json" in {a.path for a in client.list_artifacts(first.parent_id)}
    first.end()
    again = MlflowTracking(uri, spec, exp_dir)  # a resumed search, or the restored callback
    assert again.parent_id == first.parent_id and client.get_run(first.parent_id).info.status == "RUNNING"
    assert len(client.search_runs([first.experiment_id])) == 1


def test_a_trial_is_mirrored_report_by_report(store, tmp_path):
    uri, spec, exp_dir = store
    experiment(uri, exp_dir.parent)
    tracker = MlflowTracking(uri, spec, exp_dir)
    for r in reports("t1"):
        tracker.log_result(of(r, {"lr": 0.01, "prune_ratio": 0.5}))
    tracker.end_trial(of(reports("t1")[-1]))
    client = MlflowClient(uri)
    run = children(uri, tracker)["t1"]
    assert run.info.status == "FINISHED" and run.data.tags[STATUS_TAG] == DONE
    assert run.data.tags["mlflow.parentRunId"] == tracker.parent_id and run.data.params["lr"] == "0.01"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert run.data.metrics["accuracy"] == pytest.approx(0.4) and run.data.metrics["latency_ms"] == pytest.approx(3.0)
    curve = client.get_metric_history(run.info.run_id, "sweep_latency_ms/channel_l1")
    assert sorted((m.step, m.value) for m in curve) == [(0, 5.0), (50, 3.0)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    # the checkpoint is not logged when the trial ends: tuning.retention logs the kept ones after the search
    assert "sweep.csv" in artifacts and "checkpoint" not in artifacts
    sweep = pd.read_csv(client.download_artifacts(run.info.run_id, "sweep.csv", str(tmp_path)), dtype={"arch": str})
    pd.testing.assert_frame_equal(sweep, SWEEP)


def test_diverged_and_errored_trials_end_failed(store):
    uri, spec, exp_dir = store
    experiment(uri, exp_dir.parent)
    tracker = MlflowTracking(uri, spec, exp_dir)
    for r in reports("bad", diverge=True):
        tracker.log_result(of(r))
    tracker.end_trial(of(reports("bad", diverge=True)[-1]))
    tracker.fail_trial("crashed", {"lr": 0.1})
    found = children(uri, tracker)
    assert (found["bad"].info.status, found["bad"].data.tags[STATUS_TAG]) == ("FAILED", "diverged")
    assert found["bad"].data.tags["prunetune.error"] == "loss is nan"
    assert (found["crashed"].info.status, found["crashed"].data.tags[STATUS_TAG]) == ("FAILED", "error")


def test_a_trial_that_missed_a_result_stays_open(store):
    uri, spec, exp_dir = store
    experiment(uri, exp_dir.parent)
    tracker = MlflowTracking(uri, spec, exp_dir)
    tracker.log_result(of(reports("t1")[0]))
    tracker.missed.add("t1")  # what the hooks record when the server did not answer
    tracker.end_trial(of(reports("t1")[-1]))
    assert children(uri, tracker)["t1"].info.status == "RUNNING"  # the back-fill completes it


def _toy_trainable(config):
    from ray import tune

    for r in reports(tune.get_context().get_trial_id(), diverge=config["diverge"]):
        tune.report({k: v for k, v in r.items() if k != "trial_id"})


@pytest.fixture(scope="module")
def toy_grid(tmp_path_factory):
    """A real (tiny) Tune experiment: two trials reporting like train_and_sweep, one diverging."""
    import sys

    import ray
    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        tuner = tune.Tuner(_toy_trainable, param_space={"diverge": tune.grid_search([False, True])},
                           run_config=tune.RunConfig(storage_path=str(tmp_path_factory.mktemp("rr")), name="toy",
                                                     verbose=0))
        return tuner.fit()
    finally:
        ray.shutdown()


def test_backfill_logs_every_report_ray_kept_in_order(store, toy_grid):
    uri, spec, exp_dir = store
    experiment(uri, exp_dir.parent)
    tracker = MlflowTracking(uri, spec, exp_dir)
    ids = {r.config["diverge"]: r.metrics["trial_id"] for r in toy_grid}
    good_result = next(r for r in toy_grid if not r.config["diverge"])
    first = good_result.metrics_dataframe.iloc[0]  # the first report, as Ray kept it
    tracker.log_result(of(first[first.notna()].to_dict()))  # logged before an outage: the run is open
    assert sorted(tracker.backfill(toy_grid)) == sorted(ids.values())
    client = MlflowClient(uri)
    found = children(uri, tracker)
    good, bad = found[ids[False]], found[ids[True]]
    assert (good.info.status, good.data.tags[STATUS_TAG]) == ("FINISHED", DONE)
    assert (bad.info.status, bad.data.tags[STATUS_TAG]) == ("FAILED", DIVERGED)
    assert [m.step for m in client.get_metric_history(good.info.run_id, "val_accuracy")] == [1, 2]
    assert good.data.metrics["accuracy"] == pytest.approx(0.4)
    assert len(client.get_metric_history(good.info.run_id, "sweep_accuracy/global_l1")) == 2
    assert tracker.backfill(toy_grid) == []  # every run complete: nothing to do
    assert len(found) == 2 and {r.data.tags[TRIAL_ID_TAG] for r in found.values()} == set(ids.values())


def test_a_finished_search_is_read_back_with_run_ids(store, tmp_path):
    uri, spec, exp_dir = store
    with pytest.raises(runs.NotFound, match="no MLflow experiment 'unit'"):
        runs.load_search(uri, "unit")
    experiment(uri, exp_dir.parent)
    tracker = MlflowTracking(uri, spec, exp_dir)
    tracker.log_result(of(reports("08088346")[0]))  # an all-digit trial id stays a string
    with pytest.raises(runs.NotFound, match="no finished prunetune search in experiment 'unit'"):
        runs.load_search(uri, "unit")
    points_csv, front_csv = tmp_path / POINTS_CSV, tmp_path / FRONT_CSV
    SWEEP.assign(trial_id="08088346", lr=0.01).to_csv(points_csv, index=False)
    SWEEP.iloc[:2].assign(trial_id="08088346", lr=0.01).to_csv(front_csv, index=False)
    tracker.log_search([points_csv, front_csv], hypervolume=1.5)
    tracker.end()
    found = runs.load_search(uri)
    parent, front = found.parent, found.front
    assert parent.info.run_id == tracker.parent_id and parent.data.metrics["pareto_hypervolume"] == 1.5
    assert found.name == "unit"
    for table, n in ((front, 2), (found.points, len(SWEEP))):
        assert (table.trial_id == "08088346").all() and (table.run_id == tracker.runs["08088346"]).all()
        assert len(table) == n


def test_the_ui_address_opens_on_the_runs():
    # MLflow 3 opens an experiment on its GenAI overview unless the address asks for model training
    assert runs.where_to_look("http://mlflow:5000/", "7") == (
        "MLflow UI: http://mlflow:5000/#/experiments/7?workflowType=machine_learning")
    assert runs.where_to_look("sqlite:///mlflow.db", "7").startswith(
        "MLflow UI: `prunetune ui --tracking-uri sqlite:///mlflow.db`, then http://127.0.0.1:5000/#/experiments/7?")


def test_a_running_search_shows_its_provisional_front(store):
    from tuning import registry

    uri, spec, exp_dir = store
    experiment(uri, exp_dir.parent)
    tracker = MlflowTracking(uri, spec, exp_dir)
    assert "no point above the floor yet" in registry.provisional(uri, "unit")  # no trial completed
    for r in reports("t1"):
        tracker.log_result(of(r, {"lr": 0.01}))
    text = registry.provisional(uri, "unit")
    assert text.startswith("PROVISIONAL: search unit-1") and "1 completed trial(s)" in text
    assert "channel_l1" in text  # the fastest point of the trial's sweep is on its front
    tracker.end()
    assert registry.provisional(uri, "unit") is None  # finished: `pareto` shows the final front
