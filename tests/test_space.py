"""tuning.space: what a trial's own point is drawn from, by the objectives' roles."""
from __future__ import annotations

from tuning import space
from tuning.spec import from_dict


def spec(objectives: list[str], methods: list[str], int8: bool = True):
    return from_dict({"sweep": {"methods": methods, "int8": int8}, "search": {"objectives": objectives}})


def test_a_latency_objective_never_samples_a_method_that_removes_no_work():
    s = spec(["accuracy:max", "latency_ms:min"], ["global_l1", "layer_l1", "channel_l1"])
    assert space.own_methods(s) == ["channel_l1"]
    dims = space.optuna_space(s)
    assert "method" not in dims and set(dims) == {"lr", "prune_ratio", "int8"}  # one method: nothing to sample
    assert space.own_methods(spec(["latency_ms:min", "accuracy:max"], ["global_l1", "channel_l1"])) == ["channel_l1"]


def test_an_objective_that_rewards_zeros_samples_every_method():
    s = spec(["accuracy:max", "size_mb:min"], ["global_l1", "channel_l1"])
    assert space.own_methods(s) == ["global_l1", "channel_l1"]
    assert space.optuna_space(s)["method"].choices == ("global_l1", "channel_l1")
    both = spec(["accuracy:max", "latency_ms:min", "size_mb:min"], ["global_l1", "channel_l1"])
    assert space.own_methods(both) == ["global_l1", "channel_l1"]


def test_without_a_method_that_removes_work_the_listed_ones_stay():
    assert space.own_methods(spec(["accuracy:max", "latency_ms:min"], ["global_l1"])) == ["global_l1"]


def test_evidence_of_a_method_the_own_points_are_not_drawn_from_is_not_told():
    import pandas as pd

    s = spec(["accuracy:max", "latency_ms:min"], ["global_l1", "layer_l1", "channel_l1"])
    dims = space.optuna_space(s)
    table = pd.DataFrame([
        {"method": "global_l1", "ratio": 0.3, "int8": False, "accuracy": 0.5, "latency_ms": 3.0},  # the curve
        {"method": "channel_l1", "ratio": 0.0, "int8": True, "accuracy": 0.6, "latency_ms": 1.0,
         "artifact": "points/channel_l1@0-int8.onnx"},
    ])
    trial = {"lr": 0.01, "method": "channel_l1", "prune_ratio": 0.4, "int8": False}
    told = space.sweep_evidence(table, trial, dims, ["accuracy", "latency_ms"], curve=True)
    assert [p["prune_ratio"] for p, _, _ in told] == [0.0] and all("method" not in p for p, _, _ in told)
