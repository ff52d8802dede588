"""Structured pruning: ratio -> kept channels -> CPU latency, for several ``round_to`` values.

CPU convolution kernels work on blocks of channels (8 or 16 floats per vector register on
AVX2 / AVX-512, 4 bytes each; INT8 kernels on wider blocks), so a layer with 57 channels costs
about what 64 cost. Rounding kept channel counts down to a multiple makes latency fall with the
ratio. Weights are random (latency depends on the architecture only).

    python experiments/bench_round_to.py [--ratios 0:0.7:0.1] [--round-to 1,8,16] [--runs 100] [--int8]
"""
from __future__ import annotations

import argparse

import torch

from trainables import compress, measure
from trainables.model import cifar_resnet18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0:0.7:0.1", help="start:stop:step, stop included")
    ap.add_argument("--round-to", default="1,8,16")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--int8", action="store_true", help="also time each model after INT8")
    args = ap.parse_args()
    start, stop, step = (float(v) for v in args.ratios.split(":"))
    ratios = [round(start + i * step, 4) for i in range(int(round((stop - start) / step)) + 1)]
    torch.manual_seed(0)
    dense = cifar_resnet18().eval()
    calibration = torch.randn(32, 3, 32, 32)
    print(f"CPU {measure.cpu_name()}, {args.threads} thread(s), median of {args.runs} runs, torch {torch.__version__}")
    print("ratio round_to stage_channels        MACs(M)  fp32_ms  p90_ms   cv" + ("   int8_ms  int8_cv" if args.int8 else ""))
    for ratio in ratios:
        for r in (int(v) for v in args.round_to.split(",")):
            model = compress.make_permanent(compress.prune(dense, "channel_l1", ratio, round_to=r))
            stages = [m.out_channels for n, m in model.named_modules() if n.endswith("layer1.0.conv1") or
                      n.endswith("layer2.0.conv1") or n.endswith("layer3.0.conv1") or n.endswith("layer4.0.conv1")]
            fp32 = measure.cpu_latency(model, threads=args.threads, runs=args.runs, warmup=10)
            line = (f"{ratio:5.2f} {r:8d} {str(stages):22s} {measure.macs(model) / 1e6:8.1f} {fp32['latency_ms']:8.2f} "
                    f"{fp32['latency_p90_ms']:7.2f} {fp32['latency_cv']:5.3f}")
            if args.int8:
                q = measure.cpu_latency(compress.quantize_int8(model, calibration), threads=args.threads,
                                        runs=args.runs, warmup=10)
                line += f" {q['latency_ms']:9.2f} {q['latency_cv']:8.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
