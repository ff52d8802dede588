"""Where images come from: each source read into four checked uint8 arrays and class names.

:func:`read` turns ``[data] dataset`` into ``(x_train, y_train, x_test, y_test)`` (uint8 NHWC,
any height and width, 1 or 3 channels; integer labels ``0..classes-1``) and the class names by
label. :mod:`trainables.data` makes the splits, the size and the statistics from them.

Sources (five):
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, no network), upscaled to 32 x 32 (or [data] image_size) and 3 channels;
  a fixed 20% stratified test split.
- ``npz``: a file with ``x_train, y_train, x_test, y_test`` (and optionally ``class_names``).
- ``cifar10``, ``cifar100``: torchvision's python format under ``[data] root``
  (``cifar-10-batches-py/``, ``cifar-100-python/``; CIFAR-100 by its 100 fine labels); with
  ``download = true`` torchvision fetches and verifies it once. One reader serves both, driven
  by a small table of file names. The batches are pickles, so they are read arrays-only (a
  tampered file cannot run code), once: then cached as ``ROOT/cifar10_uint8.npz`` /
  ``ROOT/cifar100_uint8.npz``.
- ``imagefolder``: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` image files (class names
  are the training folders, sorted), decoded with PIL at ``[data] image_size`` (required) and
  cached beside the folders: :mod:`trainables._imagefolder`, built on this module's checks and caches.

Caches are read with ``allow_pickle=False``; an unreadable or mismatched cache is rebuilt.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.errors import DataError

DIGITS_SIZE = 32  # digits are 8 x 8; upscaled to this unless [data] image_size says otherwise

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
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not an npz (or cut short), or object arrays
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
    for name, x, y, y_name in (("x_train", x_train, y_train, "y_train"), ("x_test", x_test, y_test, "y_test")):
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


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class _CifarFormat:
    """Where one of torchvision's CIFAR python formats keeps its batches, labels and class names."""

    title: str  # for messages
    torchvision: str  # its class in torchvision.datasets: url, filename and tgz_md5 of the archive
    archive: str  # the archive it extracts from (named in messages without importing torchvision)
    directory: str  # under [data] root
    train: tuple[str, ...]  # batch files, in order
    test: str
    label_key: str  # the label list in each batch
    names_file: str | None  # a pickled dict holding the class names, or None: the names are fixed
    names_key: str
    names: tuple[str, ...]  # the fixed names (names_file None); also for a cache written without names
    cache: str  # under [data] root


_CIFAR = {
    "cifar10": _CifarFormat("CIFAR-10", "CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels",
                            None, "label_names", CIFAR10_CLASSES, "cifar10_uint8.npz"),
    "cifar100": _CifarFormat("CIFAR-100", "CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python",
                             ("train",), "test", "fine_labels", "meta", "fine_label_names", (), "cifar100_uint8.npz"),
}


class _ArraysOnly(pickle.Unpickler):
    """torchvision's CIFAR format is pickled: unpickle lists, dicts, str and numpy arrays only,
    never the other callables a pickle can name (a tampered batch file would run them)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}
    where = "?"
    archive = "the archive"

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"{self.where}: a CIFAR batch holds lists and arrays only, this one names {module}.{name}; "
                            f"refused (a tampered file?): extract {self.archive} again")
        return super().find_class(module, name)


def _unpickle_cifar(path: Path, fmt: _CifarFormat) -> dict:
    try:
        with open(path, "rb") as f:
            unpickler = _ArraysOnly(f, encoding="latin1")  # the files are Python 2 pickles
            unpickler.where, unpickler.archive = str(path), fmt.archive
            entry = unpickler.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataError(f"{path} is not a readable {fmt.title} pickle ({type(e).__name__}: {str(e)[:120]}); "
                        f"extract {fmt.archive} again") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a {fmt.title} file (a pickled dict); extract {fmt.archive} again")
    return entry


def _read_cifar_batch(path: Path, fmt: _CifarFormat = _CIFAR["cifar10"]) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle_cifar(path, fmt)
    if "data" not in entry or fmt.label_key not in entry:
        raise DataError(f"{path} is not a {fmt.title} batch (a dict with data and {fmt.label_key}); "
                        f"extract {fmt.archive} again")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be N x 3072 uint8 (32 x 32 RGB, channel planes), got {data.dtype} "
                        f"{data.shape}; extract {fmt.archive} again")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(entry[fmt.label_key], dtype=np.int64)
    return x, y


def _cifar_names(base: Path, fmt: _CifarFormat) -> list[str]:
    if fmt.names_file is None:
        return list(fmt.names)
    path = base / fmt.names_file
    names = _unpickle_cifar(path, fmt).get(fmt.names_key)
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} lacks {fmt.names_key} (a list of class names); extract {fmt.archive} again")
    return names


def _read_cache(path: Path) -> tuple[Arrays, list[str] | None] | None:
    """A cache this module wrote: the four arrays (checked) and its class names (None when it
    has none); None when absent or not one (then it is rebuilt). Arrays only, never pickles."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            names = [str(n) for n in f["class_names"]] if "class_names" in f.files else None
        check_arrays(str(path), *arrays, num_classes=len(names) if names else None)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, DataError):
        return None  # truncated, foreign or tampered: the sources make it again
    return arrays, names  # type: ignore[return-value]


def _write_cache(path: Path, arrays: Arrays, names: list[str]) -> bool:
    """Write the arrays and names to ``path`` whole or not at all (a temporary file renamed into
    place, so an interrupted write never leaves a half cache); False where ``path``'s directory is
    read-only or full: the data still loads, just without the cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3],
                     class_names=np.array(names, dtype=str))
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def _load_cifar(dataset: str, root: str, download: bool) -> tuple[Arrays, list[str]]:
    """CIFAR-10 or CIFAR-100 (``dataset``, a key of :data:`_CIFAR`) under ``root``: from its
    cache, else from torchvision's batches (downloaded first when ``download`` and absent)."""
    fmt = _CIFAR[dataset]
    root_p = Path(root)
    cache = root_p / fmt.cache
    cached = _read_cache(cache)
    if cached is not None:
        arrays, names = cached
        if names or len(fmt.names) == int(arrays[1].max()) + 1:
            return arrays, names or list(fmt.names)
    base = root_p / fmt.directory
    files = [base / n for n in fmt.train + (fmt.test,) + ((fmt.names_file,) if fmt.names_file else ())]
    if not all(f.is_file() for f in files) and download:
        import torchvision.datasets
        from torchvision.datasets.utils import download_and_extract_archive

        tv = getattr(torchvision.datasets, fmt.torchvision)
        try:  # the archive's MD5 is checked; the batches are read below, arrays only
            download_and_extract_archive(tv.url, str(root_p), filename=tv.filename, md5=tv.tgz_md5)
        except Exception as e:  # network errors come in many types
            raise DataError(
                f"could not download {fmt.title} into {root_p}: {e}. Without internet, copy the "
                f"python version ({fmt.directory}/ from {fmt.archive}) under {root_p} "
                "and set [data] download = false"
            ) from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{fmt.title} not found under {root_p} (missing {', '.join(missing[:2])}"
            f"{' ...' if len(missing) > 2 else ''}). Set [data] download = true to fetch it "
            f"(needs internet), or put torchvision's {fmt.directory}/ under {root_p} "
            "([data] root = DIR)"
        )
    train = [_read_cifar_batch(base / n, fmt) for n in fmt.train]
    x_test, y_test = _read_cifar_batch(base / fmt.test, fmt)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    names = _cifar_names(base, fmt)
    check_arrays(str(base), x_train, y_train, x_test, y_test, num_classes=len(names))
    arrays = (x_train, y_train, x_test, y_test)
    _write_cache(cache, arrays, names)  # a read-only root still works, just without the cache
    return arrays, names


def _load_digits(size: int) -> tuple[np.ndarray, ...]:
    """The digits upscaled from their 0..16 levels straight to ``size`` (bilinear), then to uint8."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    img = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    if size != 8:
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    x = x.permute(0, 2, 3, 1).numpy()  # NHWC, 3 channels like the other sources
    y = d.target.astype(np.int64)
    # The test split is fixed (seed 0), whatever the experiment's seed: test stays test.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_tr, y_tr, x_te, y_te


def read(cfg) -> tuple[Arrays, list[str]]:
    """The whole dataset, checked, and its class names by label: CIFAR-10's, CIFAR-100's fine
    labels', an imagefolder's (its training folders, sorted), an npz file's ``class_names``
    array when it has one, else the labels themselves ("0", "1", ...)."""
    if cfg.dataset == "digits":
        return _load_digits(cfg.image_size or DIGITS_SIZE), [str(i) for i in range(10)]
    if cfg.dataset == "npz":
        return _load_npz(cfg.path)
    if cfg.dataset in _CIFAR:
        return _load_cifar(cfg.dataset, cfg.root, cfg.download)
    if cfg.dataset == "imagefolder":
        from trainables import _imagefolder  # here, not above: it builds on this module's checks and caches

        return _imagefolder.load(cfg.root, cfg.image_size)
    raise DataError(f"unknown dataset {cfg.dataset!r}; use digits, npz, cifar10, cifar100 or imagefolder "
                    "([data] dataset)")
