"""Where one search trial's time goes, outside Ray: training, the no-retrain curve, the deployable points.

Runs a trial's three phases as a search runs them (the experiment file's ``[train]``, its
``[sweep]`` curve, then the own point at ``--ratio`` and its dense twin fine-tuned
``[search] finetune_epochs`` and built as ONNX Runtime classifiers, fp32 and INT8) on
``--threads`` threads (a search gives a trial ``cpus_per_trial``), and prints each phase's
seconds and, with ``--profile``, the functions that took the most of the deployable phase.

    python experiments/bench_trial.py experiments/quickstart.toml [--ratio 0.4] [--lr 0.002] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import time

import torch

from trainables import data, measure
from trainables.sweep import run_sweep
from trainables.train import fit
from tuning import space
from tuning import spec as spec_mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--lr", type=float, default=None, help="default: the file's [train] lr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = spec_mod.load(args.experiment)
    print(f"CPU {measure.cpu_name()} [{measure.cpu_flags()}]; {args.experiment}; {args.threads} thread(s)")
    start = time.perf_counter()
    splits = data.load(spec.data)
    train = dataclasses.replace(spec.train, lr=args.lr or spec.train.lr, threads=args.threads)
    print(f"data        {time.perf_counter() - start:6.1f} s")

    start = time.perf_counter()
    trained = fit(splits, train)
    print(f"training    {time.perf_counter() - start:6.1f} s  ({train.epochs} epochs, val {trained.val_accuracy:.3f})")

    start = time.perf_counter()
    curve = run_sweep(trained.model, splits, dataclasses.replace(spec.sweep, int8=False), train, progress=False)
    print(f"curve       {time.perf_counter() - start:6.1f} s  ({len(curve)} points)")

    own = dataclasses.replace(spec.sweep, methods=[space.own_methods(spec)[0]], ratios=[0.0, args.ratio],
                              finetune_epochs=spec.search.finetune_epochs, runtime="onnxruntime")
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profile:
        profile.enable()
    points = run_sweep(trained.model, splits, own, train, progress=False, artifacts_out={})
    if profile:
        profile.disable()
    print(f"deployable  {time.perf_counter() - start:6.1f} s  ({len(points)} points, {own.finetune_epochs} "
          f"fine-tuning epochs each for the own point and its dense twin)")
    print(points[["method", "ratio", "int8", "accuracy", "accuracy_no_finetune", "test_accuracy", "latency_ms"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
