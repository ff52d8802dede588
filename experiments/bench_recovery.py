"""Recovering channel-pruned points at equal compute: no-retrain, adaptive BN, fine-tuning, distillation, gradual pruning.

For a trained checkpoint and channel_l1 ratios, every point is derived five ways and measured as
it ships (the ONNX classifier in ONNX Runtime, fp32 and INT8): no retraining; BatchNorm
statistics re-estimated on ``--bn-images`` training images ("adaptive BN"); then ``--epochs`` of
fine-tuning on the labels; of fine-tuning with distillation from the dense model given the
same epochs (the teacher, and the equal-compute reference every drop is measured against); and
of gradual pruning: the same epochs, the ratio reached in one step per epoch on the cubic
schedule of Zhu and Gupta ("To prune, or not to prune", 2017), each step followed by an epoch
of training on the labels. The dense fp32 model is timed in eager PyTorch too (the origin
report's baseline). Prints test accuracy, batch-1 latency (interleaved, one thread) and the
speed-ups against dense fp32 in eager PyTorch and in ONNX Runtime, and how well the cheap curves
(no-retrain, adaptive BN) rank the ratios as fine-tuning does (Spearman's rho).

    python experiments/bench_recovery.py CKPT [--ratios 0.1,0.2,0.3,0.5] [--epochs 3] [--runs 200]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

import pandas as pd
import torch
import torch_pruning as tp
from scipy.stats import spearmanr
from torch import nn

from trainables import compress, data, measure, ort
from trainables.data import Split
from trainables.finetune import distillation_loss, finetune
from trainables.train import TrainConfig, make_optimizer, plain_layout, train_one_epoch
from tuning.models import calibration_images, dense_from_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--bn-images", type=int, default=512)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="training threads (latency is timed on one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dense, spec = dense_from_checkpoint(args.checkpoint)
    splits = data.load(spec.data)
    calibration = calibration_images(spec, splits)
    bn_images = splits.train.normalized(args.bn_images)
    train_cfg = dataclasses.replace(spec.train, threads=args.threads)
    teacher = finetune(dense, splits.train, train_cfg, args.epochs, args.lr)  # the equal-compute dense model
    kd = distillation_loss(teacher.eval(), spec.sweep, train_cfg.label_smoothing)
    rows, shipped = [], {}

    def ship(name: str, ratio: float, model: torch.nn.Module) -> None:
        fp32, int8 = ort.build(compress.make_permanent(model).eval(), splits.classes,
                               splits.stats, calibration=calibration)
        for m, q in ((fp32, False), (int8, True)):
            shipped[(name, ratio, q)] = m
            rows.append({"recipe": name, "ratio": ratio, "int8": q, "val_accuracy": m.evaluate(splits.val)[0],
                         "test_accuracy": m.evaluate(splits.test)[0]})
        print(f"{time.perf_counter() - start:7.0f} s  {name} at {ratio:g}: val {rows[-2]['val_accuracy']:.3f} fp32, "
              f"{rows[-1]['val_accuracy']:.3f} INT8", flush=True)

    ship("dense (+epochs)", 0.0, teacher)
    for ratio in (float(r) for r in args.ratios.split(",")):
        pruned = compress.prune(dense, "channel_l1", ratio, round_to=spec.sweep.round_to)
        recalibrated = compress.recalibrate_bn(pruned, bn_images)
        ship("no-retrain", ratio, pruned)
        ship("adaptive BN", ratio, recalibrated)
        ship("fine-tune", ratio, finetune(recalibrated, splits.train, train_cfg, args.epochs, args.lr))
        ship("fine-tune + KD", ratio, finetune(recalibrated, splits.train, train_cfg, args.epochs, args.lr, kd))
        stepped = gradual(dense, ratio, splits.train, train_cfg, args.epochs, args.lr, spec.sweep.round_to)
        assert compress.architecture_signature(stepped) == compress.architecture_signature(pruned)  # timed as one
        ship("gradual", ratio, stepped)
    timed = {k: m for k, m in shipped.items() if k[0] in ("dense (+epochs)", "fine-tune")}  # one per architecture
    timed["eager"] = compress.make_permanent(teacher).eval()
    stats = measure.interleaved_latency(timed, threads=1, runs=args.runs, warmup=20, rounds=5)
    table = pd.DataFrame(rows)
    arch = {(r, q): stats[k]["latency_ms"] for k in timed if k != "eager" for (_, r, q) in [k]}
    table["latency_ms"] = [arch[(r, q)] for r, q in zip(table.ratio, table.int8)]
    table["x_vs_torch_fp32"] = stats["eager"]["latency_ms"] / table.latency_ms
    table["x_vs_ort_fp32"] = arch[(0.0, False)] / table.latency_ms
    reference = table[(table.recipe == "dense (+epochs)") & ~table.int8].test_accuracy.iloc[0]
    table["drop_points"] = 100 * (reference - table.test_accuracy)
    print(f"CPU {measure.cpu_name()} [{measure.cpu_flags()}]; {args.checkpoint}; {len(splits.test)} test images; "
          f"{args.epochs} epochs at lr {args.lr} for every trained row (dense included); ORT INT8 {ort.INT8_SCHEME}; "
          f"eager torch dense fp32 {stats['eager']['latency_ms']:.3f} ms")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    tuned = table[(table.recipe == "fine-tune") & ~table.int8].set_index("ratio").val_accuracy
    for cheap in ("no-retrain", "adaptive BN"):
        curve = table[(table.recipe == cheap) & ~table.int8].set_index("ratio").val_accuracy
        print(f"Spearman rho of {cheap} vs fine-tuned validation accuracy over the ratios: "
              f"{spearmanr(curve.loc[tuned.index], tuned).statistic:.2f}")


def gradual(dense: nn.Module, ratio: float, split: Split, cfg: TrainConfig, epochs: int, lr: float,
            round_to: int) -> nn.Module:
    """``ratio`` of dense's channels removed in ``epochs`` steps on the cubic schedule, an epoch
    of training after each, on one cosine lr curve over all epochs (as ``finetune``'s).

    torch-pruning's iterative pruner counts every step's channels from the dense layer, so the
    last step lands on the one-shot architecture. The optimizer is rebuilt after each step (the
    parameters changed shape), so momentum restarts there.
    """
    model = compress.clone(dense).to(memory_format=torch.contiguous_format).eval()
    cubic = lambda final, steps: [final * (1 - (1 - i / steps) ** 3) for i in range(steps + 1)]  # noqa: E731
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *split.x.shape[1:]), importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, iterative_steps=epochs, iterative_pruning_ratio_scheduler=cubic,
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)][-1:],
        round_to=round_to if round_to > 1 else None,
    )
    ft = dataclasses.replace(cfg, epochs=epochs, lr=lr, schedule="cosine", optimizer="sgd")
    steps = max(1, len(split) // ft.batch_size)
    total = epochs * steps
    for epoch in range(1, epochs + 1):
        model.eval()
        pruner.step()
        opt = make_optimizer(model, ft)
        done = (epoch - 1) * steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, d=done: 0.5 * (1 + math.cos(math.pi * min(s + d, total) / total)))
        train_one_epoch(model, split, opt, sched, ft, 10_000 + epoch)
    return plain_layout(model).eval()


if __name__ == "__main__":
    main()
