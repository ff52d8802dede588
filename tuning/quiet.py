"""Latency measured quiet: the front's architectures timed again with nothing else running.

A trial times each new architecture while other trials train on the same machine (and shares
the figure through the latency cache), so its latencies are provisional: the quickstart's
dense point had a CV of 0.23. Before the front is final and models are registered, every
architecture on the candidate front (and the dense one, for the speed-ups) is re-derived from
its trial's checkpoint and timed again in one Ray task that reserves every CPU of one node, so
no trial or other task runs beside it: at least ``QUIET_RUNS`` timed runs each after warm-up,
the models interleaved (:func:`trainables.measure.interleaved_latency`, so a drift of the
machine shifts them all alike), on ``[sweep] latency_threads`` threads, in the search's runtime;
an architecture whose CV stays above ``CV_TARGET`` is timed again (up to ``ATTEMPTS`` times, the
steadiest kept). On a node with a GPU the task also holds one GPU and re-times GPU throughput.
The front is then recomputed from these values, which may bring other architectures onto it:
they are timed in the next round. Every point says where its latency came from
(``latency_source``: ``trial`` or ``quiet``).
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from trainables import measure
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from tuning import models, results
from tuning.results import LATENCY_QUIET, SearchResult
from tuning.spec import Spec, from_dict

QUIET_RUNS = 100
CV_TARGET = 0.05
ATTEMPTS = 3
ROUNDS = 5  # interleaving rounds per measurement
TIMEOUT_S = 900  # a node that never frees up leaves the latencies provisional, with a warning
_STATS = ("latency_ms", "latency_p90_ms", "latency_cv", "cpu", "threads")

Job = tuple[str, str, str, float, bool]  # (arch, checkpoint file, method, ratio, int8)


def remeasure(res: SearchResult, spec: Spec, calibration: torch.Tensor, max_rounds: int = 4) -> SearchResult:
    """Time the front's architectures quietly (see the module docstring) and recompute the front."""
    measured: dict[str, dict[str, Any]] = {}
    for _ in range(max_rounds):
        jobs = _jobs(res, measured)
        if not jobs:
            break
        print(f"quiet latency: timing {len(jobs)} architecture(s) of the front on a reserved node "
              f"({max(QUIET_RUNS, spec.sweep.latency_runs)} runs each, {spec.sweep.runtime})", flush=True)
        try:
            found = _time_on_a_quiet_node(jobs, spec, calibration)
        except Exception as e:  # the node never freed up, a worker died: the search keeps its results
            print(f"prunetune: warning: the quiet latency re-measurement failed ({type(e).__name__}: "
                  f"{str(e).strip()[:200]}); the front keeps the trials' provisional latencies "
                  "(latency_source = trial)", flush=True)
            break
        measured.update(found)
        _apply(res.points, measured)
        res = results.refresh(res, spec)
    return res


def _jobs(res: SearchResult, measured: dict[str, dict[str, Any]]) -> list[Job]:
    """One job per architecture on the front (and the dense fp32 one) not yet measured quietly."""
    checkpoints = res.checkpoints()
    wanted = res.front
    dense = res.points[(res.points.ratio == 0.0) & ~res.points.int8.astype(bool) & res.points.accuracy.notna()]
    rows = pd.concat([wanted, dense.iloc[:1]])
    jobs: dict[str, Job] = {}
    for r in rows.itertuples():
        if r.arch not in measured and r.arch not in jobs and r.trial_id in checkpoints:
            jobs[r.arch] = (r.arch, str(checkpoints[r.trial_id]), r.method, float(r.ratio), bool(r.int8))
    return list(jobs.values())


def _apply(points: pd.DataFrame, measured: dict[str, dict[str, Any]]) -> None:
    """Quiet figures into every row of a measured architecture; speed-ups against the quiet dense."""
    quiet = points.arch.isin(measured)
    for key in _STATS + ("throughput_ips",):
        values = points.arch.map(lambda a: measured.get(a, {}).get(key))
        if key == "throughput_ips" and values[quiet].isna().all():
            continue  # no GPU: keep what the trials measured (nothing on a CPU)
        points.loc[quiet, key] = values[quiet]
    points.loc[quiet, "latency_source"] = LATENCY_QUIET
    dense = points[quiet & (points.ratio == 0.0) & ~points.int8.astype(bool)]
    if len(dense):
        points.loc[quiet, "latency_speedup"] = dense.latency_ms.iloc[0] / points.loc[quiet, "latency_ms"]


def _time_on_a_quiet_node(jobs: list[Job], spec: Spec, calibration: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Run :func:`time_quietly` in a task holding every CPU (and a GPU, if any) of the node with the most CPUs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    node = max(nodes, key=lambda n: n["Resources"]["CPU"])
    cpus, gpus = node["Resources"]["CPU"], min(1.0, node["Resources"].get("GPU", 0.0))
    task = ray.remote(time_quietly).options(
        num_cpus=cpus, num_gpus=gpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
    ref = task.remote(spec.to_dict(), jobs, calibration)
    try:
        return ray.get(ref, timeout=TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"node {node['NodeManagerAddress']} did not free all its {cpus:g} CPUs within "
                           f"{TIMEOUT_S} s") from None


def time_quietly(spec_dict: dict[str, Any], jobs: list[Job], calibration: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Derive every job's model from its checkpoint and time them all, interleaved; re-time the
    noisy ones. Returns arch -> latency statistics (and ``throughput_ips`` when a GPU is here)."""
    spec = from_dict(spec_dict, source="the search's spec")
    s = spec.sweep
    dense: dict[str, torch.nn.Module] = {}
    built = {}
    for arch, ckpt, method, ratio, int8 in jobs:
        if ckpt not in dense:
            dense[ckpt] = model_from_checkpoint(load_checkpoint(ckpt)).eval()
        built[arch] = models.runtime_model(dense[ckpt], spec, models.Point("", method, ratio, int8), calibration)
    runs = max(QUIET_RUNS, s.latency_runs)
    kw = dict(threads=s.latency_threads, runs=runs, warmup=max(s.latency_warmup, 10), rounds=ROUNDS)
    stats = measure.interleaved_latency(built, **kw)
    for _ in range(ATTEMPTS - 1):
        noisy = {a: built[a] for a, v in stats.items() if v["latency_cv"] > CV_TARGET}
        if not noisy:
            break
        again = measure.interleaved_latency(noisy, **kw)
        stats.update({a: v for a, v in again.items() if v["latency_cv"] < stats[a]["latency_cv"]})
    for arch, m in built.items():
        stats[arch]["throughput_ips"] = measure.gpu_throughput(m) if isinstance(m, torch.nn.Module) else None
        stats[arch].pop("runs", None)
    return stats


def summary(res: SearchResult) -> str:
    """One line: how many front points have quiet latencies, and their worst CV."""
    if not len(res.front):
        return "quiet latency: no front"
    quiet = res.front[res.front.latency_source == LATENCY_QUIET]
    worst = quiet.latency_cv.max() if len(quiet) else math.nan
    return (f"quiet latency: {len(quiet)} of {len(res.front)} front points re-measured with nothing else running "
            f"(worst CV {worst:.3f}, target {CV_TARGET}) on {quiet.cpu.iloc[0] if len(quiet) else '-'}")
