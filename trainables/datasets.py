"""Where images come from: each source read into four checked uint8 arrays and class names.

:func:`read` turns ``[data] dataset`` into ``(x_train, y_train, x_test, y_test)`` (uint8 NHWC,
any height and width, 1 or 3 channels; integer labels ``0..classes-1``) and the class names by
label. :mod:`trainables.data` makes the splits, the size and the statistics from them.

Sources:
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, no network) as 3 channels;
  a fixed 20% stratified test split.
- ``npz``: a file with ``x_train, y_train, x_test, y_test`` (and optionally ``class_names``).
- ``cifar10``, ``cifar100``: torchvision's python format under ``[data] root``; with
  ``download = true`` torchvision fetches and verifies it once. Read arrays-only, cached as npz.
- ``imagefolder``: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` image files.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from trainables.errors import DataError

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
    uint8 N x H x W x C images (C 1 or 3, one size for both splits), as many integer labels in ``0..classes-1`` (``num_classes``,
    else every label the training split has), no split empty, no test label unseen in training."""
    for name, x, y, y_name in (("x_train", x_train, y_train, "y_train"), ("x_test", x_test, y_test, "y_test")):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3) or min(x.shape[1:3]) < 8:
            raise DataError(f"{where}: {name} must be uint8 N x H x W x C images (C = 3 for RGB, 1 for grey; "
                            f"H, W >= 8), got {x.dtype} {x.shape}; store images as decoded, channels last")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{where}: x_train images are {x_train.shape[1:]} but x_test {x_test.shape[1:]}; both splits "
                        "need one size and channel count (or set [data] image_size to resize both)")
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
    grey = np.round(d.images * (255 / 16)).astype(np.uint8)  # N x 8 x 8, 0..16 -> 0..255
    x = np.repeat(grey[..., None], 3, axis=3)  # NHWC, 3 channels like the other sources
    y = d.target.astype(np.int64)
    # The test split is fixed (seed 0), whatever the experiment's seed: test stays test.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_tr, y_tr, x_te, y_te



CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read(cfg) -> tuple[Arrays, list[str]]:
    """The whole dataset, checked, and its class names by label: CIFAR-10's, an npz file's
    ``class_names`` array when it has one, else the labels themselves ("0", "1", ...)."""
    if cfg.dataset == "digits":
        return _load_digits(), [str(i) for i in range(10)]
    if cfg.dataset == "npz":
        return _load_npz(cfg.path)
    if cfg.dataset == "cifar10":
        return _load_cifar10(cfg.root, cfg.download), list(CIFAR10_CLASSES)
    raise DataError(f"unknown dataset {cfg.dataset!r}; use digits, npz or cifar10")


