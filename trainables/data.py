"""Datasets as uint8 tensors, and airbench-style batches made on the device.

Every dataset becomes a :class:`Splits` of uint8 NCHW images and int64 labels: ``train``,
``val`` (carved from train: stratified, seeded) and ``test``. The whole uint8 set lives on the
training device; normalisation and augmentation (random crop with 4-pixel padding, horizontal
flip) happen per batch on that device, so there are no DataLoader workers to starve a 2-core
machine and no host->device copies per step on a GPU.

Datasets:
- ``cifar10``: torchvision's CIFAR-10 python format (``ROOT/cifar-10-batches-py``); with
  ``download = true`` torchvision fetches and verifies it once. Converted to a uint8 ``.npz``
  cache beside it on first use.
- ``npz``: any file with ``x_train, y_train, x_test, y_test`` (uint8 NHWC, integer labels).
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, no network) upscaled to
  32x32x3; a fixed 20% stratified test split.
"""
from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from trainables.errors import DataError

# CIFAR-10 channel statistics (0-1 scale); used for every dataset so models are interchangeable.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4


@dataclass
class DataConfig:
    """The ``[data]`` section of an experiment file."""

    dataset: Literal["digits", "npz", "cifar10"] = "digits"
    path: str = ""  # npz: file with x_train, y_train, x_test, y_test
    root: str = "data/cifar10"  # cifar10: directory holding cifar-10-batches-py/
    download: bool = False  # cifar10: fetch it when absent (needs internet)
    train_size: int = 0  # 0 = all training images
    test_size: int = 0  # 0 = all test images
    val_fraction: float = 0.1  # carved from train, stratified; search objectives use it
    seed: int = 0


@dataclass
class Split:
    x: torch.Tensor  # uint8 N x 3 x 32 x 32
    y: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


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

    def to(self, device: torch.device | str) -> "Splits":
        return Splits(self.train.to(device), self.val.to(device), self.test.to(device), self.name, self.classes)


# ----------------------------------------------------------------------------- loading


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


def _load_npz(path: str) -> tuple[Arrays, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"dataset file {p} not found. Set [data] path to an .npz with x_train, y_train, "
            "x_test, y_test (uint8 NHWC), e.g. ../shared/data/cifar10-subset.npz from the repo root"
        )
    try:
        with np.load(p, allow_pickle=False) as f:  # arrays only: an object array would unpickle (run code)
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise DataError(f"{p} lacks arrays {sorted(missing)}; it has {sorted(f.files)}")
            arrays = tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            names = [str(n) for n in f["class_names"]] if "class_names" in f.files else None
    except (ValueError, OSError) as e:  # not an npz, or object arrays
        raise DataError(f"{p} is not an .npz of plain arrays ({str(e).splitlines()[0][:200]}); write it with "
                        "numpy.savez(x_train=..., y_train=..., x_test=..., y_test=...)") from None
    check_arrays(str(p), *arrays, num_classes=len(names) if names else None)
    return arrays, names or [str(i) for i in range(int(arrays[1].max()) + 1)]  # type: ignore[return-value]


def check_arrays(where: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int | None = None) -> None:
    """A :class:`DataError` naming the array and the fix unless the four arrays are a dataset:
    uint8 N x 32 x 32 x 3 images, as many integer labels in ``0..classes-1`` (``num_classes``,
    else every label the training split has), no split empty, no test label unseen in training."""
    for name, x, y, y_name in (("x_train", x_train, y_train, "y_train"), ("x_test", x_test, y_test, "y_test")):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"{where}: {name} must be uint8 N x 32 x 32 x 3 (images as decoded, RGB), got "
                            f"{x.dtype} {x.shape}; resize your images to 32 x 32 first")
        if not len(x):
            raise DataError(f"{where}: {name} is empty; every split needs images")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{where}: {y_name} must be a 1-D array of integer labels, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise DataError(f"{where}: {name} has {len(x)} images but {y_name} {len(y)} labels; one label per image")
    classes = num_classes or int(y_train.max()) + 1
    if classes < 2:
        raise DataError(f"{where}: the labels name {classes} class; a classifier needs at least two")
    for y_name, y in (("y_train", y_train), ("y_test", y_test)):
        if y.min() < 0 or y.max() >= classes:
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(f"{where}: {y_name} holds label {bad}, outside 0..{classes - 1} (the classes "
                            f"{'the file names' if num_classes else 'the training labels span'}); labels must be "
                            "class indices 0..classes-1")


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class _ArraysOnly(pickle.Unpickler):
    """torchvision's CIFAR format is pickled: unpickle lists, dicts and numpy arrays only, never
    the other callables a pickle can name (a tampered batch file would run them)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"{self.where}: a CIFAR batch holds lists and arrays only, this one names {module}.{name}; "
                            "refused (a tampered file?): extract cifar-10-python.tar.gz again")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        unpickler = _ArraysOnly(f, encoding="latin1")
        unpickler.where = str(path)
        entry = unpickler.load()
    if not isinstance(entry, dict) or "data" not in entry or not ({"labels", "fine_labels"} & set(entry)):
        raise DataError(f"{path} is not a CIFAR batch (a dict with data and labels); extract cifar-10-python.tar.gz again")
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    return x, y


def _load_cifar10(root: str, download: bool) -> tuple[np.ndarray, ...]:
    root_p = Path(root)
    cache = root_p / "cifar10_uint8.npz"
    if cache.is_file():
        return _load_npz(str(cache))[0]
    base = root_p / _CIFAR_DIR
    files = [base / n for n in _CIFAR_TRAIN + ["test_batch"]]
    if not all(f.is_file() for f in files) and download:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        try:  # the archive's MD5 is checked; the batches are read below, arrays only
            download_and_extract_archive(CIFAR10.url, str(root_p), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as e:  # network errors come in many types
            raise DataError(
                f"could not download CIFAR-10 into {root_p}: {e}. Without internet, copy the "
                f"python version ({_CIFAR_DIR}/ from cifar-10-python.tar.gz) under {root_p} "
                "and set [data] download = false"
            ) from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found under {root_p} (missing {', '.join(missing[:2])}"
            f"{' ...' if len(missing) > 2 else ''}). Set [data] download = true to fetch it "
            f"(needs internet), or put torchvision's {_CIFAR_DIR}/ under {root_p} "
            "([data] root = DIR)"
        )
    train = [_read_cifar_batch(f) for f in files[:-1]]
    x_test, y_test = _read_cifar_batch(files[-1])
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    check_arrays(str(base), x_train, y_train, x_test, y_test, num_classes=10)
    try:
        np.savez(cache, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    except OSError:
        pass  # a read-only root still works, just without the cache
    return x_train, y_train, x_test, y_test


def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    img = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    img = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    x = x.permute(0, 2, 3, 1).numpy()  # NHWC like the other sources
    y = d.target.astype(np.int64)
    # The test split is fixed (seed 0), whatever the experiment's seed: test stays test.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_tr, y_tr, x_te, y_te


def _subset(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if size <= 0 or size >= len(y):
        return x, y
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:size])
    return x[idx], y[idx]


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64)))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _read(cfg: DataConfig) -> tuple[Arrays, list[str]]:
    """The whole dataset, checked, and its class names by label: CIFAR-10's, an npz file's
    ``class_names`` array when it has one, else the labels themselves ("0", "1", ...)."""
    if cfg.dataset == "digits":
        return _load_digits(), [str(i) for i in range(10)]
    if cfg.dataset == "npz":
        return _load_npz(cfg.path)
    if cfg.dataset == "cifar10":
        return _load_cifar10(cfg.root, cfg.download), list(CIFAR10_CLASSES)
    raise DataError(f"unknown dataset {cfg.dataset!r}; use digits, npz or cifar10")


def load(cfg: DataConfig) -> Splits:
    """Load ``cfg.dataset`` as uint8 train/val/test splits on the CPU, with its class names."""
    from sklearn.model_selection import train_test_split

    (x_tr, y_tr, x_te, y_te), classes = _read(cfg)
    x_tr, y_tr = _subset(x_tr, y_tr, cfg.train_size, cfg.seed)
    x_te, y_te = _subset(x_te, y_te, cfg.test_size, cfg.seed + 1)
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
    return Splits(_split(x_fit, y_fit), _split(x_val, y_val), _split(x_te, y_te), cfg.dataset, classes)


# ----------------------------------------------------------------------------- batches


@functools.cache
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (0-255 scale) as 1x3x1x1 tensors on ``device``, made once per device: a
    fresh ``torch.tensor(..., device=cuda)`` per batch would be a host->device copy and a sync."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float NCHW normalised with the CIFAR-10 statistics (on x's device)."""
    mean, std = _stats(x.device)
    return x.to(torch.float32, copy=True).sub_(mean).div_(std)  # copy: never writes into x


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel zero padding) and horizontal flip of a uint8 batch, on its device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (n,), device=x.device, generator=generator)
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
        yield normalize(augment(split.x[idx], g)), split.y[idx]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches in order, no augmentation."""
    for i in range(0, len(split), batch_size):
        yield normalize(split.x[i : i + batch_size]), split.y[i : i + batch_size]
