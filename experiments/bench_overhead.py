"""Ray Tune overhead: the same small training as `prunetune train` (trainables.train.fit) and
as one Tune trial of the search service (train_and_sweep on a local Ray), in one run.

Prints the standalone training time, the Tune trial's training time (Tune's ``time_total_s``
at its last training report, so per-epoch report + checkpoint persistence are included), their
ratio, and the whole search wall time (Ray start, object store, a 1-point sweep).

    python experiments/bench_overhead.py --epochs 2 --train-size 600
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from trainables import data
from trainables.train import fit
import tuning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    spec = tuning.from_dict({
        "name": "overhead",
        "data": {"dataset": "digits", "train_size": args.train_size, "test_size": 100},
        "train": {"epochs": args.epochs, "batch_size": 50, "optimizer": "adam", "lr": 0.002, "threads": args.threads},
        "sweep": {"methods": ["global_l1"], "ratios": [0.0], "latency_runs": 1, "latency_warmup": 0, "eval_size": 10},
        "search": {"sampler": "grid", "grid_lrs": [0.002], "cpus_per_trial": float(args.threads),
                   "storage_path": str(tmp / "ray_results")},
    })
    splits = data.load(spec.data)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fit(splits, spec.train, checkpoint_path=tmp / "standalone.pt")
    standalone = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = tuning.search(spec, tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    wall = time.perf_counter() - t0
    trial_dir = Path(res.trials.trial_dir.iloc[0])
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    tune_train = [r for r in reports if r.get("phase") == "train"][-1]["time_total_s"]
    print(f"\ntraining {args.epochs} epochs x {len(splits.train)} digits images, {args.threads} threads")
    print(f"standalone fit (prunetune train):      {standalone:7.1f} s")
    print(f"Tune trial, training phase:            {tune_train:7.1f} s")
    print(f"ratio Tune / standalone:               {tune_train / standalone:7.3f}")
    print(f"whole search wall time (Ray start, sweep): {wall:7.1f} s")


if __name__ == "__main__":
    main()
