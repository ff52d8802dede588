"""CPU batch-1 latency, test accuracy and build cost of compressed models in PyTorch eager and in ONNX Runtime.

For each channel_l1 ratio, the model derived from a checkpoint in four forms: torch fp32, torch
INT8 (FX, x86: deprecated), the shipped ONNX classifier in fp32 and in ORT INT8 (the scheme a
search ships, ``ort.INT8_SCHEME``). All of them are timed together, interleaved
(``measure.interleaved_latency``: ``--rounds`` rounds, so a drift of the machine shifts them
alike), on ``--threads`` threads; each is evaluated on the checkpoint's test split and its
build timed (prune + export / quantize). Speed-ups against the dense fp32 model in PyTorch eager
(the origin report's baseline) and in ONNX Runtime.

    python experiments/bench_runtimes.py CKPT [--ratios 0,0.3,0.5] [--runs 300] [--rounds 10]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from trainables import compress, data, measure, ort
from trainables.train import evaluate
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
    splits = data.load(spec.data)
    calibration = calibration_images(spec, splits)
    models, accuracy, seconds = {}, {}, {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        t = time.perf_counter()
        fp32 = compress.make_permanent(compress.prune(dense, "channel_l1", ratio, round_to=spec.sweep.round_to)).eval()
        seconds[(ratio, "torch", False)] = time.perf_counter() - t
        t = time.perf_counter()
        models[(ratio, "torch", True)] = compress.quantize_int8(fp32, calibration)
        seconds[(ratio, "torch", True)] = time.perf_counter() - t
        models[(ratio, "torch", False)] = fp32
        t = time.perf_counter()
        core = ort.export_core(fp32)
        models[(ratio, "onnxruntime", False)] = ort.OrtModel(ort.classifier(core, splits.classes, *splits.stats), args.threads)
        seconds[(ratio, "onnxruntime", False)] = time.perf_counter() - t
        t = time.perf_counter()
        q = ort.quantize_core(core, calibration)
        models[(ratio, "onnxruntime", True)] = ort.OrtModel(ort.classifier(q, splits.classes, *splits.stats), args.threads)
        seconds[(ratio, "onnxruntime", True)] = time.perf_counter() - t
        for key, m in models.items():
            if key[0] == ratio:
                accuracy[key] = m.evaluate(splits.test)[0] if isinstance(m, ort.OrtModel) else evaluate(m, splits.test)
    stats = measure.interleaved_latency(models, threads=args.threads, runs=args.runs, warmup=20, rounds=args.rounds)
    table = pd.DataFrame([{"ratio": r, "runtime": rt, "int8": q, "test_accuracy": accuracy[(r, rt, q)],
                           "build_s": seconds[(r, rt, q)], **{k: v[k] for k in ("latency_ms", "latency_p90_ms",
                                                                               "latency_cv")}}
                          for (r, rt, q), v in stats.items()])
    eager = stats[(0.0, "torch", False)]["latency_ms"]
    ort_dense = stats[(0.0, "onnxruntime", False)]["latency_ms"]
    table["speedup_vs_torch_dense"] = eager / table.latency_ms
    table["speedup_vs_ort_dense"] = ort_dense / table.latency_ms
    print(f"CPU {measure.cpu_name()} [{measure.cpu_flags()}], {args.threads} thread(s), {args.runs} runs each in "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, ORT INT8 scheme {ort.INT8_SCHEME}; "
          f"build_s: INT8 rows time the quantization alone")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
