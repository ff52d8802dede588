"""tuning.stopping: the early-stopping rule on constructed reports, and on a real (tiny) Tune
experiment with the search's own searcher (an Optuna RDB study), MLflow tracker and scheduler:
a dominated trial is stopped at its rung, Optuna records it pruned (and its predicted point as
evidence), MLflow tags it stopped, a
restored experiment does not restart it, and the stop rule ends a search."""
from __future__ import annotations

import sys

import optuna
import pytest
from mlflow import MlflowClient

from trainables.names import DONE, PHASE, TRAIN
from tuning import runs, stopping
from tuning.names import STATUS_TAG, STUDY_FILE
from tuning.spec import from_dict

TRAIN_REPORT = {PHASE: TRAIN, "epoch": 1}


def test_rungs_are_geometric_below_the_last_epoch():
    assert stopping.rungs(5, 2) == (1, 2, 4) and stopping.rungs(9, 3) == (1, 3) and stopping.rungs(1, 2) == ()


def test_a_dominated_prediction_stops_and_a_faster_one_goes_on():
    others = [(0.80, 1.0)]
    assert "dominated at its rung" in stopping.verdict((0.70, 1.2), others, margin=0.02, eta=10)
    assert stopping.verdict((0.79, 1.0), others, margin=0.02, eta=10) is None  # within the margin
    assert stopping.verdict((0.50, 0.4), others, margin=0.02, eta=10) is None  # faster: a trade-off, not dominated
    # MO-ASHA's rule: with eta points at the rung, only the best 1/eta layers go on
    rung = [(0.9, 1.0), (0.8, 0.5), (0.85, 0.9)]
    assert stopping.layers([*rung, (0.6, 1.1)]) == [0, 0, 0, 1]
    assert "not in the best 1/2" in stopping.verdict((0.6, 1.1), rung, margin=1.0, eta=2)
    assert stopping.verdict((0.95, 2.0), rung, margin=1.0, eta=2) is None  # the most accurate: on the front


def test_the_scheduler_decides_at_rungs_only_and_keeps_its_records(tmp_path):
    s = stopping.ParetoStopping(tmp_path, rung_epochs=(1, 2), eta=10, margin=0.02)
    report = {**TRAIN_REPORT, "predicted_accuracy": 0.9, "predicted_latency_ms": 1.0}
    assert s.decide("a", report) == "CONTINUE"
    assert s.decide("b", {**report, "predicted_accuracy": 0.5}) == "STOP"
    assert s.decide("c", {**report, "epoch": 3, "predicted_accuracy": 0.1}) == "CONTINUE"  # not a rung
    assert s.decide("c", {**report, PHASE: DONE, "predicted_accuracy": 0.1}) == "CONTINUE"
    again = stopping.ParetoStopping(tmp_path, rung_epochs=(1, 2), eta=10, margin=0.02)  # a resumed search
    assert again.records == {"1": {"a": (0.9, 1.0), "b": (0.5, 1.0)}} and "b" in again.stopped
    assert again.decide("d", {**report, "predicted_accuracy": 0.6}) == "STOP"  # against the first search's records


def test_the_stop_rule_counts_trial_epochs_time_and_hypervolume_gain():
    rule = stopping.StopRule(epochs=3)
    for _ in range(2):
        rule("t", TRAIN_REPORT)
    assert not rule.stop_all()
    rule("t", TRAIN_REPORT)
    assert rule.stop_all() and "3 trial-epochs" in rule.why
    flat = stopping.StopRule(patience=2, tolerance=0.01)
    for acc in (0.8, 0.8, 0.79, 0.5):  # no gain after the first completed trial
        flat("t", {PHASE: DONE, "accuracy": acc, "latency_ms": 2.0})
    assert flat.stop_all() and "stop_patience" in flat.why
    growing = stopping.StopRule(patience=2, tolerance=0.01)
    for acc, lat in ((0.5, 5.0), (0.6, 4.0), (0.7, 3.0)):
        growing("t", {PHASE: DONE, "accuracy": acc, "latency_ms": lat})
    assert not growing.stop_all() and not stopping.StopRule(minutes=60).stop_all()


def _toy(config):
    """Reports like train_and_sweep: three epochs, predicting 1 - prune_ratio at 1.0 ms at the rungs."""
    from ray import tune

    for epoch in (1, 2, 3):
        report = {PHASE: TRAIN, "epoch": epoch, "val_accuracy": 0.5}
        if epoch in (1, 2):
            report.update(predicted_accuracy=1 - config["prune_ratio"], predicted_latency_ms=1.0)
        tune.report(report)
    tune.report({PHASE: DONE, "epoch": 3, "accuracy": 1 - config["prune_ratio"], "latency_ms": 1.0,
                 "lr": config["lr"], "prune_ratio": config["prune_ratio"]})


@pytest.mark.slow
def test_a_stopped_trial_is_pruned_in_optuna_tagged_in_mlflow_and_stays_stopped(tmp_path, monkeypatch):
    import ray
    from ray import cloudpickle, tune

    from tuning import cluster, space, tracking

    for key, value in cluster.TUNE_ENV.items():  # what the driver sets for a search's Tune
        monkeypatch.setenv(key, value)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    spec = from_dict({"name": "stops", "search": {"storage_path": str(tmp_path), "num_samples": 3,
                                                  "early_stop": "pareto", "sweep_feedback": False}})
    exp_dir, uri = tmp_path / "stops-1", f"sqlite:///{tmp_path}/mlflow.db"
    exp_dir.mkdir()
    MlflowClient(uri).create_experiment("stops", artifact_location=str(tmp_path / "artifacts"))
    searcher = space.sampling(spec, exp_dir).searcher
    for ratio in (0.1, 0.7, 0.05):  # the second is dominated at its rung by the first; the third is not
        searcher.study.enqueue_trial({"lr": 0.01, "prune_ratio": ratio})
    tracker = tracking.MlflowTracking(uri, spec.to_dict(), exp_dir)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        tuner = tune.Tuner(_toy, tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=3, max_concurrent_trials=1,
            scheduler=stopping.ParetoStopping(exp_dir, (1, 2), eta=10, margin=0.02)),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(tmp_path), callbacks=[tracker], verbose=0))
        grid = tuner.fit()
        epochs = {r.config["prune_ratio"]: r.metrics["epoch"] for r in grid}
        assert epochs == {0.1: 3, 0.7: 1, 0.05: 3}  # stopped at its first rung
        restored = tune.Tuner.restore(str(exp_dir), trainable=_toy, resume_unfinished=True, resume_errored=True)
        assert {r.config["prune_ratio"]: r.metrics["epoch"] for r in restored.fit()} == epochs  # not restarted
        # the stop rule: 4 trial-epochs end the search inside its second trial; the third never starts
        rule = stopping.StopRule(epochs=4)
        ended = tune.Tuner(_toy, param_space={"lr": 0.01, "prune_ratio": tune.grid_search([0.1, 0.2, 0.3])},
                           tune_config=tune.TuneConfig(max_concurrent_trials=1),
                           run_config=tune.RunConfig(name="ruled", storage_path=str(tmp_path), stop=rule, verbose=0)).fit()
        assert rule.why.startswith("4 trial-epochs") and len([r for r in ended if r.metrics]) <= 2
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name="stops", storage=f"sqlite:///{exp_dir / STUDY_FILE}")
    states = {t.params["prune_ratio"]: t.state for t in study.trials if "source" not in t.user_attrs}
    assert states[0.7] == optuna.trial.TrialState.PRUNED and states[0.1] == optuna.trial.TrialState.COMPLETE
    # the sampler learns where the stopped trial was heading: its predicted point, at its own params
    told = [(t.params["prune_ratio"], t.values, t.user_attrs["epoch"]) for t in study.trials
            if t.user_attrs.get("source") == "predicted"]
    assert told == [(0.7, [pytest.approx(0.3), 1.0], 1)]
    client = MlflowClient(uri)
    tags = {r.data.params.get("prune_ratio"): r.data.tags.get(STATUS_TAG)
            for r in runs.child_runs(client, tracker.experiment_id, tracker.parent_id).values()}
    assert tags == {"0.1": "done", "0.7": "stopped", "0.05": "done"}
