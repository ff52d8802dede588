"""tuning.front: what may be shipped (deployable, above the floor), the front computed once with
objectives by role, and which point the budgets pick, checked against brute force on
constructed and random points."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from tuning import front as front_mod, pareto
from tuning.front import Rules
from tuning.pareto import Objective

OBJECTIVES = [Objective("accuracy", "max"), Objective("latency_ms", "min")]


def points(rows: list[tuple]) -> pd.DataFrame:
    """(accuracy, latency_ms, ratio, int8, finetune_epochs) rows of one pretend trial."""
    df = pd.DataFrame(rows, columns=["accuracy", "latency_ms", "ratio", "int8", "finetune_epochs"])
    df.insert(0, "trial_id", "t1")
    df.insert(1, "lr", 0.01)
    df.insert(2, "method", "channel_l1")
    return df


def test_default_floor_is_twice_chance():
    assert front_mod.default_floor(10) == pytest.approx(0.2) and front_mod.default_floor(100) == pytest.approx(0.02)


def test_candidates_are_the_fine_tuned_points_above_the_floor():
    df = points([(0.9, 10.0, 0.0, False, 2), (0.95, 10.0, 0.0, False, 0), (0.1, 1.0, 0.7, False, 2),
                 (0.5, 3.0, 0.5, True, 2), (float("nan"), 2.0, 0.5, False, 2)])
    got = front_mod.candidates(df, Rules(finetune_epochs=2, floor=0.2))
    assert list(got.index) == [0, 3]  # not the no-retrain row, not the one at chance, not the failed one
    assert list(front_mod.candidates(df, Rules(floor=0.2)).index) == [0, 1, 3]  # without fine-tuning: every point


def test_dense_reference_is_the_best_equal_compute_dense_fp32_point():
    df = points([(0.8, 10.0, 0.0, False, 2), (0.9, 10.0, 0.0, False, 0), (0.85, 3.0, 0.0, True, 2),
                 (0.7, 2.0, 0.5, False, 2)])
    assert front_mod.dense_reference(df, Rules(finetune_epochs=2)) == 0.8
    assert math.isnan(front_mod.dense_reference(df.iloc[3:], Rules(finetune_epochs=2)))


def test_pick_names_the_aliases_and_the_fastest_point_within_the_budgets():
    front = pd.DataFrame({"accuracy": [0.9, 0.85, 0.5], "latency_ms": [10.0, 3.0, 1.0]}, index=[7, 8, 9])
    assert front_mod.pick(front, OBJECTIVES, Rules(), 0.9) == {"best-accuracy": 7, "fastest": 9, "knee": 8,
                                                                "pick": 9}
    assert front_mod.pick(front, OBJECTIVES, Rules(max_accuracy_drop=0.06), 0.9)["pick"] == 8
    assert front_mod.pick(front, OBJECTIVES, Rules(max_latency_ms=5.0, max_accuracy_drop=0.01), 0.9).get("pick") is None


@pytest.mark.parametrize("seed", range(5))
def test_fastest_feasible_equals_brute_force_and_lies_on_the_front(seed):
    rng = np.random.default_rng(seed)
    df = points([(float(rng.uniform(0.05, 0.95)), float(rng.uniform(1, 20)), float(rng.choice([0.0, 0.3, 0.5])),
                  bool(rng.integers(2)), 2) for _ in range(40)])
    rules = Rules(finetune_epochs=2, floor=0.2, max_latency_ms=float(rng.uniform(3, 15)),
                  max_accuracy_drop=float(rng.uniform(0.0, 0.3)))
    shippable = front_mod.candidates(df, rules)
    dense = front_mod.dense_reference(df, rules)
    ok = [i for i, r in shippable.iterrows()
          if r.latency_ms <= rules.max_latency_ms and dense - r.accuracy <= rules.max_accuracy_drop + 1e-12]
    want = min(ok, key=lambda i: (shippable.latency_ms[i], -shippable.accuracy[i])) if ok else None
    assert front_mod.fastest_feasible(shippable, rules, dense) == want
    front = pareto.front(shippable, OBJECTIVES)
    assert front_mod.pick(front, OBJECTIVES, rules, dense).get("pick") == want  # the front holds it


def test_closest_names_the_points_nearest_the_budgets():
    df = points([(0.9, 10.0, 0.0, False, 2), (0.88, 6.0, 0.3, False, 2), (0.6, 2.0, 0.5, False, 2)])
    rules = Rules(finetune_epochs=2, max_latency_ms=4.0, max_accuracy_drop=0.05)
    text = front_mod.closest(df, rules, 0.9)
    assert "no point meets the budgets" in text and "--max-latency-ms" in text
    assert "fastest within the accuracy budget: trial t1 channel_l1 ratio 0.3" in text and "+2.000 ms over" in text
    assert "most accurate within the latency budget: trial t1 channel_l1 ratio 0.5" in text and "drop 30.00" in text


def test_describe_names_floor_and_budgets():
    assert Rules(floor=0.2).describe() == "floor accuracy >= 0.200"
    text = Rules(floor=0.2, max_latency_ms=5, max_accuracy_drop=0.01).describe()
    assert "latency <= 5 ms" in text and "accuracy drop <= 1 points" in text
    assert not Rules().budgeted and all(Rules(**kw).budgeted for kw in ({"max_latency_ms": 1.0},
                                                                        {"max_accuracy_drop": 0.0}))


def test_every_alias_is_named():
    front = pd.DataFrame({"accuracy": [0.9, 0.5], "latency_ms": [10.0, 1.0]})
    assert set(front_mod.pick(front, OBJECTIVES, Rules(), 0.9)) == set(front_mod.ALIASES)
    assert list(itertools.islice(front_mod.ALIASES, 3)) == ["best-accuracy", "fastest", "knee"]


def test_aliases_mean_the_same_points_whatever_the_order_or_number_of_objectives():
    """Aliases by role, not by position: ``latency_ms:min`` written first picks the same models, and
    a third objective still names every alias (the knee is balanced over all of them)."""
    rng = np.random.default_rng(3)
    df = points([(float(a), float(l), 0.3, False, 2) for a, l in zip(rng.uniform(0.3, 0.9, 30), rng.uniform(1, 20, 30))])
    df["size_mb"] = rng.uniform(1, 40, len(df))
    rules = Rules(max_latency_ms=12.0)
    swapped = [Objective("latency_ms", "min"), Objective("accuracy", "max")]
    a = front_mod.pick(pareto.front(df, OBJECTIVES), OBJECTIVES, rules, 0.9)
    b = front_mod.pick(pareto.front(df, swapped), swapped, rules, 0.9)
    assert a == b and set(a) == set(front_mod.ALIASES)
    assert df.loc[a["best-accuracy"], "accuracy"] == df.accuracy.max()
    three = [*OBJECTIVES, Objective("size_mb", "min")]
    c = front_mod.pick(pareto.front(df, three), three, rules, 0.9)
    assert set(c) == set(front_mod.ALIASES) and c["best-accuracy"] == a["best-accuracy"] and c["fastest"] == a["fastest"]


def _random_points(seed: int = 3, n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = points([(float(a), float(lat), 0.3, False, 2) for a, lat in zip(rng.uniform(0.3, 0.9, n), rng.uniform(1, 20, n))])
    df["size_mb"] = rng.uniform(1, 40, len(df))
    return df


def test_one_front_whatever_the_order_of_the_objectives():
    """compute() by role: objectives in either order give the same rows, aliases, plane and hypervolume."""
    df, rules = _random_points(), Rules(max_latency_ms=12.0)
    a = front_mod.compute(df, rules, OBJECTIVES)
    b = front_mod.compute(df, rules, OBJECTIVES[::-1])
    assert sorted(a.rows.index) == sorted(b.rows.index) and a.aliases == b.aliases and a.feasible
    assert a.plane == b.plane == tuple(OBJECTIVES) and a.hypervolume == pytest.approx(b.hypervolume)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.rows = df  # computed once, never changed in place


def test_a_third_objective_keeps_the_aliases_the_plane_and_the_hypervolume():
    df, rules = _random_points(), Rules()
    two = front_mod.compute(df, rules, OBJECTIVES)
    three = front_mod.compute(df, rules, [Objective("size_mb", "min"), *OBJECTIVES])
    assert set(three.aliases) == set(front_mod.ALIASES) and set(two.rows.index) <= set(three.rows.index)
    assert three.plane == tuple(OBJECTIVES) and three.hypervolume == pytest.approx(two.hypervolume)
    size_only = front_mod.compute(df, rules, [Objective("accuracy", "max"), Objective("size_mb", "min")])
    assert size_only.plane == (Objective("accuracy", "max"), Objective("size_mb", "min"))
    assert front_mod.compute(df, rules, [Objective("accuracy", "max")]).hypervolume is None  # no plane: said so


def test_the_hypervolume_reference_is_fixed_by_the_experiment_not_by_the_points():
    """Two searches of one file compare: a slow point added to a search moves no reference."""
    df, rules = _random_points(), Rules()
    f = front_mod.compute(df, rules, OBJECTIVES)
    assert f.reference == (0.0, pareto.MIN_REFERENCE["latency_ms"])
    assert f.hypervolume == pytest.approx(pareto.hypervolume_2d(df, OBJECTIVES, f.reference))
    slow = pd.concat([df, points([(0.31, 90.0, 0.0, False, 2)])], ignore_index=True)  # dominated, slowest
    assert front_mod.compute(slow, rules, OBJECTIVES).hypervolume == pytest.approx(f.hypervolume)
    given = front_mod.compute(df, rules, OBJECTIVES, reference=[0.0, 25.0])
    assert given.hypervolume == pytest.approx(pareto.hypervolume_2d(df, OBJECTIVES, (0.0, 25.0)))
    assert given.with_points(df).hypervolume == pytest.approx(given.hypervolume)  # kept by a re-measured front


def test_the_budgets_of_the_searcher_and_of_the_front_are_one_test():
    """Optuna's constraints (tuning.space.Budgets) and the front's pick use Rules.excess."""
    from tuning.space import Budgets

    rules = Rules(max_latency_ms=5.0, max_accuracy_drop=0.05)
    budgets = Budgets(rules)
    budgets.dense_accuracy = 0.9
    df = points([(0.88, 4.0, 0.3, False, 2), (0.80, 3.0, 0.5, False, 2), (0.9, 6.0, 0.0, False, 2)])
    met = front_mod.feasible(df, rules, 0.9)
    assert list(met) == [True, False, False]
    assert [max(budgets.values(r)) <= 0 for r in df.to_dict("records")] == list(met)


def test_a_limit_on_any_metric_is_a_budget_the_pick_obeys():
    """``[search] limits``: budgets on any point metric, in the front's pick, the searcher's
    constraints and the explanation when nothing meets them."""
    df = _random_points()
    size = front_mod.Limit.parse("size_mb<=10")
    assert (size.metric, size.bound, size.upper, str(size)) == ("size_mb", 10.0, True, "size_mb<=10")
    f = front_mod.compute(df, Rules(limits=(size,)), OBJECTIVES)
    within = df[df.size_mb <= 10]
    want = within.sort_values(["latency_ms", "accuracy"], ascending=[True, False]).index[0]
    assert f.rules.budgeted and f.aliases["pick"] == want  # the fastest within the limit, on the front
    assert "size_mb<=10" in f.rules.describe()
    none = Rules(limits=(front_mod.Limit.parse("size_mb<=0.5"),))
    assert not front_mod.compute(df, none, OBJECTIVES).feasible
    assert "no point is within the limits (size_mb<=0.5)" in front_mod.closest(df, none, 0.9)
    assert front_mod.Limit.parse("throughput_ips>=100").excess(None) > 0  # not measured: not met
    for bad in ("size_mb<5", "test_accuracy>=0.5", "size_mb<=big", "nope<=1"):
        with pytest.raises(ValueError, match="must be METRIC<=NUMBER or METRIC>=NUMBER"):
            front_mod.Limit.parse(bad)
