"""Datasets as uint8 tensors, and airbench-style batches made on the device.

Every dataset (read by :mod:`trainables.datasets`) becomes a :class:`Splits` of uint8 NCHW
images and int64 labels: ``train``, ``val`` (carved from train: stratified, seeded) and
``test``, at one size (``[data] image_size``, else as stored; digits default to 32 x 32). The
whole uint8 set lives on the training device; normalisation and augmentation (random crop with
padding, horizontal flip) happen per batch on that device, so there are no DataLoader workers to
starve a 2-core machine and no host->device copies per step on a GPU.

Each split carries its normalisation: the per-channel mean and std of the training images
(or ``[data] mean`` / ``std`` when given). They travel with the model (the checkpoint, the
ONNX file's preprocessing), so a model and the statistics it was trained with never part.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from trainables import datasets
from trainables.errors import DataError

# CIFAR-10 channel statistics (0-1 scale): what every model before per-dataset statistics was
# trained with, so a checkpoint that records none is read with these.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4
# The whole uint8 dataset is held in memory and on the training device; above this it is refused.
MAX_BYTES = 8 * 2**30


@dataclass
class DataConfig:
    """The ``[data]`` section of an experiment file."""

    dataset: Literal["digits", "npz", "cifar10", "cifar100", "imagefolder"] = "digits"
    path: str = ""  # npz: file with x_train, y_train, x_test, y_test
    root: str = "data/cifar10"  # cifar10/cifar100: holds cifar-10-batches-py/ (cifar-100-python/); imagefolder: train/, test/
    download: bool = False  # cifar10/cifar100: fetch it when absent (needs internet)
    image_size: int = 0  # resize every image to image_size x image_size (0 = as stored; digits: 32)
    mean: list[float] = field(default_factory=list)  # per channel, 0-1 scale; empty = from the training images
    std: list[float] = field(default_factory=list)
    train_size: int = 0  # 0 = all training images
    test_size: int = 0  # 0 = all test images
    val_fraction: float = 0.1  # carved from train, stratified; search objectives use it
    seed: int = 0


@dataclass
class Split:
    x: torch.Tensor  # uint8 N x C x H x W
    y: torch.Tensor  # int64 N
    mean: tuple[float, ...]  # per channel, 0-1 scale: what normalises these images for the model
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.mean, self.std)

    def head(self, n: int) -> "Split":
        """The first ``n`` images (all when ``n`` <= 0), with the same normalisation."""
        return self if n <= 0 or n >= len(self) else Split(self.x[:n], self.y[:n], self.mean, self.std)

    def normalized(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` images (all by default) as the model sees them: float, normalised."""
        return normalize(self.x[:n], self.mean, self.std)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    name: str
    classes: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])  # names, by label

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C x H x W of one image."""
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, 0-1 scale."""
        return self.train.mean, self.train.std

    def to(self, device: torch.device | str) -> "Splits":
        return Splits(self.train.to(device), self.val.to(device), self.test.to(device), self.name, self.classes)


# ----------------------------------------------------------------------------- loading


def _subset(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if size <= 0 or size >= len(y):
        return x, y
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:size])
    return x[idx], y[idx]


def _split(x: np.ndarray, y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64)),
                 mean, std)


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images -> ``size`` x ``size`` (bilinear; antialiased when shrinking), in chunks."""
    if size <= 0 or x.shape[1:3] == (size, size):
        return x
    out = np.empty((len(x), size, size, x.shape[3]), np.uint8)
    for i in range(0, len(x), 4096):
        img = torch.from_numpy(x[i:i + 4096]).permute(0, 3, 1, 2).float()
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=size < min(x.shape[1:3]))
        out[i:i + 4096] = img.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) of uint8 NHWC images; a flat channel gets std 1."""
    flat = x.reshape(-1, x.shape[3]).astype(np.float64) / 255
    std = flat.std(0)
    return tuple(round(float(m), 4) for m in flat.mean(0)), tuple(round(float(s), 4) if s > 1e-3 else 1.0 for s in std)


def _given_stats(cfg: DataConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if not cfg.mean and not cfg.std:
        return None
    if len(cfg.mean) != channels or len(cfg.std) != channels or min(cfg.std) <= 0:
        raise DataError(f"[data] mean and std need one value per channel ({channels}), std > 0, on the 0-1 scale; got "
                        f"mean={cfg.mean} std={cfg.std} (or leave both out: they are computed from the training images)")
    return tuple(cfg.mean), tuple(cfg.std)


def load(cfg: DataConfig) -> Splits:
    """Load ``cfg.dataset`` as uint8 train/val/test splits on the CPU at one size, with its
    class names and the normalisation of its training images."""
    from sklearn.model_selection import train_test_split

    (x_tr, y_tr, x_te, y_te), classes = datasets.read(cfg)
    x_tr, y_tr = _subset(x_tr, y_tr, cfg.train_size, cfg.seed)
    x_te, y_te = _subset(x_te, y_te, cfg.test_size, cfg.seed + 1)
    x_tr, x_te = resize(x_tr, cfg.image_size), resize(x_te, cfg.image_size)
    nbytes = x_tr.nbytes + x_te.nbytes
    if nbytes > MAX_BYTES:
        raise DataError(f"{cfg.dataset}: {nbytes / 2**30:.1f} GiB of uint8 images at {x_tr.shape[1]} x {x_tr.shape[2]}, "
                        f"above the {MAX_BYTES / 2**30:.0f} GiB held in memory and on the device; use fewer images "
                        "([data] train_size, test_size) or a smaller [data] image_size")
    try:
        x_fit, x_val, y_fit, y_val = train_test_split(
            x_tr, y_tr, test_size=cfg.val_fraction, stratify=y_tr, random_state=cfg.seed
        )
    except ValueError as e:
        raise DataError(
            f"cannot carve a stratified {cfg.val_fraction:.0%} validation split from "
            f"{len(y_tr)} training images: {e}. Use more images ([data] train_size) or change "
            "[data] val_fraction"
        ) from None
    mean, std = _given_stats(cfg, x_fit.shape[3]) or channel_stats(x_fit)
    return Splits(_split(x_fit, y_fit, mean, std), _split(x_val, y_val, mean, std), _split(x_te, y_te, mean, std),
                  cfg.dataset, classes)


# ----------------------------------------------------------------------------- batches


@functools.cache
def _stats(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (0-255 scale) as 1xCx1x1 tensors on ``device``, made once per device: a
    fresh ``torch.tensor(..., device=cuda)`` per batch would be a host->device copy and a sync."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
    return m, s


def normalize(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """uint8 NCHW -> float NCHW normalised with ``mean`` and ``std`` (0-1 scale; on x's device)."""
    m, s = _stats(x.device, tuple(mean), tuple(std))
    return x.to(torch.float32, copy=True).sub_(m).div_(s)  # copy: never writes into x


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 4 pixels per 32) and horizontal flip of a uint8 batch, on its device."""
    n, _, h, w = x.shape
    pad = max(1, round(PAD * min(h, w) / 32))
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def train_batches(split: Split, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented, normalised batches for one epoch (a last partial batch is dropped).

    The order and augmentation depend only on ``(seed, epoch)``, so an epoch replays exactly
    after a resume from a checkpoint.
    """
    device = split.x.device
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(split), device=device, generator=g)
    for b in range(max(1, len(split) // batch_size)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield normalize(augment(split.x[idx], g), split.mean, split.std), split.y[idx]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches in order, no augmentation."""
    for i in range(0, len(split), batch_size):
        yield normalize(split.x[i : i + batch_size], split.mean, split.std), split.y[i : i + batch_size]
