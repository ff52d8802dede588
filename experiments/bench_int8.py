"""ONNX Runtime INT8 schemes: accuracy against fp32 on this CPU and on an x86 CPU without VNNI.

For a trained checkpoint and channel_l1 ratios, the shipped classifier (``trainables.ort``) in
fp32 and in every INT8 scheme of ``ort.INT8_SCHEMES``, all from the same calibration images:
test accuracy, agreement with fp32 and batch-1 latency on this CPU (interleaved, one thread).
With ``--emulate CPU`` every model is evaluated again under ``qemu-x86_64 -cpu CPU`` (e.g.
``Haswell``: AVX2 without AVX-512 or VNNI, where ORT's u8 x s8 kernels use the saturating
VPMADDUBSW): the CPU the issue saw a 15-point loss on, without that machine. The emulated run
only evaluates the first ``--emulate-images`` test images (its latency means nothing; it runs
~100x slower); it imports numpy and onnxruntime alone.

A pruned point is recovered as a search builds it: BatchNorm re-estimated, then ``--finetune``
epochs on the labels (0: neither).

    python experiments/bench_int8.py CKPT [--ratios 0,0.3] [--finetune 2] [--schemes s8s8,u8s8,u8s8-7bit]
                                          [--emulate Haswell [--emulate-images 100]] [--runs 200]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def evaluate_files(files: list[str], images: str, labels: str) -> dict[str, list[int]]:
    """Labels each ONNX classifier gives (ORT, one thread): what the emulated run does."""
    import onnxruntime as ort

    x, out = np.load(images), {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for f in files:
        s = ort.InferenceSession(f, options, providers=["CPUExecutionProvider"])
        out[f] = np.concatenate([s.run(["label"], {"images": x[i : i + 64]})[0] for i in range(0, len(x), 64)]).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--ratios", default="0,0.3")
    ap.add_argument("--emulate", help="a qemu CPU model without VNNI, e.g. Haswell")
    ap.add_argument("--emulate-images", type=int, default=100, help="test images the emulated run labels "
                    "(it runs ~100x slower)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--finetune", type=int, default=2, help="epochs a pruned point is fine-tuned (after adaptive BN)")
    ap.add_argument("--schemes", default=",".join(("s8s8", "u8s8", "u8s8-7bit")))
    ap.add_argument("--evaluate", nargs="*", help=argparse.SUPPRESS)  # the emulated child: FILES IMAGES LABELS
    args = ap.parse_args()
    if args.evaluate:
        print(json.dumps(evaluate_files(args.evaluate[:-2], *args.evaluate[-2:])))
        return

    import pandas as pd
    import torch

    from trainables import compress, data, measure, ort
    from trainables.finetune import finetune
    from tuning.models import calibration_images, dense_from_checkpoint

    torch.set_num_threads(1)
    dense, spec = dense_from_checkpoint(args.checkpoint)
    splits = data.load(spec.data)
    calibration = calibration_images(spec, splits)
    images = splits.test.x.permute(0, 2, 3, 1).contiguous().numpy()
    truth = splits.test.y.numpy()
    models: dict[tuple[float, str], ort.OrtModel] = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        fp32 = compress.make_permanent(compress.prune(dense, "channel_l1", ratio, round_to=spec.sweep.round_to)).eval()
        if ratio > 0 and args.finetune:  # as a search builds a pruned point
            fp32 = compress.recalibrate_bn(fp32, splits.train.normalized(spec.sweep.bn_recalibration))
            fp32 = finetune(fp32, splits.train, spec.train, args.finetune, spec.sweep.finetune_lr)
        core = ort.export_core(fp32, f"channel_l1 {ratio:g}")
        models[(ratio, "fp32")] = ort.OrtModel(ort.classifier(core, splits.classes, *splits.stats))
        for scheme in args.schemes.split(","):
            q = ort.quantize_core(core, calibration, scheme=scheme)
            models[(ratio, scheme)] = ort.OrtModel(ort.classifier(q, splits.classes, *splits.stats))
    labels = {k: m.predict(images) for k, m in models.items()}
    stats = measure.interleaved_latency(models, threads=1, runs=args.runs, warmup=20, rounds=5)
    emulated: dict[tuple[float, str], np.ndarray] = {}
    if args.emulate:
        with tempfile.TemporaryDirectory() as d:
            files = {}
            for (ratio, scheme), m in models.items():
                files[(ratio, scheme)] = f"{d}/{ratio:g}-{scheme}.onnx"
                m.save(files[(ratio, scheme)])
            np.save(f"{d}/x.npy", images[: args.emulate_images])
            np.save(f"{d}/y.npy", truth[: args.emulate_images])
            cmd = ["nice", "-n", "10", "qemu-x86_64", "-cpu", args.emulate, sys.executable, __file__, "--evaluate", *files.values(),
                   f"{d}/x.npy", f"{d}/y.npy"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            got = json.loads(out)
            emulated = {k: np.array(got[f]) for k, f in files.items()}
    rows = []
    for (ratio, scheme), m in models.items():
        ref = labels[(ratio, "fp32")]
        row = {"ratio": ratio, "model": scheme, "test_accuracy": (labels[(ratio, scheme)] == truth).mean(),
               "agree_fp32": (labels[(ratio, scheme)] == ref).mean(), "latency_ms": stats[(ratio, scheme)]["latency_ms"],
               "latency_cv": stats[(ratio, scheme)]["latency_cv"], "size_mb": m.size_mb()}
        if emulated:
            n = args.emulate_images
            row[f"first_{n}_accuracy"] = (labels[(ratio, scheme)][:n] == truth[:n]).mean()
            row[f"first_{n}_accuracy_{args.emulate}"] = (emulated[(ratio, scheme)] == truth[:n]).mean()
            row[f"agree_fp32_{args.emulate}"] = (emulated[(ratio, scheme)] == emulated[(ratio, "fp32")]).mean()
        rows.append(row)
    print(f"CPU {measure.cpu_name()} [{measure.cpu_flags()}], onnxruntime {ort_version()}, 1 thread; "
          f"{len(truth)} test images of {spec.data.dataset}; {args.checkpoint}")
    if args.emulate:
        print(f"emulated: qemu-x86_64 -cpu {args.emulate} (its CPUID: no AVX-512, no VNNI)")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
