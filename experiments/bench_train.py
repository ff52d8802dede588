"""Training throughput and accuracy: trainables.train vs a plain hand-written PyTorch loop.

Both train the same CIFAR-ResNet18 from the same initial weights on the same images with the
same recipe (optimizer, lr schedule, label smoothing, batch size, epochs):
- ``trainables``: :func:`trainables.train.fit` (uint8 data on the device, batch augmentation);
- ``plain``: the origin report's way: a torchvision-transforms ``Dataset`` (per-image
  RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor-style scaling + Normalize) and a
  ``DataLoader`` (num_workers=0: a 2-core machine has no spare core for workers).
Prints images/s of each, the ratio, and test accuracy of each. On CUDA it also times
bf16 autocast + channels_last against fp32 for the trainables path.

    python experiments/bench_train.py --data ../shared/data/cifar10-subset.npz --epochs 3
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from trainables import data
from trainables.data import MEAN, STD, DataConfig
from trainables.model import cifar_resnet18
from trainables.train import TrainConfig, evaluate, fit, make_optimizer, make_scheduler


class _PlainCifar(Dataset):
    """Per-image transforms, as in torchvision's CIFAR tutorials."""

    def __init__(self, split: data.Split):
        self.x, self.y = split.x, split.y
        self.tf = T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.tf(self.x[i]), self.y[i]


def plain_loop(splits: data.Splits, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """The hand-written loop; returns (images/s, test accuracy)."""
    torch.manual_seed(cfg.seed)
    model = cifar_resnet18().to(device)
    loader = DataLoader(_PlainCifar(splits.train), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    images, seconds = 0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            images += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        print(f"  plain epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    test_on_device = splits.test.to(device)
    return images / seconds, evaluate(model, test_on_device, cfg.eval_batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="npz file (default: scikit-learn digits)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--train-size", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    dcfg = DataConfig(dataset="npz", path=args.data) if args.data else DataConfig()
    dcfg.train_size = args.train_size
    splits = data.load(dcfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"data: {args.data or 'digits'}: train {len(splits.train)}, test {len(splits.test)}; "
          f"epochs {cfg.epochs}, batch {cfg.batch_size}, lr {cfg.lr}")

    plain_ips, plain_acc = plain_loop(splits, cfg, device)
    r = fit(splits.to(device), cfg, on_epoch=lambda m: print(f"  trainables epoch {m['epoch']}: loss {m['train_loss']:.4f}", flush=True))
    print(f"plain loop:  {plain_ips:8.1f} images/s   test accuracy {plain_acc:.4f}")
    print(f"trainables:  {r.images_per_second:8.1f} images/s   test accuracy {r.test_accuracy:.4f}")
    print(f"throughput ratio trainables/plain: {r.images_per_second / plain_ips:.3f}")
    print(f"accuracy difference (trainables - plain): {100 * (r.test_accuracy - plain_acc):+.2f} points")

    if device.type == "cuda":  # what fit does on CUDA (bf16 + channels_last) against fp32
        one = dataclasses.replace(cfg, epochs=1)
        r32 = fit(splits.to(device), dataclasses.replace(one, amp=False))
        rbf = fit(splits.to(device), one)
        print(f"cuda fp32: {r32.images_per_second:.0f} images/s, "
              f"bf16+channels_last: {rbf.images_per_second:.0f} images/s")

if __name__ == "__main__":
    main()
