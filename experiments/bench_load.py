"""Load: one search of many short trials against a real MLflow server, nothing lost (issue 14).

Every trial trains CIFAR-ResNet18 for 1 epoch on 60 digits images, sweeps 2 points (global L1 at
0 and 0.5) and builds 2 (the dense model and its own sampled ratio, as ONNX files;
``[search] finetune_epochs = 0``); Ray gets
``--slots`` *logical* CPUs, so that many trials run at once whatever the machine. The driver
(Tune, the Optuna searcher with sweep feedback, the MLflow mirror, retention) runs in this
process against an ``mlflow server`` process with basic authentication (SQLite backend).

Checks (an AssertionError names what is missing): every trial ``done`` in ``trials.csv``;
exactly one FINISHED child run per trial under one parent run; the Optuna study holds every
trained trial plus one completed trial per other built point; after the search only the front's
trials keep a checkpoint, and no trial left its scratch checkpoint in the temp directory. Reports: wall time, trials per minute, the driver's CPU time as a share
of wall time (the sampler thread below included: one directory walk every 5 s), its RSS (start,
peak, end), disk (storage at its peak during the search and after retention, MLflow artifacts
and database).

    python experiments/bench_load.py [--trials 100] [--slots 8] [--workdir DIR]

``tests/test_load.py`` runs the same with 6 trials, all at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]


def spec_dict(trials: int, storage: Path) -> dict:
    return {
        "name": "load",
        "data": {"dataset": "digits", "train_size": 60, "test_size": 30, "val_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 15, "optimizer": "adam"},
        "sweep": {"methods": ["global_l1"], "ratios": [0.0, 0.5], "latency_runs": 3, "latency_warmup": 1,
                  "eval_size": 20},
        "search": {"num_samples": trials, "lr_min": 5e-4, "lr_max": 5e-3, "finetune_epochs": 0,
                   "cpus_per_trial": 1.0, "register_models": 0, "storage_path": str(storage)},
    }


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class _Sampler(threading.Thread):
    """Every ``period`` seconds: the storage directory's size (the peak is what the disk must hold)."""

    def __init__(self, path: Path, period: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.path, self.period, self.peak = path, period, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            try:
                self.peak = max(self.peak, _du(self.path))
            except OSError:  # a file went while it was walked
                pass


def run(trials: int, workdir: Path, uri: str, slots: int):
    """The search, in this process, on a local Ray with ``slots`` logical CPUs; its result and figures."""
    import ray

    import tuning

    rss_start, load_start = _status("VmRSS"), os.getloadavg()[0]
    ray.init(num_cpus=slots, include_dashboard=False, logging_level="ERROR")
    sampler = _Sampler(workdir / "rr")
    sampler.start()
    try:
        cpu0, t0, epoch0 = time.process_time(), time.perf_counter(), time.time()
        res = tuning.search(tuning.from_dict(spec_dict(trials, workdir / "rr")), tracking_uri=uri)
        wall, cpu, epoch1 = time.perf_counter() - t0, time.process_time() - cpu0, time.time()
    finally:
        sampler.done.set()
        ray.shutdown()
    figures = {"trials": trials, "slots": slots, "wall_s": wall, "trials_per_min": trials / wall * 60,
               "first_trial_running_s": res.trials.trial_start.min() - epoch0,
               "after_last_trial_s": epoch1 - res.trials.trial_end.max(),  # tables, MLflow, retention
               "driver_cpu_s": cpu, "driver_share": cpu / wall, "rss_start_mb": rss_start / 1e6,
               "rss_peak_mb": _status("VmHWM") / 1e6, "rss_end_mb": _status("VmRSS") / 1e6,
               "storage_peak_mb": sampler.peak / 1e6, "storage_mb": _du(res.path) / 1e6,
               "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]}
    return res, figures


def _scratch_left(storage: Path) -> list[Path]:
    """The trials' scratch checkpoint directories (``prunetune-trial-*`` in the temp dir) still
    there from a search whose ``storage_path`` is ``storage`` (other searches' are left out)."""
    import torch

    left = []
    for d in Path(tempfile.gettempdir()).glob("prunetune-trial-*"):
        try:
            meta = torch.load(d / "checkpoint.pt", mmap=True, weights_only=False, map_location="cpu")["meta"]
        except Exception:  # empty, being written, not ours
            continue
        if Path(meta["spec"]["search"]["storage_path"]) == storage:
            left.append(d)
    return left


def check(res, uri: str, trials: int) -> dict:
    """Nothing lost: trials, MLflow runs, the Optuna study, the kept checkpoints."""
    from mlflow import MlflowClient

    t = res.trials
    assert len(t) == trials and t.trial_id.is_unique and (t.status == "done").all(), t.status.value_counts()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id], max_results=10_000)
    parents = [r for r in runs if r.data.tags.get("prunetune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
    ids = [r.data.tags["prunetune.trial_id"] for r in children]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    assert sorted(ids) == sorted(t.trial_id), f"{len(ids)} child runs for {trials} trials"  # exactly one each
    assert all(r.info.status == "FINISHED" and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
               for r in children)
    study = optuna.load_study(study_name="load", storage=f"sqlite:///{res.path / 'optuna.db'}").get_trials(
        deepcopy=False)
    trained = [s for s in study if s.user_attrs.get("source") != "sweep"]
    assert len(trained) == trials and all(s.state == optuna.trial.TrialState.COMPLETE for s in trained)
    # every trial: the curve (2 points) and its built points (dense and its own): every built point is evidence
    built = res.points.artifact.notna().sum()
    assert len(res.points) == 4 * trials and len(study) == built == 2 * trials, (len(study), built, len(res.points))
    leaked = _scratch_left(res.path.parent)
    assert not leaked, f"{len(leaked)} trial scratch directories left in {tempfile.gettempdir()}: {leaked[:3]}"
    kept = {d.parent.name for d in res.path.glob("*/checkpoint_*")}
    front_dirs = t.set_index("trial_id").loc[sorted(set(res.front.rows.trial_id)), "trial_dir"]
    on_front = {Path(d).name for d in front_dirs}
    assert kept == on_front, (kept, on_front)
    return {"child_runs": len(children), "study_trials": len(study), "front_trials": len(on_front),
            "checkpoints_kept": len(kept)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--workdir", type=Path, help="default: a new temporary directory (kept)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from servers import MlflowServer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(workdir, auth=True).start()
    os.environ.update(server.credentials)
    try:
        res, figures = run(args.trials, workdir, server.url, args.slots)
        figures.update(check(res, server.url, args.trials))
    finally:
        server.stop()
    figures["mlflow_artifacts_mb"] = _du(workdir / "artifacts") / 1e6
    figures["mlflow_db_mb"] = sum(f.stat().st_size for f in workdir.glob("*.db")) / 1e6  # tracking + users
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\nload: {args.trials} trials, {args.slots} slots, {os.cpu_count()} cores ({cpu}), workdir {workdir}")
    for k, v in figures.items():
        print(f"  {k:24s} {v:.3f}" if isinstance(v, float) else f"  {k:24s} {v}")


if __name__ == "__main__":
    main()
