"""The search: Ray Tune runs ``train_and_sweep`` trials, Optuna picks (lr, prune_ratio).

- Search space (:func:`optuna_space`): ``lr`` log-uniform, ``prune_ratio`` uniform over the
  sweep range, optionally ``method``; ``sampler = "grid"`` runs ``grid_lrs`` instead.
- :class:`SweepFeedbackSearch`: Ray's ``OptunaSearch``, multi-objective, with Optuna RDB
  storage in the experiment directory; when a trial completes, every point of its sweep is
  added to the study as a completed trial with its own (lr, prune_ratio) and objective values,
  so each expensive training gives the sampler a whole curve of evidence, not one point.
- Resources per trial ``{cpu, gpu}`` (fractional GPUs allowed), ``max_concurrent_trials``,
  ``FailureConfig(max_failures)``, one checkpoint kept per trial, optional ASHA.
- After the search: every point of every trial -> ``all_points.csv``; the Pareto front over
  the objectives -> ``pareto.csv``, printed.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray.tune.search.optuna import OptunaSearch

from trainables.sweep import table_from_report
from tuning import pareto, runs, tracking
from tuning.spec import Spec, SpecError, from_dict

SPEC_FILE = "prunetune_spec.json"
STUDY_FILE = "optuna.db"
TRACKING_FILE = "tracking_uri"  # the MLflow store the search logs to (resume reconnects to it)
TUNE_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the narrowed CLIReporter table
    # per-epoch reports carry val_accuracy only; the objectives arrive with the final report
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # one checkpoint kept per trial forces a state snapshot per epoch: expected, not a problem
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@dataclass
class SearchResult:
    path: Path  # the experiment directory (what `prunetune resume` takes)
    trials: pd.DataFrame  # one row per trained trial
    points: pd.DataFrame  # one row per sweep point of every completed trial
    front: pd.DataFrame  # the Pareto-optimal points
    hypervolume: float | None = None  # of the front, 2 objectives only (reference: see _collect)


def optuna_space(spec: Spec) -> dict[str, Any]:
    q = spec.search
    space: dict[str, Any] = {
        "lr": optuna.distributions.FloatDistribution(q.lr_min, q.lr_max, log=True),
        "prune_ratio": optuna.distributions.FloatDistribution(q.ratio_min, q.ratio_max),
    }
    if q.search_method and len(spec.sweep.methods) > 1:
        space["method"] = optuna.distributions.CategoricalDistribution(spec.sweep.methods)
    if spec.sweep.int8:
        space["int8"] = optuna.distributions.CategoricalDistribution([False, True])
    return space


def make_sampler(spec: Spec):
    q = spec.search
    if q.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=q.seed, population_size=max(4, min(50, q.num_samples // 2)))
    if q.sampler == "random":
        return optuna.samplers.RandomSampler(seed=q.seed)
    return optuna.samplers.TPESampler(seed=q.seed, multivariate=True, n_startup_trials=min(10, max(2, q.num_samples // 3)))


class SweepFeedbackSearch(OptunaSearch):
    """OptunaSearch that also tells the study every sweep point of a completed trial."""

    def __init__(self, *args: Any, feedback: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.feedback = feedback

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and any(result.get(m) is None for m in self._metric):
            # diverged or early-stopped: no objectives, so Optuna records it as pruned (Ray's
            # OptunaSearch would try to tell [None, None] as COMPLETE and leave it RUNNING)
            result = None
        super().on_trial_complete(trial_id, result, error)
        table = table_from_report(result) if self.feedback and result else None
        if table is not None:
            for params, values in sweep_evidence(table, result, self._space, self._metric):
                self._ot_study.add_trial(optuna.trial.create_trial(
                    params=params, distributions={k: self._space[k] for k in params}, values=values,
                    user_attrs={"source": "sweep", "ray_trial_id": trial_id},
                ))


def _make_searcher(spec: Spec, exp_dir: Path) -> SweepFeedbackSearch:
    objectives = spec.search.objectives
    storage = optuna.storages.RDBStorage(f"sqlite:///{exp_dir / STUDY_FILE}")
    return SweepFeedbackSearch(
        space=optuna_space(spec), metric=[o.metric for o in objectives], mode=[o.mode for o in objectives],
        sampler=make_sampler(spec), study_name=spec.name, storage=storage, feedback=spec.search.sweep_feedback,
    )


def sweep_evidence(table: pd.DataFrame, trial: dict[str, Any], space: dict[str, Any],
                   metrics: list[str]) -> list[tuple[dict, list[float]]]:
    """(params, objective values) for every point of a trial's sweep ``table`` that the search
    space can express, except the trial's own point (Tune already told the study that one).
    ``trial``: its sampled ``lr``, ``method``, ``prune_ratio`` and ``int8``."""
    out = []
    own = (trial.get("method"), trial.get("prune_ratio"), bool(trial.get("int8", False)))
    ratio_dist = space["prune_ratio"]
    for p in table.to_dict("records"):
        if (p["method"], p["ratio"], bool(p["int8"])) == own:
            continue
        if ("method" not in space and p["method"] != own[0]) or ("int8" not in space and p["int8"]):
            continue
        if not ratio_dist.low <= p["ratio"] <= ratio_dist.high:
            continue
        values = [p.get(m) for m in metrics]
        if any(v is None or not math.isfinite(v) for v in values):
            continue
        params = {"lr": trial["lr"], "prune_ratio": p["ratio"]}
        params.update({k: p[k] for k in ("method", "int8") if k in space})
        out.append((params, values))
    return out


def _reporter(spec: Spec):
    from ray.tune import CLIReporter

    names = [o.metric for o in spec.search.objectives]
    return CLIReporter(
        parameter_columns=["lr", "prune_ratio", "method"],
        metric_columns=["phase", "epoch", "val_accuracy", *names],
        max_report_frequency=30, print_intermediate_tables=True,
    )


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, on a Jobs API address or when nothing listens at a
    host:port Ray address."""
    if address.startswith(("http://", "https://")):
        raise ConnectionError(
            f"{address!r} is a Ray dashboard / Jobs address: submit the search there with `prunetune submit FILE "
            f"--address {address}`, or attach this driver with --address ray://HOST:10001 (or HOST:6379 on a node)")
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and the like: let Ray resolve them
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}). Start one with "
            "`ray start --head`, fix --address / RAY_ADDRESS, or leave both unset for a local Ray"
        ) from None


def connect(address: str | None = None) -> None:
    """Attach to ``address`` (or ``$RAY_ADDRESS``): ``HOST:6379`` from a cluster node, or
    ``ray://HOST:10001`` (Ray Client) from outside; else start a local Ray. No-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        # Ray Client: Tune's controller runs in an actor on the cluster, so it gets the
        # settings through the job's runtime env, not this process's environment
        _check_reachable(address)
        ray.init(address=address, runtime_env={"env_vars": TUNE_ENV})
    elif address:
        _check_reachable(address)
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)


def check_storage(storage_path: str) -> None:
    """On a cluster of several nodes, trial checkpoints are written where the trial runs and
    read back where it restarts: a ``storage_path`` that only this machine sees loses them.
    Probe it before any training: write a marker and ask one task on every alive node whether
    it sees it."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    marker = Path(storage_path) / f".prunetune-probe-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("prunetune")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.isfile(path)

    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(marker)) for n in nodes]
    try:
        answered, _ = ray.wait(refs, num_returns=len(refs), timeout=120)
        seen = [ray.get(r) if r in answered else None for r in refs]
    finally:
        marker.unlink(missing_ok=True)
    name = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n in nodes]
    silent = [name[i] for i, ok in enumerate(seen) if ok is None]
    if silent:
        raise ConnectionError(f"{len(silent)} of {len(nodes)} nodes did not answer the storage_path check within "
                              f"120 s ({', '.join(silent)}); check them with `ray status` and try again")
    blind = [name[i] for i, ok in enumerate(seen) if not ok]
    if blind:
        raise SpecError(
            f"search.storage_path {storage_path} is not shared: {len(blind)} of {len(nodes)} nodes cannot see it "
            f"({', '.join(blind)}), so a trial restarted on another node would lose its checkpoints. Mount a "
            "shared filesystem (NFS, a shared volume) at the same path on every node and point at it: "
            "--set search.storage_path=/shared/ray_results or PRUNETUNE_STORAGE_PATH")
    print(f"storage: {storage_path} is shared by all {len(nodes)} nodes", flush=True)


def _trainable(spec: Spec, splits):
    from ray import tune

    from trainables.trainable import train_and_sweep

    q = spec.search
    print(f"data: {spec.data.dataset}: train {len(splits.train)} / val {len(splits.val)} / test "
          f"{len(splits.test)} images (put in the object store once)", flush=True)
    fn = tune.with_parameters(train_and_sweep, splits=splits, spec=spec.to_dict())
    return tune.with_resources(fn, {"cpu": q.cpus_per_trial, "gpu": q.gpus_per_trial})


def _tuner_parts(spec: Spec, exp_dir: Path, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    q = spec.search
    if q.sampler == "grid":
        param_space = {"lr": tune.grid_search(q.grid_lrs), "prune_ratio": q.ratio_min}
        searcher, num_samples = None, 1
    else:
        param_space, searcher, num_samples = {}, _make_searcher(spec, exp_dir), q.num_samples
    scheduler = None
    if q.asha:
        # max_t one past the last epoch: reaching max_t stops a trial, which must still sweep
        scheduler = ASHAScheduler(metric="val_accuracy", mode="max", time_attr="epoch",
                                  max_t=spec.train.epochs + 1, grace_period=1, reduction_factor=2)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                  max_concurrent_trials=q.max_concurrent_trials or None)
    run_config = tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent), progress_reporter=_reporter(spec), verbose=1,
        failure_config=tune.FailureConfig(max_failures=q.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks,
    )
    return param_space, tune_config, run_config


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


def _slots(spec: Spec) -> int:
    """How many trials the connected cluster can run at once."""
    import ray

    q, total = spec.search, ray.cluster_resources()
    slots = int(total.get("CPU", 1) // q.cpus_per_trial)
    if q.gpus_per_trial:
        slots = min(slots, int(total.get("GPU", 0) // q.gpus_per_trial))
    return max(1, min(slots, q.max_concurrent_trials or slots))


def _run(spec: Spec, exp_dir: Path, uri: str, restore: bool) -> SearchResult:
    for k, v in TUNE_ENV.items():
        os.environ.setdefault(k, v)
    # with a searcher Tune keeps one trial pending at a time, so trials start one worker start-up
    # after another; let as many wait as can run at once (more would be sampled blind)
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(_slots(spec))
    from ray import tune

    from trainables import data
    from trainables.trainable import LATENCY_CACHE, LatencyCache

    # on the head node: a lost worker node must not take the search's latency table with it
    cache = LatencyCache.options(name=LATENCY_CACHE, get_if_exists=True,  # noqa: F841 (lives with us)
                                 resources={"node:__internal_head__": 0.001}).remote()
    splits = data.load(spec.data)  # read once: the trials get it through the object store, and
    trainable = _trainable(spec, splits)  # registering the front calibrates INT8 models on it
    if restore:  # the tracking callback comes back with the experiment and reconnects
        tracking.MlflowTracking.latest = None
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
        tracker = tracking.MlflowTracking.latest  # None under Ray Client: restored on the cluster
        if tracker is None and uri:
            tracker = tracking.MlflowTracking(uri, spec.to_dict(), exp_dir)  # finds the runs by tag
    else:
        tracker = tracking.MlflowTracking(uri, spec.to_dict(), exp_dir)
        param_space, tune_config, run_config = _tuner_parts(spec, exp_dir, [tracker])
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    res = _collect(spec, exp_dir, results)
    if tracker is not None:
        tracker.finish(res, spec, results, splits)
    del cache
    return res


def search(spec: Spec, address: str | None = None, tracking_uri: str | None = None) -> SearchResult:
    """Run a new search; its directory is ``storage_path/<name>-<time>``."""
    if address or os.environ.get("RAY_ADDRESS"):
        _check_reachable(address or os.environ["RAY_ADDRESS"])  # before anything is created
    uri = runs.tracking_uri(tracking_uri)
    runs.check_reachable(uri)  # before any training starts
    connect(address)
    check_storage(spec.search.storage_path)
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
    connect(address)
    check_storage(str(exp_dir.parent))
    print(f"resuming search {spec.name} from {exp_dir}", flush=True)
    return _run(spec, exp_dir, uri, restore=True), spec
