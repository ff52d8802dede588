import itertools

import numpy as np
import pandas as pd
import pytest

from tuning import pareto
from tuning.pareto import Objective

OBJ = [Objective("accuracy", "max"), Objective("latency_ms", "min")]


def brute_front(df, objectives):
    keep = []
    for i, a in df.iterrows():
        if any(np.isnan(a[n]) for n in (o.metric for o in objectives)):
            continue
        dominated = False
        for j, b in df.iterrows():
            if any(np.isnan(b[n]) for n in (o.metric for o in objectives)):
                continue
            better_eq = all((b[n] >= a[n]) if m == "max" else (b[n] <= a[n]) for n, m in ((o.metric, o.direction) for o in objectives))
            strictly = any((b[n] > a[n]) if m == "max" else (b[n] < a[n]) for n, m in ((o.metric, o.direction) for o in objectives))
            dominated |= better_eq and strictly
        if not dominated:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"accuracy": rng.integers(0, 6, 40) / 5, "latency_ms": rng.integers(1, 8, 40).astype(float),
                       "size_mb": rng.random(40)})
    df.loc[3, "accuracy"] = np.nan
    for objectives in (OBJ, OBJ + [Objective("size_mb", "min")]):
        assert sorted(pareto.front(df, objectives).index) == brute_front(df, objectives)


def hv_brute(points, ref, step=0.01):
    # area dominated, on a fine grid (objectives converted to minimise)
    xs = np.arange(-1.0, ref[0], step) + step / 2
    ys = np.arange(0.0, ref[1], step) + step / 2
    count = 0
    for x, y in itertools.product(xs, ys):
        count += any(px <= x and py <= y for px, py in points)
    return count * step * step


def test_hypervolume_2d_against_grid():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"accuracy": rng.random(8), "latency_ms": rng.random(8) * 2})
    hv = pareto.hypervolume_2d(df, OBJ, reference=(0.0, 2.0))
    pts = [(-a, l) for a, l in zip(df.accuracy, df.latency_ms)]
    assert hv == pytest.approx(hv_brute(pts, (0.0, 2.0)), abs=0.03)
    assert pareto.hypervolume_2d(df.iloc[:0], OBJ, (0.0, 2.0)) == 0.0
    # adding a dominated point changes nothing; a dominating one increases it
    more = pd.concat([df, pd.DataFrame({"accuracy": [0.0001], "latency_ms": [1.99]})])
    assert pareto.hypervolume_2d(more, OBJ, (0.0, 2.0)) == pytest.approx(hv)
    best = pd.concat([df, pd.DataFrame({"accuracy": [1.0], "latency_ms": [0.0]})])
    assert pareto.hypervolume_2d(best, OBJ, (0.0, 2.0)) == pytest.approx(2.0)


def test_knee_is_balanced_point():
    df = pd.DataFrame({"accuracy": [0.9, 0.85, 0.5], "latency_ms": [10.0, 3.0, 1.0]})
    f = pareto.front(df, OBJ)
    assert pareto.knee(f, OBJ) == 1


def test_objective_parse_and_str():
    o = pareto.Objective.parse("accuracy:max")
    assert o == Objective("accuracy", "max") and (o.metric, o.direction, o.role) == ("accuracy", "max", "accuracy")
    assert str(o) == "accuracy:max" and Objective.parse("latency_ms:min").role == "latency"
    for bad in ("accuracy", "accuracy:maximum", "acc:max"):
        with pytest.raises(ValueError, match="METRIC:max or METRIC:min with METRIC one of accuracy"):
            pareto.Objective.parse(bad)
