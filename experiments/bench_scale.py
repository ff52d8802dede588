"""Concurrency and Tune's per-trial scheduling overhead with K logical GPUs and fractional GPU
requests.

Each trial is a function trainable that reports ``epochs`` times, sleeping ``epoch_s`` before
each report (no compute: what is measured is Ray Tune, not training). Ray gets K logical GPUs
and enough logical CPUs that GPUs are the only limit, so ``slots = K / gpu_per_trial`` trials
should run at once. From each trial's own start/end timestamps:

- max / mean concurrency (mean = summed trial time / makespan);
- overhead per trial = (makespan - ideal) / trials x slots, where ideal = waves x trial time:
  the scheduling + worker start-up cost each trial adds to its slot;
- first start: seconds from ``Tuner.fit()`` to the first trial running.

    python experiments/bench_scale.py [--gpus 2] [--fractions 1,0.5,0.25] [--trials 16]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then really prints nothing per trial

import ray  # noqa: E402
from ray import tune  # noqa: E402


def trial(config: dict) -> None:
    start = time.time()
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_s"])
        tune.report({"epoch": epoch, "trial_start": start, "trial_end": time.time(),
                     "gpu_ids": ",".join(map(str, ray.get_gpu_ids()))})


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def run(gpus: int, fraction: float, trials: int, epochs: int, epoch_s: float, storage: str) -> dict:
    slots = int(round(gpus / fraction))
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(slots)  # as prunetune's search sets it
    ray.init(num_cpus=4 * slots, num_gpus=gpus, include_dashboard=False, logging_level="ERROR")
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1, "gpu": fraction}),
            param_space={"epochs": epochs, "epoch_s": epoch_s},
            tune_config=tune.TuneConfig(num_samples=trials),
            run_config=tune.RunConfig(storage_path=storage, name=f"scale-{gpus}-{fraction}", verbose=0),
        )
        t0 = time.time()
        results = tuner.fit()
        wall = time.time() - t0
    finally:
        ray.shutdown()
    intervals = [(r.metrics["trial_start"], r.metrics["trial_end"]) for r in results if not r.error]
    busy = sum(e - s for s, e in intervals)
    makespan = max(e for _, e in intervals) - min(s for s, _ in intervals)
    trial_s = epochs * epoch_s
    ideal = math.ceil(trials / slots) * trial_s
    return {
        "gpus": gpus, "gpu_per_trial": fraction, "slots": slots, "trials": len(intervals),
        "trial_s": trial_s, "wall_s": wall, "ideal_s": ideal, "makespan_s": makespan,
        "max_conc": max_concurrency(intervals), "mean_conc": busy / makespan,
        "overhead_per_trial_s": (wall - ideal) / trials * slots,
        "first_start_s": min(s for s, _ in intervals) - t0,
        "gpu_ids_seen": len({r.metrics["gpu_ids"] for r in results if not r.error}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="logical GPUs given to Ray")
    p.add_argument("--fractions", default="1,0.5,0.25", help="GPU per trial, comma list")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epoch-s", type=float, default=2.0)
    p.add_argument("--storage", default="/tmp/prunetune-bench-scale")
    a = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, ray {ray.__version__}; "
          f"{a.trials} trials x {a.epochs} reports x {a.epoch_s} s sleep", flush=True)
    rows = [run(a.gpus, float(f), a.trials, a.epochs, a.epoch_s, a.storage) for f in a.fractions.split(",")]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    print(f"median overhead per trial: {statistics.median(r['overhead_per_trial_s'] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
