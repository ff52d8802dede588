"""How repeatable a CPU latency figure is on this machine, and INT8's gain over fp32.

The timing assertions that used to be tests live here, as measurements: on a shared machine a
burst of outside load moves a median by tens of percent, which is a fact to report, not a
test failure. Both use :func:`trainables.measure.cpu_latency` (batch 1, median of ``--runs``
after 10 warm-up runs) on an untrained CIFAR-ResNet18 (latency does not depend on the weights).

1. repeatability: ``--repeats`` medians of the same fp32 model, one after another: their
   spread (max / min) and their CV;
2. INT8 vs fp32: medians of the two models measured alternately, ``--repeats`` times each,
   so outside load hits both alike; the speedup is the ratio of their medians.

    python experiments/bench_latency.py [--runs 40] [--repeats 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainables.compress import quantize_int8
from trainables.measure import cpu_latency
from trainables.model import cifar_resnet18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="timed runs per median")
    ap.add_argument("--repeats", type=int, default=10, help="medians per model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(0)
    dense = cifar_resnet18().eval()
    int8 = quantize_int8(dense, torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)))

    def median_ms(model: torch.nn.Module) -> float:
        return cpu_latency(model, threads=args.threads, runs=args.runs, warmup=10)["latency_ms"]

    t0 = time.perf_counter()
    same = [median_ms(dense) for _ in range(args.repeats)]
    pairs = [(median_ms(dense), median_ms(int8)) for _ in range(args.repeats)]
    fp32_ms, int8_ms = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    cpu = cpu_latency(dense, runs=1, warmup=0)["cpu"]
    print(f"# {cpu}, {args.threads} thread(s), batch 1, median of {args.runs} runs each, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| measurement | value |\n|---|---|")
    print(f"| fp32 medians, {args.repeats} in a row (ms) | {', '.join(f'{v:.2f}' for v in same)} |")
    print(f"| spread max / min | {max(same) / min(same):.3f} |")
    print(f"| CV of the medians | {statistics.pstdev(same) / statistics.fmean(same):.3f} |")
    print(f"| fp32 / INT8, alternated (ms) | {fp32_ms:.2f} / {int8_ms:.2f} |")
    print(f"| INT8 speedup | {fp32_ms / int8_ms:.2f} |")
    print(f"| smallest of the {args.repeats} pairwise speedups | {min(f / i for f, i in pairs):.2f} |")


if __name__ == "__main__":
    main()
