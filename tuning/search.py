"""The search: Ray Tune runs ``train_and_sweep`` trials, Optuna picks (lr, prune_ratio).

Connection, probes and slots live in :mod:`tuning.cluster`; the search space, sampler and
sweep-feedback searcher in :mod:`tuning.space`; the Tuner in :mod:`tuning.tuner`. After the
search: every point of every trial -> ``all_points.csv``; the Pareto front over the
objectives -> ``pareto.csv``, printed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from trainables.names import SPEC_FILE, TRACKING_FILE
from trainables.sweep import table_from_report
from tuning import cluster, pareto, runs, tracking, tuner
from tuning.spec import Spec, from_dict


@dataclass
class SearchResult:
    path: Path  # the experiment directory (what `prunetune resume` takes)
    trials: pd.DataFrame  # one row per trained trial
    points: pd.DataFrame  # one row per sweep point of every completed trial
    front: pd.DataFrame  # the Pareto-optimal points
    hypervolume: float | None = None  # of the front, 2 objectives only (reference: see _collect)


def _collect(spec: Spec, exp_dir: Path, results) -> SearchResult:
    """Trials, every sweep point and the Pareto front; written next to the experiment."""
    trials, points = [], []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id", Path(r.path).name if r.path else "?")
        status = "error" if r.error else {"train": "stopped"}.get(m.get("phase"), m.get("phase", "unknown"))
        trials.append({"trial_id": trial_id, "lr": r.config.get("lr"), "prune_ratio": r.config.get("prune_ratio"),
                       "status": status, "epoch": m.get("epoch"), "val_accuracy": m.get("val_accuracy"),
                       **{k: m.get(k) for k in ("method", "int8", "node_id", "cuda_visible_devices",
                                                "trial_start", "trial_end", "error")},
                       "checkpoint": r.checkpoint.path if r.checkpoint else None, "trial_dir": r.path})
        df = table_from_report(m)
        if df is not None and not r.error:
            df.insert(0, "trial_id", trial_id)
            df.insert(1, "lr", m.get("lr"))
            points.append(df)
    trials_df = pd.DataFrame(trials)
    points_df = pd.concat(points, ignore_index=True) if points else pd.DataFrame()
    objectives = spec.search.objectives
    front_df = pareto.front(points_df, objectives) if len(points_df) else points_df
    hv = None
    if len(objectives) == 2 and len(points_df):
        # reference point: 0 for a max objective (accuracy), 1.1 x the worst value seen for a min one
        ref = [0.0 if mode == "max" else 1.1 * points_df[name].max() for name, mode in objectives]
        hv = pareto.hypervolume_2d(points_df, objectives, ref)
    trials_df.to_csv(exp_dir / "trials.csv", index=False)
    points_df.to_csv(exp_dir / "all_points.csv", index=False)
    front_df.to_csv(exp_dir / "pareto.csv", index=False)
    return SearchResult(exp_dir, trials_df, points_df, front_df, hv)


def print_summary(res: SearchResult, spec: Spec) -> None:
    t = res.trials
    print(f"\n{len(t)} trials: " + ", ".join(f"{n} {s}" for s, n in t.status.value_counts().items()))
    if len(res.front):
        names = [o.metric for o in spec.search.objectives]
        cols = ["trial_id", "lr", "method", "ratio", "int8", *dict.fromkeys(names + ["test_accuracy", "size_mb"])]
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
            print(f"Pareto front ({', '.join(map(str, spec.search.objectives))}) over {len(res.points)} points:")
            print(res.front[cols].to_string(index=False))
    else:
        print("no completed trial: no Pareto front")
    print(f"results: {res.path} (trials.csv, all_points.csv, pareto.csv)")


def _run(spec: Spec, exp_dir: Path, uri: str, restore: bool) -> SearchResult:
    from trainables import data

    splits = data.load(spec.data)  # read once: the trials get it through the object store, and
    # registering the front calibrates INT8 models on it
    with tuner.latency_cache():
        if restore:  # the tracking callback comes back with the experiment and reconnects
            tracking.MlflowTracking.latest = None
            results = tuner.restore(exp_dir, spec, splits).fit()
            tracker = tracking.MlflowTracking.latest  # None under Ray Client: restored on the cluster
            if tracker is None and uri:
                tracker = tracking.MlflowTracking(uri, spec.to_dict(), exp_dir)  # finds the runs by tag
        else:
            tracker = tracking.MlflowTracking(uri, spec.to_dict(), exp_dir)
            results = tuner.create(spec, exp_dir, splits, [tracker]).fit()
    res = _collect(spec, exp_dir, results)
    if tracker is not None:
        tracker.finish(res, spec, results, splits)
    return res


def search(spec: Spec, address: str | None = None, tracking_uri: str | None = None) -> SearchResult:
    """Run a new search; its directory is ``storage_path/<name>-<time>``."""
    cluster.check_address(address)  # before anything is created
    uri = runs.tracking_uri(tracking_uri)
    runs.check_reachable(uri)  # before any training starts
    cluster.connect(address)
    cluster.check_storage(spec.search.storage_path)
    exp_dir = Path(spec.search.storage_path) / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    (exp_dir / TRACKING_FILE).write_text(uri)
    q = spec.search
    trials = f"grid over lr {q.grid_lrs}" if q.sampler == "grid" else f"{q.num_samples} trials, sampler {q.sampler}"
    print(f"search {spec.name}: {trials}, objectives "
          f"{', '.join(map(str, spec.search.objectives))}; experiment dir {exp_dir} "
          f"(resume with `prunetune resume {exp_dir}`)", flush=True)
    print(f"tracking: MLflow at {uri} (experiment {spec.name!r})", flush=True)
    return _run(spec, exp_dir, uri, restore=False)


def resume(path: str | Path, address: str | None = None) -> tuple[SearchResult, Spec]:
    """Continue an interrupted search: finished trials stay, unfinished and errored ones
    resume from their checkpoints, the searcher keeps its Optuna study."""
    exp_dir = Path(path).resolve()
    spec_file = exp_dir / SPEC_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{exp_dir} is not a prunetune search directory (no {SPEC_FILE}); "
                                "pass the directory `prunetune search` printed")
    spec = from_dict(json.loads(spec_file.read_text()), source=str(spec_file))
    uri = ""
    if (exp_dir / TRACKING_FILE).is_file():  # the search's callback reconnects to this store
        uri = (exp_dir / TRACKING_FILE).read_text().strip()
        runs.check_reachable(uri)
    cluster.connect(address)
    cluster.check_storage(str(exp_dir.parent))
    print(f"resuming search {spec.name} from {exp_dir}", flush=True)
    return _run(spec, exp_dir, uri, restore=True), spec
