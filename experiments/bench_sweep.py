"""The origin report's Table 1 / Table 2 analogue, plus the methods that really cut latency.

Takes a checkpoint written by ``prunetune train`` (e.g. on the real CIFAR-10 subset):

1. global_l1 (the report's method, no retraining) at ratios 0.00-0.80 step 0.05: validation
   and test accuracy, and CPU batch-1 latency **measured separately at every ratio** (no
   cache), to show what masks do to speed on real hardware;
2. through :func:`trainables.sweep.run_sweep`: dense, channel_l1 and global_l1 at 0.5, each
   with and without INT8, channel_l1 fine-tuned (mask fixed) -- speedup over dense and accuracy.

    prunetune train experiments/cifar10_subset.toml --set train.epochs=8 --json
    python experiments/bench_sweep.py runs/cifar10_subset/<time>/checkpoint.pt
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from trainables import compress, data, measure
from trainables.sweep import SweepConfig, run_sweep
from trainables.checkpoint import load_checkpoint, model_from_checkpoint
from trainables.train import evaluate
from tuning.spec import from_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency figure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    spec = from_dict(ckpt["meta"]["spec"])
    splits = data.load(spec.data)
    model = model_from_checkpoint(ckpt).eval()
    print(f"checkpoint {args.checkpoint}: {spec.data.dataset} {spec.data.path or spec.data.root}, "
          f"{ckpt['epoch']} epochs at lr {spec.train.lr}; val {len(splits.val)}, test {len(splits.test)} images")
    print(f"latency: CPU batch 1, {args.threads} thread(s), median of {args.runs} runs, "
          f"{measure.cpu_latency(model, runs=1, warmup=0)['cpu']}\n")

    rows = []
    t0 = time.perf_counter()
    for i in range(17):
        ratio = round(0.05 * i, 2)
        pruned = compress.make_permanent(compress.prune(model, "global_l1", ratio))
        lat = measure.cpu_latency(pruned, threads=args.threads, runs=args.runs, warmup=10)
        rows.append({
            "ratio": ratio, "val_accuracy": evaluate(pruned, splits.val), "test_accuracy": evaluate(pruned, splits.test),
            "sparsity": measure.sparsity(pruned), "latency_ms": lat["latency_ms"], "latency_p90_ms": lat["latency_p90_ms"],
            "latency_cv": lat["latency_cv"],
        })
        print(f"  global_l1 {ratio:.2f}: test {rows[-1]['test_accuracy']:.4f}, {lat['latency_ms']:.2f} ms", flush=True)
    t1 = pd.DataFrame(rows)
    t1["latency_vs_dense"] = t1.latency_ms / t1.latency_ms.iloc[0]
    print("\nTable 1+2 analogue: global_l1 (L1 unstructured, no retraining), latency measured per ratio")
    print(t1.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"latency / dense over all ratios: min {t1.latency_vs_dense.min():.3f}, max {t1.latency_vs_dense.max():.3f}"
          f" ({time.perf_counter() - t0:.0f}s)")

    cfg = SweepConfig(methods=["global_l1", "channel_l1"], ratios=[0.0, 0.5], int8=True,
                      finetune_epochs=args.finetune_epochs, finetune_lr=0.01,
                      latency_threads=args.threads, latency_runs=args.runs)
    df = run_sweep(model, splits, cfg, spec.train)
    df = df[~((df.method == "channel_l1") & (df.ratio == 0.0))]  # same point as global_l1 at 0
    cols = ["method", "ratio", "int8", "accuracy", "test_accuracy", "accuracy_no_finetune",
            "test_accuracy_no_finetune", "size_mb", "macs", "latency_ms", "latency_p90_ms", "latency_speedup"]
    print(f"\nMethods that remove work (fine-tune {args.finetune_epochs} epochs at lr 0.01, mask fixed; "
          "accuracy = validation)")
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
