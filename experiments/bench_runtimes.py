"""CPU batch-1 latency of compressed models in PyTorch eager and in ONNX Runtime, fp32 and INT8.

For each channel_l1 ratio, the model derived from a checkpoint (latency depends on the
architecture only, so the dense checkpoint's weights stand in for fine-tuned ones) in four
forms: torch fp32, torch INT8 (FX, x86), ORT fp32, ORT INT8 (static QDQ, per-channel). All of
them are timed together, interleaved (``measure.interleaved_latency``: ``--rounds`` rounds, so
a drift of the machine shifts them alike), on ``--threads`` threads. Speed-ups against the
dense fp32 model in PyTorch eager (the origin report's baseline) and in ONNX Runtime.

    python experiments/bench_runtimes.py CKPT [--ratios 0,0.3,0.5] [--runs 300] [--rounds 10]
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch

from trainables import compress, measure, ort
from tuning.models import calibration_images, dense_from_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--ratios", default="0,0.3,0.5")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    dense, spec = dense_from_checkpoint(args.checkpoint)
    calibration = calibration_images(spec)
    models = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        fp32 = compress.make_permanent(compress.prune(dense, "channel_l1", ratio, round_to=spec.sweep.round_to)).eval()
        onnx = ort.export(fp32, args.threads, f"channel_l1 {ratio:g}")
        models[(ratio, "torch", False)] = fp32
        models[(ratio, "torch", True)] = compress.quantize_int8(fp32, calibration)
        models[(ratio, "onnxruntime", False)] = onnx
        models[(ratio, "onnxruntime", True)] = ort.quantize(onnx, calibration, f"channel_l1 {ratio:g}")
    stats = measure.interleaved_latency(models, threads=args.threads, runs=args.runs, warmup=20, rounds=args.rounds)
    table = pd.DataFrame([{"ratio": r, "runtime": rt, "int8": q, **{k: v[k] for k in ("latency_ms", "latency_p90_ms",
                          "latency_cv")}} for (r, rt, q), v in stats.items()])
    eager = stats[(0.0, "torch", False)]["latency_ms"]
    ort_dense = stats[(0.0, "onnxruntime", False)]["latency_ms"]
    table["speedup_vs_torch_dense"] = eager / table.latency_ms
    table["speedup_vs_ort_dense"] = ort_dense / table.latency_ms
    print(f"CPU {measure._cpu_name()}, {args.threads} thread(s), {args.runs} runs each in {args.rounds} interleaved "
          f"rounds, torch {torch.__version__}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
