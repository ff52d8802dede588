"""The GPU path on a real CUDA GPU: training throughput, the sweep of a GPU-trained model, masks,
the fractional-GPU memory cap and batched inference throughput.

What the CPU tests (tests/test_gpu_path.py) can only force, this runs for real:
1. training images/s, fp32 against bf16 autocast + channels_last (what ``fit`` does on CUDA),
   steady state = the epochs after the first (cuDNN autotuning and allocator warm-up);
2. the sweep of that GPU-trained model with every method, INT8 and fine-tuning (every default
   sweep crashed on a channels_last model before);
3. ``global_random`` masks drawn on CUDA equal the CPU ones, and the CUDA RNG is untouched;
4. ``torch.cuda.set_per_process_memory_fraction`` (what a trial with ``gpus_per_trial < 1`` sets)
   refuses an allocation over its share;
5. ``gpu_throughput`` (bf16, batch 256) of the dense and a channel-pruned model.

    python experiments/bench_gpu.py [--data ../shared/data/cifar10-subset.npz] [--epochs 4] [--batch-size 512]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from trainables import compress, data, measure
from trainables.compress import METHODS
from trainables.data import DataConfig
from trainables.sweep import SweepConfig, run_sweep
from trainables.train import TrainConfig, fit


def _throughput(splits: data.Splits, cfg: TrainConfig) -> tuple[torch.nn.Module, dict]:
    result = fit(splits, cfg)
    steady = result.history[1:] or result.history
    ips = sum(h["images"] for h in steady) / sum(h["seconds"] for h in steady)
    return result.model, {"amp": cfg.amp, "epoch1_ips": result.history[0]["images_per_second"], "steady_ips": ips,
                          "test_accuracy": result.test_accuracy, "peak_mem_mb": torch.cuda.max_memory_allocated() / 1e6}


def _masks_match() -> bool:
    torch.manual_seed(0)
    from trainables.model import cifar_resnet18

    model = cifar_resnet18().eval()
    on_cpu = compress.prune(model, "global_random", 0.5, seed=3)
    cuda_state = torch.cuda.get_rng_state()
    on_gpu = compress.prune(model.cuda().to(memory_format=torch.channels_last), "global_random", 0.5, seed=3)
    same_rng = torch.equal(cuda_state, torch.cuda.get_rng_state())
    pairs = zip(measure.prunable_layers(on_cpu), measure.prunable_layers(on_gpu))
    same = all(torch.equal(a.weight_mask.cpu(), b.weight_mask.cpu()) for (_, a), (_, b) in pairs)
    return same and same_rng


def _memory_cap(fraction: float = 0.25) -> tuple[bool, bool]:
    """(an allocation under the share succeeds, one over it is refused)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    try:
        under = torch.empty(int(0.8 * fraction * total), dtype=torch.uint8, device="cuda")
        del under
        torch.cuda.empty_cache()
        try:
            over = torch.empty(int(1.2 * fraction * total), dtype=torch.uint8, device="cuda")
            del over
            refused = False
        except torch.OutOfMemoryError:
            refused = True
        return True, refused
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="npz file (default: scikit-learn digits)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, CPU {measure.cpu_name()}", flush=True)
    splits = data.load(DataConfig(dataset="npz", path=args.data) if args.data else DataConfig()).to("cuda")
    print(f"data {args.data or 'digits'}: train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)}")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, label_smoothing=0.1)

    rows = []
    for amp in (False, True):
        torch.cuda.reset_peak_memory_stats()
        model, row = _throughput(splits, dataclasses.replace(cfg, amp=amp))
        rows.append(row)
        print(f"train {'bf16+channels_last' if amp else 'fp32':>18}: epoch 1 {row['epoch1_ips']:8.0f} img/s, "
              f"steady {row['steady_ips']:8.0f} img/s, test {row['test_accuracy']:.4f}, "
              f"peak {row['peak_mem_mb']:.0f} MB", flush=True)
    print(f"bf16 speed-up (steady): {rows[1]['steady_ips'] / rows[0]['steady_ips']:.2f}x")

    # the bf16-trained model, in the layout training left it in
    sweep = SweepConfig(methods=list(METHODS), ratios=[0.0, 0.5], int8=True, finetune_epochs=1, finetune_lr=0.01,
                        latency_runs=50, latency_warmup=10)
    t0 = time.perf_counter()
    df = run_sweep(model.to(memory_format=torch.channels_last), splits, sweep, cfg, progress=False)
    print(f"sweep of the GPU-trained model ({len(df)} points, every method, INT8, 1 fine-tune epoch): "
          f"{time.perf_counter() - t0:.1f} s")
    cols = ["method", "ratio", "int8", "accuracy", "test_accuracy", "accuracy_no_finetune", "sparsity", "latency_ms",
            "throughput_ips"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"global_random mask CUDA == CPU and CUDA RNG untouched: {_masks_match()}")
    under, refused = _memory_cap(0.25)
    print(f"memory fraction 0.25: 0.2 of the card allocates: {under}; 0.3 of the card refused: {refused}")


if __name__ == "__main__":
    main()
