"""Latency measured quiet, where it runs: the candidates' artifacts timed again with nothing else running.

A trial times each new architecture while other trials train on the same machine (and shares
the figure through the latency cache), so its latencies are provisional: the quickstart's
dense point had a CV of 0.23. Before the front is final and models are registered, the
artifacts of every point that may enter the front (one per architecture, above the floor, and the
dense one, for the speed-ups) are timed again in one Ray task that reserves every CPU of one node, so no trial or other task
runs beside it: at least ``QUIET_RUNS`` timed runs each after warm-up, interleaved
(:func:`trainables.measure.interleaved_latency`: a drift of the machine shifts them all alike),
on ``[sweep] latency_threads`` threads; an architecture whose CV stays above ``CV_TARGET`` is
timed again (up to ``ATTEMPTS`` times, the steadiest kept). The same task runs every artifact
on the front over the held-out test images and records what it gave there
(``target_test_accuracy``, ``target_labels_match``): INT8 accuracy, too, depends on the CPU.

The node is the one with the most CPUs, or with ``[search] latency_target`` (a Ray custom
resource, ``ray start --resources '{"NAME": 1}'``) the one that stands for the hardware you
deploy on. What the task measured is kept in the search directory (``quiet.json``): a second
end phase (``prunetune resume`` of a finished search, a crash inside it) reuses it and times
only what it lacks and can still read. The front is recomputed from these values; its artifacts
not checked yet are checked in the next round. Every point says where its latency came from
(``latency_source``: ``trial`` or ``quiet``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from trainables import data, measure, ort
from trainables.sweep import is_dense
from tuning import cluster
from tuning.results import LATENCY_QUIET
from tuning.spec import Spec

QUIET_RUNS = 100
CV_TARGET = 0.05
ATTEMPTS = 3
ROUNDS = 5  # interleaving rounds per measurement
TIMEOUT_S = 900  # a node that never frees up leaves the latencies provisional, with a warning
QUIET_FILE = "quiet.json"
_STATS = ("latency_ms", "latency_p90_ms", "latency_cv", "cpu", "cpu_flags", "threads", "latency_node_id")

Job = tuple[str, str, str]  # (what: "arch" or "check", its key, the artifact file)
FrontOf = Callable[[pd.DataFrame], Any]  # points -> their front (tuning.front.Front.with_points: its .rows)


def remeasure(points: pd.DataFrame, shippable: pd.Index, front_of: FrontOf, exp_dir: Path,
              checkpoints: dict[str, Path], spec: Spec, test: data.Split, max_rounds: int = 4) -> pd.DataFrame:
    """``points`` with the quiet figures of every ``shippable`` row's architecture and the target's
    check of every artifact on the front (see the module docstring). ``front_of`` gives the front
    of points (it moves as latencies are re-measured); ``checkpoints``: trial id -> its dense
    checkpoint, whose directory holds the trial's artifacts."""
    store = _load(exp_dir)
    if store["latency"]:  # an earlier end phase measured some: its figures first
        points = _apply(points, store)
    for _ in range(max_rounds):
        jobs = _jobs(points, shippable, front_of(points).rows.index, checkpoints, store)
        if not jobs:
            break
        print(f"quiet latency: timing {sum(j[0] == 'arch' for j in jobs)} architecture(s) of the front and checking "
              f"{sum(j[0] == 'check' for j in jobs)} artifact(s) on a reserved node "
              f"({max(QUIET_RUNS, spec.sweep.latency_runs)} runs each, ONNX Runtime)", flush=True)
        try:
            found = _on_a_quiet_node(jobs, spec, test)
        except Exception as e:  # the node never freed up, a worker died: the search keeps its results
            print(f"prunetune: warning: the quiet latency re-measurement failed ({type(e).__name__}: "
                  f"{str(e).strip()[:200]}); the front keeps the trials' provisional latencies "
                  "(latency_source = trial)", flush=True)
            break
        for part in ("latency", "checks"):
            store[part].update(found[part])
        (exp_dir / QUIET_FILE).write_text(json.dumps(store, indent=1))
        points = _apply(points, store)
    return points


def _load(exp_dir: Path) -> dict[str, dict[str, Any]]:
    f = exp_dir / QUIET_FILE
    return json.loads(f.read_text()) if f.is_file() else {"latency": {}, "checks": {}}


def _artifact(checkpoints: dict[str, Path], row: Any) -> Path | None:
    """The artifact file of a row, if its trial's checkpoint directory still holds it."""
    ckpt = checkpoints.get(row.trial_id)
    path = ckpt.parent / row.artifact if ckpt is not None and isinstance(row.artifact, str) else None
    return path if path is not None and path.is_file() else None


def _jobs(points: pd.DataFrame, shippable: pd.Index, front: pd.Index, checkpoints: dict[str, Path],
          store: dict[str, dict[str, Any]]) -> list[Job]:
    """Each architecture of a point that may enter the front (every shippable point above the floor:
    a provisional latency timed beside training can keep a point off the front it belongs on) and
    the dense fp32 one, not yet timed, and each artifact on the front not yet checked, whose file
    still exists."""
    dense = points[is_dense(points) & points.artifact.notna()]
    jobs: dict[tuple[str, str], Job] = {}
    for r in pd.concat([points.loc[shippable], dense.iloc[:1]]).itertuples():  # the front among them
        path = _artifact(checkpoints, r)
        if path is None:
            continue
        if r.arch not in store["latency"]:
            jobs.setdefault(("arch", r.arch), ("arch", r.arch, str(path)))
        key = _check_key(r)
        if key not in store["checks"] and r.Index in front:
            jobs.setdefault(("check", key), ("check", key, str(path)))
    return list(jobs.values())


def _check_key(row: Any) -> str:
    return f"{row.trial_id}/{row.artifact}"


def _apply(points: pd.DataFrame, store: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Quiet figures into every row of a measured architecture (speed-ups against the quiet dense),
    the target's check into every checked artifact's row."""
    points, measured = points.copy(), store["latency"]
    quiet = points.arch.isin(measured)
    for key in _STATS:
        points.loc[quiet, key] = points.arch.map(lambda a: measured.get(a, {}).get(key))[quiet]
    points.loc[quiet, "latency_source"] = LATENCY_QUIET
    dense = points[quiet & is_dense(points)]
    if len(dense):
        points.loc[quiet, "latency_speedup"] = dense.latency_ms.iloc[0] / points.loc[quiet, "latency_ms"]
    checks = {i: store["checks"][k] for i, k in ((r.Index, _check_key(r)) for r in points.itertuples())
              if k in store["checks"]}
    for i, c in checks.items():
        points.loc[i, "target_test_accuracy"] = c["test_accuracy"]
        points.loc[i, "target_labels_match"] = c["labels"] == points.loc[i, "test_labels_sha256"]
    return points


def _on_a_quiet_node(jobs: list[Job], spec: Spec, test: data.Split) -> dict[str, dict[str, Any]]:
    """Run :func:`time_quietly` in a task holding every CPU of the target node (the one with the
    most CPUs, or with ``[search] latency_target``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = max(cluster.target_nodes(spec.search.latency_target), key=lambda n: n["Resources"]["CPU"])
    cpus = node["Resources"]["CPU"]
    task = ray.remote(time_quietly).options(
        num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
    s = spec.sweep
    files = {path: Path(path).read_bytes() for _, _, path in jobs}  # read here: the node may not see this disk
    ref = task.remote(jobs, files, s.latency_threads, max(QUIET_RUNS, s.latency_runs), max(s.latency_warmup, 10), test)
    try:
        return ray.get(ref, timeout=TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"node {node['NodeManagerAddress']} did not free all its {cpus:g} CPUs within "
                           f"{TIMEOUT_S} s") from None


def time_quietly(jobs: list[Job], files: dict[str, bytes], threads: int, runs: int, warmup: int,
                 test: data.Split) -> dict[str, dict[str, Any]]:
    """Load every job's artifact (``files``: their bytes, read by the driver), time one per
    architecture (all interleaved; the noisy ones again) and run the checked ones over ``test``. Returns ``{"latency": arch -> statistics, "checks":
    key -> {"test_accuracy", "labels"}}``."""
    import ray

    loaded = {path: ort.OrtModel(files[path], threads, Path(path).name) for _, _, path in jobs}
    timed = {key: loaded[path] for what, key, path in jobs if what == "arch"}
    kw = dict(threads=threads, runs=runs, warmup=warmup, rounds=ROUNDS)
    stats = measure.interleaved_latency(timed, **kw) if timed else {}
    for _ in range(ATTEMPTS - 1):
        noisy = {a: timed[a] for a, v in stats.items() if v["latency_cv"] > CV_TARGET}
        if not noisy:
            break
        again = measure.interleaved_latency(noisy, **kw)
        stats.update({a: v for a, v in again.items() if v["latency_cv"] < stats[a]["latency_cv"]})
    node = ray.get_runtime_context().get_node_id()
    for v in stats.values():
        v.pop("runs", None)
        v["latency_node_id"] = node
    checks = {}
    for what, key, path in jobs:
        if what == "check":
            accuracy, labels = loaded[path].evaluate(test)
            checks[key] = {"test_accuracy": accuracy, "labels": ort.labels_digest(labels), "node_id": node}
    return {"latency": stats, "checks": checks}


def summary(front: pd.DataFrame) -> str:
    """How many ``front`` rows have quiet latencies (their worst CV, the CPU), and any artifact whose
    accuracy on the target differs from the trial's by more than a point."""
    if not len(front):
        return "quiet latency: no front"
    quiet = front[front.latency_source == LATENCY_QUIET]
    worst = quiet.latency_cv.max() if len(quiet) else math.nan
    where = f"{quiet.cpu.iloc[0]} [{quiet.cpu_flags.iloc[0]}]" if len(quiet) else "-"
    lines = [f"quiet latency: {len(quiet)} of {len(front)} front points re-measured with nothing else running "
             f"(worst CV {worst:.3f}, target {CV_TARGET}) on {where}"]
    if "target_test_accuracy" in front:
        off = front[(front.test_accuracy - front.target_test_accuracy).abs() > 0.01]
        for r in off.itertuples():
            lines.append(f"prunetune: warning: {r.method} ratio {r.ratio:g}{' int8' if r.int8 else ''} of trial "
                         f"{r.trial_id} scores {r.target_test_accuracy:.4f} on the latency target, "
                         f"{r.test_accuracy:.4f} where its trial measured it")
    return "\n".join(lines)
