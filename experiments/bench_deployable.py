"""Deployable compressed models from one trained checkpoint: no-retrain against fine-tuned,
with and without distillation, INT8 by calibration (PTQ) or quantization-aware fine-tuning (QAT),
measured in PyTorch eager and in ONNX Runtime (``--runtimes torch,onnxruntime``; QAT is torch-only).

Every configuration is one ``run_sweep`` over the same points; with fine-tuning, the dense point
gets the same epochs (equal compute), and the gap is measured against that fine-tuned dense
fp32 point of the same configuration and runtime. Latency: CPU batch 1, ``--threads`` threads,
median of ``--runs``; ``speedup``: against the dense fp32 model in PyTorch eager (the origin
report's baseline); ``speedup_same_runtime``: against the dense fp32 model in the row's runtime.

    python experiments/bench_deployable.py CKPT [--methods channel_l1] [--ratios 0,0.3,0.5] [--epochs 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd
import torch

from trainables import data
from trainables.sweep import run_sweep
from trainables.train import pick_device
from tuning.models import dense_from_checkpoint

CONFIGS = {  # name -> SweepConfig changes
    "no-retrain": {"finetune_epochs": 0},
    "ft": {"distill": False},
    "ft+kd": {"distill": True},
    "ft+kd+qat": {"distill": True, "int8_mode": "qat"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--methods", default="channel_l1")
    ap.add_argument("--ratios", default="0,0.3,0.5")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    ap.add_argument("--finetune-lr", type=float, default=None)
    ap.add_argument("--distill-weight", type=float, default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--runtimes", default="torch")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", help="write the merged table here")
    args = ap.parse_args()

    model, spec = dense_from_checkpoint(args.checkpoint)
    device = pick_device("auto")
    splits = data.load(spec.data).to(device)
    base = dataclasses.replace(
        spec.sweep, methods=args.methods.split(","), ratios=[float(r) for r in args.ratios.split(",")], int8=True,
        finetune_epochs=args.epochs, latency_runs=args.runs, latency_threads=args.threads, eval_size=0)
    for key in ("finetune_lr", "distill_weight"):
        if getattr(args, key) is not None:
            base = dataclasses.replace(base, **{key: getattr(args, key)})
    print(f"{args.checkpoint}: {spec.data.dataset} val {len(splits.val)} / test {len(splits.test)}, device {device}, "
          f"fine-tune {args.epochs} epochs at lr {base.finetune_lr}, distill weight {base.distill_weight} "
          f"T {base.distill_temperature}, round_to {base.round_to}", flush=True)
    cache: dict = {}
    tables = []
    for runtime in args.runtimes.split(","):
        for name in args.configs.split(","):
            if runtime != "torch" and CONFIGS[name].get("int8_mode") == "qat":
                continue
            t0 = time.perf_counter()
            cfg = dataclasses.replace(base, runtime=runtime, **CONFIGS[name])
            df = run_sweep(model.to(device), splits, cfg, spec.train, latency_cache=cache, progress=False)
            df.insert(0, "config", name)
            tables.append(df)
            print(f"{runtime} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = pd.concat(tables, ignore_index=True)
    dense = table[(table.ratio == 0) & ~table.int8]
    eager_ms = dense[(dense.runtime == "torch")].latency_ms.iloc[0] if (dense.runtime == "torch").any() else float("nan")
    table["speedup"] = eager_ms / table.latency_ms
    table["speedup_same_runtime"] = table.latency_speedup
    ref = dense.set_index(["runtime", "config"]).test_accuracy
    table["gap_points"] = 100 * (table.test_accuracy - pd.Series(list(zip(table.runtime, table.config))).map(ref))
    cols = ["runtime", "config", "method", "ratio", "int8", "accuracy", "test_accuracy", "test_accuracy_no_finetune",
            "gap_points", "macs", "size_mb", "latency_ms", "latency_p90_ms", "latency_cv", "speedup",
            "speedup_same_runtime"]
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"latency on {table.cpu.iloc[0]}, {args.threads} thread(s); torch {torch.__version__}")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
